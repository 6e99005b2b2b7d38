"""test.py --report and train.py --tensorboard: the report's figures against brute force (and,
as wiring checks, against retrieval_metrics and train.py's CSV), its pictures, a data base whose
images are gone, a query/gallery data base; TensorBoard's scalars against the CSV across a
resume."""

import collections
import html
import html.parser
import json
import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data_utils
import utils
from conftest import make_cub, make_folder, train_in
from script_runner import error_sentence, query_folder, temporaries
from test_utils_metrics import gallery_rankings_of, ranked_metrics, ranked_per_query, rankings_of

FLAGS = (
    '--backbone_type',
    'googlenet',
    '--no_pretrained',
    '--feature_dim',
    16,
    '--batch_size',
    4,
    '--num_workers',
    0,
)
PREFIX = 'googlenet_proxy_anchor_16_no_pretrained_batch_size4'
K = 4  # --retrieval_num of the reports below


def small_run(tmp_path_factory, data, data_name, *extra):
    """A train.py run in a new folder on 64-pixel crops (the report reads features, whatever their crops); its path."""
    run = tmp_path_factory.mktemp('run')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, 'IMAGE_SIZE', 64)
        patch.setattr(utils, 'RESIZE_SIZE', 73)
        train_in(run, '--data_path', data, '--data_name', data_name, *FLAGS, *extra)
    return run


@pytest.fixture(scope='module')
def cub_run(tmp_path_factory):
    """(run folder, data base name) of a 1-epoch run on CUB's layout, 6 classes x 4 images: 12 test images."""
    data = str(tmp_path_factory.mktemp('data'))
    make_cub(data, num_classes=6, per_class=4)
    data_utils.prepare(data, 'cub', workers=1)
    return (
        small_run(tmp_path_factory, data, 'cub', '--num_epochs', 1),
        f'cub_{PREFIX}_1_data_base.pth',
    )


def clustered(data_base, folder, name):
    """Save data_base as folder/results/name with clustered random features instead of the run's, which
    --no_pretrained GoogLeNet collapses to one point: rankings without ties, some of them wrong, to compare with
    brute force. Its images are the run's."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(int(data_base['test_labels'].max()) + 1, 16, generator=generator)
    for split in ('test', 'gallery'):
        if f'{split}_labels' in data_base:
            labels = data_base[f'{split}_labels']
            data_base[f'{split}_features'] = F.normalize(
                centres[labels] + 0.9 * torch.randn(len(labels), 16, generator=generator), dim=1
            )
    os.makedirs(folder / 'results', exist_ok=True)
    torch.save(data_base, folder / 'results' / name)
    return folder, name


@pytest.fixture(scope='module')
def crafted(cub_run, tmp_path_factory):
    """(folder, data base name): cub_run's data base with clustered features."""
    run, name = cub_run
    return clustered(
        torch.load(run / 'results' / name, weights_only=True),
        tmp_path_factory.mktemp('crafted'),
        'crafted_1_data_base.pth',
    )


SHOP_CLASSES = ['<b>cat', 'dog & "rex"', "eel's"]  # class folder names that HTML must escape


@pytest.fixture(scope='module')
def shop_run(tmp_path_factory):
    """(run folder, data base name) of a 1-epoch run on a labelled folder split into train/, query/ and gallery/."""
    data = str(tmp_path_factory.mktemp('data'))
    make_folder(data, 'shop', ['ant', 'bee', 'fly'], per_class=3, split='train')
    make_folder(data, 'shop', SHOP_CLASSES, per_class=2, split='query')
    make_folder(data, 'shop', SHOP_CLASSES, per_class=3, split='gallery')
    data_utils.prepare(data, 'shop', workers=1)
    return (
        small_run(tmp_path_factory, data, 'shop', '--num_epochs', 1),
        f'shop_{PREFIX}_1_data_base.pth',
    )


def make_report(script, run, data_base, *extra):
    """Run test.py --report in run; returns (report folder, its summary.json, its index.html text)."""
    status, out, err = script(
        'test', '--data_base', data_base, '--report', '--retrieval_num', K, *extra, cwd=run
    )
    assert status == 0, err
    folder = run / 'results' / f'{os.path.basename(data_base)[:-len(".pth")]}_report'
    assert f'to results/{folder.name}/index.html' in out
    with open(folder / 'summary.json') as file:
        summary = json.load(file)
    return folder, summary, (folder / 'index.html').read_text(encoding='utf-8')


class Links(html.parser.HTMLParser):
    """Every src and href of a page, and its text."""

    def __init__(self):
        super().__init__()
        self.links, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ('src', 'href')]

    def handle_data(self, data):
        self.text.append(data)


def parsed(page):
    """(links, text) of an HTML page."""
    parser = Links()
    parser.feed(page)
    return parser.links, ''.join(parser.text)


def brute_force_per_query(data_base):
    """Each query's Recall@1 hit, AP@R, and its K nearest item positions, from the full float64 cosine matrix."""
    queries, labels = data_base['test_features'].double(), data_base['test_labels'].numpy()
    gallery = 'gallery_features' in data_base
    items = data_base['gallery_features'].double() if gallery else queries
    item_labels = data_base['gallery_labels'].numpy() if gallery else labels
    rankings = (
        gallery_rankings_of(queries, labels, items, item_labels)
        if gallery
        else rankings_of(queries, labels)
    )
    figures = ranked_per_query(rankings, [1])
    sims = F.normalize(queries, dim=1) @ F.normalize(items, dim=1).T
    if not gallery:
        sims.fill_diagonal_(-math.inf)
    nearest = sims.topk(K, dim=1).indices.numpy()  # (N, K)
    return np.array(figures['recall@1']), np.array(figures['ap@r']), nearest, labels, item_labels


def test_headline_metrics_are_wired_to_retrieval_metrics_and_what_train_printed(script, cub_run):
    """A wiring check, not a check of the figures: report.analyse calls utils.retrieval_metrics itself,
    as train.py's evaluation does, so this fails only where the report stops calling it or gives it
    other features, labels or ranks. test_classes_queries_and_pairs_match_brute_force checks the
    figures themselves against brute force."""
    run, name = cub_run
    _, summary, page = make_report(script, run, name, '--report_queries', 1)
    data_base = torch.load(run / 'results' / name, weights_only=True)
    expected = utils.retrieval_metrics(
        data_base['test_features'], data_base['test_labels'], [1, 2, 4, 8]
    )
    assert summary['metrics'] == expected
    statistics = pd.read_csv(run / 'results' / f'cub_{PREFIX}_statistics.csv', index_col='epoch')
    for metric, value in expected.items():  # the CSV holds what train.py printed
        assert value == pytest.approx(statistics.loc[1, f'test_{metric}'], rel=1e-12)
        assert f'{100 * value:.2f}%' in page
    assert 'the same as what train.py printed for epoch 1' in parsed(page)[1]


def test_classes_queries_and_pairs_match_brute_force(script, crafted):
    run, name = crafted
    folder, summary, page = make_report(script, run, name, '--report_queries', 5)
    data_base = torch.load(run / 'results' / name, weights_only=True)
    hits, ap, nearest, labels, item_labels = brute_force_per_query(data_base)
    assert summary['metrics'] == pytest.approx(
        ranked_metrics(rankings_of(data_base['test_features'], labels), [1, 2, 4, 8]), abs=1e-12
    )

    classes = pd.read_csv(folder / 'classes.csv')
    assert classes['images'].sum() == len(data_base['test_images']) == 12
    index = utils.load_index(data_base['args']['data_path'], 'cub')
    assert (
        sorted(classes['class']) == sorted(index['test']) == [4, 5, 6]
    )  # CUB's class ids, not labels 0-2
    for row in classes.to_dict('records'):
        mine = labels == row['label']
        assert row['images'] == mine.sum()
        assert row['recall@1'] == pytest.approx(hits[mine].mean(), abs=1e-12)
        assert row['map@r'] == pytest.approx(np.nanmean(ap[mine]), abs=1e-12)
    assert list(classes['map@r']) == sorted(classes['map@r'])  # worst first
    assert '<td>all</td><td>12</td>' in page

    worst = pd.read_csv(folder / 'worst_queries.csv')
    order = sorted(range(len(ap)), key=lambda q: (ap[q], q))[:5]
    assert list(worst['position']) == order
    np.testing.assert_allclose(worst['ap@r'], ap[order], atol=1e-12)
    for row in worst.itertuples():
        found = [path for path, _ in json.loads(row.nearest)]
        assert found == [data_base['test_images'][i] for i in nearest[row.position]]

    pairs = pd.read_csv(folder / 'confused_pairs.csv')
    counts = collections.Counter(
        (labels[q], item_labels[i])
        for q in range(len(labels))
        for i in nearest[q]
        if item_labels[i] != labels[q]
    )
    names = sorted(index['test'])
    assert {(str(names[a]), str(names[b])): n for (a, b), n in counts.items()} == {
        (str(a), str(b)): n
        for a, b, n in zip(pairs['query_class'], pairs['retrieved_class'], pairs['count'])
    }
    assert list(pairs['count']) == sorted(pairs['count'], reverse=True)


def test_every_picture_the_page_shows_is_in_its_folder(script, cub_run, crafted):
    """Each link is a relative path to a file in the folder; each worst query is drawn as test.py draws it."""
    run, name = cub_run
    folder, summary, page = make_report(script, run, name, '--report_queries', 3)
    links, _ = parsed(page)
    assert {
        'statistics.png',
        'map.png',
        'queries/1.png',
        'queries/2.png',
        'queries/3.png',
        'classes.csv',
    } <= set(links)
    for link in links:
        assert (
            not os.path.isabs(link) and '..' not in link and ':' not in link
        ), link  # opens offline, moves whole
        assert (folder / link).is_file(), link
    assert summary['missing'] == [] and 'Missing' not in page
    assert summary['map'].startswith('t-SNE')
    assert not temporaries(str(run / 'results'))

    run, name = crafted  # a worst query whose nearest are not all ties, drawn by test.py too
    folder, _, _ = make_report(script, run, name, '--report_queries', 1)
    worst = pd.read_csv(folder / 'worst_queries.csv')
    status, _, err = script(
        'test',
        '--query_img_name',
        worst['image'][0],
        '--data_base',
        name,
        '--retrieval_num',
        K,
        cwd=run,
    )
    assert status == 0, err
    drawn = (
        query_folder(run / 'results', os.path.splitext(os.path.basename(worst['image'][0]))[0])
        / 'retrieval.png'
    )
    with Image.open(drawn) as by_test, Image.open(folder / 'queries' / '1.png') as by_report:
        assert np.array_equal(np.asarray(by_test), np.asarray(by_report))


def test_data_base_without_its_images_still_gets_numbers_and_tables(script, crafted, tmp_path):
    run, name = crafted
    data_base = torch.load(run / 'results' / name, weights_only=True)
    data_base['test_images'] = [
        str(tmp_path / 'moved' / os.path.basename(path)) for path in data_base['test_images']
    ]
    os.makedirs(tmp_path / 'results')
    torch.save(data_base, tmp_path / 'results' / 'elsewhere_3_data_base.pth')
    folder, summary, page = make_report(script, tmp_path, 'elsewhere_3_data_base.pth')
    # wiring: the figures are still retrieval_metrics' (checked against brute force above)
    assert summary['metrics'] == utils.retrieval_metrics(
        data_base['test_features'], data_base['test_labels'], [1, 2, 4, 8]
    )
    links, text = parsed(page)
    assert not any(link.startswith('queries/') for link in links) and not os.listdir(
        folder / 'queries'
    )
    assert all((folder / link).is_file() for link in links)
    missing = [line for line in text.splitlines() if line.startswith('Missing: ')]
    assert len(missing) == 1
    assert f'of the worst queries (such as {tmp_path / "moved"}' in missing[0]
    assert 'the training curves (results/elsewhere_statistics.png)' in missing[0]
    assert pd.read_csv(folder / 'classes.csv')['images'].sum() == 12
    assert (
        len(pd.read_csv(folder / 'worst_queries.csv')) == 12
    )  # --report_queries 20, at most every query
    assert 'shown by their labels' in text  # the index no longer lists these paths


def test_query_gallery_data_base(script, shop_run, tmp_path):
    run, name = shop_run
    folder, summary, page = make_report(script, run, name, '--report_queries', 1)
    data_base = torch.load(run / 'results' / name, weights_only=True)
    # wiring: the query/gallery figures are retrieval_metrics' and what train.py printed; brute force
    # checks them below, on clustered features
    expected = utils.retrieval_metrics(
        data_base['test_features'],
        data_base['test_labels'],
        [1, 2, 4, 8],
        data_base['gallery_features'],
        data_base['gallery_labels'],
    )
    assert summary['metrics'] == expected
    statistics = pd.read_csv(run / 'results' / f'shop_{PREFIX}_statistics.csv', index_col='epoch')
    for metric, value in expected.items():
        assert value == pytest.approx(statistics.loc[1, f'test_{metric}'], rel=1e-12)

    classes = pd.read_csv(folder / 'classes.csv', keep_default_na=False)
    assert sorted(classes['class']) == sorted(SHOP_CLASSES)  # the folder names
    assert classes['queries'].sum() == len(data_base['test_images']) == 6
    assert classes['gallery_images'].sum() == len(data_base['gallery_images']) == 9
    for raw in SHOP_CLASSES:  # escaped wherever the page shows them
        assert raw not in page and html.escape(raw) in page
    assert '<b>' not in page
    links, _ = parsed(page)
    assert all((folder / link).is_file() for link in links)

    run, name = clustered(data_base, tmp_path, 'shop_clustered_1_data_base.pth')
    folder, summary, _ = make_report(script, run, name, '--report_queries', 3)
    classes = pd.read_csv(folder / 'classes.csv', keep_default_na=False)
    hits, ap, nearest, labels, item_labels = brute_force_per_query(data_base)
    rankings = gallery_rankings_of(
        data_base['test_features'], labels, data_base['gallery_features'], item_labels
    )
    assert summary['metrics'] == pytest.approx(ranked_metrics(rankings, [1, 2, 4, 8]), abs=1e-12)
    for row in classes.to_dict('records'):
        mine = labels == row['label']
        assert row['recall@1'] == pytest.approx(hits[mine].mean(), abs=1e-12)
        assert row['map@r'] == pytest.approx(np.nanmean(ap[mine]), abs=1e-12)
    worst = pd.read_csv(folder / 'worst_queries.csv')
    assert len(worst) == 3
    for row in worst.itertuples():  # each query's nearest are gallery images
        found = [path for path, _ in json.loads(row.nearest)]
        assert found == [data_base['gallery_images'][i] for i in nearest[row.position]]


def scalars(folder):
    """{tag: [(step, value)]} of every scalar in the TensorBoard event files of a folder, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()['scalars']
    }


def test_tensorboard_scalars_equal_the_csv_across_a_resume(tmp_path_factory):
    """Epoch 2 is logged twice (a run resumed from epoch 1's checkpoint after it had logged epoch 2), yet read back
    once: every CSV column, the learning rates and images/s, for each epoch, under the run's own name.
    """
    folder = tmp_path_factory.mktemp('tensorboard')
    data_path = str(tmp_path_factory.mktemp('data'))
    make_cub(data_path, num_classes=4, per_class=4)
    data_utils.prepare(data_path, 'cub', workers=1)
    flags = (
        '--data_path',
        data_path,
        '--data_name',
        'cub',
        *FLAGS,
        '--warm_up',
        1,
        '--lr_step',
        1,
        '--tensorboard',
    )
    prefix = 'cub_googlenet_proxy_anchor_16_no_pretrained_lr_step1_batch_size4_warm_up1'  # --tensorboard names nothing
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, 'IMAGE_SIZE', 64)
        patch.setattr(utils, 'RESIZE_SIZE', 73)
        train_in(folder, *flags, '--num_epochs', 1)
        first = (folder / 'results' / f'{prefix}_checkpoint.pth').read_bytes()
        train_in(folder, *flags, '--num_epochs', 2, '--resume')
        (folder / 'results' / f'{prefix}_checkpoint.pth').write_bytes(
            first
        )  # as if killed before epoch 2's save
        train_in(folder, *flags, '--num_epochs', 2, '--resume')
    statistics = pd.read_csv(folder / 'results' / f'{prefix}_statistics.csv', index_col='epoch')
    logged = scalars(folder / 'results' / 'tensorboard' / prefix)
    assert (
        len(os.listdir(folder / 'results' / 'tensorboard' / prefix)) == 3
    )  # one event file per process
    for column in statistics.columns:
        split, metric = column.split('_', 1)
        steps = logged[f'{split}/{metric}']
        assert [step for step, _ in steps] == [1, 2], column  # epoch 2 once
        np.testing.assert_allclose(
            [value for _, value in steps], statistics[column], rtol=1e-6, err_msg=column
        )
    assert [step for step, _ in logged['train/images_per_second']] == [1, 2]
    assert all(value > 0 for _, value in logged['train/images_per_second'])
    for group, lr in (
        ('backbone_and_head', 1e-4),
        ('proxies', 1e-2),
    ):  # halved every epoch (--lr_step 1)
        np.testing.assert_allclose(
            [value for _, value in logged[f'lr/{group}']], [lr, lr / 2], rtol=1e-6
        )


def test_moved_data_still_names_the_classes(script, shop_run, tmp_path):
    run, name = shop_run
    data_base = torch.load(run / 'results' / name, weights_only=True)
    moved = tmp_path / 'moved'
    shutil.copytree(
        data_base['data_root'], moved
    )  # the old folder stays: the report must read the new one
    folder, _, _ = make_report(script, run, name, '--report_queries', 1, '--data_path', str(moved))
    classes = pd.read_csv(folder / 'classes.csv', keep_default_na=False)
    assert sorted(classes['class']) == sorted(SHOP_CLASSES)  # the folder names, not label numbers
