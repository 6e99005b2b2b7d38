"""Data reading and transforms, the losses, and the retrieval metrics."""
import ast
import difflib
import functools
import inspect
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from neighbours import CHUNK_BYTES, class_lists
from runtime import UserError, cpu_generator_seeded, safe_load

# the benchmarks; any other prepared folder name works too
DATA_NAMES = ('car', 'cub', 'sop', 'inshop')
CROP_TYPES = ('uncropped', 'cropped')
BOXED = ('car', 'cub')  # the data sets with bounding boxes: only they have a cropped variant
# the recipe's crop (train.py --image_size's default), and the shorter side an image is resized to
# before it at test time; another crop keeps this ratio (rounded down: the official Proxy-Anchor
# code's list pairs its 256-pixel crop with 292)
IMAGE_SIZE, RESIZE_SIZE = 224, 256
TEST_BATCH = 32  # images per forward pass where image files are embedded (test.py, the gallery)
# what PIL raises on a file it cannot read as an image (missing, truncated, not an image, a
# decompression bomb): data_utils.py refuses such a file, and every script skips it
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def one_of(names):
    """'a, b, c or d': a list of names in a message."""
    return ', '.join(names[:-1]) + f' or {names[-1]}' if len(names) > 1 else names[0]


# --------------------------------------------------------------------------------------------------
# data: the index data_utils.py writes, transforms, and the Dataset

def index_path(data_path, data_name, crop_type='uncropped'):
    """Where data_utils.py writes the per-class train/test index of one prepared data set."""
    return os.path.join(data_path, data_name, f'{crop_type}_data_dicts.pth')


def load_index(data_path, data_name, crop_type='uncropped'):
    """Read a prepared data set's index {'train': {class: [relative paths]}, 'test': {...}} ('query'
    and 'gallery' instead of 'test' for In-shop and folders split that way)."""
    path = index_path(data_path, data_name, crop_type)
    if not os.path.isfile(path):
        raise not_prepared(data_path, data_name, path)
    return safe_load(path, 'data index')


def not_prepared(data_path, data_name, path):
    """The UserError for a data set without an index: a --data_path that does not exist, a
    --data_name with no folder (with the close names that have one), or a folder data_utils.py has
    not prepared yet."""
    if not os.path.isdir(data_path):
        return UserError(f'--data_path {data_path} does not exist; pass the folder that holds your '
                         f'data sets, one folder each')
    if not os.path.isdir(os.path.join(data_path, data_name)):
        # results/ is where train.py writes (and locks) when run in the data folder itself
        present = sorted(
            name
            for name in os.listdir(data_path)
            if not name.startswith('.')
            and os.path.isdir(os.path.join(data_path, name))
            and os.path.realpath(os.path.join(data_path, name)) != os.path.realpath('results')
        )
        close = difflib.get_close_matches(data_name, present, n=3, cutoff=0.6)
        known = (f'did you mean {one_of(close)}?' if close else
                 f'it holds {one_of(present)}' if present else 'it holds no data set folder')
        return UserError(f'there is no data set {data_name} under {data_path} ({known}); pass the '
                         f'name of a folder there, or put your data set there as '
                         f'{os.path.join(data_path, data_name)}')
    crop = ' --crop' if os.path.basename(path) == f'{CROP_TYPES[1]}_data_dicts.pth' else ''
    return UserError(f'{data_name} is not prepared under {data_path} ({path} is missing); run '
                     f'`python data_utils.py --data_path {data_path} --data_name {data_name}'
                     f'{crop}` first')


def folder_name(text):
    """A folder name as typed, without the trailing slash that shell completion adds (--data_name digits/)."""
    return text.rstrip('/') or text


def prepared_name(relative):
    """The name a labelled folder's image (its path relative to the folder) has among the prepared
    copies, which are JPEGs: the same, with .jpg appended to a format other than JPEG."""
    return relative + ('' if relative.lower().endswith(('.jpg', '.jpeg')) else '.jpg')


def check_data_name(data_name, crop_type='uncropped'):
    """A UserError for a --data_name that is a path rather than a folder name under --data_path, or
    that has no cropped variant."""
    if os.path.basename(data_name) != data_name or data_name in ('', '.', '..'):
        parent, name = os.path.split(os.path.abspath(data_name))
        raise UserError(f'--data_name must name a folder directly under --data_path, not the path '
                        f'{data_name!r}; pass its parent as --data_path {parent} and its folder '
                        f'name as --data_name {name}')
    if crop_type == CROP_TYPES[1] and data_name not in BOXED:
        raise UserError(f'cropped images exist only for {" and ".join(BOXED)} (their bounding '
                        f'boxes), not for {data_name}; leave out --crop_type cropped')


def train_transform(image_size=None):
    """Training augmentation on uint8 image tensors, as the seed: RandomResizedCrop(image_size,
    default IMAGE_SIZE) and a horizontal flip."""
    return v2.Compose([v2.RandomResizedCrop(image_size or IMAGE_SIZE, antialias=True),
                       v2.RandomHorizontalFlip()])


def inference_sizes(image_size=None):
    """(resize, crop) of the test-time transform: the crop image_size (default IMAGE_SIZE), and the
    shorter side resized in the recipe's ratio before it, rounded down (the seed's 256 for 224, the
    official Proxy-Anchor code's 292 for 256)."""
    crop = image_size or IMAGE_SIZE
    return crop * RESIZE_SIZE // IMAGE_SIZE, crop


def test_transform(image_size=None):
    """Test-time transform on uint8 image tensors, as the seed: Resize(256) then CenterCrop(224),
    or inference_sizes(image_size)."""
    resize, crop = inference_sizes(image_size)
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop)])


class UnreadableImage(UserError):
    """An image file PIL cannot read: missing, truncated or not an image."""


def rgb(image):
    """A PIL image in RGB, as data_utils.py prepares it and every script reads it: PIL's
    convert('RGB'), except that 16-bit grayscale keeps its high byte, as PIL reads 16-bit colour
    (convert would clip it to white)."""
    if image.mode.startswith('I;16'):
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))  # (H, W)
    return image.convert('RGB')


def read_image(path):
    """Decode an image file into a (3, H, W) uint8 RGB tensor with PIL, as data_utils.py decodes it:
    any pixel format PIL reads gives the pixels of rgb(); any other file is an UnreadableImage."""
    try:
        with Image.open(path) as image:
            return v2.functional.pil_to_tensor(rgb(image))  # (3, H, W)
    except UNREADABLE:
        raise unreadable(path) from None


def unreadable(path):
    """The UnreadableImage of an image file PIL cannot read."""
    return UnreadableImage(f'cannot read image {path}: it is missing, truncated or not an image')


def image_extensions():
    """The file name extensions of every format PIL reads (lower case), not only JPEG."""
    Image.init()
    # stub formats (HDF5, GRIB, WMF, ...) are only registered names: PIL cannot read them without
    # extra plugins
    readable = {name for name, (factory, _) in Image.OPEN.items()
                if not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    return {
        extension for extension, name in Image.registered_extensions().items() if name in readable
    }


def image_files(folder):
    """(image files below folder, other files), both sorted; hidden folders are not searched."""
    extensions, images, others = image_extensions(), [], []
    for parent, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith('.'))
        for name in files:
            path = os.path.join(parent, name)
            (images if os.path.splitext(name)[1].lower() in extensions else others).append(path)
    return sorted(images), sorted(others)


def available_memory():
    """Bytes of memory the kernel can still hand out (MemAvailable), or None where /proc/meminfo is absent."""
    try:
        with open('/proc/meminfo') as file:
            fields = dict(line.split(':', 1) for line in file)
        return int(fields['MemAvailable'].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


class ImageCache:
    """Every image of a list decoded once into one uint8 buffer, so that later epochs skip JPEG
    decoding.

    Decoding is most of the input pipeline's cost per image (benchmarks/input_speed.py). The pixels
    sit in one NumPy array with per-image offsets and shapes rather than in one object per image:
    DataLoader workers forked after the cache is built share its pages copy-on-write, and reading an
    image touches no per-image reference count (which would copy the page holding it into every
    worker). It costs 3 * H * W bytes per image in each process that builds one; every torchrun rank
    builds its own.
    """

    def __init__(self, paths, num_threads=None):
        shapes = []
        # sizes from the file headers first, so the buffer is allocated once, at its final size
        for path in paths:
            try:
                with Image.open(path) as image:
                    shapes.append((3, image.height, image.width))
            except UNREADABLE:
                raise unreadable(path) from None
        self.shapes = np.array(shapes, dtype=np.int64).reshape(-1, 3)  # (N, 3)
        self.offsets = np.concatenate([[0], np.cumsum(self.shapes.prod(axis=1))])  # (N + 1,)
        needed, free = int(self.offsets[-1]), available_memory()
        if free is not None and needed > 0.9 * free:
            raise UserError(f'caching {len(paths)} decoded images needs {needed / 2 ** 30:.1f} GiB '
                            f'of memory but only {free / 2 ** 30:.1f} GiB is available; train '
                            f'without --cache_images')
        self.pixels = np.empty(needed, dtype=np.uint8)

        def fill(i):
            self[i].copy_(read_image(paths[i]))  # PIL decodes the size its header gave

        # PIL decodes outside the GIL: threads use every core, no image copied between processes
        with ThreadPoolExecutor(num_threads or os.cpu_count()) as pool:
            list(pool.map(fill, range(len(paths))))

    def __getitem__(self, i):
        """Image i as a (3, H, W) uint8 tensor that shares the buffer's memory (transforms must not write to it)."""
        _, height, width = self.shapes[i]
        # stored (H, W, 3) like the decoder's output: the uint8 antialiased resize is twice as fast
        # on that layout
        pixels = torch.from_numpy(self.pixels[self.offsets[i]:self.offsets[i + 1]])
        return pixels.view(height, width, 3).permute(2, 0, 1)  # (3, H, W)

    def __len__(self):
        return len(self.shapes)

    @property
    def nbytes(self):
        """Size of the decoded pixels in bytes."""
        return self.pixels.nbytes


class ImageReader(Dataset):
    """A prepared data set's train, test, query or gallery split as (uint8 image tensor (3, S, S),
    label) pairs, S the crop image_size (default IMAGE_SIZE).

    Labels are 0..C-1 in class-id order. Given (index, epoch) (train.py's GlobalBatches), the
    augmentation is seeded from (seed, epoch, index). `backbone_type` is accepted for the seed's
    interface: the per-backbone normalisation (ImageNet mean/std, or BN-Inception's BGR 0-255) is
    the model's first layer, run on the device. A query split and its gallery share their labels: a
    class has the same label in both.
    """

    def __init__(
        self,
        data_path,
        data_name,
        data_type,
        backbone_type=None,
        crop_type='uncropped',
        seed=0,
        augment=None,
        image_size=None,
    ):
        index = load_index(data_path, data_name, crop_type)
        root = os.path.join(data_path, data_name)
        self.images, self.labels = [], []
        classes = sorted(index[data_type])
        # one label per class across both, so that they compare
        if data_type in ('query', 'gallery'):
            classes = sorted(set(index['query']) | set(index['gallery']))
        for label, class_id in enumerate(classes):
            for relative in index[data_type].get(class_id, ()):
                self.images.append(os.path.join(root, relative))
                self.labels.append(label)
        self.num_classes = len(index[data_type])
        # training images are augmented unless augment=False (embedding the training set for the
        # data base)
        self.image_size = image_size  # None: IMAGE_SIZE
        self.transform = (
            train_transform(image_size)
            if (data_type == 'train' if augment is None else augment)
            else test_transform(image_size)
        )
        self.seed, self.cache = seed, None

    def keep_classes(self, start, stop):
        """Keep only the images of labels start..stop-1, relabelled from 0 (a validation split of the classes)."""
        self.select_classes(range(start, stop))

    def select_classes(self, labels):
        """Keep only the images of these labels, relabelled 0.. in the order given (tune.py's
        class-disjoint folds); a cache of decoded images is kept as a view of the same pixels."""
        new = {label: position for position, label in enumerate(labels)}
        kept = [index for index, label in enumerate(self.labels) if label in new]
        self.images = [self.images[index] for index in kept]
        self.labels = [new[self.labels[index]] for index in kept]
        self.num_classes = len(new)
        if self.cache is not None:
            self.cache = torch.utils.data.Subset(self.cache, kept)

    def cache_images(self, cache=None):
        """Decode every image once into memory, or share `cache`, another reader's ImageCache of the same images."""
        if cache is not None and len(cache) != len(self.images):
            raise ValueError(f'the cache holds {len(cache)} images, this split {len(self.images)}')
        self.cache = cache if cache is not None else ImageCache(self.images)
        return self.cache

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, None)
        image = self.cache[index] if self.cache is not None else read_image(self.images[index])
        if epoch is None:
            return self.transform(image), self.labels[index]
        # a hash of ints is the same in every process, so an image's augmentation does not depend on
        # who loads it
        with cpu_generator_seeded(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF):
            return self.transform(image), self.labels[index]

    def __len__(self):
        return len(self.images)


# --------------------------------------------------------------------------------------------------
# inference: a trained model's embeddings of images, as train.py's evaluation, test.py, the gallery
# and export.py compute them; image_size is the test-time crop (IMAGE_SIZE unless given)

def inference_image(path, image_size=None):
    """(3, S, S) uint8: an image file as a trained model sees it at test time, read_image then
    test_transform; an UnreadableImage where PIL cannot read it."""
    return test_transform(image_size)(read_image(path))


@torch.inference_mode()
def embed_batches(model, batches, amp=False):
    """(N, D) float32 unit embeddings, on the model's device, of batches of uint8 images
    (B, 3, S, S): Model.embed in eval mode, under bf16 autocast with amp (train.py --amp)."""
    model.eval()
    device = next(model.parameters()).device
    features = []
    for images in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            features.append(model.embed(images.to(device, non_blocking=True)).float())  # (B, D)
    if not features:
        return torch.zeros(0, model.embedding.out_features, device=device)
    return torch.cat(features)


def embed_files(model, paths, image_size=None):
    """((N, D) float32 embeddings on the CPU of the files among paths that PIL reads, in order; the
    paths of the others), decoded on all cores (PIL and torch's resize run outside the GIL),
    TEST_BATCH to a forward pass."""
    def read(path):
        try:
            return inference_image(path, image_size)
        except UnreadableImage:
            return None

    features, unreadable_paths = [], []
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for start in range(0, len(paths), TEST_BATCH):
            batch = paths[start:start + TEST_BATCH]
            images = list(pool.map(read, batch))
            unreadable_paths += [path for path, image in zip(batch, images) if image is None]
            images = [image for image in images if image is not None]
            if images:
                features.append(embed_batches(model, [torch.stack(images)]).cpu())  # (B, D)
    if not features:
        return torch.zeros(0, model.embedding.out_features), unreadable_paths
    return torch.cat(features), unreadable_paths


def unreadable_line(paths, what='image'):
    """The line each script prints for the image files it skipped: 'skipped 2 unreadable images
    (missing, truncated or not an image): a, b'."""
    plural = 's' * (len(paths) > 1)
    return (f'skipped {len(paths)} unreadable {what}{plural} (missing, truncated or not an image): '
            f'{", ".join(map(str, paths))}')


# --------------------------------------------------------------------------------------------------
# losses: S is the (B, C) matrix of cosines between embeddings and proxies

class ProxyAnchorLoss(nn.Module):
    """Proxy-Anchor loss (Kim et al., CVPR 2020).

    scale (32): s, the temperature of the soft max/min. margin (0.1): m, the margin around each
    proxy. loss = 1/|P+| sum_{p in P+} log(1 + sum_{i in X_p+} exp(-s (S_ip - m)))
         + 1/|P|  sum_{p in P}  log(1 + sum_{i in X_p-} exp( s (S_ip + m)))
    """

    def __init__(self, scale=32, margin=0.1):
        super().__init__()
        self.scale, self.margin = scale, margin

    def forward(self, cosines, labels):
        """Loss of a batch's (B, C) cosines against its (B,) labels, computed in float32."""
        cosines = at_least_float32(cosines)  # bf16/fp16 cosines lose too much inside exp(32 * .)
        pos_mask = F.one_hot(labels, cosines.size(1)).bool()  # (B, C)
        with_pos = pos_mask.any(dim=0)  # (C,) the proxies P+ that have a positive in the batch
        pos_logits = (-self.scale * (cosines - self.margin)).masked_fill(~pos_mask, float('-inf'))
        neg_logits = (self.scale * (cosines + self.margin)).masked_fill(pos_mask, float('-inf'))
        pos_term = log1p_sum_exp(pos_logits)[with_pos].sum() / with_pos.sum()  # (C,) -> ()
        neg_term = log1p_sum_exp(neg_logits).sum() / cosines.size(1)
        return pos_term + neg_term


def at_least_float32(x):
    """x in float32 if it is in a narrower float type; float64 stays float64 (the golden run's reference)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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
        return F.cross_entropy(self.scale * at_least_float32(cosines), labels)


class EmbeddingLoss(nn.Module):
    """Base of the losses called on the batch's (B, D) embeddings and (B,) labels instead of on
    cosines to the model's proxies: the pair-based ones, and those holding class proxies of their
    own (class_proxies())."""

    def class_proxies(self):
        """The loss's own class proxies as (C, K, D), K per class (K = 1 but for multi-centre losses), or None."""
        return None


class PMLLoss(EmbeddingLoss):
    """A pytorch-metric-learning loss, with the miner that picks its pairs or triplets if it has
    one.

    Its embeddings are cast to float32 at least (as for PP's own losses under --amp). A loss built
    with num_classes (given here too: PML's ProxyNCALoss does not keep it) holds its class weights
    as a parameter: PML keeps them as `proxies` (C, D), or as `W` or `fc` (D, C * K) whose column c
    * K + k is class c's k-th centre.
    """

    def __init__(self, loss, miner=None, num_classes=None):
        super().__init__()
        self.loss, self.miner, self.num_classes = loss, miner, num_classes

    def forward(self, embeddings, labels):
        """Loss of a batch's (B, D) embeddings against its (B,) labels, on the miner's tuples if there is a miner."""
        embeddings = at_least_float32(embeddings)
        tuples = self.miner(embeddings, labels) if self.miner is not None else None
        return self.loss(embeddings, labels, tuples)

    def class_proxies(self):
        """The PML loss's class weights as (C, K, D), or None for a loss without them."""
        for name, transposed in (('proxies', False), ('W', True), ('fc', True)):
            weight = getattr(self.loss, name, None)
            if self.num_classes and isinstance(weight, nn.Parameter) and weight.dim() == 2:
                rows = weight.T if transposed else weight  # (C * K, D)
                if rows.size(0) % self.num_classes == 0:
                    return rows.reshape(self.num_classes, -1, rows.size(1))  # (C, K, D)
        return None


class CrossBatchLoss(EmbeddingLoss):
    """A pair or tuple PMLLoss against a cross-batch memory (XBM, Wang et al., CVPR 2020) of the
    last `size` embeddings, through pytorch-metric-learning's CrossBatchMemory: each call enqueues
    its batch, then pairs the batch (mined by the loss's miner, if any) with the whole memory,
    itself left out. For the first `start` calls the loss sees its batch alone and nothing is
    enqueued, as the official code's START_ITERATION. The memory, its position and the calls so
    far are in state_dict, so a resumed run continues it exactly; under torchrun every process is
    called with the same gathered batch, so all hold the same memory.
    """

    def __init__(self, loss, size, start, embedding_size):
        super().__init__()
        self.plain, self.start, self.calls = loss, start, 0
        self.memory = pml_losses().CrossBatchMemory(loss.loss, embedding_size, memory_size=size,
                                                    miner=loss.miner)

    def forward(self, embeddings, labels):
        """Loss of a batch's (B, D) embeddings against its (B,) labels and the memory."""
        self.calls += 1
        if self.calls <= self.start:
            return self.plain(embeddings, labels)
        return self.memory(at_least_float32(embeddings), labels)

    def get_extra_state(self):
        """What state_dict needs besides the memory's buffers."""
        return {'calls': self.calls, 'queue_idx': self.memory.queue_idx,
                'has_been_filled': self.memory.has_been_filled}

    def set_extra_state(self, state):
        """Restore get_extra_state's state."""
        self.calls = state['calls']
        self.memory.queue_idx, self.memory.has_been_filled = state['queue_idx'], state['has_been_filled']


def cross_batch_loss(loss, loss_name, size, start, embedding_size):
    """loss (a --loss_name's module) with a cross-batch memory of size embeddings used after start
    calls (CrossBatchLoss); a loss PML's CrossBatchMemory cannot wrap is one UserError."""
    supported = pml_losses().CrossBatchMemory.supported_losses()
    inner = getattr(loss, 'loss', None)
    if not isinstance(loss, PMLLoss) or loss.class_proxies() is not None:
        raise UserError(f'--xbm_size keeps past embeddings to pair with, for the pair and tuple '
                        f'losses; {loss_name} compares embeddings with class proxies, which '
                        f'stand for every class already, so leave --xbm_size out')
    if type(inner).__name__ not in supported:
        raise UserError(f'--xbm_size needs a loss that pytorch-metric-learning\'s '
                        f'CrossBatchMemory supports ({", ".join(supported)}), not '
                        f'{type(inner).__name__}; choose another loss or leave --xbm_size out')
    return CrossBatchLoss(loss, size, start, embedding_size)


def class_cosines(embeddings, proxies):
    """(B, C) cosines of (B, D) embeddings to (C, K, D) class proxies, each class's nearest centre."""
    centres = F.normalize(proxies.detach(), dim=-1).flatten(0, 1)  # (C * K, D)
    return (
        (embeddings.detach().float() @ centres.float().T)
        .view(len(embeddings), *proxies.shape[:2])
        .amax(-1)
    )


# the baselines of the official Proxy-Anchor code (code/losses.py) and pytorch-metric-learning, with
# the settings given there; each flag below is one of their parameters

def proxy_nca(num_classes, embedding_size, proxy_nca_scale):
    """Proxy-NCA (Movshovitz-Attias et al., ICCV 2017) as the official code runs it: ProxyNCALoss(softmax_scale=32)."""
    return PMLLoss(
        pml_losses().ProxyNCALoss(num_classes, embedding_size, softmax_scale=proxy_nca_scale),
        num_classes=num_classes,
    )


def soft_triple(num_classes, embedding_size, soft_triple_centers, soft_triple_la, soft_triple_gamma,
                soft_triple_margin):
    """SoftTriple (Qian et al., ICCV 2019): K centres per class; PML's defaults, the paper's K = 10,
    lambda = 20, gamma = 0.1, delta = 0.01."""
    return PMLLoss(
        pml_losses().SoftTripleLoss(
            num_classes,
            embedding_size,
            centers_per_class=soft_triple_centers,
            la=soft_triple_la,
            gamma=soft_triple_gamma,
            margin=soft_triple_margin,
        ),
        num_classes=num_classes,
    )


def arcface(num_classes, embedding_size, arcface_margin, arcface_scale):
    """ArcFace (Deng et al., CVPR 2019): an additive angular margin in degrees; PML's defaults, the
    paper's 0.5 rad and s = 64."""
    return PMLLoss(
        pml_losses().ArcFaceLoss(
            num_classes, embedding_size, margin=arcface_margin, scale=arcface_scale
        ),
        num_classes=num_classes,
    )


def cosface(num_classes, embedding_size, cosface_margin, cosface_scale):
    """CosFace (Wang et al., CVPR 2018): an additive cosine margin; PML's defaults, the paper's m = 0.35, s = 64."""
    return PMLLoss(
        pml_losses().CosFaceLoss(
            num_classes, embedding_size, margin=cosface_margin, scale=cosface_scale
        ),
        num_classes=num_classes,
    )


def multi_similarity(ms_alpha, ms_beta, ms_base, ms_epsilon):
    """Multi-Similarity (Wang et al., CVPR 2019) on its miner's pairs, as the official code runs it:
    MultiSimilarityMiner(epsilon=0.1) and MultiSimilarityLoss(2, 50, 0.5)."""
    from pytorch_metric_learning import miners
    return PMLLoss(pml_losses().MultiSimilarityLoss(ms_alpha, ms_beta, ms_base),
                   miners.MultiSimilarityMiner(epsilon=ms_epsilon))


def triplet(triplet_margin):
    """Triplet loss on semi-hard triplets, as the official code runs it: TripletMarginMiner(0.1,
    'semihard') and TripletMarginLoss(margin=0.1)."""
    from pytorch_metric_learning import miners
    return PMLLoss(pml_losses().TripletMarginLoss(margin=triplet_margin),
                   miners.TripletMarginMiner(triplet_margin, type_of_triplets='semihard'))


def contrastive(contrastive_pos_margin, contrastive_neg_margin):
    """Contrastive loss (Hadsell et al., CVPR 2006) on every pair, as the official code runs it:
    ContrastiveLoss(neg_margin=0.5)."""
    return PMLLoss(pml_losses().ContrastiveLoss(pos_margin=contrastive_pos_margin,
                                                neg_margin=contrastive_neg_margin))


def npair():
    """N-pair loss (Sohn, NeurIPS 2016) as the official code runs it, NPairsLoss(l2_reg_weight=0):
    PML 2 has no such parameter, its default being no embedding regularizer."""
    return PMLLoss(pml_losses().NPairsLoss())


def circle(circle_m, circle_gamma):
    """Circle loss (Sun et al., CVPR 2020) on every pair: PML's defaults, the paper's m = 0.4, gamma = 80."""
    return PMLLoss(pml_losses().CircleLoss(m=circle_m, gamma=circle_gamma))


def supcon(supcon_temperature):
    """Supervised contrastive loss (Khosla et al., NeurIPS 2020) on every pair: PML's default temperature 0.1."""
    return PMLLoss(pml_losses().SupConLoss(temperature=supcon_temperature))


def pml_losses():
    """pytorch-metric-learning's losses module, imported when a run uses it."""
    from pytorch_metric_learning import losses
    return losses


class Space(NamedTuple):
    """Where tune.py searches a hyper-parameter: low..high, on a log scale where it spans decades
    (an int hyper-parameter is searched among integers)."""
    low: float
    high: float
    log: bool = False


class HyperParameter(NamedTuple):
    """A loss's hyper-parameter as train.py's flag of the same name: its default, the values it may
    take (above `low`, or from `low` on when `low_included`), its help, whether a value off the
    default names the run, and its search space for tune.py."""
    default: float
    low: float
    low_included: bool
    help: str
    names_run: bool = True
    space: Optional[Space] = None


class LossEntry(NamedTuple):
    """A loss train.py can train: build(**its hyper-parameters) gives its module (with num_classes
    and embedding_size too when build takes them), and hyper declares those hyper-parameters.

    cosines True: called on the (B, C) cosines to the model's class proxies and the (B,) labels.
    False: an EmbeddingLoss, called on the batch's (B, D) embeddings and labels; the model then
    builds no proxies. source: where the loss and its settings come from.
    """
    build: Callable
    hyper: dict
    cosines: bool = True
    source: str = ''


def positive(default, help, space):
    """A hyper-parameter that must be above 0, searched in space."""
    return HyperParameter(default, 0.0, False, help, space=space)


def at_least_zero(default, help, space):
    """A hyper-parameter that may be 0 or more, searched in space."""
    return HyperParameter(default, 0.0, True, help, space=space)


# The search spaces: margins on [0, 1] as the Reality Check's (powerful-benchmarker's
# ~BAYESIAN~ [0, 1]); scales and temperatures log-uniform over the decades around their published
# defaults.
MARGIN = Space(0.0, 1.0)
SCALE = positive(32.0, 'the scale s that multiplies the cosines', Space(4.0, 128.0, True))
OFFICIAL = 'the official Proxy-Anchor code (code/losses.py) through PML'
LOSSES = {  # --loss_name -> the loss; a flag two losses share has one default
    'proxy_anchor': LossEntry(
        ProxyAnchorLoss,
        {
            'scale': SCALE,
            'margin': at_least_zero(0.1, 'the margin m around each proxy', Space(0.0, 0.5)),
        },
        source='PP, Kim et al., CVPR 2020',
    ),
    'normalized_softmax': LossEntry(
        NormalizedSoftmaxLoss, {'scale': SCALE}, source='PP, Zhai & Wu, BMVC 2019'
    ),
    # with class proxies of their own
    'proxy_nca': LossEntry(
        proxy_nca,
        {'proxy_nca_scale': positive(32.0, 'the softmax scale of Proxy-NCA', Space(1.0, 128.0, True))},
        False,
        OFFICIAL,
    ),
    'soft_triple': LossEntry(
        soft_triple,
        {
            'soft_triple_centers': HyperParameter(10, 1, True, 'SoftTriple\'s centres per class K',
                                                  space=Space(1, 20)),
            'soft_triple_la': positive(20.0, 'SoftTriple\'s scale lambda', Space(1.0, 100.0, True)),
            'soft_triple_gamma': positive(0.1, 'SoftTriple\'s entropy temperature gamma',
                                          Space(0.01, 1.0, True)),
            'soft_triple_margin': at_least_zero(0.01, 'SoftTriple\'s margin delta', Space(0.0, 0.5)),
        },
        False,
        'PML, its defaults',
    ),
    'arcface': LossEntry(
        arcface,
        {
            'arcface_margin': at_least_zero(28.6, 'ArcFace\'s angular margin in degrees',
                                            Space(0.0, 60.0)),
            'arcface_scale': positive(64.0, 'ArcFace\'s scale s', Space(4.0, 128.0, True)),
        },
        False,
        'PML, its defaults',
    ),
    'cosface': LossEntry(
        cosface,
        {
            'cosface_margin': at_least_zero(0.35, 'CosFace\'s cosine margin m', Space(0.0, 0.6)),
            'cosface_scale': positive(64.0, 'CosFace\'s scale s', Space(4.0, 128.0, True)),
        },
        False,
        'PML, its defaults',
    ),
    # pair-based, on the batch's embeddings
    'multi_similarity': LossEntry(
        multi_similarity,
        {
            'ms_alpha': positive(2.0, 'Multi-Similarity\'s positive scale alpha',
                                 Space(0.01, 100.0, True)),
            'ms_beta': positive(50.0, 'Multi-Similarity\'s negative scale beta',
                                Space(0.01, 100.0, True)),
            'ms_base': HyperParameter(
                0.5, -1.0, True, 'Multi-Similarity\'s similarity offset lambda', space=MARGIN
            ),
            'ms_epsilon': at_least_zero(0.1, 'the Multi-Similarity miner\'s margin epsilon', MARGIN),
        },
        False,
        OFFICIAL,
    ),
    'triplet': LossEntry(
        triplet,
        {
            'triplet_margin': at_least_zero(
                0.1, 'the triplet loss\'s margin, also its semi-hard miner\'s', MARGIN
            )
        },
        False,
        OFFICIAL,
    ),
    'contrastive': LossEntry(
        contrastive,
        {
            'contrastive_pos_margin': HyperParameter(
                0.0, -1.0, True, 'the contrastive loss\'s positive margin', space=MARGIN
            ),
            'contrastive_neg_margin': HyperParameter(
                0.5, -1.0, True, 'the contrastive loss\'s negative margin', space=MARGIN
            ),
        },
        False,
        OFFICIAL,
    ),
    'npair': LossEntry(npair, {}, False, OFFICIAL),
    'circle': LossEntry(
        circle,
        {
            'circle_m': at_least_zero(0.4, 'the circle loss\'s relaxation margin m', Space(0.0, 0.5)),
            'circle_gamma': positive(80.0, 'the circle loss\'s scale gamma', Space(4.0, 512.0, True)),
        },
        False,
        'PML, its defaults',
    ),
    'supcon': LossEntry(
        supcon,
        {'supcon_temperature': positive(0.1, 'SupCon\'s temperature', Space(0.01, 1.0, True))},
        False,
        'PML, its defaults',
    ),
}
PML_PREFIX = 'pml/'  # --loss_name pml/<class name>: any pytorch-metric-learning loss


def pml_loss_names():
    """The class names of pytorch-metric-learning's losses that --loss_name pml/<name> can train."""
    from pytorch_metric_learning.losses import BaseMetricLossFunction, GenericPairLoss
    losses = pml_losses()
    return sorted(name for name in dir(losses) if isinstance(getattr(losses, name), type)
                  and issubclass(getattr(losses, name), BaseMetricLossFunction)
                  and getattr(losses, name) not in (BaseMetricLossFunction, GenericPairLoss))


def check_loss_name(name):
    """The --loss_name value itself if it names a loss, else one UserError that lists the close ones
    (train.py's argparse type)."""
    if name in LOSSES or name.startswith(PML_PREFIX) and name[len(PML_PREFIX):] in pml_loss_names():
        return name
    known = list(LOSSES) + [PML_PREFIX + other for other in pml_loss_names()]
    # pml/arcfaceloss is close to pml/ArcFaceLoss
    lowered = {other.lower(): other for other in known}
    close = [
        lowered[match]
        for match in difflib.get_close_matches(name.lower(), lowered, n=3, cutoff=0.6)
    ]
    hint = f' (close: {", ".join(close)})' if close else ''
    raise UserError(f'unknown --loss_name {name}{hint}: choose one of {", ".join(LOSSES)}, or '
                    f'{PML_PREFIX}<class name> for any pytorch-metric-learning loss, such as '
                    f'{PML_PREFIX}LiftedStructureLoss')


def pml_parameters(cls):
    """{name: inspect.Parameter} of a PML loss class's constructor, and of its base class's where it
    passes its *args on (CosFaceLoss(*args, margin, scale) takes ArcFaceLoss's num_classes and
    embedding_size)."""
    parameters = {}
    for klass in cls.__mro__:
        if '__init__' not in vars(klass):
            continue
        signature = inspect.signature(klass.__init__).parameters
        for name, parameter in signature.items():
            if name != 'self' and parameter.kind not in (
                parameter.VAR_POSITIONAL,
                parameter.VAR_KEYWORD,
            ):
                parameters.setdefault(name, parameter)
        if not any(parameter.kind == parameter.VAR_POSITIONAL for parameter in signature.values()):
            break
    return parameters


GIVEN = ('num_classes', 'embedding_size')  # what train.py passes to a loss itself


def pml_entry(name, loss_args):
    """The LossEntry of --loss_name pml/<name> with its --loss_args {parameter: value}, checked
    against the class's signature: an unknown parameter, or a required one left out, is one
    UserError."""
    cls = getattr(pml_losses(), name[len(PML_PREFIX):])
    parameters = pml_parameters(cls)
    settable = [key for key in parameters if key not in GIVEN]
    for key in loss_args:
        if key not in settable:
            close = difflib.get_close_matches(key, settable, n=3)
            hint = f'; did you mean {" or ".join(close)}?' if close else ''
            raise UserError(f'{name} takes no parameter {key} (from --loss_args); it takes '
                            f'{", ".join(settable) or "none"}{hint}')
    missing = [
        key
        for key, parameter in parameters.items()
        if parameter.default is parameter.empty and key not in GIVEN and key not in loss_args
    ]
    if missing:
        raise UserError(f'{name} needs {" and ".join(missing)}, which has no default: pass it with '
                        f'--loss_args {missing[0]}=<value>, or choose another loss')
    given = [key for key in GIVEN if key in parameters]
    # a loss that takes num_classes holds class weights of its own; one that does not is pair-based
    return LossEntry(
        functools.partial(pml_built, cls, loss_args, given), {}, False, f'PML {cls.__name__}'
    )


def pml_built(cls, loss_args, given, num_classes=None, embedding_size=None):
    """A PML loss class built with its --loss_args and, when it takes them, num_classes and embedding_size."""
    sizes = {'num_classes': num_classes, 'embedding_size': embedding_size}
    return PMLLoss(cls(**{key: sizes[key] for key in given}, **loss_args),
                   num_classes=num_classes if 'num_classes' in given else None)


def canonical_loss_args(text):
    """--loss_args as train.py keeps it (its argparse type): the pairs sorted by name, each value as
    it parses, so that the same parameters always name the same run."""
    return ','.join(f'{key}={value}' for key, value in parse_loss_args(text).items())


def parse_loss_args(text):
    """--loss_args 'name=value,...' -> {name: value} with int, float, bool or str values, in the
    canonical order of the names; anything else is a UserError."""
    values = {}
    for part in filter(None, text.split(',')):
        key, equals, value = part.partition('=')
        if not equals or not key.strip().isidentifier():
            raise UserError(f'--loss_args must be name=value pairs separated by commas, like '
                            f'margin=0.2,swap=True, not {text!r}')
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            value = value.strip()
        if not isinstance(value, (bool, int, float, str)):
            raise UserError(
                f'--loss_args {key.strip()}={value!r} is not a number, True/False or a word'
            )
        values[key.strip()] = value
    return dict(sorted(values.items()))


def loss_entry(loss_name, loss_args=''):
    """The LossEntry of a --loss_name: LOSSES', or for pml/<name> one built from its --loss_args."""
    if loss_name.startswith(PML_PREFIX):
        return pml_entry(loss_name, parse_loss_args(loss_args))
    return LOSSES[loss_name]


# --------------------------------------------------------------------------------------------------
# retrieval metrics, defined on each query's lists of similarities (neighbours.py finds them)

def retrieval_metrics(features, labels, ranks, gallery_features=None, gallery_labels=None,
                      chunk_bytes=CHUNK_BYTES, per_query=False, progress=None, extra=(),
                      screen=False):
    """Recall@K for K in ranks, MAP@R and R-Precision (Musgrave et al., ECCV 2020), all as
    fractions, and the extra metrics named.

    Each query (a row of features (N, D), its class in labels (N,)) ranks items by cosine
    similarity. Without a gallery the items are all the other rows: the query itself is excluded by
    its position, so a duplicate image is an ordinary neighbour, and R is the number of other items
    of its class. With one (gallery_features (G, D), gallery_labels (G,)) the items are the whole
    gallery, nothing excluded, and R is the number of gallery items of its class. An other-class
    item exactly as similar as a same-class one ranks before it, so ties never flatter a model:
    embeddings collapsed to one point score as if every same-class item came last.
    - Recall@K: the fraction of all queries with a same-class item among their K nearest (a K beyond
      the items a query ranks means all of them).
    - R-Precision: the fraction of same-class items among a query's R nearest, averaged over
      queries.
    - MAP@R: the mean over queries of AP@R = (1/R) sum over i <= R of P(i) where the i-th nearest is
      of the query's class, P(i) being the fraction of same-class items among its i nearest.
    extra, any of (EXTRA_METRICS), k a positive integer, capped at the items a query ranks:
    - 'precision@k' (open-metric-learning's calc_precision): the same-class items among the k
      nearest, divided by min(k, R);
    - 'map@k' (open-metric-learning's calc_map): (1 / min(k, R)) sum over i <= k of P(i) where the
      i-th nearest is of the query's class;
    - 'mrr' (pytorch-metric-learning's mean_reciprocal_rank): 1 / the rank of the nearest
      same-class item.
    A query with R = 0 (no other item, or no gallery item, of its class) counts as a miss for
    Recall@K and is left out of the other averages, as pytorch-metric-learning's
    AccuracyCalculator does.

    Returns {'recall@K': ..., 'map@r': ..., 'r_precision': ..., and each extra name: ...}; with
    per_query, (that dict, each query's figures in the order of features: 'recall@K' (N,) bool
    hits, 'ap@r', 'r_precision' and each extra name (N,) float64, NaN where R = 0). chunk_bytes
    bounds the similarity blocks held at once; progress, when given, is called as progress(blocks
    done, blocks in all) while they are swept; screen: neighbours.class_lists' (True: bfloat16
    products, candidates re-scored exactly; False: every product in float32).
    """
    ranks = [int(k) for k in ranks]
    extra = parse_extra(extra)
    ranked = len(labels) - 1 if gallery_features is None else len(gallery_labels)
    depth = max([min(k, ranked) for name, k in extra if k], default=0)
    lists = class_lists(features, labels, ranks, gallery_features, gallery_labels, chunk_bytes,
                        progress, depth=depth, count_all=any(k is None for _, k in extra),
                        screen=screen)
    metrics, hits, figures = metrics_from_lists(lists, ranks, len(labels), extra, ranked)
    if not per_query:
        return metrics
    return metrics, in_query_order(hits, figures, lists.where, len(labels), ranks)


EXTRA_METRICS = ('precision@k', 'map@k', 'mrr')


def parse_extra(names):
    """[(name, k or None)] of retrieval_metrics' extra names ('precision@5', 'map@10', 'mrr')."""
    parsed = []
    for name in names:
        kind, _, k = name.partition('@')
        if name == 'mrr':
            parsed.append((name, None))
        elif kind in ('precision', 'map') and k.isdigit() and int(k) > 0:
            parsed.append((name, int(k)))
        else:
            raise UserError(f'unknown metric {name!r}: use precision@k, map@k (k a positive '
                            f'integer) or mrr')
    return parsed


def ranked_metric(name):
    """Whether name is one of retrieval_metrics' extra ones (precision@5, map@10, mrr)."""
    try:
        parse_extra([name])
    except UserError:
        return False
    return True


def metrics_from_lists(lists, ranks, total, extra=(), ranked=None):
    """Every metric, averaged and per query, from each query's lists (the definitions are
    retrieval_metrics').

    lists (neighbours.ClassLists), per query: positives (n, m) its R same-class similarities,
    descending, then -inf; top (n, w >= m) its largest other-class similarities, descending, exact
    in the values read here; ahead_of_nearest (n,) how many other-class items are at least as
    similar as its nearest same-class one, None when no K exceeds w; r (n,) its R. No ranking is
    built: the j-th same-class item stands at j + (other-class items at least as similar). total:
    all the queries, the n here and those left out for want of an item of their class. extra:
    parse_extra's pairs; ranked: the items each query ranks, which caps their k. Returns (the
    averages, hits (n, K), per-query figures {'ap@r', 'r_precision', extra names: (n,)}).
    """
    positives, top, r = lists.positives, lists.top, lists.r  # (n, m), (n, w), (n,)
    ahead_of_nearest = lists.ahead_of_nearest  # (n,) or None
    m = positives.size(1)
    j = torch.arange(1, m + 1, device=positives.device)  # (m,)
    # other-class items at least as similar as the j-th same-class item, so ranked before it
    ahead = top.size(1) - torch.searchsorted(top.flip(1).contiguous(), positives, side='left')
    position = j + ahead  # (n, m) rank of the j-th same-class item
    is_item = j <= r[:, None]  # (n, m) the query's R same-class items
    # (n, m) the same-class items among the R nearest
    within_r = is_item & (position <= r[:, None])
    # (n,) ranked above the first hit
    first_miss = ahead[:, 0] if ahead_of_nearest is None else ahead_of_nearest
    has_r = r > 0
    hits = (first_miss[:, None] < torch.tensor(ranks, device=r.device)) & has_r[:, None]  # (n, K)
    figures = {'ap@r': (within_r * j / position.double()).sum(1) / r.double(),  # NaN where R = 0
               'r_precision': within_r.sum(1) / r.double()}
    for name, k in extra:
        if k is None:  # the reciprocal rank of the nearest same-class item
            figures[name] = torch.where(has_r, 1 / (1 + first_miss.double()), math.nan)
            continue
        k = min(k, ranked)
        within_k = is_item & (position <= k)  # (n, m) the same-class items among the k nearest
        if name.startswith('precision@'):
            found = within_k.sum(1).double()
        else:
            found = (within_k * j / position.double()).sum(1)
        figures[name] = found / r.clamp(max=k).double()  # NaN (0 / 0) where R = 0
    metrics = {f'recall@{k}': hits[:, i].sum().item() / total for i, k in enumerate(ranks)}
    metrics['map@r'] = figures['ap@r'][has_r].mean().item()
    metrics.update({name: figures[name][has_r].mean().item() for name in figures
                    if name != 'ap@r'})
    return metrics, hits, figures


def in_query_order(hits, figures, where, total, ranks):
    """The per-query figures of the sorted queries put back at their rows where (n,) among all total
    queries; the queries left out (no gallery item of their class) are misses with NaN figures."""
    all_hits = hits.new_zeros((total, len(ranks)))
    all_hits[where] = hits
    out = {f'recall@{k}': all_hits[:, i] for i, k in enumerate(ranks)}
    for name, values in figures.items():
        out[name] = values.new_full((total,), math.nan)
        out[name][where] = values
    return out


KMEANS_SEED = 1234  # faiss.Kmeans' own default, so that the clusters are PML's AccuracyCalculator's


def clustering_metrics(features, labels, seed=KMEANS_SEED):
    """NMI and AMI (sklearn) of the classes labels (N,) against a k-means clustering of the unit
    rows of features (N, D), k the number of classes: faiss.Kmeans with 20 iterations, as
    pytorch-metric-learning's AccuracyCalculator clusters.

    faiss trains on at most 256 rows a centroid and assigns the rows in blocks, so memory stays
    O(N D + k D); sklearn's contingency table is sparse. Returns {'nmi': ..., 'ami': ...}.
    """
    import faiss
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score
    units = F.normalize(torch.as_tensor(features).float(), dim=1).numpy()  # (N, D)
    labels = torch.as_tensor(labels).numpy()
    kmeans = faiss.Kmeans(units.shape[1], len(np.unique(labels)), niter=20, seed=seed)
    kmeans.train(units)
    clusters = kmeans.index.search(units, 1)[1][:, 0]  # (N,)
    return {'nmi': float(normalized_mutual_info_score(labels, clusters)),
            'ami': float(adjusted_mutual_info_score(labels, clusters))}


COLLAPSED = 0.999  # a mean cosine above this: the images' embeddings are all nearly one direction


def mean_pairwise_cosine(features):
    """The mean cosine between two distinct rows of features (N, D), from their sum in O(N D): near
    1 when the embeddings have collapsed onto one direction, so that rankings among them are
    noise."""
    units = F.normalize(torch.as_tensor(features).double(), dim=1)  # (N, D)
    n, total = len(units), units.sum(0)  # (D,)
    if n < 2:
        return math.nan
    # all pairs minus the diagonal
    return ((total @ total - (units * units).sum()) / (n * (n - 1))).item()


def recall(features, labels, ranks):
    """Recall@K for each K in ranks, as a list of fractions (see retrieval_metrics)."""
    metrics = retrieval_metrics(features, labels, ranks)
    return [metrics[f'recall@{int(rank)}'] for rank in ranks]


def parse_ranks(text):
    """'1,2,4,8' -> [1, 2, 4, 8]; anything else is a UserError."""
    try:
        ranks = [int(part) for part in text.split(',')]
    except ValueError:
        raise UserError(
            f'--recalls must be positive integers separated by commas, like 1,2,4,8, not {text!r}'
        ) from None
    if not ranks or min(ranks) < 1:
        raise UserError(
            f'--recalls must be positive integers separated by commas, like 1,2,4,8, not {text!r}'
        )
    return ranks
