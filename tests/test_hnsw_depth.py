"""gallery.py's HNSW search depth, calibrated against exact search on a sample when an index is built."""

import json
import os

import faiss
import numpy as np
import torch

import gallery

K = 10


def unit_rows(count, dim, seed):
    """(count, dim) float32 random unit rows: no clusters, the hard case for a graph."""
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def exact(base, queries):
    """(Q, K) rows of each query's K largest inner products, by brute force."""
    return np.argsort(-(queries @ base.T), axis=1, kind='stable')[:, :K]


def recall(found, truth):
    """Mean share of each query's truth (Q, K) among its found ids (Q, F)."""
    return np.mean([len(set(a) & set(b)) / K for a, b in zip(truth, found)])


def test_the_calibrated_depth_is_the_first_doubling_that_reaches_the_target_on_new_queries():
    base = unit_rows(4000, 32, 0)
    index = faiss.IndexHNSWFlat(32, 4)  # few links and a shallow build: a low recall at depth 10
    index.hnsw.efConstruction = 16
    index.add(base)

    def search(queries, depth):
        index.hnsw.efSearch = depth
        return index.search(queries, K)[1]

    sample, fresh = unit_rows(100, 32, 1), unit_rows(300, 32, 2)
    truth = exact(base, sample)
    assert recall(search(sample, 10), truth) < 0.9
    depth, reached = gallery.calibrated_depth(search, sample, truth, target=0.95, start=10)
    assert depth > 10
    assert reached == recall(search(sample, depth), truth) >= 0.95
    assert recall(search(sample, depth // 2), truth) < 0.95  # the first that reaches it
    # queries the calibration never saw find about as much at that depth
    assert recall(search(fresh, depth), exact(base, fresh)) >= 0.92
    assert gallery.calibrated_depth(search, sample, truth, target=1.01, start=10, most=40) == (
        40,
        recall(search(sample, 40), truth),
    )


def test_an_hnsw_index_is_calibrated_when_built_and_keeps_its_depth(tmp_path, capsys):
    rows = unit_rows(600, 16, 3)
    open(tmp_path / 'model.pth', 'wb').close()
    os.makedirs(tmp_path / 'store')
    store = gallery.Store(str(tmp_path / 'store'), str(tmp_path / 'model.pth'), 16)
    store.append([(f'/photos/{row}.jpg', 1, 1) for row in range(600)], rows, [])
    store.load()
    index = gallery.open_index(store, 'hnsw')
    out = capsys.readouterr().out
    assert (
        'index hnsw: search depth 200 finds 1.000 of the exact 10 nearest of 200 sampled '
        'images\n'
    ) in out
    assert json.loads((tmp_path / 'store' / 'index-hnsw.json').read_text())['depth'] == 200
    again = gallery.open_index(store, 'hnsw')
    assert capsys.readouterr().out == '' and again.hnsw.efSearch == 200
    found = store.search(torch.from_numpy(rows[7]), K, exclude=7, index=again)
    truth = exact(np.delete(rows, 7, axis=0), rows[7:8])[0]
    assert [path for path, _ in found] == [f'/photos/{row + (row >= 7)}.jpg' for row in truth]
