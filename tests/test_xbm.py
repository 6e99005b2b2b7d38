"""Cross-batch memory (--xbm_size, --xbm_start): PML's CrossBatchMemory in one process, the same
memory in every process under DDP, and exact resumption."""

import os

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning import losses, miners
from torch.nn.parallel import DistributedDataParallel

import train
from conftest import train_in
from runtime import UserError
from test_run_distributed import free_port, make_model
from utils import LOSSES

DIM, BATCH, SIZE, STEPS = 8, 6, 16, 7  # a memory of 16 wraps around within 7 batches of 6


def make_loss(loss_name, *flags):
    """train.py's loss for these flags, with DIM-dimensional embeddings and a batch of BATCH."""
    args = train.get_args_parser().parse_args(
        ['--loss_name', loss_name, '--feature_dim', str(DIM), '--batch_size', str(BATCH), *flags]
    )
    train.check_args(args, train.get_args_parser())
    return train.make_loss(LOSSES[loss_name], args, 4)


def batches(seed=0):
    """STEPS (embeddings (BATCH, DIM), labels (BATCH,)) of 3 classes."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(BATCH, DIM, generator=generator),
            torch.randint(0, 3, (BATCH,), generator=generator),
        )
        for _ in range(STEPS)
    ]


@pytest.mark.parametrize(
    'loss_name,reference',
    [
        ('contrastive', lambda: (losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5), None)),
        (
            'multi_similarity',
            lambda: (
                losses.MultiSimilarityLoss(2.0, 50.0, 0.5),
                miners.MultiSimilarityMiner(epsilon=0.1),
            ),
        ),
    ],
)
def test_one_process_equals_pml_cross_batch_memory(loss_name, reference):
    ours = make_loss(loss_name, '--xbm_size', str(SIZE))
    loss, miner = reference()
    theirs = losses.CrossBatchMemory(loss, DIM, memory_size=SIZE, miner=miner)
    for embeddings, labels in batches():
        mine, leaf = embeddings.clone().requires_grad_(), embeddings.clone().requires_grad_()
        got, expected = ours(mine, labels), theirs(leaf, labels)
        got.backward()
        expected.backward()
        assert torch.equal(got, expected)
        assert torch.equal(mine.grad, leaf.grad)
    assert theirs.has_been_filled and torch.equal(
        ours.memory.embedding_memory, theirs.embedding_memory
    )


def test_the_memory_waits_xbm_start_steps():
    ours = make_loss('contrastive', '--xbm_size', str(SIZE), '--xbm_start', '3')
    plain = make_loss('contrastive')
    theirs = losses.CrossBatchMemory(losses.ContrastiveLoss(neg_margin=0.5), DIM, SIZE)
    for step, (embeddings, labels) in enumerate(batches(1), 1):
        expected = plain(embeddings, labels) if step <= 3 else theirs(embeddings, labels)
        assert torch.equal(ours(embeddings, labels), expected)
    assert not torch.equal(plain(*batches(1)[-1]), ours.memory(*batches(1)[-1]))


def test_state_dict_continues_the_memory_exactly():
    first = make_loss('triplet', '--xbm_size', str(SIZE), '--xbm_start', '1')
    data = batches(2)
    for embeddings, labels in data[:4]:
        first(embeddings, labels)
    second = make_loss('triplet', '--xbm_size', str(SIZE), '--xbm_start', '1')
    second.load_state_dict(first.state_dict())
    for embeddings, labels in data[4:]:
        assert torch.equal(second(embeddings, labels), first(embeddings, labels))


@pytest.mark.parametrize(
    'flags,words',
    [
        (['--loss_name', 'proxy_anchor', '--xbm_size', '64'], 'class proxies'),
        (
            ['--loss_name', 'triplet', '--xbm_size', '8', '--batch_size', '16'],
            'less than one batch',
        ),
        (['--loss_name', 'triplet', '--xbm_start', '5'], 'only --xbm_size'),
    ],
)
def test_misuse_is_one_sentence(flags, words):
    args = train.get_args_parser().parse_args(flags)
    with pytest.raises(UserError, match=words):
        entry = train.check_args(args, train.get_args_parser())[1]
        train.make_loss(entry, args, 4)


# ---------------------------------------------------------------------------------------------
# two gloo processes: each enqueues the gathered global batch, so both hold one process's memory

WORLD, LOCAL = 2, 3


def global_batches():
    """STEPS global batches of 2 * LOCAL images (uint8) and labels of 3 classes."""
    generator = torch.Generator().manual_seed(4)
    return [
        (
            torch.randint(
                0, 256, (WORLD * LOCAL, 3, 32, 32), dtype=torch.uint8, generator=generator
            ),
            torch.randint(0, 3, (WORLD * LOCAL,), generator=generator),
        )
        for _ in range(4)
    ]


def steps(model, rank, world):
    """The losses of train.batch_loss over global_batches with a memory of 8 (from step 2), and
    the memory after them."""
    args = train.get_args_parser().parse_args(
        [
            '--loss_name',
            'multi_similarity',
            '--feature_dim',
            '16',
            '--batch_size',
            '6',
            '--xbm_size',
            '8',
            '--xbm_start',
            '1',
        ]
    )
    loss_criterion = train.make_loss(LOSSES['multi_similarity'], args)
    out = []
    for images, labels in global_batches():
        part = slice(rank * LOCAL, (rank + 1) * LOCAL) if world > 1 else slice(None)
        loss = train.batch_loss(model, images[part], labels[part], loss_criterion, False)[0]
        loss.backward()
        out.append(loss.detach())
    return torch.stack(out), loss_criterion.memory.embedding_memory.clone()


def worker(rank, port, folder):
    """One of the 2 processes: its share of each global batch through DDP."""
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    dist.init_process_group(
        'gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD
    )
    try:
        model = DistributedDataParallel(make_model('multi_similarity'))
        torch.save(steps(model, rank, WORLD), os.path.join(folder, f'rank{rank}.pth'))
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures('without_onednn')
def test_two_processes_hold_one_process_memory(tmp_path):
    torch.set_num_threads(1)
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    expected_losses, expected_memory = steps(make_model('multi_similarity'), 0, 1)
    assert (expected_memory != 0).all()  # filled, wrapped around
    for rank in range(WORLD):
        got_losses, got_memory = torch.load(tmp_path / f'rank{rank}.pth')
        torch.testing.assert_close(got_losses, expected_losses, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_memory, expected_memory, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# a whole run: --resume continues the memory


def test_resume_continues_the_memory(tmp_path, prepared):
    data_path = prepared  # CUB layout, 4 classes x 4 images, prepared once per module
    command = [
        '--data_path',
        data_path,
        '--data_name',
        'cub',
        '--backbone_type',
        'googlenet',
        '--no_pretrained',
        '--image_size',
        '32',
        '--feature_dim',
        '16',
        '--batch_size',
        '4',
        '--warm_up',
        '0',
        '--num_workers',
        '0',
        '--loss_name',
        'contrastive',
        '--images_per_class',
        '2',
        '--xbm_size',
        '6',
        '--xbm_start',
        '1',
    ]
    statistics = (
        'cub_googlenet_contrastive_16_image_size32_no_pretrained_xbm_size6_xbm_start1_batch_size4_'
        'images_per_class2_warm_up0_statistics.csv'
    )
    tables = []
    for folder, runs in (
        ('whole', [['--num_epochs', '2']]),
        ('resumed', [['--num_epochs', '1'], ['--num_epochs', '2', '--resume']]),
    ):
        (tmp_path / folder).mkdir()
        for extra in runs:  # in this process: a fresh one computes alike (tests/test_golden_run.py)
            train_in(tmp_path / folder, *command, *extra)
        tables.append(pd.read_csv(tmp_path / folder / 'results' / statistics, index_col='epoch'))
    pd.testing.assert_frame_equal(tables[1], tables[0], check_exact=True)
