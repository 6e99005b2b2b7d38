"""test.py on a model trained on a folder of your own PNG photos: a query given as the original
photo, results printed as the original files, a mistyped query, more results than there are
images, the similarity a class's own pairs reach, and a report after the photos moved."""

import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data_utils
import utils
from conftest import TINY, train_in
from neighbours import same_class_cosines
from script_runner import error_sentence, query_folder

CLASSES = ['apollo', 'gemini', 'hubble', 'mercury']  # apollo and gemini train, the others test
DATA_BASE = (
    f'album_{TINY.replace("/", "-")}_proxy_anchor_16_no_pretrained_batch_size4_1_' f'data_base.pth'
)


def write_album(folder):
    """album/<class>/IMG_000k.png: 3 PNG photos a class, coloured by class."""
    for number, name in enumerate(CLASSES, 1):
        os.makedirs(os.path.join(folder, name))
        for k in range(3):
            rng = np.random.default_rng(10 * number + k)
            base = np.array([(37 * number) % 256, (91 * number) % 256, (151 * number) % 256])
            pixels = np.clip(base + rng.normal(0, 20, (30, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, name, f'IMG_000{k}.png'))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """(the run's folder, the data folder): one epoch of timm's test network on the album."""
    data = tmp_path_factory.mktemp('data')
    write_album(str(data / 'album'))
    data_utils.prepare(str(data), 'album', workers=1)
    run = tmp_path_factory.mktemp('run')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, 'IMAGE_SIZE', 64)
        patch.setattr(utils, 'RESIZE_SIZE', 73)
        train_in(
            run,
            '--data_path',
            data,
            '--data_name',
            'album',
            '--backbone_type',
            TINY,
            '--no_pretrained',
            '--feature_dim',
            16,
            '--batch_size',
            4,
            '--num_epochs',
            1,
            '--num_workers',
            0,
        )
    return run, data


def printed_rows(out):
    """(rank, similarity, same class, path) of each row test.py printed."""
    return [
        (int(rank), float(similarity), same, path)
        for rank, similarity, same, path in re.findall(
            r'^\s+(\d+)\s+([-\d.]+)\s+(yes|no|)\s+(\S.*)$', out, re.MULTILINE
        )
    ]


def test_the_original_photo_is_the_data_base_image_prepared_from_it(script, trained):
    run, data = trained
    original = data / 'album' / 'hubble' / 'IMG_0000.png'
    copy = data / 'album' / 'uncropped' / 'hubble' / 'IMG_0000.png.jpg'
    status, by_copy, err = script(
        'test', '--data_base', DATA_BASE, '--query_img_name', copy, cwd=run
    )
    assert status == 0, err
    by_copy_csv = (query_folder(run / 'results', 'hubble_IMG_0000.png') / 'results.csv').read_text()
    status, out, err = script(
        'test', '--data_base', DATA_BASE, '--query_img_name', original, cwd=run
    )
    assert status == 0, err
    # the same search as from the data base's copy: the query's class is known, it is not its
    # own result
    assert (
        query_folder(run / 'results', 'hubble_IMG_0000.png') / 'results.csv'
    ).read_text() == by_copy_csv
    frame = pd.read_csv(query_folder(run / 'results', 'hubble_IMG_0000.png') / 'results.csv')
    assert str(copy) not in set(frame['path']) and len(frame) == 5
    assert 'of the same class' in out
    # printed as the user's own files, which exist, not as the prepared copies
    assert f'{original}:\n' in out
    rows = printed_rows(out)
    assert len(rows) == 5 and all(same in ('yes', 'no') for _, _, same, _ in rows)
    for (_, _, same, path), stored in zip(rows, frame['path']):
        assert os.path.isfile(path) and path.endswith('.png') and 'uncropped' not in path
        assert (
            stored
            == str(data / 'album' / 'uncropped' / os.path.relpath(path, data / 'album')) + '.jpg'
        )
        assert (same == 'yes') == (os.path.basename(os.path.dirname(path)) == 'hubble')
    assert printed_rows(by_copy) == rows


def test_a_missing_query_suggests_close_names_in_its_folder_or_none(script, trained):
    run, data = trained
    folder = data / 'album' / 'hubble'
    status, _, err = script(
        'test', '--data_base', DATA_BASE, '--query_img_name', folder / 'IMG_000.png', cwd=run
    )
    sentence = error_sentence(status, err)
    suggested = re.search(r'did you mean (.*)\?\)', sentence).group(1)
    assert sorted(re.split(r', | or ', suggested)) == [
        str(folder / f'IMG_000{k}.png') for k in range(3)
    ]
    status, _, err = script(
        'test', '--data_base', DATA_BASE, '--query_img_name', folder / 'rocket_99_000.jpg', cwd=run
    )
    sentence = error_sentence(status, err)
    assert f'({folder} holds no file of a similar name)' in sentence
    assert 'uncropped' not in sentence  # no image of the data base is offered instead
    status, _, err = script(
        'test', '--data_base', DATA_BASE, '--query_img_name', data / 'nowhere' / 'x.jpg', cwd=run
    )
    assert f'(there is no folder {data / "nowhere"})' in error_sentence(status, err)


def test_more_results_than_images_are_said_and_drawn_in_rows(script, trained, tmp_path):
    run, data = trained
    # a folder of 24 photos searched: 23 results besides the query, drawn 10 a row
    photos = tmp_path / 'photos'
    os.makedirs(photos)
    for k in range(24):
        shutil.copy(data / 'album' / CLASSES[k % 4] / f'IMG_000{k % 3}.png', photos / f'{k}.png')
    status, out, err = script(
        'test',
        '--data_base',
        DATA_BASE,
        '--query_img_name',
        photos / '0.png',
        '--gallery',
        photos,
        '--retrieval_num',
        500,
        cwd=run,
    )
    assert status == 0, err
    assert (
        '--retrieval_num 500 is more than the 23 images there are to search (besides the '
        'query), so all 23 are shown' in out
    )
    with Image.open(query_folder(run / 'results', '0') / 'retrieval.png') as drawn:
        width, height = drawn.size
    # 11 columns (the query, then 10 results) and 3 rows, as draw_row lays them out at 120 dpi
    assert (width, height) == (round(1.6 * 11 * 120), round(2.0 * 3 * 120))
    status, out, err = script(
        'test',
        '--data_base',
        DATA_BASE,
        '--query_img_name',
        photos / '0.png',
        '--gallery',
        photos,
        cwd=run,
    )
    assert status == 0, err
    assert 'is more than' not in out


def test_the_similarity_a_class_own_pairs_reach_is_printed(script, trained):
    run, data = trained
    status, out, err = script(
        'test',
        '--data_base',
        DATA_BASE,
        '--query_img_name',
        data / 'album' / 'hubble' / 'IMG_0001.png',
        cwd=run,
    )
    assert status == 0, err
    data_base = torch.load(run / 'results' / DATA_BASE, weights_only=True)
    features = F.normalize(data_base['test_features'].double(), dim=1)
    labels = data_base['test_labels']
    # brute force: every pair of distinct test images of one class
    pairs = [
        (features[i] @ features[j]).item()
        for i in range(len(labels))
        for j in range(i + 1, len(labels))
        if labels[i] == labels[j]
    ]
    low, median, high = np.quantile(pairs, [0.25, 0.5, 0.75])
    assert (
        f"same-class pairs of the data base's test set reach a similarity of {median:.3f} "
        f'(median; half lie between {low:.3f} and {high:.3f})'
    ) in out
    # the block sweep gives each pair once from each side
    swept = same_class_cosines(data_base['test_features'], labels)
    assert sorted(swept.tolist()) == pytest.approx(sorted(pairs + pairs), abs=1e-6)


def test_report_on_moved_photos_says_so_and_keeps_an_earlier_complete_report(
    script, trained, tmp_path
):
    run, data = trained
    work = tmp_path / 'work'
    shutil.copytree(run / 'results', work / 'results', ignore=shutil.ignore_patterns('*_report'))
    status, _, err = script('test', '--data_base', DATA_BASE, '--report', cwd=work)
    assert status == 0, err
    report = work / 'results' / f'{DATA_BASE[:-len(".pth")]}_report'
    page = (report / 'index.html').read_bytes()
    moved = tmp_path / 'moved'
    shutil.copytree(data, moved)
    hidden = tmp_path / 'hidden'
    os.rename(data, hidden)  # the photos are no longer where the run was trained
    try:
        status, _, err = script('test', '--data_base', DATA_BASE, '--report', cwd=work)
        sentence = error_sentence(status, err)
        assert 'as --data_path' in sentence and 'earlier report' in sentence
        assert (report / 'index.html').read_bytes() == page  # kept
        # without an earlier report, one is written without pictures, and the terminal says why
        shutil.rmtree(report)
        status, out, err = script('test', '--data_base', DATA_BASE, '--report', cwd=work)
        assert status == 0, err
        assert out.startswith(
            f'warning: the images of data base results/{DATA_BASE} are not ' f'under {data}'
        )
        assert 'pass the folder that now holds album/ as --data_path' in out
        with open(report / 'summary.json') as file:
            assert json.load(file)['missing']
        # pointed at their new place, the report has its pictures again and replaces that one
        status, out, err = script(
            'test', '--data_base', DATA_BASE, '--report', '--data_path', moved, cwd=work
        )
        assert status == 0, err
        assert 'warning' not in out
        with open(report / 'summary.json') as file:
            assert not json.load(file)['missing']
    finally:
        os.rename(hidden, data)
