"""data_utils.py on small data sets in the raw CUB-200-2011, CARS196 and SOP layouts
(tests/conftest.py): the splits, the index, and reruns that skip finished images and complete an
interrupted run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat

import data_utils
import utils
from conftest import ROOT, make_car, make_cub, make_sop, write_image
from script_runner import temporaries
from utils import ImageReader, UserError, index_path, load_index


def raw_annotations(root, data_name):
    """{basename: (source path, class id, (x1, y1, x2, y2))} read straight from the raw files, independently."""
    result = {}
    if data_name == 'cub':

        def table(name):
            with open(os.path.join(root, name)) as file:
                return {
                    fields[0]: fields[1:] for fields in (line.split() for line in file) if fields
                }

        images, labels, boxes = (
            table('images.txt'),
            table('image_class_labels.txt'),
            table('bounding_boxes.txt'),
        )
        for image_id, (relative,) in images.items():
            x, y, w, h = map(float, boxes[image_id])
            result[os.path.basename(relative)] = (
                os.path.join(root, 'images', relative),
                int(labels[image_id][0]),
                (x, y, x + w, y + h),
            )
    else:
        for entry in loadmat(os.path.join(root, 'cars_annos.mat'))['annotations'][0]:
            relative = str(entry['relative_im_path'][0])
            box = tuple(float(entry[f][0][0]) for f in ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2'))
            result[os.path.basename(relative)] = (
                os.path.join(root, relative),
                int(entry['class'][0][0]),
                box,
            )
    return result


@pytest.mark.parametrize('data_name, make', [('cub', make_cub), ('car', make_car)])
def test_split_counts_and_rgb_output(tmp_path, data_name, make):
    root = make(str(tmp_path), num_classes=6, per_class=3, gray_every=4)
    raw = raw_annotations(root, data_name)
    assert len(raw) == 18
    grays = [name for name, (source, _, _) in raw.items() if Image.open(source).mode == 'L']
    assert len(grays) == 4  # the fixture really holds grayscale JPEGs

    data_utils.prepare(str(tmp_path), data_name, ('uncropped', 'cropped'), workers=2)

    for crop_type in ('uncropped', 'cropped'):
        index = torch.load(index_path(str(tmp_path), data_name, crop_type), weights_only=True)
        assert index == load_index(str(tmp_path), data_name, crop_type)
        assert set(index) == {'train', 'test'}
        # first half of the class ids trains, the second half tests
        assert sorted(index['train']) == [1, 2, 3] and sorted(index['test']) == [4, 5, 6]
        assert all(isinstance(class_id, int) for split in index.values() for class_id in split)
        assert (
            sum(map(len, index['train'].values())) == 9
            and sum(map(len, index['test'].values())) == 9
        )
        listed = [path for split in index.values() for paths in split.values() for path in paths]
        assert len(set(listed)) == 18
        for split in index.values():
            for class_id, paths in split.items():
                for relative in paths:
                    folder, name = relative.split('/')
                    assert folder == crop_type
                    source, true_class, box = raw[name]
                    assert true_class == class_id
                    with Image.open(os.path.join(root, relative)) as image, Image.open(
                        source
                    ) as original:
                        assert image.mode == 'RGB'
                        original = original.convert('RGB')
                        if crop_type == 'cropped':
                            original = original.crop(tuple(int(v) for v in box))
                            assert image.size == (int(box[2] - box[0]), int(box[3] - box[1]))
                        assert image.size == original.size
                        # the same pixels (up to JPEG re-encoding): a crop in the wrong place differs by ~20 levels
                        difference = np.abs(
                            np.asarray(image, dtype=float) - np.asarray(original, dtype=float)
                        )
                        assert difference.mean() < 8
                        if name in grays:  # a grayscale source becomes three equal channels
                            pixels = np.asarray(image, dtype=int)
                            assert np.abs(pixels[..., 0] - pixels[..., 1]).max() <= 3
    # the uncropped images keep the seed's layout: <data_path>/<name>/uncropped/<basename>
    assert sorted(os.listdir(os.path.join(root, 'uncropped'))) == sorted(raw)


def test_real_class_ids_split_in_halves(tmp_path):
    """With 4 classes the cut is 2 / 2, and the index lists every image of a class under its own id."""
    root = make_cub(str(tmp_path), num_classes=4, per_class=2)
    data_utils.prepare(str(tmp_path), 'cub', workers=1)
    index = load_index(str(tmp_path), 'cub')
    assert {split: sorted(classes) for split, classes in index.items()} == {
        'train': [1, 2],
        'test': [3, 4],
    }
    assert all(len(paths) == 2 for split in index.values() for paths in split.values())
    assert not os.path.exists(
        index_path(str(tmp_path), 'cub', 'cropped')
    )  # the cropped variant is an option
    assert os.path.isdir(os.path.join(root, 'uncropped'))


def test_sop_split_comes_from_the_ebay_files(tmp_path):
    root = make_sop(str(tmp_path), num_classes=6, per_class=2)
    expected = {}
    for split in ('train', 'test'):
        with open(os.path.join(root, f'Ebay_{split}.txt')) as file:
            for line in file.read().splitlines()[1:]:
                _, class_id, _, relative = line.split()
                expected.setdefault(split, {}).setdefault(int(class_id), []).append(
                    f'uncropped/{os.path.basename(relative)}'
                )
    data_utils.prepare(str(tmp_path), 'sop', ('uncropped', 'cropped'), workers=1)
    index = load_index(str(tmp_path), 'sop')
    assert {
        split: {c: sorted(p) for c, p in classes.items()} for split, classes in index.items()
    } == expected
    assert not os.path.exists(index_path(str(tmp_path), 'sop', 'cropped'))  # SOP has no boxes
    for paths in index['train'].values():
        for relative in paths:
            with Image.open(os.path.join(root, relative)) as image:
                assert image.mode == 'RGB'


def test_image_reader_reads_the_prepared_index(tmp_path):
    make_car(str(tmp_path), num_classes=4, per_class=3)
    data_utils.prepare(str(tmp_path), 'car', workers=1)
    test = ImageReader(str(tmp_path), 'car', 'test', 'resnet50')
    assert len(test) == 6 and test.num_classes == 2
    assert test.labels == [0, 0, 0, 1, 1, 1]  # labels 0..C-1 in class-id order (ids 3 and 4)
    image, label = test[0]
    assert image.shape == (3, 224, 224) and image.dtype == torch.uint8 and label == 0


def test_prepare_is_idempotent(tmp_path):
    make_cub(str(tmp_path), num_classes=2, per_class=2)
    data_utils.prepare(str(tmp_path), 'cub', workers=1)
    first = load_index(str(tmp_path), 'cub')
    data_utils.prepare(str(tmp_path), 'cub', workers=1)
    assert load_index(str(tmp_path), 'cub') == first


def test_missing_image_is_named(tmp_path):
    root = make_car(str(tmp_path))
    os.remove(os.path.join(root, 'car_ims', '000005.jpg'))
    with pytest.raises(UserError, match='000005.jpg'):
        data_utils.prepare(str(tmp_path), 'car', workers=1)


# ----------------------------------------------------------------------------------------------------------------------
# data_utils.py: reruns skip finished images and complete interrupted runs


def outputs(root):
    """{path: mtime_ns} of every converted image."""
    folder = os.path.join(root, 'uncropped')
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


def test_rerun_skips_finished_images(tmp_path):
    root = make_cub(str(tmp_path), num_classes=4, per_class=3)
    data_utils.prepare(str(tmp_path), 'cub', workers=1)
    before = outputs(root)
    assert len(before) == 12
    time.sleep(0.01)
    data_utils.prepare(str(tmp_path), 'cub', workers=1)
    assert outputs(root) == before  # not one image rewritten


def test_rerun_completes_a_run_that_lost_images_and_left_temporaries(tmp_path):
    root = make_cub(str(tmp_path), num_classes=4, per_class=3)
    data_utils.prepare(str(tmp_path), 'cub', workers=1)
    index = utils.load_index(str(tmp_path), 'cub')
    folder = os.path.join(root, 'uncropped')
    lost = sorted(os.listdir(folder))[::3]
    for name in lost:
        os.remove(os.path.join(folder, name))
    os.remove(utils.index_path(str(tmp_path), 'cub'))
    # what a SIGKILL during a write leaves: an image's and the index's temporary files
    strays = os.path.join(folder, f'.{lost[0]}.k3x9_a1.tmp'), os.path.join(
        root, '.uncropped_data_dicts.pth.z.tmp'
    )
    for stray in strays:
        with open(stray, 'wb') as file:
            file.write(b'\xff\xd8 half an image')
    kept = {name: mtime for name, mtime in outputs(root).items() if not name.startswith('.')}
    data_utils.prepare(str(tmp_path), 'cub', workers=1)
    after = outputs(root)
    assert set(after) == set(kept) | set(lost)
    assert all(after[name] == mtime for name, mtime in kept.items())
    assert utils.load_index(str(tmp_path), 'cub') == index
    assert not temporaries(str(tmp_path))


def test_sigkill_during_conversion_then_rerun(tmp_path):
    """Kill data_utils.py mid-conversion: every image written is whole, no index yet; the next call completes."""
    root = make_cub(str(tmp_path), num_classes=4, per_class=10)
    with open(os.path.join(root, 'images.txt')) as file:
        for line in file:
            image_id, relative = line.split()
            # large noisy images, so converting them takes long enough to be interrupted
            write_image(
                os.path.join(root, 'images', relative),
                int(relative[:3]),
                int(image_id),
                size=(900, 700),
            )
    process = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, 'data_utils.py'),
            '--data_path',
            str(tmp_path),
            '--data_name',
            'cub',
            '--workers',
            '1',
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    folder = os.path.join(root, 'uncropped')
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        if (
            os.path.isdir(folder)
            and len([n for n in os.listdir(folder) if not n.startswith('.')]) >= 5
        ):
            break
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, 'data_utils.py finished before it could be killed'
    done = [name for name in os.listdir(folder) if not name.startswith('.')]
    assert 5 <= len(done) < 40
    assert not os.path.exists(utils.index_path(str(tmp_path), 'cub'))
    for name in done:
        with Image.open(os.path.join(folder, name)) as image:
            image.load()  # whole: a half-written JPEG raises here
            assert image.size == (900, 700)
    before = outputs(root)
    data_utils.prepare(str(tmp_path), 'cub', workers=1)
    after = outputs(root)
    assert len(after) == 40 and all(after[name] == before[name] for name in done)
    assert sum(map(len, utils.load_index(str(tmp_path), 'cub')['train'].values())) == 20
    assert not temporaries(str(tmp_path))
