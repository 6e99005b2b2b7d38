"""Shared pieces: errors and safe file I/O, data reading and transforms, the two losses, retrieval metrics."""
import contextlib
import os
import pickle
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

DATA_NAMES = ('car', 'cub', 'sop')
CROP_TYPES = ('uncropped', 'cropped')
IMAGE_SIZE, RESIZE_SIZE = 224, 256


# ----------------------------------------------------------------------------------------------------------------------
# errors a user can cause, and files that are written whole or not at all

class UserError(Exception):
    """An error the user can fix: the scripts print its message as one sentence and exit non-zero."""


def run_main(main):
    """Run a script's main(), turning a UserError into one sentence on stderr and exit status 1."""
    try:
        main()
    except UserError as error:
        message = str(error)
        if '\nOriginal Traceback' in message:  # raised in a DataLoader worker, which prepends its traceback
            message = message.rstrip().rsplit(f'{UserError.__name__}: ', 1)[-1]
        sys.stderr.write(f'error: {message}\n')
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write('interrupted\n')
        sys.exit(130)


def umask():
    """This process's umask; reading it means setting it, so it is set straight back."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary file name beside `path`; it replaces `path` only if the block completes."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    os.fchmod(fd, 0o666 & ~umask())  # mkstemp's 0600 would hide results from the rest of a shared group
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside `path`; it replaces the folder `path` only if the block completes."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    os.chmod(tmp, 0o777 & ~umask())  # not mkdtemp's 0700
    try:
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(path)}.', suffix='.old')
            os.replace(path, os.path.join(old, 'previous'))
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_temporaries(folder, prefix=''):
    """Delete what atomic_path and atomic_dir left in `folder` for names starting with `prefix` when killed."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(folder):
            if name.startswith(f'.{prefix}') and name.endswith(('.tmp', '.old')):
                path = os.path.join(folder, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)


def atomic_save(obj, path):
    """torch.save through a temporary file, so a crash never leaves a half-written `path`."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def safe_load(path, what='file'):
    """torch.load with weights_only=True onto the CPU: tensors and plain containers only, never arbitrary code."""
    if not os.path.isfile(path):
        raise UserError(f'{what} {path} does not exist')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f'refused to load {what} {path}: it holds Python objects other than tensors and plain '
                        f'containers, which could run code; only load files this project wrote') from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise UserError(f'could not read {what} {path} ({type(error).__name__}); it may be truncated or not '
                        f'a PyTorch file, so write it again') from None


# ----------------------------------------------------------------------------------------------------------------------
# data: the index data_utils.py writes, transforms, and the Dataset

def index_path(data_path, data_name, crop_type='uncropped'):
    """Where data_utils.py writes the per-class train/test index of one prepared data set."""
    return os.path.join(data_path, data_name, f'{crop_type}_data_dicts.pth')


def load_index(data_path, data_name, crop_type='uncropped'):
    """Read a prepared data set's index {'train': {class: [relative paths]}, 'test': {...}}."""
    path = index_path(data_path, data_name, crop_type)
    if not os.path.isfile(path):
        raise UserError(f'{data_name} is not prepared under {data_path} ({path} is missing); run '
                        f'`python data_utils.py --data_path {data_path} --data_name {data_name}` first')
    return safe_load(path, 'data index')


def train_transform():
    """Training augmentation on uint8 image tensors, as the seed: RandomResizedCrop(224) and a horizontal flip."""
    return v2.Compose([v2.RandomResizedCrop(IMAGE_SIZE, antialias=True), v2.RandomHorizontalFlip()])


def test_transform():
    """Test-time transform on uint8 image tensors, as the seed: Resize(256) then CenterCrop(224)."""
    return v2.Compose([v2.Resize(RESIZE_SIZE, antialias=True), v2.CenterCrop(IMAGE_SIZE)])


def read_image(path):
    """Decode an image file into a (3, H, W) uint8 RGB tensor; any format PIL reads works."""
    try:
        return decode_image(path, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        # formats torchvision does not decode (TIFF, BMP, ...) still go through PIL
        from PIL import Image
        try:
            with Image.open(path) as image:
                return v2.functional.pil_to_tensor(image.convert('RGB'))
        except OSError:
            raise UserError(f'cannot read image {path}: it is missing, truncated or not an image') from None


def available_memory():
    """Bytes of memory the kernel can still hand out (MemAvailable), or None where /proc/meminfo is absent."""
    try:
        with open('/proc/meminfo') as file:
            fields = dict(line.split(':', 1) for line in file)
        return int(fields['MemAvailable'].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


class ImageCache:
    """Every image of a list decoded once into one uint8 buffer, so that later epochs skip JPEG decoding.

    Decoding is most of the input pipeline's cost per image (benchmarks/input_speed.py). The pixels sit in one
    NumPy array with per-image offsets and shapes rather than in one object per image: DataLoader workers forked
    after the cache is built share its pages copy-on-write, and reading an image touches no per-image reference
    count (which would copy the page holding it into every worker). It costs 3 * H * W bytes per image in each
    process that builds one; every torchrun rank builds its own.
    """

    def __init__(self, paths, num_threads=None):
        from PIL import Image
        shapes = []
        for path in paths:  # sizes from the file headers first, so the buffer is allocated once, at its final size
            try:
                with Image.open(path) as image:
                    shapes.append((3, image.height, image.width))
            except OSError:
                raise UserError(f'cannot read image {path}: it is missing, truncated or not an image') from None
        self.shapes = np.array(shapes, dtype=np.int64).reshape(-1, 3)  # (N, 3)
        self.offsets = np.concatenate([[0], np.cumsum(self.shapes.prod(axis=1))])  # (N + 1,)
        needed, free = int(self.offsets[-1]), available_memory()
        if free is not None and needed > 0.9 * free:
            raise UserError(f'caching {len(paths)} decoded images needs {needed / 2 ** 30:.1f} GiB of memory but '
                            f'only {free / 2 ** 30:.1f} GiB is available; train without --cache_images')
        self.pixels = np.empty(needed, dtype=np.uint8)

        def fill(i):
            image = read_image(paths[i])
            if tuple(image.shape) != tuple(self.shapes[i]):
                raise UserError(f'{paths[i]} decodes to {tuple(image.shape)} pixels but its header says '
                                f'{tuple(self.shapes[i])}; re-save it as a plain RGB JPEG or train without '
                                f'--cache_images')
            self[i].copy_(image)

        # libjpeg-turbo decodes outside the GIL, so threads use every core without copying images between processes
        with ThreadPoolExecutor(num_threads or os.cpu_count()) as pool:
            list(pool.map(fill, range(len(paths))))

    def __getitem__(self, i):
        """Image i as a (3, H, W) uint8 tensor that shares the buffer's memory (transforms must not write to it)."""
        _, height, width = self.shapes[i]
        # stored (H, W, 3) like the decoder's output: the uint8 antialiased resize is twice as fast on that layout
        pixels = torch.from_numpy(self.pixels[self.offsets[i]:self.offsets[i + 1]])
        return pixels.view(height, width, 3).permute(2, 0, 1)  # (3, H, W)

    def __len__(self):
        return len(self.shapes)

    @property
    def nbytes(self):
        """Size of the decoded pixels in bytes."""
        return self.pixels.nbytes


class SeededSampler(torch.utils.data.Sampler):
    """Yields (index, epoch) so that an image's augmentation depends only on seed, epoch and index.

    That makes a resumed run draw the same crops as an uninterrupted one, whatever the number of workers.
    """

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch):
        """Select the shuffle order and augmentation seeds of one epoch."""
        self.epoch = epoch
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((index, self.epoch) for index in self.sampler)

    def __len__(self):
        return len(self.sampler)


class ImageReader(Dataset):
    """A prepared data set's train or test split as (uint8 image tensor (3, 224, 224), label) pairs.

    Labels are 0..C-1 in class-id order. Given (index, epoch) by a SeededSampler, the augmentation is seeded
    from (seed, epoch, index). `backbone_type` is accepted for the seed's interface: the per-backbone
    normalisation (ImageNet mean/std, or BN-Inception's BGR 0-255) is the model's first layer, run on the device.
    """

    def __init__(self, data_path, data_name, data_type, backbone_type=None, crop_type='uncropped', seed=0,
                 augment=None):
        index = load_index(data_path, data_name, crop_type)
        root = os.path.join(data_path, data_name)
        self.images, self.labels = [], []
        for label, class_id in enumerate(sorted(index[data_type])):
            for relative in index[data_type][class_id]:
                self.images.append(os.path.join(root, relative))
                self.labels.append(label)
        self.num_classes = len(index[data_type])
        # training images are augmented unless augment=False (embedding the training set for the data base)
        self.transform = train_transform() if (data_type == 'train' if augment is None else augment) \
            else test_transform()
        self.seed, self.cache = seed, None

    def cache_images(self, cache=None):
        """Decode every image once into memory, or share `cache`, another reader's ImageCache of the same images."""
        if cache is not None and len(cache) != len(self.images):
            raise ValueError(f'the cache holds {len(cache)} images, this split {len(self.images)}')
        self.cache = cache if cache is not None else ImageCache(self.images)
        return self.cache

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, None)
        if epoch is not None:
            # hash of a tuple of ints is stable across processes and runs; only the CPU generator drives the
            # transforms, and torch.manual_seed would also queue GPU seeds, which costs more than a cached crop
            torch.default_generator.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
        image = self.cache[index] if self.cache is not None else read_image(self.images[index])
        return self.transform(image), self.labels[index]

    def __len__(self):
        return len(self.images)


# ----------------------------------------------------------------------------------------------------------------------
# losses: S is the (B, C) matrix of cosines between embeddings and proxies

class ProxyAnchorLoss(nn.Module):
    """Proxy-Anchor loss (Kim et al., CVPR 2020).

    scale (32): s, the temperature of the soft max/min. margin (0.1): m, the margin around each proxy.
    loss = 1/|P+| sum_{p in P+} log(1 + sum_{i in X_p+} exp(-s (S_ip - m)))
         + 1/|P|  sum_{p in P}  log(1 + sum_{i in X_p-} exp( s (S_ip + m)))
    """

    def __init__(self, scale=32, margin=0.1):
        super().__init__()
        self.scale, self.margin = scale, margin

    def forward(self, cosines, labels):
        """Loss of a batch's (B, C) cosines against its (B,) labels, computed in float32."""
        cosines = cosines.float()  # bf16/fp16 cosines lose too much inside exp(32 * .)
        pos_mask = F.one_hot(labels, cosines.size(1)).bool()  # (B, C)
        with_pos = pos_mask.any(dim=0)  # (C,) the proxies P+ that have a positive in the batch
        pos_logits = (-self.scale * (cosines - self.margin)).masked_fill(~pos_mask, float('-inf'))
        neg_logits = (self.scale * (cosines + self.margin)).masked_fill(pos_mask, float('-inf'))
        pos_term = log1p_sum_exp(pos_logits)[with_pos].sum() / with_pos.sum()  # (C,) -> ()
        neg_term = log1p_sum_exp(neg_logits).sum() / cosines.size(1)
        return pos_term + neg_term


def log1p_sum_exp(logits):
    """log(1 + sum_i exp(logits[i, c])) per column c, stably: a logsumexp with an extra zero logit."""
    zeros = logits.new_zeros(1, logits.size(1))
    return torch.logsumexp(torch.cat([zeros, logits], dim=0), dim=0)  # (C,)


class NormalizedSoftmaxLoss(nn.Module):
    """Normalized-Softmax loss (Zhai & Wu, BMVC 2019): cross-entropy over the cosines times scale (32)."""

    def __init__(self, scale=32):
        super().__init__()
        self.scale = scale

    def forward(self, cosines, labels):
        """Loss of a batch's (B, C) cosines against its (B,) labels, computed in float32."""
        return F.cross_entropy(self.scale * cosines.float(), labels)


LOSSES = {'proxy_anchor': ProxyAnchorLoss, 'normalized_softmax': NormalizedSoftmaxLoss}


# ----------------------------------------------------------------------------------------------------------------------
# retrieval metrics, computed in chunks of queries so no N x N similarity matrix is ever held

def retrieval_metrics(features, labels, ranks, chunk_bytes=256 * 2 ** 20):
    """Recall@K for K in ranks, MAP@R and R-Precision (Musgrave et al., ECCV 2020), all as fractions.

    Each query is compared by cosine with every other item; the query itself is excluded by its position, so
    duplicate images are ordinary neighbours. Recall@K is the fraction of all queries with a same-class item among
    their K nearest. R is the number of other items of the query's class; a query whose class has no other item
    (R = 0) has no defined MAP@R or R-Precision and is left out of those two averages, as pytorch-metric-learning's
    AccuracyCalculator does, while it counts as a miss for Recall@K.
    """
    features = F.normalize(torch.as_tensor(features).float(), dim=-1)  # (N, D)
    labels = torch.as_tensor(labels).to(features.device)  # (N,)
    n, ranks = len(labels), [int(k) for k in ranks]
    if n < 2:
        raise UserError(f'retrieval needs at least two items, got {n}')
    _, label_ids, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    r = counts[label_ids] - 1  # (N,) R per query
    k = min(n - 1, max(max(ranks), int(r.max())))
    chunk = max(1, chunk_bytes // (4 * n))
    hits_at = torch.zeros(len(ranks), dtype=torch.long)
    ap_sum = rp_sum = 0.0
    positions = torch.arange(1, k + 1, device=features.device)  # (k,)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        sims = features[start:stop] @ features.T  # (b, N)
        rows = torch.arange(stop - start, device=features.device)
        sims[rows, rows + start] = float('-inf')  # a query is never its own neighbour
        neighbours = sims.topk(k, dim=1).indices  # (b, k)
        del sims
        hits = labels[neighbours] == labels[start:stop, None]  # (b, k)
        for i, rank in enumerate(ranks):
            hits_at[i] += hits[:, :rank].any(dim=1).sum().cpu()
        r_chunk = r[start:stop]  # (b,)
        hits_in_r = hits & (positions[None] <= r_chunk[:, None])  # (b, k) hits among the first R
        precision = hits_in_r.cumsum(dim=1) / positions  # (b, k) precision at each position
        denominator = r_chunk.clamp(min=1)
        ap_sum += ((precision * hits_in_r).sum(dim=1) / denominator).sum().item()
        rp_sum += (hits_in_r.sum(dim=1) / denominator).sum().item()
    with_r = int((r > 0).sum())
    metrics = {f'recall@{rank}': hits_at[i].item() / n for i, rank in enumerate(ranks)}
    metrics['map@r'] = ap_sum / with_r if with_r else float('nan')
    metrics['r_precision'] = rp_sum / with_r if with_r else float('nan')
    return metrics


def recall(features, labels, ranks):
    """Recall@K for each K in ranks, as a list of fractions (see retrieval_metrics)."""
    metrics = retrieval_metrics(features, labels, ranks)
    return [metrics[f'recall@{int(rank)}'] for rank in ranks]


def parse_ranks(text):
    """'1,2,4,8' -> [1, 2, 4, 8]; anything else is a UserError."""
    try:
        ranks = [int(part) for part in text.split(',')]
    except ValueError:
        raise UserError(f'--recalls must be positive integers separated by commas, like 1,2,4,8, not {text!r}') \
            from None
    if not ranks or min(ranks) < 1:
        raise UserError(f'--recalls must be positive integers separated by commas, like 1,2,4,8, not {text!r}')
    return ranks


def set_seed(seed):
    """Seed Python, NumPy and torch (all devices)."""
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
