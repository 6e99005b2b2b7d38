"""Files a run wrote before runs.py existed still work: a data base, its model and its checkpoint,
written here as that code wrote them (utils.make_data_base and train.save_epoch), and an older data
base without data_root and weights_sha256 beside an older checkpoint without the loss's state, are
searched by test.py (a query in the data base, one outside it, --report, --gallery), exported by
export.py and resumed by train.py --resume.

Nothing here calls the code that writes these files: the dicts are spelt out, and the weights'
digest is computed again from its definition."""

import hashlib
import json
import os
import random

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from adamp import AdamP
from PIL import Image

from model import Model
from script_runner import query_folder
from utils import ImageReader

PREFIX = 'cub_googlenet_proxy_anchor_8_no_pretrained_batch_size4_warm_up1'
TRAIN = [
    '--data_name',
    'cub',
    '--backbone_type',
    'googlenet',
    '--no_pretrained',
    '--feature_dim',
    8,
    '--batch_size',
    4,
    '--warm_up',
    1,
    '--num_workers',
    0,
]
# vars(args) of train.py's parser for TRAIN, as the data base and the checkpoint stored it, but for
# data_path, the run's own
ARGS = {
    'data_name': 'cub',
    'crop_type': 'uncropped',
    'cache_images': False,
    'backbone_type': 'googlenet',
    'feature_dim': 8,
    'no_pretrained': True,
    'loss_name': 'proxy_anchor',
    'loss_args': '',
    'scale': 32.0,
    'margin': 0.1,
    'proxy_nca_scale': 32.0,
    'soft_triple_centers': 10,
    'soft_triple_la': 20.0,
    'soft_triple_gamma': 0.1,
    'soft_triple_margin': 0.01,
    'arcface_margin': 28.6,
    'arcface_scale': 64.0,
    'cosface_margin': 0.35,
    'cosface_scale': 64.0,
    'ms_alpha': 2.0,
    'ms_beta': 50.0,
    'ms_base': 0.5,
    'ms_epsilon': 0.1,
    'triplet_margin': 0.1,
    'contrastive_pos_margin': 0.0,
    'contrastive_neg_margin': 0.5,
    'circle_m': 0.4,
    'circle_gamma': 80.0,
    'supcon_temperature': 0.1,
    'optimizer': 'adamp',
    'lr': 0.0001,
    'proxy_lr': 0.01,
    'weight_decay': 0.0,
    'lr_step': 5,
    'lr_gamma': 0.5,
    'batch_size': 4,
    'images_per_class': 0,
    'num_epochs': 1,
    'warm_up': 1,
    'seed': 1,
    'amp': False,
    'num_workers': 0,
    'resume': False,
    'tensorboard': False,
    'recalls': '1,2,4,8',
    'val_fraction': 0.0,
    'run_name': None,
}
# an older run's settings: from before --crop_type, --recalls and most recipe flags existed
OLDER_ARGS = {
    key: ARGS[key]
    for key in (
        'data_name',
        'backbone_type',
        'feature_dim',
        'no_pretrained',
        'loss_name',
        'lr',
        'batch_size',
        'num_epochs',
        'warm_up',
        'seed',
    )
}
METRICS = ['recall@1', 'recall@2', 'recall@4', 'recall@8', 'map@r', 'r_precision']
COLUMNS = ['train_loss', 'train_accuracy'] + [f'test_{metric}' for metric in METRICS]

pytestmark = pytest.mark.usefixtures('without_onednn')


def digest(state_dict):
    """The data base's weights_sha256: SHA-256 over each tensor's 'name dtype shape' line and its
    bytes."""
    sha = hashlib.sha256()
    for name, tensor in state_dict.items():
        sha.update(f'{name} {tensor.dtype} {tuple(tensor.shape)}\n'.encode())
        sha.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def write_run(folder, data_path, older=False):
    """results/<PREFIX>_1_data_base.pth, _1_model.pth, _checkpoint.pth and _statistics.csv (and
    .png) in folder as the earlier code wrote them after epoch 1 of TRAIN; older: a data base
    without data_root and weights_sha256, and a checkpoint without the loss's state, both with
    OLDER_ARGS. Returns the data base."""
    torch.manual_seed(0)
    model = Model('googlenet', 8, 2, pretrained=False).eval()
    args = dict(OLDER_ARGS if older else ARGS, data_path=data_path)
    proxies = F.normalize(model.proxies.weight.detach(), dim=-1)
    data_base = {'proxies': proxies, 'args': args, 'epoch': 1}
    if not older:
        data_base.update(
            data_root=os.path.abspath(data_path), weights_sha256=digest(model.state_dict())
        )
    for split in ('train', 'test'):
        data = ImageReader(data_path, 'cub', split)
        with torch.no_grad():
            features = model.embed(torch.stack([data[i][0] for i in range(len(data))]))
        data_base.update(
            {
                f'{split}_images': [os.path.abspath(path) for path in data.images],
                f'{split}_labels': torch.tensor(data.labels),
                f'{split}_features': features,
            }
        )
    others = list(model.backbone.parameters()) + list(model.embedding.parameters())
    proxy_weights = list(model.proxies.parameters())
    optimizer = AdamP([{'params': others}, {'params': proxy_weights, 'lr': 1e-2}], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    optimizer.step()  # without gradients it changes nothing; the schedule steps after it
    scheduler.step()
    key, state, position, has_gauss, gauss = np.random.get_state()
    numpy = [key, torch.from_numpy(state.astype(np.int64)), position, has_gauss, gauss]
    rng = {'python': random.getstate(), 'torch': torch.get_rng_state(), 'cuda': [], 'numpy': numpy}
    statistics = {column: [0.5] for column in COLUMNS}
    checkpoint = {
        'model': model.state_dict(),
        'loss': {},
        'optimizer': optimizer.state_dict(),
        'scheduler': scheduler.state_dict(),
        'epoch': 1,
        'args': args,
        'rng': rng,
        'statistics': statistics,
    }
    if older:
        del checkpoint['loss']
    results = folder / 'results'
    results.mkdir(parents=True)
    torch.save(model.state_dict(), results / f'{PREFIX}_1_model.pth')
    torch.save(data_base, results / f'{PREFIX}_1_data_base.pth')
    torch.save(checkpoint, results / f'{PREFIX}_checkpoint.pth')
    epochs = pd.RangeIndex(1, 2, name='epoch')
    pd.DataFrame(statistics, index=epochs).to_csv(results / f'{PREFIX}_statistics.csv')
    Image.new('RGB', (40, 30)).save(results / f'{PREFIX}_statistics.png')  # the curves
    return data_base


@pytest.fixture(params=[False, True], ids=['today', 'older'])
def earlier(request, prepared, tmp_path):
    """(working folder, data base dict) of an earlier run written into tmp_path/work."""
    work = tmp_path / 'work'
    return work, write_run(work, prepared, older=request.param)


def photo(path, seed):
    """A PNG of random smooth colours, in no data base."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((90, 70), Image.BILINEAR).save(path, format='PNG')
    return str(path)


def test_test_py_searches_an_earlier_data_base(script, earlier, tmp_path, small_crops):
    work, data_base = earlier
    name = f'{PREFIX}_1_data_base.pth'
    known = data_base['test_images'][1]
    status, out, err = script(
        'test', '--data_base', name, '--query_img_name', known, '--retrieval_num', 3, cwd=work
    )
    assert status == 0, err
    assert 'nearest images, ' in out and 'of the same class' in out
    query_name = os.path.splitext(os.path.basename(known))[0]
    frame = pd.read_csv(query_folder(work / 'results', query_name) / 'results.csv')
    features = F.normalize(data_base['test_features'], dim=1)
    similarities = features @ features[1]
    similarities[1] = -2  # the query is not its own result
    expected = [data_base['test_images'][i] for i in similarities.topk(3).indices]
    assert frame['path'].tolist() == expected

    # a photo outside the data base is embedded by the model beside it: an earlier digest matches
    status, out, err = script(
        'test', '--data_base', name, '--query_img_name', photo(tmp_path / 'mine.png', 0), cwd=work
    )
    assert status == 0, err
    assert (query_folder(work / 'results', 'mine') / 'results.csv').is_file()

    album = tmp_path / 'album'
    query = photo(album / 'a.png', 1)
    photo(album / 'b.png', 2)
    photo(album / 'c.png', 3)
    status, out, err = script(
        'test', '--data_base', name, '--query_img_name', query, '--gallery', album, cwd=work
    )
    assert status == 0, err
    found = pd.read_csv(query_folder(work / 'results', 'a') / 'results.csv')['path']
    assert sorted(found) == [str(album / 'b.png'), str(album / 'c.png')]


def test_test_py_reports_on_an_earlier_data_base(script, earlier):
    work, data_base = earlier
    status, out, err = script(
        'test', '--data_base', f'{PREFIX}_1_data_base.pth', '--report', cwd=work
    )
    assert status == 0, err
    report = work / 'results' / f'{PREFIX}_1_data_base_report'
    assert (report / 'index.html').is_file()
    summary = json.loads((report / 'summary.json').read_text())
    assert summary['epoch'] == 1 and summary['missing'] == []  # the curves and every picture
    assert list(summary['metrics']) == METRICS
    classes = pd.read_csv(report / 'classes.csv', dtype={'class': str})
    assert sorted(classes['class']) == ['3', '4']  # the index's class ids, read under the data root


def test_export_py_exports_an_earlier_run(script, earlier):
    work, data_base = earlier
    status, out, err = script('export', '--data_base', f'{PREFIX}_1_data_base.pth', cwd=work)
    assert status == 0, err
    assert 'ONNX Runtime agrees with PyTorch on 3 test images of the data base' in out
    description = json.loads((work / 'results' / f'{PREFIX}_1.json').read_text())
    assert description['backbone_type'] == 'googlenet' and description['feature_dim'] == 8
    assert description['epoch'] == 1 and description['args']['data_name'] == 'cub'
    assert (work / 'results' / f'{PREFIX}_1.onnx').is_file()


def test_train_py_resumes_an_earlier_checkpoint(script, earlier, prepared, quick_runs):
    work, data_base = earlier
    status, out, err = script(
        'train', '--data_path', prepared, *TRAIN, '--num_epochs', 2, '--resume', cwd=work
    )
    assert status == 0, err
    assert f'resuming results/{PREFIX}_checkpoint.pth after epoch 1' in out
    frame = pd.read_csv(work / 'results' / f'{PREFIX}_statistics.csv', index_col='epoch')
    assert list(frame.index) == [1, 2] and list(frame.columns) == COLUMNS
    assert frame.loc[1].tolist() == [0.5] * len(COLUMNS)  # epoch 1 as the earlier run wrote it
    checkpoint = torch.load(work / 'results' / f'{PREFIX}_checkpoint.pth', weights_only=True)
    assert checkpoint['epoch'] == 2
    names = sorted(os.listdir(work / 'results'))
    assert f'{PREFIX}_2_data_base.pth' in names and f'{PREFIX}_1_data_base.pth' not in names
