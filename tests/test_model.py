"""The network on all three backbones (random weights, never a download): shapes, norms, head and proxies."""

import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.transforms import v2

import model as model_module
from model import Model, ProxyLinear
from utils import UserError

WIDTHS = {'resnet50': 2048, 'inception': 1024, 'googlenet': 1024}
FEATURE_DIM, NUM_CLASSES, BATCH = 24, 5, 2


@pytest.fixture(scope='module', params=list(WIDTHS))
def run(request):
    """One eval-mode forward of 224 x 224 uint8 images per backbone, recording the global pool's input/output."""
    torch.manual_seed(0)
    net = Model(request.param, FEATURE_DIM, NUM_CLASSES, pretrained=False).eval()
    pools = [m for m in net.backbone.modules() if isinstance(m, nn.AdaptiveMaxPool2d)]
    record = {}
    handle = pools[-1].register_forward_hook(
        lambda module, inputs, output: record.update(pool_in=inputs[0], pool_out=output)
    )
    images = torch.randint(0, 256, (BATCH, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        embeddings, cosines = net(images)
        features = net.backbone(net.input_norm(images))
    handle.remove()
    return request.param, net, pools, images, embeddings, cosines, features, record


def test_forward_shapes_and_unit_norm(run):
    _, net, _, _, embeddings, cosines, _, _ = run
    assert embeddings.shape == (BATCH, FEATURE_DIM)
    assert cosines.shape == (BATCH, NUM_CLASSES)
    assert embeddings.dtype == cosines.dtype == torch.float32
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(BATCH), atol=1e-5)
    assert torch.isfinite(cosines).all() and cosines.abs().max() <= 1 + 1e-5
    # the cosines are those of the embeddings with the normalised proxies
    proxies = F.normalize(net.proxies.weight, dim=-1)
    assert torch.allclose(cosines, F.normalize(embeddings, dim=-1) @ proxies.T, atol=1e-6)


def test_backbone_ends_in_global_max_pooling_without_classifier(run):
    backbone_type, _, pools, _, _, _, features, record = run
    assert len(pools) == 1  # the final pooling, and no other adaptive max pool
    assert features.shape == (BATCH, WIDTHS[backbone_type])
    # the pooled feature is the spatial maximum of the last feature map...
    assert torch.equal(record['pool_out'].flatten(1), record['pool_in'].amax(dim=(2, 3)))
    # ...and nothing (classifier, dropout) changes it on the way out of the backbone
    assert torch.equal(features, record['pool_out'].flatten(1))


def test_head_structure(run):
    backbone_type, net, _, _, embeddings, _, features, _ = run
    width = WIDTHS[backbone_type]
    assert isinstance(net.norm, nn.LayerNorm) and net.norm.normalized_shape == (width,)
    assert net.norm.weight is None and net.norm.bias is None  # no affine parameters
    assert isinstance(net.embedding, nn.Linear) and net.embedding.bias is None
    assert (net.embedding.in_features, net.embedding.out_features) == (width, FEATURE_DIM)
    # pooled feature -> layer norm without affine -> bias-free linear -> L2 norm, recomputed by hand
    centred = features - features.mean(dim=1, keepdim=True)
    normed = centred / torch.sqrt(centred.pow(2).mean(dim=1, keepdim=True) + net.norm.eps)
    expected = normed @ net.embedding.weight.T
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert torch.allclose(embeddings, expected, atol=1e-5)
    assert net.proxies.weight.shape == (NUM_CLASSES, FEATURE_DIM)
    backbone, head, proxies = ({id(p) for p in group} for group in net.parameter_groups())
    assert head == {id(net.embedding.weight)} and proxies == {id(net.proxies.weight)}
    assert backbone == {id(p) for p in net.backbone.parameters()}
    assert len(backbone) + 2 == len(list(net.parameters()))  # every parameter in one group


def test_input_normalisation(run):
    backbone_type, net, _, images, _, _, _, _ = run
    got = net.input_norm(images)
    if backbone_type == 'inception':
        # BN-Inception: BGR channel order, 0-255 pixel values, mean [104, 117, 128], std 1
        expected = images.float()[:, [2, 1, 0]] - torch.tensor([104.0, 117.0, 128.0]).view(
            1, 3, 1, 1
        )
    else:
        expected = v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(images.float() / 255)
    assert torch.allclose(got, expected, atol=1e-4)


def test_googlenet_has_no_auxiliary_heads():
    net = Model('googlenet', 8, 3, pretrained=False)
    assert net.backbone.aux1 is None and net.backbone.aux2 is None


def test_proxy_linear_returns_cosines():
    torch.manual_seed(1)
    layer = ProxyLinear(6, 10)
    # initialised as unit-normalised Gaussian rows
    assert torch.allclose(layer.weight.norm(dim=1), torch.ones(6), atol=1e-6)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(6, 1) * 3 + 0.5)  # learnt proxies need not stay unit length
    x = F.normalize(torch.randn(7, 10), dim=-1)  # the model feeds it unit embeddings
    expected = torch.tensor(
        [
            [
                torch.dot(x[i], layer.weight[c]).item() / layer.weight[c].norm().item()
                for c in range(6)
            ]
            for i in range(7)
        ]
    )
    got = layer(x)
    assert got.shape == (7, 6)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(
        got, F.cosine_similarity(x[:, None], layer.weight[None], dim=-1), atol=1e-6
    )


@pytest.mark.parametrize('backbone_type', list(WIDTHS))
def test_missing_weights_is_one_clear_error(backbone_type, monkeypatch, tmp_path):
    """No network and no cached file: a UserError naming the weights file and --no_pretrained, never a download."""

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError('no network in this test')

    monkeypatch.setattr(torchvision.models._api, 'load_state_dict_from_url', offline)
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path))
    name, _ = model_module.weights_file(backbone_type)
    with pytest.raises(UserError) as error:
        Model(backbone_type, 8, 3, pretrained=True)
    message = str(error.value)
    assert name in message and '--no_pretrained' in message and str(tmp_path) in message


def published_weights(backbone_type):
    """A random state dict shaped like each backbone's published ImageNet weights file."""
    torch.manual_seed(2)
    if backbone_type == 'resnet50':
        return torchvision.models.resnet50().state_dict()
    if backbone_type == 'googlenet':
        return torchvision.models.googlenet(aux_logits=True, init_weights=False).state_dict()
    import pretrainedmodels

    state = pretrainedmodels.bninception(num_classes=1000, pretrained=None).state_dict()
    # the published BN-Inception file predates num_batches_tracked and stores 1-d tensors as (1, C)
    return {
        name: value.reshape(1, -1) if value.dim() == 1 else value
        for name, value in state.items()
        if not name.endswith('num_batches_tracked')
    }


@pytest.mark.parametrize('backbone_type', list(WIDTHS))
def test_pretrained_weights_are_loaded(backbone_type, monkeypatch):
    """pretrained=True loads the published file (served here by a stub, never the network) into the backbone."""
    state = published_weights(backbone_type)
    urls = []

    def serve(url, *args, **kwargs):
        urls.append(url)
        return {name: value.clone() for name, value in state.items()}

    monkeypatch.setattr(torchvision.models._api, 'load_state_dict_from_url', serve)
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', serve)
    net = Model(backbone_type, 8, 3, pretrained=True)
    assert urls == [model_module.weights_file(backbone_type)[1]]
    loaded = net.backbone.state_dict()
    compared = [
        name for name in loaded if name in state and not name.endswith('num_batches_tracked')
    ]
    assert len(compared) > 100
    for name in compared:
        assert torch.equal(loaded[name], state[name].reshape(loaded[name].shape)), name
    if backbone_type == 'googlenet':
        assert net.backbone.aux1 is None and net.backbone.aux2 is None
    assert isinstance(
        net.backbone.fc if backbone_type != 'inception' else net.backbone.last_linear, nn.Identity
    )
