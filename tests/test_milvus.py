"""gallery.py's --index milvus: a Milvus Lite collection kept in step with the store, re-ranked exactly."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from pymilvus import DataType, MilvusClient

import gallery
from runtime import UserError

DIM = 16


def fake_embedding(path):
    """A unit vector (D,) drawn from the file's bytes: a stand-in model, independent of gallery.py."""
    with open(path, 'rb') as file:
        seed = int.from_bytes(hashlib.sha1(file.read()).digest()[:8], 'little')
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return torch.from_numpy(vector / np.linalg.norm(vector))


@pytest.fixture(autouse=True)
def embedded(monkeypatch, faiss_numpy):
    """Store.update embeds with fake_embedding instead of a network."""
    monkeypatch.setattr(
        gallery,
        'embed_files',
        lambda model, paths, image_size=None: (
            torch.stack([fake_embedding(path) for path in paths]) if paths else torch.zeros(0, DIM),
            [],
        ),
    )


def write(folder, name, text):
    """Write folder/name with this text; its path."""
    path = os.path.join(folder, name)
    with open(path, 'w') as file:
        file.write(text)
    return path


@pytest.fixture
def folder(tmp_path):
    """A folder of 40 'photos' (their text is what fake_embedding embeds)."""
    photos = tmp_path / 'photos'
    photos.mkdir()
    for i in range(40):
        write(photos, f'p{i:03d}.jpg', f'photo {i}')
    return str(photos)


def listed(folder):
    """Every file below folder, sorted, as test.py lists a gallery."""
    return sorted(os.path.join(folder, name) for name in os.listdir(folder))


def model_file(tmp_path, content=b'model one'):
    """A model file for the store's key (its path, size and time)."""
    path = tmp_path / 'm_model.pth'
    if not path.exists() or path.read_bytes() != content:
        path.write_bytes(content)
    return str(path)


def updated(tmp_path, folder, model=None):
    """The store of folder brought up to date, and its Milvus index (a context manager's value)."""
    store = gallery.Store(str(tmp_path / 'store'), model or model_file(tmp_path), DIM)
    store.update(folder, listed(folder), None)
    return store, gallery.open_index(store, 'milvus')


def collection(index):
    """{path: (size, mtime, embedding (D,))} of every entity in the index's collection."""
    rows = index.client.query(
        index.name, filter='id >= 0', output_fields=['path', 'size', 'mtime', 'embedding']
    )
    return {
        row['path']: (row['size'], row['mtime'], np.array(row['embedding'], np.float32))
        for row in rows
    }


def check_in_step(store, index, folder):
    """The collection holds exactly the folder's files, keyed as now and embedded as the store holds them."""
    held = collection(index)
    assert sorted(held) == listed(folder)
    for path, (size, mtime, vector) in held.items():
        status = os.stat(path)
        assert (size, mtime) == (status.st_size, status.st_mtime_ns)
        np.testing.assert_allclose(vector, fake_embedding(path).numpy(), atol=2**-10)


def test_milvus_finds_the_same_top_10_as_exact_search(tmp_path, folder, capsys):
    (tmp_path / 'store').mkdir()
    store, index = updated(tmp_path, folder)
    assert 'Milvus collection pp_store at ' in capsys.readouterr().out
    paths = listed(folder)
    vectors = torch.stack([fake_embedding(path) for path in paths])
    for query in range(0, 40, 7):
        found = store.search(vectors[query], 10, exclude=store.row(paths[query]), index=index)
        # brute force over the float16-stored vectors
        stored = torch.from_numpy(np.asarray(store.rows, dtype=np.float32))
        similarities = stored @ vectors[query]
        similarities[store.row(paths[query])] = -2
        top = similarities.topk(10)
        assert [path for path, _ in found] == [paths[row] for row in top.indices.tolist()]
        np.testing.assert_allclose([value for _, value in found], top.values.numpy(), atol=1e-5)


def test_added_changed_removed_photos_and_a_new_model_are_kept_in_step(tmp_path, folder, capsys):
    (tmp_path / 'store').mkdir()
    store, index = updated(tmp_path, folder)
    check_in_step(store, index, folder)
    assert '40 images, 40 added, 0 removed' in capsys.readouterr().out
    store, index = updated(tmp_path, folder)
    assert '40 images, 0 added, 0 removed' in capsys.readouterr().out
    write(folder, 'new.jpg', 'a new photo')
    changed = write(folder, 'p001.jpg', 'photo 1, edited')
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))
    os.remove(os.path.join(folder, 'p002.jpg'))
    store, index = updated(tmp_path, folder)
    check_in_step(store, index, folder)
    assert '40 images, 2 added, 2 removed' in capsys.readouterr().out
    store, index = updated(tmp_path, folder, model_file(tmp_path, b'another model'))
    check_in_step(store, index, folder)
    out = capsys.readouterr().out
    assert (
        f"Milvus collection pp_store at {tmp_path}/store.milvus.db holds another model's "
        "embeddings, so it is rebuilt" in out
    )
    assert '40 images, 40 added, 0 removed' in out


def test_an_interrupted_update_loses_at_most_the_request_in_flight(tmp_path, folder, monkeypatch):
    (tmp_path / 'store').mkdir()
    monkeypatch.setattr(gallery, 'MILVUS_CHUNK', 16)
    insert, calls = gallery.MilvusIndex.insert, []

    def interrupted(self, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt
        insert(self, rows)

    monkeypatch.setattr(gallery.MilvusIndex, 'insert', interrupted)
    with pytest.raises(KeyboardInterrupt):
        updated(tmp_path, folder)
    client = MilvusClient(str(tmp_path / 'store.milvus.db'))
    assert len(client.query('pp_store', filter='id >= 0', output_fields=['id'])) == 16
    client.close()
    monkeypatch.setattr(gallery.MilvusIndex, 'insert', insert)
    store, index = updated(tmp_path, folder)
    check_in_step(store, index, folder)


def test_an_unreachable_server_is_one_sentence(tmp_path, folder):
    (tmp_path / 'store').mkdir()
    store = gallery.Store(str(tmp_path / 'store'), model_file(tmp_path), DIM)
    store.update(folder, listed(folder), None)
    with pytest.raises(UserError) as error:
        gallery.open_index(store, 'milvus', 'http://127.0.0.1:1')
    assert str(error.value) == (
        'cannot reach Milvus at --milvus_uri http://127.0.0.1:1; start the '
        'server, or give a file path (such as results/gallery.db) for an '
        'embedded Milvus Lite'
    )


def foreign(tmp_path, fields, dim, marker):
    """Make collection pp_store in tmp_path/other.db with these fields, vectors of dim, and marker."""
    client = MilvusClient(str(tmp_path / 'other.db'))
    schema = client.create_schema(auto_id=False)
    schema.add_field(fields[0], DataType.INT64, is_primary=True)
    schema.add_field('embedding', DataType.FLOAT_VECTOR, dim=dim)
    for name in fields[1:]:
        schema.add_field(name, DataType.INT64)
    params = client.prepare_index_params()
    params.add_index(field_name='embedding', index_type='FLAT', metric_type='COSINE')
    client.create_collection('pp_store', schema=schema, index_params=params)
    if marker:
        client.alter_collection_properties('pp_store', properties={gallery.MILVUS_PROPERTY: marker})
    client.close()


@pytest.mark.parametrize('case', ['fields', 'dim'])
def test_a_wrong_collection_and_a_dimension_mismatch_are_one_sentence_each(tmp_path, folder, case):
    (tmp_path / 'store').mkdir()
    store = gallery.Store(str(tmp_path / 'store'), model_file(tmp_path), DIM)
    store.update(folder, listed(folder), None)
    uri = str(tmp_path / 'other.db')
    if case == 'fields':
        foreign(tmp_path, ['pk', 'year'], DIM, None)
        expected = (
            f'Milvus collection pp_store at {uri} was not made by test.py --gallery (its '
            f'fields are pk, embedding, year); drop it, or give another --milvus_uri'
        )
    else:
        marker = gallery.MilvusIndex(None, 'pp_store', store, uri).marker()
        foreign(tmp_path, ['id', 'path', 'size', 'mtime'], 4, marker)
        expected = (
            f'Milvus collection pp_store at {uri} holds 4-d embeddings but the model '
            f'embeds in {DIM}; drop the collection, or give another --milvus_uri'
        )
    with pytest.raises(UserError) as error:
        gallery.open_index(store, 'milvus', uri)
    assert str(error.value) == expected
