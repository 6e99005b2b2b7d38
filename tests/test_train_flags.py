"""train.py's flags: each recipe flag reaches what it controls, names the run off its default
and is checked on --resume; run names; --val_fraction's validation split; one process per run
name."""

import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch
from adamp import AdamP
from PIL import Image

from conftest import TINY, prepared_cub
from script_runner import error_sentence, load_script
from utils import LOSSES, ImageReader, ProxyAnchorLoss

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PREFIX = 'cub_timm-test_resnet_proxy_anchor_8_no_pretrained_batch_size4'

pytestmark = pytest.mark.usefixtures('without_onednn')  # see conftest.py: seconds per test saved


@pytest.mark.parametrize(
    'optimizer, kind, extra',
    [
        ('adamp', AdamP, {}),
        ('adamw', torch.optim.AdamW, {}),
        ('sgd', torch.optim.SGD, {'momentum': 0.9}),
    ],
)
def test_each_flag_reaches_what_it_controls(
    prepared, tmp_path, script, recorded, quick_runs, optimizer, kind, extra
):
    """--optimizer, --lr, --proxy_lr, --weight_decay, --lr_step, --lr_gamma, --scale and --margin reach the optimizer
    train.py steps, its schedule and the loss it minimises."""
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
        7,
        '--warm_up',
        0,
        '--num_workers',
        0,
        '--optimizer',
        optimizer,
        '--lr',
        3e-4,
        '--proxy_lr',
        2e-3,
        '--weight_decay',
        1e-4,
        '--lr_step',
        3,
        '--lr_gamma',
        0.25,
        '--scale',
        16,
        '--margin',
        0.2,
        cwd=tmp_path,
        watch=recorded,
    )
    assert status == 0, err
    chosen = recorded[0]['optimizer']
    assert type(chosen) is kind or (kind is AdamP and isinstance(chosen, AdamP))
    for group in chosen.param_groups:
        assert group['weight_decay'] == 1e-4
        assert all(group[key] == value for key, value in extra.items())
    steps = [1, 1, 1, 0.25, 0.25, 0.25, 0.0625]
    assert len(recorded) == len(steps)
    for epoch, factor in zip(recorded, steps):
        assert epoch['lrs'] == pytest.approx([3e-4 * factor, 2e-3 * factor], rel=1e-12)
    (loss,) = {
        id(epoch['loss']): epoch['loss'] for epoch in recorded
    }.values()  # one, for all epochs
    assert isinstance(loss, ProxyAnchorLoss) and (loss.scale, loss.margin) == (16, 0.2)


def test_normalized_softmax_takes_the_scale(tmp_path):
    """--scale reaches Normalized-Softmax too: its loss is cross-entropy over scale x cosines."""
    train = load_script('train')
    args = train.get_args_parser().parse_args(['--loss_name', 'normalized_softmax', '--scale', '8'])
    loss = train.make_loss(LOSSES['normalized_softmax'], args)
    cosines, labels = torch.tensor([[0.5, -0.2, 0.1]]), torch.tensor([0])
    assert loss(cosines, labels).item() == pytest.approx(
        torch.nn.functional.cross_entropy(8 * cosines, labels).item()
    )


# every flag that names a run, with values off its default (a switch: none); the whole recipe but the name's base
OFF_DEFAULT = {
    'crop_type': [['cropped']],
    'no_pretrained': [[]],
    'scale': [['16'], ['64'], ['32.5']],
    'margin': [['0.2'], ['0'], ['0.15']],
    'optimizer': [['adamw'], ['sgd']],
    'lr': [['3e-4'], ['1e-5'], ['0.00012345678'], ['0.000123456789']],
    'proxy_lr': [['1e-3'], ['0.1']],
    'weight_decay': [['1e-4'], ['0.05']],
    'lr_step': [['10'], ['20']],
    'lr_gamma': [['0.25'], ['1']],
    'batch_size': [['32'], ['128']],
    'warm_up': [['0'], ['5']],
    'seed': [['2'], ['3'], ['12']],
    'amp': [[]],
    'val_fraction': [['0.2'], ['0.25']],
    'images_per_class': [['4'], ['2']],
    'loss_args': [['margin=0.2'], ['margin=0.2,swap=True']],
    'xbm_size': [['1024']],
    'xbm_start': [['1000']],
    'image_size': [['256'], ['64']],
}
# the baseline losses' hyper-parameters (docs/losses.md's table): one value off its default each
OFF_DEFAULT.update(
    {
        'proxy_nca_scale': [['16']],
        'soft_triple_centers': [['5']],
        'soft_triple_la': [['10']],
        'soft_triple_gamma': [['0.2']],
        'soft_triple_margin': [['0.02']],
        'arcface_margin': [['30']],
        'arcface_scale': [['32']],
        'cosface_margin': [['0.4']],
        'cosface_scale': [['32']],
        'ms_alpha': [['1']],
        'ms_beta': [['40']],
        'ms_base': [['0.6']],
        'ms_epsilon': [['0.2']],
        'triplet_margin': [['0.2']],
        'contrastive_pos_margin': [['0.1']],
        'contrastive_neg_margin': [['0.6']],
        'circle_m': [['0.25']],
        'circle_gamma': [['256']],
        'supcon_temperature': [['0.2']],
    }
)
# the flags that name a run in the order of --help (docs/training.md's table), which their parts
# of a run's name follow
NAMED_IN_HELP_ORDER = [
    'crop_type',
    'image_size',
    'no_pretrained',
    'loss_args',
    'scale',
    'margin',
    'proxy_nca_scale',
    'soft_triple_centers',
    'soft_triple_la',
    'soft_triple_gamma',
    'soft_triple_margin',
    'arcface_margin',
    'arcface_scale',
    'cosface_margin',
    'cosface_scale',
    'ms_alpha',
    'ms_beta',
    'ms_base',
    'ms_epsilon',
    'triplet_margin',
    'contrastive_pos_margin',
    'contrastive_neg_margin',
    'circle_m',
    'circle_gamma',
    'supcon_temperature',
    'xbm_size',
    'xbm_start',
    'optimizer',
    'lr',
    'proxy_lr',
    'weight_decay',
    'lr_step',
    'lr_gamma',
    'batch_size',
    'images_per_class',
    'warm_up',
    'seed',
    'amp',
    'val_fraction',
]


def test_every_recipe_flag_is_checked_on_resume_and_all_but_the_base_name_the_run():
    """One list: the recipe flags are the name's base (data, backbone, loss, dimension) and the flags that name a
    run, --num_epochs (raised to continue a run) and the running flags are neither."""
    train = load_script('train')
    named = train.flags_of(train.get_args_parser(), train.NAMED)
    recipe = train.flags_of(train.get_args_parser(), train.BASE, train.NAMED)
    assert set(named) == set(OFF_DEFAULT)
    assert list(named) == NAMED_IN_HELP_ORDER
    assert set(recipe) == set(OFF_DEFAULT) | {
        'data_name',
        'backbone_type',
        'feature_dim',
        'loss_name',
    }
    assert not {
        'num_epochs',
        'num_workers',
        'resume',
        'recalls',
        'run_name',
        'data_path',
        'cache_images',
    } & set(recipe)


def names_of(variants):
    """{variant: run name} for lists of train.py flags added to one base configuration."""
    train = load_script('train')
    base = ['--data_name', 'cub', '--backbone_type', 'resnet50']
    return {
        tuple(v): train.prefix_of(train.get_args_parser().parse_args(base + list(v)))
        for v in variants
    }


def test_run_names_follow_the_flags_and_never_collide():
    """Defaults keep the seed's name; each named flag off its default appends _<flag><value> in --help's order;
    --run_name comes last; no two of many different settings share a name."""
    names = names_of(
        [
            [],
            ['--margin', '0.2', '--seed', '2'],
            ['--seed', '2', '--margin', '0.2'],
            ['--lr', '0.0001', '--seed', '1'],
        ]
    )
    assert names[()] == 'cub_resnet50_proxy_anchor_512'
    assert (
        names[('--margin', '0.2', '--seed', '2')] == 'cub_resnet50_proxy_anchor_512_margin0.2_seed2'
    )
    assert (
        names[('--seed', '2', '--margin', '0.2')] == 'cub_resnet50_proxy_anchor_512_margin0.2_seed2'
    )
    assert (
        names[('--lr', '0.0001', '--seed', '1')] == 'cub_resnet50_proxy_anchor_512'
    )  # the defaults, spelt out
    shuffled = [
        '--seed',
        '2',
        '--lr',
        '3e-4',
        '--ms_beta',
        '40',
        '--crop_type',
        'cropped',
        '--run_name',
        'x',
    ]
    assert (
        names_of([shuffled])[tuple(shuffled)]
        == 'cub_resnet50_proxy_anchor_512_crop_typecropped_ms_beta40_lr0.0003_seed2_x'
    )
    singles = [[f'--{flag}', *value] for flag, options in OFF_DEFAULT.items() for value in options]
    pairs = [a + b for a in singles for b in singles if a[0] < b[0]]
    named = [v + ['--run_name', text] for v in singles[:12] for text in ('a', 'b', 'x2')]
    variants = [[]] + singles + pairs + named
    names = names_of(variants)
    assert len(set(names.values())) == len(variants)
    assert names[('--lr', '3e-4')].endswith('_lr0.0003') and names[('--scale', '64')].endswith(
        '_scale64'
    )
    assert names[('--optimizer', 'sgd', '--run_name', 'x2')].endswith('_optimizersgd_x2')
    assert names[('--lr', '0.00012345678')] != names[('--lr', '0.000123456789')]
    # the flags that once changed what a run computes but not its name
    assert names[('--no_pretrained',)] == 'cub_resnet50_proxy_anchor_512_no_pretrained'
    assert (
        names[('--amp', '--batch_size', '32')] == 'cub_resnet50_proxy_anchor_512_batch_size32_amp'
    )
    assert (
        names[('--crop_type', 'cropped', '--warm_up', '0')]
        == 'cub_resnet50_proxy_anchor_512_crop_typecropped_warm_up0'
    )


def test_a_run_named_before_every_recipe_flag_named_runs_is_told_how_to_rename(
    prepared, tmp_path, script
):
    """A --no_pretrained run's checkpoint under its old name (the default's): --resume says how to rename its files,
    and the command it gives makes the run resume."""
    run = [
        '--data_path',
        prepared,
        '--data_name',
        'cub',
        '--backbone_type',
        'googlenet',
        '--no_pretrained',
        '--feature_dim',
        8,
        '--batch_size',
        4,
        '--warm_up',
        1,
        '--num_workers',
        0,
    ]
    assert script('train', *run, '--num_epochs', 1, cwd=tmp_path)[0] == 0
    new = 'cub_googlenet_proxy_anchor_8_no_pretrained_batch_size4_warm_up1'
    old = 'cub_googlenet_proxy_anchor_8'
    for path in (tmp_path / 'results').iterdir():
        path.rename(path.with_name(path.name.replace(new, old)))
    status, _, err = script('train', *run, '--num_epochs', 2, '--resume', cwd=tmp_path)
    line = error_sentence(status, err)
    assert f'this run was written as {old} before every recipe flag named runs' in line
    command = line.split('rename its files: ')[1]
    subprocess.run(['bash', '-c', command], cwd=tmp_path, check=True)
    status, out, err = script('train', *run, '--num_epochs', 2, '--resume', cwd=tmp_path)
    assert status == 0, err
    assert f'resuming results/{new}_checkpoint.pth after epoch 1' in out


@pytest.fixture(scope='module')
def eight_classes(tmp_path_factory):
    """A prepared CUB-layout data set of 8 classes x 3 images: 4 training classes, 4 test classes."""
    return prepared_cub(tmp_path_factory, num_classes=8, per_class=3)


def test_validation_split_holds_out_the_last_training_classes(
    eight_classes, tmp_path, script, small_crops
):
    """--val_fraction 0.5: classes 3-4 of the 4 training classes are held out, proxies cover classes 1-2 only, and
    every epoch reports validation metrics beside the test ones, in the CSV and the figure."""
    train = load_script('train')
    args = train.get_args_parser().parse_args(
        ['--data_path', eight_classes, '--data_name', 'cub', '--val_fraction', '0.5']
    )
    train_data = ImageReader(eight_classes, 'cub', 'train')
    val_data = train.hold_out(train_data, args)
    assert train_data.num_classes == val_data.num_classes == 2
    assert (
        all('/Bird_1_' in p or '/Bird_2_' in p for p in train_data.images) and len(train_data) == 6
    )
    assert all('/Bird_3_' in p or '/Bird_4_' in p for p in val_data.images) and len(val_data) == 6
    assert val_data.labels == [0, 0, 0, 1, 1, 1]

    status, out, err = script(
        'train',
        '--data_path',
        eight_classes,
        '--data_name',
        'cub',
        '--backbone_type',
        'googlenet',
        '--no_pretrained',
        '--feature_dim',
        8,
        '--batch_size',
        4,
        '--num_epochs',
        2,
        '--warm_up',
        1,
        '--num_workers',
        0,
        '--val_fraction',
        0.5,
        cwd=tmp_path,
    )
    assert status == 0, err
    assert 'Val Epoch 2/2 R@1:' in out and 'Test Epoch 2/2 R@1:' in out
    prefix = 'cub_googlenet_proxy_anchor_8_no_pretrained_batch_size4_warm_up1_val_fraction0.5'
    frame = pd.read_csv(tmp_path / 'results' / f'{prefix}_statistics.csv', index_col='epoch')
    metrics = [f'recall@{k}' for k in (1, 2, 4, 8)] + ['map@r', 'r_precision']
    assert list(frame.columns) == ['train_loss', 'train_accuracy'] + [
        f'test_{m}' for m in metrics
    ] + [f'val_{m}' for m in metrics]
    validation = frame.filter(like='val_')
    assert frame.notna().all().all() and ((validation >= 0) & (validation <= 1)).all().all()
    data_base = torch.load(tmp_path / 'results' / f'{prefix}_2_data_base.pth', weights_only=True)
    assert data_base['proxies'].shape == (2, 8) and len(data_base['train_images']) == 6
    weights = torch.load(tmp_path / 'results' / f'{prefix}_2_model.pth', weights_only=True)
    assert weights['proxies.weight'].shape == (2, 8)
    with Image.open(tmp_path / 'results' / f'{prefix}_statistics.png') as figure:
        assert figure.width > 1.4 * figure.height  # three panels: training, test, validation


def test_a_second_process_under_the_same_name_is_refused_until_the_first_dies(
    prepared, tmp_path, script, recorded, quick_runs
):
    """A run whose name another live process holds stops with one sentence naming it; once the holder is killed
    (SIGKILL: the kernel drops its lock), the same command runs, and leaves no lock file behind."""
    lock = tmp_path / 'results' / f'.{DEFAULT_PREFIX}_seed3.lock'
    lock.parent.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            '-c',
            f'''
import sys, time
sys.path.insert(0, {repr(os.path.dirname(HERE))})
from runtime import RunLock
lock = RunLock({str(lock)!r})
assert lock.acquire() is None
print('locked', flush=True)
time.sleep(600)
''',
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == 'locked'
        run = [
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
            '--seed',
            3,
        ]
        status, _, err = script('train', *run, cwd=tmp_path, watch=recorded)
        line = error_sentence(status, err)
        assert (
            f'another process (pid {holder.pid} on ' in line
            and f'{DEFAULT_PREFIX}_seed3 right now' in line
        )
        assert recorded == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    status, _, err = script('train', *run, cwd=tmp_path, watch=recorded)
    assert status == 0, err
    assert len(recorded) == 1 and not lock.exists()
