"""Mixed precision (--amp): the losses compute in float32 whatever the cosines' dtype, and
train.py's epoch and optimizer step in bfloat16 on the CPU."""

import types

import pytest
import torch
import torch.nn.functional as F
from adamp import AdamP
from torch import nn
from torch.utils.data import DataLoader

import train
from conftest import Pairs
from model import Model, ProxyLinear
from utils import LOSSES

LOW_PRECISION = [torch.bfloat16, torch.float16]
# the losses on cosines to the model's proxies; the others are PML's, on the embeddings
# (test_utils_baseline_losses.py)
ON_COSINES = [name for name, entry in LOSSES.items() if entry.cosines]


def cosine_problem(trained, batch=64, classes=100, dim=512, seed=0):
    """(embeddings (B, D), proxies layer, labels (B,)): random embeddings, or pulled towards their proxies."""
    generator = torch.Generator().manual_seed(seed)
    proxies = ProxyLinear(classes, dim)
    with torch.no_grad():
        proxies.weight.copy_(F.normalize(torch.randn(classes, dim, generator=generator), dim=-1))
    labels = torch.randint(0, classes, (batch,), generator=generator)
    noise = torch.randn(batch, dim, generator=generator) / dim**0.5
    embeddings = F.normalize(trained * proxies.weight.detach()[labels] + noise, dim=-1)
    return embeddings, proxies, labels


@pytest.mark.parametrize('loss_name', ON_COSINES)
@pytest.mark.parametrize('dtype', LOW_PRECISION)
@pytest.mark.parametrize('trained', [0.0, 0.5])
def test_low_precision_cosines_give_the_float32_loss(loss_name, dtype, trained):
    """bf16 or fp16 cosines: a finite float32 loss within 1e-2 relative of the loss of the float32 cosines."""
    embeddings, proxies, labels = cosine_problem(trained)
    cosines = proxies(embeddings)  # (B, C) float32
    loss = LOSSES[loss_name].build()
    expected = loss(cosines, labels)
    actual = loss(cosines.to(dtype), labels)
    assert actual.dtype == torch.float32 and torch.isfinite(actual)
    assert actual.item() == pytest.approx(expected.item(), rel=1e-2)


@pytest.mark.parametrize('loss_name', ON_COSINES)
@pytest.mark.parametrize('dtype', LOW_PRECISION)
def test_autocast_cosines_give_the_float32_loss_and_finite_gradients(loss_name, dtype):
    """Cosines made by ProxyLinear under CPU autocast, as train.py --amp makes them: the float32 loss within 1e-2,
    and finite proxy gradients within 5% of float32's."""
    embeddings, proxies, labels = cosine_problem(0.5)
    loss = LOSSES[loss_name].build()
    expected = loss(proxies(embeddings), labels)
    (expected_grad,) = torch.autograd.grad(expected, proxies.weight)
    with torch.autocast('cpu', dtype=dtype):
        cosines = proxies(embeddings)
        actual = loss(cosines, labels)
    assert cosines.dtype == dtype  # the autocast really ran the linear layer in low precision
    assert actual.dtype == torch.float32 and torch.isfinite(actual)
    assert actual.item() == pytest.approx(expected.item(), rel=1e-2)
    (grad,) = torch.autograd.grad(actual, proxies.weight)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    assert (grad - expected_grad).norm() <= 0.05 * expected_grad.norm()


def test_train_one_epoch_with_amp_on_cpu():
    """train.py's own epoch loop with --amp (bf16 autocast, channels_last) on the CPU: finite loss, the weights
    move, and the bf16 embeddings stay close to the float32 ones."""
    torch.manual_seed(0)
    model = Model('googlenet', 16, 4, pretrained=False).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)  # 2 batches of 4
    labels = torch.tensor([0, 0, 1, 2, 3, 3, 1, 2])
    with torch.no_grad():
        model.eval()
        full = model.embed(images[:4])
        with torch.autocast('cpu', dtype=torch.bfloat16):
            half = model.embed(images[:4].contiguous(memory_format=torch.channels_last))
    assert (full * half.float()).sum(-1).min() > 0.99  # cosine similarity of each embedding pair
    before = model.embedding.weight.detach().clone()
    optimizer = train.ChannelsLastAdamP(model.parameters(), lr=1e-3)
    args = types.SimpleNamespace(amp=True, no_pretrained=True, num_epochs=1, feature_dim=16)
    loader = DataLoader(
        train.Marked(Pairs(images, labels)), batch_sampler=train.GlobalBatches(8, 4, seed=1)
    )
    # args.amp: bf16 autocast on the CPU, channels_last inputs
    stats, features = train.train_one_epoch(
        model,
        loader,
        LOSSES['proxy_anchor'].build(),
        True,
        optimizer,
        torch.device('cpu'),
        1,
        args,
        rank=0,
    )
    assert stats['loss'] > 0 and stats['images_per_second'] > 0
    assert features.dtype == torch.float32 and torch.allclose(
        features.norm(dim=1), torch.ones(8), atol=1e-2
    )
    assert not torch.equal(model.embedding.weight, before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_channels_last_adamp_steps_like_adamp():
    """AdamP cannot flatten channels_last conv weights; the subclass train.py uses makes AdamP's very update."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    steps = [(torch.randn_like(conv.weight), torch.randn_like(conv.bias)) for _ in range(3)]
    results = []
    for optimizer_class, memory_format in (
        (AdamP, torch.contiguous_format),
        (train.ChannelsLastAdamP, torch.channels_last),
    ):
        layer = nn.Conv2d(3, 8, 3)
        layer.load_state_dict(conv.state_dict())
        layer = layer.to(memory_format=memory_format)
        optimizer = optimizer_class(layer.parameters(), lr=1e-2, weight_decay=1e-2)
        for weight_grad, bias_grad in steps:
            layer.weight.grad = weight_grad.contiguous(memory_format=memory_format)
            layer.bias.grad = bias_grad.clone()
            optimizer.step()
        results.append(layer.weight.detach())
    assert results[1].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)
    with pytest.raises(
        RuntimeError
    ):  # the reason for the subclass: plain AdamP fails on channels_last weights
        layer = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
        layer.weight.grad = torch.randn_like(layer.weight)
        AdamP(layer.parameters()).step()
