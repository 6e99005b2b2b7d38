"""gallery.py's store and indexes: appended as a folder changes, memory-mapped, searched in
blocks."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import gallery
import model
import utils
from test_rerank import euclidean, fast_reid_aqe, zhong_re_ranking

DIM = 8
EMBED = model.Model.embed


@pytest.fixture
def net(monkeypatch):
    """A random timm/resnet18 embedding net on 32-pixel crops, and a count of the images it embeds."""
    monkeypatch.setattr(utils, 'IMAGE_SIZE', 32)
    monkeypatch.setattr(utils, 'RESIZE_SIZE', 36)
    torch.manual_seed(0)
    network = model.Model('timm/resnet18', DIM, 2, pretrained=False).eval()
    network.count = 0

    def counting(self, images):
        self.count += len(images)
        return EMBED(self, images)

    monkeypatch.setattr(model.Model, 'embed', counting)
    return network


def photo(path, seed):
    """A small PNG of random smooth colours: photos of different seeds are far apart."""
    pixels = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).resize((40, 40), Image.BILINEAR).save(path)
    return str(path)


def album(folder, count, first=0):
    """count photos folder/p<seed>.png; their paths."""
    return [
        photo(os.path.join(folder, f'p{seed:04d}.png'), seed)
        for seed in range(first, first + count)
    ]


@torch.inference_mode()
def independent(network, paths):
    """(N, D) embeddings computed here, one image at a time, by Model.embed itself (each file version once)."""
    known = network.__dict__.setdefault('known', {})
    for path in paths:
        key = (path, os.stat(path).st_mtime_ns)
        if key not in known:
            known[key] = EMBED(network, utils.test_transform()(utils.read_image(path))[None])[0]
    return torch.stack([known[path, os.stat(path).st_mtime_ns] for path in paths])


def store_of(tmp_path, network):
    """gallery.open_store on a fresh model file for this network (a context manager)."""
    model_path = tmp_path / 'm_model.pth'
    if not model_path.exists():
        torch.save(network.state_dict(), model_path)
    return gallery.open_store(str(tmp_path / 'store'), str(model_path), DIM)


def brute_force(network, query, paths, k):
    """[(path, cosine)] of the k paths nearest to the query image, from independent embeddings."""
    features = independent(network, paths)
    similarities = F.normalize(features, dim=1) @ F.normalize(
        independent(network, [query])[0], dim=0
    )
    top = similarities.topk(k)
    return [(paths[i], value) for i, value in zip(top.indices.tolist(), top.values.tolist())]


def check_search(store, network, query, paths, k, index='exact'):
    """The store's k nearest equal the brute force's, with cosines within float16 rounding (2 ** -11)."""
    found = store.search(independent(network, [query])[0], k, index=index)
    expected = brute_force(network, query, paths, k)
    assert [path for path, _ in found] == [path for path, _ in expected]
    np.testing.assert_allclose([v for _, v in found], [v for _, v in expected], atol=6e-4)


def test_append_change_remove_and_compaction(tmp_path, net, capsys):
    paths = album(tmp_path / 'photos', 8)
    query = photo(tmp_path / 'query.png', 100)
    with store_of(tmp_path, net) as store:
        store.update('photos', paths, net)
        assert (
            net.count == 8 and isinstance(store.rows, np.memmap) and store.rows.dtype == np.float16
        )
        torch.testing.assert_close(store.block(0, 8), independent(net, paths), atol=6e-4, rtol=0)
        check_search(store, net, query, paths, 5)
        rows_file = store.file('embeddings')
    before = open(rows_file, 'rb').read()

    paths += album(
        tmp_path / 'photos', 1, first=8
    )  # one added: only it is embedded, appended after the others
    net.count = 0
    with store_of(tmp_path, net) as store:
        store.update('photos', paths, net)
        assert net.count == 1 and len(store.keys) == 9
        assert open(rows_file, 'rb').read()[: len(before)] == before
        check_search(store, net, query, paths, 9)

    photo(paths[0], 200)  # one changed in place
    later = os.stat(paths[0]).st_mtime + 5  # whatever the file system's time resolution
    os.utime(paths[0], (later, later))
    os.remove(paths[1])  # and one removed
    live = [paths[0]] + paths[2:]
    net.count = 0
    with store_of(tmp_path, net) as store:
        store.update('photos', live, net)
        assert (
            net.count == 1 and len(store.keys) == 10 and store.live.sum() == 8
        )  # the old rows are dead
        assert (
            store.file('embeddings') == rows_file
        )  # 2 dead of 10 is below a quarter: no compaction yet
        check_search(store, net, query, live, 8)

    for path in live[-2:]:
        os.remove(path)
    live = live[:-2]
    capsys.readouterr()
    with store_of(tmp_path, net) as store:
        store.update('photos', live, net)  # 4 dead of 10: compacted into a new generation
        assert store.file('embeddings') != rows_file and not os.path.exists(rows_file)
        assert len(store.keys) == 6 and store.live.all()
        assert os.path.getsize(store.file('embeddings')) == 6 * DIM * 2
        check_search(store, net, query, live, 6)
    assert 'gallery photos: 6 images, 0 embedded now, 6 from' in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / 'store')) == sorted(
        ['meta.json']
        + [
            os.path.basename(store.file(kind))
            for kind in ('keys', 'embeddings', 'paths', 'unreadable')
        ]
    )


def test_an_interruption_loses_at_most_one_chunk(tmp_path, net, monkeypatch):
    monkeypatch.setattr(gallery, 'CHUNK', 2)
    paths = album(tmp_path / 'photos', 7)
    calls = [0]

    def failing(self, images):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt  # as Ctrl-C or a kill during the third chunk
        return EMBED(self, images)

    with monkeypatch.context() as patch:
        patch.setattr(model.Model, 'embed', failing)
        with pytest.raises(KeyboardInterrupt), store_of(tmp_path, net) as store:
            store.update('photos', paths, net)
    with store_of(tmp_path, net) as store:
        assert len(store.keys) == 4  # the two chunks before the interruption
        keys, rows, names = store.file('keys'), store.file('embeddings'), store.file('paths')
        named = os.path.getsize(names)
    # a kill between a chunk's rows, its paths and its keys, and one in the middle of a key record
    with open(rows, 'ab') as file:
        file.write(np.ones((2, DIM), np.float16).tobytes())
    with open(names, 'ab') as file:
        file.write(f'{paths[4]}\n'.encode())
    with open(keys, 'ab') as file:
        file.write(bytes(10))
    with store_of(tmp_path, net) as store:
        assert len(store.keys) == 4 and os.path.getsize(rows) == 4 * DIM * 2
        assert os.path.getsize(names) == named and os.path.getsize(keys) == 4 * gallery.KEY.itemsize
        net.count = 0
        store.update('photos', paths, net)
        assert net.count == 3 and len(store.keys) == 7
        check_search(store, net, paths[0], paths, 7)


def test_the_search_reads_the_memory_map_in_blocks(tmp_path, net, monkeypatch):
    paths = album(tmp_path / 'photos', 9)
    with store_of(tmp_path, net) as store:
        store.update('photos', paths, net)
        searched, search = [], gallery.top_k

        def recorded(queries, items, k, **options):
            searched.append((items.data_ptr(), items.dtype, len(items), options['block_rows']))
            return search(queries, items, k, **options)

        monkeypatch.setattr(gallery, 'top_k', recorded)
        monkeypatch.setattr(gallery, 'READ_ROWS', 2)
        check_search(store, net, paths[3], paths, 4)
        # the whole store on the memory map, not a copy, read two rows at a time (top_k's blocks)
        assert isinstance(store.rows, np.memmap)
        assert searched == [(store.rows.ctypes.data, torch.float16, 9, 2)]


def test_unreadable_and_changing_photos(tmp_path, net, monkeypatch, capsys):
    paths = album(tmp_path / 'photos', 4)
    broken = str(tmp_path / 'photos' / 'broken.jpg')
    with open(broken, 'w') as file:
        file.write('no JPEG')
    read = utils.read_image

    def touching(path):  # the second photo is being written while it is read
        if path == paths[1]:
            later = os.stat(path).st_mtime + 5
            os.utime(path, (later, later))
        return read(path)

    monkeypatch.setattr(utils, 'read_image', touching)
    with store_of(tmp_path, net) as store:
        store.update('photos', paths + [broken], net)
        # the changed photo was embedded with the others, then left out: its size or time changed
        assert net.count == 4 and store.row(paths[1]) is None
        check_search(store, net, paths[0], [paths[0], paths[2], paths[3]], 3)
    out = capsys.readouterr().out
    assert (
        f'gallery photos: skipped 1 unreadable image (missing, truncated or not an image): {broken}\n'
        in out
    )
    assert (
        f'gallery photos: 1 image changed while being embedded and was left out (such as {paths[1]}); run again '
        f'to embed it'
    ) in out
    monkeypatch.setattr(utils, 'read_image', read)
    net.count = 0
    with store_of(tmp_path, net) as store:
        store.update('photos', paths + [broken], net)
        assert (
            net.count == 1 and store.row(paths[1]) is not None
        )  # the broken file is not read again
        check_search(store, net, paths[0], paths, 4)
    assert 'skipped 1 unreadable image' in capsys.readouterr().out


def append(store, vectors, first=0):
    """Add unit rows to a store as if embedded from photos /photos/p<number>.png; their paths."""
    paths = [f'/photos/p{number:04d}.png' for number in range(first, first + len(vectors))]
    store.append([(path, 1, 1) for path in paths], vectors, [])
    store.load()
    return paths


@pytest.fixture
def large_album(tmp_path, net):
    """A store of gallery.IVFPQ_MIN + 16 random unit rows (D = 8), as test.py would hold embedded photos; returns
    (their paths, the rows). Embedding that many photos would take a minute on a loaded 2-core machine.
    """
    vectors = F.normalize(
        torch.randn(gallery.IVFPQ_MIN + 16, DIM, generator=torch.Generator().manual_seed(1)), dim=1
    )
    with store_of(tmp_path, net) as store:
        return append(store, vectors.numpy()), vectors


@pytest.mark.parametrize('kind', gallery.INDEXES)
def test_each_index_finds_the_exact_nearest(tmp_path, net, large_album, kind, capsys):
    paths, vectors = large_album
    with store_of(tmp_path, net) as store:
        index = kind if kind == 'exact' else gallery.open_index(store, kind)
        for row in (3, 321, 600):
            found = store.search(vectors[row], 3, index=index)
            assert found[0][0] == paths[row] and found[0][1] == pytest.approx(1, abs=6e-4)
            assert found[1][1] < 0.99  # well separated: the row itself is the only near one
            expected = (F.normalize(store.block(0, len(paths)), dim=1) @ vectors[row]).topk(
                3
            )  # brute force
            assert [path for path, _ in found] == [paths[i] for i in expected.indices.tolist()]
            np.testing.assert_allclose([v for _, v in found], expected.values, atol=6e-4)
    if kind == 'milvus':  # filled from the store once, then only checked
        assert f'{len(paths)} images, {len(paths)} added, 0 removed' in capsys.readouterr().out
        with store_of(tmp_path, net) as store:
            gallery.open_index(store, kind)
        assert capsys.readouterr().out.endswith(f'{len(paths)} images, 0 added, 0 removed\n')
    elif kind != 'exact':
        assert f'index {kind}: built over {len(paths)} images' in capsys.readouterr().out
        with store_of(tmp_path, net) as store:  # read back from disk, not built again
            gallery.open_index(store, kind)
        assert capsys.readouterr().out == ''


@pytest.mark.parametrize('kind', ['hnsw', 'ivfpq'])
def test_an_index_is_extended_or_rebuilt_as_the_store_changes(
    tmp_path, net, large_album, kind, capsys
):
    paths, _ = large_album
    with store_of(tmp_path, net) as store:
        gallery.open_index(store, kind)
        new = F.normalize(torch.randn(3, DIM, generator=torch.Generator().manual_seed(2)), dim=1)
        paths += append(store, new.numpy(), first=len(paths))
    capsys.readouterr()
    with store_of(tmp_path, net) as store:
        index = gallery.open_index(store, kind)
        assert (
            index.ntotal == len(paths)
            and f'index {kind}: extended by 3 images' in capsys.readouterr().out
        )
        assert store.search(new[2], 1, index=index)[0][0] == paths[-1]
        meta = store.read_json(f'index-{kind}.json')
    # an index of another model, or of an older generation of the store, is built anew
    for change in ({'model': ['/elsewhere/other_model.pth', 1, 2]}, {'generation': 'older'}):
        store.write_json(f'index-{kind}.json', {**meta, **change})
        with store_of(tmp_path, net) as store:
            index = gallery.open_index(store, kind)
        out = capsys.readouterr().out
        assert out.startswith(
            f'{store.path}/index-{kind}.faiss was built from another model or an older store, so '
            f'it is built anew\nindex {kind}: built over {len(paths)} images'
        )
        assert index.ntotal == len(paths)


def test_ivfpq_on_too_few_images_is_one_sentence(tmp_path, net):
    paths = album(tmp_path / 'photos', 5)
    with store_of(tmp_path, net) as store:
        store.update('photos', paths, net)
        with pytest.raises(gallery.UserError) as error:
            gallery.open_index(store, 'ivfpq')
    assert str(error.value) == (
        f'--index ivfpq learns its codes from the gallery and needs at least '
        f'{gallery.IVFPQ_MIN} images for that, but this one holds 5; use --index exact (or '
        f'hnsw)'
    )


def test_a_second_process_on_the_store_is_one_sentence(tmp_path, net):
    with store_of(tmp_path, net):
        with pytest.raises(gallery.UserError) as error, store_of(tmp_path, net):
            pass
    assert str(error.value).startswith('another process (pid ') and 'is using gallery store' in str(
        error.value
    )


def test_a_store_of_another_model_file_is_written_anew(tmp_path, net, capsys):
    paths = album(tmp_path / 'photos', 3)
    with store_of(tmp_path, net) as store:
        store.update('photos', paths, net)
    later = (
        os.stat(tmp_path / 'm_model.pth').st_mtime + 5
    )  # the model trained again under the same name
    os.utime(tmp_path / 'm_model.pth', (later, later))
    net.count = 0
    with store_of(tmp_path, net) as store:
        store.update('photos', paths, net)
    assert net.count == 3
    assert (
        'was written by another model file or version, so it is written anew'
        in capsys.readouterr().out
    )


def test_a_version_1_store_is_converted_on_open_and_keeps_its_rows(tmp_path, capsys):
    model_path = tmp_path / 'm_model.pth'
    model_path.write_bytes(b'weights')
    status = os.stat(model_path)
    store_path = tmp_path / 'store'
    store_path.mkdir()
    meta = {
        'version': 1,
        'model': [str(model_path), status.st_size, status.st_mtime_ns],
        'dim': DIM,
        'dtype': 'float16',
        'generation': 'g1',
    }
    (store_path / 'meta.json').write_text(json.dumps(meta))
    rows = F.normalize(
        torch.randn(4, DIM, generator=torch.Generator().manual_seed(5)), dim=1
    ).numpy()
    # row 2 holds row 0's key again (a later row wins); the last row and line were cut short by a kill
    keys = [['/a/x.jpg', 10, 1], ['/a/é y.jpg', 11, 2], ['/a/x.jpg', 10, 1]]
    lines = [json.dumps(key) for key in keys] + [json.dumps(['/a/bad.jpg', 5, 6, 'unreadable'])]
    (store_path / 'keys-g1.jsonl').write_text('\n'.join(lines) + '\n' + '["/a/z.jp')
    (store_path / 'embeddings-g1.f2').write_bytes(rows.astype(np.float16).tobytes())
    store = gallery.Store(str(store_path), str(model_path), DIM)
    assert (
        capsys.readouterr().out
        == f'gallery store {store_path}: keys of 3 images converted to the version 2 layout\n'
    )
    assert [store.keys[row] for row in range(len(store.keys))] == [tuple(key) for key in keys]
    assert store.unreadable == {('/a/bad.jpg', 5, 6)}
    assert store.live.tolist() == [False, True, True]
    np.testing.assert_array_equal(store.rows, rows[:3].astype(np.float16))
    assert json.loads((store_path / 'meta.json').read_text())['version'] == 2
    assert not (store_path / 'keys-g1.jsonl').exists()
    again = gallery.Store(str(store_path), str(model_path), DIM)
    assert capsys.readouterr().out == '' and len(again.keys) == 3


def test_keys_are_found_by_their_ids_as_a_dictionary_would(tmp_path):
    model_path = tmp_path / 'm_model.pth'
    model_path.write_bytes(b'weights')
    (tmp_path / 'store').mkdir()
    store = gallery.Store(str(tmp_path / 'store'), str(model_path), DIM)
    rng = np.random.default_rng(0)
    keys = [(f'/p/{rng.integers(50)}.jpg', int(rng.integers(3)), 7) for _ in range(200)]
    for start in range(0, 200, 64):
        store.append(keys[start : start + 64], np.zeros((len(keys[start : start + 64]), DIM)), [])
    store.load()
    latest = {key: row for row, key in enumerate(keys)}  # a later row of the same key wins
    asked = list(latest) + [('/p/none.jpg', 0, 7), ('/p/1.jpg', 9, 7)]
    found = store.find([gallery.key_id(key) for key in asked])
    assert found.tolist() == [latest.get(key, -1) for key in asked]
    assert [store.keys[row] for row in range(200)] == keys
    assert np.flatnonzero(store.live).tolist() == sorted(latest.values())


@pytest.mark.parametrize('method', ['aqe', 'kreciprocal'])
def test_a_reranked_search_reorders_the_nearest_photos_as_the_papers_code(
    tmp_path, net, monkeypatch, method
):
    """test.py --gallery --rerank: the SHORTLIST photos nearest the query (itself left out),
    re-ordered as fast-reid's aqe or Zhong et al.'s k-reciprocal code orders them with those photos
    as its gallery; each result keeps its plain cosine."""
    monkeypatch.setattr(gallery, 'SHORTLIST', 12)
    paths = album(tmp_path / 'photos', 30)
    with store_of(tmp_path, net) as store:
        store.update('photos', paths, net)
        rows = np.array([store.row(path) for path in paths])
        stored = store.block(0, len(store.keys))[rows]  # (30, D) as stored, float32
        query = stored[0]
        cosines = stored[1:] @ query
        nearest = cosines.argsort(descending=True, stable=True)[:12] + 1  # the shortlist (12,)
        shortlist = stored[nearest]
        if method == 'aqe':
            expanded, _ = fast_reid_aqe(torch.cat([query[None], shortlist]), shortlist[:0], 10, 3.0)
            distance = 1 - (F.normalize(expanded[:1], dim=1) @ F.normalize(shortlist.double(), dim=1).T).numpy()
            params = {'aqe_k': 10, 'aqe_alpha': 3.0}
        else:
            distance = zhong_re_ranking(euclidean(query[None], shortlist),
                                        euclidean(query[None], query[None]),
                                        euclidean(shortlist, shortlist), k1=5, k2=3)
            params = {'k1': 5, 'k2': 3, 'lambda_value': 0.3}
        order = nearest[np.argsort(distance[0], kind='stable')[:4]]
        found = store.search(query, 4, exclude=int(rows[0]), rerank=(method, params))
    assert [path for path, _ in found] == [paths[i] for i in order]
    cosines = (stored[order] @ F.normalize(query, dim=0)).numpy()  # as the plain search gives
    np.testing.assert_allclose([v for _, v in found], cosines, atol=1e-6)
