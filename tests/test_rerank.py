"""rerank.py against straightforward full-matrix implementations of each paper's method."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import reproduce
import rerank
from conftest import prepared_cub
from runs import DataBase
from script_runner import query_folder
from utils import clustering_metrics, retrieval_metrics


def clustered(n, classes, dim, seed):
    """(n, D) float32 unit rows around `classes` centres (fast-reid averages rows as they are),
    and their (n,) labels: neighbours mostly of their own class, every cosine distinct."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=generator)
    features = centres[labels] + 0.7 * torch.randn(n, dim, generator=generator)
    return F.normalize(features, dim=1), labels


def fast_reid_aqe(query_feat, gallery_feat, qe_k=10, alpha=3.0):
    """fast-reid's aqe (qe_times = 1): every row of the union becomes the cos ** alpha weighted
    mean of its qe_k nearest rows of the union, itself included."""
    all_feat = torch.cat([query_feat, gallery_feat]).double()
    norm = F.normalize(all_feat, dim=1)
    sims = (norm @ norm.T).numpy()
    rows = []
    for sim in sims:
        nearest = np.argsort(-sim, kind='stable')[:qe_k]
        weights = np.power(sim[nearest], alpha)[:, None]
        rows.append(np.mean(all_feat.numpy()[nearest] * weights, axis=0))
    expanded = torch.from_numpy(np.stack(rows))
    return expanded[: len(query_feat)], expanded[len(query_feat) :]


def ranking(queries, items, leave_self=False):
    """Each query's items by cosine, best first, the query itself dropped when leave_self."""
    sims = F.normalize(queries.double(), dim=1) @ F.normalize(items.double(), dim=1).T
    if leave_self:
        sims.fill_diagonal_(-np.inf)
    order = torch.from_numpy(np.argsort(-sims.numpy(), axis=1, kind='stable'))
    return order[:, :-1] if leave_self else order


def zhong_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """k-reciprocal re-ranking as the original code (Zhong et al., CVPR 2017) calls it, on full
    Euclidean distance matrices; returns the (Q, G) final distances."""
    union = np.concatenate(
        [
            np.concatenate([q_q_dist, q_g_dist], axis=1),
            np.concatenate([q_g_dist.T, g_g_dist], axis=1),
        ],
        axis=0,
    )
    query_num = q_g_dist.shape[0]
    return zhong_union(union, query_num, k1, k2, lambda_value)[:, query_num:]


def zhong_union(union_dist, query_num, k1, k2, lambda_value):
    """The original's steps on the union's (A, A) distances, its first query_num rows the
    queries: their (query_num, A) final distances."""
    original_dist = np.power(union_dist, 2)
    original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist)
    initial_rank = np.argsort(original_dist, kind='stable')
    all_num = original_dist.shape[0]
    for i in range(all_num):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        k_reciprocal_index = forward[np.where(backward == i)[0]]
        expansion = k_reciprocal_index
        for candidate in k_reciprocal_index:
            c_forward = initial_rank[candidate, : int(np.around(k1 / 2)) + 1]
            c_backward = initial_rank[c_forward, : int(np.around(k1 / 2)) + 1]
            c_reciprocal = c_forward[np.where(c_backward == candidate)[0]]
            if len(np.intersect1d(c_reciprocal, k_reciprocal_index)) > 2 / 3 * len(c_reciprocal):
                expansion = np.append(expansion, c_reciprocal)
        expansion = np.unique(expansion)
        weight = np.exp(-original_dist[i, expansion])
        V[i, expansion] = weight / np.sum(weight)
    if k2 != 1:
        V = np.stack([np.mean(V[initial_rank[i, :k2], :], axis=0) for i in range(all_num)])
    jaccard_dist = np.zeros((query_num, all_num))
    for i in range(query_num):
        shared = np.minimum(V[i][None, :], V).sum(1)
        jaccard_dist[i] = 1 - shared / (2 - shared)
    return jaccard_dist * (1 - lambda_value) + original_dist[:query_num] * lambda_value


def euclidean(a, b):
    """(n, m) Euclidean distances between the unit rows of a and b."""
    a, b = F.normalize(a.double(), dim=1), F.normalize(b.double(), dim=1)
    return torch.cdist(a, b).numpy()


@pytest.fixture(scope='module')
def data():
    return clustered(120, 12, 16, seed=0)


def test_dba_all_vs_all_is_fast_reid_aqe(data):
    features, _ = data
    expanded, _ = fast_reid_aqe(features, features[:0])
    got = rerank.reranked_lists('dba', features, features, 30, torch.arange(len(features)))
    assert torch.equal(got, ranking(expanded, expanded, leave_self=True)[:, :30])


def test_aqe_expands_the_queries_only(data):
    features, _ = data
    queries, gallery = features[:40], features[40:]
    # alpha-QE: the query and its k - 1 nearest gallery items, weighted by cos ** alpha
    sims = F.normalize(queries.double(), dim=1) @ F.normalize(gallery.double(), dim=1).T
    top = sims.topk(9, dim=1)
    unit = F.normalize(gallery.double(), dim=1)
    expanded = F.normalize(queries.double(), dim=1) + (
        top.values[..., None] ** 3 * unit[top.indices]
    ).sum(1)
    got = rerank.reranked_lists('aqe', queries, gallery, 25)
    assert torch.equal(got, ranking(expanded, gallery)[:, :25])
    # all-vs-all, the query's own row left out
    got = rerank.reranked_lists('aqe', features, features, 25, torch.arange(len(features)))
    _, whole = fast_reid_aqe(features[:0], features)
    sims = F.normalize(whole, dim=1) @ F.normalize(features.double(), dim=1).T
    sims.fill_diagonal_(-np.inf)
    assert torch.equal(got, sims.argsort(dim=1, descending=True, stable=True)[:, :25])


def test_dba_with_a_gallery_augments_the_gallery(data):
    features, _ = data
    queries, gallery = features[:30], features[30:]
    _, augmented = fast_reid_aqe(gallery[:0], gallery)
    got = rerank.reranked_lists('dba', queries, gallery, 20)
    assert torch.equal(got, ranking(queries, augmented)[:, :20])


@pytest.mark.parametrize('k1,k2', [(20, 6), (7, 1), (5, 3)])
def test_k_reciprocal_all_vs_all_equals_the_original(data, k1, k2):
    features, _ = data
    # all-vs-all: the union is the set itself, every row a query, each leaving itself out
    final = zhong_union(euclidean(features, features), len(features), k1, k2, 0.3)
    np.fill_diagonal(final, np.inf)
    expected = torch.from_numpy(np.argsort(final, axis=1, kind='stable')[:, :40])
    got = rerank.reranked_lists(
        'kreciprocal', features, features, 40, torch.arange(len(features)), k1=k1, k2=k2
    )
    assert torch.equal(got, expected)


def test_k_reciprocal_with_a_gallery_equals_the_original(data):
    features, _ = data
    queries, gallery = features[:30], features[30:]
    final = zhong_re_ranking(
        euclidean(queries, gallery), euclidean(queries, queries), euclidean(gallery, gallery)
    )
    expected = torch.from_numpy(np.argsort(final, axis=1, kind='stable')[:, :35])
    got = rerank.reranked_lists('kreciprocal', queries, gallery, 35)
    assert torch.equal(got, expected)


def test_metrics_of_plain_lists_equal_retrieval_metrics(data):
    features, labels = data
    lists = ranking(features, features, leave_self=True)
    same = labels[lists] == labels[:, None]
    r = torch.bincount(labels)[labels] - 1
    assert rerank.list_metrics(same, r, [1, 2, 4]) == pytest.approx(
        retrieval_metrics(features, labels, [1, 2, 4]), abs=1e-12
    )
    # precision@k and map@k too, a k beyond the 119 other items capped as retrieval_metrics caps it
    extra = [('precision@5', 5), ('map@10', 10), ('map@500', 500)]
    assert rerank.list_metrics(same, r, [1], extra, len(labels) - 1) == pytest.approx(
        retrieval_metrics(features, labels, [1], extra=[name for name, _ in extra]), abs=1e-12
    )


def test_rerank_metrics_read_the_reranked_lists(data):
    features, labels = data
    expanded, _ = fast_reid_aqe(features, features[:0])
    got = rerank.rerank_metrics(features, labels, [1, 4], 'dba')
    assert got == pytest.approx(retrieval_metrics(expanded, labels, [1, 4]), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# train.py's extra evaluation and test.py's search


def test_train_records_reranked_and_clustering_columns_apart(script, tmp_path_factory):
    """One epoch with --metrics recall,nmi,ami,precision@2,map@4,mrr --rerank dba: the CSV keeps the
    plain columns and adds the named ones and test_rerank_... ones, equal to the functions on the
    data base's test features; the epoch prints the named metrics and a re-ranked line, and
    reproduce.py's table reads every figure. test.py --rerank then lists a test image's results in
    the re-ranked order, and test.py --report --rerank adds the re-ranked figures in a row of their
    own, in a folder of their own."""
    data = prepared_cub(tmp_path_factory, num_classes=6, per_class=4)
    run = tmp_path_factory.mktemp('run')
    status, out, err = script(
        'train',
        '--data_path',
        data,
        '--data_name',
        'cub',
        '--backbone_type',
        'googlenet',
        '--no_pretrained',
        '--feature_dim',
        16,
        '--batch_size',
        4,
        '--num_workers',
        0,
        '--num_epochs',
        1,
        '--metrics',
        'recall,nmi,ami,precision@2,map@4,mrr',
        '--rerank',
        'dba',
        '--rerank_k',
        3,
        cwd=run,
    )
    assert status == 0, err
    prefix = 'cub_googlenet_proxy_anchor_16_no_pretrained_batch_size4'
    table = pd.read_csv(run / 'results' / f'{prefix}_statistics.csv', index_col='epoch')
    base = DataBase.open(str(run / 'results' / f'{prefix}_1_data_base.pth'))[0]
    features, labels = base.test.features, base.test.labels
    extra = ('precision@2', 'map@4', 'mrr')
    plain = retrieval_metrics(features, labels, [1, 2, 4, 8], extra=extra)
    reranked = rerank.rerank_metrics(features, labels, [1, 2, 4, 8], 'dba', aqe_k=3,
                                     extra=('precision@2', 'map@4'))  # no MRR of re-ranked lists
    clusters = clustering_metrics(features, labels)
    expected = {
        **{f'test_{k}': v for k, v in {**plain, **clusters}.items()},
        **{f'test_rerank_{k}': v for k, v in reranked.items()},
    }
    assert set(expected) <= set(table.columns)
    assert table.iloc[0][list(expected)].to_dict() == pytest.approx(expected, abs=1e-6)
    line = next(line for line in out.splitlines() if line.startswith('Test Epoch'))
    assert 'NMI:' in line and 'AMI:' in line and 'MAP@R' not in line
    assert f'P@2:{100 * plain["precision@2"]:.2f}% mAP@4:' in line and ' MRR:' in line
    final = reproduce.final_epoch(str(run / 'results' / f'{prefix}_statistics.csv'), 'cub')
    assert final['mrr'] == pytest.approx(100 * plain['mrr'])
    assert reproduce.extra_columns([final]) == [
        'precision@2', 'map@4', 'mrr', 'nmi', 'ami', 'rerank_recall@1', 'rerank_map@r'
    ]
    assert [reproduce.extra_label(key) for key in extra] == ['P@2', 'mAP@4', 'MRR']
    (dba,) = [line for line in out.splitlines() if line.startswith('Test (dba) Epoch 1/1 R@1:')]
    assert 'P@2:' in dba and 'mAP@4:' in dba and 'MRR' not in dba

    query = base.test.images[0]
    status, out, err = script(
        'test',
        '--data_base',
        f'{prefix}_1_data_base.pth',
        '--query_img_name',
        query,
        '--retrieval_num',
        5,
        '--rerank',
        'dba',
        '--rerank_k',
        3,
        cwd=run,
    )
    assert status == 0, err
    lists = rerank.reranked_lists('dba', features[:1], features, 5, 0, aqe_k=3)
    name = os.path.splitext(os.path.basename(query))[0]
    shown = pd.read_csv(query_folder(run / 'results', name) / 'results.csv')
    assert shown['path'].tolist() == [base.test.images[i] for i in lists[0].tolist()]

    status, out, err = script(
        'test', '--data_base', f'{prefix}_1_data_base.pth', '--report', '--rerank', 'dba',
        '--rerank_k', 3, cwd=run,
    )
    assert status == 0, err
    folder = run / 'results' / f'{prefix}_1_data_base_report_dba'
    summary = json.loads((folder / 'summary.json').read_text())
    # the run named the extra ones, NMI and AMI among them
    assert summary['metrics'] == pytest.approx({**plain, **clusters}, abs=1e-9)
    assert 'the same as what train.py printed for epoch 1' in (folder / 'index.html').read_text()
    assert summary['rerank']['method'] == 'dba' and summary['rerank']['aqe_k'] == 3
    assert summary['rerank']['metrics'] == pytest.approx(reranked, abs=1e-9)
    page = (folder / 'index.html').read_text()
    assert 're-ranked by dba' in page and '--rerank_k 3' in page
    assert not (run / 'results' / f'{prefix}_1_data_base_report').exists()
