"""Recall@K, MAP@R and R-Precision against brute force, a hand-worked example with duplicates, and PML."""

import importlib.util
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from conftest import ROOT
from utils import UserError, recall, retrieval_metrics


def ranked_metrics(rankings, ranks):
    """Every metric from each query's ranked relevance list (True where the item shares the query's class)."""
    per_query = ranked_per_query(rankings, ranks)
    average_precisions = [ap for ap in per_query['ap@r'] if not math.isnan(ap)]
    r_precisions = [rp for rp in per_query['r_precision'] if not math.isnan(rp)]
    metrics = {f'recall@{k}': sum(per_query[f'recall@{k}']) / len(rankings) for k in ranks}
    metrics['map@r'] = float(np.mean(average_precisions)) if average_precisions else math.nan
    metrics['r_precision'] = float(np.mean(r_precisions)) if r_precisions else math.nan
    return metrics


def ranked_per_query(rankings, ranks):
    """Each query's figures from its ranked relevance list: {'recall@K': [hit], 'ap@r': [AP],
    'r_precision': [RP]}, NaN AP and RP for a query with no item of its class."""
    per_query = {**{f'recall@{k}': [] for k in ranks}, 'ap@r': [], 'r_precision': []}
    for relevant in rankings:
        for k in ranks:
            per_query[f'recall@{k}'].append(any(relevant[:k]))
        r = sum(relevant)
        if (
            r == 0
        ):  # no item of the class to find: MAP@R and R-Precision are undefined for this query
            per_query['ap@r'].append(math.nan)
            per_query['r_precision'].append(math.nan)
            continue
        found, precision_sum = 0, 0.0
        for position in range(1, r + 1):
            if relevant[position - 1]:
                found += 1
                precision_sum += found / position
        per_query['ap@r'].append(precision_sum / r)
        per_query['r_precision'].append(found / r)
    return per_query


def brute_force(features, labels, ranks):
    """Every metric from the full cosine matrix with plain loops: per query, sort the others by similarity."""
    return ranked_metrics(rankings_of(features, labels), ranks)


def rankings_of(features, labels):
    """Each query's relevance list over the others sorted by similarity, from the full float64 cosine matrix."""
    features = np.asarray(features, dtype=np.float64)
    features = features / np.linalg.norm(features, axis=1, keepdims=True)
    labels = list(np.asarray(labels))
    n = len(labels)
    sims = features @ features.T
    rankings = []
    for q in range(n):
        others = sorted((j for j in range(n) if j != q), key=lambda j: -sims[q, j])
        rankings.append([labels[j] == labels[q] for j in others])
    return rankings


def clustered(n, num_classes, dim, spread, seed, sizes=None):
    """Random features around one centre per class; sizes fixes how many items each class has."""
    rng = np.random.default_rng(seed)
    if sizes is None:
        labels = rng.integers(num_classes, size=n)
    else:
        labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    centres = rng.normal(size=(labels.max() + 1, dim))
    features = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


RANKS = [1, 2, 4, 8]


@pytest.mark.parametrize(
    'n, num_classes, dim, spread, seed',
    [
        (60, 6, 8, 1.0, 0),
        (200, 20, 16, 1.5, 1),
        (37, 30, 4, 0.8, 2),  # many classes of 1 or 2 items
        (25, 2, 3, 2.0, 3),
    ],
)
def test_metrics_match_brute_force(n, num_classes, dim, spread, seed):
    features, labels = clustered(n, num_classes, dim, spread, seed)
    expected = brute_force(features, labels, RANKS)
    got = retrieval_metrics(features, labels, RANKS)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-6, nan_ok=True), key
    assert recall(features, labels, RANKS) == pytest.approx(
        [expected[f'recall@{k}'] for k in RANKS]
    )
    # not a trivial case: the metrics differ from each other and from 0 and 1
    assert 0 < expected['recall@1'] < expected['recall@8'] <= 1
    assert 0 < expected['map@r'] < 1


def test_chunking_does_not_change_the_result():
    """Queries are processed in chunks; chunks of 1 and 7 rows give the answer of a single chunk."""
    features, labels = clustered(50, 5, 6, 1.2, 4)
    whole = retrieval_metrics(features, labels, RANKS)
    for rows in (1, 7):
        chunked = retrieval_metrics(features, labels, RANKS, chunk_bytes=rows * 4 * len(labels))
        assert chunked == pytest.approx(whole, abs=1e-6)


def test_k_larger_than_the_set():
    features, labels = clustered(6, 2, 3, 0.5, 5)
    got = retrieval_metrics(features, labels, [1, 100])
    assert got == pytest.approx(brute_force(features, labels, [1, 100]), abs=1e-6)
    assert got['recall@100'] == 1.0  # every class has a second item among the 5 others


def angles(*degrees):
    """Unit vectors in the plane at the given angles: cosine order is angular-distance order."""
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()


def test_hand_worked_example_with_duplicates():
    """Eight items on the unit circle; items 0 and 1 are the same image with different labels, 2 and
    3 the same image with the same label, item 4 is the only one of its class.

    item:   0    1    2    3    4     5    6    7
    angle:  0    0   30   30  105   -40  -75  -55
    label:  0    1    2    2    3     0    1    1

    Neighbours by angular distance (ties only between identical rows, which never straddle a cut
    used here):
    q0: 1(L1) {2,3}(L2) 5(L0)        -> hit at 4; R=1, first 1 is L1: AP 0, RP 0
    q1: 0(L0) {2,3} 5 7(L1) 6 4      -> hit at 5; R=2, first 2 miss: AP 0, RP 0
        (its duplicate 0 ties with the query itself: an evaluation that drops rank 0 would count q1
        a hit at 1)
    q2: 3(L2) ...                    -> hit at 1; R=1: AP 1, RP 1;  q3 likewise
    q4: singleton                    -> never a hit; no MAP@R or RP
    q5: 7(L1) 6(L1) {0,1}            -> hit at 3 or 4; R=1: AP 0, RP 0
    q6: 7(L1) 5(L0) {0,1}            -> hit at 1; R=2: AP (1/1)/2 = 0.5, RP 1/2
    q7: 5(L0) 6(L1) {0,1}            -> hit at 2; R=2: AP (1/2)/2 = 0.25, RP 1/2
    """
    features = angles(0, 0, 30, 30, 105, -40, -75, -55)
    labels = torch.tensor([0, 1, 2, 2, 3, 0, 1, 1])
    got = retrieval_metrics(features, labels, [1, 2, 4])
    assert got['recall@1'] == pytest.approx(3 / 8)  # q2, q3, q6
    assert got['recall@2'] == pytest.approx(4 / 8)  # + q7
    assert got['recall@4'] == pytest.approx(6 / 8)  # + q0, q5
    assert got['map@r'] == pytest.approx((1 + 1 + 0.5 + 0.25) / 7)  # the singleton q4 is left out
    assert got['r_precision'] == pytest.approx((1 + 1 + 0.5 + 0.5) / 7)
    assert got == pytest.approx(brute_force(features, labels, [1, 2, 4]))


def test_query_is_excluded_by_position_not_by_rank():
    """When a duplicate of the query sorts first, dropping rank 0 would keep the query itself as its own hit."""
    features = angles(0, 0, 150, -160)  # items 0 and 1 are the same image
    labels = torch.tensor([0, 1, 1, 1])
    # the naive evaluation sorts each row and drops the first column; a stable sort puts item 0
    # first in row 1, so it would answer query 1 with query 1 itself
    sims = F.normalize(features, dim=-1) @ F.normalize(features, dim=-1).T
    naive = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, 1]
    assert naive[1].item() == 1
    # q0: nearest 1 (L1) miss; q1: nearest 0 (L0) miss; q2 and q3 (50 degrees apart) answer each
    # other: hits
    assert recall(features, labels, [1, 2]) == pytest.approx(
        [2 / 4, 3 / 4]
    )  # q1 hits item 2 at rank 2


def test_identical_duplicates_of_the_same_class_are_hits():
    features = angles(10, 10, 10, 200, 200)
    labels = torch.tensor([0, 0, 0, 1, 1])
    got = retrieval_metrics(features, labels, [1])
    assert got['recall@1'] == 1.0 and got['map@r'] == 1.0 and got['r_precision'] == 1.0


def test_fewer_than_two_items_is_a_user_error():
    with pytest.raises(UserError):
        retrieval_metrics(torch.ones(1, 4), torch.tensor([0]), [1])


def test_only_singletons_gives_nan_map_and_zero_recall():
    features, _ = clustered(5, 5, 3, 1.0, 6)
    got = retrieval_metrics(features, torch.arange(5), [1, 2])
    assert got['recall@1'] == 0 and got['recall@2'] == 0
    assert math.isnan(got['map@r']) and math.isnan(got['r_precision'])


# ----------------------------------------------------------------------------------------------------------------------
# pytorch-metric-learning's AccuracyCalculator as a second reference


def brute_force_knn(query, k, reference, ref_includes_query=False):
    """PML's knn_func interface: (distances, indices) of the k most similar references by cosine;
    when the reference set includes the queries, each query's own row is removed by position."""
    sims = F.normalize(query.double(), dim=1) @ F.normalize(reference.double(), dim=1).T  # (Q, N)
    if ref_includes_query:
        sims[torch.arange(len(query)), torch.arange(len(query))] = -math.inf
    values, indices = torch.sort(sims, dim=1, descending=True, stable=True)
    return values[:, :k].float(), indices[:, :k]


@pytest.mark.parametrize(
    'sizes, seed',
    [
        ([1, 2, 3, 5, 8, 13, 30], 0),  # very different class sizes, one singleton
        ([1, 1, 4, 4, 40], 1),  # two singletons and one dominant class
        ([6, 6, 6, 6, 6], 2),
    ],
)
def test_metrics_match_pytorch_metric_learning(sizes, seed):
    features, labels = clustered(None, None, 6, 1.3, seed, sizes=sizes)
    calculator = AccuracyCalculator(
        include=('precision_at_1', 'r_precision', 'mean_average_precision_at_r'),
        knn_func=brute_force_knn,
        device=torch.device('cpu'),
    )
    reference = calculator.get_accuracy(features, labels)
    got = retrieval_metrics(features, labels, [1])
    assert got['map@r'] == pytest.approx(reference['mean_average_precision_at_r'], abs=1e-6)
    assert got['r_precision'] == pytest.approx(reference['r_precision'], abs=1e-6)
    # PML leaves the queries of singleton classes out of precision@1 too, while Recall@1 counts them
    # as misses (the fraction of all queries with a hit, as the reference implementation reports it)
    n, lone = len(labels), sum(size == 1 for size in sizes)
    assert got['recall@1'] * n == pytest.approx(reference['precision_at_1'] * (n - lone), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# queries against a separate gallery


def brute_force_gallery(queries, query_labels, gallery, gallery_labels, ranks):
    """Every metric from the full query x gallery cosine matrix with plain loops: per query, the
    whole gallery sorted by similarity, other-class items first among exact ties; nothing
    excluded."""
    return ranked_metrics(
        gallery_rankings_of(queries, query_labels, gallery, gallery_labels), ranks
    )


def gallery_rankings_of(queries, query_labels, gallery, gallery_labels):
    """Each query's relevance list over the whole gallery sorted by similarity, other-class items first among ties."""
    queries = np.asarray(queries, dtype=np.float64)
    gallery = np.asarray(gallery, dtype=np.float64)
    sims = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    ).T
    query_labels, gallery_labels = list(np.asarray(query_labels)), list(np.asarray(gallery_labels))
    rankings = []
    for q, label in enumerate(query_labels):
        ranking = sorted(
            range(len(gallery_labels)), key=lambda j: (-sims[q, j], gallery_labels[j] == label)
        )
        rankings.append([gallery_labels[j] == label for j in ranking])
    return rankings


def split_query_gallery(features, labels, query_share, seed, query_only=2, gallery_only=2):
    """Each item a query or a gallery item at random (query_share of them queries), except that the
    first query_only classes are all queries (no gallery item: R = 0) and the next gallery_only all
    gallery.
    """
    rng = np.random.default_rng(seed)
    is_query = rng.random(len(labels)) < query_share
    is_query[labels.numpy() < query_only] = True
    is_query[(labels.numpy() >= query_only) & (labels.numpy() < query_only + gallery_only)] = False
    is_query = torch.from_numpy(is_query)
    return features[is_query], labels[is_query], features[~is_query], labels[~is_query]


@pytest.mark.parametrize(
    'n, num_classes, dim, spread, query_share, seed',
    [
        (120, 12, 8, 1.0, 0.5, 0),
        (150, 15, 16, 1.5, 0.8, 1),  # more queries than gallery items
        (150, 15, 16, 1.5, 0.2, 2),  # more gallery items than queries
        (60, 30, 4, 0.8, 0.5, 3),  # many classes of 1 or 2 items on either side
    ],
)
def test_gallery_metrics_match_brute_force(n, num_classes, dim, spread, query_share, seed):
    """Classes with no gallery item (misses for Recall@K, left out of MAP@R), gallery classes no
    query has, K above the gallery size, and blocks of one or seven rows, all as the full matrix
    says."""
    features, labels = clustered(n, num_classes, dim, spread, seed)
    queries, query_labels, gallery, gallery_labels = split_query_gallery(
        features, labels, query_share, seed
    )
    ranks = [1, 2, 4, 8, len(gallery_labels), len(gallery_labels) + 5]
    expected = brute_force_gallery(queries, query_labels, gallery, gallery_labels, ranks)
    assert 0 < expected['recall@1'] < expected['recall@8'] < 1 and 0 < expected['map@r'] < 1
    # the classes with no gallery item hold every query that never hits, even with the whole gallery
    # ranked
    lone = torch.isin(query_labels, gallery_labels, invert=True)
    assert lone.any() and expected[f'recall@{len(gallery_labels)}'] == pytest.approx(
        1 - lone.double().mean().item()
    )
    for chunk_bytes in (
        32 * 2**20,
        4 * 1 * torch.get_num_threads(),
        4 * 7 * 7 * torch.get_num_threads(),
    ):
        got = retrieval_metrics(
            queries, query_labels, ranks, gallery, gallery_labels, chunk_bytes=chunk_bytes
        )
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], abs=1e-6), key


def test_gallery_hand_worked_example_with_duplicates_and_ties():
    """Queries against a gallery on the unit circle; duplicates across the two sets are ordinary
    neighbours.

    gallery: item  g0   g1   g2   g3   g4
             angle  0    0   90  180  -90
             label  0    1    0    1    2
    q0 (0°, label 0) is a duplicate of g0 and of g1: g1, of another class, ties with g0 and ranks
    first; g2 and g4
        tie at cosine ~0 (the same float either way), g4 first: g1 g0 g4 g2 g3. Hit at 2; R = 2 (g0,
        g2), g2 beyond it: AP (1/2)/2 = 0.25, RP 1/2
    q1 (180°, label 1) is a duplicate of g3, of its class: g3 g2 g4 g0 g1 (g0 before g1 in their tie
    at -1). Hit at
        1; R = 2 (g3, g1): AP (1/1)/2 = 0.5, RP 1/2
    q2 (45°, label 3): no gallery item of its class: a miss at every K, left out of MAP@R and
    R-Precision q3 (90°, label 2): g2 (label 0) first, g4 (its class, -1) last at 5. R = 1: AP 0, RP
    0
    """
    queries = angles(0, 180, 45, 90)
    query_labels = torch.tensor([0, 1, 3, 2])
    gallery = angles(0, 0, 90, 180, -90)
    gallery_labels = torch.tensor([0, 1, 0, 1, 2])
    got = retrieval_metrics(queries, query_labels, [1, 2, 4, 5, 100], gallery, gallery_labels)
    assert got['recall@1'] == pytest.approx(1 / 4)  # q1
    assert got['recall@2'] == pytest.approx(2 / 4)  # + q0
    assert got['recall@4'] == pytest.approx(2 / 4)
    assert got['recall@5'] == got['recall@100'] == pytest.approx(3 / 4)  # + q3; q2 never
    assert got['map@r'] == pytest.approx((0.25 + 0.5 + 0) / 3)
    assert got['r_precision'] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert got == pytest.approx(
        brute_force_gallery(queries, query_labels, gallery, gallery_labels, [1, 2, 4, 5, 100])
    )


def test_gallery_with_no_query_class_gives_nan_map_and_zero_recall():
    features, labels = clustered(20, 4, 3, 1.0, 7)
    got = retrieval_metrics(features[:10], labels[:10], [1, 5], features[10:], labels[10:] + 10)
    assert got['recall@1'] == 0 and got['recall@5'] == 0
    assert math.isnan(got['map@r']) and math.isnan(got['r_precision'])


def test_an_empty_query_set_or_gallery_is_a_user_error():
    with pytest.raises(UserError):
        retrieval_metrics(
            torch.ones(0, 4), torch.tensor([], dtype=torch.long), [1], torch.ones(2, 4), [0, 1]
        )
    with pytest.raises(UserError):
        retrieval_metrics(
            torch.ones(2, 4), torch.tensor([0, 1]), [1], torch.ones(0, 4), torch.tensor([])
        )


@pytest.mark.parametrize(
    'sizes, query_share, seed',
    [
        ([1, 2, 3, 5, 8, 13, 30], 0.5, 0),  # very different class sizes
        ([2, 2, 4, 4, 40, 6], 0.8, 1),  # more queries than gallery items
        ([6, 6, 6, 6, 6, 9], 0.25, 2),  # more gallery items than queries
    ],
)
def test_gallery_metrics_match_pytorch_metric_learning(sizes, query_share, seed):
    """PML with a separate reference set (ref_includes_query=False), one query class absent from the gallery."""
    features, labels = clustered(None, None, 6, 1.3, seed, sizes=sizes)
    queries, query_labels, gallery, gallery_labels = split_query_gallery(
        features, labels, query_share, seed, query_only=1, gallery_only=1
    )
    calculator = AccuracyCalculator(
        include=('precision_at_1', 'r_precision', 'mean_average_precision_at_r'),
        knn_func=brute_force_knn,
        device=torch.device('cpu'),
    )
    reference = calculator.get_accuracy(
        queries, query_labels, gallery, gallery_labels, ref_includes_query=False
    )
    got = retrieval_metrics(queries, query_labels, [1], gallery, gallery_labels)
    assert got['map@r'] == pytest.approx(reference['mean_average_precision_at_r'], abs=1e-6)
    assert got['r_precision'] == pytest.approx(reference['r_precision'], abs=1e-6)
    # PML leaves the queries with no gallery item of their class out of precision@1; Recall@1 counts
    # them as misses
    n, lone = len(query_labels), torch.isin(query_labels, gallery_labels, invert=True).sum().item()
    assert lone > 0 and 0 < reference['precision_at_1'] < 1
    assert got['recall@1'] * n == pytest.approx(reference['precision_at_1'] * (n - lone), abs=1e-6)


def test_the_benchmarks_faiss_baseline_matches_brute_force():
    """benchmarks/eval_speed.py's faiss baseline, on its own generated data, with and without a gallery."""
    spec = importlib.util.spec_from_file_location(
        'eval_speed', os.path.join(ROOT, 'benchmarks', 'eval_speed.py')
    )
    eval_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_speed)
    ranks = [1, 2, 4, 8]
    queries, query_labels, gallery, gallery_labels = eval_speed.make_gallery(
        60, 300, 20, 80, 8, 1.0, seed=0
    )
    expected = brute_force_gallery(queries, query_labels, gallery, gallery_labels, ranks)
    assert 0 < expected['recall@1'] < expected['recall@8'] < 1
    assert eval_speed.faiss_metrics(
        queries, query_labels, ranks, gallery, gallery_labels
    ) == pytest.approx(expected, abs=1e-6)
    features, labels = eval_speed.make_features(150, 8, 1.0, seed=0)
    assert eval_speed.faiss_metrics(features, labels, ranks) == pytest.approx(
        brute_force(features, labels, ranks), abs=1e-6
    )


# ----------------------------------------------------------------------------------------------------------------------
# per-query figures


def assert_per_query(got, expected, ranks):
    """got: retrieval_metrics' per-query tensors; expected: ranked_per_query's lists, in the same query order."""
    assert got.keys() == expected.keys()
    for k in ranks:
        assert got[f'recall@{k}'].dtype == torch.bool
        assert got[f'recall@{k}'].tolist() == expected[f'recall@{k}'], k
    for key in ('ap@r', 'r_precision'):
        assert got[key].dtype == torch.float64
        assert got[key].tolist() == pytest.approx(expected[key], abs=1e-6, nan_ok=True), key


def assert_means_are_the_averages(metrics, per_query, ranks):
    """Recall@K is the mean hit over all queries; MAP@R and R-Precision the means over those with R > 0."""
    for k in ranks:
        assert per_query[f'recall@{k}'].double().mean().item() == pytest.approx(
            metrics[f'recall@{k}'], abs=1e-12
        )
    assert per_query['ap@r'].nanmean().item() == pytest.approx(
        metrics['map@r'], abs=1e-12, nan_ok=True
    )
    assert per_query['r_precision'].nanmean().item() == pytest.approx(
        metrics['r_precision'], abs=1e-12, nan_ok=True
    )


@pytest.mark.parametrize(
    'n, num_classes, dim, spread, seed',
    [
        (60, 6, 8, 1.0, 0),
        (37, 30, 4, 0.8, 2),  # many classes of 1 or 2 items: NaN rows
        (25, 2, 3, 2.0, 3),
    ],
)
def test_per_query_figures_match_brute_force(n, num_classes, dim, spread, seed):
    """Each query's hits, AP@R and R-Precision in the caller's (unsorted) order, with blocks of one row or all."""
    features, labels = clustered(n, num_classes, dim, spread, seed)
    expected = ranked_per_query(rankings_of(features, labels), RANKS)
    for chunk_bytes in (32 * 2**20, 4 * 1 * torch.get_num_threads()):
        metrics, per_query = retrieval_metrics(
            features, labels, RANKS, chunk_bytes=chunk_bytes, per_query=True
        )
        assert metrics == retrieval_metrics(features, labels, RANKS, chunk_bytes=chunk_bytes)
        assert_per_query(per_query, expected, RANKS)
        assert_means_are_the_averages(metrics, per_query, RANKS)
    lone = torch.bincount(labels)[labels] == 1  # a singleton's own row: a miss, NaN
    assert torch.equal(per_query['ap@r'].isnan(), lone) and not per_query['recall@8'][lone].any()


@pytest.mark.parametrize(
    'n, num_classes, dim, spread, query_share, seed',
    [
        (120, 12, 8, 1.0, 0.5, 0),
        (60, 30, 4, 0.8, 0.5, 3),
    ],
)
def test_gallery_per_query_figures_match_brute_force(
    n, num_classes, dim, spread, query_share, seed
):
    """With a gallery: the queries with no gallery item of their class stay in their rows, misses with NaN."""
    features, labels = clustered(n, num_classes, dim, spread, seed)
    queries, query_labels, gallery, gallery_labels = split_query_gallery(
        features, labels, query_share, seed
    )
    ranks = [1, 2, 4, 8, len(gallery_labels) + 5]
    expected = ranked_per_query(
        gallery_rankings_of(queries, query_labels, gallery, gallery_labels), ranks
    )
    for chunk_bytes in (32 * 2**20, 4 * 7 * 7 * torch.get_num_threads()):
        metrics, per_query = retrieval_metrics(
            queries,
            query_labels,
            ranks,
            gallery,
            gallery_labels,
            chunk_bytes=chunk_bytes,
            per_query=True,
        )
        assert_per_query(per_query, expected, ranks)
        assert_means_are_the_averages(metrics, per_query, ranks)
    lone = torch.isin(query_labels, gallery_labels, invert=True)
    assert lone.any() and torch.equal(per_query['ap@r'].isnan(), lone)


def test_hand_worked_example_per_query():
    """The eight items of test_hand_worked_example_with_duplicates, query by query."""
    features = angles(0, 0, 30, 30, 105, -40, -75, -55)
    labels = torch.tensor([0, 1, 2, 2, 3, 0, 1, 1])
    _, per_query = retrieval_metrics(features, labels, [1, 2, 4], per_query=True)
    assert per_query['recall@1'].tolist() == [False, False, True, True, False, False, True, False]
    assert per_query['recall@2'].tolist() == [False, False, True, True, False, False, True, True]
    assert per_query['recall@4'].tolist() == [True, False, True, True, False, True, True, True]
    assert per_query['ap@r'].tolist() == pytest.approx(
        [0, 0, 1, 1, math.nan, 0, 0.5, 0.25], nan_ok=True
    )
    assert per_query['r_precision'].tolist() == pytest.approx(
        [0, 0, 1, 1, math.nan, 0, 0.5, 0.5], nan_ok=True
    )


def test_per_query_with_no_item_of_any_class():
    """Only singletons, or a gallery with none of the queries' classes: every query a miss with NaN figures."""
    features, labels = clustered(20, 4, 3, 1.0, 7)
    for args in (
        (features[:5], torch.arange(5), [1, 2]),
        (features[:10], labels[:10], [1, 5], features[10:], labels[10:] + 10),
    ):
        metrics, per_query = retrieval_metrics(*args, per_query=True)
        assert not any(per_query[f'recall@{k}'].any() for k in args[2])
        assert per_query['ap@r'].isnan().all() and per_query['r_precision'].isnan().all()
        assert len(per_query['ap@r']) == len(args[1]) and math.isnan(metrics['map@r'])
