"""utils.clustering_metrics against pytorch-metric-learning's AccuracyCalculator."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from utils import clustering_metrics


def blobs(n, classes, dim, spread, seed):
    """(n, D) unit rows around classes centres and their (n,) labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=generator)
    features = centres[labels] + spread * torch.randn(n, dim, generator=generator)
    return F.normalize(features, dim=1), labels


@pytest.mark.parametrize('spread', [0.3, 1.5])
def test_equals_accuracy_calculator(spread):
    features, labels = blobs(300, 10, 16, spread, seed=3)
    calculator = AccuracyCalculator(include=('NMI', 'AMI'), device=torch.device('cpu'))
    expected = calculator.get_accuracy(features, labels)
    got = clustering_metrics(features, labels)
    assert got['nmi'] == pytest.approx(expected['NMI'], abs=1e-12)
    assert got['ami'] == pytest.approx(expected['AMI'], abs=1e-12)
    assert got['nmi'] < 1 - 1e-3  # the figures are not trivially perfect


def test_only_the_partition_counts_and_chance_scores_near_zero():
    features, labels = blobs(200, 8, 32, 0.3, seed=4)
    got = clustering_metrics(features, labels)
    assert clustering_metrics(features, labels * 7 + 100) == got
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert abs(clustering_metrics(features, shuffled)['ami']) < 0.1 < got['ami']


def test_rows_of_any_scale_cluster_as_unit_rows():
    features, labels = blobs(150, 5, 8, 0.8, seed=5)
    scale = torch.rand(len(features), 1, generator=torch.Generator().manual_seed(1)) * 9 + 1
    assert clustering_metrics(features * scale, labels) == clustering_metrics(features, labels)
    assert np.isfinite(list(clustering_metrics(features, labels).values())).all()
