"""train.py's recipe, which the published numbers depend on, each part pinned by a test that fails
without it: the warm-up boundary, BatchNorm statistics, the learning rates of a 20-epoch schedule,
a resume past a learning-rate step, resume refusals, the last partial batch, the data base's
training features and proxies, GoogLeNet's dropout and cuDNN's settings."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from adamp import AdamP
from torch import nn
from torch.utils.data import DataLoader

import model as model_module
from conftest import TINY
from model import Model
from runs import load_checkpoint
from runtime import safe_load
from script_runner import load_script
from utils import LOSSES, ImageReader, UserError

# the flags that change what a run computes, each with another valid value: --resume must refuse every one
RECIPE_CHANGES = {
    'data_name': 'car',
    'crop_type': 'cropped',
    'backbone_type': 'resnet50',
    'feature_dim': 16,
    'no_pretrained': False,
    'loss_name': 'normalized_softmax',
    'scale': 16.0,
    'margin': 0.2,
    'optimizer': 'adamw',
    'lr': 3e-4,
    'proxy_lr': 1e-3,
    'weight_decay': 1e-4,
    'lr_step': 10,
    'lr_gamma': 0.25,
    'batch_size': 8,
    'warm_up': 3,
    'seed': 2,
    'amp': True,
    'val_fraction': 0.2,
}

pytestmark = pytest.mark.usefixtures('without_onednn')  # see conftest.py: seconds per test saved


def flags(data_path, *extra, epochs=3, warm_up=2, batch_size=4, backbone_type='googlenet'):
    """train.py's flags for a small run (GoogLeNet) on the `prepared` data set (8 training
    images)."""
    return [
        '--data_path',
        data_path,
        '--data_name',
        'cub',
        '--backbone_type',
        backbone_type,
        '--feature_dim',
        8,
        '--batch_size',
        batch_size,
        '--num_epochs',
        epochs,
        '--warm_up',
        warm_up,
        '--num_workers',
        0,
        *extra,
    ]


def changed(epoch, prefix, kind=0):
    """{name: whether it changed during the epoch} for the parameters (kind 0) or BatchNorm statistics (1)."""
    before, after = epoch['before'][kind], epoch['after'][kind]
    return {
        name: not torch.equal(before[name], after[name])
        for name in before
        if name.startswith(prefix)
    }


@pytest.mark.parametrize('pretrained', [True, False], ids=['pretrained', 'no_pretrained'])
def test_warm_up_boundary_and_batchnorm_statistics(
    prepared, tmp_path, script, recorded, monkeypatch, pretrained, small_crops
):
    """--warm_up 2 of 3 epochs: epochs 1-2 train only the embedding layer and the proxies, epoch 3 every backbone
    parameter as well. The backbone's BatchNorm running statistics never move with pretrained weights (random ones
    stand in for ImageNet's here) and move every epoch under --no_pretrained. cuDNN is left deterministic.
    """
    if pretrained:
        build = model_module.build_backbone
        monkeypatch.setattr(
            model_module,
            'build_backbone',
            lambda backbone_type, _, size: build(backbone_type, False, size),
        )
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    extra = () if pretrained else ('--no_pretrained',)
    status, _, err = script(
        'train', *flags(prepared, *extra, batch_size=8), cwd=tmp_path, watch=recorded
    )
    assert status == 0, err
    assert len(recorded) == 3
    for number, epoch in enumerate(recorded, 1):
        backbone, statistics = changed(epoch, 'backbone.'), changed(epoch, 'backbone.', kind=1)
        assert len(backbone) > 100 and len(statistics) > 100
        assert changed(epoch, 'embedding.') == {'embedding.weight': True}, number
        assert changed(epoch, 'proxies.') == {'proxies.weight': True}, number
        if number <= 2:
            assert not any(backbone.values()), f'epoch {number} of the warm-up changed the backbone'
        else:
            frozen = [name for name, moved in backbone.items() if not moved]
            assert (
                not frozen
            ), f'epoch 3 left {len(frozen)} backbone parameters unchanged, such as {frozen[0]}'
        if pretrained:
            assert not any(
                statistics.values()
            ), f'epoch {number} changed the pretrained BatchNorm statistics'
        else:
            assert all(statistics.values()), f'epoch {number} left BatchNorm statistics unchanged'
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_learning_rates_of_every_epoch_of_the_20_epoch_schedule(
    prepared, tmp_path, script, recorded, quick_runs
):
    """AdamP (betas 0.9/0.999, eps 1e-8, no weight decay) over two groups: the proxies at 1e-2 and
    every other parameter at 1e-4, both halved after every 5 epochs, stepped once per epoch (timm's
    test network: seconds)."""
    flagged = flags(prepared, '--no_pretrained', epochs=20, backbone_type=TINY)
    status, _, err = script('train', *flagged, cwd=tmp_path, watch=recorded)
    assert status == 0, err
    expected = [
        [1e-4 * 0.5 ** ((epoch - 1) // 5), 1e-2 * 0.5 ** ((epoch - 1) // 5)]
        for epoch in range(1, 21)
    ]
    assert len(recorded) == 20
    for epoch, lrs in zip(recorded, expected):
        assert epoch['lrs'] == pytest.approx(lrs, rel=1e-12)
    optimizer, net = recorded[0]['optimizer'], recorded[0]['model']
    assert isinstance(optimizer, AdamP)
    others, proxies = ({id(p) for p in group['params']} for group in optimizer.param_groups)
    assert proxies == {id(net.proxies.weight)}
    assert others == {
        id(p) for name, p in net.named_parameters() if not name.startswith('proxies.')
    }
    for group in optimizer.param_groups:
        assert (
            group['betas'] == (0.9, 0.999) and group['eps'] == 1e-8 and group['weight_decay'] == 0
        )


def test_resume_past_a_learning_rate_step_equals_an_uninterrupted_run(
    prepared, tmp_path, script, recorded, small_crops
):
    """With the learning rates halved every 2 epochs, 4 epochs in one go against 3 epochs then --resume for the
    4th: the 4th epoch runs at the same learning rates, and the run ends with the same scheduler, optimizer state
    and weights."""
    train = load_script('train')
    prefix = 'cub_googlenet_proxy_anchor_8_no_pretrained_lr_step2_batch_size8_warm_up1'
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    one_go = flags(prepared, '--no_pretrained', '--lr_step', 2, epochs=4, warm_up=1, batch_size=8)
    assert script('train', *one_go, cwd=tmp_path / 'a', watch=recorded)[0] == 0
    uninterrupted = [epoch['lrs'] for epoch in recorded]
    assert uninterrupted[2] == pytest.approx([5e-5, 5e-3])  # epoch 3 is past the first step
    recorded.clear()
    assert (
        script(
            'train',
            *flags(prepared, '--no_pretrained', '--lr_step', 2, epochs=3, warm_up=1, batch_size=8),
            cwd=tmp_path / 'b',
            watch=recorded,
        )[0]
        == 0
    )
    status, out, err = script('train', *one_go, '--resume', cwd=tmp_path / 'b', watch=recorded)
    assert status == 0, err
    assert 'after epoch 3' in out
    assert [epoch['lrs'] for epoch in recorded] == uninterrupted
    expected, actual = (
        safe_load(str(tmp_path / run / 'results' / f'{prefix}_checkpoint.pth'))
        for run in ('a', 'b')
    )
    assert actual['epoch'] == expected['epoch'] == 4
    assert actual['scheduler'] == expected['scheduler']
    assert actual['optimizer']['param_groups'] == expected['optimizer']['param_groups']
    assert actual['optimizer']['state'].keys() == expected['optimizer']['state'].keys()
    for key, state in expected['optimizer']['state'].items():
        for name, value in state.items():
            torch.testing.assert_close(
                actual['optimizer']['state'][key][name], value, rtol=1e-5, atol=1e-7
            )
    for name, value in expected['model'].items():
        torch.testing.assert_close(actual['model'][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_refuses_every_recipe_flag_that_differs(tmp_path):
    """A checkpoint resumes only under the flags it was trained with: each recipe flag changed is one refusal
    naming it; the same flags are accepted."""
    train = load_script('train')
    args = train.get_args_parser().parse_args(
        ['--data_name', 'cub', '--backbone_type', 'googlenet', '--no_pretrained']
    )
    path = str(tmp_path / 'checkpoint.pth')
    torch.save(
        {
            'model': {},
            'optimizer': {},
            'scheduler': {},
            'epoch': 1,
            'args': vars(args),
            'rng': {},
            'statistics': {},
        },
        path,
    )
    assert load_checkpoint(path, train.recipe_of(args), args.num_epochs)['epoch'] == 1
    for flag, value in RECIPE_CHANGES.items():
        assert getattr(args, flag) != value
        other = train.get_args_parser().parse_args([])
        vars(other).update(vars(args), **{flag: value})
        with pytest.raises(UserError, match=f'--{flag} '):
            load_checkpoint(path, train.recipe_of(other), other.num_epochs)


@pytest.mark.parametrize(
    'size, batch_size, world', [(8, 4, 1), (8, 3, 1), (10, 4, 2), (11, 4, 2), (7, 6, 3), (5, 4, 4)]
)
def test_global_batches_keep_the_last_partial_batch(size, batch_size, world):
    """Every image once per epoch, in global batches of batch_size and a last partial one (the seed's
    drop_last=False). The ranks take the same number of steps with equal shares, and together see exactly the
    batches one process sees; each epoch has its own order."""
    train = load_script('train')
    single = train.GlobalBatches(size, batch_size, seed=5)
    single.set_epoch(2)
    batches = [[index for index, _, padding in items] for items in single]
    assert not any(padding for items in single for _, _, padding in items)  # one process: none
    assert len(batches) == len(single) == -(-size // batch_size)
    assert sorted(sum(batches, [])) == list(range(size))
    assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    samplers = [train.GlobalBatches(size, batch_size, rank, world, seed=5) for rank in range(world)]
    for sampler in samplers:
        sampler.set_epoch(2)
    per_rank = [list(sampler) for sampler in samplers]
    assert all(len(steps) == len(batches) for steps in per_rank)
    for step, batch in enumerate(batches):
        assert len({len(steps[step]) for steps in per_rank}) == 1  # equal shares
        real = [[index for index, _, padding in steps[step] if not padding] for steps in per_rank]
        assert real == [batch[rank::world] for rank in range(world)]  # rank r: items r, r + W, ...
        for rank in range(world):
            share = per_rank[rank][step]
            assert all(epoch == 2 for _, epoch, _ in share)
            # padding after the real items, at most one, only in a shorter share of a partial batch
            assert [padding for _, _, padding in share] == [False] * len(real[rank]) + [True] * (
                len(share) - len(real[rank])
            )
            assert len(share) - len(real[rank]) <= 1
            assert len(share) == len(real[rank]) or len(batch) < batch_size
    single.set_epoch(3)
    assert [[index for index, _, _ in items] for items in single] != batches


def test_an_epoch_trains_every_image_and_returns_its_training_embeddings(prepared, small_crops):
    """8 images in batches of 3: 3 steps, the last of 2 images. The features returned (the data base's training
    features) are the training pass's own embeddings of the augmented images, in data-set order."""
    train = load_script('train')
    torch.manual_seed(0)
    net = Model('inception', 8, 2, pretrained=False)
    data = ImageReader(prepared, 'cub', 'train', seed=7)
    sampler = train.GlobalBatches(len(data), 3, seed=7)
    sampler.set_epoch(1)
    optimizer = torch.optim.SGD(
        net.parameters(), lr=0.0
    )  # the weights stay, so the embeddings can be recomputed
    steps = []
    optimizer.step = lambda: steps.append(1)
    args = (
        load_script('train').get_args_parser().parse_args(['--feature_dim', '8'])
    )  # pretrained: BatchNorm eval
    loader = DataLoader(train.Marked(data), batch_sampler=sampler)
    stats, features = train.train_one_epoch(
        net,
        loader,
        LOSSES['proxy_anchor'].build(),
        True,
        optimizer,
        torch.device('cpu'),
        1,
        args,
        0,
    )
    assert len(steps) == 3 and features.shape == (8, 8)
    net.train()
    for module in net.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    with torch.no_grad():
        expected = net.embed(torch.stack([data[(index, 1)][0] for index in range(8)]))
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    assert 0 <= stats['accuracy'] <= 1


def test_data_base_holds_the_normalised_proxies_and_the_training_pass_features(
    prepared, tmp_path, script, recorded, small_crops
):
    """What the seed stores: the proxies L2-normalised, and as training features those of the last epoch's pass."""
    train = load_script('train')
    assert (
        script(
            'train',
            *flags(prepared, '--no_pretrained', epochs=1, warm_up=0),
            cwd=tmp_path,
            watch=recorded,
        )[0]
        == 0
    )
    prefix = (
        tmp_path / 'results' / 'cub_googlenet_proxy_anchor_8_no_pretrained_batch_size4_warm_up0'
    )
    data_base = safe_load(f'{prefix}_1_data_base.pth')
    weights = safe_load(f'{prefix}_1_model.pth')
    torch.testing.assert_close(data_base['proxies'], F.normalize(weights['proxies.weight'], dim=-1))
    torch.testing.assert_close(data_base['train_features'], recorded[0]['features'])
    assert torch.allclose(data_base['train_features'].norm(dim=1), torch.ones(8), atol=1e-5)


def seed_googlenet(net):
    """The seed's GoogLeNet backbone with the weights of `net`: torchvision GoogLeNet with only its pooling and its
    classifier replaced."""
    backbone = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False)
    backbone.avgpool, backbone.fc = nn.AdaptiveMaxPool2d(1), nn.Identity()
    backbone.load_state_dict(net.backbone.state_dict())
    return backbone


def test_googlenet_keeps_its_dropout_as_the_seed():
    """Train mode: under the same random seed PP's GoogLeNet embeddings equal those of the seed-built backbone
    under the same head, dropout included (they differ without it); eval mode: the same as well."""
    torch.manual_seed(0)
    net = Model('googlenet', 16, 3, pretrained=False)
    seeds = seed_googlenet(net)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    assert isinstance(net.backbone.dropout, nn.Dropout) and net.backbone.dropout.p == 0.2
    ours = {}
    for mode in (True, False):
        net.train(mode)
        seeds.train(mode)
        with torch.no_grad():
            torch.manual_seed(1)
            ours[mode] = net.embed(images)
            torch.manual_seed(1)
            theirs = F.normalize(net.embedding(net.norm(seeds(net.input_norm(images)))), dim=-1)
        torch.testing.assert_close(ours[mode], theirs, rtol=0, atol=1e-6)
    net.train()
    net.backbone.dropout.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        without_dropout = net.embed(images)
    assert (without_dropout - ours[True]).abs().max() > 1e-2


@pytest.mark.parametrize('amp', [False, True])
def test_cudnn_settings(amp):
    """The published recipe runs cuDNN deterministically without autotuning, as the seed; --amp autotunes."""
    load_script('train').set_kernels(amp)
    assert torch.backends.cudnn.deterministic is (not amp) and torch.backends.cudnn.benchmark is amp
    load_script('train').set_kernels(False)
