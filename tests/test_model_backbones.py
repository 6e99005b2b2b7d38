"""model.py's modern backbones through timm: ViT-S/16 DINO, DINOv2, any timm model; random
weights, no download.

The ViTs run at the recipe's 224-pixel crops, which is slow on a CPU, so each model is built once per module and
the 86M-parameter dinov2_base only embeds one image.
"""

import copy
import os
import types
import urllib.error

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants
from PIL import Image
from timm.layers import resample_abs_pos_embed
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import model as model_module
from conftest import Pairs
from model import Model
from script_runner import error_sentence, load_script, query_folder
import utils
from utils import LOSSES, UserError

FEATURE_DIM, NUM_CLASSES = 24, 5
# name -> (timm model and weights tag, feature width); the widths are the papers' (ViT-S 384, ViT-B 768, ResNet-18 512)
TIMM = {
    'vit_small_dino': ('vit_small_patch16_224.dino', 384),
    'dinov2_small': ('vit_small_patch14_dinov2.lvd142m', 384),
    'dinov2_base': ('vit_base_patch14_dinov2.lvd142m', 768),
    'timm/resnet18': ('resnet18.a1_in1k', 512),
}  # timm's default weights for resnet18
VITS = ('vit_small_dino', 'dinov2_small', 'dinov2_base')


@pytest.fixture(scope='module', params=list(TIMM))
def run(request):
    """One eval-mode forward of uint8 224 x 224 images per backbone (one image for dinov2_base, two for the others)."""
    torch.manual_seed(0)
    net = Model(request.param, FEATURE_DIM, NUM_CLASSES, pretrained=False).eval()
    images = torch.randint(
        0, 256, (1 if request.param == 'dinov2_base' else 2, 3, 224, 224), dtype=torch.uint8
    )
    with torch.no_grad():
        embeddings, cosines = net(images)
        tokens = (
            net.backbone.forward_features(net.input_norm(images)) if request.param in VITS else None
        )
        features = net.backbone(net.input_norm(images))
    return request.param, net, images, embeddings, cosines, tokens, features


def test_unit_embeddings_of_feature_dim(run):
    backbone_type, net, images, embeddings, cosines, _, features = run
    name, width = TIMM[backbone_type]
    assert (
        f'{net.backbone.pretrained_cfg["architecture"]}.{net.backbone.pretrained_cfg["tag"]}'
        == name
    )
    assert features.shape == (len(images), width) and net.backbone.num_features == width
    assert embeddings.shape == (len(images), FEATURE_DIM) and embeddings.dtype == torch.float32
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(len(images)), atol=1e-5)
    assert cosines.shape == (len(images), NUM_CLASSES) and cosines.abs().max() <= 1 + 1e-5
    # the seed's head on the timm feature: layer norm without affine, bias-free linear, L2 norm
    assert net.norm.normalized_shape == (width,) and net.norm.weight is None
    assert net.embedding.in_features == width and net.embedding.bias is None
    centred = features - features.mean(dim=1, keepdim=True)
    normed = centred / torch.sqrt(centred.pow(2).mean(dim=1, keepdim=True) + net.norm.eps)
    expected = F.normalize(normed @ net.embedding.weight.T, dim=-1)
    assert torch.allclose(embeddings, expected, atol=1e-5)


def test_input_normalisation_is_the_pretrained_config(run):
    backbone_type, net, images, *_ = run
    config = net.backbone.pretrained_cfg
    # DINO, DINOv2 and timm's ResNet-18 were all trained on ImageNet's mean and std
    assert config['mean'] == (0.485, 0.456, 0.406) and config['std'] == (0.229, 0.224, 0.225)
    expected = v2.Normalize(config['mean'], config['std'])(images.float() / 255)
    assert torch.allclose(net.input_norm(images), expected, atol=1e-4)


def test_vit_feature_is_the_class_token_at_224_pixels(run):
    backbone_type, net, images, _, _, tokens, features = run
    if backbone_type not in VITS:
        pytest.skip('not a ViT')
    patch = 16 if backbone_type == 'vit_small_dino' else 14
    grid = 224 // patch
    assert tokens.shape == (
        len(images),
        1 + grid * grid,
        features.size(1),
    )  # class token + patch tokens
    assert (
        net.backbone.pos_embed.shape[1] == 1 + grid * grid
    )  # DINOv2's 518-pixel grid resized to 224
    assert torch.equal(features, tokens[:, 0])  # the class token after the final norm
    assert not torch.allclose(features, tokens[:, 1:].mean(dim=1), atol=1e-3)
    assert not torch.allclose(features, tokens[:, 1:].amax(dim=1), atol=1e-3)


def train_step(net, images, labels, amp):
    """One step of train.py's own epoch loop (train_one_epoch) on one batch, with AdamW as the ViT recipes use."""
    train = load_script('train')
    optimizer = torch.optim.AdamW(
        [p for p in net.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05
    )
    args = types.SimpleNamespace(
        amp=amp,
        no_pretrained=False,
        num_epochs=1,  # the pretrained path: BatchNorm eval
        feature_dim=net.embedding.out_features,
    )

    loader = DataLoader(
        train.Marked(Pairs(images, labels)),
        batch_sampler=train.GlobalBatches(len(images), len(images)),
    )
    # with args.amp: bf16 autocast, channels_last inputs
    train.train_one_epoch(
        net,
        loader,
        LOSSES['proxy_anchor'].build(),
        True,
        optimizer,
        torch.device('cpu'),
        1,
        args,
        rank=0,
    )


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_backbone_trains_after_the_warm_up_and_not_during_it(run):
    """vit_small_dino under --amp, dinov2_small and timm/resnet18 in float32; dinov2_base is too slow for it."""
    if run[0] == 'dinov2_base':
        pytest.skip('86M parameters: too slow to train on a CPU test')
    train, amp = load_script('train'), run[0] == 'vit_small_dino'
    net = copy.deepcopy(run[1])
    if amp:  # as train.py --amp: channels_last weights and inputs, bf16 autocast
        net = net.to(memory_format=torch.channels_last)
    images, labels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8), torch.tensor(
        [0, 1]
    )

    train.set_backbone_trainable(net, False)  # the warm-up
    before = snapshot(net)
    train_step(net, images, labels, amp)
    after = snapshot(net)
    assert all(
        torch.equal(before[name], after[name]) for name in before if name.startswith('backbone.')
    )
    assert not torch.equal(before['embedding.weight'], after['embedding.weight'])
    assert not torch.equal(before['proxies.weight'], after['proxies.weight'])
    # the seed's BatchNorm rule touches only BatchNorm: a ViT's layer norms stay in training mode
    assert all(
        not m.training
        for m in net.backbone.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    )
    assert all(m.training for m in net.backbone.modules() if isinstance(m, torch.nn.LayerNorm))

    train.set_backbone_trainable(net, True)  # after the warm-up: the backbone's weights move
    train_step(net, images, labels, amp)
    moved = snapshot(net)
    backbone = [name for name in after if name.startswith('backbone.')]
    reached = [
        name
        for name, p in net.named_parameters()
        if name in backbone and p.grad is not None and p.grad.any()
    ]
    assert reached and all(not torch.equal(after[name], moved[name]) for name in reached)
    if run[0] in VITS:
        assert reached == backbone
    else:  # timm zero-initialises each residual block's last BatchNorm: the rest of the block gets no gradient yet
        for name in set(backbone) - set(reached):
            block = name.rsplit('.', 2)[0]  # backbone.layer1.0.conv1.weight -> backbone.layer1.0
            assert not before[f'{block}.bn2.weight'].any(), name


# ----------------------------------------------------------------------------------------------------------------------
# names on the command line and in file names


def test_help_lists_the_named_backbones_and_the_timm_form():
    text = ' '.join(load_script('train').get_args_parser().format_help().split())
    assert (
        'resnet50, inception, googlenet, vit_small_dino, dinov2_small, dinov2_base, or timm/<name> for any timm '
        'model'
    ) in text


def test_timm_names_are_safe_file_names():
    parser = load_script('train').get_args_parser()
    args = parser.parse_args(
        ['--data_name', 'cub', '--backbone_type', 'timm/convnext_small.fb_in22k']
    )
    assert (
        load_script('train').prefix_of(args) == 'cub_timm-convnext_small.fb_in22k_proxy_anchor_512'
    )
    args = parser.parse_args(['--data_name', 'cub', '--backbone_type', 'dinov2_small'])
    assert load_script('train').prefix_of(args) == 'cub_dinov2_small_proxy_anchor_512'


def test_reproduce_runs_the_backbones_asked_for(script, tmp_path):
    os.makedirs(tmp_path / 'data' / 'cub')
    open(
        tmp_path / 'data' / 'cub' / 'uncropped_data_dicts.pth', 'w'
    ).close()  # prepared: no data_utils.py step
    status, out, err = script(
        'reproduce',
        '--data_path',
        'data',
        '--dry_run',
        '--backbones',
        'vit_small_dino,timm/resnet18',
        cwd=tmp_path,
    )
    assert status == 0, err
    commands = [line.split() for line in out.splitlines()]
    assert [argv[argv.index('--backbone_type') + 1] for argv in commands] == [
        'vit_small_dino',
        'timm/resnet18',
    ]
    status, _, err = script(
        'reproduce',
        '--data_path',
        'data',
        '--dry_run',
        '--backbones',
        'resnet50,vit_tiny',
        cwd=tmp_path,
    )
    assert 'unknown --backbone_type vit_tiny' in error_sentence(status, err)
    status, _, err = script(
        'reproduce', '--table', '--backbones', 'resnet50,timm/resnet18', cwd=tmp_path
    )
    assert status == 0, err
    text = (tmp_path / 'results' / 'benchmarks.md').read_text()
    assert '| ResNet50 |' in text and '| timm/resnet18 |' in text and 'GoogLeNet' not in text


# ----------------------------------------------------------------------------------------------------------------------
# weights: never downloaded here


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache in tmp_path, the hub unreachable, and any download attempted while huggingface_hub
    is not in its offline mode failing the test (so no test can try the network)."""
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(model_module, 'hub_reachable', lambda: False)
    download = timm.models._hub.hf_hub_download

    def offline_only(*args, **kwargs):
        assert constants.HF_HUB_OFFLINE, 'a download was attempted outside offline mode'
        return download(*args, **kwargs)

    monkeypatch.setattr(timm.models._hub, 'hf_hub_download', offline_only)
    return tmp_path / 'hub'


def test_missing_weights_are_one_sentence(script, tmp_path, prepared, hub_cache):
    status, _, err = script(
        'train',
        '--data_path',
        prepared,
        '--data_name',
        'cub',
        '--backbone_type',
        'vit_small_dino',
        '--feature_dim',
        '8',
        '--batch_size',
        '4',
        '--num_workers',
        '0',
        cwd=tmp_path,
    )
    sentence = error_sentence(status, err)
    assert (
        'the pretrained weights of vit_small_dino (timm model vit_small_patch16_224.dino) are not in'
        in sentence
    )
    assert f'{hub_cache}/models--timm--vit_small_patch16_224.dino' in sentence
    assert f'HF_HOME ({constants.HF_HOME})' in sentence and '--no_pretrained' in sentence
    assert constants.HF_HUB_OFFLINE is False  # offline mode lasts only while the weights load


def test_a_model_without_weights_is_one_sentence(hub_cache):
    with pytest.raises(
        UserError, match='timm has no pretrained weights for coatnet_0_224; .* --no_pretrained'
    ):
        Model('timm/coatnet_0_224', 8, 3, pretrained=True)


def test_cached_weights_load_offline_with_the_position_embeddings_resized(hub_cache):
    """DINOv2's weights as the hub serves them (518-pixel grid), put in the cache by hand, load without network."""
    torch.manual_seed(3)
    published = timm.create_model('vit_small_patch14_dinov2.lvd142m', num_classes=0).state_dict()
    assert published['pos_embed'].shape == (1, 1 + 37 * 37, 384)
    repo, commit = hub_cache / 'models--timm--vit_small_patch14_dinov2.lvd142m', 'a' * 40
    os.makedirs(repo / 'snapshots' / commit)
    os.makedirs(repo / 'refs')
    (repo / 'refs' / 'main').write_text(commit)
    safetensors.torch.save_file(published, str(repo / 'snapshots' / commit / 'model.safetensors'))

    loaded = Model('dinov2_small', 8, 3, pretrained=True).backbone.state_dict()
    assert loaded.keys() == published.keys()
    for name in published:
        if name != 'pos_embed':
            assert torch.equal(loaded[name], published[name]), name
    assert loaded['pos_embed'].shape == (1, 1 + 16 * 16, 384)
    assert torch.equal(loaded['pos_embed'][:, 0], published['pos_embed'][:, 0])  # the class token's
    assert torch.allclose(
        loaded['pos_embed'],
        resample_abs_pos_embed(published['pos_embed'], (16, 16), num_prefix_tokens=1),
    )


def test_hub_reachable(monkeypatch):
    def fail(error):
        def urlopen(*args, **kwargs):
            raise error

        return urlopen

    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(
        model_module.urllib.request, 'urlopen', fail(urllib.error.URLError('no network'))
    )
    assert model_module.hub_reachable() is False
    monkeypatch.setattr(model_module.urllib.request, 'urlopen', fail(TimeoutError()))
    assert model_module.hub_reachable() is False
    monkeypatch.setattr(
        model_module.urllib.request,
        'urlopen',
        fail(urllib.error.HTTPError(constants.ENDPOINT, 503, 'busy', {}, None)),
    )
    assert model_module.hub_reachable() is True  # it answered
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)  # HF_HUB_OFFLINE=1: not even asked
    monkeypatch.setattr(model_module.urllib.request, 'urlopen', fail(AssertionError('asked')))
    assert model_module.hub_reachable() is False


# ----------------------------------------------------------------------------------------------------------------------
# end to end


def test_vit_small_dino_trains_resumes_and_retrieves(script, tmp_path, prepared):
    """train.py --no_pretrained with vit_small_dino: an epoch of warm-up, then --resume for a second, then test.py on
    its data base, for a data base image and for an outside one."""
    prefix = 'cub_vit_small_dino_proxy_anchor_8_no_pretrained_batch_size4_warm_up1'
    flags = [
        '--data_path',
        prepared,
        '--data_name',
        'cub',
        '--backbone_type',
        'vit_small_dino',
        '--no_pretrained',
        '--feature_dim',
        '8',
        '--batch_size',
        '4',
        '--warm_up',
        '1',
        '--num_workers',
        '0',
    ]
    status, out, err = script('train', *flags, '--num_epochs', '1', cwd=tmp_path)
    assert status == 0, err
    status, out, err = script('train', *flags, '--num_epochs', '2', '--resume', cwd=tmp_path)
    assert status == 0, err
    assert f'resuming results/{prefix}_checkpoint.pth after epoch 1' in out
    frame = pd.read_csv(tmp_path / 'results' / f'{prefix}_statistics.csv', index_col='epoch')
    assert list(frame.index) == [1, 2] and np.isfinite(frame.values).all()
    data_base = torch.load(tmp_path / 'results' / f'{prefix}_2_data_base.pth', weights_only=True)
    assert data_base['args']['backbone_type'] == 'vit_small_dino'
    assert data_base['test_features'].shape == (8, 8)

    query = data_base['test_images'][0]
    status, out, err = script(
        'test',
        '--data_base',
        f'{prefix}_2_data_base.pth',
        '--query_img_name',
        query,
        '--retrieval_num',
        '3',
        cwd=tmp_path,
    )
    assert status == 0, err
    assert 'nearest images' in out
    assert (
        query_folder(tmp_path / 'results', os.path.basename(query)[:-4]) / 'retrieval.png'
    ).exists()

    photo = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(
        photo
    )
    status, out, err = script(
        'test',
        '--data_base',
        f'{prefix}_2_data_base.pth',
        '--query_img_name',
        photo,
        '--retrieval_num',
        '8',
        cwd=tmp_path,
    )
    assert status == 0, err
    # test.py rebuilt the ViT from the data base's flags: its similarities are the saved model's
    folder = query_folder(tmp_path / 'results', 'photo')
    written = sorted(
        float(name.split('_')[3][:-4])
        for name in os.listdir(folder)
        if name.startswith('retrieval_img_')
    )
    net = Model('vit_small_dino', 8, data_base['proxies'].size(0), pretrained=False).eval()
    net.load_state_dict(
        torch.load(tmp_path / 'results' / f'{prefix}_2_model.pth', weights_only=True)
    )
    with torch.inference_mode():
        embedding = net.embed(utils.test_transform()(utils.read_image(str(photo)))[None])[0]
    expected = sorted((F.normalize(data_base['test_features'], dim=-1) @ embedding).tolist())
    assert np.allclose(written, expected, atol=1e-4)
