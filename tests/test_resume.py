"""A run killed with SIGKILL after epoch 1 and resumed ends exactly where an uninterrupted run
ends."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from conftest import ROOT, train_in

PREFIX = 'cub_googlenet_proxy_anchor_16_image_size64_no_pretrained_batch_size4_warm_up1'
TRAIN = [
    sys.executable,
    os.path.join(ROOT, 'train.py'),
    '--data_name',
    'cub',
    '--backbone_type',
    'googlenet',
    '--no_pretrained',
    '--feature_dim',
    '16',
    '--batch_size',
    '4',
    '--num_epochs',
    '3',
    '--warm_up',
    '1',
    '--image_size',  # a quarter of the recipe's side: 12 times less arithmetic
    '64',
]


@pytest.fixture
def data_path(prepared):
    """The shared prepared CUB-layout data set of 4 classes x 4 images: 8 training, 8 test."""
    return prepared


def train(data_path, cwd, *extra):
    """Run train.py to completion in this process, in `cwd` (results/ is relative to it; a fresh
    process computes alike, tests/test_golden_run.py); returns its statistics table."""
    train_in(cwd, *TRAIN[2:], '--data_path', data_path, *extra)
    return pd.read_csv(os.path.join(cwd, 'results', f'{PREFIX}_statistics.csv'), index_col='epoch')


def assert_same_statistics(expected, actual):
    """Every figure identical: two processes on one machine compute alike (tests/test_golden_run.py)."""
    pd.testing.assert_frame_equal(actual, expected, check_exact=True)


def test_resume_after_sigkill_matches_uninterrupted_run(data_path, tmp_path):
    """Kill during epoch 2, resume: the CSV equals the uninterrupted run's.

    The uninterrupted run loads its images in the main process and the other in a worker process: the
    augmentation is seeded per (seed, epoch, image), so the number of workers must not change the result either.
    """
    uninterrupted = tmp_path / 'a'
    uninterrupted.mkdir()
    expected = train(data_path, uninterrupted, '--num_workers', '0')
    assert list(expected.index) == [1, 2, 3]

    killed = tmp_path / 'b'
    killed.mkdir()
    checkpoint = killed / 'results' / f'{PREFIX}_checkpoint.pth'
    process = subprocess.Popen(
        TRAIN + ['--data_path', data_path, '--num_workers', '1'],
        cwd=killed,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # the checkpoint is renamed into place whole, after epoch 1's other outputs: once it exists, epoch 2 runs
        deadline = time.monotonic() + 300
        while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        os.killpg(
            process.pid, signal.SIGKILL
        )  # the whole group: the data-loading worker dies too, as on pre-emption
        process.wait()
    assert process.returncode == -signal.SIGKILL, 'train.py ended before it could be killed'
    assert (
        torch.load(checkpoint, weights_only=True)['epoch'] == 1
    ), 'killed too late: epoch 2 had finished'
    assert len(pd.read_csv(killed / 'results' / f'{PREFIX}_statistics.csv')) == 1

    stray = (
        killed / 'results' / f'.{PREFIX}_checkpoint.pth.x1y2z3.tmp'
    )  # as a kill while saving leaves behind
    stray.write_bytes(b'PK half a checkpoint')
    resumed = subprocess.run(
        TRAIN + ['--data_path', data_path, '--num_workers', '1', '--resume'],
        cwd=killed,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'resuming' in resumed.stdout and 'after epoch 1' in resumed.stdout
    assert not stray.exists()
    actual = pd.read_csv(killed / 'results' / f'{PREFIX}_statistics.csv', index_col='epoch')
    assert_same_statistics(expected, actual)
    final = torch.load(checkpoint, weights_only=True)
    assert final['epoch'] == 3
    # the final weights agree as well, not only the metrics derived from them
    reference = torch.load(uninterrupted / 'results' / f'{PREFIX}_3_model.pth', weights_only=True)
    for name, tensor in reference.items():
        torch.testing.assert_close(final['model'][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_refuses_a_different_recipe(data_path, tmp_path):
    """--resume with a flag that changes what the run computes stops with one sentence naming the flag."""
    args = {
        'data_name': 'cub',
        'crop_type': 'uncropped',
        'backbone_type': 'googlenet',
        'feature_dim': 16,
        'no_pretrained': True,
        'loss_name': 'proxy_anchor',
        'batch_size': 4,
        'warm_up': 2,
        'seed': 1,
        'amp': False,
        'image_size': 64,
    }
    os.makedirs(tmp_path / 'results')
    torch.save(
        {
            'model': {},
            'optimizer': {},
            'scheduler': {},
            'epoch': 1,
            'args': args,
            'rng': {},
            'statistics': {},
        },
        tmp_path / 'results' / f'{PREFIX}_checkpoint.pth',
    )
    result = subprocess.run(
        TRAIN + ['--data_path', data_path, '--num_workers', '0', '--resume'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr == (
        f'error: results/{PREFIX}_checkpoint.pth was trained with --warm_up 2, not 1; resume '
        f'with the same flags or start afresh without --resume\n'
    )
