"""The network: an ImageNet backbone with global max pooling (or a ViT's class token), a normalised
embedding head, and the class proxies; and its structure figure. Reading a trained one back is
runs.py's (runs.load_model)."""
import contextlib
import difflib
import os
import urllib.error
import urllib.request

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from runtime import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BN_INCEPTION_URL = 'http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth'


# --------------------------------------------------------------------------------------------------
# backbones: each returns a module mapping normalised (B, 3, 224, 224) images to pooled (B, width) features

def resnet50(pretrained):
    """torchvision ResNet-50 with its IMAGENET1K_V1 weights (the published numbers used them)."""
    net = models.resnet50(weights=models.ResNet50_Weights.IMAGENET1K_V1 if pretrained else None)
    net.avgpool, net.fc = nn.AdaptiveMaxPool2d(1), nn.Identity()
    return net


def googlenet(pretrained):
    """torchvision GoogLeNet (Inception v1) with IMAGENET1K_V1 weights, without the auxiliary heads.

    As in the seed, only the pooling and the classifier are replaced: its Dropout(p=0.2) stays in
    front of the embedding layer, active in training.
    """
    if pretrained:
        # torchvision refuses aux_logits=False with weights: it builds the aux heads to load them,
        # then drops them
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


def timm_backbone(name, pretrained, image_size=224):
    """A timm model's pooled features (num_classes=0): a ViT's class token after its final norm, a
    CNN's pool.

    A model built for one input size (DINOv2's is 518, a ViT/16's 224) is built for the run's
    image_size crops instead; timm resizes the pretrained position embeddings to it.
    """
    import timm
    config = timm.models.get_pretrained_cfg(name)
    size = (
        {'img_size': image_size}
        if config.fixed_input_size and tuple(config.input_size[1:]) != (image_size, image_size)
        else {}
    )
    if not pretrained:
        return timm.create_model(name, num_classes=0, **size)
    if not timm.is_model_pretrained(name):
        raise UserError(f'timm has no pretrained weights for {name}; pick a name that has them '
                        f'(timm.list_models(pretrained=True) lists them) or train from random '
                        f'weights with --no_pretrained')
    # offline, a missing file fails at once instead of retrying for a minute
    with hub_offline(not hub_reachable()):
        return timm.create_model(name, pretrained=True, num_classes=0, **size)


def hub_reachable(timeout=5):
    """Whether the Hugging Face hub answers within `timeout` seconds (through the environment's proxy, if any)."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(
            urllib.request.Request(constants.ENDPOINT, method='HEAD'), timeout=timeout
        ).close()
    except urllib.error.HTTPError:
        return True  # it answered, if only with an error status
    except OSError:
        return False
    return True


@contextlib.contextmanager
def hub_offline(offline):
    """Within the block, huggingface_hub reads only its cache when `offline` (its HF_HUB_OFFLINE=1 mode)."""
    from huggingface_hub import constants
    saved = constants.HF_HUB_OFFLINE
    # read at each request, so the switch takes effect at once
    constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


# name -> (constructor, feature width, input order, input mean and std in 0-255 units), or the name
# of a timm model, whose width (num_features) and mean and std (its pretrained config's) timm_io
# reads; 'timm/<name>' is any other
BACKBONES = {
    'resnet50': (
        resnet50,
        2048,
        'RGB',
        [255 * m for m in IMAGENET_MEAN],
        [255 * s for s in IMAGENET_STD],
    ),
    'inception': (bn_inception, 1024, 'BGR', [104.0, 117.0, 128.0], [1.0, 1.0, 1.0]),
    'googlenet': (
        googlenet,
        1024,
        'RGB',
        [255 * m for m in IMAGENET_MEAN],
        [255 * s for s in IMAGENET_STD],
    ),
    'vit_small_dino': 'vit_small_patch16_224.dino',  # ViT-S/16, DINO self-supervised on ImageNet-1k
    # ViT-S/14, DINOv2 self-supervised on LVD-142M
    'dinov2_small': 'vit_small_patch14_dinov2.lvd142m',
    # ViT-B/14, DINOv2 self-supervised on LVD-142M
    'dinov2_base': 'vit_base_patch14_dinov2.lvd142m',
}
TIMM_PREFIX = 'timm/'


def timm_name(backbone_type):
    """The timm model behind a backbone type, or None for the seed's three."""
    if backbone_type.startswith(TIMM_PREFIX):
        return backbone_type[len(TIMM_PREFIX):]
    entry = BACKBONES[backbone_type]
    return entry if isinstance(entry, str) else None


def check_backbone(backbone_type):
    """The --backbone_type value itself if it names a backbone, else one UserError (train.py's argparse type)."""
    if backbone_type in BACKBONES:
        return backbone_type
    import timm
    if not backbone_type.startswith(TIMM_PREFIX):
        if timm.is_model(backbone_type):  # resnet18: a timm name without the prefix
            raise UserError(f'unknown --backbone_type {backbone_type}: timm models take the prefix '
                            f'{TIMM_PREFIX}, so pass --backbone_type {TIMM_PREFIX}{backbone_type} '
                            f'(the named backbones are {", ".join(BACKBONES)})')
        close = difflib.get_close_matches(backbone_type, BACKBONES, n=2)
        hint = f' (did you mean {" or ".join(close)}?)' if close else ''
        raise UserError(f'unknown --backbone_type {backbone_type}: choose one of '
                        f'{", ".join(BACKBONES)}, or {TIMM_PREFIX}<name> for any timm model, such '
                        f'as {TIMM_PREFIX}convnext_small.fb_in22k{hint}')
    name = timm_name(backbone_type)
    # is_model ignores a weights tag: resnet18.a1_in1k is known if resnet18 is
    if not timm.is_model(name):
        close = difflib.get_close_matches(
            name, timm.list_models() + timm.list_models(pretrained=True), n=3
        )
        hint = f' (close: {", ".join(TIMM_PREFIX + c for c in close)})' if close else ''
        raise UserError(f'timm has no model {name} (from --backbone_type {backbone_type}){hint}; '
                        f'timm.list_models() lists the names it knows')
    try:
        timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # a known model with an unknown weights tag
        architecture, tag = name.split('.', 1)
        raise UserError(
            f'timm has no weights tagged {tag} for {architecture} (from --backbone_type'
            f' {backbone_type}); timm.list_models("{architecture}.*", pretrained=True) lists its'
            ' tags'
        ) from None
    return backbone_type


def backbone_file_name(backbone_type):
    """The backbone type as output file names spell it: timm/<name> becomes timm-<name> (timm names have no '-')."""
    return backbone_type.replace('/', '-')


def weights_file(backbone_type):
    """(file name, download URL) of a backbone's ImageNet weights."""
    if backbone_type == 'inception':
        url = BN_INCEPTION_URL
    else:
        url = {'resnet50': models.ResNet50_Weights, 'googlenet': models.GoogLeNet_Weights}[
            backbone_type].IMAGENET1K_V1.url
    return os.path.basename(url), url


def timm_io(net):
    """(feature width, input order, input mean and std in 0-255 units) of a timm model, from timm."""
    from timm.data import resolve_model_data_config
    config = resolve_model_data_config(net)
    return (
        net.num_features,
        'RGB',
        [255 * m for m in config['mean']],
        [255 * s for s in config['std']],
    )


def build_backbone(backbone_type, pretrained, image_size=224):
    """(backbone, feature width, input order, input mean, std), a fixed-size timm model built for
    image_size crops; missing weights that cannot be downloaded become one clear UserError."""
    name = timm_name(check_backbone(backbone_type))
    try:
        if name is not None:
            net = timm_backbone(name, pretrained, image_size)
            return (net, *timm_io(net))
        constructor, *io = BACKBONES[backbone_type]
        return (constructor(pretrained), *io)
    # URLError is an OSError; a corrupt file is a RuntimeError
    except (OSError, RuntimeError) as error:
        if not pretrained:
            raise
        if name is not None:
            raise UserError(timm_weights_missing(backbone_type, name, error)) from None
        file_name, url = weights_file(backbone_type)
        folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
        raise UserError(
            f'the ImageNet weights of {backbone_type} could not be loaded ({error}); download {url}'
            f' and put {file_name} in {folder}, or train from random weights with --no_pretrained'
        ) from None


def timm_weights_missing(backbone_type, name, error):
    """The sentence for a timm model's pretrained weights that are neither cached nor downloadable."""
    from huggingface_hub import constants
    import timm
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    folder = (
        f'the Hugging Face cache folder {constants.HF_HUB_CACHE}/models--{repo.replace("/", "--")}'
        if repo
        else f'torch\'s cache folder {os.path.join(torch.hub.get_dir(), "checkpoints")}'
    )
    # huggingface_hub's error for a file neither cached nor reachable
    if isinstance(error, FileNotFoundError):
        problem = f'are not in {folder} and the hub cannot be reached'
    else:
        problem = f'could not be loaded into {folder} ({str(error).splitlines()[0]})'
    home = f' with the same HF_HOME ({constants.HF_HOME})' if repo else ''
    return (f'the pretrained weights of {backbone_type} (timm model {name}) {problem}; download '
            f'them once where the hub can be reached{home} and copy that folder here, or train '
            f'from random weights with --no_pretrained')


# --------------------------------------------------------------------------------------------------
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
        # (C, D)
        self.weight = nn.Parameter(F.normalize(torch.randn(num_proxy, in_features), dim=-1))

    def forward(self, x):
        return F.linear(x, F.normalize(self.weight, dim=-1))  # (B, D) @ (D, C) -> (B, C)


class Model(nn.Module):
    """Backbone -> global max pool (a ViT: class token) -> layer norm -> bias-free linear -> L2
    norm, plus proxies.

    backbone_type: 'resnet50', 'inception' (BN-Inception), 'googlenet', 'vit_small_dino',
    'dinov2_small', 'dinov2_base' or 'timm/<timm model name>'. feature_dim (512): embedding size.
    num_classes: the number of training classes, one proxy each (0 for a loss on embeddings, which
    needs none). pretrained (True): the backbone's published weights. image_size (224): the side of
    the square images it is fed (train.py --image_size), which a ViT is built for.
    """

    def __init__(self, backbone_type, feature_dim, num_classes, pretrained=True, image_size=224):
        super().__init__()
        backbone, width, order, mean, std = build_backbone(backbone_type, pretrained, image_size)
        self.input_norm = InputNorm(order, mean, std)
        self.backbone = backbone
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.embedding = nn.Linear(width, feature_dim, bias=False)
        self.proxies = ProxyLinear(num_classes, feature_dim)
        # none for a loss on embeddings: an empty weight that wants no gradient, which DDP would
        # wait for in vain
        self.proxies.weight.requires_grad_(num_classes > 0)

    def embed(self, images):
        """(B, 3, H, W) images in 0-255 -> (B, feature_dim) unit embeddings."""
        features = self.backbone(self.input_norm(images))  # (B, width)
        return F.normalize(self.embedding(self.norm(features)), dim=-1)  # (B, D)

    def forward(self, images):
        embeddings = self.embed(images)  # (B, D)
        return embeddings, self.proxies(embeddings)  # (B, D), (B, C)

    def parameter_groups(self):
        """(backbone, head, proxies) parameters: the warm-up freezes the backbone and trains the
        embedding layer (the head) and the proxies; the proxies have a learning rate of their
        own."""
        return (
            list(self.backbone.parameters()),
            list(self.embedding.parameters()),
            list(self.proxies.parameters()),
        )


# --------------------------------------------------------------------------------------------------
# the README's network-structure figure: `python model.py`

def draw_structure(path):
    """Draw the network as a left-to-right block diagram into `path` (PNG)."""
    from matplotlib.patches import FancyBboxPatch

    from runtime import pyplot, save_figure
    plt = pyplot()
    blocks = [
        ('image\n3 x 224 x 224', '#e8e8e8'),
        (
            (
                'backbone\nResNet-50,\nBN-Inception,\nGoogLeNet,\nViT-S/16 DINO,\nDINOv2 S |'
                ' B,\nany timm model'
            ),
            '#cfe2f3',
        ),
        (
            (
                'global max pool\n2048 | 1024;\nViT: class token\n384 | 768;\nother timm:\nits own'
                ' pool'
            ),
            '#cfe2f3',
        ),
        ('layer norm\n(no affine)', '#d9ead3'),
        ('linear\n(no bias)\n-> 512', '#d9ead3'),
        ('L2 norm\n= embedding', '#d9ead3'),
        ('ProxyLinear\ncosines to\nC proxies', '#fce5cd'),
        ('Proxy-Anchor |\nNormalized-\nSoftmax loss', '#f4cccc'),
    ]
    width, gap, height = 1.55, 0.45, 1.7
    figure, axis = plt.subplots(figsize=(len(blocks) * (width + gap) * 0.72, 2.7))
    for i, (text, colour) in enumerate(blocks):
        x = i * (width + gap)
        axis.add_patch(
            FancyBboxPatch(
                (x, 0),
                width,
                height,
                boxstyle='round,pad=0.05',
                facecolor=colour,
                edgecolor='#444444',
            )
        )
        axis.text(x + width / 2, height / 2, text, ha='center', va='center', fontsize=8.5)
        if i:
            axis.annotate('', xy=(x - 0.05, height / 2), xytext=(x - gap + 0.05, height / 2),
                          arrowprops={'arrowstyle': '->', 'color': '#444444'})
    axis.text(5 * (width + gap) + width / 2, -0.35, 'retrieval: cosine nearest neighbours',
              ha='center', fontsize=8, style='italic')
    left = 6 * (width + gap) - 0.15  # the proxies and the loss exist only while training
    axis.add_patch(
        plt.Rectangle(
            (left, -0.2),
            2 * width + gap + 0.3,
            height + 0.4,
            fill=False,
            linestyle='--',
            edgecolor='#888888',
        )
    )
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
