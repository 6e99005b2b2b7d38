"""Stanford Online Products end to end: data_utils.py, train.py at SOP's Recall@1/10/100/1000, test.py."""

import contextlib
import io
import os
import re
import sys

import pandas as pd
import pytest
import torch

from conftest import make_sop
from script_runner import load_script, query_folder

PREFIX = 'sop_googlenet_proxy_anchor_16_no_pretrained_batch_size4_warm_up1'
COLUMNS = [
    'train_loss',
    'train_accuracy',
    'test_recall@1',
    'test_recall@10',
    'test_recall@100',
    'test_recall@1000',
    'test_map@r',
    'test_r_precision',
]


def run(name, *flags, cwd):
    """`python <name>.py flags` in cwd, in this process; returns what it printed."""
    output = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(output):
        patch.setattr(sys, 'argv', [f'{name}.py', *map(str, flags)])
        patch.chdir(cwd)
        load_script(name).main()
    return output.getvalue()


def ebay_files(root, split):
    """{file name: class id} of one Ebay_<split>.txt."""
    with open(os.path.join(root, f'Ebay_{split}.txt')) as file:
        rows = [line.split() for line in file.read().splitlines()[1:]]
    return {os.path.basename(path): int(class_id) for _, class_id, _, path in rows}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """6 SOP classes x 3 images (3 train, 3 test classes) prepared by data_utils.py, then one epoch of train.py
    with --recalls 1,10,100,1000: ranks far beyond the 8 other test images. Returns (run folder, sop root, stdout).
    """
    cwd = tmp_path_factory.mktemp('sop')
    root = make_sop(str(cwd / 'data'), num_classes=6, per_class=3)
    prepared = run(
        'data_utils', '--data_path', 'data', '--data_name', 'sop', '--workers', 1, cwd=cwd
    )
    assert 'sop uncropped: 3 classes / 9 images train, 3 classes / 9 images test' in prepared
    out = run(
        'train',
        '--data_path',
        'data',
        '--data_name',
        'sop',
        '--backbone_type',
        'googlenet',
        '--no_pretrained',
        '--feature_dim',
        16,
        '--batch_size',
        4,
        '--num_epochs',
        1,
        '--warm_up',
        1,
        '--num_workers',
        0,
        '--recalls',
        '1,10,100,1000',
        cwd=cwd,
    )
    return cwd, root, out


def test_statistics_at_sop_ranks(trained):
    cwd, _, out = trained
    assert re.search(
        r'Test Epoch 1/1 R@1:[\d.]+% R@10:[\d.]+% R@100:[\d.]+% R@1000:[\d.]+% MAP@R:[\d.]+% '
        r'RP:[\d.]+%',
        out,
    )
    frame = pd.read_csv(cwd / 'results' / f'{PREFIX}_statistics.csv', index_col='epoch')
    assert list(frame.index) == [1] and list(frame.columns) == COLUMNS
    # 9 test images in classes of 3: each query's 8 others hold its 2 classmates, so any K >= 8 finds them all
    assert (frame[['test_recall@10', 'test_recall@100', 'test_recall@1000']] == 1).all().all()
    assert ((frame['test_recall@1'] >= 0) & (frame['test_recall@1'] <= 1)).all()
    assert (
        (frame['test_map@r'] >= 0) & (frame['test_map@r'] <= frame['test_r_precision'] + 1e-9)
    ).all()


def test_split_and_data_base_follow_the_ebay_files(trained):
    cwd, root, _ = trained
    data_base = torch.load(cwd / 'results' / f'{PREFIX}_1_data_base.pth', weights_only=True)
    for split in ('train', 'test'):
        expected = ebay_files(root, split)
        images = data_base[f'{split}_images']
        assert sorted(os.path.basename(path) for path in images) == sorted(expected)
        assert all(os.path.isfile(cwd / path) for path in images)
        # labels are 0..C-1 in class-id order
        ids = sorted(set(expected.values()))
        assert data_base[f'{split}_labels'].tolist() == [
            ids.index(expected[os.path.basename(path)]) for path in images
        ]
    assert data_base['proxies'].shape == (3, 16)  # one proxy per training class
    assert data_base['test_features'].shape == (9, 16)


def test_retrieval_of_a_sop_query_asks_for_more_than_there_is(trained):
    """--retrieval_num 10 with 8 other test images: all 8 are drawn, the query itself never among them."""
    cwd, root, _ = trained
    data_base = torch.load(cwd / 'results' / f'{PREFIX}_1_data_base.pth', weights_only=True)
    query = data_base['test_images'][4]
    out = run(
        'test',
        '--query_img_name',
        query,
        '--data_base',
        f'{PREFIX}_1_data_base.pth',
        '--retrieval_num',
        10,
        cwd=cwd,
    )
    assert (
        'its 8 nearest images, 2 of the same class' in out
    )  # every other image, so both classmates
    folder = query_folder(cwd / 'results', os.path.splitext(os.path.basename(query))[0])
    ranks = sorted(
        int(name.split('_')[2]) for name in os.listdir(folder) if name.startswith('retrieval_img_')
    )
    assert ranks == list(range(1, 9))
