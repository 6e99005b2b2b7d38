"""train.py --image_size: the crop of training and test images, the run name it gives, --resume's
refusal of another size, and test.py and export.py embedding at the size the data base stores (224
for a data base written before the flag)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import model as model_module
import utils
from conftest import TINY
from runs import DataBase, load_checkpoint
from runtime import UserError
from script_runner import error_sentence, load_script

SIZE = 40  # off the default: it names the run
NAME = f'cub_timm-test_resnet_proxy_anchor_8_image_size{SIZE}_no_pretrained_batch_size4'

pytestmark = pytest.mark.usefixtures('without_onednn')


def test_training_and_test_crops():
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8, generator=generator)
    assert utils.train_transform(SIZE)(image).shape == (3, SIZE, SIZE)
    # hand-worked: the shorter side 90 becomes 40 * 256 // 224 = 45 (so 120 becomes 60), then the
    # centre 40 x 40, from row round(2.5) = 2 and column 10
    resized = TF.resize(image, [45, 60], antialias=True)
    assert torch.equal(utils.test_transform(SIZE)(image), resized[:, 2:42, 10:50])
    assert utils.inference_sizes() == (256, 224)  # the recipe's
    assert utils.inference_sizes(256) == (292, 256)  # the official Proxy-Anchor code's pair


def test_image_reader_crops_every_split(prepared):
    for split in ('train', 'test'):
        image, _ = utils.ImageReader(prepared, 'cub', split, image_size=SIZE)[0]
        assert image.shape == (3, SIZE, SIZE)


def test_off_its_default_it_names_the_run(script, tmp_path):
    train = load_script('train')
    parser = train.get_args_parser()
    assert parser.get_default('image_size') == 224
    default, other = (
        parser.parse_args(['--data_name', 'cub', *size]) for size in ([], ['--image_size', '256'])
    )
    assert train.prefix_of(default) == 'cub_resnet50_proxy_anchor_512'
    assert train.prefix_of(other) == 'cub_resnet50_proxy_anchor_512_image_size256'
    status, _, err = script('train', '--data_name', 'cub', '--image_size', '16', cwd=tmp_path)
    assert error_sentence(status, err) == 'error: --image_size must be at least 32, not 16'


def test_resume_refuses_another_size(tmp_path):
    train = load_script('train')
    parser = train.get_args_parser()
    args = parser.parse_args(['--data_name', 'cub', '--image_size', '256'])
    path = str(tmp_path / 'checkpoint.pth')
    saved = {
        'model': {},
        'optimizer': {},
        'scheduler': {},
        'epoch': 1,
        'args': dict(vars(args)),
        'rng': {},
        'statistics': {},
    }
    torch.save(saved, path)
    assert load_checkpoint(path, train.recipe_of(args), 20)['epoch'] == 1
    other = parser.parse_args(['--data_name', 'cub', '--image_size', '288'])
    with pytest.raises(UserError, match='was trained with --image_size 256, not 288; '):
        load_checkpoint(path, train.recipe_of(other), 20)
    # a checkpoint from before the flag was trained at 224
    del saved['args']['image_size']
    torch.save(saved, path)
    default = parser.parse_args(['--data_name', 'cub'])
    assert load_checkpoint(path, train.recipe_of(default), 20)['epoch'] == 1
    with pytest.raises(UserError, match='was trained with --image_size 224, not 256; '):
        load_checkpoint(path, train.recipe_of(args), 20)


def test_a_vit_is_built_for_the_run_size():
    net = model_module.Model('vit_small_dino', 8, 2, pretrained=False, image_size=64).eval()
    with torch.inference_mode():
        assert net.embed(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, 8)


def photo(path, seed):
    """A 120 x 90 PNG of random pixels."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def test_every_script_embeds_at_the_size_the_run_stores(script, prepared, tmp_path, monkeypatch):
    sizes = []  # the height and width of every batch the model embeds
    embed = model_module.Model.embed

    def spy(self, images):
        sizes.append(tuple(int(side) for side in images.shape[-2:]))  # tensors while traced
        return embed(self, images)

    monkeypatch.setattr(model_module.Model, 'embed', spy)
    status, _, err = script(
        'train',
        '--data_path',
        prepared,
        '--data_name',
        'cub',
        '--backbone_type',
        TINY,
        '--no_pretrained',
        '--feature_dim',
        8,
        '--batch_size',
        4,
        '--num_epochs',
        1,
        '--num_workers',
        0,
        '--image_size',
        SIZE,
        cwd=tmp_path,
    )
    assert status == 0, err
    assert sizes and set(sizes) == {(SIZE, SIZE)}  # the training batches and the evaluation
    data_base = f'{NAME}_1_data_base.pth'
    assert DataBase.load(tmp_path / 'results' / data_base).image_size == SIZE

    sizes.clear()  # a query outside the data base, and a folder of photos
    query = photo(tmp_path / 'q.png', 0)
    status, _, err = script(
        'test', '--data_base', data_base, '--query_img_name', query, cwd=tmp_path
    )
    assert status == 0, err
    photo(tmp_path / 'album' / 'a.png', 1)
    photo(tmp_path / 'album' / 'b.png', 2)
    status, _, err = script(
        'test',
        '--data_base',
        data_base,
        '--query_img_name',
        query,
        '--gallery',
        tmp_path / 'album',
        cwd=tmp_path,
    )
    assert status == 0, err
    assert sizes and set(sizes) == {(SIZE, SIZE)}

    sizes.clear()  # the traced example, the check images, and the JSON that tells a caller
    status, _, err = script(
        'export', '--data_base', data_base, '--format', 'torchscript', cwd=tmp_path
    )
    assert status == 0, err
    assert sizes and set(sizes) == {(SIZE, SIZE)}
    description = json.loads((tmp_path / 'results' / f'{NAME}_1.json').read_text())
    assert (description['crop'], description['resize']) == (SIZE, SIZE * 256 // 224)
    assert description['input'] == f'uint8 RGB (B, 3, {SIZE}, {SIZE})'

    # a data base from before the flag was trained at 224
    saved = torch.load(tmp_path / 'results' / data_base, weights_only=True)
    del saved['args']['image_size']
    torch.save(saved, tmp_path / 'results' / data_base)
    assert DataBase.load(tmp_path / 'results' / data_base).image_size == 224
    sizes.clear()
    status, _, err = script(
        'test', '--data_base', data_base, '--query_img_name', query, cwd=tmp_path
    )
    assert status == 0, err
    assert sizes == [(224, 224)]
