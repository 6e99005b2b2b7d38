"""train.py's samplers, --images_per_class M: class-balanced global batches, every image in each
epoch, seeded by (seed, epoch), dealt to torchrun's ranks; the hint for a pair-based loss
without it."""

from collections import Counter

import pytest

from conftest import TINY
from script_runner import load_script

train = load_script('train')

# class sizes: a multiple of M, not one, one smaller than M, a single image, a large class
SIZES = [6, 7, 2, 1, 12, 3, 5, 4]


def labels_of(sizes):
    """Labels of a training set whose class c has sizes[c] images, the classes interleaved as a data set may hold
    them."""
    labels, left = [], list(sizes)
    while any(left):
        for label, count in enumerate(left):
            if count:
                labels.append(label)
                left[label] -= 1
    return labels


def batches(labels, batch_size, per_class, epoch=1, seed=0, rank=0, world=1):
    """The sampler's global batches of one epoch."""
    sampler = train.ClassBalancedBatches(labels, batch_size, per_class, rank, world, seed)
    sampler.set_epoch(epoch)
    return sampler.global_batches()


@pytest.mark.parametrize('batch_size, per_class', [(12, 3), (8, 2), (16, 4)])
def test_each_batch_holds_p_classes_with_m_images_each(batch_size, per_class):
    labels = labels_of(SIZES)
    drawn = batches(labels, batch_size, per_class)
    for batch in drawn:
        assert len(batch) == batch_size
        classes = Counter(labels[index] for index in batch)
        assert len(classes) == batch_size // per_class and set(classes.values()) == {per_class}
        for start in range(0, batch_size, per_class):  # one class after another, M images each
            group = batch[start : start + per_class]
            assert len({labels[index] for index in group}) == 1
            size = SIZES[labels[group[0]]]
            # no image twice in a group unless its class is smaller than M
            assert len(set(group)) == min(size, per_class)


@pytest.mark.parametrize('batch_size, per_class', [(12, 3), (8, 2), (16, 4)])
def test_every_image_is_seen_in_every_epoch(batch_size, per_class):
    """Every image at least once; the extra draws are only the fillers of a class's last group and of the last
    batches, so the epoch is a few batches longer than the data set at most."""
    labels = labels_of(SIZES)
    for epoch in (1, 2, 3):
        drawn = batches(labels, batch_size, per_class, epoch)
        counts = Counter(index for batch in drawn for index in batch)
        assert set(counts) == set(range(len(labels)))
        groups = sum(-(-size // per_class) for size in SIZES)
        assert (
            sum(counts.values()) <= (groups + batch_size // per_class - 1) * per_class + batch_size
        )


def test_evenly_divisible_classes_see_each_image_exactly_once():
    """8 classes of 6 images in batches of 4 classes x 3: 4 batches, each image once, as the groups can be dealt."""
    labels = labels_of([6] * 8)
    for epoch in (1, 2):
        drawn = batches(labels, 12, 3, epoch)
        assert len(drawn) == 4
        assert sorted(index for batch in drawn for index in batch) == list(range(48))


def test_batches_are_seeded_by_seed_and_epoch():
    labels = labels_of(SIZES)
    assert batches(labels, 8, 2, epoch=3, seed=5) == batches(labels, 8, 2, epoch=3, seed=5)
    assert batches(labels, 8, 2, epoch=3, seed=5) != batches(labels, 8, 2, epoch=4, seed=5)
    assert batches(labels, 8, 2, epoch=3, seed=5) != batches(labels, 8, 2, epoch=3, seed=6)
    sampler = train.ClassBalancedBatches(labels, 8, 2, seed=5)
    sampler.set_epoch(3)
    assert len(sampler) == len(batches(labels, 8, 2, epoch=3, seed=5))


@pytest.mark.parametrize('world', [2, 4])
def test_torchrun_ranks_share_each_global_batch(world):
    """The ranks' shares of a step are equal in length, hold no padding, and together are the global batch one
    process trains on."""
    labels = labels_of(SIZES)
    samplers = [
        train.ClassBalancedBatches(labels, 8, 2, rank, world, seed=1) for rank in range(world)
    ]
    for sampler in samplers:
        sampler.set_epoch(2)
    steps = list(zip(*samplers))
    assert len(steps) == len(batches(labels, 8, 2, epoch=2, seed=1))
    for shares, batch in zip(steps, batches(labels, 8, 2, epoch=2, seed=1)):
        assert {len(share) for share in shares} == {8 // world}
        assert sorted(index for share in shares for index, epoch, padding in share) == sorted(batch)
        assert all(epoch == 2 and not padding for share in shares for _, epoch, padding in share)


@pytest.mark.parametrize(
    'loss_name, flags, hinted',
    [
        ('contrastive', [], True),
        ('contrastive', ['--images_per_class', '2'], False),
        ('proxy_nca', [], False),
        ('proxy_anchor', [], False),
    ],
)
def test_a_pair_loss_without_class_balanced_batches_prints_one_hint(
    prepared, tmp_path, script, recorded, quick_runs, loss_name, flags, hinted
):
    """Only a pair-based loss on shuffled batches is told to pass --images_per_class; the flag reaches the loader."""
    status, out, err = script(
        'train',
        '--data_path',
        prepared,
        '--data_name',
        'cub',
        '--backbone_type',
        TINY,
        '--no_pretrained',
        '--num_workers',
        0,
        '--batch_size',
        4,
        '--num_epochs',
        1,
        '--loss_name',
        loss_name,
        *flags,
        cwd=tmp_path,
        watch=recorded,
    )
    assert status == 0, err
    hints = [line for line in out.splitlines() if '--images_per_class' in line]
    assert hints == (
        [
            f'{loss_name} learns from pairs of one class within a batch, which shuffled batches of 4 may '
            f'hold few of; pass --images_per_class 4 (or 2) for class-balanced batches'
        ]
        if hinted
        else []
    )
    sampler = recorded[0]['loader'].batch_sampler
    assert isinstance(sampler, train.ClassBalancedBatches) == bool(flags)
