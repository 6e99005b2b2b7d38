"""The two losses against pytorch-metric-learning given the same proxies (values and gradients), and by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses

from model import ProxyLinear
from utils import NormalizedSoftmaxLoss, ProxyAnchorLoss

SCALE, MARGIN = 32, 0.1


def problem(batch, num_classes, dim, labels=None, seed=0):
    """Random float64 embeddings (B, D), proxies (C, D) and labels (B,); labels may be given."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    # mildly aligned with their class proxy, so both loss terms and their gradients are far from
    # saturation
    proxies = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    if labels is None:
        labels = torch.randint(num_classes, (batch,), generator=generator)
    embeddings = embeddings + 0.5 * proxies[labels]
    return embeddings, proxies, torch.as_tensor(labels)


def ours(loss, embeddings, proxies, labels):
    """Our loss on the cosines normalize(x) @ normalize(W).T; returns (value, d/dx, d/dW)."""
    x = embeddings.clone().requires_grad_()
    w = proxies.clone().requires_grad_()
    value = loss(F.normalize(x, dim=-1) @ F.normalize(w, dim=-1).T, labels)
    value.backward()
    return value.detach(), x.grad, w.grad


def theirs(loss, embeddings, proxies, labels, proxy_name, layout):
    """A pytorch-metric-learning loss with our proxies copied in; returns (value, d/dx, d/dW as (C, D))."""
    initial = proxies.T if layout == 'DC' else proxies
    assert getattr(loss, proxy_name).shape == initial.shape  # the layout this test assumes is PML's
    setattr(loss, proxy_name, torch.nn.Parameter(initial.clone().contiguous()))
    x = embeddings.clone().requires_grad_()
    value = loss(x, labels)
    value.backward()
    grad = getattr(loss, proxy_name).grad
    return value.detach(), x.grad, grad.T if layout == 'DC' else grad


CASES = [
    # (batch, classes, dim, labels): every class present; several classes absent; a single class; 1
    # sample
    (32, 8, 16, None),
    (12, 10, 8, [0, 0, 3, 3, 3, 7, 7, 1, 1, 1, 1, 9]),
    (6, 5, 4, [2, 2, 2, 2, 2, 2]),
    (1, 3, 8, [1]),
    (
        64,
        100,
        32,
        None,
    ),  # many absent classes, as in a real batch of 64 over 98 or 100 training classes
]


@pytest.mark.parametrize('batch, num_classes, dim, labels', CASES)
def test_proxy_anchor_matches_pytorch_metric_learning(batch, num_classes, dim, labels):
    embeddings, proxies, labels = problem(batch, num_classes, dim, labels)
    value, grad_x, grad_w = ours(
        ProxyAnchorLoss(scale=SCALE, margin=MARGIN), embeddings, proxies, labels
    )
    reference = pml_losses.ProxyAnchorLoss(num_classes, dim, margin=MARGIN, alpha=SCALE)
    ref_value, ref_grad_x, ref_grad_w = theirs(
        reference, embeddings, proxies, labels, 'proxies', 'CD'
    )
    assert ref_value.dtype == torch.float64
    # ours computes in float32 by design (bf16 / fp16 cosines would lose too much inside exp(32 .))
    assert torch.allclose(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad_x, ref_grad_x, rtol=1e-4, atol=1e-6)
    assert torch.allclose(grad_w, ref_grad_w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('batch, num_classes, dim, labels', CASES)
def test_normalized_softmax_matches_pytorch_metric_learning(batch, num_classes, dim, labels):
    embeddings, proxies, labels = problem(batch, num_classes, dim, labels)
    value, grad_x, grad_w = ours(NormalizedSoftmaxLoss(scale=SCALE), embeddings, proxies, labels)
    reference = pml_losses.NormalizedSoftmaxLoss(num_classes, dim, temperature=1 / SCALE)
    # PML keeps this loss's proxies as W with one column per class: (D, C)
    ref_value, ref_grad_x, ref_grad_w = theirs(reference, embeddings, proxies, labels, 'W', 'DC')
    assert ref_value.dtype == torch.float64
    assert torch.allclose(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad_x, ref_grad_x, rtol=1e-4, atol=1e-6)
    assert torch.allclose(grad_w, ref_grad_w, rtol=1e-4, atol=1e-6)


def test_proxy_anchor_absent_proxies_only_get_negative_gradient():
    """A proxy without positives in the batch is only pushed away from the batch: its pos term is not averaged in."""
    embeddings, proxies, labels = problem(10, 6, 8, [0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    loss = ProxyAnchorLoss(scale=SCALE, margin=MARGIN)
    _, _, grad_w = ours(loss, embeddings, proxies, labels)
    # the loss with absent proxies 3..5 equals 1/3 * (pos terms of 0..2) + 1/6 * (neg terms of all
    # six)
    cosines = F.normalize(embeddings, dim=-1) @ F.normalize(proxies, dim=-1).T
    pos = [
        math.log1p(
            sum(
                math.exp(-SCALE * (cosines[i, c].item() - MARGIN))
                for i in range(10)
                if labels[i] == c
            )
        )
        for c in range(3)
    ]
    neg = [
        math.log1p(
            sum(
                math.exp(SCALE * (cosines[i, c].item() + MARGIN))
                for i in range(10)
                if labels[i] != c
            )
        )
        for c in range(6)
    ]
    assert loss(cosines, labels).item() == pytest.approx(sum(pos) / 3 + sum(neg) / 6, rel=1e-5)
    assert all(grad_w[c].abs().sum() > 0 for c in range(6))


def test_hand_worked_example():
    """B = 2, C = 2, both samples of class 0, class 1 absent; values worked out on paper from the formulas."""
    cosines = torch.tensor([[0.5, -0.2], [0.1, 0.3]])
    labels = torch.tensor([0, 0])
    # Proxy-Anchor: P+ = {0}: log(1 + e^{-32(0.5-0.1)} + e^{-32(0.1-0.1)}) = log(2 + e^{-12.8});
    # negatives: proxy 0 has none (log 1 = 0), proxy 1 has both: log(1 + e^{32(-0.2+0.1)} +
    # e^{32(0.3+0.1)})
    expected = (
        math.log(2 + math.exp(-12.8)) / 1 + (0 + math.log(1 + math.exp(-3.2) + math.exp(12.8))) / 2
    )
    assert ProxyAnchorLoss(scale=32, margin=0.1)(cosines, labels).item() == pytest.approx(
        expected, rel=1e-6
    )
    assert expected == pytest.approx(
        0.6931 + 6.4, abs=1e-3
    )  # the paper arithmetic: log 2 + 12.8 / 2
    # Normalized softmax: sample 0: -log(e^16 / (e^16 + e^-6.4)) = log(1 + e^-22.4);
    # sample 1: -log(e^3.2 / (e^3.2 + e^9.6)) = log(1 + e^6.4); the loss is their mean
    expected = (math.log1p(math.exp(-22.4)) + math.log1p(math.exp(6.4))) / 2
    assert NormalizedSoftmaxLoss(scale=32)(cosines, labels).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_losses_accept_low_precision_cosines_and_return_float32():
    embeddings, proxies, labels = problem(16, 5, 8)
    cosines = F.normalize(embeddings, dim=-1) @ F.normalize(proxies, dim=-1).T
    for loss in (ProxyAnchorLoss(), NormalizedSoftmaxLoss()):
        full = loss(cosines.float(), labels)
        half = loss(cosines.bfloat16(), labels)
        assert half.dtype == torch.float32
        assert half.item() == pytest.approx(full.item(), rel=0.05)


def test_defaults_are_the_papers():
    assert (ProxyAnchorLoss().scale, ProxyAnchorLoss().margin) == (32, 0.1)
    assert NormalizedSoftmaxLoss().scale == 32


def test_proxy_linear_feeds_the_losses_like_pml():
    """ProxyLinear's cosines, through our loss, give PML's loss and gradients for ProxyLinear.weight."""
    torch.manual_seed(0)
    layer = ProxyLinear(7, 12).double()
    embeddings = F.normalize(torch.randn(20, 12, dtype=torch.float64), dim=-1)
    labels = torch.randint(7, (20,))
    loss = ProxyAnchorLoss()(layer(embeddings), labels)
    loss.backward()
    reference = pml_losses.ProxyAnchorLoss(7, 12, margin=0.1, alpha=32)
    ref_value, _, ref_grad_w = theirs(
        reference, embeddings, layer.weight.detach(), labels, 'proxies', 'CD'
    )
    assert torch.allclose(loss.double(), ref_value, rtol=1e-5)
    assert torch.allclose(layer.weight.grad, ref_grad_w, rtol=1e-4, atol=1e-6)
