"""DistributedDataParallel on the CPU with gloo (issue 5): 2 processes compute the single-process loss and gradients."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import train
from conftest import ROOT, make_cub
from model import Model
from utils import LOSSES

WORLD, LOCAL_BATCH, NUM_CLASSES, FEATURE_DIM, SIZE = 2, 4, 5, 16, 64
# the global batch: class 0 only on rank 0, class 3 only on rank 1, class 4 nowhere, so Proxy-Anchor's P+ and its
# positive and negative terms are only right if they are taken over the whole batch
LABELS = torch.tensor([0, 0, 1, 2, 2, 3, 3, 1])
EVAL_ITEMS = 7  # odd: the ranks' shards of the test set differ in length
LAST = 3  # a last, partial global batch of 3: one rank gets 2 images, the other 1 and a padding row


# PyTorch's own CPU convolutions: oneDNN's weight gradients are off by up to 1% of the largest one, differently for
# each thread count (the test checks DDP's arithmetic, not oneDNN's), and its first call per shape is slow
pytestmark = pytest.mark.usefixtures('without_onednn')


def free_port():
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def make_model():
    """The same randomly initialised GoogLeNet model in every process, in train.py's mode for pretrained runs:
    training mode with the backbone's BatchNorm in eval mode, so each sample's output is independent of the batch.
    Its dropout is switched off too: its random masks would differ between one process and two."""
    torch.manual_seed(0)
    model = Model('googlenet', FEATURE_DIM, NUM_CLASSES, pretrained=False)
    model.train()
    for module in model.backbone.modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            module.eval()
    return model


def inputs():
    """(global images (W * B, 3, S, S) uint8, global labels, an evaluation set of (image, label) pairs)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (WORLD * LOCAL_BATCH, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    evaluation = [(torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8, generator=generator), i % 3)
                  for i in range(EVAL_ITEMS)]
    return images, LABELS, evaluation


def step(model, images, labels, loss_name):
    """One train.batch_loss and backward: the loss, gathered labels and the gradients that the test compares."""
    loss, _, cosines, all_labels = train.batch_loss(model, images, labels, LOSSES[loss_name].build())
    loss.backward()
    net = train.unwrap(model)
    return {'loss': loss.detach(), 'cosines': cosines.detach(), 'labels': all_labels,
            'proxies': net.proxies.weight.grad.clone(), 'embedding': net.embedding.weight.grad.clone(),
            'backbone': net.backbone.conv1.conv.weight.grad.clone()}


def last_batch(rank):
    """(this rank's images, labels) of the last global batch and the order of the gathered rows, as train.py's
    epoch loop builds them from GlobalBatches: the shorter share filled up with a padding row."""
    images, labels, _ = inputs()
    sampler = train.GlobalBatches(LAST, LAST, rank, WORLD, seed=3)
    items = next(iter(sampler))
    shares = sampler.shares(sampler.global_batches()[0])
    local_labels = labels[[index for index, _ in items]]
    local_labels[torch.tensor(shares[rank]) == train.PADDING] = train.PADDING
    order = [index for share in shares for index in share if index != train.PADDING]
    return images[[index for index, _ in items]], local_labels, order


def worker(rank, port, folder):
    """One of the 2 processes: its half of the global batch through DDP, results saved for the parent."""
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # as the without_onednn fixture, in this process of its own
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD)
    try:
        images, labels, evaluation = inputs()
        part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {}
        for loss_name in LOSSES:
            model = make_model()
            results[loss_name] = step(DistributedDataParallel(model), images[part], labels[part], loss_name)
            results[f'last {loss_name}'] = step(DistributedDataParallel(make_model()), *last_batch(rank)[:2],
                                                loss_name)
        results['features'] = train.embed(model, evaluation, 2, 0, torch.device('cpu'), False, rank, WORLD)
        torch.save(results, os.path.join(folder, f'rank{rank}.pth'))
    finally:
        dist.destroy_process_group()


def assert_close(actual, expected, tolerance=1e-5):
    """Equal within `tolerance` relative to the expected tensor's largest magnitude, which must not be 0."""
    scale = expected.abs().max()
    assert scale > 0
    assert (actual - expected).abs().max() <= tolerance * scale, (actual - expected).abs().max() / scale


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
    """Both ranks' results, from one spawn of 2 gloo processes."""
    folder = str(tmp_path_factory.mktemp('ddp'))
    mp.spawn(worker, args=(free_port(), folder), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(folder, f'rank{rank}.pth')) for rank in range(WORLD)]


@pytest.mark.parametrize('loss_name', list(LOSSES))
def test_two_processes_equal_one_process_on_the_global_batch(two_processes, loss_name):
    """Loss, proxy gradients and embedding-layer and first-convolution gradients of 2 DDP processes on 4 images
    each equal those of one process on all 8 images, within 1e-5, on every rank."""
    images, labels, _ = inputs()
    expected = step(make_model(), images, labels, loss_name)
    for results in two_processes:
        actual = results[loss_name]
        assert torch.equal(actual['labels'], labels)
        assert_close(actual['cosines'], expected['cosines'])
        assert abs(actual['loss'].item() - expected['loss'].item()) <= 1e-5 * abs(expected['loss'].item())
        for name in ('proxies', 'embedding', 'backbone'):
            assert_close(actual[name], expected[name])


@pytest.mark.parametrize('loss_name', list(LOSSES))
def test_a_last_batch_smaller_than_the_others_equals_one_process(two_processes, loss_name):
    """The last global batch of 3 images over 2 processes (2 + 1 and a padding row) gives one process's loss and
    gradients on those 3 images; the padding row takes no part."""
    images, labels, _ = inputs()
    _, local_labels, order = last_batch(1)
    assert sorted(order) == list(range(LAST)) and (local_labels == train.PADDING).sum() == 1
    expected = step(make_model(), images[order], labels[order], loss_name)
    for results in two_processes:
        actual = results[f'last {loss_name}']
        assert torch.equal(actual['labels'], labels[order])
        assert_close(actual['cosines'], expected['cosines'])
        assert abs(actual['loss'].item() - expected['loss'].item()) <= 1e-5 * abs(expected['loss'].item())
        for name in ('proxies', 'embedding', 'backbone'):
            assert_close(actual[name], expected[name])


def test_evaluation_gathers_every_embedding_in_order(two_processes):
    """Each rank embeds every other image and all of them gather the whole test set, in the data set's order."""
    _, _, evaluation = inputs()
    model = make_model()
    expected = train.embed(model, evaluation, 2, 0, torch.device('cpu'), False, 0, 1)
    assert expected.shape == (EVAL_ITEMS, FEATURE_DIM)
    for results in two_processes:
        assert_close(results['features'], expected)


def test_torchrun_two_processes_train_and_only_rank_0_reports(tmp_path):
    """`torchrun --nproc_per_node 2 train.py` on the CPU completes an epoch; one process prints and writes."""
    data_path = str(tmp_path / 'data')
    make_cub(data_path, num_classes=4, per_class=4)
    subprocess.run([sys.executable, os.path.join(ROOT, 'data_utils.py'), '--data_path', data_path, '--data_name',
                    'cub', '--workers', '1'], check=True, capture_output=True)
    logs = tmp_path / 'logs'
    run = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr',
                          '127.0.0.1', '--master_port', str(free_port()), '--log-dir', str(logs), '--redirects', '3',
                          os.path.join(ROOT, 'train.py'), '--data_path', data_path, '--data_name', 'cub',
                          '--backbone_type', 'googlenet', '--no_pretrained', '--feature_dim', '8', '--batch_size',
                          '4', '--num_epochs', '1', '--warm_up', '0', '--num_workers', '0'],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
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
        [f'{prefix}_1_data_base.pth', f'{prefix}_1_model.pth', f'{prefix}_checkpoint.pth',
         f'{prefix}_statistics.csv', f'{prefix}_statistics.png'])
