"""Bad input ends in one clear sentence on stderr, exit status 1, no traceback and nothing half-written."""
import os
import shutil
import urllib.error

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.io import loadmat, savemat

import utils
from runtime import UserError
from conftest import make_car, make_cub, make_sop, write_image
from script_runner import error_sentence, load_script, temporaries

PREFIX = 'cub_googlenet_proxy_anchor_16_no_pretrained_batch_size4'  # the run TRAIN names
TRAIN = ['--data_name', 'cub', '--backbone_type', 'googlenet', '--no_pretrained', '--feature_dim', '16',
         '--batch_size', '4', '--num_workers', '0']


def assert_nothing_prepared(data_path, data_name):
    """No converted image and no index were written."""
    root = os.path.join(data_path, data_name)
    assert not os.path.exists(os.path.join(root, 'uncropped')) or not os.listdir(os.path.join(root, 'uncropped'))
    assert not os.path.exists(utils.index_path(data_path, data_name))
    assert not temporaries(data_path)


def rewrite_cars_annos(root, change):
    """Load cars_annos.mat, let change(annotations) edit or replace the struct array, and save it back."""
    path = os.path.join(root, 'cars_annos.mat')
    annotations = change(loadmat(path)['annotations'])
    savemat(path, {'annotations': annotations})


# ----------------------------------------------------------------------------------------------------------------------
# data_utils.py

def test_missing_data_set_folder(script, tmp_path):
    status, _, err = script('data_utils', '--data_path', tmp_path / 'nowhere', '--data_name', 'car', cwd=tmp_path)
    assert 'nowhere/car is missing' in error_sentence(status, err)
    status, _, err = script('data_utils', '--data_path', tmp_path / 'nowhere', cwd=tmp_path)
    assert 'no data set found under' in error_sentence(status, err)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('data_name, make, name', [('car', make_car, 'cars_annos.mat'), ('cub', make_cub, 'images.txt'),
                                                   ('sop', make_sop, 'Ebay_train.txt')])
def test_missing_annotation_file(script, tmp_path, data_name, make, name):
    os.remove(os.path.join(make(str(tmp_path)), name))
    status, _, err = script('data_utils', '--data_path', tmp_path, '--data_name', data_name, '--workers', 1,
                            cwd=tmp_path)
    line = error_sentence(status, err)
    assert f'{name} is missing' in line and 'download from http' in line
    assert_nothing_prepared(str(tmp_path), data_name)


def truncate(path, fraction=0.5):
    """Cut a file to a fraction of its size, as an interrupted download leaves it."""
    with open(path, 'rb') as file:
        data = file.read()
    with open(path, 'wb') as file:
        file.write(data[:int(len(data) * fraction)])


def drop_field(annotations, field):
    """The struct array without one of its fields."""
    kept = [name for name in annotations.dtype.names if name != field]
    smaller = np.zeros(annotations.shape, dtype=[(name, 'O') for name in kept])
    for name in kept:
        smaller[name] = annotations[name]
    return smaller


def text_class(annotations):
    """The struct array with a class that is a string instead of a number."""
    annotations[0, 0]['class'] = np.array(['seven'])
    return annotations


@pytest.mark.parametrize('damage', ['truncated', 'empty', 'not a mat file', 'no annotations', 'no class field',
                                    'text class'])
def test_malformed_cars_annos(script, tmp_path, damage):
    root = make_car(str(tmp_path))
    path = os.path.join(root, 'cars_annos.mat')
    if damage == 'truncated':
        truncate(path)
    elif damage == 'empty':
        truncate(path, 0)
    elif damage == 'not a mat file':
        with open(path, 'w') as file:
            file.write('<html>404 Not Found</html>\n')
    elif damage == 'no annotations':
        savemat(path, {'class_names': np.array(['a', 'b'], dtype=object)})
    elif damage == 'no class field':
        rewrite_cars_annos(root, lambda annotations: drop_field(annotations, 'class'))
    else:
        rewrite_cars_annos(root, text_class)
    status, _, err = script('data_utils', '--data_path', tmp_path, '--data_name', 'car', '--workers', 1, cwd=tmp_path)
    line = error_sentence(status, err)
    assert 'cars_annos.mat is truncated or malformed' in line and 'download it again' in line
    assert_nothing_prepared(str(tmp_path), 'car')


@pytest.mark.parametrize('file_name, line_number, text, expected', [
    ('images.txt', 2, '2 001.Bird_1/a.jpg extra', 'images.txt is malformed at line 2 (expected 2 fields, found 3)'),
    ('images.txt', 3, '3', 'images.txt is malformed at line 3 (expected 2 fields, found 1)'),
    ('images.txt', 1, '999 001.Bird_1/Bird_1_0000_1.jpg', 'image 999 of'),
    ('image_class_labels.txt', 2, '2 two', "image_class_labels.txt is malformed: 'two' is not a number"),
    ('bounding_boxes.txt', 4, '4 1.0 2.0 x 4.0', "bounding_boxes.txt is malformed: 'x' is not a number"),
])
def test_malformed_cub_text_files(script, tmp_path, file_name, line_number, text, expected):
    path = os.path.join(make_cub(str(tmp_path)), file_name)
    with open(path) as file:
        lines = file.read().splitlines()
    lines[line_number - 1] = text
    with open(path, 'w') as file:
        file.write('\n'.join(lines) + '\n')
    status, _, err = script('data_utils', '--data_path', tmp_path, '--data_name', 'cub', '--workers', 1, cwd=tmp_path)
    line = error_sentence(status, err)
    assert expected in line and 'download the data set again' in line
    assert_nothing_prepared(str(tmp_path), 'cub')


@pytest.mark.parametrize('data_name, make, missing', [('cub', make_cub, 'images/002.Bird_2/Bird_2_0001_5.jpg'),
                                                      ('car', make_car, 'car_ims/000007.jpg'),
                                                      ('sop', make_sop, 'chair_final/111001_1.JPG')])
def test_annotation_names_a_missing_file(script, tmp_path, data_name, make, missing):
    root = make(str(tmp_path))
    os.remove(os.path.join(root, missing))
    status, _, err = script('data_utils', '--data_path', tmp_path, '--data_name', data_name, '--workers', 1,
                            cwd=tmp_path)
    line = error_sentence(status, err)
    assert line.startswith('error: 1 of the 12 images the annotations name do not exist')
    assert os.path.join(root, missing) in line
    assert_nothing_prepared(str(tmp_path), data_name)


def test_unreadable_images_are_all_listed_and_no_index_is_written(script, tmp_path):
    root = make_cub(str(tmp_path))
    folder = os.path.join(root, 'images', '003.Bird_3')
    bad = sorted(os.path.join(folder, name) for name in os.listdir(folder))
    truncate(bad[0])  # a JPEG cut in half
    truncate(bad[1], 0)  # an empty file
    with open(bad[2], 'w') as file:  # an HTML error page saved under the image's name
        file.write('<html>403 Forbidden</html>\n')
    status, out, err = script('data_utils', '--data_path', tmp_path, '--data_name', 'cub', '--workers', 2,
                              cwd=tmp_path)
    line = error_sentence(status, err)
    assert line.startswith('error: 3 images of cub could not be read (listed above)')
    assert '3 unreadable images:' in out and all(path in out for path in bad)
    assert not os.path.exists(utils.index_path(str(tmp_path), 'cub'))
    assert not temporaries(str(tmp_path))
    # every image that was converted is whole, and the next call, with the images fixed, completes
    converted = os.listdir(os.path.join(root, 'uncropped'))
    assert len(converted) == 9 and not any(os.path.basename(path) in converted for path in bad)
    for name in converted:
        with Image.open(os.path.join(root, 'uncropped', name)) as image:
            image.load()
    for k, path in enumerate(bad):
        write_image(path, 3, k)
    status, _, err = script('data_utils', '--data_path', tmp_path, '--data_name', 'cub', '--workers', 2,
                            cwd=tmp_path)
    assert status == 0, err
    assert len(os.listdir(os.path.join(root, 'uncropped'))) == 12
    assert sum(map(len, utils.load_index(str(tmp_path), 'cub')['test'].values())) == 6


# ----------------------------------------------------------------------------------------------------------------------
# train.py

@pytest.mark.parametrize('flags, expected', [
    (['--batch_size', '0'], '--batch_size must be at least 1, not 0'),
    (['--feature_dim', '-8'], '--feature_dim must be at least 1, not -8'),
    (['--recalls', '1,x'], "--recalls must be positive integers separated by commas, like 1,2,4,8, not '1,x'"),
    (['--recalls', '1,0'], "--recalls must be positive integers separated by commas, like 1,2,4,8, not '1,0'"),
    (['--num_epochs', '0'], '--num_epochs must be at least 1, not 0'),
    (['--warm_up', '-1'], '--warm_up must be at least 0, not -1'),
    (['--num_workers', '-2'], '--num_workers must be at least 0, not -2'),
])
def test_flags_out_of_range(script, tmp_path, prepared, flags, expected):
    status, _, err = script('train', '--data_path', prepared, *TRAIN, *flags, cwd=tmp_path)
    assert error_sentence(status, err) == f'error: {expected}'
    assert os.listdir(tmp_path) == []


def test_batch_larger_than_the_training_set(script, tmp_path, prepared):
    status, _, err = script('train', '--data_path', prepared, *TRAIN, '--batch_size', '9', cwd=tmp_path)
    assert error_sentence(status, err) == ('error: --batch_size 9 is larger than the 8 training images of cub; use a '
                                           'smaller --batch_size')
    assert not os.path.exists(tmp_path / 'results')


def test_data_set_not_prepared(script, tmp_path):
    make_cub(str(tmp_path / 'raw'))
    status, _, err = script('train', '--data_path', tmp_path / 'raw', *TRAIN, cwd=tmp_path)
    line = error_sentence(status, err)
    assert line.startswith(f'error: cub is not prepared under {tmp_path / "raw"}')
    assert f'run `python data_utils.py --data_path {tmp_path / "raw"} --data_name cub` first' in line
    assert not os.path.exists(tmp_path / 'results')


@pytest.mark.parametrize('bad, call, epoch, step', [(float('nan'), 4, 2, 2), (float('inf'), 1, 1, 1)])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(script, tmp_path, prepared, monkeypatch, bad, call,
                                                                  epoch, step):
    forward, calls = utils.ProxyAnchorLoss.forward, []

    def poisoned(self, cosines, labels):
        calls.append(None)  # 2 steps per epoch: 8 training images, batches of 4
        loss = forward(self, cosines, labels)
        return loss * bad if len(calls) == call else loss

    monkeypatch.setattr(utils.ProxyAnchorLoss, 'forward', poisoned)
    status, _, err = script('train', '--data_path', prepared, *TRAIN, '--num_epochs', '3', cwd=tmp_path)
    line = error_sentence(status, err)
    assert line.startswith(f'error: the loss became {bad} at epoch {epoch}, step {step}; ')
    if epoch == 1:
        assert 'no checkpoint was written yet' in line and '--resume' not in line
    else:
        assert f'the checkpoint of epoch {epoch - 1} is kept' in line and 'run again with --resume' in line
    results = tmp_path / 'results'
    assert not temporaries(str(tmp_path))
    checkpoint = results / f'{PREFIX}_checkpoint.pth'
    if epoch == 1:
        assert not checkpoint.exists()
        return
    saved = torch.load(checkpoint, weights_only=True)
    assert saved['epoch'] == epoch - 1 and len(saved['statistics']['train_loss']) == epoch - 1
    assert all(torch.isfinite(value).all() for value in saved['model'].values() if value.is_floating_point())
    assert len(pd.read_csv(results / f'{PREFIX}_statistics.csv')) == epoch - 1
    assert (results / f'{PREFIX}_{epoch - 1}_model.pth').exists()
    assert (results / f'{PREFIX}_{epoch - 1}_data_base.pth').exists()


def test_out_of_memory_suggests_a_smaller_batch(script, tmp_path, prepared):
    class OutOfMemory(load_script('train').Watch):
        def started(self, run):  # where the first epoch would allocate its activations
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')

    status, _, err = script('train', '--data_path', prepared, *TRAIN, '--batch_size', '8',
                            cwd=tmp_path, watch=OutOfMemory())
    line = error_sentence(status, err)
    assert 'ran out of memory with --batch_size 8; try a smaller one, such as --batch_size 4' in line
    assert not temporaries(str(tmp_path)) and not list((tmp_path / 'results').glob('*.pth'))


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty TORCH_HOME and no network: any download fails at once, as on a machine without internet."""
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')

    home = tmp_path / 'torch_home'
    monkeypatch.setenv('TORCH_HOME', str(home))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    return os.path.join(home, 'hub', 'checkpoints')


def test_imagenet_weights_unavailable_offline(script, tmp_path, prepared, offline):
    status, _, err = script('train', '--data_path', prepared, *[flag for flag in TRAIN if flag != '--no_pretrained'],
                            cwd=tmp_path)
    line = error_sentence(status, err)
    assert line.startswith('error: the ImageNet weights of googlenet could not be loaded')
    assert f'put googlenet-1378be20.pth in {offline}' in line and '--no_pretrained' in line
    assert not os.path.exists(tmp_path / 'results')


@pytest.mark.parametrize('backbone_type, file_name', [('resnet50', 'resnet50-0676ba61.pth'),
                                                      ('inception', 'bn_inception-52deb4733.pth')])
def test_other_backbones_name_their_weights_offline(offline, backbone_type, file_name):
    from model import Model
    with pytest.raises(UserError) as error:
        Model(backbone_type, 16, 4, pretrained=True)
    message = str(error.value)
    assert f'put {file_name} in {offline}' in message and '--no_pretrained' in message and '\n' not in message


def test_image_spoiled_after_preparation(script, tmp_path, prepared):
    """A prepared image that went bad: one sentence, not the traceback of the DataLoader worker that met it."""
    data = tmp_path / 'data'
    shutil.copytree(prepared, data)
    spoiled = data / 'cub' / 'uncropped' / 'Bird_2_0001_6.jpg'
    spoiled.write_text('not an image any more')
    status, _, err = script('train', '--data_path', data, *TRAIN, '--num_workers', '1', '--num_epochs', '1',
                            cwd=tmp_path)
    assert error_sentence(status, err) == (f'error: cannot read image {spoiled}: it is missing, truncated or not an '
                                           f'image')


def test_resume_from_a_file_that_is_not_a_checkpoint(script, tmp_path, prepared):
    os.makedirs(tmp_path / 'results')
    from model import Model
    torch.save(Model('googlenet', 16, 2, pretrained=False).state_dict(),
               tmp_path / 'results' / f'{PREFIX}_checkpoint.pth')
    status, _, err = script('train', '--data_path', prepared, *TRAIN, '--resume', cwd=tmp_path)
    line = error_sentence(status, err)
    assert line.startswith(f'error: results/{PREFIX}_checkpoint.pth is not a checkpoint train.py wrote (it has no '
                           f'args, epoch, model, optimizer, rng, scheduler, statistics)')


def test_data_base_that_is_not_a_data_base(script, tmp_path):
    torch.save({'weight': torch.zeros(3)}, tmp_path / 'x_2_model.pth')
    status, _, err = script('test', '--data_base', tmp_path / 'x_2_model.pth', cwd=tmp_path)
    assert error_sentence(status, err).startswith(f'error: {tmp_path / "x_2_model.pth"} is not a data base train.py '
                                                  f'wrote (it has no args, proxies, test_features')
    assert not os.path.exists(tmp_path / 'results')


@pytest.mark.parametrize('name, flags, expected', [
    ('train', ['--epochs', '3'], 'unrecognized arguments: --epochs 3 (did you mean --num_epochs?); see python '
                                 'train.py --help'),
    ('train', ['--lr', 'fast'], "argument --lr: invalid float value: 'fast'"),
    ('data_utils', ['--data_nme', 'cub'], '--data_nme cub (did you mean --data_name or --data_path?)'),
    ('data_utils', ['--workers', 'two'], "argument --workers: invalid int value: 'two'"),
    ('test', ['--retrieval-num', '4'], '(did you mean --retrieval_num?)'),
    ('test', ['--retrieval_num'], 'argument --retrieval_num: expected one argument'),
])
def test_every_script_says_a_bad_flag_in_one_sentence(script, tmp_path, name, flags, expected):
    """One argparse base for every script: a bad flag is one sentence and exit status 1, never the usage text, and an
    unknown flag close to a known one is suggested."""
    status, out, err = script(name, *flags, cwd=tmp_path)
    assert expected in error_sentence(status, err) and 'usage:' not in out + err
