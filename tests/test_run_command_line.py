"""The command line end to end: data_utils.py, a 2-epoch train.py and test.py, each a real subprocess."""

import glob
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ROOT, make_cub
from model import Model
from script_runner import query_folder
from utils import read_image, retrieval_metrics
from utils import test_transform as eval_transform  # aliased: pytest would collect a test_* name

PREFIX = 'cub_googlenet_proxy_anchor_32_no_pretrained_batch_size4_warm_up1'
DATA_BASE_KEYS = {
    'test_images',
    'test_labels',
    'test_features',
    'train_images',
    'train_labels',
    'train_features',
    'proxies',
}
GREEN, RED, GREY = (0, 160, 0), (220, 0, 0), (128, 128, 128)


def run_script(name, *flags, cwd):
    """`python <ROOT>/<name>.py flags` in cwd; returns the completed process, asserting it succeeded."""
    env = dict(
        os.environ, TORCH_HOME=os.path.join(cwd, 'torch_home')
    )  # never touch (or fill) the real cache
    process = subprocess.run(
        [sys.executable, os.path.join(ROOT, f'{name}.py'), *map(str, flags)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, f'{name}.py failed:\n{process.stdout}\n{process.stderr}'
    assert 'Traceback' not in process.stderr
    return process


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 4-class x 3-image CUB set prepared by data_utils.py, then 2 epochs of train.py; returns the run folder."""
    cwd = str(tmp_path_factory.mktemp('cli'))
    make_cub(os.path.join(cwd, 'data'), num_classes=4, per_class=3)
    prepared = run_script(
        'data_utils', '--data_path', 'data', '--workers', 1, cwd=cwd
    )  # finds cub by itself
    assert 'cub uncropped' in prepared.stdout
    trained = run_script(
        'train',
        '--data_path',
        'data',
        '--data_name',
        'cub',
        '--backbone_type',
        'googlenet',
        '--feature_dim',
        32,
        '--batch_size',
        4,
        '--num_epochs',
        2,
        '--warm_up',
        1,
        '--no_pretrained',
        '--num_workers',
        0,
        cwd=cwd,
    )
    assert 'training on cpu' in trained.stdout
    assert re.search(
        r'Test Epoch 2/2 R@1:[\d.]+% R@2:[\d.]+% R@4:[\d.]+% R@8:[\d.]+%', trained.stdout
    )
    return cwd


def results(cwd, *parts):
    return os.path.join(cwd, 'results', *parts)


def load_data_base(cwd):
    return torch.load(
        results(cwd, f'{PREFIX}_2_data_base.pth'), map_location='cpu', weights_only=True
    )


def test_only_the_last_epoch_files_remain(trained):
    names = set(os.listdir(results(trained)))
    expected = {
        f'{PREFIX}_statistics.csv',
        f'{PREFIX}_statistics.png',
        f'{PREFIX}_2_model.pth',
        f'{PREFIX}_2_data_base.pth',
        f'{PREFIX}_checkpoint.pth',
    }
    assert expected <= names
    assert not [
        name for name in names if '_1_' in name
    ]  # epoch 1's model and data base were replaced
    assert not [
        name for name in names if name.startswith('.') or name.endswith('.tmp')
    ]  # no half-written file
    with Image.open(results(trained, f'{PREFIX}_statistics.png')) as figure:
        assert figure.format == 'PNG' and min(figure.size) > 100


def test_statistics_csv(trained):
    frame = pd.read_csv(results(trained, f'{PREFIX}_statistics.csv'), index_col='epoch')
    assert list(frame.index) == [1, 2]
    assert list(frame.columns) == [
        'train_loss',
        'train_accuracy',
        'test_recall@1',
        'test_recall@2',
        'test_recall@4',
        'test_recall@8',
        'test_map@r',
        'test_r_precision',
    ]
    assert (frame['train_loss'] > 0).all() and np.isfinite(frame.values).all()
    assert (
        ((frame.drop(columns='train_loss') >= 0) & (frame.drop(columns='train_loss') <= 1))
        .all()
        .all()
    )
    recalls = frame[['test_recall@1', 'test_recall@2', 'test_recall@4', 'test_recall@8']].values
    assert (np.diff(recalls, axis=1) >= 0).all()
    assert (
        frame['test_recall@8'] == 1
    ).all()  # 6 test images of 2 classes: 8 neighbours cover all 5 others
    # the last row is the retrieval metrics of the test embeddings the data base holds
    data_base = load_data_base(trained)
    metrics = retrieval_metrics(data_base['test_features'], data_base['test_labels'], [1, 2, 4, 8])
    for key, value in metrics.items():
        assert frame.loc[2, f'test_{key}'] == pytest.approx(value, abs=1e-6), key


def test_data_base_and_checkpoint(trained):
    data_base = load_data_base(trained)  # weights_only=True: tensors and plain containers only
    assert DATA_BASE_KEYS <= set(data_base)
    assert len(data_base['test_images']) == len(data_base['train_images']) == 6
    assert data_base['test_labels'].tolist() == [0, 0, 0, 1, 1, 1]
    assert data_base['train_labels'].tolist() == [0, 0, 0, 1, 1, 1]
    for key in ('test_features', 'train_features'):
        assert data_base[key].shape == (6, 32) and data_base[key].device.type == 'cpu'
        assert torch.allclose(data_base[key].norm(dim=1), torch.ones(6), atol=1e-4)
    assert data_base['proxies'].shape == (2, 32)
    # as the seed stores them: the proxies L2-normalised, those of the final model
    checkpoint = torch.load(
        results(trained, f'{PREFIX}_checkpoint.pth'), map_location='cpu', weights_only=True
    )
    torch.testing.assert_close(
        data_base['proxies'], F.normalize(checkpoint['model']['proxies.weight'], dim=-1)
    )
    uncropped = os.path.realpath(os.path.join(trained, 'data', 'cub', 'uncropped'))
    for path in data_base['test_images'] + data_base['train_images']:
        assert os.path.dirname(os.path.realpath(os.path.join(trained, path))) == uncropped
    # the test classes are the second half of the class ids
    assert all('Bird_3_' in path or 'Bird_4_' in path for path in data_base['test_images'])
    assert all('Bird_1_' in path or 'Bird_2_' in path for path in data_base['train_images'])

    # the saved weights rebuild the model that embedded the test set
    net = Model('googlenet', 32, 2, pretrained=False)
    net.load_state_dict(torch.load(results(trained, f'{PREFIX}_2_model.pth'), weights_only=True))
    image = eval_transform()(read_image(os.path.join(trained, data_base['test_images'][4])))
    with torch.no_grad():
        embedding = net.eval().embed(image[None])[0]
    assert torch.allclose(embedding, data_base['test_features'][4], atol=1e-4)

    checkpoint = torch.load(
        results(trained, f'{PREFIX}_checkpoint.pth'), map_location='cpu', weights_only=True
    )
    assert checkpoint['epoch'] == 2
    assert {'model', 'optimizer', 'scheduler', 'args'} <= set(checkpoint)
    assert (
        checkpoint['args']['backbone_type'] == 'googlenet'
        and checkpoint['args']['feature_dim'] == 32
    )
    for name, value in checkpoint['model'].items():
        assert torch.equal(value, net.state_dict()[name]), name


def retrieved(folder):
    """[(rank, similarity, path)] of the retrieval images test.py wrote, by rank."""
    found = []
    for path in glob.glob(os.path.join(folder, 'retrieval_img_*.jpg')):
        match = re.fullmatch(r'retrieval_img_(\d+)_(-?\d+\.\d+)\.jpg', os.path.basename(path))
        assert match, path
        found.append((int(match.group(1)), float(match.group(2)), path))
    return sorted(found)


def interior(image):
    """The image as a float array without the 5-pixel border."""
    return np.asarray(image, dtype=float)[8:-8, 8:-8]


def check_retrieval(folder, expected_order, similarities, images, correct, cwd):
    """The files of one test.py run: query, results in the brute-force order with their similarities and borders."""
    assert sorted(os.listdir(folder)) == sorted(
        ['query_img.jpg', 'retrieval.png', 'results.csv']
        + [os.path.basename(p) for *_, p in retrieved(folder)]
    )
    # the same results as text: rank, path, similarity, and whether the class is the query's (empty: unknown)
    frame = pd.read_csv(os.path.join(folder, 'results.csv'), keep_default_na=False)
    assert list(frame.columns) == ['rank', 'path', 'similarity', 'same_class']
    assert frame['rank'].tolist() == list(range(1, len(expected_order) + 1))
    assert frame['path'].tolist() == [images[index] for index in expected_order]
    np.testing.assert_allclose(
        frame['similarity'], [similarities[index] for index in expected_order], atol=1e-5
    )
    assert frame['same_class'].astype(str).tolist() == [
        '' if c is None else str(c) for c in correct
    ]
    with Image.open(os.path.join(folder, 'retrieval.png')) as figure:
        assert figure.format == 'PNG'
    with Image.open(os.path.join(folder, 'query_img.jpg')) as query:
        assert query.size == (224, 224) and query.mode == 'RGB'
    found = retrieved(folder)
    assert [rank for rank, *_ in found] == list(range(1, len(expected_order) + 1))
    candidates = {}
    for index, path in enumerate(images):
        with Image.open(os.path.join(cwd, path)) as image:
            candidates[index] = interior(image.convert('RGB').resize((224, 224), Image.BILINEAR))
    for (rank, similarity, path), index, is_correct in zip(found, expected_order, correct):
        assert similarity == pytest.approx(similarities[index], abs=2e-3), rank
        with Image.open(path) as image:
            assert image.size == (224, 224) and image.mode == 'RGB'
            border = np.asarray(image, dtype=float)[1:4, 50:170].reshape(-1, 3).mean(axis=0)
            pixels = interior(image)
        colour = GREY if is_correct is None else GREEN if is_correct else RED
        assert np.abs(border - colour).max() < 40, (rank, border, colour)
        # the picture is that of the expected image (or of one whose similarity is the same to 1e-3)
        distances = {i: np.abs(pixels - candidate).mean() for i, candidate in candidates.items()}
        closest = min(distances, key=distances.get)
        assert closest == index or abs(similarities[closest] - similarities[index]) < 1e-3, rank


def crafted_data_base(cwd, name, test_features):
    """The run's data base with its test embeddings replaced, saved as results/<name>_data_base.pth beside a copy
    of the model: a 2-epoch random-weight model embeds the fixture's near-uniform images almost identically
    (cosines within 1e-6 of 1), which leaves the ranking to rounding; chosen embeddings make it well defined.
    """
    data_base = load_data_base(cwd)
    data_base['test_features'] = test_features.float()
    torch.save(data_base, results(cwd, f'{name}_data_base.pth'))
    shutil.copy(results(cwd, f'{PREFIX}_2_model.pth'), results(cwd, f'{name}_model.pth'))
    return data_base, f'{name}_data_base.pth'


def test_query_from_the_data_base(trained):
    """Test item 1 queries the others; test.py must exclude it, rank the rest by cosine and frame them."""
    # unit vectors at these angles (degrees) in the first two of the 32 dimensions; labels are 0 0 0 1 1 1
    degrees = torch.tensor([40.0, 0.0, 10.0, 90.0, 25.0, 150.0])
    features = torch.zeros(6, 32, dtype=torch.float64)
    features[:, 0], features[:, 1] = torch.deg2rad(degrees).cos(), torch.deg2rad(degrees).sin()
    data_base, name = crafted_data_base(trained, f'{PREFIX}_angles', features)
    query = 1
    query_path = data_base['test_images'][query]
    run_script(
        'test',
        '--query_img_name',
        query_path,
        '--data_base',
        name,
        '--retrieval_num',
        3,
        cwd=trained,
    )
    similarities = (features @ features[query]).tolist()
    order = sorted((i for i in range(6) if i != query), key=lambda i: -similarities[i])[
        :3
    ]  # itself excluded
    assert order == [2, 4, 0]  # worked out from the angles: 10, 25 and 40 degrees away
    labels = data_base['test_labels'].tolist()
    correct = [labels[i] == labels[query] for i in order]
    assert correct == [True, False, True]  # both border colours are checked
    folder = str(query_folder(results(trained), os.path.splitext(os.path.basename(query_path))[0]))
    check_retrieval(folder, order, similarities, data_base['test_images'], correct, trained)


def test_query_outside_the_data_base_is_embedded_with_the_saved_model(trained):
    """A training image is no test image of the data base: test.py embeds it with the model saved beside it."""
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(6, 32, generator=generator, dtype=torch.float64), dim=1)
    data_base, name = crafted_data_base(trained, f'{PREFIX}_random', features)
    query = 2
    query_path = data_base['train_images'][query]
    assert query_path not in data_base['test_images'] and os.path.isfile(
        os.path.join(trained, query_path)
    )
    run_script(
        'test',
        '--query_img_name',
        query_path,
        '--data_base',
        name,
        '--retrieval_num',
        4,
        cwd=trained,
    )
    # test.py embeds it as the test set is embedded: the saved model in eval mode, the test-time transform
    net = Model('googlenet', 32, 2, pretrained=False)
    net.load_state_dict(torch.load(results(trained, f'{PREFIX}_2_model.pth'), weights_only=True))
    with torch.no_grad():
        query_feature = net.eval().embed(
            eval_transform()(read_image(os.path.join(trained, query_path)))[None]
        )[0]
    query_feature = F.normalize(query_feature.double(), dim=0)
    similarities = (features @ query_feature).tolist()
    order = sorted(range(6), key=lambda i: -similarities[i])[:4]
    folder = str(query_folder(results(trained), os.path.splitext(os.path.basename(query_path))[0]))
    check_retrieval(folder, order, similarities, data_base['test_images'], [None] * 4, trained)
