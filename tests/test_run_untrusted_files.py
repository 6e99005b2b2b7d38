"""Files from others cannot run code, and annotation paths cannot leave the data folder."""

import ast
import glob
import os
import shutil

import numpy as np
import pytest
import torch
from scipy.io import loadmat, savemat

import data_utils
import utils
from runtime import UserError
from conftest import ROOT, make_car, make_cub, make_sop, write_image
from script_runner import error_sentence, temporaries

PREFIX = 'cub_googlenet_proxy_anchor_16_no_pretrained_batch_size4'


class Payload:
    """Unpickling this creates the folder `marker`: the stand-in for any code a malicious .pth would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def poisoned_pth(path, marker, content):
    """Save `content` with a Payload inside, and check that an unsafe torch.load really runs it."""
    torch.save({**content, 'extra': Payload(str(marker))}, path)
    torch.load(path, weights_only=False)
    assert os.path.isdir(
        marker
    ), 'the payload did not run under an unsafe load, so the test would prove nothing'
    os.rmdir(marker)


def test_test_py_refuses_a_poisoned_data_base(script, tmp_path):
    marker = tmp_path / 'payload_ran'
    poisoned_pth(
        tmp_path / 'shared_data_base.pth',
        marker,
        {
            'test_images': ['a.jpg'],
            'test_labels': torch.zeros(1),
            'test_features': torch.zeros(1, 4),
        },
    )
    status, _, err = script(
        'test',
        '--data_base',
        tmp_path / 'shared_data_base.pth',
        '--query_img_name',
        'a.jpg',
        cwd=tmp_path,
    )
    line = error_sentence(status, err)
    assert line.startswith(f'error: refused to load data base {tmp_path / "shared_data_base.pth"}')
    assert not marker.exists() and not os.path.exists(tmp_path / 'results')


def test_test_py_refuses_a_poisoned_model_beside_the_data_base(script, tmp_path):
    from model import Model

    images = []
    for k in range(3):
        images.append(str(tmp_path / f'{k}.jpg'))
        write_image(images[-1], 1, k)
    model = Model('googlenet', 8, 2, pretrained=False)
    torch.save(
        {
            'test_images': images,
            'test_labels': torch.zeros(3, dtype=torch.long),
            'test_features': torch.randn(3, 8),
            'proxies': torch.randn(2, 8),
            'args': {'backbone_type': 'googlenet', 'feature_dim': 8},
        },
        tmp_path / 'x_1_data_base.pth',
    )
    marker = tmp_path / 'payload_ran'
    poisoned_pth(tmp_path / 'x_1_model.pth', marker, model.state_dict())
    query = str(tmp_path / 'my_photo.png')
    write_image(query, 2, 0)
    status, _, err = script(
        'test',
        '--data_base',
        tmp_path / 'x_1_data_base.pth',
        '--query_img_name',
        query,
        cwd=tmp_path,
    )
    assert error_sentence(status, err).startswith(
        f'error: refused to load model {tmp_path / "x_1_model.pth"}'
    )
    assert not marker.exists() and not os.path.exists(tmp_path / 'results')


def test_resume_refuses_a_poisoned_checkpoint(script, tmp_path, prepared):
    marker = tmp_path / 'payload_ran'
    os.makedirs(tmp_path / 'results')
    checkpoint = tmp_path / 'results' / f'{PREFIX}_checkpoint.pth'
    poisoned_pth(checkpoint, marker, {'epoch': 1, 'args': {}})
    status, _, err = script(
        'train',
        '--data_path',
        prepared,
        '--data_name',
        'cub',
        '--backbone_type',
        'googlenet',
        '--no_pretrained',
        '--feature_dim',
        '16',
        '--batch_size',
        '4',
        '--num_workers',
        '0',
        '--resume',
        cwd=tmp_path,
    )
    line = error_sentence(status, err)
    assert line.startswith(f'error: refused to load checkpoint results/{PREFIX}_checkpoint.pth')
    assert not marker.exists() and os.listdir(tmp_path / 'results') == [f'{PREFIX}_checkpoint.pth']


def test_train_refuses_a_poisoned_data_index(script, tmp_path, prepared):
    data = tmp_path / 'data'
    shutil.copytree(prepared, data)
    marker = tmp_path / 'payload_ran'
    poisoned_pth(utils.index_path(str(data), 'cub'), marker, {'train': {}, 'test': {}})
    status, _, err = script(
        'train', '--data_path', data, '--data_name', 'cub', '--no_pretrained', cwd=tmp_path
    )
    assert error_sentence(status, err).startswith('error: refused to load data index')
    assert not marker.exists()


def test_truncated_pth_is_one_sentence(script, tmp_path):
    torch.save({'test_features': torch.randn(100, 16)}, tmp_path / 'cut_data_base.pth')
    with open(tmp_path / 'cut_data_base.pth', 'r+b') as file:
        file.truncate(os.path.getsize(tmp_path / 'cut_data_base.pth') // 2)
    status, _, err = script('test', '--data_base', tmp_path / 'cut_data_base.pth', cwd=tmp_path)
    line = error_sentence(status, err)
    assert line.startswith(f'error: could not read data base {tmp_path / "cut_data_base.pth"}')
    assert 'write it again' in line


def test_every_load_of_a_pth_is_weights_only():
    """Static check of the scripts: torch.load always with weights_only=True; no pickle, np.load or read_pickle."""
    sources = glob.glob(os.path.join(ROOT, '*.py'))
    assert {'train.py', 'test.py', 'utils.py', 'data_utils.py'} <= {
        os.path.basename(path) for path in sources
    }
    loads = 0
    for path in sources:
        with open(path) as file:
            tree = ast.parse(file.read())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name == 'torch.load':
                loads += 1
                options = {keyword.arg: keyword.value for keyword in node.keywords}
                assert (
                    'weights_only' in options and ast.literal_eval(options['weights_only']) is True
                ), f'{path}:{node.lineno}'
            assert name not in (
                'pickle.load',
                'pickle.loads',
                'np.load',
                'numpy.load',
                'pd.read_pickle',
            ), f'{path}:{node.lineno} calls {name}'
    assert loads >= 1


# ----------------------------------------------------------------------------------------------------------------------
# annotation paths stay inside the data folder


def outside_file(tmp_path):
    """A real image just outside the data folder, so a refusal cannot be mistaken for a missing file."""
    path = tmp_path / 'outside.jpg'
    write_image(str(path), 1, 0)
    return path


def edit_line(path, number, text):
    """Replace line `number` (1-based) of a text file."""
    with open(path) as file:
        lines = file.read().splitlines()
    lines[number - 1] = text
    with open(path, 'w') as file:
        file.write('\n'.join(lines) + '\n')


@pytest.mark.parametrize('entry', ['../../../outside.jpg', 'ABSOLUTE'])
def test_images_txt_entry_outside_the_data_folder(script, tmp_path, entry):
    outside = outside_file(tmp_path)
    entry = str(outside) if entry == 'ABSOLUTE' else entry
    root = make_cub(str(tmp_path / 'data'))
    assert os.path.isfile(os.path.join(root, 'images', entry))  # the path resolves to a real file
    edit_line(os.path.join(root, 'images.txt'), 2, f'2 {entry}')
    status, _, err = script(
        'data_utils',
        '--data_path',
        tmp_path / 'data',
        '--data_name',
        'cub',
        '--workers',
        1,
        cwd=tmp_path,
    )
    line = error_sentence(status, err)
    assert f'images.txt names {os.path.join("images", entry)!r}, which lies outside {root}' in line
    assert not os.path.exists(os.path.join(root, 'uncropped')) and not temporaries(str(tmp_path))


def test_cars_annos_entry_outside_the_data_folder(script, tmp_path):
    outside_file(tmp_path)
    root = make_car(str(tmp_path / 'data'))
    path = os.path.join(root, 'cars_annos.mat')
    annotations = loadmat(path)['annotations']
    annotations[0, 3]['relative_im_path'] = np.array(['../../outside.jpg'])
    savemat(path, {'annotations': annotations})
    status, _, err = script(
        'data_utils',
        '--data_path',
        tmp_path / 'data',
        '--data_name',
        'car',
        '--workers',
        1,
        cwd=tmp_path,
    )
    line = error_sentence(status, err)
    assert f"cars_annos.mat names '../../outside.jpg', which lies outside {root}" in line
    assert not os.path.exists(os.path.join(root, 'uncropped'))


@pytest.mark.parametrize('split', ['train', 'test'])
def test_ebay_entry_outside_the_data_folder(script, tmp_path, split):
    outside_file(tmp_path)
    root = make_sop(str(tmp_path / 'data'))
    path = os.path.join(root, f'Ebay_{split}.txt')
    with open(path) as file:
        second = file.read().splitlines()[1].split()
    edit_line(path, 2, ' '.join(second[:3] + ['bicycle_final/../../../outside.jpg']))
    status, _, err = script(
        'data_utils',
        '--data_path',
        tmp_path / 'data',
        '--data_name',
        'sop',
        '--workers',
        1,
        cwd=tmp_path,
    )
    line = error_sentence(status, err)
    assert (
        f"Ebay_{split}.txt names 'bicycle_final/../../../outside.jpg', which lies outside {root}"
        in line
    )
    assert not os.path.exists(os.path.join(root, 'uncropped'))


def test_a_sibling_folder_with_the_same_prefix_is_outside(tmp_path):
    """'../cub_evil/x.jpg' from root 'cub' shares the prefix 'cub' as text but is outside it."""
    root = str(tmp_path / 'cub')
    with pytest.raises(UserError, match='lies outside'):
        data_utils.inside(root, '../cub_evil/x.jpg', 'images.txt')
    assert data_utils.inside(root, 'images/a/../b.jpg', 'images.txt') == os.path.join(
        root, 'images', 'b.jpg'
    )
