"""Images per second of embedding on the CPU: PyTorch float32, PyTorch bf16 autocast and export.py's
ONNX export run by ONNX Runtime, per backbone, in one run.

    python benchmarks/export_speed.py --backbones resnet50,vit_small_dino --batch_size 8

Each backbone gets random weights (speed does not depend on them) and random uint8 batches (B, 3,
224, 224), the input export.py's files take. PyTorch runs Model.embed under torch.inference_mode(),
as test.py embeds; bf16 is torch.autocast('cpu', torch.bfloat16) around the same call. The ONNX file
is written by export.py's own export() and run by an onnxruntime.InferenceSession on the CPU with as
many threads as PyTorch uses. The three are measured in turns, `--repeats` times, each turn timing
`--steps` batches after one untimed batch; images/s is a method's median turn. A ratio is the median
over turns of a method's speed over PyTorch float32's in the same turn, so that the load of other
processes on a shared machine, which drifts, slows both sides of it alike. `1 - cos` is the largest
gap between a method's embeddings and float32's.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import export  # noqa: E402
from model import Model  # noqa: E402
from train_speed import machine  # noqa: E402

NUM_CLASSES, FEATURE_DIM = 100, 512  # CUB's 100 training classes, the seed's embedding size


def pytorch_embedder(model, bf16):
    """images (B, 3, 224, 224) uint8 -> (B, D) float32 embeddings by PyTorch, in float32 or under bf16 autocast."""
    @torch.inference_mode()
    def embed(images):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            return model.embed(images).float().numpy()
    return embed


def onnx_embedder(model, backbone_type, folder, threads):
    """The same function by export.py's ONNX export of the model, run by ONNX Runtime on the CPU."""
    import onnxruntime
    path = os.path.join(folder, 'model.onnx')
    export.export(export.Embedder(model), 'onnx', path, backbone_type)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    return lambda images: session.run([export.OUTPUT_NAME], {export.INPUT_NAME: images.numpy()})[0]


def speed(embed, batches):
    """Images per second of embed over batches, after one untimed batch."""
    embed(batches[0])
    start = time.perf_counter()
    for images in batches:
        embed(images)
    return sum(len(images) for images in batches) / (time.perf_counter() - start)


def largest_gap(reference, embeddings):
    """The largest 1 - cosine between corresponding rows of two (B, D) arrays."""
    a, b = np.asarray(reference, dtype=np.float64), np.asarray(embeddings, dtype=np.float64)
    return float(
        (1 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).max()
    )


def main():
    """Time every backbone's three ways of embedding in turns; print one table with the ratios to float32."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        '--backbones',
        default='resnet50,vit_small_dino',
        help='comma-separated backbone types: any train.py --backbone_type, such as timm/resnet18',
    )
    parser.add_argument('--batch_size', default=8, type=int, help='images per batch')
    parser.add_argument('--steps', default=3, type=int, help='timed batches per turn')
    parser.add_argument('--repeats', default=5, type=int, help='turns per method, the medians kept')
    parser.add_argument('--threads', default=torch.get_num_threads(), type=int,
                        help='CPU threads of PyTorch and of ONNX Runtime')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(
            0, 256, (args.batch_size, 3, 224, 224), dtype=torch.uint8, generator=generator
        )
        for _ in range(args.steps)
    ]

    print(f'{machine(torch.device("cpu"))}, load average {os.getloadavg()[0]:.1f} at the start, '
          f'torch {torch.__version__}, onnxruntime {__import__("onnxruntime").__version__}')
    print(
        f'batch {args.batch_size}, {args.steps} timed batches per turn, medians of {args.repeats}'
        ' turns'
    )
    backbones = args.backbones.split(',')
    width = max(map(len, ['backbone'] + backbones))
    print(
        f'{"backbone":{width}s} {"method":18s} {"images/s":>9s} {"vs float32":>10s} {"1 - cos":>8s}'
    )
    with tempfile.TemporaryDirectory() as folder:
        for backbone_type in backbones:
            torch.manual_seed(0)
            model = Model(backbone_type, FEATURE_DIM, NUM_CLASSES, pretrained=False).eval()
            methods = {'PyTorch float32': pytorch_embedder(model, bf16=False),
                       'PyTorch bf16 amp': pytorch_embedder(model, bf16=True),
                       'ONNX Runtime': onnx_embedder(model, backbone_type, folder, args.threads)}
            reference = methods['PyTorch float32'](batches[0])
            rates = {name: [] for name in methods}
            for _ in range(args.repeats):
                for name, embed in methods.items():
                    rates[name].append(speed(embed, batches))
            for name, embed in methods.items():
                # each turn's ratio to the float32 turn just before it: the load of a shared machine
                # drifts slowly
                ratio = statistics.median(
                    r / base for r, base in zip(rates[name], rates['PyTorch float32'])
                )
                print(
                    f'{backbone_type:{width}s} {name:18s} {statistics.median(rates[name]):9.2f}'
                    f' {ratio:9.2f}x {largest_gap(reference, embed(batches[0])):8.1e}',
                    flush=True,
                )
    print(f'load average {os.getloadavg()[0]:.1f} at the end')


if __name__ == '__main__':
    main()
