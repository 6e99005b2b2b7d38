"""utils.py's baseline losses against pytorch-metric-learning built as the official Proxy-Anchor
code (or PML's defaults) gives them: the same value and gradients on the same embeddings and
class weights; pml/<Name> and --loss_args."""

import re

import pytest
import torch
from pytorch_metric_learning import losses as pml, miners

from utils import (
    LOSSES,
    EmbeddingLoss,
    UserError,
    check_loss_name,
    class_cosines,
    loss_entry,
    parse_loss_args,
)

BATCH, NUM_CLASSES, DIM = 16, 4, 8

# each named loss as the official code/losses.py or PML's defaults give it: (loss, miner or None)
REFERENCES = {
    'proxy_nca': lambda: (pml.ProxyNCALoss(NUM_CLASSES, DIM, softmax_scale=32), None),
    'soft_triple': lambda: (
        pml.SoftTripleLoss(NUM_CLASSES, DIM, centers_per_class=10, la=20, gamma=0.1, margin=0.01),
        None,
    ),
    'arcface': lambda: (pml.ArcFaceLoss(NUM_CLASSES, DIM, margin=28.6, scale=64), None),
    'cosface': lambda: (pml.CosFaceLoss(NUM_CLASSES, DIM, margin=0.35, scale=64), None),
    'multi_similarity': lambda: (
        pml.MultiSimilarityLoss(2, 50, 0.5),
        miners.MultiSimilarityMiner(epsilon=0.1),
    ),
    'triplet': lambda: (
        pml.TripletMarginLoss(margin=0.1),
        miners.TripletMarginMiner(0.1, type_of_triplets='semihard'),
    ),
    'contrastive': lambda: (pml.ContrastiveLoss(neg_margin=0.5), None),
    'npair': lambda: (pml.NPairsLoss(), None),
    'circle': lambda: (pml.CircleLoss(m=0.4, gamma=80), None),
    'supcon': lambda: (pml.SupConLoss(temperature=0.1), None),
}


def problem(seed=0):
    """float64 embeddings (B, D) mildly pulled towards their class, and labels (B,) with 4 images of each class."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(BATCH // NUM_CLASSES)
    centres = torch.randn(NUM_CLASSES, DIM, generator=generator, dtype=torch.float64)
    embeddings = (
        torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64) + 0.7 * centres[labels]
    )
    return torch.nn.functional.normalize(embeddings, dim=-1), labels


def built(loss_name):
    """The registry's loss with its flags' defaults, in float64, as train.make_loss builds it."""
    entry = LOSSES[loss_name]
    sizes = (
        {'num_classes': NUM_CLASSES, 'embedding_size': DIM}
        if loss_name in ('proxy_nca', 'soft_triple', 'arcface', 'cosface')
        else {}
    )
    return entry.build(
        **{flag: hyper.default for flag, hyper in entry.hyper.items()}, **sizes
    ).double()


def value_and_gradients(loss, call, embeddings):
    """(value, d/d embeddings, [d/d each of the loss's own parameters])."""
    x = embeddings.clone().requires_grad_()
    value = call(x)
    value.backward()
    return value.detach(), x.grad, [parameter.grad for parameter in loss.parameters()]


@pytest.mark.parametrize('loss_name', list(REFERENCES))
def test_each_baseline_equals_pytorch_metric_learning(loss_name):
    """Value and gradients (embeddings and the loss's class weights) equal PML's loss built with the reference
    settings, given the same class weights."""
    assert set(REFERENCES) == {name for name, entry in LOSSES.items() if not entry.cosines}
    embeddings, labels = problem()
    ours = built(loss_name)
    assert isinstance(ours, EmbeddingLoss)
    reference, miner = REFERENCES[loss_name]()
    reference = reference.double()
    with torch.no_grad():  # the same class weights, whatever each drew at construction
        for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
            theirs.copy_(mine)
    value, grad_x, grads = value_and_gradients(ours, lambda x: ours(x, labels), embeddings)
    ref_value, ref_grad_x, ref_grads = value_and_gradients(
        reference, lambda x: reference(x, labels, miner(x, labels) if miner else None), embeddings
    )
    assert value.item() > 0  # the problem exercises the loss: a loss of 0 would compare nothing
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=1e-10, atol=1e-12)
    assert grad_x.abs().max() > 0
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
        assert grad.abs().max() > 0


@pytest.mark.parametrize(
    'loss_name, count', [('proxy_nca', 1), ('arcface', 1), ('cosface', 1), ('soft_triple', 10)]
)
def test_class_proxies_are_the_loss_own_weights(loss_name, count):
    """The losses with class weights give them as (C, K, D), the same tensor, so the data base and train accuracy
    read what the loss trains; the pair-based ones hold none."""
    loss = built(loss_name)
    proxies = loss.class_proxies()
    (weight,) = loss.parameters()
    assert proxies.shape == (NUM_CLASSES, count, DIM)
    assert (
        proxies.data_ptr() == weight.data_ptr()
        or proxies.untyped_storage().data_ptr() == weight.data_ptr()
    )
    for name in ('multi_similarity', 'triplet', 'contrastive', 'npair', 'circle', 'supcon'):
        assert built(name).class_proxies() is None and not list(built(name).parameters())


def test_multi_centre_cosines_follow_pml_order():
    """class_cosines takes each class's nearest centre in PML's order (column c * K + k is class c's k-th centre):
    SubCenterArcFace's own cosines to its classes, as PML computes them."""
    entry = loss_entry('pml/SubCenterArcFaceLoss', 'sub_centers=3')
    loss = entry.build(num_classes=NUM_CLASSES, embedding_size=DIM).double()
    embeddings, _ = problem(1)
    proxies = loss.class_proxies()
    assert proxies.shape == (NUM_CLASSES, 3, DIM)
    expected = loss.loss.get_cosine(embeddings)  # PML takes the max over sub-centres itself
    torch.testing.assert_close(
        class_cosines(embeddings, proxies).double(), expected, rtol=1e-6, atol=1e-6
    )


def test_any_pml_loss_by_name_with_its_arguments():
    """pml/<Name> with --loss_args is PML's class with those arguments and its defaults otherwise."""
    embeddings, labels = problem(2)
    ours = loss_entry('pml/LiftedStructureLoss', 'neg_margin=0.5').build()
    assert ours.class_proxies() is None
    torch.testing.assert_close(
        ours(embeddings, labels), pml.LiftedStructureLoss(neg_margin=0.5)(embeddings, labels)
    )
    weighted = loss_entry('pml/MarginLoss', 'learn_beta=True,margin=0.3').build()
    assert weighted.loss.margin == 0.3 and weighted.loss.learn_beta is True


@pytest.mark.parametrize(
    'name, expected',
    [
        ('multi_similarty', 'unknown --loss_name multi_similarty (close: multi_similarity'),
        ('pml/ArcfaceLoss', 'unknown --loss_name pml/ArcfaceLoss (close: pml/ArcFaceLoss'),
        ('pml/Nothing', 'unknown --loss_name pml/Nothing'),
    ],
)
def test_an_unknown_loss_lists_the_close_names(name, expected):
    with pytest.raises(UserError, match='^' + re.escape(expected)):
        check_loss_name(name)


@pytest.mark.parametrize(
    'name, text, expected',
    [
        (
            'pml/ContrastiveLoss',
            'neg_margn=0.3',
            'ContrastiveLoss takes no parameter neg_margn (from --loss_args); it '
            'takes pos_margin, neg_margin',
        ),
        ('pml/ContrastiveLoss', 'neg_margn=0.3', 'did you mean neg_margin or pos_margin?'),
        ('pml/RankedListLoss', '', 'RankedListLoss needs margin and Tn, which has no default'),
        (
            'pml/ContrastiveLoss',
            'neg_margin',
            '--loss_args must be name=value pairs separated by commas',
        ),
        ('pml/ContrastiveLoss', 'neg_margin=[1, 2]', '--loss_args must be name=value pairs'),
    ],
)
def test_a_wrong_loss_argument_is_one_sentence(name, text, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        loss_entry(name, text)


def test_loss_args_parse_to_one_canonical_form():
    """The same parameters in any order or spelling give the same values, so they name the same run."""
    assert parse_loss_args('b=2,a=0.50, c=True ,d=word') == {
        'a': 0.5,
        'b': 2,
        'c': True,
        'd': 'word',
    }
    assert parse_loss_args('') == {}
