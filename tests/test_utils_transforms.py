"""utils.py's fast input pipeline draws the original implementation's crops: same pixel
statistics, same normalised model input; the image cache gives the images decoding gives."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import utils
from conftest import ROOT
from model import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, InputNorm
from utils import ImageCache, ImageReader, UserError, index_path

NUM_IMAGES, CROPS_PER_IMAGE = 8, 8


def textured_image(rng, height=240, width=320):
    """(H, W, 3) uint8: smooth colour regions plus texture; crops of it are both shrunk and enlarged to 224."""
    coarse = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
    pixels = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float64
    )
    pixels += rng.normal(0, 25, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    """A prepared 'cub' data set of NUM_IMAGES JPEGs (two classes) in the layout data_utils.py writes."""
    root = str(tmp_path_factory.mktemp('pipeline'))
    folder = os.path.join(root, 'cub', 'uncropped')
    os.makedirs(folder)
    rng = np.random.default_rng(5)
    split = {1: [], 2: []}
    for i in range(NUM_IMAGES):
        Image.fromarray(textured_image(rng)).save(os.path.join(folder, f'{i}.jpg'), quality=90)
        split[1 + i % 2].append(f'uncropped/{i}.jpg')
    torch.save({'train': split, 'test': split}, index_path(root, 'cub'))
    return root


def seed_crops(reader):
    """(N * CROPS_PER_IMAGE, 3, 224, 224) crops in [0, 1] of the seed's pipeline: PIL,
    torchvision.transforms v1.

    Each crop's random numbers are seeded as utils.ImageReader seeds them, so both pipelines draw
    the same crop boxes and flips: their statistics then differ by decoding and resampling alone,
    not by sampling noise, which over a few hundred crops is itself about 2%.
    """
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
    )
    crops = []
    for epoch in range(CROPS_PER_IMAGE):
        for index, path in enumerate(reader.images):
            torch.manual_seed(hash((reader.seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            crops.append(transform(Image.open(path).convert('RGB')))
    return torch.stack(crops)


def project_crops(reader):
    """(N * CROPS_PER_IMAGE, 3, 224, 224) uint8 crops of utils.ImageReader, as train.py makes them."""
    return torch.stack(
        [
            reader[index, epoch][0]
            for epoch in range(CROPS_PER_IMAGE)
            for index in range(len(reader))
        ]
    )


@pytest.fixture(scope='module')
def crops(prepared):
    """(this project's uint8 crops, the seed pipeline's float crops in [0, 1]) of the same images and seeds."""
    reader = ImageReader(prepared, 'cub', 'train', seed=3)
    return project_crops(reader), seed_crops(reader)


def assert_statistics_match(expected, actual, tolerance=0.02):
    """Per-channel mean and std of pixel values agree within `tolerance`, relative to the expected std."""
    dims = (0, 2, 3)
    expected_mean, actual_mean = expected.mean(dims), actual.mean(dims)
    expected_std, actual_std = expected.std(dims), actual.std(dims)
    # a normalised mean is near 0, where a relative error means nothing: compare means in units of
    # the spread
    assert ((actual_mean - expected_mean).abs() <= tolerance * expected_std).all(), (
        expected_mean,
        actual_mean,
    )
    assert ((actual_std - expected_std).abs() <= tolerance * expected_std).all(), (
        expected_std,
        actual_std,
    )


def test_crop_statistics_match_the_seed_pipeline(crops):
    """Mean and std of the crops' pixels in [0, 1] agree within 2% with the seed's, over a fixed set of images."""
    ours, theirs = crops
    assert ours.dtype == torch.uint8 and ours.shape == (NUM_IMAGES * CROPS_PER_IMAGE, 3, 224, 224)
    ours = ours.float() / 255
    assert_statistics_match(theirs, ours)
    # and relative to the values themselves
    dims = (0, 2, 3)
    torch.testing.assert_close(ours.mean(dims), theirs.mean(dims), rtol=0.02, atol=0)
    torch.testing.assert_close(ours.std(dims), theirs.std(dims), rtol=0.02, atol=0)


def test_same_random_numbers_give_the_seed_pipelines_crops(prepared, crops):
    """The v2 crops on uint8 tensors are the seed's v1 crops on PIL images, to within rounding: the
    augmentation distribution is unchanged. Another seed gives other crops, so the agreement is not
    a constant output.
    """
    ours, theirs = crops
    assert (ours.float() / 255 - theirs).abs().mean() < 1 / 255  # within one grey level on average
    other = project_crops(ImageReader(prepared, 'cub', 'train', seed=4)).float() / 255
    assert (other - theirs).abs().mean() > 10 / 255


@pytest.mark.parametrize('backbone_type', ['resnet50', 'googlenet'])
def test_input_norm_equals_torchvision_normalize(crops, backbone_type):
    """model.InputNorm on uint8 crops equals ToTensor + Normalize(ImageNet) on the same crops, and
    the normalised inputs' statistics match the seed pipeline's (ToTensor, Normalize on the CPU)
    within 2%."""
    ours, theirs = crops
    _, _, order, mean, std = BACKBONES[backbone_type]
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    model_input = InputNorm(order, mean, std)(ours)
    torch.testing.assert_close(model_input, normalize(ours.float() / 255), rtol=0, atol=1e-5)
    assert_statistics_match(normalize(theirs), model_input)


def test_bn_inception_input_is_bgr_0_255_minus_mean(crops):
    """BN-Inception's input: the crop's channels reversed to BGR, in 0-255, minus [104, 117, 128], std 1."""
    ours, theirs = crops
    _, _, order, mean, std = BACKBONES['inception']
    model_input = InputNorm(order, mean, std)(ours)
    bgr_mean = torch.tensor([104.0, 117.0, 128.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(
        model_input, ours.float()[:, [2, 1, 0]] - bgr_mean, rtol=0, atol=1e-4
    )
    assert_statistics_match(255 * theirs[:, [2, 1, 0]] - bgr_mean, model_input)


@pytest.mark.parametrize('augment', [True, False])
def test_cache_gives_the_same_images_as_decoding(prepared, augment):
    """With the cache, (index, epoch) yields the tensor decoding the file yields: the same run."""
    plain = ImageReader(prepared, 'cub', 'train', seed=7, augment=augment)
    cached = ImageReader(prepared, 'cub', 'train', seed=7, augment=augment)
    cache = cached.cache_images()
    assert len(cache) == NUM_IMAGES and cache.nbytes == NUM_IMAGES * 3 * 240 * 320
    for epoch in (1, 2):
        for index in range(NUM_IMAGES):
            image, label = cached[index, epoch]
            expected, expected_label = plain[index, epoch]
            assert torch.equal(image, expected) and label == expected_label
    # the stored pixels are the decoder's, untouched by the transforms that read them
    for index, path in enumerate(plain.images):
        assert torch.equal(cache[index], utils.read_image(path))


def test_cache_is_shared_and_checked(prepared):
    """A second reader of the same images reuses the first's cache; one of another size is refused."""
    train = ImageReader(prepared, 'cub', 'train')
    cache = train.cache_images()
    evaluation = ImageReader(prepared, 'cub', 'train', augment=False)
    assert evaluation.cache_images(cache) is cache
    with pytest.raises(ValueError):
        evaluation.cache_images(ImageCache(train.images[:2]))


def test_cache_errors_are_one_sentence(prepared, tmp_path, monkeypatch):
    """A missing image, or a cache larger than the free memory, is a UserError that says what to do."""
    with pytest.raises(UserError, match='cannot read image'):
        ImageCache([str(tmp_path / 'missing.jpg')])
    reader = ImageReader(prepared, 'cub', 'train')
    monkeypatch.setattr(utils, 'available_memory', lambda: 1000)
    with pytest.raises(UserError, match='without --cache_images'):
        reader.cache_images()


def test_input_speed_benchmark_runs():
    """benchmarks/input_speed.py, at a toy size: it times all three pipelines and prints the ratio."""
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'benchmarks', 'input_speed.py'),
            '--num_images',
            '6',
            '--repeats',
            '1',
            '--batch_size',
            '3',
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ('seed', 'decode', 'cache'):
        assert re.search(rf'^  {name} +\d+ images/s per core', run.stdout, re.MULTILINE), run.stdout
    assert re.search(
        r'^ratio \(train.py --cache_images / seed\): \d+\.\d\dx$', run.stdout, re.MULTILINE
    )
