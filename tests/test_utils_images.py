"""Image files in every pixel format PIL reads give every script the pixels data_utils.py prepares;
a file PIL cannot read is refused by data_utils.py and skipped, by name, everywhere else."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data_utils
import model
import utils
from conftest import write_album

# the same photo stored without loss: each of a group reads as the first (16-bit files by their
# high byte, as PIL reads 16-bit colour; alpha is dropped, not blended)
LOSSLESS = [
    ['rgb.png', 'rgb16.png', 'rgba.png', 'rgba16.png', 'alpha.webp', 'rgb.bmp', 'rgb.tga'],
    ['gray.pgm', 'gray16.png', 'gray16.tif', 'la.png'],
]


@pytest.fixture(scope='module')
def album(tmp_path_factory):
    """{file name: path} of one photo in every pixel format of conftest.write_album."""
    return write_album(str(tmp_path_factory.mktemp('album')))


def pil_rgb(path):
    """(3, H, W) uint8: PIL's convert('RGB') of an image file, the reference at 8 bits a channel."""
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert('RGB'))).permute(2, 0, 1)


def unreadable_files(folder):
    """Files named as images that no decoder can read: {file name: path}."""
    os.makedirs(folder, exist_ok=True)
    photo, png = io.BytesIO(), io.BytesIO()
    Image.new('RGB', (40, 30), (200, 30, 90)).save(photo, format='JPEG')
    Image.new('RGB', (40, 30), (20, 30, 90)).save(png, format='PNG')
    contents = {
        'cut.jpg': photo.getvalue()[: len(photo.getvalue()) // 2],
        'empty.jpg': b'',
        'page.jpg': b'<html>403 Forbidden</html>\n',
        'text.png': b'not a PNG',
        'cut.png': png.getvalue()[: len(png.getvalue()) // 2],
    }
    paths = {}
    for name, content in contents.items():
        paths[name] = os.path.join(folder, name)
        with open(paths[name], 'wb') as file:
            file.write(content)
    return paths


def test_every_pixel_format_reads_as_rgb(album):
    for name, path in album.items():
        image = utils.read_image(path)
        assert image.dtype == torch.uint8 and image.shape == (3, 30, 40), name
        if not any(name in group for group in LOSSLESS):
            torch.testing.assert_close(image, pil_rgb(path), rtol=0, atol=0, msg=name)
    for first, *others in LOSSLESS:
        for name in others:
            same = utils.read_image(album[first])
            torch.testing.assert_close(
                utils.read_image(album[name]), same, rtol=0, atol=0, msg=name
            )
    for name in ('rgb.png', 'gray.pgm'):
        torch.testing.assert_close(
            utils.read_image(album[name]), pil_rgb(album[name]), rtol=0, atol=0
        )
    gray = utils.read_image(album['gray.pgm'])
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])


def test_data_utils_prepares_the_pixels_every_script_reads(album, tmp_path):
    """Each prepared copy is the JPEG of the pixels read_image gives: a photo is trained on as it is
    searched."""
    for name, path in album.items():
        copy = str(tmp_path / f'{name}.jpg')
        assert data_utils.convert((path, copy, None)) == ('written', None)
        encoded = io.BytesIO()
        pixels = utils.read_image(path).permute(1, 2, 0).numpy()  # (H, W, 3)
        Image.fromarray(pixels).save(encoded, format='JPEG')
        with Image.open(copy) as prepared, Image.open(encoded) as expected:
            np.testing.assert_array_equal(np.asarray(prepared), np.asarray(expected), err_msg=name)


def test_files_data_utils_refuses_are_unreadable_everywhere(album, tmp_path, monkeypatch):
    bad = unreadable_files(str(tmp_path / 'bad'))
    bad['missing.jpg'] = str(tmp_path / 'missing.jpg')
    for name, path in bad.items():
        assert data_utils.convert((path, str(tmp_path / 'copy.jpg'), None))[0] == 'failed', name
        with pytest.raises(utils.UnreadableImage) as error:
            utils.read_image(path)
        assert str(error.value) == (
            f'cannot read image {path}: it is missing, truncated or not an ' f'image'
        )
    # a decompression bomb (here: any photo over twice the limit) too
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 40 * 30 // 2 - 1)
    assert data_utils.convert((album['rgb.png'], str(tmp_path / 'copy.jpg'), None))[0] == 'failed'
    with pytest.raises(utils.UnreadableImage):
        utils.read_image(album['rgb.png'])


@torch.inference_mode()
def test_embed_files_embeds_what_it_reads_and_names_the_rest(album, tmp_path, monkeypatch):
    monkeypatch.setattr(utils, 'TEST_BATCH', 2)  # three batches, one without a readable file
    bad = unreadable_files(str(tmp_path / 'bad'))
    paths = [
        album['cmyk.jpg'],
        bad['cut.jpg'],
        bad['text.png'],
        bad['empty.jpg'],
        album['rgb16.png'],
    ]
    torch.manual_seed(0)
    net = model.Model('timm/resnet18', 8, 0, pretrained=False).eval()
    features, unreadable = utils.embed_files(net, paths)
    assert unreadable == [bad['cut.jpg'], bad['text.png'], bad['empty.jpg']]
    expected = [
        net.embed(utils.test_transform()(pil_rgb(album[name]))[None])[0]
        for name in ('cmyk.jpg', 'rgb.png')
    ]  # (D,) each; rgb16.png reads as rgb.png
    torch.testing.assert_close(features, torch.stack(expected))
    assert utils.unreadable_line(unreadable[:2]) == (
        f'skipped 2 unreadable images (missing, truncated or not an image): {bad["cut.jpg"]}, '
        f'{bad["text.png"]}'
    )
