"""Export a trained model's embedding network for use outside this repository, as ONNX or
TorchScript: uint8 RGB images in, unit embeddings out, the input normalisation inside, checked
against PyTorch before anything is written."""
import argparse
import contextlib
import json
import os
import re
import sys
import warnings

import numpy as np
import torch
from torch import nn

from runs import RESULTS_VARIABLE, DataBase, load_model, output_folder
from runtime import ArgumentParser, UserError, atomic_path, remove_temporaries, run_main
from utils import UnreadableImage, embed_batches, inference_image, inference_sizes, unreadable_line

FORMATS = {
    'onnx': ('.onnx', 'ONNX', 'ONNX Runtime'),
    'torchscript': ('.pt', 'TorchScript', 'torch.jit.load'),
}
# Col2Im (timm's VOLO folds patches) needs opset 18; ONNX Runtime runs opset 18 since its version
# 1.14
OPSET = 18
TOLERANCE = 1e-4  # the exported embeddings must agree with PyTorch's to within this in cosine
# the export is traced at one batch size and checked at another, so a batch size frozen into it
# shows
TRACE_BATCH, CHECK_BATCH = 2, 3
INPUT_NAME, OUTPUT_NAME = 'images', 'embeddings'
# bytes of one protobuf file: larger weights would need ONNX's external data files
ONNX_LIMIT = 2 ** 31


def get_args_parser():
    """The command-line flags of export.py."""
    parser = ArgumentParser(
        description='Export a trained model as ONNX or TorchScript, checked against PyTorch',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # required, so no default to print (SUPPRESS keeps --help from showing 'default: None')
    parser.add_argument('--data_base', required=True, default=argparse.SUPPRESS, type=str,
                        help='the data base of the run to export: a path, or a file name, a run '
                             'name (its newest epoch) or an unambiguous prefix of one, looked for '
                             f'in results/, the folders ${RESULTS_VARIABLE} lists and the '
                             f'repository\'s results/; its model is the _model.pth file beside it '
                             f'and the export goes to the results/ folder it lies in')
    parser.add_argument('--format', default='onnx', choices=list(FORMATS),
                        help='onnx: for ONNX Runtime and the other ONNX runtimes; torchscript: for '
                             'torch.jit.load and libtorch (C++)')
    return parser


class Embedder(nn.Module):
    """What is exported: Model.embed, uint8 RGB images (B, 3, S, S) -> unit embeddings (B, D), where
    S is the run's test-time crop (train.py --image_size, 224 by default).

    It is in eval mode from the start: torch.onnx.export puts the module it is given back in that
    module's mode, and a new module's training mode would switch the model's BatchNorm layers to
    batch statistics.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.eval()

    def forward(self, images):
        return self.model.embed(images)  # (B, D)


def main():
    """Export the model beside a data base, check it against PyTorch, then write it and its JSON under results/."""
    args = get_args_parser().parse_args()
    data_base, data_base_path = DataBase.open(args.data_base)
    suffix, format_name, runtime = FORMATS[args.format]
    name, results = export_name(data_base_path), output_folder(data_base_path)
    export_path, description_path = (
        os.path.join(results, f'{name}{ending}') for ending in (suffix, '.json')
    )
    earlier = earlier_export(description_path, export_path, os.path.realpath(data_base_path))
    model, model_path = load_model(data_base, data_base_path)
    model_key = file_key(model_path)
    files = kept_exports(earlier, model_key, args.format, description_path)
    backbone_type = data_base.backbone_type
    epoch = '?' if data_base.epoch is None else data_base.epoch
    print(f'exporting {data_base_path} ({backbone_type}, {data_base.feature_dim}-d, epoch {epoch}) '
          f'as {format_name}')

    images, source = check_inputs(data_base.test.images, data_base.image_size)
    made_results = not os.path.isdir(results)
    remove_temporaries(results, f'{name}.')  # left by an export of this name that was killed
    try:
        # the export is moved into place first and its description last, so a description names
        # complete files
        with atomic_path(description_path) as description_tmp, atomic_path(
            export_path
        ) as export_tmp:
            export(Embedder(model), args.format, export_tmp, backbone_type, data_base.image_size)
            reference = embed_batches(model, [images]).numpy()  # (CHECK_BATCH, D)
            gap = 1 - smallest_cosine(reference, run_exported(export_tmp, args.format, images))
            if not gap <= TOLERANCE:  # nan fails too
                raise UserError(f'the {format_name} export disagrees with PyTorch on {source} (1 - '
                                f'cosine is {gap:.1e}, above {TOLERANCE:.0e}), so nothing was '
                                f'written; report it with the backbone {backbone_type} and your '
                                f'torch and {runtime} versions')
            files[args.format] = {
                'file': os.path.basename(export_path),
                'cosine_gap': float(f'{max(gap, 0):.1e}'),
                'torch': torch.__version__,
                **({'opset': OPSET} if args.format == 'onnx' else {}),
            }
            with open(description_tmp, 'w') as file:
                json.dump(
                    describe(model, data_base, data_base_path, model_key, files),
                    file,
                    indent=2,
                    default=str,
                )
                file.write('\n')
            size = os.path.getsize(export_tmp)
    except BaseException:
        if made_results:  # a failed export leaves nothing behind, not even the folder
            with contextlib.suppress(OSError):
                os.rmdir(results)
        raise
    print(f'{runtime} agrees with PyTorch on {source}: 1 - cosine is {max(gap, 0):.1e} at most '
          f'({TOLERANCE:.0e} allowed)')
    print(f'wrote {export_path} ({size / 2 ** 20:.1f} MiB) and {description_path}')


def export_name(data_base_path):
    """results/<name>.onnx's name: the data base's file name without _data_base.pth (or .pth)."""
    base = os.path.basename(data_base_path)
    for ending in ('_data_base.pth', '.pth'):
        if base.endswith(ending):
            return base[:-len(ending)]
    return base


def file_key(path):
    """A file's real path, size and modification time: test.py's gallery cache tells model files apart by them."""
    status = os.stat(path)
    return {'file': os.path.realpath(path), 'size': status.st_size, 'mtime_ns': status.st_mtime_ns}


def earlier_export(description_path, export_path, data_base_real):
    """The description of an earlier export of this name, {} if there is none.

    An earlier export of the same name is replaced only if its description says it came from the
    same data base file; another run's export, or a file without a description, is one UserError and
    left alone.
    """
    if not os.path.exists(description_path):
        if os.path.exists(export_path):
            raise UserError(f'{export_path} exists, but no {description_path} says which data base '
                            f'it was exported from, so it is left alone; move it away and export '
                            f'again')
        return {}
    try:
        with open(description_path) as file:
            earlier = json.load(file)
    except (OSError, ValueError):
        earlier = None
    if (
        not isinstance(earlier, dict)
        or not isinstance(earlier.get('files'), dict)
        or 'data_base' not in earlier
    ):
        raise UserError(f'{description_path} is not a description export.py wrote, so it and the '
                        f'exports beside it are left alone; move it away and export again')
    if earlier['data_base'] != data_base_real:
        raise UserError(f'{description_path} describes the export of another data base of the same '
                        f'name ({earlier["data_base"]}), which this one would replace; move those '
                        f'files away, or rename this data base')
    return earlier


def kept_exports(earlier, model_key, kind, description_path):
    """The earlier description's exports in other formats that are still there (beside its
    description_path) and from the same weights."""
    # none, or the run was trained again since: they are out of date
    if earlier.get('weights') != model_key:
        return {}
    return {
        other: entry
        for other, entry in earlier['files'].items()
        if other != kind
        and isinstance(entry, dict)
        and os.path.isfile(os.path.join(os.path.dirname(description_path), str(entry.get('file'))))
    }


def check_inputs(paths, image_size=None):
    """(CHECK_BATCH uint8 images (B, 3, S, S), what they are): the data base's first test images as
    test.py reads them, cropped to image_size (the run's), random pixels in place of any that cannot
    be read here (a data base from another machine), which a line names."""
    images, unreadable = [], []
    for path in paths[:CHECK_BATCH]:
        try:
            images.append(inference_image(path, image_size))
        except UnreadableImage:
            unreadable.append(path)
    read, (_, crop) = len(images), inference_sizes(image_size)
    if unreadable:
        print(unreadable_line(unreadable, 'test image'))
    generator = torch.Generator().manual_seed(0)
    images += list(torch.randint(0, 256, (CHECK_BATCH - read, 3, crop, crop), dtype=torch.uint8,
                                 generator=generator))
    if read == CHECK_BATCH:
        source = f'{read} test images of the data base'
    elif read:
        source = (
            f'{read} test image{"s" * (read > 1)} of the data base and {CHECK_BATCH - read} of'
            ' random pixels'
        )
    else:
        source = (
            f'{CHECK_BATCH} images of random pixels (the test images of the data base cannot be'
            ' read here)'
        )
    return torch.stack(images), source


@contextlib.contextmanager
def quiet_export():
    """Silence the exporters for the block: their deprecation and tracer warnings (the check against
    PyTorch is what counts), and what their C++ code prints to file descriptor 1 (the legacy ONNX
    exporter prints its whole graph there when an operator fails)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, 'w') as null:
            os.dup2(null.fileno(), 1)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def export(embedder, kind, path, backbone_type, image_size=None):
    """Trace the embedder on a random uint8 batch of image_size crops (the run's) and write it to
    path as ONNX or TorchScript, batch size dynamic.

    ONNX goes through the TorchScript-based exporter (dynamo=False): it needs no onnxscript, exports
    each backbone in seconds rather than the dynamo exporter's quarter of a minute, and names the
    operator it cannot translate.
    """
    _, crop = inference_sizes(image_size)
    example = torch.randint(0, 256, (TRACE_BATCH, 3, crop, crop), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(1))
    if kind == 'onnx':
        weights = sum(p.numel() * p.element_size() for p in embedder.parameters())
        if weights >= ONNX_LIMIT:
            raise UserError(f'{backbone_type} has {weights / 2 ** 30:.1f} GiB of weights, more '
                            f'than one ONNX file holds (2 GiB); export it with --format '
                            f'torchscript')
    try:
        with quiet_export(), torch.no_grad():
            if kind == 'onnx':
                torch.onnx.export(
                    embedder,
                    (example,),
                    path,
                    dynamo=False,
                    opset_version=OPSET,
                    verbose=False,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: 'batch'}, OUTPUT_NAME: {0: 'batch'}},
                )
            else:
                torch.jit.save(torch.jit.trace(embedder, example, check_trace=False), path)
    except Exception as error:  # an operator or a Python construct the exporter cannot translate
        raise UserError(export_failure(backbone_type, FORMATS[kind][1], error)) from None


def export_failure(backbone_type, format_name, error):
    """The sentence for a model that does not export, naming the operator that failed where the exporter says."""
    text = str(error).strip()
    found = re.search(r"operator '([\w:.]+)'", text) or re.search(
        r'Occurred when translating ([\w:.]+)', text
    )
    detail = (text.splitlines()[0].strip().rstrip('.') if text else type(error).__name__)[:200]
    failed = f'its operator {found.group(1)} failed' if found else 'the exporter failed'
    other = 'torchscript' if format_name == 'ONNX' else 'onnx'
    return (f'{backbone_type} does not export to {format_name}: {failed} ({detail}); try --format '
            f'{other}, or train another backbone')


def run_exported(path, kind, images):
    """(B, D) embeddings of images by the exported file, run as a user would: ONNX Runtime on the
    CPU, or torch.jit.load."""
    try:
        if kind == 'onnx':
            import onnxruntime  # imported here: only ONNX exports need it
            session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
            return session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
        # unoptimised: the profiling executor would spend seconds re-optimising the graph on each of
        # its first runs
        with quiet_export(), torch.inference_mode(), torch.jit.optimized_execution(False):
            return torch.jit.load(path, map_location='cpu')(images).numpy()
    except Exception as error:  # e.g. a batch size frozen into the export
        detail = (
            str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        )
        raise UserError(
            f'the {FORMATS[kind][1]} export does not run in {FORMATS[kind][2]} on a batch of '
            f'{len(images)} ({detail}), so nothing was written; try the other --format'
        ) from None


def smallest_cosine(reference, exported):
    """The smallest cosine between corresponding rows of two (B, D) arrays; -1 if their shapes differ."""
    a, b = np.asarray(reference, dtype=np.float64), np.asarray(exported, dtype=np.float64)
    if a.shape != b.shape:
        return -1.0
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)  # (B,)
    return float(((a * b).sum(axis=1) / np.maximum(norms, 1e-12)).min())


def describe(model, data_base, data_base_path, model_key, files):
    """The JSON beside an export: what a caller must do to images, what comes out, and where it came from."""
    norm = model.input_norm
    resize, crop = inference_sizes(data_base.image_size)
    return {
        'files': files,
        'input': f'uint8 RGB (B, 3, {crop}, {crop})',
        'input_name': INPUT_NAME,
        'resize': resize,
        'crop': crop,
        'preprocessing': preprocessing(resize, crop),
        'channel_order': 'BGR' if norm.bgr else 'RGB',
        'mean': float32_values(norm.mean),
        'std': float32_values(norm.std),
        'normalisation': 'inside the model, so feed raw pixels: it reorders the RGB input to '
                         'channel_order, then computes (pixel - mean) / std per channel on 0-255 '
                         'values, mean and std in channel_order',
        'output': f'float32 (B, {model.embedding.out_features}) unit-length embeddings: the cosine '
                  f'similarity of two images is the dot product of theirs',
        'output_name': OUTPUT_NAME,
        'feature_dim': model.embedding.out_features,
        'backbone_type': data_base.backbone_type,
        'data_base': os.path.realpath(data_base_path),
        'weights': model_key,
        'epoch': data_base.epoch,
        'args': data_base.run,
    }


def preprocessing(resize, crop):
    """What a caller of the export does to an image first, in words: utils.test_transform."""
    return (f'decode as RGB; resize so that the shorter side is {resize} pixels and the longer '
            f'int({resize} * longer / shorter), bilinear and antialiased (PIL Image.resize with '
            f'BILINEAR); crop {crop} x {crop} from the centre, at left = round((width - {crop}) / '
            f'2) and top = round((height - {crop}) / 2) (Python round); lay it out as (3, {crop}, '
            f'{crop}) uint8 and stack images into a batch')


def float32_values(tensor):
    """A float32 tensor's values as the shortest decimals that read back as the same float32s:
    123.675, not 123.67500305175781."""
    return [float(str(np.float32(value))) for value in tensor.flatten().tolist()]


if __name__ == '__main__':
    run_main(main)
