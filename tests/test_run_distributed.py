"""DistributedDataParallel on the CPU with gloo: 2 processes compute the single-process loss and
gradients, for the losses on the model's proxies, one with class weights of its own and
pair-based ones on the gathered batch; two single-process "nodes" train one epoch as one process
does."""

import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import train
from conftest import ROOT, Pairs
from model import Model
from utils import LOSSES

WORLD, LOCAL_BATCH, NUM_CLASSES, FEATURE_DIM, SIZE = 2, 4, 5, 16, 64
# the global batch: class 0 only on rank 0, class 3 only on rank 1, class 4 nowhere, so
# Proxy-Anchor's P+ and its positive and negative terms are only right if they are taken over the
# whole batch
LABELS = torch.tensor([0, 0, 1, 2, 2, 3, 3, 1])
EVAL_ITEMS = 7  # odd: the ranks' shards of the test set differ in length
# the model's proxies (2), the loss's own class weights (proxy_nca), mined pairs of the whole batch
DIST_LOSSES = ['proxy_anchor', 'normalized_softmax', 'proxy_nca', 'multi_similarity']
LAST = 3  # a last, partial global batch of 3: one rank gets 2 images, the other 1 and a padding row


# PyTorch's own CPU convolutions: oneDNN's weight gradients are off by up to 1% of the largest one,
# differently for each thread count (the test checks DDP's arithmetic, not oneDNN's), and its first
# call per shape is slow
pytestmark = pytest.mark.usefixtures('without_onednn', 'one_thread')


@pytest.fixture
def one_thread():
    """One thread in this process too, as in the workers: two stall at every barrier on a busy machine."""
    torch.set_num_threads(1)


def free_port():
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def make_model(loss_name='proxy_anchor'):
    """The same randomly initialised GoogLeNet model in every process, in train.py's mode for
    pretrained runs: training mode with the backbone's BatchNorm in eval mode, so each sample's
    output is independent of the batch. Its dropout is switched off too: its random masks would
    differ between one process and two. It has proxies only for a loss on them."""
    torch.manual_seed(0)
    model = Model(
        'googlenet', FEATURE_DIM, NUM_CLASSES if LOSSES[loss_name].cosines else 0, pretrained=False
    )
    model.train()
    for module in model.backbone.modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            module.eval()
    return model


def inputs():
    """(global images (W * B, 3, S, S) uint8, global labels, an evaluation set of (image, label) pairs)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(
        0, 256, (WORLD * LOCAL_BATCH, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator
    )
    evaluation = [
        (torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8, generator=generator), i % 3)
        for i in range(EVAL_ITEMS)
    ]
    return images, LABELS, evaluation


def make_loss(loss_name):
    """The loss as train.py builds it, its own class weights (if any) drawn alike in every process."""
    torch.manual_seed(2)
    args = train.get_args_parser().parse_args(
        ['--loss_name', loss_name, '--feature_dim', str(FEATURE_DIM)]
    )
    return train.make_loss(LOSSES[loss_name], args, NUM_CLASSES)


def step(model, images, labels, loss_name):
    """One train.batch_loss and backward: the loss, gathered labels and the gradients that the test
    compares (the proxies': the model's, or those the loss holds)."""
    loss_criterion = make_loss(loss_name)
    loss, _, cosines, all_labels = train.batch_loss(
        model, images, labels, loss_criterion, LOSSES[loss_name].cosines
    )
    loss.backward()
    net = train.unwrap(model)
    proxies = (
        net.proxies.weight
        if LOSSES[loss_name].cosines
        else next(iter(loss_criterion.parameters()), None)
    )
    results = {
        'loss': loss.detach(),
        'labels': all_labels,
        'embedding': net.embedding.weight.grad.clone(),
        'backbone': net.backbone.conv1.conv.weight.grad.clone(),
    }
    if cosines is not None:
        results['cosines'] = cosines.detach()
    if proxies is not None:
        results['proxies'] = proxies.grad.clone()
    return results


def last_batch(rank):
    """(this rank's images, labels) of the last global batch, as train.py's loader reads them
    from GlobalBatches (the shorter share filled up with a padding row, labelled PADDING), and the
    data-set indices of the rows the ranks gather, padding left out."""
    images, labels, _ = inputs()
    sampler = train.GlobalBatches(LAST, LAST, rank, WORLD, seed=3)
    loader = DataLoader(train.Marked(Pairs(images, labels)), batch_sampler=sampler)
    local_images, local_labels, _ = next(iter(loader))
    order = [
        index
        for r in range(WORLD)
        for index, _, padding in next(iter(train.GlobalBatches(LAST, LAST, r, WORLD, seed=3)))
        if not padding
    ]
    return local_images, local_labels, order


def worker(rank, port, folder):
    """One of the 2 processes: its half of the global batch through DDP, results saved for the parent."""
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = (
        False  # as the without_onednn fixture, in this process of its own
    )
    dist.init_process_group(
        'gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD
    )
    try:
        images, labels, evaluation = inputs()
        part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {}
        for loss_name in DIST_LOSSES:
            model = make_model(loss_name)
            results[loss_name] = step(
                DistributedDataParallel(model), images[part], labels[part], loss_name
            )
            results[f'last {loss_name}'] = step(
                DistributedDataParallel(make_model(loss_name)), *last_batch(rank)[:2], loss_name
            )
        results['features'] = train.embed_split(
            model, evaluation, 2, 0, torch.device('cpu'), False, rank, WORLD
        )
        torch.save(results, os.path.join(folder, f'rank{rank}.pth'))
    finally:
        dist.destroy_process_group()


def assert_close(actual, expected, tolerance=1e-5):
    """Equal within `tolerance` relative to the expected tensor's largest magnitude, which must not be 0."""
    scale = expected.abs().max()
    assert scale > 0
    assert (actual - expected).abs().max() <= tolerance * scale, (
        actual - expected
    ).abs().max() / scale


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
    """Both ranks' results, from one spawn of 2 gloo processes."""
    folder = str(tmp_path_factory.mktemp('ddp'))
    mp.spawn(worker, args=(free_port(), folder), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(folder, f'rank{rank}.pth')) for rank in range(WORLD)]


def assert_same_step(actual, expected, labels):
    """One rank's step equals one process's: labels, loss, cosines and every gradient (the same ones present)."""
    assert torch.equal(actual['labels'], labels)
    assert set(actual) == set(expected)
    assert abs(actual['loss'].item() - expected['loss'].item()) <= 1e-5 * abs(
        expected['loss'].item()
    )
    for name in set(expected) - {'labels', 'loss'}:
        assert_close(actual[name], expected[name])


@pytest.mark.parametrize('loss_name', DIST_LOSSES)
def test_two_processes_equal_one_process_on_the_global_batch(two_processes, loss_name):
    """Loss, proxy gradients (the model's, or the loss's own) and embedding-layer and
    first-convolution gradients of 2 DDP processes on 4 images each equal those of one process on
    all 8 images, within 1e-5, on every rank: a pair-based loss pairs the images of both ranks, and
    the loss's own weights get the same gradient everywhere.
    """
    images, labels, _ = inputs()
    expected = step(make_model(loss_name), images, labels, loss_name)
    assert expected['loss'] > 0
    assert ('proxies' in expected) == (loss_name != 'multi_similarity')
    for results in two_processes:
        assert_same_step(results[loss_name], expected, labels)


@pytest.mark.parametrize('loss_name', DIST_LOSSES)
def test_a_last_batch_smaller_than_the_others_equals_one_process(two_processes, loss_name):
    """The last global batch of 3 images over 2 processes (2 + 1 and a padding row) gives one
    process's loss and gradients on those 3 images; the padding row takes no part."""
    images, labels, _ = inputs()
    _, local_labels, order = last_batch(1)
    assert sorted(order) == list(range(LAST)) and (local_labels == train.PADDING).sum() == 1
    expected = step(make_model(loss_name), images[order], labels[order], loss_name)
    for results in two_processes:
        assert_same_step(results[f'last {loss_name}'], expected, labels[order])


def test_evaluation_gathers_every_embedding_in_order(two_processes):
    """Each rank embeds every other image and all of them gather the whole test set, in the data set's order."""
    _, _, evaluation = inputs()
    model = make_model()
    expected = train.embed_split(model, evaluation, 2, 0, torch.device('cpu'), False, 0, 1)
    assert expected.shape == (EVAL_ITEMS, FEATURE_DIM)
    for results in two_processes:
        assert_close(results['features'], expected)


def test_torchrun_two_processes_train_and_only_rank_0_reports(tmp_path, prepared):
    """`torchrun --nproc_per_node 2 train.py` on the CPU completes an epoch; one process prints and writes."""
    data_path = prepared  # CUB layout, 4 classes x 4 images, prepared once per module
    logs = tmp_path / 'logs'
    run = subprocess.run(
        [
            sys.executable,
            '-m',
            'torch.distributed.run',
            '--nproc_per_node',
            '2',
            '--master_addr',
            '127.0.0.1',
            '--master_port',
            str(free_port()),
            '--log-dir',
            str(logs),
            '--redirects',
            '3',
            os.path.join(ROOT, 'train.py'),
            '--data_path',
            data_path,
            '--data_name',
            'cub',
            '--backbone_type',
            'googlenet',
            '--no_pretrained',
            '--feature_dim',
            '8',
            '--batch_size',
            '4',
            '--num_epochs',
            '1',
            '--warm_up',
            '0',
            '--num_workers',
            '0',
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # torchrun wrote each rank's stdout and stderr to <logs>/<run id>/attempt_0/<rank>/
    output = {}
    for path in logs.rglob('*.log'):
        output[path.parent.name, path.stem] = path.read_text()
    assert 'with 2 processes' in output['0', 'stdout'] and 'Test Epoch 1/1' in output['0', 'stdout']
    assert 'Train Epoch 1/1' in output['0', 'stderr']  # tqdm's progress bar
    assert output['1', 'stdout'] == '' and 'Epoch' not in output['1', 'stderr']
    prefix = 'cub_googlenet_proxy_anchor_8_no_pretrained_batch_size4_warm_up0'
    assert sorted(os.listdir(tmp_path / 'results')) == sorted(
        [
            f'{prefix}_1_data_base.pth',
            f'{prefix}_1_model.pth',
            f'{prefix}_checkpoint.pth',
            f'{prefix}_statistics.csv',
            f'{prefix}_statistics.png',
        ]
    )


# train.py at 32-pixel crops, on one thread without oneDNN (as the tests above), in a process of its
# own. As in make_model, each image's embedding depends on that image only: BatchNorm on its running
# statistics (a pretrained run's rule; --no_pretrained would train it on each process's share of the
# batch) and no dropout (its masks differ between one process and two); and no statistics figure
# (seconds of drawing)
TINY_TRAIN = f'''
import sys
import torch
from torch import nn
sys.path.insert(0, {ROOT!r})
import runs, runtime, train, utils
utils.IMAGE_SIZE, utils.RESIZE_SIZE = 32, 37
torch.set_num_threads(1)
torch.backends.mkldnn.enabled = False
for layer in (nn.modules.batchnorm._BatchNorm, nn.Dropout):
    layer.train = lambda self, mode=True: nn.Module.train(self, False)
runs.plot_statistics = lambda frame, path: None
sys.argv = ['train.py'] + sys.argv[1:]
runtime.run_main(train.main)
'''


def test_two_nodes_train_one_epoch_as_one_process(tmp_path, prepared):
    """Two single-process "nodes" (`torchrun --nnodes 2 --node_rank 0|1 --rdzv_endpoint
    127.0.0.1:PORT`, each in a folder of its own as on two machines) train one epoch of
    Multi-Similarity on class-balanced batches as ONE process trains it: the same loss and test
    figures, and the same weights within float rounding; node 1 writes nothing."""
    data_path = prepared  # CUB layout, 4 classes x 4 images, prepared once per module
    script = tmp_path / 'tiny_train.py'
    script.write_text(TINY_TRAIN)
    flags = [
        '--data_path',
        data_path,
        '--data_name',
        'cub',
        '--backbone_type',
        'googlenet',
        '--no_pretrained',
        '--feature_dim',
        '8',
        '--batch_size',
        '4',
        '--images_per_class',
        '2',
        '--num_epochs',
        '1',
        '--warm_up',
        '0',
        '--num_workers',
        '0',
        '--loss_name',
        'multi_similarity',
    ]
    folders = {name: tmp_path / name for name in ('one', 'node0', 'node1')}
    for folder in folders.values():
        folder.mkdir()
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                '-m',
                'torch.distributed.run',
                '--nnodes',
                '2',
                '--nproc_per_node',
                '1',
                '--node_rank',
                str(rank),
                '--rdzv_endpoint',
                f'127.0.0.1:{port}',
                str(script),
                *flags,
            ],
            cwd=folders[f'node{rank}'],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    one = subprocess.run(
        [sys.executable, str(script), *flags],
        cwd=folders['one'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert one.returncode == 0, one.stderr[-3000:]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert 'with 2 processes' in outputs[0][0]
    assert not (folders['node1'] / 'results').exists() or not os.listdir(
        folders['node1'] / 'results'
    )
    prefix = 'cub_googlenet_multi_similarity_8_no_pretrained_batch_size4_images_per_class2_warm_up0'
    read = {
        name: pd.read_csv(folders[name] / 'results' / f'{prefix}_statistics.csv')
        for name in ('one', 'node0')
    }
    assert read['one']['train_loss'][0] > 0
    # the figures themselves may differ: a model one epoch from random weights ranks by near-ties
    assert list(read['node0'].columns) == list(read['one'].columns)
    assert read['node0']['train_loss'][0] == pytest.approx(read['one']['train_loss'][0], rel=1e-5)
    weights = {
        name: torch.load(folders[name] / 'results' / f'{prefix}_1_model.pth', weights_only=True)
        for name in ('one', 'node0')
    }
    assert weights['one'].keys() == weights['node0'].keys()
    for key, expected in weights['one'].items():
        torch.testing.assert_close(weights['node0'][key], expected, rtol=1e-4, atol=1e-5, msg=key)
    bases = {
        name: torch.load(folders[name] / 'results' / f'{prefix}_1_data_base.pth', weights_only=True)
        for name in ('one', 'node0')
    }
    for key in ('train_features', 'test_features'):
        assert_close(bases['node0'][key], bases['one'][key], 1e-4)
