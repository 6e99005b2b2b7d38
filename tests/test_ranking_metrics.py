"""precision@k, mAP@k and MRR from the block sweep against open-metric-learning's formulas written out
here and pytorch-metric-learning's AccuracyCalculator; the bfloat16 screen of the sweep against
brute force where it is at its worst: many scores within its error bound of each other, duplicate
rows and exact ties."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

import neighbours
from utils import UserError, retrieval_metrics

EXTRA = ('precision@1', 'precision@3', 'precision@10', 'map@2', 'map@10', 'map@1000', 'mrr')


def relevance_lists(features, labels, gallery_features=None, gallery_labels=None):
    """Each query's items ranked by their float64 cosine, other-class items first among exact ties
    (the rule retrieval_metrics documents), the query itself left out by its position: (N, ranked)
    bool, True where the item shares the query's class."""
    queries = F.normalize(torch.as_tensor(features).double(), dim=1)
    itself = gallery_features is None
    items = queries if itself else F.normalize(torch.as_tensor(gallery_features).double(), dim=1)
    item_labels = labels if itself else gallery_labels
    sims = (queries @ items.T).tolist()
    lists = []
    for q, row in enumerate(sims):
        same = [int(label) == int(labels[q]) for label in item_labels]
        order = sorted(
            (i for i in range(len(row)) if not (itself and i == q)),
            key=lambda i: (-row[i], same[i]),
        )
        lists.append([same[i] for i in order])
    return torch.tensor(lists, dtype=torch.bool)


def oml_reference(relevant, names):
    """The extra metrics from relevance lists (N, ranked), averaged over the queries with R > 0:
    open-metric-learning's calc_precision and calc_map (k capped at the list's length; divided by
    min(k, R)) and the reciprocal rank of the first relevant item."""
    n_gt = relevant.sum(1).double()  # (N,) R
    has_r = n_gt > 0
    correct = relevant.double().cumsum(1)  # (N, ranked)
    out = {}
    for name in names:
        if name == 'mrr':
            first = (relevant.double().argmax(1) + 1).double()
            out[name] = (1 / first)[has_r].mean().item()
            continue
        k = min(int(name.split('@')[1]), relevant.size(1))
        clipped = torch.minimum(n_gt, torch.tensor(float(k)))
        if name.startswith('precision@'):
            value = correct[:, k - 1] / clipped
        else:
            positions = torch.arange(1, k + 1, dtype=torch.float64)
            value = ((correct[:, :k] / positions) * relevant[:, :k]).sum(1) / clipped
        out[name] = value[has_r].mean().item()
    return out


def clustered(sizes, dim, spread, seed):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    centres = rng.normal(size=(len(sizes), dim))
    features = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


def four_squares(rest):
    """Four integers whose squares sum to rest >= 0."""
    a0 = math.isqrt(rest)
    for a in range(a0, max(-1, a0 - 50), -1):
        b0 = math.isqrt(rest - a * a)
        for b in range(b0, max(-1, b0 - 50), -1):
            left = rest - a * a - b * b
            for c in range(math.isqrt(left) + 1):
                d = math.isqrt(left - c * c)
                if d * d == left - c * c:
                    return [a, b, c, d]
    raise AssertionError(f'no four squares found for {rest}')


def near_ties(count, classes, seed, dim=32, bases=3, duplicates=12):
    """Rows whose every cosine is exact in float32 and float64 yet rounds in bfloat16, most of them
    within the screen's bound of each other: integer rows of squared length 4^12 (so unit rows
    are the integers / 4096 and a cosine an integer / 2^24), odd entries of 9 to 10 bits around
    a few base rows, moved by -2 to 2 here and there, a quarter of them moved alike (exact ties),
    the last four entries making up the length; some rows repeated, in other classes or the
    same. Labels at random, so same-class and other-class scores interleave."""
    rng = np.random.default_rng(seed)
    base = 2 * rng.integers(130, 300, size=(bases, dim - 4)) + 1  # odd, 261 to 599
    rows = []
    for i in range(count):
        row = base[i % bases].copy()
        if i % 4:  # the other quarter stays the base row itself: exact ties
            moved = rng.choice(dim - 4, 6, replace=False)
            row[moved] += rng.integers(-2, 3, size=6)
        rest = 4**12 - int((row.astype(np.int64) ** 2).sum())
        rows.append(np.concatenate([row, four_squares(rest)]))
    rows = np.array(rows, dtype=np.float64)
    labels = rng.integers(0, classes, size=count)
    copies = rng.choice(count, duplicates, replace=False)
    rows = np.concatenate([rows, rows[copies]])
    labels = np.concatenate(
        [
            labels,
            np.where(
                np.arange(duplicates) % 2, labels[copies], rng.integers(0, classes, size=duplicates)
            ),
        ]
    )
    assert ((rows**2).sum(1) == 4**12).all()
    return torch.tensor(rows, dtype=torch.float32), torch.tensor(labels)


def assert_close(got, expected):
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


@pytest.mark.parametrize('screen', [False, True])
@pytest.mark.parametrize('gallery', [False, True])
def test_extra_metrics_match_the_formulas_written_out(screen, gallery):
    """precision@k, mAP@k and MRR from blocks of 16 x 16 and whole-matrix size, on the float32
    path and the screened one, equal open-metric-learning's formulas on the brute-force ranking,
    with k below R, above R and beyond the items (capped), singletons and exact ties."""
    features, labels = near_ties(150, 25, seed=1)
    inputs = (features, labels)
    if gallery:
        is_query = torch.arange(len(labels)) % 3 == 0
        inputs = (features[is_query], labels[is_query], features[~is_query], labels[~is_query])
    relevant = relevance_lists(*inputs)
    expected = oml_reference(relevant, EXTRA)
    assert 0 < expected['precision@1'] < 1 and 0 < expected['mrr'] < 1
    ranks = [1, 10, 2000]
    for side in (16, 4096):
        got = retrieval_metrics(
            *inputs[:2], ranks, *inputs[2:], chunk_bytes=4 * side * side, extra=EXTRA, screen=screen
        )
        assert_close(got, expected)
        assert list(got)[:5] == ['recall@1', 'recall@10', 'recall@2000', 'map@r', 'r_precision']


def test_per_query_extra_figures_are_nan_without_an_item_of_the_class():
    """Per query, in the caller's order: each extra figure, NaN where R = 0; their means are the
    averages."""
    features, labels = clustered([1, 3, 5, 2, 1, 8, 4], 6, 1.2, seed=2)
    relevant = relevance_lists(features, labels)
    metrics, per_query = retrieval_metrics(
        features, labels, [1, 2], per_query=True, extra=('precision@3', 'map@4', 'mrr')
    )
    lone = relevant.sum(1) == 0
    for name in ('precision@3', 'map@4', 'mrr'):
        assert per_query[name].isnan().tolist() == lone.tolist()
        assert per_query[name].nanmean().item() == pytest.approx(metrics[name], abs=1e-12)
    first = (relevant.double().argmax(1) + 1).double()
    assert torch.allclose(per_query['mrr'][~lone], 1 / first[~lone])


def test_mrr_matches_pytorch_metric_learning_with_ties():
    """MRR equals AccuracyCalculator's mean_reciprocal_rank (lone queries left out) given the
    same ranking, ties ordered as retrieval_metrics orders them."""
    features, labels = near_ties(90, 20, seed=3)
    relevant = relevance_lists(features, labels)
    units = F.normalize(features.double(), dim=1)

    def knn(query, k, reference, ref_includes_query=False):
        """The ranking of relevance_lists: float64 cosines, other-class items first among ties."""
        sims = (units @ units.T).tolist()
        indices = []
        for q in range(len(units)):
            order = sorted(
                (i for i in range(len(units)) if not (ref_includes_query and i == q)),
                key=lambda i: (-sims[q][i], labels[i] == labels[q]),
            )
            indices.append(order[:k])
        indices = torch.tensor(indices)
        return torch.gather(units @ units.T, 1, indices).float(), indices

    # PML 2.9 finds the neighbours only when a metric of its requires_knn() list is asked for,
    # which leaves mean_reciprocal_rank out: precision_at_1 brings them
    calculator = AccuracyCalculator(
        include=('mean_reciprocal_rank', 'precision_at_1'),
        knn_func=knn,
        k=len(labels) - 1,
        device=torch.device('cpu'),
    )
    expected = calculator.get_accuracy(features, labels)['mean_reciprocal_rank']
    assert 0 < expected < 1
    # PML averages in float32
    assert oml_reference(relevant, ['mrr'])['mrr'] == pytest.approx(expected, abs=1e-6)
    for screen in (False, True):
        got = retrieval_metrics(features, labels, [1], extra=('mrr',), screen=screen)
        assert got['mrr'] == pytest.approx(expected, abs=1e-6)
        assert got['mrr'] == pytest.approx(oml_reference(relevant, ['mrr'])['mrr'], abs=1e-12)


def test_unknown_extra_metric_is_one_sentence():
    features, labels = clustered([2, 2], 4, 1.0, seed=4)
    for name in ('precision@0', 'map@r', 'ndcg@5', 'precision@'):
        with pytest.raises(UserError, match='use precision@k, map@k'):
            retrieval_metrics(features, labels, [1], extra=(name,))


def test_screened_sweep_equals_the_float32_one_at_its_worst():
    """Where most scores lie within the screen's bound of each other, with duplicates and exact
    ties, the screened sweep gives the float32 sweep's metrics exactly, and brute force's, in
    blocks of 7 x 7 to whole-matrix size, with Recall@K counted beyond the lists."""
    features, labels = near_ties(200, 30, seed=5)
    ranks = [1, 4, 100, 1000]
    relevant = relevance_lists(features, labels)
    for side in (7, 64, 4096):
        plain = retrieval_metrics(
            features, labels, ranks, chunk_bytes=4 * side * side, extra=EXTRA, screen=False
        )
        assert (
            retrieval_metrics(
                features, labels, ranks, chunk_bytes=4 * side * side, extra=EXTRA, screen=True
            )
            == plain
        )
    assert_close(plain, oml_reference(relevant, EXTRA))
    has_r = relevant.any(1)
    assert plain['recall@4'] == pytest.approx(relevant[:, :4].any(1).double().mean().item())
    assert has_r.all() or plain['recall@1000'] < 1


def test_screen_bound_holds_on_every_product():
    """Every bfloat16 product of the screen lies within the bound it assumes of the exact one."""
    for features, _ in (near_ties(120, 10, seed=6), clustered([5] * 40, 512, 0.8, seed=7)):
        data = neighbours.sorted_by_class(features, torch.zeros(len(features)), None, None)
        screen = neighbours.Screen(data)
        n = len(data.queries)
        rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing='ij')
        exact = neighbours.exact_pairs(data.queries, rows.flatten(), data.queries, cols.flatten())
        sims = neighbours.bfloat16_block(screen.queries, screen.queries).float().flatten()
        own, worst = screen.query_error[rows.flatten()], float(screen.query_error.max())
        slack = (own + worst + own * worst + screen.gamma * (1 + own) * (1 + worst)) * (1 + 1e-5)
        allowed = slack + 2.0**-22 + neighbours.BFLOAT16_ROUNDING * (exact.abs() + slack)
        error = (sims - exact).abs()
        assert (error <= allowed).all()
        assert error.max() > 0  # the rounding is real
