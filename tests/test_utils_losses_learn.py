"""Both losses really learn: a small embedding trained on synthetic classes retrieves held-out classes well."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import ProxyLinear
from utils import LOSSES, recall

SIGNAL, NUISANCE, PER_CLASS = 8, 24, 20
# the losses on cosines to the model's proxies (tests/test_train_losses.py: a pair loss)
ON_COSINES = [name for name, entry in LOSSES.items() if entry.cosines]


def synthetic(num_train, num_test, noise=3.0, seed=0):
    """Gaussian classes in an 8-d signal subspace, hidden under 24 dimensions of strong per-sample noise and a
    random rotation; returns train (x, y) and held-out-class test (x, y)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_train + num_test, SIGNAL, generator=generator)
    labels = torch.arange(num_train + num_test).repeat_interleave(PER_CLASS)
    signal = centres[labels] + 0.25 * torch.randn(len(labels), SIGNAL, generator=generator)
    nuisance = noise * torch.randn(len(labels), NUISANCE, generator=generator)
    rotation, _ = torch.linalg.qr(
        torch.randn(SIGNAL + NUISANCE, SIGNAL + NUISANCE, generator=generator)
    )
    x = torch.cat([signal, nuisance], dim=1) @ rotation
    train = labels < num_train
    return (x[train], labels[train]), (x[~train], labels[~train] - num_train)


class Embedder(nn.Module):
    """A small MLP embedding, L2-normalised, with one proxy per training class (the model's head in miniature)."""

    def __init__(self, num_classes, dim=16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(SIGNAL + NUISANCE, 64), nn.ReLU(), nn.Linear(64, dim, bias=False)
        )
        self.proxies = ProxyLinear(num_classes, dim)

    def forward(self, x):
        embeddings = F.normalize(self.net(x), dim=-1)
        return embeddings, self.proxies(embeddings)


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is several times faster than many fighting over 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('loss_name', ON_COSINES)
def test_loss_learns_an_embedding_that_generalises_to_unseen_classes(loss_name, one_thread):
    torch.manual_seed(0)
    (train_x, train_y), (test_x, test_y) = synthetic(num_train=60, num_test=20)
    net = Embedder(num_classes=60)
    # as the repository's recipe, a larger learning rate for the proxies than for the embedding
    optimizer = torch.optim.Adam(
        [{'params': net.net.parameters()}, {'params': net.proxies.parameters(), 'lr': 1e-1}],
        lr=1e-2,
    )
    loss_criterion = LOSSES[loss_name].build()

    def held_out_recall():
        with torch.no_grad():
            return recall(net(test_x)[0], test_y, [1])[0]

    chance = (PER_CLASS - 1) / (
        len(test_y) - 1
    )  # a random neighbour's chance of sharing the query's class
    before = held_out_recall()
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(400):
        batch = torch.randint(len(train_y), (64,), generator=generator)
        loss = loss_criterion(net(train_x[batch])[1], train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = held_out_recall()

    assert all(math.isfinite(value) for value in losses)
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])
    assert (
        before < 0.25
    ), f'the task is too easy at initialisation: R@1 {before:.2f} (chance {chance:.2f})'
    assert after > 0.8, f'R@1 on unseen classes only {after:.2f} after training (from {before:.2f})'
    assert after > before + 0.5 and after > 10 * chance
