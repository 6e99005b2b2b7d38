"""In-shop Clothes, labelled image folders and the digits demo: preparation, training,
retrieval."""

import os
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import data_utils
import utils
from conftest import make_inshop, make_folder, write_image
from script_runner import error_sentence, load_script, query_folder, temporaries, wrote_query

PREFIX = 'inshop_googlenet_proxy_anchor_16_no_pretrained_batch_size3'
INSHOP_RANKS = [1, 10, 20, 30, 40]


def prepared_files(data_path, data_name, split):
    """{class: [prepared paths]} of one split, read from the index data_utils.py wrote."""
    index = torch.load(utils.index_path(data_path, data_name), weights_only=True)
    return {
        class_id: [os.path.join(data_path, data_name, path) for path in paths]
        for class_id, paths in index[split].items()
    }


def same_pixels(prepared, source):
    """The prepared copy shows the source image (up to JPEG re-encoding) and is RGB."""
    with Image.open(prepared) as image, Image.open(source) as original:
        assert image.mode == 'RGB' and image.size == original.size
        difference = np.abs(
            np.asarray(image, dtype=float) - np.asarray(original.convert('RGB'), dtype=float)
        )
        return difference.mean() < 8


# ----------------------------------------------------------------------------------------------------------------------
# In-shop Clothes Retrieval


@pytest.mark.parametrize('under_img', [True, False], ids=['Img/img', 'img'])
def test_inshop_splits_by_the_partition_file(tmp_path, under_img):
    rows = make_inshop(str(tmp_path), under_img=under_img)
    data_utils.prepare(
        str(tmp_path), 'inshop', ('uncropped', 'cropped'), workers=1
    )  # no boxes: uncropped only
    assert not os.path.exists(utils.index_path(str(tmp_path), 'inshop', 'cropped'))
    index = torch.load(utils.index_path(str(tmp_path), 'inshop'), weights_only=True)
    assert list(index) == ['train', 'query', 'gallery']
    images = tmp_path / 'inshop' / ('Img' if under_img else '')
    for split in index:
        # each row of the partition file is in its split under its item id, at its own relative path
        expected = {}
        for name, (item, row_split) in rows.items():
            if row_split == split:
                expected.setdefault(item, []).append(f'uncropped/{name}')
        assert {item: sorted(paths) for item, paths in index[split].items()} == expected
        for item, paths in prepared_files(str(tmp_path), 'inshop', split).items():
            for path in paths:
                assert same_pixels(
                    path, images / os.path.relpath(path, tmp_path / 'inshop' / 'uncropped')
                )
    # file names repeat across items, and every copy is kept
    names = [os.path.basename(path) for paths in index['query'].values() for path in paths]
    assert len(names) > len(set(names))
    assert sorted(index['train']) == ['id_00000001', 'id_00000002']
    assert sorted(index['query']) == ['id_00000003', 'id_00000004', 'id_00000005']
    assert sorted(index['gallery']) == ['id_00000003', 'id_00000004']  # item 5 has queries only


def test_query_and_gallery_share_their_labels(tmp_path):
    """A class gets the same label in the query and the gallery, even when one of them lacks some classes."""
    make_folder(str(tmp_path), 'shops', ['a', 'b'], split='train')
    make_folder(str(tmp_path), 'shops', ['kettle', 'mug', 'teapot'], split='query')
    make_folder(str(tmp_path), 'shops', ['bowl', 'mug', 'teapot'], split='gallery')
    data_utils.prepare(str(tmp_path), 'shops', workers=1)
    readers = {
        split: utils.ImageReader(str(tmp_path), 'shops', split) for split in ('query', 'gallery')
    }
    names = {}
    for split, reader in readers.items():
        for path, label in zip(reader.images, reader.labels):
            names.setdefault(label, set()).add(os.path.basename(os.path.dirname(path)))
    assert all(
        len(classes) == 1 for classes in names.values()
    )  # one class per label, across both splits
    assert {label: classes.pop() for label, classes in names.items()} == {
        0: 'bowl',
        1: 'kettle',
        2: 'mug',
        3: 'teapot',
    }


# ----------------------------------------------------------------------------------------------------------------------
# any labelled image folder


def test_class_folders_split_in_halves_with_any_pil_format_and_other_files_skipped(
    script, tmp_path
):
    classes = [
        'sea bream',
        'carp',
        'trout',
        'eel',
        'pike',
    ]  # sorted: carp eel | pike sea bream trout
    make_folder(str(tmp_path), 'fish', classes, nested=True)
    root = tmp_path / 'fish'
    # other formats PIL reads count as images; the same file name in two formats stays two images
    for path, format_ in (
        (root / 'carp' / 'img_0.png', 'PNG'),
        (root / 'eel' / 'deep' / 'er' / 'scan.tif', 'TIFF'),
        (root / 'pike' / 'old.BMP', 'BMP'),
    ):
        os.makedirs(path.parent, exist_ok=True)
        Image.new('RGB', (30, 20), (200, 10, 10)).save(path, format=format_)
    (root / 'carp' / 'notes.txt').write_text('caught in May')
    (root / 'trout' / 'nested' / '.DS_Store').write_bytes(b'\0')
    (root / 'README.md').write_text('my fish')
    os.makedirs(root / '.thumbnails' / 'x')  # hidden: no class
    write_image(str(root / '.thumbnails' / 'x' / 'a.jpg'), 1, 0)
    write_image(str(root / 'loose.jpg'), 1, 0)  # an image outside any class folder

    for attempt in range(
        2
    ):  # a second run must not take the prepared copies (uncropped/) for a class
        status, out, err = script(
            'data_utils',
            '--data_path',
            tmp_path,
            '--data_name',
            'fish',
            '--workers',
            1,
            cwd=tmp_path,
        )
        assert status == 0, err
        skipped = [line for line in out.splitlines() if 'skipped' in line]
        assert skipped == [
            f'fish: skipped 3 files that PIL does not read as an image (such as '
            f'{root / "carp" / "notes.txt"}) and 1 file outside any class folder (such as '
            f'{root / "loose.jpg"})'
        ], out
        assert 'fish uncropped: 2 classes / 6 images train, 3 classes / 7 images test' in out

    index = torch.load(utils.index_path(str(tmp_path), 'fish'), weights_only=True)
    assert list(index['train']) == ['carp', 'eel'] and list(index['test']) == [
        'pike',
        'sea bream',
        'trout',
    ]
    assert all(isinstance(name, str) for split in index.values() for name in split)
    assert sorted(index['train']['carp']) == [
        'uncropped/carp/img_0.png.jpg',
        'uncropped/carp/nested/img_0.jpg',
        'uncropped/carp/nested/img_1.jpg',
    ]
    assert 'uncropped/eel/deep/er/scan.tif.jpg' in index['train']['eel']
    assert 'uncropped/pike/old.BMP.jpg' in index['test']['pike']
    for split in ('train', 'test'):
        for name, paths in prepared_files(str(tmp_path), 'fish', split).items():
            for path in paths:
                source = str(root / os.path.relpath(path, root / 'uncropped'))
                source = source if os.path.exists(source) else source[: -len('.jpg')]
                assert same_pixels(path, source)
                assert (
                    os.path.relpath(source, root).split(os.sep)[0] == name
                )  # an image of its own class folder
    # the training reader labels classes in name order
    reader = utils.ImageReader(str(tmp_path), 'fish', 'test')
    assert [
        os.path.relpath(path, root / 'uncropped').split(os.sep)[0] for path in reader.images
    ] == ['pike'] * 3 + ['sea bream'] * 2 + ['trout'] * 2 and reader.labels == [0, 0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize('splits', [('train', 'test'), ('train', 'query', 'gallery')])
def test_split_folders_are_used_as_given(tmp_path, splits):
    for (
        split
    ) in (
        splits
    ):  # the test classes here overlap the training ones: the given split is kept as it is
        make_folder(
            str(tmp_path),
            'mine',
            ['a b', 'c', 'd'][: 3 if split == 'train' else 2],
            per_class=2,
            split=split,
        )
    data_utils.prepare(str(tmp_path), 'mine', workers=1)
    index = torch.load(utils.index_path(str(tmp_path), 'mine'), weights_only=True)
    assert list(index) == list(splits)
    for split in splits:
        expected_classes = ['a b', 'c', 'd'] if split == 'train' else ['a b', 'c']
        assert {name: sorted(paths) for name, paths in index[split].items()} == {
            name: [f'uncropped/{split}/{name}/img_0.jpg', f'uncropped/{split}/{name}/img_1.jpg']
            for name in expected_classes
        }


def test_train_on_a_name_never_prepared_is_one_sentence(script, tmp_path):
    status, _, err = script(
        'train',
        '--data_path',
        tmp_path,
        '--data_name',
        'holiday photos',
        '--no_pretrained',
        cwd=tmp_path,
    )
    line = error_sentence(status, err)
    assert line.startswith(
        f'error: there is no data set holiday photos under {tmp_path} (it holds no data set '
        f'folder)'
    )
    assert not os.path.exists(tmp_path / 'results')


def test_demo_is_a_digits_folder(script, tmp_path):
    status, out, err = script(
        'data_utils', '--data_path', tmp_path / 'data', '--make_demo', '--workers', 1, cwd=tmp_path
    )
    assert status == 0, err
    root = tmp_path / 'data' / 'digits'
    assert sorted(os.listdir(tmp_path / 'data')) == ['digits']  # no benchmark's name
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in range(10):
        files = sorted(os.listdir(root / str(digit)))
        assert files == [f'digit_{digit}_{k:04d}.jpg' for k in range(40)]
        with Image.open(
            root / str(digit) / files[3]
        ) as image:  # the 4th scikit-learn image of that digit, 8x upscaled
            small = np.asarray(image.convert('L').resize((8, 8), Image.BOX), dtype=float) * 16 / 255
        assert np.abs(small - digits.images[digits.target == digit][3]).mean() < 1.5
    assert 'digits uncropped: 5 classes / 200 images train, 5 classes / 200 images test' in out
    index = torch.load(utils.index_path(str(tmp_path / 'data'), 'digits'), weights_only=True)
    assert list(index['train']) == ['0', '1', '2', '3', '4'] and list(index['test']) == [
        '5',
        '6',
        '7',
        '8',
        '9',
    ]
    assert 'uncropped/7/digit_7_0003.jpg' in index['test']['7']  # the README's quick-start query


# ----------------------------------------------------------------------------------------------------------------------
# training on In-shop, and test.py against its gallery


@pytest.fixture(scope='module')
def inshop_run(tmp_path_factory):
    """A 1-epoch train.py run on the In-shop fixture at In-shop's ranks; returns (run folder, data path)."""
    data = str(tmp_path_factory.mktemp('data'))
    make_inshop(data)
    data_utils.prepare(data, 'inshop', workers=1)
    run = tmp_path_factory.mktemp('run')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            sys,
            'argv',
            [
                'train.py',
                '--data_path',
                data,
                '--data_name',
                'inshop',
                '--backbone_type',
                'googlenet',
                '--no_pretrained',
                '--feature_dim',
                '16',
                '--batch_size',
                '3',
                '--num_epochs',
                '1',
                '--num_workers',
                '0',
                '--recalls',
                '1,10,20,30,40',
            ],
        )
        patch.chdir(run)
        load_script('train').main()
    return run, data


def test_inshop_training_evaluates_queries_against_the_gallery(inshop_run):
    run, data = inshop_run
    data_base = torch.load(run / 'results' / f'{PREFIX}_1_data_base.pth', weights_only=True)
    # the test_* entries hold the queries; the gallery is stored beside them
    for split, key in (('query', 'test'), ('gallery', 'gallery')):
        files = prepared_files(data, 'inshop', split)
        assert sorted(data_base[f'{key}_images']) == sorted(
            path for paths in files.values() for path in paths
        )
        assert data_base[f'{key}_features'].shape == (len(data_base[f'{key}_images']), 16)
    # one label per item across queries and gallery, checked against the item folder in each path
    item = {}
    for key in ('test', 'gallery'):
        for path, label in zip(data_base[f'{key}_images'], data_base[f'{key}_labels'].tolist()):
            item.setdefault(label, set()).add(os.path.basename(os.path.dirname(path)))
    assert all(len(items) == 1 for items in item.values()) and len(item) == 3

    frame = pd.read_csv(run / 'results' / f'{PREFIX}_statistics.csv', index_col='epoch')
    assert list(frame.columns) == ['train_loss', 'train_accuracy'] + [
        f'test_recall@{k}' for k in INSHOP_RANKS
    ] + ['test_map@r', 'test_r_precision']
    metrics = utils.retrieval_metrics(
        data_base['test_features'],
        data_base['test_labels'],
        INSHOP_RANKS,
        gallery_features=data_base['gallery_features'],
        gallery_labels=data_base['gallery_labels'],
    )
    for key, value in metrics.items():
        assert frame.loc[1, f'test_{key}'] == pytest.approx(value, abs=1e-6), key
    # 5 queries, the 3 of item 5 without gallery images: at most 2 can ever hit, and with 4 gallery images K >= 4
    # retrieves them all, so both do
    assert frame.loc[1, 'test_recall@10'] == pytest.approx(2 / 5)


def crafted(run, name, query_features, gallery_features):
    """The In-shop data base with chosen embeddings, saved as results/<name>_1_data_base.pth beside the model."""
    import shutil

    data_base = torch.load(run / 'results' / f'{PREFIX}_1_data_base.pth', weights_only=True)
    data_base['test_features'], data_base['gallery_features'] = query_features, gallery_features
    torch.save(data_base, run / 'results' / f'{name}_1_data_base.pth')
    shutil.copy(run / 'results' / f'{PREFIX}_1_model.pth', run / 'results' / f'{name}_1_model.pth')
    return data_base, f'{name}_1_data_base.pth'


def border(path):
    """The mean colour of a result image's top border."""
    with Image.open(path) as image:
        return np.asarray(image, dtype=float)[1:4, 50:170].reshape(-1, 3).mean(axis=0)


def results_of(folder):
    """[(rank, similarity, file)] of the retrieval images test.py wrote, by rank."""
    found = []
    for name in os.listdir(folder):
        if name.startswith('retrieval_img_'):
            _, _, rank, similarity = os.path.splitext(name)[0].split('_')
            found.append((int(rank), float(similarity), folder / name))
    return sorted(found)


@pytest.mark.parametrize('query_from', ['query', 'gallery'])
def test_inshop_query_ranks_the_gallery(script, inshop_run, query_from):
    run, _ = inshop_run
    # angles in the first two dimensions: gallery items 3 3 4 4 at 0, 50, 20, 35 degrees
    gallery_degrees = torch.tensor([0.0, 50.0, 20.0, 35.0])
    query_degrees = torch.tensor([8.0, 90.0, 60.0, 70.0, 80.0])
    features = {}
    for key, degrees in (('test', query_degrees), ('gallery', gallery_degrees)):
        features[key] = torch.zeros(len(degrees), 16)
        features[key][:, 0], features[key][:, 1] = (
            torch.deg2rad(degrees).cos(),
            torch.deg2rad(degrees).sin(),
        )
    data_base, name = crafted(
        run, f'inshop_angles_{query_from}', features['test'], features['gallery']
    )
    assert (
        data_base['gallery_labels'].tolist() == [0, 0, 1, 1]
        and data_base['test_labels'].tolist()[0] == 0
    )
    if (
        query_from == 'query'
    ):  # query 0 (item 3, at 8 degrees): the gallery at 0, 20, 35, 50 degrees
        query, order = data_base['test_images'][0], [0, 2, 3, 1]
    else:  # gallery image 2 (item 4, at 20 degrees): itself excluded, then 35, 0 and 50 degrees
        query, order = data_base['gallery_images'][2], [3, 0, 1]
    status, out, err = script(
        'test', '--query_img_name', query, '--data_base', name, '--retrieval_num', 5, cwd=run
    )
    assert status == 0, err
    labels = data_base['gallery_labels'].tolist()
    query_label = 0 if query_from == 'query' else 1
    hits = sum(labels[i] == query_label for i in order)
    assert f'wrote the query and its {len(order)} nearest images, {hits} of the same class' in out
    # every item has the same file names: the folder is named by the item too, so queries never overwrite each other
    item, stem = query.split(os.sep)[-2], os.path.splitext(os.path.basename(query))[0]
    assert wrote_query(out, f'{item}_{stem}')
    found = results_of(query_folder(run / 'results', f'{item}_{stem}'))
    query_degree = 8.0 if query_from == 'query' else 20.0
    assert [rank for rank, _, _ in found] == list(range(1, len(order) + 1))
    for (rank, similarity, path), position in zip(found, order):
        expected = np.cos(np.deg2rad(gallery_degrees[position].item() - query_degree))
        assert similarity == pytest.approx(expected, abs=1e-4), rank
        colour = (0, 160, 0) if labels[position] == query_label else (220, 0, 0)
        assert np.abs(border(path) - colour).max() < 40, rank


def test_inshop_outside_image_ranks_the_gallery(script, inshop_run, tmp_path):
    run, _ = inshop_run
    query = tmp_path / 'my_shirt.png'
    Image.new('RGB', (50, 70), (30, 90, 200)).save(query)
    status, out, err = script(
        'test',
        '--query_img_name',
        query,
        '--data_base',
        f'{PREFIX}_1_data_base.pth',
        '--retrieval_num',
        10,
        cwd=run,
    )
    assert status == 0, err
    assert 'wrote the query and its 4 nearest images to results/' in out  # the 4 gallery images
    assert wrote_query(out, 'my_shirt')
    for _, _, path in results_of(query_folder(run / 'results', 'my_shirt')):
        assert np.abs(border(path) - (128, 128, 128)).max() < 40
