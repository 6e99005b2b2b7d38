"""The golden run: with no new flag, train.py computes the seed's recipe, on any CPU, and the same
command gives the same numbers.

Figures stored from one CPU cannot pin a training run: float kernels differ in their last bits
between CPUs, and training amplifies that. So the recipe is pinned against an independent
re-implementation of the seed's training loop, run beside train.py in the same process in float64,
where those last bits stay far below the tolerance; and "same command, same numbers" is pinned by
runs compared with each other on this machine.
"""

import contextlib
import os
import random
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision
from adamp import AdamP
from pytorch_metric_learning.losses import ProxyAnchorLoss as PMLProxyAnchorLoss
from torch import nn
from torch.utils.data import DataLoader

from conftest import ROOT, make_cub
from utils import ImageReader, retrieval_metrics

# 4 classes x 4 CUB-layout images at 48-pixel crops (8 training images in batches of 3: the last one
# is partial)
DEFAULT_RUN = [
    '--data_name',
    'cub',
    '--backbone_type',
    'googlenet',
    '--no_pretrained',
    '--feature_dim',
    '8',
    '--batch_size',
    '3',
    '--num_epochs',
    '3',
    '--warm_up',
    '1',
    '--num_workers',
    '0',
]
PREFIX = 'cub_googlenet_proxy_anchor_8_no_pretrained_batch_size3_warm_up1'
EPOCHS, WARM_UP, BATCH, FEATURE_DIM, SEED = 3, 1, 3, 8, 1
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope='module')
def data_path(tmp_path_factory):
    """The prepared fixture data set; its path."""
    import data_utils

    path = str(tmp_path_factory.mktemp('data'))
    make_cub(path, num_classes=4, per_class=4)
    data_utils.prepare(path, 'cub', workers=1)
    return path


@contextlib.contextmanager
def settings(dtype):
    """48-pixel crops, PyTorch's own CPU convolutions (oneDNN's first call per shape costs seconds),
    one thread (on so small a problem a second one mostly waits, more so on a loaded machine) and
    `dtype` as the default float type inside the block; the caller's settings are put back after
    it."""
    import utils

    previous = torch.get_default_dtype(), torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch, torch.backends.mkldnn.flags(enabled=False):
        patch.setattr(utils, 'IMAGE_SIZE', 48)
        patch.setattr(utils, 'RESIZE_SIZE', 55)
        torch.set_default_dtype(dtype)
        torch.set_num_threads(1)
        try:
            yield patch
        finally:
            torch.set_default_dtype(previous[0])
            torch.set_num_threads(previous[1])


def default_run(folder, data_path, dtype=torch.float32, small=False):
    """train.py's main() in this process, in `folder`, on the fixture under settings(dtype), with
    --image_size 64 if small (a check that needs no recipe figure: 12 times less arithmetic);
    returns the statistics table."""
    from script_runner import load_script

    size = ['--image_size', '64'] if small else []
    with settings(dtype) as patch:
        patch.setattr(sys, 'argv', ['train.py', '--data_path', data_path, *DEFAULT_RUN, *size])
        patch.chdir(folder)
        load_script('train').main()
    prefix = PREFIX.replace('_8_', '_8_image_size64_') if small else PREFIX
    return pd.read_csv(
        os.path.join(folder, 'results', f'{prefix}_statistics.csv'), index_col='epoch'
    )


# ----------------------------------------------------------------------------------------------------------------------
# the seed's training loop, written again from its description: nothing of train.py or model.py


class Reference(nn.Module):
    """torchvision GoogLeNet, max-pooled, then layer norm, a bias-free linear layer and L2 norm."""

    def __init__(self, num_classes):
        super().__init__()
        # built in train.py's order, so that the seeded generator gives both the same initial
        # weights
        self.net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
        self.net.avgpool, self.net.fc = (
            nn.AdaptiveMaxPool2d(1),
            nn.Identity(),
        )  # its Dropout(0.2) stays
        self.embedding = nn.Linear(1024, FEATURE_DIM, bias=False)
        self.initial_proxies = F.normalize(torch.randn(num_classes, FEATURE_DIM), dim=-1)

    def forward(self, images):
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = (images.to(torch.get_default_dtype()) / 255 - mean) / std
        features = F.layer_norm(self.net(x), (1024,))
        return F.normalize(self.embedding(features), dim=-1)


def reference_run(data_path):
    """The seed's recipe on the fixture: AdamP at 1e-4 (1e-2 for the proxies), halved every 5
    epochs; the backbone frozen for the warm-up epochs; BatchNorm in training mode (random weights);
    Proxy-Anchor (scale 32, margin 0.1) as pytorch-metric-learning computes it; the last partial
    batch trained. The batches are train.py's: the epoch's randperm seeded with seed + epoch, each
    image augmented from (seed, epoch, index). Returns per epoch the loss, accuracy, test features
    and training-pass features, and the weights at the end."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    train_data = ImageReader(data_path, 'cub', 'train', seed=SEED)
    test_data = ImageReader(data_path, 'cub', 'test')
    num_classes = train_data.num_classes
    net = Reference(num_classes)
    after_init = torch.get_rng_state()
    loss_function = PMLProxyAnchorLoss(
        num_classes, FEATURE_DIM, margin=0.1, alpha=32
    )  # draws its own proxies
    loss_function.proxies.data.copy_(net.initial_proxies)
    torch.set_rng_state(after_init)  # so that the dropout masks are train.py's
    optimizer = AdamP(
        [
            {'params': list(net.net.parameters()) + list(net.embedding.parameters())},
            {'params': loss_function.parameters(), 'lr': 1e-2},
        ],
        lr=1e-4,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    labels_of = torch.tensor(train_data.labels)
    epochs = []
    for epoch in range(1, EPOCHS + 1):
        for parameter in net.net.parameters():
            parameter.requires_grad_(epoch > WARM_UP)
        net.train()
        order = torch.randperm(
            len(train_data), generator=torch.Generator().manual_seed(SEED + epoch)
        ).tolist()
        total_loss, correct = 0.0, 0
        features = torch.zeros(len(train_data), FEATURE_DIM)
        for start in range(0, len(order), BATCH):
            batch = order[start : start + BATCH]
            images = torch.stack([train_data[(index, epoch)][0] for index in batch])
            labels = labels_of[batch]
            embeddings = net(images)
            loss = loss_function(embeddings, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            cosines = embeddings.detach() @ F.normalize(loss_function.proxies.detach(), dim=-1).T
            total_loss += loss.item() * len(batch)
            correct += (cosines.argmax(1) == labels).sum().item()
            features[batch] = embeddings.detach()
        scheduler.step()
        net.eval()
        # a loader without a generator draws its seed from the global one, as train.py's
        with torch.no_grad():
            test_features = torch.cat(
                [net(images) for images, _ in DataLoader(test_data, 2 * BATCH)]
            )
        epochs.append(
            {
                'loss': total_loss / len(train_data),
                'accuracy': correct / len(train_data),
                'test_features': test_features,
                'train_features': features,
            }
        )
    weights = {
        'embedding': net.embedding.weight.detach(),
        'proxies': loss_function.proxies.detach(),
        **{name: value.detach() for name, value in net.net.state_dict().items()},
    }
    return epochs, torch.tensor(test_data.labels), weights


def test_defaults_compute_the_seed_recipe(data_path, tmp_path):
    """train.py with no new flag, in float64, against the independent loop above: the same losses,
    accuracies, test metrics, data base and weights, every epoch, within float64's last bits as
    training amplifies them.
    """
    frame = default_run(str(tmp_path), data_path, torch.float64)
    with settings(torch.float64):
        epochs, test_labels, weights = reference_run(data_path)
    assert list(frame.index) == [1, 2, 3]
    # float64 rounding, some 1e-16, grows about a thousandfold an epoch here (measured: 1e-14,
    # 3e-11, 6e-9 on an Intel Xeon); a change of recipe moves the loss by far more than these
    # bounds, from epoch 1 on
    for actual, expected, bound in zip(frame['train_loss'], epochs, (1e-11, 1e-8, 1e-5)):
        assert actual == pytest.approx(expected['loss'], rel=bound)
    assert frame['train_accuracy'].tolist() == [e['accuracy'] for e in epochs]
    for epoch, expected in zip(frame.index, epochs):
        metrics = retrieval_metrics(expected['test_features'].float(), test_labels, [1, 2, 4, 8])
        assert frame.loc[epoch].filter(like='test_').tolist() == pytest.approx(
            [
                metrics[column[len('test_') :]]
                for column in frame.columns
                if column.startswith('test_')
            ],
            abs=1e-12,
        )
    # the last epoch's outputs; the features are stored in float32. The weights agree within 1e-7
    # (measured: 1.4e-9 at most), a thousandth of one step's update at the learning rate of 1e-4
    results = tmp_path / 'results'
    data_base = torch.load(results / f'{PREFIX}_3_data_base.pth', weights_only=True)
    assert torch.allclose(
        data_base['test_features'].double(), epochs[-1]['test_features'], atol=1e-6, rtol=0
    )
    assert torch.allclose(
        data_base['train_features'].double(), epochs[-1]['train_features'], atol=1e-6, rtol=0
    )
    assert torch.allclose(
        data_base['proxies'], F.normalize(weights['proxies'], dim=-1), atol=1e-7, rtol=0
    )
    model = torch.load(results / f'{PREFIX}_3_model.pth', weights_only=True)
    assert torch.allclose(model['embedding.weight'], weights['embedding'], atol=1e-7, rtol=0)
    backbone = {
        name[len('backbone.') :]: value
        for name, value in model.items()
        if name.startswith('backbone.')
    }
    assert backbone.keys() == {name for name in weights if name not in ('embedding', 'proxies')}
    for name, value in backbone.items():
        assert torch.allclose(value.double(), weights[name].double(), atol=1e-7, rtol=0), name
    assert sorted(os.listdir(results)) == sorted(
        f'{PREFIX}_{name}'
        for name in (
            '3_data_base.pth',
            '3_model.pth',
            'checkpoint.pth',
            'statistics.csv',
            'statistics.png',
        )
    )  # the seed's output names, and the run lock is gone


def test_a_run_in_this_process_equals_a_fresh_process(data_path, tmp_path):
    """Whatever ran before it in this pytest process, an in-process run of train.py computes exactly
    what the same run computes in a process of its own, and so does a second one: nothing leaks into
    a run."""
    runs = []
    for name in ('first', 'second'):
        (tmp_path / name).mkdir()
        runs.append(default_run(str(tmp_path / name), data_path, small=True))
    (tmp_path / 'fresh').mkdir()
    code = (
        f'import sys; sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "tests")!r}]\n'
        f'from test_golden_run import default_run\n'
        f'default_run({str(tmp_path / "fresh")!r}, {data_path!r}, small=True).to_csv(sys.argv[1])\n'
    )
    subprocess.run([sys.executable, '-c', code, str(tmp_path / 'fresh.csv')], check=True,
                   capture_output=True)
    fresh = pd.read_csv(tmp_path / 'fresh.csv', index_col='epoch')
    pd.testing.assert_frame_equal(runs[0], fresh, check_exact=True)
    pd.testing.assert_frame_equal(runs[1], fresh, check_exact=True)


def test_the_same_command_twice_at_once_gives_the_same_numbers(data_path, tmp_path):
    """`python train.py ...` started twice at once, in two folders, on a machine they share: the two
    statistics CSVs are identical, byte for byte, and so are the data bases' features."""
    command = [
        sys.executable,
        os.path.join(ROOT, 'train.py'),
        '--data_path',
        data_path,
        *DEFAULT_RUN[:-6],
        '--num_epochs',
        '2',
        '--warm_up',
        '1',
        '--num_workers',
        '0',
        '--image_size',
        '64',
    ]
    env = dict(os.environ, OMP_NUM_THREADS='1')  # two processes on two cores: one thread each
    processes = []
    for name in ('a', 'b'):
        (tmp_path / name).mkdir()
        processes.append(
            subprocess.Popen(
                command,
                cwd=tmp_path / name,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]
    results = [tmp_path / name / 'results' for name in ('a', 'b')]
    prefix = PREFIX.replace('_8_', '_8_image_size64_')
    csv = [(folder / f'{prefix}_statistics.csv').read_bytes() for folder in results]
    assert csv[0] == csv[1] and len(csv[0].splitlines()) == 3
    bases = [
        torch.load(folder / f'{prefix}_2_data_base.pth', weights_only=True) for folder in results
    ]
    for key in ('test_features', 'train_features', 'proxies'):
        assert torch.equal(bases[0][key], bases[1][key]), key
