"""Training-step and evaluation images per second of each backbone at each --image_size (the
recipe's 224 and the quick start's 64), float32 against --amp, on synthetic images.

    python benchmarks/train_speed.py --device cuda               # batch 64; a few minutes on one GPU
    python benchmarks/train_speed.py --device cpu --batch_size 8 --steps 2
    python benchmarks/train_speed.py --device cpu --backbones inception,timm/resnet18 \
        --batch_size 32

Training runs train.py's own loop (train.train_one_epoch: copy from pinned memory, autocast,
train.batch_loss, backward, AdamP step, one host sync per step for the running loss) on uint8 images
already decoded, so the input pipeline is not measured here (benchmarks/input_speed.py does that).
The backbone's BatchNorm stays in eval mode as in the published recipe, and weights are random:
speed does not depend on them. Evaluation embeds batches twice as large with train.py's evaluation
loop (utils.embed_batches). --amp: bf16 autocast and channels_last.
"""

import argparse
import itertools
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from model import BACKBONES, Model  # noqa: E402
from utils import IMAGE_SIZE, LOSSES, embed_batches  # noqa: E402

# CUB's 100 training classes, the seed's embedding size
NUM_CLASSES, FEATURE_DIM = 100, 512
DEMO_SIZE = 64  # the README quick start's --image_size


def synthetic_batches(count, batch_size, device, image_size):
    """`count` distinct (uint8 images (B, 3, S, S), labels (B,)) batches of S = image_size, pinned
    when they go to a GPU."""
    batches = []
    for _ in range(count):
        images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8)
        labels = torch.randint(0, NUM_CLASSES, (batch_size,))
        if device.type == 'cuda':
            images, labels = images.pin_memory(), labels.pin_memory()
        batches.append((images, labels))
    return batches


class Loader(list):
    """`count` batches (images, labels, data-set indices) standing in for train.py's DataLoader."""

    def __init__(self, batches, count):
        super().__init__((images, labels, torch.arange(i * len(labels), (i + 1) * len(labels)))
                         for i, (images, labels) in enumerate((batches * count)[:count]))
        # train_one_epoch returns a feature per item of the data set
        self.dataset = range(sum(len(labels) for _, labels, _ in self))


def train_speed(model, batches, device, amp, warmup, steps):
    """Images per second of train.train_one_epoch over `steps` batches, after `warmup` untimed ones."""
    proxies = list(model.proxies.parameters())
    others = [p for p in model.parameters() if all(p is not q for q in proxies)]
    optimizer = train.ChannelsLastAdamP(
        [{'params': others}, {'params': proxies, 'lr': 1e-2}], lr=1e-4
    )
    args = types.SimpleNamespace(amp=amp, no_pretrained=False, num_epochs=1,
                                 feature_dim=FEATURE_DIM)
    loss = LOSSES['proxy_anchor'].build()
    # rank 1: train_one_epoch draws no progress bar
    train.train_one_epoch(model, Loader(batches, warmup), loss, True, optimizer, device, 1, args,
                          rank=1)
    stats, _ = train.train_one_epoch(model, Loader(batches, steps), loss, True, optimizer, device,
                                     1, args, rank=1)
    return stats['images_per_second']


def eval_speed(model, batches, amp, warmup, steps):
    """Images per second of embedding with train.py's evaluation loop (utils.embed_batches: copy,
    autocast, Model.embed), the embeddings brought back to the host."""
    def run(count):
        embed_batches(model, (images for images, _ in (batches * count)[:count]), amp).cpu()

    run(warmup)
    start = time.perf_counter()
    run(steps)
    return steps * batches[0][0].size(0) / (time.perf_counter() - start)


def machine(device):
    """The device's name: the GPU's, or the CPU's model name with its core count."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    name = 'CPU'
    if os.path.exists('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as file:
            names = [
                line.split(':', 1)[1].strip() for line in file if line.startswith('model name')
            ]
        name = names[0] if names else name
    return f'{name}, {torch.get_num_threads()} threads'


def main():
    """Time every backbone in float32 and with --amp; print one table."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        '--device',
        default='cuda' if torch.cuda.is_available() else 'cpu',
        choices=['cpu', 'cuda'],
        help='where to train',
    )
    parser.add_argument(
        '--backbones',
        default=','.join(BACKBONES),
        help='comma-separated backbone types: any train.py --backbone_type, such as timm/resnet18',
    )
    parser.add_argument(
        '--batch_size', default=64, type=int, help='training batch size (evaluation uses twice it)'
    )
    parser.add_argument('--image_sizes', default=f'{IMAGE_SIZE},{DEMO_SIZE}',
                        help='comma-separated crop sizes (train.py --image_size): the recipe\'s '
                             'and the quick start\'s')
    parser.add_argument('--steps', default=20, type=int, help='timed batches per measurement')
    parser.add_argument(
        '--warmup', default=5, type=int, help='untimed batches before each measurement'
    )
    args = parser.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        sys.exit('error: --device cuda needs a GPU that PyTorch can see; use --device cpu')
    device = torch.device(args.device)
    sizes = [int(size) for size in args.image_sizes.split(',')]
    train_batches = {size: synthetic_batches(4, args.batch_size, device, size) for size in sizes}
    eval_batches = {size: synthetic_batches(2, 2 * args.batch_size, device, size) for size in sizes}

    print(f'{machine(device)}, torch {torch.__version__}, batch {args.batch_size} (evaluation '
          f'{2 * args.batch_size}), {args.steps} timed steps after {args.warmup}')
    backbones = args.backbones.split(',')
    name_width = max(map(len, ['backbone'] + backbones))
    print(f'{"backbone":{name_width}s} {"size":>4s} {"precision":10s} {"train img/s":>12s} '
          f'{"eval img/s":>11s}' + (f' {"peak GiB":>9s}' if device.type == 'cuda' else ''))
    for backbone_type, size, amp in itertools.product(backbones, sizes, (False, True)):
        torch.manual_seed(0)
        model = Model(backbone_type, FEATURE_DIM, NUM_CLASSES, pretrained=False, image_size=size)
        model = model.to(device)
        if amp:
            model = model.to(memory_format=torch.channels_last)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        train_rate = train_speed(model, train_batches[size], device, amp, args.warmup, args.steps)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None
        eval_rate = eval_speed(model, eval_batches[size], amp, args.warmup, args.steps)
        print(f'{backbone_type:{name_width}s} {size:4d} {"bf16 amp" if amp else "float32":10s}'
              f' {train_rate:12.1f} {eval_rate:11.1f}'
              + (f' {peak:9.2f}' if peak is not None else ''), flush=True)
        del model
        if device.type == 'cuda':
            torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
