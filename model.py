"""The network: an ImageNet backbone with global max pooling, a normalised embedding head, and the class proxies."""
import os
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from utils import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BN_INCEPTION_URL = 'http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth'


# ----------------------------------------------------------------------------------------------------------------------
# backbones: each returns a module mapping normalised (B, 3, 224, 224) images to pooled (B, width) features

def resnet50(pretrained):
    """torchvision ResNet-50 with its IMAGENET1K_V1 weights (the published numbers used them)."""
    net = models.resnet50(weights=models.ResNet50_Weights.IMAGENET1K_V1 if pretrained else None)
    net.avgpool, net.fc = nn.AdaptiveMaxPool2d(1), nn.Identity()
    return net


def googlenet(pretrained):
    """torchvision GoogLeNet (Inception v1) with IMAGENET1K_V1 weights, without the auxiliary heads.

    As in the seed, only the pooling and the classifier are replaced: its Dropout(p=0.2) stays in front of the
    embedding layer, active in training.
    """
    if pretrained:
        # torchvision refuses aux_logits=False with weights: it builds the aux heads to load them, then drops them
        net = models.googlenet(weights=models.GoogLeNet_Weights.IMAGENET1K_V1)
    else:
        net = models.googlenet(weights=None, aux_logits=False, init_weights=True)
    net.avgpool, net.fc = nn.AdaptiveMaxPool2d(1), nn.Identity()
    return net


def bn_inception(pretrained):
    """BN-Inception from `pretrainedmodels`, with its ImageNet weights (served by data.lip6.fr)."""
    import pretrainedmodels  # imported here: it is slow to import and only this backbone needs it
    net = pretrainedmodels.bninception(num_classes=1000, pretrained=None)
    if pretrained:
        state = torch.hub.load_state_dict_from_url(BN_INCEPTION_URL, progress=True)
        # the published file stores some 1-d tensors as (1, C); fit them to the module's shapes
        own = net.state_dict()
        net.load_state_dict({name: value.reshape(own[name].shape) if name in own else value
                             for name, value in state.items()})
    net.global_pool, net.last_linear = nn.AdaptiveMaxPool2d(1), nn.Identity()
    return net


# name -> (constructor, feature width, input order, input mean and std in 0-255 units)
BACKBONES = {
    'resnet50': (resnet50, 2048, 'RGB', [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD]),
    'inception': (bn_inception, 1024, 'BGR', [104.0, 117.0, 128.0], [1.0, 1.0, 1.0]),
    'googlenet': (googlenet, 1024, 'RGB', [255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD]),
}


def weights_file(backbone_type):
    """(file name, download URL) of a backbone's ImageNet weights."""
    if backbone_type == 'inception':
        url = BN_INCEPTION_URL
    else:
        url = {'resnet50': models.ResNet50_Weights, 'googlenet': models.GoogLeNet_Weights}[
            backbone_type].IMAGENET1K_V1.url
    return os.path.basename(url), url


def build_backbone(backbone_type, pretrained):
    """Build a backbone; missing weights that cannot be downloaded become one clear UserError."""
    constructor = BACKBONES[backbone_type][0]
    if not pretrained:
        return constructor(pretrained)
    try:
        return constructor(pretrained)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a corrupt file is a RuntimeError
        name, url = weights_file(backbone_type)
        folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
        raise UserError(f'the ImageNet weights of {backbone_type} could not be loaded ({error}); download {url} '
                        f'and put {name} in {folder}, or train from random weights with --no_pretrained') from None


# ----------------------------------------------------------------------------------------------------------------------
# the head and the proxies

class InputNorm(nn.Module):
    """Turns (B, 3, H, W) RGB images in 0-255 (uint8 or float) into the backbone's expected input."""

    def __init__(self, order, mean, std):
        super().__init__()
        self.bgr = order == 'BGR'
        self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        x = images.flip(1) if self.bgr else images  # (B, 3, H, W)
        return (x.float() - self.mean) / self.std


class ProxyLinear(nn.Module):
    """One learnable proxy per training class; returns the (B, C) cosines between embeddings and proxies."""

    def __init__(self, num_proxy, in_features):
        super().__init__()
        # unit-normalised Gaussian rows, as the reference implementation initialises them
        self.weight = nn.Parameter(F.normalize(torch.randn(num_proxy, in_features), dim=-1))  # (C, D)

    def forward(self, x):
        return F.linear(x, F.normalize(self.weight, dim=-1))  # (B, D) @ (D, C) -> (B, C)


class Model(nn.Module):
    """Backbone -> global max pool -> layer norm -> bias-free linear -> L2 norm, plus the class proxies.

    backbone_type: 'resnet50', 'inception' (BN-Inception) or 'googlenet'. feature_dim (512): embedding size.
    num_classes: the number of training classes, one proxy each. pretrained (True): ImageNet weights.
    """

    def __init__(self, backbone_type, feature_dim, num_classes, pretrained=True):
        super().__init__()
        _, width, order, mean, std = BACKBONES[backbone_type]
        self.input_norm = InputNorm(order, mean, std)
        self.backbone = build_backbone(backbone_type, pretrained)
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.embedding = nn.Linear(width, feature_dim, bias=False)
        self.proxies = ProxyLinear(num_classes, feature_dim)

    def embed(self, images):
        """(B, 3, H, W) images in 0-255 -> (B, feature_dim) unit embeddings."""
        features = self.backbone(self.input_norm(images))  # (B, width)
        return F.normalize(self.embedding(self.norm(features)), dim=-1)  # (B, D)

    def forward(self, images):
        embeddings = self.embed(images)  # (B, D)
        return embeddings, self.proxies(embeddings)  # (B, D), (B, C)

    def head_parameters(self):
        """Parameters trained during the warm-up, while the backbone is frozen."""
        return list(self.embedding.parameters()) + list(self.proxies.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# the README's network-structure figure: `python model.py`

def draw_structure(path):
    """Draw the network as a left-to-right block diagram into `path` (PNG)."""
    from matplotlib.patches import FancyBboxPatch

    from utils import pyplot, save_figure
    plt = pyplot()
    blocks = [('image\n3 x 224 x 224', '#e8e8e8'),
              ('backbone\nResNet-50,\nBN-Inception or\nGoogLeNet', '#cfe2f3'),
              ('global max\npooling\n2048 | 1024', '#cfe2f3'),
              ('layer norm\n(no affine)', '#d9ead3'),
              ('linear\n(no bias)\n-> 512', '#d9ead3'),
              ('L2 norm\n= embedding', '#d9ead3'),
              ('ProxyLinear\ncosines to\nC proxies', '#fce5cd'),
              ('Proxy-Anchor |\nNormalized-\nSoftmax loss', '#f4cccc')]
    width, gap, height = 1.55, 0.45, 1.3
    figure, axis = plt.subplots(figsize=(len(blocks) * (width + gap) * 0.72, 2.3))
    for i, (text, colour) in enumerate(blocks):
        x = i * (width + gap)
        axis.add_patch(FancyBboxPatch((x, 0), width, height, boxstyle='round,pad=0.05', facecolor=colour,
                                      edgecolor='#444444'))
        axis.text(x + width / 2, height / 2, text, ha='center', va='center', fontsize=8.5)
        if i:
            axis.annotate('', xy=(x - 0.05, height / 2), xytext=(x - gap + 0.05, height / 2),
                          arrowprops={'arrowstyle': '->', 'color': '#444444'})
    axis.text(5 * (width + gap) + width / 2, -0.35, 'retrieval: cosine nearest neighbours',
              ha='center', fontsize=8, style='italic')
    left = 6 * (width + gap) - 0.15  # the proxies and the loss exist only while training
    axis.add_patch(plt.Rectangle((left, -0.2), 2 * width + gap + 0.3, height + 0.4, fill=False, linestyle='--',
                                 edgecolor='#888888'))
    axis.text(left + width + gap / 2 + 0.15, height + 0.3, 'training only', ha='center', fontsize=8,
              style='italic')
    axis.set_xlim(-0.2, len(blocks) * (width + gap) - gap + 0.2)
    axis.set_ylim(-0.6, height + 0.6)
    axis.axis('off')
    figure.tight_layout()
    save_figure(figure, path)


if __name__ == '__main__':
    draw_structure('results/structure.png')
    print('wrote results/structure.png')
