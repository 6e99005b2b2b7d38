"""export.py: the exports of every named backbone agree with PyTorch, the ONNX Runtime example of docs/export.md
embeds a JPEG as PP does, and each refusal is one sentence that leaves nothing behind.

The runs are fakes, a Model with random weights saved as train.py saves it beside a minimal data base, so nothing is
trained. Each export costs a few seconds of a 2-core CPU, so every backbone is exported to ONNX and two of them, a CNN
and a ViT, to TorchScript as well; dinov2_base, dinov2_small's architecture at four times the weights, is left out
(it was exported by hand, see docs/export.md).
"""

import io
import json
import os
import shutil
import sys
from contextlib import redirect_stdout

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

import runtime
import utils
from conftest import write_image
from model import Model
from script_runner import error_sentence, load_script, temporaries
from test_docs import code_block

BACKBONES = ('resnet50', 'inception', 'googlenet', 'vit_small_dino', 'dinov2_small')
TORCHSCRIPT = ('inception', 'vit_small_dino')  # a CNN that reorders its channels, and a timm ViT
FEATURE_DIM, NUM_CLASSES = 32, 4
ATOL = 1e-6  # float32 rounding moves each embedding value by about 1e-7
PHOTO_SIZE = (
    403,
    300,
)  # resized to 343 x 256, whose centre crop starts at round(59.5) = 60, not at floor's 59


def fake_run(folder, backbone_type, seed=0):
    """results/<prefix>_1_model.pth with random weights beside a data base as train.py writes it (test images are
    JPEGs under folder/images); returns the data base's path and the model, in eval mode: PyTorch, the reference.
    """
    train = load_script('train')
    args = train.get_args_parser().parse_args(
        [
            '--data_name',
            'cub',
            '--backbone_type',
            backbone_type,
            '--feature_dim',
            str(FEATURE_DIM),
            '--no_pretrained',
        ]
    )
    images = []
    for k in range(4):
        images.append(os.path.join(folder, 'images', f'{k}.jpg'))
        write_image(images[-1], k + 1, seed, size=PHOTO_SIZE)
    torch.manual_seed(seed)
    model = Model(backbone_type, FEATURE_DIM, NUM_CLASSES, pretrained=False)
    prefix = os.path.join(folder, 'results', f'{train.prefix_of(args)}_1')
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    torch.save(model.state_dict(), f'{prefix}_model.pth')
    torch.save(
        {
            'test_images': images,
            'test_labels': torch.arange(len(images)),
            'test_features': torch.randn(len(images), FEATURE_DIM),
            'train_images': [],
            'train_labels': torch.zeros(0, dtype=torch.long),
            'train_features': torch.zeros(0, FEATURE_DIM),
            'proxies': torch.randn(NUM_CLASSES, FEATURE_DIM),
            'args': vars(args),
            'epoch': 1,
        },
        f'{prefix}_data_base.pth',
    )
    return f'{prefix}_data_base.pth', model.eval()


def gaps(reference, embeddings):
    """1 - cosine of each row of two (B, D) arrays."""
    a, b = np.asarray(reference, dtype=np.float64), np.asarray(embeddings, dtype=np.float64)
    return 1 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope='module', params=BACKBONES)
def exported(request, tmp_path_factory):
    """A fake run of one backbone exported by export.py as ONNX, then as TorchScript where TORCHSCRIPT names it:
    (folder, data base path, its PyTorch model, the commands' printed lines, the JSON)."""
    folder = tmp_path_factory.mktemp(request.param)
    data_base, model = fake_run(str(folder), request.param)
    outputs = [
        run_export(folder, '--data_base', os.path.basename(data_base), *flags)
        for flags in [()] + [('--format', 'torchscript')] * (request.param in TORCHSCRIPT)
    ]
    with open(data_base.replace('_data_base.pth', '.json')) as file:
        description = json.load(file)
    yield folder, data_base, model, outputs, description
    shutil.rmtree(folder)  # a few hundred MB of weights


def run_export(folder, *flags):
    """export.py's main() run in folder as its command line would, in this process; its stdout (it must succeed)."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(out):
        patch.setattr(sys, 'argv', ['export.py', *flags])
        patch.chdir(folder)
        load_script('export').main()
    return out.getvalue()


def test_exports_agree_with_pytorch(exported):
    folder, data_base, model, outputs, description = exported
    # one image: traced at 2 and checked at 3 by export.py, the batch size is free
    image = torch.randint(
        0, 256, (1, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    with torch.inference_mode():
        reference, swapped = model.embed(torch.cat([image, image.flip(1)])).numpy()[
            :, None
        ]  # (1, D) each
    # random weights hardly move some embeddings with the image (DINOv2's layer scales start at 1e-5), so besides the
    # 1e-4 in cosine each value must agree to ATOL, which an export that swapped the channels would miss
    assert np.abs(swapped - reference).max() > 3 * ATOL
    session = onnxruntime.InferenceSession(
        str(folder / 'results' / description['files']['onnx']['file']),
        providers=['CPUExecutionProvider'],
    )
    embeddings = [session.run(None, {'images': image.numpy()})[0]]
    if 'torchscript' in description['files']:
        scripted = torch.jit.load(
            str(folder / 'results' / description['files']['torchscript']['file'])
        )
        # unoptimised, as export.py's own check: the profiling executor would take seconds on its first runs
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            embeddings.append(scripted(image).numpy())
    for out in embeddings:
        assert out.shape == (1, FEATURE_DIM) and out.dtype == np.float32
        assert gaps(reference, out).max() <= 1e-4
        np.testing.assert_allclose(out, reference, rtol=0, atol=ATOL)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    runtimes = ['ONNX Runtime', 'torch.jit.load'][: len(outputs)]
    assert [
        line.split(' agrees')[0] for line in ''.join(outputs).splitlines() if ' agrees ' in line
    ] == runtimes
    assert all('on 3 test images of the data base' in out for out in outputs)
    assert not temporaries(str(folder))


def test_description_says_what_a_caller_needs(exported):
    folder, data_base, model, outputs, description = exported
    name = os.path.basename(data_base)[: -len('_data_base.pth')]
    assert description['resize'] == 256 and description['crop'] == 224
    assert isinstance(description['resize'], int) and isinstance(description['crop'], int)
    assert (
        description['input'] == 'uint8 RGB (B, 3, 224, 224)'
        and description['input_name'] == 'images'
    )
    assert description['feature_dim'] == FEATURE_DIM
    saved_args = torch.load(data_base, weights_only=True)['args']
    assert (
        description['args'] == saved_args
        and description['backbone_type'] == saved_args['backbone_type']
    )
    bgr = description['backbone_type'] == 'inception'
    assert description['channel_order'] == ('BGR' if bgr else 'RGB')
    if bgr:  # BN-Inception's own normalisation: BGR, 0-255, no scaling
        assert description['mean'] == [104.0, 117.0, 128.0] and description['std'] == [
            1.0,
            1.0,
            1.0,
        ]
    else:  # the ImageNet statistics in 0-255 units, as the JSON prints them
        assert description['mean'] == [123.675, 116.28, 103.53] and description['std'] == [
            58.395,
            57.12,
            57.375,
        ]
    np.testing.assert_array_equal(
        np.float32(description['mean']), model.input_norm.mean.flatten().numpy()
    )
    np.testing.assert_array_equal(
        np.float32(description['std']), model.input_norm.std.flatten().numpy()
    )
    assert (
        description['files']['onnx']['file'] == f'{name}.onnx'
        and description['files']['onnx']['opset'] == 18
    )
    if (
        len(outputs) > 1
    ):  # the second export, from the same data base, replaced the JSON and kept the first's entry
        assert description['files']['torchscript']['file'] == f'{name}.pt'
    assert description['data_base'] == os.path.realpath(data_base)
    assert f'wrote results/{name}.onnx' in outputs[0] and f'and results/{name}.json' in outputs[0]


def test_docs_example_embeds_a_jpeg_as_pp_does(exported, monkeypatch):
    folder, data_base, model, _, _ = exported
    photo = str(folder / 'images' / '0.jpg')
    with Image.open(photo) as image:
        assert image.format == 'JPEG' and image.size == PHOTO_SIZE
    # test.py's path: read_image, test_transform (torchvision's antialiased resize and centre crop), Model.embed
    pp = utils.embed_files(model, [photo])[0].numpy()  # (1, D)
    pp_pixels = utils.test_transform()(utils.read_image(photo)).numpy().astype(int)  # (3, 224, 224)
    code = code_block('docs/export.md', 'Embedding one image exactly as PP does')
    assert 'import torch' not in code and "'photo.jpg'" in code
    name = os.path.basename(data_base)[: -len('_data_base.pth')]
    code = code.replace("'photo.jpg'", repr(photo)).replace(
        'cub_resnet50_proxy_anchor_512_20', name
    )
    monkeypatch.chdir(folder)
    example = {}
    exec(compile(code, 'docs/export.md', 'exec'), example)  # PIL, NumPy and ONNX Runtime only
    assert example['embedding'].shape == (FEATURE_DIM,)
    assert gaps(pp, example['embedding'][None]).max() <= 1e-4
    # the pixels themselves: PIL's resize is torchvision's to one grey level, and the crop lies where PP's does (a
    # crop one pixel off, which floor instead of round would give, differs almost everywhere)
    pixels = example['pixels'][0].astype(int)
    assert np.abs(pixels - pp_pixels).max() <= 1 and (pixels != pp_pixels).mean() < 0.01
    with Image.open(photo) as image:
        resized = np.asarray(image.convert('RGB').resize((343, 256), Image.BILINEAR)).transpose(
            2, 0, 1
        )
    np.testing.assert_array_equal(resized[:, 16:240, 60:284], pixels)
    assert (resized[:, 16:240, 59:283] != pp_pixels).mean() > 0.5


# ----------------------------------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope='module')
def googlenet_run(tmp_path_factory):
    """A fake GoogLeNet run, never exported: (folder, data base file name)."""
    folder = tmp_path_factory.mktemp('googlenet_run')
    return folder, os.path.basename(fake_run(str(folder), 'googlenet')[0])


def names(folder):
    """The files of folder/results: their names and contents."""
    results = os.path.join(folder, 'results')
    return {
        name: open(os.path.join(results, name), 'rb').read() for name in sorted(os.listdir(results))
    }


def test_refuses_what_is_not_a_run(script, googlenet_run, tmp_path):
    folder, data_base = googlenet_run
    model_file = folder / 'results' / data_base.replace('_data_base.pth', '_model.pth')
    status, _, err = script('export', '--data_base', model_file, cwd=tmp_path)
    assert f'{model_file} is not a data base train.py wrote' in error_sentence(status, err)
    whole = (folder / 'results' / data_base).read_bytes()
    (tmp_path / 'cut_1_data_base.pth').write_bytes(
        whole[: len(whole) // 2]
    )  # as an interrupted copy leaves it
    status, _, err = script('export', '--data_base', 'cut_1_data_base.pth', cwd=tmp_path)
    assert 'could not read data base cut_1_data_base.pth' in error_sentence(status, err)
    lonely = tmp_path / 'lonely_1_data_base.pth'
    lonely.write_bytes(whole)
    status, _, err = script('export', '--data_base', lonely, cwd=tmp_path)
    assert f'has no model {tmp_path / "lonely_1_model.pth"} beside it' in error_sentence(
        status, err
    )
    mixed = tmp_path / 'mixed_1_data_base.pth'
    mixed.write_bytes(whole)
    torch.save(
        Model('googlenet', 2 * FEATURE_DIM, NUM_CLASSES, pretrained=False).state_dict(),
        tmp_path / 'mixed_1_model.pth',
    )
    status, _, err = script('export', '--data_base', mixed, cwd=tmp_path)
    assert 'does not match the model data base' in error_sentence(status, err)
    assert not (tmp_path / 'results').exists()


def test_leaves_another_runs_export_alone(script, googlenet_run):
    folder, data_base = googlenet_run
    name = data_base[: -len('_data_base.pth')]
    before = names(folder)
    (folder / 'results' / f'{name}.onnx').write_bytes(b'an export of unknown origin')
    status, _, err = script('export', '--data_base', data_base, cwd=folder)
    assert f'results/{name}.onnx exists, but no results/{name}.json says' in error_sentence(
        status, err
    )
    (folder / 'results' / f'{name}.json').write_text(
        json.dumps({'data_base': '/elsewhere/x_data_base.pth', 'files': {}})
    )
    status, _, err = script('export', '--data_base', data_base, cwd=folder)
    assert (
        'describes the export of another data base of the same name (/elsewhere/x_data_base.pth)'
        in error_sentence(status, err)
    )
    (folder / 'results' / f'{name}.json').write_text('{"half a')
    status, _, err = script('export', '--data_base', data_base, cwd=folder)
    assert f'results/{name}.json is not a description export.py wrote' in error_sentence(
        status, err
    )
    assert names(folder) == {
        **before,
        f'{name}.onnx': b'an export of unknown origin',
        f'{name}.json': b'{"half a',
    }
    for ending in ('.onnx', '.json'):
        os.remove(folder / 'results' / f'{name}{ending}')


@pytest.mark.parametrize('kind', ['onnx', 'torchscript'])
def test_an_export_that_disagrees_is_not_written(script, googlenet_run, monkeypatch, kind):
    """The exporter and the exported file's run are replaced by fakes that disagree: the check itself is tested."""
    folder, data_base = googlenet_run
    before = names(folder)
    export = load_script('export')

    def exported_badly(embedder, kind, path, backbone_type, image_size):  # wrote something wrong
        with open(path, 'wb') as file:
            file.write(b'a model')

    monkeypatch.setattr(export, 'export', exported_badly)
    monkeypatch.setattr(export, 'run_exported', lambda path, kind, images: np.eye(3, FEATURE_DIM))
    status, out, err = script('export', '--data_base', data_base, '--format', kind, cwd=folder)
    line = error_sentence(status, err)
    assert line.startswith(
        f'error: the {"ONNX" if kind == "onnx" else "TorchScript"} export disagrees with '
        f'PyTorch on 3 test images of the data base (1 - cosine is '
    )
    assert (
        'so nothing was written' in line
        and names(folder) == before
        and not temporaries(str(folder))
    )


def test_check_inputs_are_the_test_images_or_random_pixels(tmp_path, capsys):
    photo = str(tmp_path / 'photo.jpg')
    write_image(photo, 1, 0, size=PHOTO_SIZE)
    moved = str(tmp_path / 'moved.jpg')
    images, source = load_script('export').check_inputs([moved, photo, photo, photo])
    assert images.shape == (3, 3, 224, 224) and images.dtype == torch.uint8
    assert source == '2 test images of the data base and 1 of random pixels'
    assert capsys.readouterr().out == (
        f'skipped 1 unreadable test image (missing, truncated or ' f'not an image): {moved}\n'
    )
    torch.testing.assert_close(
        images[0], utils.test_transform()(utils.read_image(photo)), rtol=0, atol=0
    )
    assert (images[2] != images[0]).float().mean() > 0.9  # the random one comes last
    _, source = load_script('export').check_inputs([moved])
    assert (
        source == '3 images of random pixels (the test images of the data base cannot be read here)'
    )


def test_a_timm_model_that_does_not_export_names_the_operator(tmp_path, monkeypatch, capfd):
    """VOLO folds its patches back (F.fold), whose ONNX form the exporter fails to build. Captured at the file
    descriptors, so that what the exporter prints from C++ (its whole graph, when it fails) would show.
    """
    fake_run(str(tmp_path), 'timm/volo_d1_224')
    name = 'cub_timm-volo_d1_224_proxy_anchor_32_no_pretrained_1'
    monkeypatch.setattr(sys, 'argv', ['export.py', '--data_base', f'{name}_data_base.pth'])
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_:
        runtime.run_main(load_script("export").main)
    out, err = capfd.readouterr()
    line = error_sentence(exit_.value.code, err)
    assert line.startswith(
        'error: timm/volo_d1_224 does not export to ONNX: its operator col2im failed ('
    )
    assert line.endswith('; try --format torchscript, or train another backbone')
    assert out.splitlines() == [
        f'exporting results/{name}_data_base.pth (timm/volo_d1_224, 32-d, epoch 1) as ONNX'
    ]
    assert sorted(os.listdir(tmp_path / 'results')) == [
        f'{name}_data_base.pth',
        f'{name}_model.pth',
    ]
