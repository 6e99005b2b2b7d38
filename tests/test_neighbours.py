"""neighbours.py against brute force: the block sweep behind retrieval_metrics (blocks never N x N,
exact on every path, ties, threads, memory) and top_k (ties in item order, a query left out by its
index, k beyond the items, dead rows, float16 items, a gallery store)."""

import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gallery
import neighbours
from conftest import ROOT
from neighbours import top_k
from utils import retrieval_metrics


def reference(features, labels, ranks, gallery_features=None, gallery_labels=None):
    """Every metric from the whole float64 cosine matrix: each query's items sorted by similarity, the query itself
    removed by position when there is no gallery. A stable sort on the negated similarity puts other-class items
    first among exact ties, the rule retrieval_metrics documents."""
    per_query = reference_per_query(features, labels, ranks, gallery_features, gallery_labels)
    metrics = {f'recall@{k}': per_query[f'recall@{k}'].double().mean().item() for k in ranks}
    has_r = ~per_query['ap@r'].isnan()
    metrics['map@r'] = per_query['ap@r'][has_r].mean().item()
    metrics['r_precision'] = per_query['r_precision'][has_r].mean().item()
    return metrics


def reference_per_query(features, labels, ranks, gallery_features=None, gallery_labels=None):
    """reference's figures of each query: 'recall@K' (N,) hits, 'ap@r' and 'r_precision' (N,), NaN where R = 0."""
    queries = F.normalize(torch.as_tensor(features).double(), dim=1)
    labels = torch.as_tensor(labels)
    n, itself = len(labels), gallery_features is None
    items = queries if itself else F.normalize(torch.as_tensor(gallery_features).double(), dim=1)
    item_labels = labels if itself else torch.as_tensor(gallery_labels)
    sims = queries @ items.T  # (N, G)
    same = labels[:, None] == item_labels[None]  # (N, G)
    key = torch.stack([-sims, same.double()], dim=-1)  # sort by similarity, then other-class first
    if itself:
        key[torch.arange(n), torch.arange(n)] = (
            math.inf
        )  # the query itself goes last, then is cut off
    ranked = len(item_labels) - itself
    order = sorted_order(key)[:, :ranked]  # (N, ranked)
    hits = same.gather(1, order)  # (N, ranked)
    r = hits.sum(1)
    per_query = {f'recall@{k}': hits[:, :k].any(1) for k in ranks}
    position = torch.arange(1, ranked + 1, dtype=torch.float64)
    in_r = hits & (position[None] <= r[:, None])
    precision = in_r.cumsum(1) / position
    per_query['ap@r'] = (precision * in_r).sum(1) / r  # NaN (0 / 0) where R = 0
    per_query['r_precision'] = in_r.sum(1) / r.double()
    return per_query


def sorted_order(key):
    """Row-wise lexicographic order of key (N, N, 2) by its first then its second entry."""
    order = key[..., 1].argsort(dim=1, stable=True)
    return order.gather(1, key[..., 0].gather(1, order).argsort(dim=1, stable=True))


def data(sizes, dim, spread, seed):
    """Features around one centre per class (spread None: no centres, pure noise), classes of the given sizes."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    noise = rng.normal(size=(len(labels), dim))
    features = (
        noise if spread is None else rng.normal(size=(len(sizes), dim))[labels] + spread * noise
    )
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


def grid_data(sizes, moved, seed, dim=64, ones=16):
    """Rows of 16 entries 1/4 among 64, the rest 0: unit norm and every cosine a multiple of 1/16, exact in any
    float arithmetic, so exact ties abound and no rounding can reorder two items. A class shares a random set of 16
    positions, of which each item moves `moved` elsewhere (moved None: every item random)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    centres = [rng.choice(dim, ones, replace=False) for _ in sizes]
    features = np.zeros((len(labels), dim), dtype=np.float32)
    for row, label in enumerate(labels):
        if moved is None:
            features[row, rng.choice(dim, ones, replace=False)] = 0.25
            continue
        kept = rng.choice(centres[label], ones - moved, replace=False)
        features[row, kept] = 0.25
        features[
            row, rng.choice(np.setdiff1d(np.arange(dim), centres[label]), moved, replace=False)
        ] = 0.25
    return torch.tensor(features), torch.tensor(labels)


def assert_same(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


CASES = {
    # SOP-like classes of 2 to 12: few values enter the lists after the first blocks (the sparse path)
    'sop-like': lambda: grid_data(
        list(np.random.default_rng(0).integers(2, 13, size=70)), moved=6, seed=0
    ),
    # no class structure: most values enter early (the dense path)
    'random': lambda: grid_data([5] * 120 + [1] * 20, moved=None, seed=1),
    # one class far larger than the blocks, singletons, pairs
    'uneven': lambda: grid_data([300, 1, 1, 2, 2, 40, 7], moved=8, seed=2),
    # continuous cosines, no ties
    'gaussian': lambda: data(
        list(np.random.default_rng(3).integers(1, 13, size=60)), 32, 1.5, seed=3
    ),
}


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('ranks', [[1, 2, 4, 8], [1, 10, 100, 1000]])
def test_block_sweep_matches_the_whole_matrix(case, ranks):
    """Blocks of 8 x 8 (smaller than the larger classes) to whole-matrix size give the metrics of
    the full float64 matrix, ties included, with Recall@K for K above R (a count over all items)
    and a K beyond the N - 1 others (all of them).
    """
    features, labels = CASES[case]()
    expected = reference(features, labels, ranks)
    assert 0 < expected['recall@1'] < expected[f'recall@{ranks[-1]}'] and 0 < expected['map@r'] < 1
    for side in (8, 37, 4096):
        assert_same(
            retrieval_metrics(features, labels, ranks, chunk_bytes=4 * side * side), expected
        )


def query_gallery(features, labels, query_share, seed):
    """The items split at random into queries (query_share of them) and a gallery, with the last class all queries
    (no gallery item) and the one before it all gallery items."""
    rng = np.random.default_rng(seed)
    is_query = torch.from_numpy(rng.random(len(labels)) < query_share)
    is_query[labels == labels.max()] = True
    is_query[labels == labels.max() - 1] = False
    return features[is_query], labels[is_query], features[~is_query], labels[~is_query]


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('ranks, query_share', [([1, 2, 4, 8], 0.3), ([1, 10, 100, 1000], 0.7)])
def test_gallery_block_sweep_matches_the_whole_matrix(case, ranks, query_share):
    """With a gallery, fewer or more queries than gallery items, blocks of 8 x 8 to whole-matrix size give the
    metrics of the full float64 query x gallery matrix, ties included, with a K beyond the gallery size.
    """
    features, labels = CASES[case]()
    split = query_gallery(features, labels, query_share, seed=len(labels))
    expected = reference(*split[:2], ranks, *split[2:])
    assert expected['recall@1'] < expected[f'recall@{ranks[-1]}'] < 1 and 0 < expected['map@r'] < 1
    for side in (8, 37, 4096):
        assert_same(
            retrieval_metrics(*split[:2], ranks, *split[2:], chunk_bytes=4 * side * side), expected
        )


@pytest.mark.parametrize('case', CASES)
def test_per_query_figures_match_the_whole_matrix(case):
    """Each query's hits, AP@R and R-Precision from blocks of 37 x 37, in the caller's order, with and without a
    gallery, at K within the lists and beyond them, equal the full float64 matrix's, and their means the averages.
    """
    features, labels = CASES[case]()
    split = query_gallery(features, labels, 0.5, seed=len(labels))
    for args in ((features, labels), split[:2]):
        for ranks in ([1, 2, 4, 8], [1, 10, 100, 1000]):
            inputs = (*args, ranks, *([] if len(args[1]) == len(labels) else split[2:]))
            metrics, per_query = retrieval_metrics(*inputs, chunk_bytes=4 * 37 * 37, per_query=True)
            expected = reference_per_query(*inputs)
            assert per_query.keys() == expected.keys()
            for key in expected:
                assert torch.allclose(
                    per_query[key].double(),
                    expected[key].double(),
                    rtol=0,
                    atol=1e-9,
                    equal_nan=True,
                ), key
            assert_same(metrics, reference(*inputs))
            assert metrics == retrieval_metrics(*inputs, chunk_bytes=4 * 37 * 37)


def record_blocks(monkeypatch):
    """Record the (rows, columns) of every similarity block neighbours.cosine_block (or the
    screen's neighbours.bfloat16_block) computes from now on; returns the list."""
    shapes = []
    for name in ('cosine_block', 'bfloat16_block'):
        original = getattr(neighbours, name)

        def recording(queries, items, original=original):
            shapes.append((len(queries), len(items)))
            return original(queries, items)

        monkeypatch.setattr(neighbours, name, recording)
    return shapes


def test_no_block_is_n_by_n(monkeypatch):
    """Each thread's similarity block holds at most its share of chunk_bytes, and the blocks of the sweep cover the
    upper triangle of the matrix once: each pair is computed once, serving both of its items."""
    features, labels = data([4] * 100, 16, 1.0, seed=3)
    n, side = len(labels), 50
    shapes = record_blocks(monkeypatch)
    chunk_bytes = 4 * side * side * torch.get_num_threads()  # blocks of side x side, one per thread
    got = retrieval_metrics(features, labels, [1, 2, 4, 8], chunk_bytes=chunk_bytes)
    assert_same(got, reference(features, labels, [1, 2, 4, 8]))
    sweep = [shape for shape in shapes if shape == (side, side)]
    assert (
        len(sweep) == (n // side) * (n // side + 1) // 2
    )  # 8 x 8 chunks: the diagonal and the blocks above it
    assert max(rows * columns for rows, columns in shapes) <= side * side < n * n


def test_no_gallery_block_is_queries_by_gallery(monkeypatch):
    """With a gallery, each thread's block also holds at most its share of chunk_bytes, and the blocks of the sweep
    cover the queries x gallery matrix once, more queries than gallery items or fewer."""
    features, labels = data([4] * 150, 16, 1.0, seed=7)
    side = 30
    chunk_bytes = 4 * side * side * torch.get_num_threads()
    order = labels.argsort(stable=True)  # each class's 4 items in a row
    for per_class in (
        1,
        3,
    ):  # queries of each class: 150 queries x 450 gallery items, then 450 x 150
        is_query = torch.arange(len(labels)) % 4 < per_class
        split = (
            features[order][is_query],
            labels[order][is_query],
            features[order][~is_query],
            labels[order][~is_query],
        )
        shapes = record_blocks(monkeypatch)
        got = retrieval_metrics(*split[:2], [1, 2, 4, 8], *split[2:], chunk_bytes=chunk_bytes)
        monkeypatch.undo()
        assert_same(got, reference(*split[:2], [1, 2, 4, 8], *split[2:]))
        queries, items = len(split[1]), len(split[3])
        assert shapes.count((side, side)) == (queries // side) * (
            items // side
        )  # 5 x 15 or 15 x 5 chunks
        assert max(rows * columns for rows, columns in shapes) <= side * side < queries * items


def test_progress_counts_every_block_of_the_sweep():
    """progress(done, total) is called once per block of the sweep, in order, ending at total."""
    features, labels = data([4] * 100, 16, 1.0, seed=3)
    calls = []
    chunk_bytes = (
        4 * 50 * 50 * torch.get_num_threads()
    )  # 8 chunks of 50 rows: 36 blocks from the diagonal on
    got = retrieval_metrics(
        features, labels, [1, 2], chunk_bytes=chunk_bytes, progress=lambda *call: calls.append(call)
    )
    assert calls == [(done, 36) for done in range(1, 37)]
    assert got == retrieval_metrics(features, labels, [1, 2], chunk_bytes=chunk_bytes)


def test_plain_matmul_gives_the_metrics_of_onednn(monkeypatch):
    """cosine_block's fallback, a plain matmul, when oneDNN is switched off or its private op is
    missing or failing: the same metrics on cosines that are exact in any arithmetic, the float64
    matrix's on continuous ones."""
    calls, original = [], getattr(
        torch.ops.mkldnn, '_linear_pointwise', None
    )  # None where torch lacks it

    def recording(*args):
        calls.append(len(args[0]))
        if original is None:
            raise AttributeError('no _linear_pointwise in this torch')
        return original(*args)

    def failing(*args):
        raise RuntimeError('oneDNN: unsupported')

    for case in ('sop-like', 'uneven', 'gaussian'):
        features, labels = CASES[case]()
        split = query_gallery(features, labels, 0.5, seed=len(labels))
        for inputs in (
            (features, labels, [1, 10, 100, 1000]),
            (*split[:2], [1, 2, 4, 8], *split[2:]),
        ):
            monkeypatch.setattr(torch.ops, 'mkldnn', SimpleNamespace(_linear_pointwise=recording))
            with_onednn = retrieval_metrics(*inputs, chunk_bytes=4 * 37 * 37)
            assert bool(calls) == (
                torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            )
            calls.clear()
            with torch.backends.mkldnn.flags(enabled=False):
                switched_off = retrieval_metrics(*inputs, chunk_bytes=4 * 37 * 37)
            assert not calls
            monkeypatch.undo()
            for namespace in (
                SimpleNamespace(),
                SimpleNamespace(_linear_pointwise=failing),
            ):  # missing, failing
                monkeypatch.setattr(torch.ops, 'mkldnn', namespace)
                assert retrieval_metrics(*inputs, chunk_bytes=4 * 37 * 37) == switched_off
                monkeypatch.undo()
            assert_same(switched_off, reference(*inputs))
            if (
                case != 'gaussian'
            ):  # cosines are multiples of 1/16: every GEMM gives the same floats
                assert switched_off == with_onednn


def test_ties_rank_other_class_items_first():
    """An other-class item exactly as similar as a same-class one ranks before it.

    Items 1 (class 0) and 2 (class 1) are the same vector p; queries 0 = (1, 0) and 3 = (0, -1) see both at exactly
    the same cosine, p[0] and -p[1], whatever GEMM computes it (one product by 1, one by 0). So q0 finds item 2,
    then its classmate 1: a hit at rank 2; q3 finds item 0 (cosine 0), then item 1, then its classmate 2: rank 3.
    q1 and q2 have no ties: q1's classmate 0 comes after item 2 (rank 2), q2's classmate 3 after items 1 and 0.
    """
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [0.0, -1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    got = retrieval_metrics(features, labels, [1, 2, 3])
    assert got == {
        'recall@1': 0.0,
        'recall@2': 0.5,
        'recall@3': 1.0,
        'map@r': 0.0,
        'r_precision': 0.0,
    }
    assert got == pytest.approx(reference(features, labels, [1, 2, 3]))


def test_collapsed_embeddings_score_as_if_ranked_last():
    """All embeddings equal: every other-class item ties with, and so precedes, the query's classmates."""
    features = torch.tensor([[1.0, 0.0, 0.0]]).repeat(6, 1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    got = retrieval_metrics(features, labels, [1, 4, 5])
    assert got == {
        'recall@1': 0.0,
        'recall@4': 0.0,
        'recall@5': 1.0,
        'map@r': 0.0,
        'r_precision': 0.0,
    }


def test_collapsed_embeddings_against_a_gallery_score_as_if_ranked_last():
    """All embeddings equal, queries and gallery: every other-class gallery item precedes the query's classmates."""
    point = torch.tensor([[0.0, 1.0, 0.0]])
    got = retrieval_metrics(
        point.repeat(3, 1), [0, 1, 5], [1, 3, 4, 10], point.repeat(5, 1), [0, 1, 1, 2, 2]
    )
    # q0: 4 others then its 1 item, at 5; q1: 3 others, then its 2 at 4 and 5; q2: no gallery item
    assert got == {
        'recall@1': 0.0,
        'recall@3': 0.0,
        'recall@4': 1 / 3,
        'recall@10': 2 / 3,
        'map@r': 0.0,
        'r_precision': 0.0,
    }


def test_threads_give_the_same_answer_and_the_setting_is_restored():
    features, labels = data(
        list(np.random.default_rng(1).integers(1, 9, size=200)), 12, 1.2, seed=4
    )
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(
                retrieval_metrics(features, labels, [1, 10, 100], chunk_bytes=4 * 64 * 64)
            )
            assert (
                torch.get_num_threads() == threads
            )  # the single-threaded ops inside do not leak out
    finally:
        torch.set_num_threads(previous)
    assert results[0] == results[1] == results[2]


def test_labels_and_features_of_any_order_and_type():
    """Numpy inputs, unsorted labels with gaps, unnormalised rows: the same as sorted torch inputs."""
    features, labels = data([3, 5, 2, 6, 1, 4] * 10, 8, 1.0, seed=5)
    labels = labels * 7 + 100  # class ids with gaps
    order = labels.argsort()
    expected = retrieval_metrics(features[order], labels[order], [1, 2])
    got = retrieval_metrics((features * 3.5).numpy(), labels.numpy(), [1, 2])
    assert got == pytest.approx(expected, abs=1e-12)
    assert_same(got, reference(features, labels, [1, 2]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_matches_cpu():
    features, labels = data(
        list(np.random.default_rng(2).integers(1, 12, size=300)), 32, 1.5, seed=6
    )
    for ranks in ([1, 2, 4, 8], [1, 10, 100, 1000]):
        cpu = retrieval_metrics(features, labels, ranks, chunk_bytes=4 * 200 * 200)
        cuda = retrieval_metrics(features.cuda(), labels.cuda(), ranks, chunk_bytes=4 * 200 * 200)
        assert cuda == pytest.approx(cpu, abs=1e-9)


@pytest.mark.parametrize('gallery', [False, True])
def test_peak_memory_is_far_below_the_full_matrix(gallery):
    """At N = 12,000 the full matrix would take 549 MiB, and as much for 12,000 queries against a gallery of 12,000:
    the peak above the features stays under a third of that, whatever the number of threads, per query too.
    """
    code = textwrap.dedent(f'''
        import sys, numpy as np, torch
        sys.path.insert(0, {ROOT!r})
        from utils import retrieval_metrics
        torch.set_num_threads(4)  # one block per thread, in the same chunk_bytes

        def rss(field):
            with open('/proc/self/status') as file:
                return int(next(line for line in file if line.startswith(field)).split()[1]) * 1024

        rng = np.random.default_rng(0)
        n = 24000 if {gallery} else 12000
        labels = torch.tensor(rng.integers(0, n // 5, size=n))
        features = torch.tensor(rng.normal(size=(n // 5, 128))[labels.numpy()] + rng.normal(size=(n, 128)),
                                dtype=torch.float32)
        retrieval_metrics(features[:50], labels[:50], [1])  # load the libraries' lazily loaded parts first
        baseline = rss('VmRSS')
        with open('/proc/self/clear_refs', 'w') as file:
            file.write('5')  # VmHWM := VmRSS
        inputs = (features[:12000], labels[:12000], [1, 10, 100, 1000], features[12000:], labels[12000:]) \
            if {gallery} else (features, labels, [1, 10, 100, 1000])
        retrieval_metrics(*inputs)
        print(rss('VmHWM') - baseline)
        with open('/proc/self/clear_refs', 'w') as file:
            file.write('5')
        metrics, per_query = retrieval_metrics(*inputs, per_query=True)
        print(rss('VmHWM') - baseline)
    ''')
    if not os.access('/proc/self/clear_refs', os.W_OK):
        pytest.skip('needs Linux /proc/self/clear_refs to reset the peak resident size')
    result = subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    for variant, peak in zip(('plain', 'per query'), map(int, result.stdout.split()[-2:])):
        assert peak < 12000**2 * 4 / 3, f'{variant}: {peak / 2 ** 20:.0f} MiB'


# --------------------------------------------------------------------------------------------------
# top_k


def brute_top_k(queries, items, k, leave_out=None, live=None):
    """([similarities], [item indices]) of each query's k' nearest items from the float64 cosine
    matrix, by a plain sort on (similarity descending, item index), leaving out item leave_out[q]
    and the items not live; k' = min(k, the fewest items a query ranks)."""
    sims = (
        F.normalize(torch.as_tensor(queries).double(), dim=1)
        @ F.normalize(torch.as_tensor(items).double(), dim=1).T
    ).tolist()
    orders = []
    for q, row in enumerate(sims):
        ranked = [
            j
            for j in range(len(row))
            if (live is None or live[j]) and (leave_out is None or j != leave_out[q])
        ]
        orders.append(sorted(ranked, key=lambda j: (-row[j], j)))
    width = min([k] + [len(order) for order in orders])
    return (
        [[sims[q][j] for j in order[:width]] for q, order in enumerate(orders)],
        [order[:width] for order in orders],
    )


def assert_top_k(got, expected, atol=1e-6):
    """top_k's (similarities, indices) are brute_top_k's: the same items in the same order, and
    cosines within atol."""
    values, index = got
    assert values.dtype == torch.float32 and index.dtype == torch.int64
    assert index.tolist() == expected[1]
    expected_values = np.array(expected[0]).reshape(values.shape)
    np.testing.assert_allclose(values.numpy(), expected_values, atol=atol, rtol=0)


@pytest.mark.parametrize('case', CASES)
def test_top_k_matches_brute_force(case):
    """Queries against items that include them (each left out of its own list by its index, or
    not), in item blocks of 1 to all items and query blocks of 1 to all queries, for k from 1 to
    beyond the items: the brute force's lists. The grid cases' cosines are exact in any arithmetic
    and many are equal: ties go to the lower index."""
    features, _ = CASES[case]()
    queries, own = features[:24], torch.arange(24)
    own[::3] = -1  # these queries leave nothing out
    blocks = ((1, 2**25), (7, 4 * 7 * 5), (4096, 4 * 4096), (4096, 2**25))  # (rows, bytes)
    for k in (1, 5, len(features) + 3):
        expected = brute_top_k(queries, features, k, leave_out=own.tolist())
        for block_rows, chunk_bytes in blocks:
            assert_top_k(
                top_k(
                    queries,
                    features,
                    k,
                    leave_out=own,
                    block_rows=block_rows,
                    chunk_bytes=chunk_bytes,
                ),
                expected,
            )


def test_top_k_ties_go_to_the_lower_item_index():
    """Cosines 1, 1/2 and 0, exact in any arithmetic, each shared by many items: the equal ones
    come in item order, across item blocks and at the k-th place inside a block, whichever of
    several equal values torch.topk keeps."""
    kinds = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0]])
    kind = torch.from_numpy(np.random.default_rng(0).permutation([0] * 5 + [1] * 15 + [2] * 10))
    items, query = kinds[kind], kinds[:1]
    ones, halves = (kind == 0).nonzero()[:, 0].tolist(), (kind == 1).nonzero()[:, 0].tolist()
    for block_rows in (1, 4, 30):
        values, index = top_k(query, items, 9, block_rows=block_rows)
        assert index[0].tolist() == ones + halves[:4]
        assert values[0].tolist() == [1.0] * 5 + [0.5] * 4
        values, index = top_k(query, items, 9, leave_out=[ones[2]], block_rows=block_rows)
        assert index[0].tolist() == ones[:2] + ones[3:] + halves[:5]
    collapsed = torch.tensor([[0.0, 3.0]]).repeat(50, 1)  # every item equal
    _, index = top_k(collapsed[:4], collapsed, 10, leave_out=[0, 3, 12, -1], block_rows=8)
    assert index.tolist() == [
        list(range(1, 11)),
        [0, 1, 2] + list(range(4, 11)),
        list(range(10)),
        list(range(10)),
    ]


def test_top_k_beyond_the_items_gives_all_that_every_query_ranks():
    """k above the items: each list holds as many as the query that ranks the fewest, leaving out
    its own live item (a dead one it leaves out takes nothing); no items, or none live, give empty
    lists."""
    features, _ = CASES['gaussian']()
    queries, items = features[:3], features[:6]
    assert top_k(queries, items, 100)[1].shape == (3, 6)
    assert_top_k(
        top_k(queries, items, 100, leave_out=[0, -1, 2]),
        brute_top_k(queries, items, 100, leave_out=[0, -1, 2]),
    )
    live = torch.tensor([True, False, True, True, False, True])
    assert top_k(queries, items, 100, live=live)[1].shape == (3, 4)
    assert top_k(queries, items, 100, leave_out=[1, 4, -1], live=live)[1].shape == (3, 4)
    assert_top_k(
        top_k(queries, items, 100, leave_out=[0, 4, -1], live=live),
        brute_top_k(queries, items, 100, leave_out=[0, 4, -1], live=live),
    )
    assert top_k(queries, items[:0], 5)[1].shape == (3, 0)
    assert top_k(queries, items, 5, live=torch.zeros(6, dtype=torch.bool))[1].shape == (3, 0)


@pytest.mark.parametrize('case', ['sop-like', 'random', 'gaussian'])
def test_float16_items_with_dead_rows(case):
    """float16 unit rows, as a gallery store holds them, some of them dead: the brute force's lists
    over the same values, ties in item order (grid cosines are exact in float16 too, and many are
    equal), the cosines within the rounding of the rows' norms to float16 (top_k takes them as 1).
    """
    features, _ = CASES[case]()
    rng = np.random.default_rng(len(features))
    live = torch.from_numpy(rng.random(len(features)) > 0.3)
    leave_out = torch.arange(25)
    leave_out[::4] = -1
    items = F.normalize(features, dim=1).half()
    expected = brute_top_k(features[:25], items.float(), 7, leave_out=leave_out.tolist(), live=live)
    for block_rows in (5, 4096):
        got = top_k(
            features[:25], items, 7, leave_out=leave_out, live=live.numpy(), block_rows=block_rows
        )
        assert_top_k(got, expected, atol=2**-11)


def test_top_k_blocks_stay_within_chunk_bytes(monkeypatch):
    """Each similarity block holds at most chunk_bytes, the blocks cover the queries x items once,
    progress counts them in order, and the lists are the brute force's."""
    features, _ = data([4] * 100, 16, 1.0, seed=3)
    shapes, calls = record_blocks(monkeypatch), []
    got = top_k(
        features,
        features,
        5,
        leave_out=torch.arange(400),
        block_rows=64,
        chunk_bytes=4 * 64 * 50,
        progress=lambda *call: calls.append(call),
    )
    assert max(rows * columns for rows, columns in shapes) <= 64 * 50
    assert sum(rows * columns for rows, columns in shapes) == 400 * 400
    assert calls == [(done, 7 * 8) for done in range(1, 7 * 8 + 1)]  # 7 item x 8 query blocks
    assert_top_k(got, brute_top_k(features, features, 5, leave_out=list(range(400))))


def test_the_gallery_scan_is_top_k_over_the_store(tmp_path, monkeypatch):
    """gallery.Store.search, exact, over a store with duplicate and dead rows, read a few rows at a
    time, a row left out: the brute force's paths over the stored float16 values, ties in row
    order."""
    features, _ = CASES['random']()
    features = torch.cat([features, features[:20]])  # duplicates: exact ties
    model = tmp_path / 'model.pth'
    model.write_bytes(b'')
    (tmp_path / 'store').mkdir()
    store = gallery.Store(str(tmp_path / 'store'), str(model), features.shape[1])
    paths = [f'/photos/{row:04d}.jpg' for row in range(len(features))]
    store.append([(path, 1, 1) for path in paths], features.numpy(), [])
    store.load()
    store.live[np.random.default_rng(0).random(len(features)) < 0.2] = False
    monkeypatch.setattr(gallery, 'READ_ROWS', 11)
    stored = torch.from_numpy(np.asarray(store.rows, dtype=np.float32))
    for row in (0, 5, 17):
        expected = brute_top_k(stored[row : row + 1], stored, 12, leave_out=[row], live=store.live)
        found = store.search(features[row], 12, exclude=row)
        assert [path for path, _ in found] == [paths[j] for j in expected[1][0]]
        np.testing.assert_allclose([value for _, value in found], expected[0][0], atol=1e-6, rtol=0)


def test_top_k_among_candidates():
    """Candidates from an approximate index (-1 for none, ids past the items, dead ones, the
    query's own): the brute force's lists over the candidates that may be found, ties in item
    order, as many as the query with the fewest has."""
    features, _ = CASES['sop-like']()
    items = F.normalize(features, dim=1).half()
    live = torch.ones(len(items), dtype=torch.bool)
    live[[3, 40]] = False
    among = torch.tensor([[7, -1, 3, 9, 0, 12, 40, 900, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9]])
    got = top_k(features[:2], items, 4, leave_out=[0, 4], live=live, among=among)
    allowed = torch.zeros(2, len(items), dtype=torch.bool)
    for q, row in enumerate(among.tolist()):
        allowed[q, [j for j in row if 0 <= j < len(items)]] = True
    expected = [
        brute_top_k(
            features[q : q + 1], items.float(), 4, leave_out=[[0, 4][q]], live=live & allowed[q]
        )
        for q in range(2)
    ]
    assert_top_k(got, ([e[0][0] for e in expected], [e[1][0] for e in expected]), atol=2**-11)
    _, index = top_k(features[:2], items, 10, leave_out=[0, 4], live=live, among=among)
    assert index.shape == (2, 4)  # the first query has 4 candidates it may find: 7, 9, 12, 5
