"""test.py --gallery DIR: search a folder of one's own photos with a model trained on a labelled
folder."""

import io
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
import model
import utils
from conftest import make_folder, train_in, write_album, write_image
from script_runner import error_sentence, query_folder, temporaries, wrote_query

PREFIX = 'pets_timm-resnet18_proxy_anchor_16_no_pretrained_batch_size4'
EMBED = model.Model.embed
DATA_BASE = f'{PREFIX}_1_data_base.pth'


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 1-epoch train.py run on a labelled folder `pets` whose class names hold spaces; returns the run folder."""
    data = str(tmp_path_factory.mktemp('data'))
    make_folder(data, 'pets', ['black cat', 'dog', 'gold fish', 'tabby cat'])
    data_utils.prepare(data, 'pets', workers=1)
    run = tmp_path_factory.mktemp('run')
    train_in(
        run,
        '--data_path',
        data,
        '--data_name',
        'pets',
        '--backbone_type',
        'timm/resnet18',
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
    return run


def test_any_prepared_name_trains_under_the_seed_naming(trained):
    names = set(os.listdir(trained / 'results'))
    assert {
        f'{PREFIX}_statistics.csv',
        f'{PREFIX}_1_model.pth',
        DATA_BASE,
        f'{PREFIX}_checkpoint.pth',
    } <= names
    data_base = torch.load(trained / 'results' / DATA_BASE, weights_only=True)
    assert [os.path.basename(os.path.dirname(path)) for path in data_base['test_images']] == [
        'gold fish',
        'gold fish',
        'tabby cat',
        'tabby cat',
    ]  # the second half of the sorted class names
    assert 'gallery_features' not in data_base


@pytest.fixture
def photos(tmp_path):
    """A folder of photos in nested folders and several formats, beside a file that is no image."""
    folder = tmp_path / 'photos'
    write_image(str(folder / 'holiday' / 'beach.jpg'), 3, 0, size=(60, 45))
    os.makedirs(folder / 'holiday' / 'day 2')
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
        folder / 'holiday' / 'day 2' / 'boat.png'
    )
    Image.new('RGB', (33, 33), (20, 200, 90)).save(folder / 'scan.bmp')
    (folder / 'notes.txt').write_text('not an image')
    return folder


@pytest.fixture
def embedded(monkeypatch):
    """The number of images Model.embed is given, over all calls."""
    count = [0]
    embed = model.Model.embed

    def counting(self, images):
        count[0] += len(images)
        return embed(self, images)

    monkeypatch.setattr(model.Model, 'embed', counting)
    return count


@pytest.fixture(scope='module')
def independent(trained):
    """independent(paths) -> (N, D) embeddings of image files by the saved model, computed here (each file once)."""
    data_base = torch.load(trained / 'results' / DATA_BASE, weights_only=True)
    net = model.Model('timm/resnet18', 16, data_base['proxies'].size(0), pretrained=False)
    net.load_state_dict(
        torch.load(trained / 'results' / f'{PREFIX}_1_model.pth', weights_only=True)
    )
    known = {}

    @torch.inference_mode()
    def embed(paths):
        for path in paths:
            key = (str(path), os.stat(path).st_mtime_ns)
            if (
                key not in known
            ):  # model.Model.embed itself, not the counting stand-in of the `embedded` fixture
                known[key] = EMBED(
                    net.eval(), utils.test_transform()(utils.read_image(str(path)))[None]
                )[0]
        return torch.stack([known[str(path), os.stat(path).st_mtime_ns] for path in paths])

    return embed


def written(folder):
    """[(similarity, path)] of the retrieval images test.py wrote, by rank."""
    files = sorted(
        (int(name.split('_')[2]), name)
        for name in os.listdir(folder)
        if name.startswith('retrieval_img_')
    )
    return [(float(os.path.splitext(name)[0].split('_')[3]), folder / name) for _, name in files]


def check_results(independent, folder, query, images):
    """The results are the images nearest to the query by brute force, with their similarities and grey borders."""
    features = independent([query] + images)
    similarities = F.normalize(features[1:], dim=1) @ F.normalize(features[0], dim=0)
    expected = similarities.sort(descending=True).values.tolist()
    found = written(folder)
    assert len(found) == len(images)
    # the store keeps float16 rows: a unit row rounded so moves a cosine by at most 2 ** -11 (4.9e-4)
    np.testing.assert_allclose([similarity for similarity, _ in found], expected, atol=6e-4)
    table = pd.read_csv(folder / 'results.csv', keep_default_na=False)
    assert list(table.columns) == ['rank', 'path', 'similarity', 'same_class']
    assert table['rank'].tolist() == list(range(1, len(images) + 1))
    np.testing.assert_allclose(table["similarity"], expected, atol=6e-4)
    assert (table['same_class'] == '').all()  # the photos have no labels
    # each listed path is the image of that similarity
    order = [str(images[i]) for i in similarities.sort(descending=True).indices.tolist()]
    assert [os.path.realpath(path) for path in table['path']] == [
        os.path.realpath(path) for path in order
    ]
    pictures = [picture(path) for path in images]
    for similarity, path in found:
        with Image.open(path) as image:
            pixels = np.asarray(image, dtype=float)
        assert (
            np.abs(pixels[1:4, 50:170].reshape(-1, 3).mean(axis=0) - 128).max() < 40
        )  # grey: no labels
        # the picture shown is the photo with that similarity
        shown = int(np.argmin([np.abs(pixels[8:-8, 8:-8] - other).mean() for other in pictures]))
        assert similarities[shown].item() == pytest.approx(similarity, abs=6e-4)


def picture(path):
    """An image as test.py draws it, without the border."""
    with Image.open(path) as image:
        return np.asarray(image.convert('RGB').resize((224, 224), Image.BILINEAR), dtype=float)[
            8:-8, 8:-8
        ]


def gallery_run(script, run, query, folder, num=8):
    status, out, err = script(
        'test',
        '--query_img_name',
        query,
        '--data_base',
        DATA_BASE,
        '--gallery',
        folder,
        '--retrieval_num',
        num,
        cwd=run,
    )
    assert status == 0, err
    return out, err


def test_gallery_embeds_once_and_again_only_what_changed(
    script, trained, independent, photos, embedded, tmp_path
):
    query = tmp_path / 'query.png'
    Image.new('RGB', (40, 40), (200, 120, 40)).save(query)
    images = [
        photos / 'holiday' / 'beach.jpg',
        photos / 'holiday' / 'day 2' / 'boat.png',
        photos / 'scan.bmp',
    ]

    out, err = gallery_run(script, trained, query, photos)
    assert embedded[0] == 3 + 1  # the three photos (not notes.txt), then the query
    assert (
        f'gallery {photos}: 3 images, 3 embedded now, 0 from results/{PREFIX}_1_model_gallery_'
        in out
    )
    assert f'embedding {photos}: 100%' in err  # the progress bar
    assert (
        f'wrote the query and its 3 nearest images in {photos} to results/' in out
        and wrote_query(out, 'query')
    )
    check_results(independent, query_folder(trained / 'results', 'query'), query, images)
    caches = [name for name in os.listdir(trained / 'results') if '_gallery_' in name]
    assert len(caches) == 1 and not temporaries(str(trained / 'results'))

    embedded[0] = 0
    out, _ = gallery_run(script, trained, query, photos)
    assert embedded[0] == 1  # only the query: every photo comes from the cache
    assert f'gallery {photos}: 3 images, 0 embedded now, 3 from results/' in out
    check_results(independent, query_folder(trained / 'results', 'query'), query, images)

    # a photo changed in place, one added and one removed
    Image.new('RGB', (50, 30), (0, 0, 255)).save(photos / 'holiday' / 'beach.jpg', format='JPEG')
    later = (
        os.stat(photos / 'holiday' / 'beach.jpg').st_mtime + 5
    )  # whatever the file system's time resolution
    os.utime(photos / 'holiday' / 'beach.jpg', (later, later))
    write_image(str(photos / 'new' / 'garden.jpeg'), 7, 1)
    os.remove(photos / 'scan.bmp')
    images = [
        photos / 'holiday' / 'beach.jpg',
        photos / 'holiday' / 'day 2' / 'boat.png',
        photos / 'new' / 'garden.jpeg',
    ]
    embedded[0] = 0
    out, _ = gallery_run(script, trained, query, photos)
    assert embedded[0] == 2 + 1
    assert f'gallery {photos}: 3 images, 2 embedded now, 1 from results/' in out
    check_results(independent, query_folder(trained / 'results', 'query'), query, images)

    # a query inside the folder is not its own result, and its embedding is the cached one
    embedded[0] = 0
    out, _ = gallery_run(script, trained, photos / 'holiday' / 'day 2' / 'boat.png', photos)
    assert embedded[0] == 0
    assert (
        f'wrote the query and its 2 nearest images in {photos} to results/' in out
        and wrote_query(out, 'boat')
    )
    check_results(
        independent,
        query_folder(trained / 'results', 'boat'),
        photos / 'holiday' / 'day 2' / 'boat.png',
        [images[0], images[2]],
    )

    # the cache belongs to one model file: a model written anew (retrained under the same name) embeds all again
    later = os.stat(trained / 'results' / f'{PREFIX}_1_model.pth').st_mtime + 5
    os.utime(trained / 'results' / f'{PREFIX}_1_model.pth', (later, later))
    embedded[0] = 0
    out, _ = gallery_run(script, trained, photos / 'holiday' / 'day 2' / 'boat.png', photos)
    assert embedded[0] == 3 and f'gallery {photos}: 3 images, 3 embedded now, 0 from' in out


def test_gallery_needs_the_model_beside_the_data_base(script, trained, photos, tmp_path):
    shutil.copyfile(trained / 'results' / DATA_BASE, tmp_path / 'alone_1_data_base.pth')
    status, _, err = script(
        'test',
        '--query_img_name',
        photos / 'scan.bmp',
        '--data_base',
        tmp_path / 'alone_1_data_base.pth',
        '--gallery',
        photos,
        cwd=tmp_path,
    )
    assert error_sentence(status, err).startswith(
        f'error: data base {tmp_path / "alone_1_data_base.pth"} has no model '
        f'{tmp_path / "alone_1_model.pth"} beside it, which embeds images outside the data base '
        f'(your own queries, a --gallery folder)'
    )
    assert not os.path.exists(tmp_path / 'results')


def test_unreadable_photos_are_skipped_counted_and_listed_in_one_line(
    script, trained, independent, photos, tmp_path
):
    truncated = photos / 'holiday' / 'cut.jpg'
    with open(photos / 'holiday' / 'beach.jpg', 'rb') as file:
        truncated.write_bytes(file.read()[:200])
    fake = photos / 'fake.png'
    fake.write_text('not a PNG')
    query = tmp_path / 'query.png'
    Image.new('RGB', (40, 40), (200, 120, 40)).save(query)
    for _ in range(2):  # the second run reports them again, from the store
        out, _ = gallery_run(script, trained, query, photos)
        skipped = [line for line in out.splitlines() if ': skipped ' in line]
        assert len(skipped) == 1 and f'gallery {photos}: skipped 2 unreadable images' in skipped[0]
        assert str(truncated) in skipped[0] and str(fake) in skipped[0]
        assert f'gallery {photos}: 3 images' in out
    check_results(
        independent,
        query_folder(trained / 'results', 'query'),
        query,
        [
            photos / 'holiday' / 'beach.jpg',
            photos / 'holiday' / 'day 2' / 'boat.png',
            photos / 'scan.bmp',
        ],
    )


def test_an_album_in_every_pixel_format_is_searched_and_its_unreadable_files_named(
    script, trained, independent, tmp_path
):
    """Photos in every pixel format data_utils.py prepares (16-bit, CMYK, palette, alpha, animated)
    beside files no decoder reads: the search ends with results for every readable query and one
    line each naming the gallery's and the queries' unreadable files, never a traceback."""
    folder = tmp_path / 'album'
    album = write_album(str(folder))
    cut, fake = folder / 'cut.jpg', folder / 'fake.png'
    with open(album['baseline.jpg'], 'rb') as file:
        cut.write_bytes(file.read()[:200])
    fake.write_text('not a PNG')
    outside, broken = tmp_path / 'query16.png', tmp_path / 'broken.jpg'
    shutil.copy(album['rgba16.png'], outside)
    broken.write_text('not a JPEG')
    status, out, err = script(
        'test',
        '--query_img_name',
        album['animated.gif'],
        outside,
        broken,
        '--data_base',
        DATA_BASE,
        '--gallery',
        folder,
        '--retrieval_num',
        30,
        cwd=trained,
    )
    assert status == 0 and 'Traceback' not in err, err
    assert f'gallery {folder}: {len(album)} images, {len(album)} embedded now' in out
    assert [line for line in out.splitlines() if 'skipped' in line] == [
        f'gallery {folder}: skipped 2 unreadable images (missing, truncated or not an image): '
        f'{cut}, {fake}',
        f'skipped 1 unreadable query image (missing, truncated or not an image): {broken}',
    ]
    assert out.splitlines()[-1].startswith('skipped 1 unreadable query image')
    written = re.findall(
        r'^wrote the query and its (\d+) nearest images in .* to (results/.+)/$', out, re.M
    )
    for query, (count, result) in zip([album['animated.gif'], outside], written):
        others = [path for path in album.values() if path != query]
        table = pd.read_csv(trained / result / 'results.csv', keep_default_na=False)
        assert int(count) == len(table) == len(others) and sorted(table['path']) == sorted(others)
        features = independent([query] + list(table['path']))  # (1 + N, D)
        expected = F.normalize(features[1:], dim=1) @ F.normalize(features[0], dim=0)  # (N,)
        # float16 rows: a unit row rounded so moves a cosine by at most 2 ** -11 (4.9e-4)
        np.testing.assert_allclose(table['similarity'], expected, atol=6e-4)
        assert table['similarity'].is_monotonic_decreasing and (table['same_class'] == '').all()
    assert len(written) == 2
    # the test set searched for queries that are all unreadable: one sentence
    status, _, err = script(
        'test', '--query_img_name', broken, fake, '--data_base', DATA_BASE, cwd=trained
    )
    assert error_sentence(status, err) == (
        f'error: no query could be read: {broken}, {fake} (missing, truncated or not an image); '
        f'pass image files'
    )


def test_results_are_printed_as_text(script, trained, photos, tmp_path):
    query = tmp_path / 'query.png'
    Image.new('RGB', (40, 40), (20, 120, 240)).save(query)
    out, _ = gallery_run(script, trained, query, photos, num=2)
    table = pd.read_csv(
        query_folder(trained / 'results', 'query') / 'results.csv', keep_default_na=False
    )
    # the printed table's columns: rank, similarity, same class (empty: the gallery has no labels), path
    lines = [line for line in out.splitlines() if line[:6].strip().isdigit()]
    assert [
        (int(line[:6]), float(line[8:18]), line[20:30].strip(), line[32:]) for line in lines
    ] == [
        (rank, round(similarity, 4), '', path)
        for rank, similarity, path in zip(table['rank'], table['similarity'], table['path'])
    ]
    assert table['same_class'].tolist() == [''] * len(table)


def test_missing_query_is_reported_before_the_gallery_is_embedded(
    script, trained, photos, embedded, tmp_path
):
    status, _, err = script(
        'test',
        '--query_img_name',
        tmp_path / 'typo.jpg',
        '--data_base',
        DATA_BASE,
        '--gallery',
        photos,
        cwd=trained,
    )
    assert error_sentence(status, err) == (
        f'error: query image {tmp_path / "typo.jpg"} does not exist ({tmp_path} holds no file of a '
        f'similar name); pass an image file, a folder of them or a test image of the data base'
    )
    assert embedded[0] == 0


def test_index_flag_gives_the_exact_results_and_refuses_ivfpq_on_few_images(
    script, trained, photos, tmp_path
):
    query = tmp_path / 'query.png'
    Image.new('RGB', (40, 40), (200, 120, 40)).save(query)
    gallery_run(script, trained, query, photos)
    exact = (query_folder(trained / 'results', 'query') / 'results.csv').read_text()
    status, out, err = script(
        'test',
        '--query_img_name',
        query,
        '--data_base',
        DATA_BASE,
        '--gallery',
        photos,
        '--index',
        'hnsw',
        cwd=trained,
    )
    assert status == 0, err
    assert 'index hnsw: built over 3 images' in out
    assert (query_folder(trained / 'results', 'query') / 'results.csv').read_text() == exact
    status, out, err = script(
        'test',
        '--query_img_name',
        query,
        '--data_base',
        DATA_BASE,
        '--gallery',
        photos,
        '--index',
        'milvus',
        cwd=trained,
    )
    assert status == 0, err
    assert '.milvus.db: 3 images, 3 added, 0 removed' in out
    assert (query_folder(trained / 'results', 'query') / 'results.csv').read_text() == exact
    # re-ranked (tests/test_gallery.py checks the order against the papers' code): the same
    # photos, each with its plain cosine
    status, out, err = script(
        'test', '--query_img_name', query, '--data_base', DATA_BASE, '--gallery', photos,
        '--index', 'milvus', '--rerank', 'aqe', cwd=trained,
    )
    assert status == 0, err
    assert 'the 100 nearest photos re-ranked by aqe: each keeps its plain cosine' in out
    reranked = pd.read_csv(query_folder(trained / 'results', 'query') / 'results.csv')
    plain = pd.read_csv(io.StringIO(exact))
    assert sorted(zip(reranked['path'], reranked['similarity'])) == sorted(
        zip(plain['path'], plain['similarity']))
    status, _, err = script(
        'test',
        '--query_img_name',
        query,
        '--data_base',
        DATA_BASE,
        '--gallery',
        photos,
        '--index',
        'ivfpq',
        cwd=trained,
    )
    assert error_sentence(status, err) == (
        'error: --index ivfpq learns its codes from the gallery and needs at least '
        '624 images for that, but this one holds 3; use --index exact (or hnsw)'
    )
    status, _, err = script(
        'test',
        '--query_img_name',
        query,
        '--data_base',
        DATA_BASE,
        '--gallery',
        photos,
        '--index',
        'flat',
        cwd=trained,
    )
    assert error_sentence(status, err).startswith("error: argument --index: invalid choice: 'flat'")
