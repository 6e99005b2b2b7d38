"""Images per second per CPU core of the seed's input pipeline and of this project's, on CUB-like
JPEGs.

    python benchmarks/input_speed.py [--num_images 200] [--repeats 5]

It writes CUB-like JPEGs (500 x 375, 1/f "natural" content, about CUB's 95 KB per file) into a
temporary prepared data set, then times one single-threaded process (a per-core figure) through a
DataLoader with num_workers=0:
  seed     PIL open + convert('RGB'), torchvision.transforms RandomResizedCrop(224), RandomHorizontalFlip,
           ToTensor, Normalize: float32 images leave the CPU normalised.
  decode   utils.ImageReader as train.py uses it: PIL decoding (utils.read_image, as data_utils.py
           prepares) and v2 transforms on uint8 tensors; the float conversion and normalisation are
           the model's first layer (model.InputNorm), on the device.
  cache    the same with train.py --cache_images: every image decoded once (utils.ImageCache), then each epoch
           only crops, resizes and flips.
  tv       decode with torchvision's decode_image instead of PIL, as train.py did before every
           script read images as data_utils.py prepares them (torchvision's decoders are deprecated
           since its version 0.29, and gave other pixels for 16-bit PNGs and some GIFs).
Every figure is a steady-state epoch (the second or later), the pipelines interleaved and repeated,
the median kept, since other processes on the machine make single timings noisy.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train import GlobalBatches, Marked  # noqa: E402
from runtime import cpu_generator_seeded  # noqa: E402
from utils import ImageReader, index_path  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def natural_image(rng, height=375, width=500, alpha=1.2):
    """(H, W, 3) uint8 with a 1/f^alpha spectrum and correlated colour channels, like a photograph."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None]
    falloff = np.maximum(np.hypot(fx, fy), 1 / max(height, width)) ** -alpha  # (H, W // 2 + 1)

    def field():
        spectrum = rng.normal(size=falloff.shape) + 1j * rng.normal(size=falloff.shape)
        plane = np.fft.irfft2(spectrum * falloff, s=(height, width))
        return (plane - plane.mean()) / plane.std()  # (H, W)

    luminance = field()
    pixels = np.stack([luminance + 0.5 * field() for _ in range(3)], axis=-1)  # (H, W, 3)
    pixels = 50 * pixels + rng.uniform(80, 170, size=3)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_data_set(root, num_images, num_classes=20, quality=90):
    """A prepared 'cub' data set of CUB-like JPEGs under root, in the layout data_utils.py writes."""
    rng = np.random.default_rng(0)
    folder = os.path.join(root, 'cub', 'uncropped')
    os.makedirs(folder)
    train = {class_id: [] for class_id in range(1, num_classes + 1)}
    for i in range(num_images):
        name = f'{i:05d}.jpg'
        Image.fromarray(natural_image(rng)).save(os.path.join(folder, name), quality=quality)
        train[1 + i % num_classes].append(f'uncropped/{name}')
    torch.save({'train': train, 'test': {}}, index_path(root, 'cub'))
    sizes = [os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)]
    return sum(sizes) / len(sizes)


class SeedReader(Dataset):
    """The seed's training Dataset: PIL decoding and torchvision.transforms (v1) ending in Normalize."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(224),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __getitem__(self, index):
        return self.transform(Image.open(self.images[index]).convert('RGB')), self.labels[index]

    def __len__(self):
        return len(self.images)


class TorchvisionReader(ImageReader):
    """utils.ImageReader decoding with torchvision's decode_image, seeded as ImageReader is."""

    def __getitem__(self, item):
        index, epoch = item
        image = decode_image(self.images[index], mode=ImageReadMode.RGB)  # (3, H, W) uint8
        with cpu_generator_seeded(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF):
            return self.transform(image), self.labels[index]


def epoch_speed(loader, epoch):
    """Images per second of one pass over a loader."""
    if hasattr(loader.batch_sampler, 'set_epoch'):
        loader.batch_sampler.set_epoch(epoch)
    start, count = time.perf_counter(), 0
    for images, *_ in loader:
        count += images.size(0)
    return count / (time.perf_counter() - start)


def main():
    """Build the images, time each pipeline over interleaved steady-state epochs, print the table and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--num_images', default=200, type=int, help='CUB-like JPEGs to time over')
    parser.add_argument(
        '--repeats', default=5, type=int, help='timed epochs per pipeline (after one warm-up)'
    )
    parser.add_argument('--batch_size', default=32, type=int, help='images per collated batch')
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core: figures are per core

    with tempfile.TemporaryDirectory() as root:
        mean_bytes = make_data_set(root, args.num_images)
        project = ImageReader(root, 'cub', 'train')
        cached = ImageReader(root, 'cub', 'train')
        start = time.perf_counter()
        cached.cache_images(ImageCacheOneThread(cached.images))
        build_speed = len(cached) / (time.perf_counter() - start)
        seed = SeedReader(project.images, project.labels)
        torchvision_decoded = TorchvisionReader(root, 'cub', 'train')

        def loader(dataset, seeded):
            if seeded:  # as train.py reads them: (index, epoch, padding) items, augmentation seeded
                sampler = GlobalBatches(len(dataset), args.batch_size)
                return DataLoader(Marked(dataset), batch_sampler=sampler, num_workers=0)
            return DataLoader(
                dataset, args.batch_size, sampler=RandomSampler(dataset), num_workers=0
            )

        loaders = {'seed': loader(seed, False), 'decode': loader(project, True),
                   'cache': loader(cached, True), 'tv': loader(torchvision_decoded, True)}
        speeds = {name: [] for name in loaders}
        for epoch in range(1 + args.repeats):
            for name, data in loaders.items():
                speed = epoch_speed(data, epoch)
                if epoch > 0:  # epoch 0 warms caches and allocators up
                    speeds[name].append(speed)

    print(f'{args.num_images} JPEGs of 500 x 375, {mean_bytes / 1024:.0f} KB on average; one '
          f'thread; median of {args.repeats} steady-state epochs')
    print(f'CPU: {cpu_name()}, torch {torch.__version__}')
    median = {name: statistics.median(values) for name, values in speeds.items()}
    for name, value in median.items():
        spread = ', '.join(f'{v:.0f}' for v in speeds[name])
        print(f'  {name:7s} {value:7.0f} images/s per core  ({spread})')
    print(f'  building the cache (decoding every image once): {build_speed:.0f} images/s per core')
    print(f'decode / seed: {median["decode"] / median["seed"]:.2f}x')
    print(f'decode (PIL) / tv (torchvision decode_image): {median["decode"] / median["tv"]:.2f}x')
    print(f'ratio (train.py --cache_images / seed): {median["cache"] / median["seed"]:.2f}x')


def ImageCacheOneThread(paths):
    """utils.ImageCache decoded on one thread, so its build speed is per core too."""
    from utils import ImageCache
    return ImageCache(paths, num_threads=1)


def cpu_name():
    """The CPU's model name from /proc/cpuinfo, or the platform's processor string."""
    try:
        with open('/proc/cpuinfo') as file:
            for line in file:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or 'unknown'


if __name__ == '__main__':
    main()
