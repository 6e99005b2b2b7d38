"""Your own photos as a practitioner meets them: a model from another run, collapsed embeddings,
stale prepared copies, data that moved, results as text, many queries, typos, the demo."""

import contextlib
import io
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data_utils
import runs
import utils
from conftest import TINY, make_cub, make_folder, train_in, write_image
from model import Model
from script_runner import error_sentence, load_script, query_folder, wrote_query

PREFIX = 'cub_googlenet_proxy_anchor_16_no_pretrained_batch_size4'
DATA_BASE = f'{PREFIX}_1_data_base.pth'
TRAIN = [
    '--data_name',
    'cub',
    '--backbone_type',
    'googlenet',
    '--no_pretrained',
    '--feature_dim',
    16,
    '--batch_size',
    4,
    '--num_epochs',
    1,
    '--num_workers',
    0,
]


def train_relative(work):
    """Prepare a 4-class CUB-layout set in work/data and train 1 epoch in work with the relative --data_path data,
    as the quick start trains (64-pixel crops, PyTorch's own convolutions: seconds); returns train.py's output.
    """
    make_cub(str(work / 'data'), num_classes=4, per_class=3)
    data_utils.prepare(str(work / 'data'), 'cub', workers=1)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, torch.backends.mkldnn.flags(
        enabled=False
    ), contextlib.redirect_stdout(out):
        patch.setattr(utils, 'IMAGE_SIZE', 64)
        patch.setattr(utils, 'RESIZE_SIZE', 73)
        train_in(work, '--data_path', 'data', *TRAIN)
    return out.getvalue()


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One such run for the tests that only read it: (its working folder, train.py's output)."""
    work = tmp_path_factory.mktemp('trained') / 'work'
    return work, train_relative(work)


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run's results/ in tmp_path/work, for a test to change; the images stay where the run
    was trained, as the data base's absolute paths say."""
    work = tmp_path / 'work'
    shutil.copytree(trained[0] / 'results', work / 'results')
    return work, trained[1]


def photo(path, seed):
    """A PNG of random smooth colours, in no data base."""
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).resize((80, 60), Image.BILINEAR).save(path, format='PNG')
    return str(path)


def saved_model(model_path, data_base):
    """The saved weights in a model built here, in eval mode."""
    net = Model('googlenet', 16, data_base['proxies'].size(0), pretrained=False)
    net.load_state_dict(torch.load(model_path, weights_only=True))
    return net.eval()


@torch.inference_mode()
def independent_embedding(net, image):
    """The embedding of an image file by net, computed here with the test-time transform."""
    return net.embed(utils.test_transform()(utils.read_image(image))[None])[0]  # (D,)


# ----------------------------------------------------------------------------------------------------------------------
# the model beside the data base must be the one it was written with


def test_weights_digest_tells_weights_apart():
    state = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2)
    ).state_dict()
    copy = {name: tensor.clone() for name, tensor in state.items()}
    assert runs.weights_sha256(copy) == runs.weights_sha256(state)
    name = '0.weight'
    copy[name].view(-1)[3] = torch.nextafter(
        copy[name].view(-1)[3], torch.tensor(2.0)
    )  # one value, one ulp
    assert runs.weights_sha256(copy) != runs.weights_sha256(state)
    assert runs.weights_sha256({name: state[name].bfloat16()}) != runs.weights_sha256(
        {name: state[name]}
    )


def test_a_model_of_another_run_with_the_same_shapes_is_refused(script, run, tmp_path, small_crops):
    work, _ = run
    data_base = torch.load(work / 'results' / DATA_BASE, weights_only=True)
    model_path = work / 'results' / f'{PREFIX}_1_model.pth'
    weights = torch.load(model_path, weights_only=True)
    assert data_base['weights_sha256'] == runs.weights_sha256(weights)
    query = photo(tmp_path / 'mine.png', 0)
    assert script('test', '--data_base', DATA_BASE, '--query_img_name', query, cwd=work)[0] == 0

    other = torch.load(
        model_path, weights_only=True
    )  # as another seed's run: the same shapes, other values
    torch.save(
        {
            name: value + 0.01 * torch.randn_like(value) if value.is_floating_point() else value
            for name, value in other.items()
        },
        model_path,
    )
    status, _, err = script('test', '--data_base', DATA_BASE, '--query_img_name', query, cwd=work)
    assert error_sentence(status, err) == (
        f'error: results/{PREFIX}_1_model.pth holds other weights than those data base results/{DATA_BASE} was '
        f'written with (a model of another run or epoch); put the _model.pth file train.py wrote with this data base '
        f'beside it'
    )

    # a data base written before the digest existed cannot tell, and says nothing
    del data_base['weights_sha256']
    torch.save(data_base, work / 'results' / DATA_BASE)
    status, out, err = script('test', '--data_base', DATA_BASE, '--query_img_name', query, cwd=work)
    assert status == 0, err
    assert 'warning' not in out + err


# ----------------------------------------------------------------------------------------------------------------------
# collapsed embeddings


def brute_force_mean_cosine(features):
    """The mean of the off-diagonal entries of the cosine matrix."""
    units = F.normalize(features.double(), dim=1)
    cosines = units @ units.T
    n = len(units)
    return ((cosines.sum() - cosines.diagonal().sum()) / (n * (n - 1))).item()


def test_collapse_detector_on_constructed_embeddings():
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(64, generator=generator)
    collapsed = direction + 1e-3 * torch.randn(
        200, 64, generator=generator
    )  # one direction, a little noise
    centres = torch.randn(10, 64, generator=generator)
    healthy = centres.repeat_interleave(20, 0) + 0.3 * torch.randn(
        200, 64, generator=generator
    )  # 10 tight classes
    # positive features, as after a ReLU: all in one orthant, yet well apart
    positive = torch.rand(200, 64, generator=generator)
    for features in (collapsed, healthy, positive):
        assert utils.mean_pairwise_cosine(features) == pytest.approx(
            brute_force_mean_cosine(features), abs=1e-9
        )
    assert utils.mean_pairwise_cosine(collapsed) > utils.COLLAPSED
    assert utils.mean_pairwise_cosine(healthy) < utils.COLLAPSED
    assert utils.mean_pairwise_cosine(positive) < utils.COLLAPSED
    # the retrieval a user saw on collapsed embeddings: every similarity reads 1.000
    assert (F.normalize(collapsed, dim=1) @ F.normalize(collapsed[0], dim=0)).min() > 0.999


@pytest.mark.parametrize('collapse', [True, False])
def test_train_warns_in_one_line_when_the_test_embeddings_collapse(
    script, tmp_path, quick_runs, collapse
):
    """BN-Inception from random weights embeds these images all alike (mean cosine 1.000000 to six
    places), and keeps doing so through 2 epochs; timm's test network does not (about 0.7)."""
    data = tmp_path / 'data'
    make_cub(str(data), num_classes=4, per_class=3)
    data_utils.prepare(str(data), 'cub', workers=1)
    backbone = 'inception' if collapse else TINY
    status, out, err = script(
        'train',
        '--data_path',
        data,
        *TRAIN[:-4],
        '--backbone_type',
        backbone,
        '--num_epochs',
        2,
        '--num_workers',
        0,
        cwd=tmp_path,
    )
    assert status == 0, err
    warnings = [line for line in out.splitlines() if line.startswith('warning:')]
    if collapse:
        assert len(warnings) == 2  # one line per epoch
        assert warnings[0].startswith('warning: the test embeddings of epoch 1 have collapsed')
        assert warnings[1].startswith('warning: the test embeddings of epoch 2 have collapsed')
        assert (
            'try --backbone_type timm/resnet18, pretrained weights (without --no_pretrained) or a lower --lr '
            'than 0.0001'
        ) in warnings[0]
    else:
        assert warnings == []


# ----------------------------------------------------------------------------------------------------------------------
# prepared copies follow their photos


def test_preparing_again_follows_edited_added_and_deleted_photos(tmp_path):
    data = str(tmp_path)
    written = make_folder(data, 'shop', ['a', 'b', 'c', 'd'], per_class=2)
    data_utils.prepare(data, 'shop', workers=1)
    copy = lambda source: os.path.join(
        data, 'shop', 'uncropped', os.path.relpath(source, os.path.join(data, 'shop'))
    )
    edited, deleted, untouched = written['a'][0], written['b'][1], written['c'][0]
    before = os.stat(copy(untouched))

    write_image(edited, 9, 9)  # other colours
    stamp = os.stat(edited).st_mtime_ns + 10**9
    os.utime(
        edited, ns=(stamp, stamp)
    )  # a second later, whatever the file system's clock resolution
    os.remove(deleted)
    added = os.path.join(data, 'shop', 'd', 'new', 'img_7.jpg')
    write_image(added, 4, 7)
    data_utils.prepare(data, 'shop', workers=1)

    with Image.open(copy(edited)) as image, Image.open(edited) as source:
        difference = np.abs(
            np.asarray(image, dtype=float) - np.asarray(source.convert('RGB'), dtype=float)
        )
        assert difference.mean() < 8  # the new pixels, not the old ones (another class colour)
    assert not os.path.exists(copy(deleted)) and os.path.isfile(copy(added))
    assert (
        os.stat(copy(untouched)).st_ino == before.st_ino
    )  # an up-to-date copy is not written again
    index = torch.load(utils.index_path(data, 'shop'), weights_only=True)
    listed = {path for split in index.values() for paths in split.values() for path in paths}
    assert f'uncropped/{os.path.relpath(added, os.path.join(data, "shop"))}' in listed
    assert f'uncropped/{os.path.relpath(deleted, os.path.join(data, "shop"))}' not in listed
    # every listed copy exists, and nothing else is left in the prepared folder
    on_disk = {
        os.path.relpath(os.path.join(parent, name), os.path.join(data, 'shop'))
        for parent, _, files in os.walk(os.path.join(data, 'shop', 'uncropped'))
        for name in files
    }
    assert on_disk == listed


# ----------------------------------------------------------------------------------------------------------------------
# paths that survive a move; results as text; many queries


def test_train_says_what_it_wrote(trained):
    work, out = trained
    line = out.strip().splitlines()[-1]
    assert line.startswith(
        f'wrote results/{DATA_BASE}, results/{PREFIX}_1_model.pth (epoch 1) and '
        f'results/{PREFIX}_statistics.csv; see a retrieval: python test.py --data_base '
        f'{PREFIX.split("_")[0]} --query_img_name '  # the one run here: its first part is enough
    )
    for name in (DATA_BASE, f'{PREFIX}_1_model.pth', f'{PREFIX}_statistics.csv'):
        assert (work / 'results' / name).is_file()


def test_results_are_printed_and_written_as_csv_for_many_queries(
    script, run, tmp_path, monkeypatch, small_crops
):
    work, _ = run
    data_base = torch.load(work / 'results' / DATA_BASE, weights_only=True)
    # a random-weight model embeds the fixture's images almost identically, which leaves the ranking to rounding:
    # chosen test embeddings make it well defined
    data_base['test_features'] = F.normalize(
        torch.randn(len(data_base['test_images']), 16, generator=torch.Generator().manual_seed(0)),
        dim=1,
    )
    torch.save(data_base, work / 'results' / DATA_BASE)
    model_path = work / 'results' / f'{PREFIX}_1_model.pth'
    known = data_base['test_images'][1]
    # two photos of one name in two folders, and a data base image: three queries, three folders
    photos = [
        photo(tmp_path / 'album' / folder / 'beach.png', seed)
        for seed, folder in enumerate(('2019', '2020'))
    ]
    test_py = load_script('test')
    loads = []
    original = test_py.load_model
    monkeypatch.setattr(test_py, 'load_model', lambda *a, **k: loads.append(1) or original(*a, **k))
    elsewhere = tmp_path / 'elsewhere'  # any working folder: the data base paths are absolute
    elsewhere.mkdir()
    status, out, err = script(
        'test',
        '--data_base',
        work / 'results' / DATA_BASE,
        '--query_img_name',
        known,
        tmp_path / 'album',
        '--retrieval_num',
        3,
        cwd=elsewhere,
    )
    assert status == 0, err
    assert len(loads) == 1  # the model loads once for both photos

    name = os.path.splitext(os.path.basename(known))[0]
    features, labels = F.normalize(data_base['test_features'], dim=1), data_base['test_labels']
    similarities = features @ features[1]
    similarities[1] = -2
    assert not (elsewhere / 'results').exists()  # written beside the run's data base
    frame = pd.read_csv(query_folder(work / 'results', name) / 'results.csv')
    assert list(frame.columns) == ['rank', 'path', 'similarity', 'same_class']
    order = similarities.argsort(descending=True)[:3].tolist()
    assert frame['rank'].tolist() == [1, 2, 3]
    assert frame['path'].tolist() == [data_base['test_images'][i] for i in order]
    np.testing.assert_allclose(frame['similarity'], similarities[order].numpy(), atol=1e-5)
    assert frame['same_class'].tolist() == [bool(labels[i] == labels[1]) for i in order]
    assert (
        f'wrote the query and its 3 nearest images, {frame["same_class"].sum()} of the same class to '
        f'{work / "results"}/' in out
        and wrote_query(out, name)
    )
    for rank, path, similarity in zip(frame['rank'], frame['path'], frame['similarity']):
        assert any(
            line.split()
            == [
                str(rank),
                f'{similarity:.4f}',
                'yes' if labels[data_base['test_images'].index(path)] == labels[1] else 'no',
                path,
            ]
            for line in out.splitlines()
        )

    net = saved_model(model_path, data_base)
    for query, folder in zip(photos, ('2019_beach', '2020_beach')):
        frame = pd.read_csv(
            query_folder(work / 'results', folder) / 'results.csv', keep_default_na=False
        )
        expected = F.normalize(data_base['test_features'], dim=1) @ F.normalize(
            independent_embedding(net, query), dim=0
        )
        np.testing.assert_allclose(frame['similarity'], expected.topk(3).values.numpy(), atol=2e-4)
        for path, similarity in zip(
            frame['path'], frame['similarity']
        ):  # each path with its own similarity
            assert similarity == pytest.approx(
                expected[data_base['test_images'].index(path)].item(), abs=2e-4
            )
        assert frame['same_class'].tolist() == [
            '',
            '',
            '',
        ]  # a photo of one's own: its class is unknown
        assert wrote_query(out, folder)


def test_a_moved_run_and_data_folder(script, tmp_path, small_crops):
    work = tmp_path / 'work'
    train_relative(work)
    data_base = torch.load(work / 'results' / DATA_BASE, weights_only=True)
    assert data_base['data_root'] == str(work / 'data')
    assert all(os.path.isabs(path) for path in data_base['test_images'] + data_base['train_images'])
    relative = os.path.relpath(data_base['test_images'][0], work / 'data')

    moved = tmp_path / 'moved'
    shutil.move(work, moved)  # the working folder, with its data folder and results/
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    status, _, err = script(
        'test',
        '--data_base',
        moved / 'results' / DATA_BASE,
        '--query_img_name',
        moved / 'data' / relative,
        cwd=elsewhere,
    )
    assert error_sentence(status, err) == (
        f'error: the images of data base {moved / "results" / DATA_BASE} are not under {work / "data"}, where it '
        f'was trained (there is no {data_base["test_images"][0]}); if they moved, pass the folder that now holds cub/ '
        f'as --data_path'
    )
    assert not (elsewhere / 'results').exists()

    status, out, err = script(
        'test',
        '--data_base',
        moved / 'results' / DATA_BASE,
        '--query_img_name',
        moved / 'data' / relative,
        '--data_path',
        moved / 'data',
        cwd=elsewhere,
    )
    assert status == 0, err
    assert 'of the same class' in out  # recognised as the data base image it is: its class is known
    frame = pd.read_csv(
        query_folder(moved / 'results', os.path.splitext(os.path.basename(relative))[0])
        / 'results.csv'
    )
    assert all(path.startswith(str(moved / 'data' / 'cub' / 'uncropped')) for path in frame['path'])
    assert all(os.path.isfile(path) for path in frame['path'])


def test_an_old_data_base_with_relative_paths_works_from_its_folder(script, trained, tmp_path):
    work = tmp_path / 'work'
    shutil.copytree(trained[0], work)
    data_base = torch.load(work / 'results' / DATA_BASE, weights_only=True)
    for key in ('data_root', 'weights_sha256'):
        del data_base[key]
    for key in ('test_images', 'train_images'):  # as train.py --data_path data stored them before
        data_base[key] = [os.path.relpath(path, trained[0]) for path in data_base[key]]
    torch.save(data_base, work / 'results' / 'old_1_data_base.pth')
    shutil.copyfile(
        work / 'results' / f'{PREFIX}_1_model.pth', work / 'results' / 'old_1_model.pth'
    )
    status, out, err = script(
        'test',
        '--data_base',
        'old_1_data_base.pth',
        '--query_img_name',
        data_base['test_images'][2],
        cwd=work,
    )
    assert status == 0, err
    assert 'of the same class' in out


# ----------------------------------------------------------------------------------------------------------------------
# typos


def test_typos_get_suggestions(script, tmp_path, quick_runs):
    data = tmp_path / 'data'
    make_cub(str(data), num_classes=4, per_class=3)
    data_utils.prepare(str(data), 'cub', workers=1)
    status, _, err = script(
        'train', '--data_path', data, '--data_name', 'cbu', '--no_pretrained', cwd=tmp_path
    )
    assert error_sentence(status, err) == (
        f'error: there is no data set cbu under {data} (did you mean cub?); '
        f'pass the name of a folder there, or put your data set there as '
        f'{data / "cbu"}'
    )
    status, _, err = script(
        'train',
        '--data_path',
        tmp_path / 'dat',
        '--data_name',
        'cub',
        '--no_pretrained',
        cwd=tmp_path,
    )
    assert error_sentence(status, err).startswith(
        f'error: --data_path {tmp_path / "dat"} does not exist'
    )
    status, _, err = script(
        'train',
        '--data_path',
        data,
        '--data_name',
        'cub',
        '--backbone_type',
        'resnet18',
        cwd=tmp_path,
    )
    assert 'pass --backbone_type timm/resnet18' in error_sentence(status, err)
    assert not (tmp_path / 'results').exists()

    # a trailing slash, as shell completion writes folder names, names the same data set and run
    assert (
        script(
            'data_utils', '--data_path', data, '--data_name', 'cub/', '--workers', 1, cwd=tmp_path
        )[0]
        == 0
    )
    status, out, err = script(
        'train', '--data_path', data, '--data_name', 'cub/', *TRAIN[2:], cwd=tmp_path
    )
    assert status == 0, err
    assert f'wrote results/{DATA_BASE}' in out and (tmp_path / 'results' / DATA_BASE).is_file()


# ----------------------------------------------------------------------------------------------------------------------
# the demo in one command


def test_train_writes_the_demo_itself_but_never_into_a_folder_of_that_name(
    script, tmp_path, quick_runs, recorded
):
    flags = ['--data_name', 'digits', *TRAIN[2:], '--backbone_type', TINY]
    status, out, err = script(
        'train', '--data_path', tmp_path / 'data', *flags, cwd=tmp_path, watch=recorded
    )
    assert status == 0, err
    assert (
        f'there is no {tmp_path / "data" / "digits"}, so the handwritten-digits demo is written there first'
        in out
    )
    index = torch.load(utils.index_path(str(tmp_path / 'data'), 'digits'), weights_only=True)
    assert sorted(index['train']) == ['0', '1', '2', '3', '4'] and sorted(index['test']) == [
        '5',
        '6',
        '7',
        '8',
        '9',
    ]
    assert len(recorded) == 1  # then it trained

    mine = make_folder(
        str(tmp_path / 'own'), 'digits', ['cats', 'dogs', 'owls', 'yaks'], per_class=2
    )
    status, out, err = script('train', '--data_path', tmp_path / 'own', *flags, cwd=tmp_path)
    assert status == 0, err
    assert 'handwritten-digits demo' not in out
    index = torch.load(utils.index_path(str(tmp_path / 'own'), 'digits'), weights_only=True)
    assert sorted(index['train']) == ['cats', 'dogs'] and sorted(index['test']) == ['owls', 'yaks']
    sources = {
        os.path.relpath(os.path.join(parent, name), tmp_path / 'own' / 'digits')
        for parent, folders, files in os.walk(tmp_path / 'own' / 'digits')
        for name in files
        if not parent.startswith(str(tmp_path / 'own' / 'digits' / 'uncropped'))
    }
    assert sources == {
        os.path.relpath(path, tmp_path / 'own' / 'digits')
        for paths in mine.values()
        for path in paths
    } | {'uncropped_data_dicts.pth'}
