"""Bad input ends in one clear sentence on stderr, exit status 1, no traceback, no usage text and
nothing half-written: every script's refusals, a table per script of the command lines it
refuses, then the damaged inputs it meets. A refusal that only a scenario of its own reaches (a
poisoned file, a --resume, a query of a trained run) is tested beside that scenario."""

import glob
import os
import re
import shutil
import urllib.error

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.io import loadmat, savemat

import runs
import utils
from runtime import UserError
from conftest import (
    TINY,
    make_car,
    make_cub,
    make_folder,
    make_inshop,
    make_sop,
    train_in,
    write_image,
)
from script_runner import error_sentence, load_script, temporaries

PREFIX = 'cub_googlenet_proxy_anchor_16_no_pretrained_batch_size4'  # the run TRAIN names
TRAIN = [
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
]


def says(line, expected):
    """Whether an error line is 'error: ' and expected, where '...' in expected stands for any text."""
    return (
        re.fullmatch('error: ' + '.*'.join(map(re.escape, expected.split('...'))), line) is not None
    )


def refused(script, name, *flags, cwd):
    """The error line of a command line a script refuses: one sentence, exit status 1, no usage text."""
    status, out, err = script(name, *flags, cwd=cwd)
    line = error_sentence(status, err)
    assert 'usage:' not in out + err and out == ''
    return line


def assert_nothing_prepared(data_path, data_name):
    """No converted image and no index were written."""
    root = os.path.join(data_path, data_name)
    assert not os.path.exists(os.path.join(root, 'uncropped')) or not os.listdir(
        os.path.join(root, 'uncropped')
    )
    assert not os.path.exists(utils.index_path(data_path, data_name))
    assert not temporaries(data_path)


def rewrite_cars_annos(root, change):
    """Load cars_annos.mat, let change(annotations) edit or replace the struct array, and save it back."""
    path = os.path.join(root, 'cars_annos.mat')
    annotations = change(loadmat(path)['annotations'])
    savemat(path, {'annotations': annotations})


# ----------------------------------------------------------------------------------------------------------------------
# data_utils.py


@pytest.mark.parametrize(
    'flags, expected',
    [
        (
            ['--data_nme', 'cub'],
            'unrecognized arguments: --data_nme cub (did you mean --data_name or --data_path?); '
            'see python data_utils.py --help',
        ),
        (
            ['--workers', 'two'],
            "argument --workers: invalid int value: 'two'; see python data_utils.py --help",
        ),
        (
            ['--data_name', '../elsewhere'],
            "--data_name must name a folder directly under --data_path, not the path "
            "'../elsewhere'; pass its parent as --data_path ... and its folder name as "
            "--data_name elsewhere",
        ),
    ],
)
def test_data_utils_refuses_a_command_line(script, tmp_path, flags, expected):
    line = refused(script, 'data_utils', '--data_path', tmp_path, *flags, cwd=tmp_path)
    assert says(line, expected), line
    assert os.listdir(tmp_path) == []


def test_missing_data_set_folder(script, tmp_path):
    status, _, err = script(
        'data_utils', '--data_path', tmp_path / 'nowhere', '--data_name', 'car', cwd=tmp_path
    )
    assert 'nowhere/car is missing' in error_sentence(status, err)
    status, _, err = script('data_utils', '--data_path', tmp_path / 'nowhere', cwd=tmp_path)
    assert 'no data set found under' in error_sentence(status, err)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    'data_name, make, name',
    [
        ('car', make_car, 'cars_annos.mat'),
        ('cub', make_cub, 'images.txt'),
        ('cub', make_cub, 'image_class_labels.txt'),
        ('cub', make_cub, 'bounding_boxes.txt'),
        ('sop', make_sop, 'Ebay_train.txt'),
        ('sop', make_sop, 'Ebay_test.txt'),
    ],
)
def test_missing_annotation_file(script, tmp_path, data_name, make, name):
    os.remove(os.path.join(make(str(tmp_path)), name))
    status, _, err = script(
        'data_utils',
        '--data_path',
        tmp_path,
        '--data_name',
        data_name,
        '--workers',
        1,
        cwd=tmp_path,
    )
    line = error_sentence(status, err)
    assert f'{name} is missing' in line and 'download from http' in line
    assert_nothing_prepared(str(tmp_path), data_name)


def truncate(path, fraction=0.5):
    """Cut a file to a fraction of its size, as an interrupted download leaves it."""
    with open(path, 'rb') as file:
        data = file.read()
    with open(path, 'wb') as file:
        file.write(data[: int(len(data) * fraction)])


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


@pytest.mark.parametrize(
    'damage',
    ['truncated', 'empty', 'not a mat file', 'no annotations', 'no class field', 'text class'],
)
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
    status, _, err = script(
        'data_utils', '--data_path', tmp_path, '--data_name', 'car', '--workers', 1, cwd=tmp_path
    )
    line = error_sentence(status, err)
    assert 'cars_annos.mat is truncated or malformed' in line and 'download it again' in line
    assert_nothing_prepared(str(tmp_path), 'car')


@pytest.mark.parametrize(
    'file_name, line_number, text, expected',
    [
        (
            'images.txt',
            2,
            '2 001.Bird_1/a.jpg extra',
            'images.txt is malformed at line 2 (expected 2 fields, found 3)',
        ),
        ('images.txt', 3, '3', 'images.txt is malformed at line 3 (expected 2 fields, found 1)'),
        ('images.txt', 1, '999 001.Bird_1/Bird_1_0000_1.jpg', 'image 999 of'),
        (
            'image_class_labels.txt',
            2,
            '2 two',
            "image_class_labels.txt is malformed: 'two' is not a number",
        ),
        (
            'bounding_boxes.txt',
            4,
            '4 1.0 2.0 x 4.0',
            "bounding_boxes.txt is malformed: 'x' is not a number",
        ),
    ],
)
def test_malformed_cub_text_files(script, tmp_path, file_name, line_number, text, expected):
    path = os.path.join(make_cub(str(tmp_path)), file_name)
    with open(path) as file:
        lines = file.read().splitlines()
    lines[line_number - 1] = text
    with open(path, 'w') as file:
        file.write('\n'.join(lines) + '\n')
    status, _, err = script(
        'data_utils', '--data_path', tmp_path, '--data_name', 'cub', '--workers', 1, cwd=tmp_path
    )
    line = error_sentence(status, err)
    assert expected in line and 'download the data set again' in line
    assert_nothing_prepared(str(tmp_path), 'cub')


@pytest.mark.parametrize(
    'data_name, make, missing',
    [
        ('cub', make_cub, 'images/002.Bird_2/Bird_2_0001_5.jpg'),
        ('car', make_car, 'car_ims/000007.jpg'),
        ('sop', make_sop, 'chair_final/111001_1.JPG'),
    ],
)
def test_annotation_names_a_missing_file(script, tmp_path, data_name, make, missing):
    root = make(str(tmp_path))
    os.remove(os.path.join(root, missing))
    status, _, err = script(
        'data_utils',
        '--data_path',
        tmp_path,
        '--data_name',
        data_name,
        '--workers',
        1,
        cwd=tmp_path,
    )
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
    status, out, err = script(
        'data_utils', '--data_path', tmp_path, '--data_name', 'cub', '--workers', 2, cwd=tmp_path
    )
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
    status, _, err = script(
        'data_utils', '--data_path', tmp_path, '--data_name', 'cub', '--workers', 2, cwd=tmp_path
    )
    assert status == 0, err
    assert len(os.listdir(os.path.join(root, 'uncropped'))) == 12
    assert sum(map(len, utils.load_index(str(tmp_path), 'cub')['test'].values())) == 6


# ----------------------------------------------------------------------------------------------------------------------
# data_utils.py: In-shop Clothes Retrieval and labelled image folders


@pytest.mark.parametrize(
    'damage, expected',
    [
        (
            'no partition file',
            'list_eval_partition.txt is missing, so {root} is not a complete inshop data set',
        ),
        (
            'count line',
            'list_eval_partition.txt is malformed: its first line counts 16 images but 15 rows follow',
        ),
        (
            'bad status',
            'list_eval_partition.txt is malformed at line 5 (expected an image name, an item id and train, '
            'query or gallery)',
        ),
        ('no images', '15 of the 15 images the annotations name do not exist'),
    ],
)
def test_inshop_errors(script, tmp_path, damage, expected):
    make_inshop(str(tmp_path))
    root = tmp_path / 'inshop'
    partition = root / 'Eval' / 'list_eval_partition.txt'
    lines = partition.read_text().splitlines()
    if damage == 'no partition file':
        partition.unlink()
    elif damage == 'count line':
        partition.write_text('\n'.join(['16'] + lines[1:]) + '\n')
    elif damage == 'bad status':
        partition.write_text(
            '\n'.join(lines[:4] + [lines[4].replace('train', 'validation')] + lines[5:]) + '\n'
        )
    else:
        os.rename(root / 'Img', root / 'Images')
    status, _, err = script(
        'data_utils', '--data_path', tmp_path, '--data_name', 'inshop', '--workers', 1, cwd=tmp_path
    )
    line = error_sentence(status, err)
    assert expected.format(root=root) in line
    if damage == 'no partition file':
        assert (
            'Eval/list_eval_partition.txt and the images of Img/img.zip' in line
            and 'DeepFashion' in line
        )
    assert not os.path.exists(utils.index_path(str(tmp_path), 'inshop'))


@pytest.mark.parametrize(
    'layout, expected',
    [
        (
            'no folder',
            'there is no folder {root}: put your images there, or name one of the benchmarks car, cub, sop '
            'or inshop; a labelled image folder holds {root}/<class>/<images>',
        ),
        ('no class folders', '{root} holds images but no class folders'),
        (
            'three classes',
            '{root} holds 3 class folders with images, and split in halves that leaves fewer than two '
            'classes on one side: it needs at least four',
        ),
        (
            'one test class',
            '{root}/test holds one class, but each side of the split needs at least two',
        ),
        (
            'one query class',
            '{root}/query holds one class, but each side of the split needs at least two',
        ),
        ('empty split folder', '{root}/test holds no images'),
        ('test beside empty classes', '{root}/test holds no images'),
        (
            'incomplete split',
            '{root} holds the split folders gallery, train, which are neither train/ and test/ nor '
            'train/, query/ and gallery/',
        ),
        ('nothing at all', '{root} holds no images'),
    ],
)
def test_folder_errors(script, tmp_path, layout, expected):
    root = tmp_path / 'mine'
    if layout == 'no class folders':
        for k in range(4):
            write_image(str(root / f'photo_{k}.jpg'), 1, k)
    elif layout == 'three classes':
        make_folder(str(tmp_path), 'mine', ['a', 'b', 'c'])
    elif layout in ('one test class', 'empty split folder', 'test beside empty classes'):
        make_folder(str(tmp_path), 'mine', ['a', 'b'], split='train')
        make_folder(
            str(tmp_path), 'mine', ['c'] if layout == 'one test class' else [], split='test'
        )
        os.makedirs(
            root / 'test' / ('empty class' if layout == 'test beside empty classes' else ''),
            exist_ok=True,
        )
    elif layout == 'one query class':
        make_folder(str(tmp_path), 'mine', ['a', 'b'], split='train')
        make_folder(str(tmp_path), 'mine', ['c'], split='query')
        make_folder(str(tmp_path), 'mine', ['c', 'd'], split='gallery')
    elif layout == 'incomplete split':
        make_folder(str(tmp_path), 'mine', ['a', 'b'], split='train')
        make_folder(str(tmp_path), 'mine', ['c', 'd'], split='gallery')
    elif layout == 'nothing at all':
        os.makedirs(root)
    status, _, err = script(
        'data_utils', '--data_path', tmp_path, '--data_name', 'mine', '--workers', 1, cwd=tmp_path
    )
    assert expected.format(root=root) in error_sentence(status, err)
    assert not os.path.exists(utils.index_path(str(tmp_path), 'mine')) and not temporaries(
        str(tmp_path)
    )


# ----------------------------------------------------------------------------------------------------------------------
# train.py


@pytest.mark.parametrize(
    'flags, expected',
    [
        # sizes and counts
        (['--batch_size', '0'], '--batch_size must be at least 1, not 0'),
        (
            ['--batch_size', '9'],
            '--batch_size 9 is larger than the 8 training images of cub; use a smaller --batch_size',
        ),
        (['--feature_dim', '-8'], '--feature_dim must be at least 1, not -8'),
        (
            ['--recalls', '1,x'],
            "--recalls must be positive integers separated by commas, like 1,2,4,8, not '1,x'",
        ),
        (
            ['--recalls', '1,0'],
            "--recalls must be positive integers separated by commas, like 1,2,4,8, not '1,0'",
        ),
        (['--num_epochs', '0'], '--num_epochs must be at least 1, not 0'),
        (
            ['--metrics', 'recall,precison@5'],
            "--metrics names 'precison@5' (did you mean precision@5?); choose among recall, map@r, "
            "r_precision, nmi, ami, precision@K, map@K, mrr (K a whole number from 1), separated "
            "by commas",
        ),
        (
            ['--metrics', 'map@0'],
            "--metrics names 'map@0' (did you mean map@10?); choose among ... (K a whole number "
            "from 1), separated by commas",
        ),
        (['--warm_up', '-1'], '--warm_up must be at least 0, not -1'),
        (['--num_workers', '-2'], '--num_workers must be at least 0, not -2'),
        # the optimizer and its schedule
        (
            ['--optimizer', 'adam'],
            "argument --optimizer: invalid choice: 'adam' (choose from 'adamp', 'adamw', 'sgd'); "
            "see python train.py --help",
        ),
        (['--lr', '0'], '--lr must be positive, not 0.0'),
        (['--lr', 'nan'], '--lr must be positive, not nan'),
        (
            ['--lr', 'fast'],
            "argument --lr: invalid float value: 'fast'; see python train.py --help",
        ),
        (['--proxy_lr', '-0.01'], '--proxy_lr must be positive, not -0.01'),
        (['--weight_decay', '-0.1'], '--weight_decay must be 0 or more, not -0.1'),
        (['--lr_step', '0'], '--lr_step must be at least 1, not 0'),
        (
            ['--lr_gamma', '0'],
            '--lr_gamma must lie in (0, 1] (1 keeps the learning rate constant), not 0.0',
        ),
        (
            ['--lr_gamma', '1.5'],
            '--lr_gamma must lie in (0, 1] (1 keeps the learning rate constant), not 1.5',
        ),
        # the backbone
        (
            ['--backbone_type', 'vit_tiny'],
            'unknown --backbone_type vit_tiny: choose one of resnet50, inception, googlenet, '
            'vit_small_dino, dinov2_small, dinov2_base, or timm/<name>...',
        ),
        (
            ['--backbone_type', 'timm/no_such_model'],
            'timm has no model no_such_model (from --backbone_type '
            'timm/no_such_model); timm.list_models() lists the names it knows',
        ),
        (
            ['--backbone_type', 'timm/resnet18.no_such_tag'],
            'timm has no weights tagged no_such_tag for resnet18 (from '
            '--backbone_type timm/resnet18.no_such_tag); ...',
        ),
        # the loss
        (['--scale', '0'], '--scale must be positive, not 0.0'),
        (
            ['--loss_name', 'normalized_softmax', '--margin', '0.2'],
            '--margin is a parameter of the proxy_anchor loss '
            'only, not of normalized_softmax; leave it out',
        ),
        (
            ['--loss_name', 'proxy_anchor', '--triplet_margin', '0.2'],
            '--triplet_margin is a parameter of the triplet '
            'loss only, not of proxy_anchor; leave it out',
        ),
        (
            ['--loss_name', 'triplets'],
            'unknown --loss_name triplets (close: triplet, soft_triple): choose one of ...',
        ),
        (
            ['--loss_name', 'triplet', '--loss_args', 'margin=0.2'],
            '--loss_args sets the parameters of a pml/<class name> '
            'loss, not of triplet, whose parameters are flags of '
            'their own (see --help); leave it out',
        ),
        (
            ['--loss_name', 'pml/TripletMarginLoss', '--loss_args', 'margn=0.2'],
            'pml/TripletMarginLoss takes no parameter '
            'margn (from --loss_args); it takes '
            'margin, ...; did you mean margin?',
        ),
        # class-balanced batches
        (
            ['--images_per_class', '1'],
            '--images_per_class must be at least 2 (a class-balanced batch needs pairs of a '
            'class), not 1; leave it out for plainly shuffled batches',
        ),
        (
            ['--images_per_class', '3'],
            '--batch_size 4 is not a multiple of --images_per_class 3; use --batch_size 3 or 6',
        ),
        (
            ['--images_per_class', '2', '--batch_size', '6'],
            '--batch_size 6 with --images_per_class 2 asks for 3 classes '
            'per batch, but the training set of cub has only 2; use a '
            '--batch_size of at most 4 or a larger --images_per_class',
        ),
        # the validation split and the run's name
        (['--val_fraction', '1'], '--val_fraction must lie in [0, 1), not 1.0'),
        (
            ['--val_fraction', '0.2'],
            '--val_fraction 0.2 of the 2 training classes of cub holds out 0 and trains on 2, but '
            'each side needs at least 2 classes; ...',
        ),
        (
            ['--run_name', 'a/b'],
            '--run_name may hold only letters, digits, ".", "-" and "_" (it becomes part of file '
            "names), not 'a/b'",
        ),
        (
            ['--run_name', 'seed2'],
            '--run_name seed2 starts like the part a flag adds to a run name (such as _seed2), so '
            'two different runs could share files; choose a name that starts otherwise',
        ),
        # a flag train.py does not know
        (
            ['--epochs', '3'],
            'unrecognized arguments: --epochs 3 (did you mean --num_epochs?); see python train.py --help',
        ),
    ],
)
def test_train_refuses_a_command_line(script, tmp_path, prepared, flags, expected):
    line = refused(script, 'train', '--data_path', prepared, *TRAIN, *flags, cwd=tmp_path)
    assert says(line, expected), line
    assert os.listdir(tmp_path) == []


def test_data_set_not_prepared(script, tmp_path):
    make_cub(str(tmp_path / 'raw'))
    status, _, err = script('train', '--data_path', tmp_path / 'raw', *TRAIN, cwd=tmp_path)
    line = error_sentence(status, err)
    assert line.startswith(f'error: cub is not prepared under {tmp_path / "raw"}')
    assert (
        f'run `python data_utils.py --data_path {tmp_path / "raw"} --data_name cub` first' in line
    )
    assert not os.path.exists(tmp_path / 'results')


@pytest.mark.parametrize(
    'bad, call, epoch, step', [(float('nan'), 4, 2, 2), (float('inf'), 1, 1, 1)]
)
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    script, tmp_path, prepared, monkeypatch, bad, call, epoch, step
):
    forward, calls = utils.ProxyAnchorLoss.forward, []

    def poisoned(self, cosines, labels):
        calls.append(None)  # 2 steps per epoch: 8 training images, batches of 4
        loss = forward(self, cosines, labels)
        return loss * bad if len(calls) == call else loss

    monkeypatch.setattr(utils.ProxyAnchorLoss, 'forward', poisoned)
    status, _, err = script(
        'train', '--data_path', prepared, *TRAIN, '--num_epochs', '3', cwd=tmp_path
    )
    line = error_sentence(status, err)
    assert line.startswith(f'error: the loss became {bad} at epoch {epoch}, step {step}; ')
    if epoch == 1:
        assert 'no checkpoint was written yet' in line and '--resume' not in line
    else:
        assert (
            f'the checkpoint of epoch {epoch - 1} is kept' in line
            and 'run again with --resume' in line
        )
    results = tmp_path / 'results'
    assert not temporaries(str(tmp_path))
    checkpoint = results / f'{PREFIX}_checkpoint.pth'
    if epoch == 1:
        assert not checkpoint.exists()
        return
    saved = torch.load(checkpoint, weights_only=True)
    assert saved['epoch'] == epoch - 1 and len(saved['statistics']['train_loss']) == epoch - 1
    assert all(
        torch.isfinite(value).all()
        for value in saved['model'].values()
        if value.is_floating_point()
    )
    assert len(pd.read_csv(results / f'{PREFIX}_statistics.csv')) == epoch - 1
    assert (results / f'{PREFIX}_{epoch - 1}_model.pth').exists()
    assert (results / f'{PREFIX}_{epoch - 1}_data_base.pth').exists()


def test_out_of_memory_suggests_a_smaller_batch(script, tmp_path, prepared):
    class OutOfMemory(load_script('train').Watch):
        def started(self, run):  # where the first epoch would allocate its activations
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')

    status, _, err = script(
        'train',
        '--data_path',
        prepared,
        *TRAIN,
        '--batch_size',
        '8',
        cwd=tmp_path,
        watch=OutOfMemory(),
    )
    line = error_sentence(status, err)
    assert (
        'ran out of memory with --batch_size 8; try a smaller one, such as --batch_size 4' in line
    )
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
    status, _, err = script(
        'train',
        '--data_path',
        prepared,
        *[flag for flag in TRAIN if flag != '--no_pretrained'],
        cwd=tmp_path,
    )
    line = error_sentence(status, err)
    assert line.startswith('error: the ImageNet weights of googlenet could not be loaded')
    assert f'put googlenet-1378be20.pth in {offline}' in line and '--no_pretrained' in line
    assert not os.path.exists(tmp_path / 'results')


@pytest.mark.parametrize(
    'backbone_type, file_name',
    [('resnet50', 'resnet50-0676ba61.pth'), ('inception', 'bn_inception-52deb4733.pth')],
)
def test_other_backbones_name_their_weights_offline(offline, backbone_type, file_name):
    from model import Model

    with pytest.raises(UserError) as error:
        Model(backbone_type, 16, 4, pretrained=True)
    message = str(error.value)
    assert (
        f'put {file_name} in {offline}' in message
        and '--no_pretrained' in message
        and '\n' not in message
    )


def test_image_spoiled_after_preparation(script, tmp_path, prepared):
    """A prepared image that went bad: one sentence, not the traceback of the DataLoader worker that met it."""
    data = tmp_path / 'data'
    shutil.copytree(prepared, data)
    spoiled = data / 'cub' / 'uncropped' / 'Bird_2_0001_6.jpg'
    spoiled.write_text('not an image any more')
    status, _, err = script(
        'train',
        '--data_path',
        data,
        *TRAIN,
        '--num_workers',
        '1',
        '--num_epochs',
        '1',
        cwd=tmp_path,
    )
    assert error_sentence(status, err) == (
        f'error: cannot read image {spoiled}: it is missing, truncated or not an ' f'image'
    )


def test_resume_from_a_file_that_is_not_a_checkpoint(script, tmp_path, prepared):
    os.makedirs(tmp_path / 'results')
    from model import Model

    torch.save(
        Model('googlenet', 16, 2, pretrained=False).state_dict(),
        tmp_path / 'results' / f'{PREFIX}_checkpoint.pth',
    )
    status, _, err = script('train', '--data_path', prepared, *TRAIN, '--resume', cwd=tmp_path)
    line = error_sentence(status, err)
    assert line.startswith(
        f'error: results/{PREFIX}_checkpoint.pth is not a checkpoint train.py wrote (it has no '
        f'args, epoch, model, optimizer, rng, scheduler, statistics)'
    )


# ----------------------------------------------------------------------------------------------------------------------
# test.py


@pytest.mark.parametrize(
    'flags, expected',
    [
        (
            ['--retrieval-num', '4'],
            'unrecognized arguments: --retrieval-num 4 (did you mean --retrieval_num?); see '
            'python test.py --help',
        ),
        (
            ['--retrieval_num'],
            'argument --retrieval_num: expected one argument; see python test.py --help',
        ),
        (['--retrieval_num', '0'], '--retrieval_num must be at least 1, not 0'),
    ],
)
def test_test_py_refuses_a_command_line(script, tmp_path, flags, expected):
    assert says(refused(script, 'test', *flags, cwd=tmp_path), expected)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('kind', ['statistics csv', 'text named .pth', 'jpeg'])
def test_a_file_that_is_no_data_base_says_what_it_is(script, tmp_path, kind):
    if kind == 'statistics csv':
        path = tmp_path / f'{PREFIX}_statistics.csv'
        pd.DataFrame({'train_loss': [1.5, 1.2]}, index=pd.RangeIndex(1, 3, name='epoch')).to_csv(
            path
        )
        what = 'a text file'
    elif kind == 'text named .pth':
        path = tmp_path / 'junk.pth'
        path.write_text('not a data base at all\n')
        what = 'a text file'
    else:
        path = tmp_path / 'holiday.jpg'
        write_image(str(path), 1, 0)
        what = 'a JPEG image'
    status, _, err = script(
        'test', '--data_base', path, '--query_img_name', 'any.jpg', cwd=tmp_path
    )
    assert error_sentence(status, err) == (
        f'error: {path} is not a data base but {what}; pass a '
        f'{runs.DATA_BASE_FILE} file train.py wrote'
    )
    assert not (tmp_path / 'results').exists()


def test_data_base_that_is_not_a_data_base(script, tmp_path):
    torch.save({'weight': torch.zeros(3)}, tmp_path / 'x_2_model.pth')
    status, _, err = script('test', '--data_base', tmp_path / 'x_2_model.pth', cwd=tmp_path)
    assert error_sentence(status, err).startswith(
        f'error: {tmp_path / "x_2_model.pth"} is not a data base train.py '
        f'wrote (it has no args, proxies, test_features'
    )
    assert not os.path.exists(tmp_path / 'results')


@pytest.fixture(scope='module')
def run(prepared, tmp_path_factory):
    """(folder, data base name) of a 1-epoch run of timm's test network on 64-pixel crops, for the
    refusals of what test.py is asked to do with it."""
    folder = tmp_path_factory.mktemp('run')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, 'IMAGE_SIZE', 64)
        patch.setattr(utils, 'RESIZE_SIZE', 73)
        train_in(
            folder,
            '--data_path',
            prepared,
            '--data_name',
            'cub',
            '--backbone_type',
            TINY,
            '--no_pretrained',
            '--feature_dim',
            8,
            '--batch_size',
            4,
            '--num_epochs',
            1,
            '--num_workers',
            0,
        )
    (data_base,) = (folder / 'results').glob('*_1_data_base.pth')
    return folder, data_base.name


@pytest.mark.parametrize(
    'flags, expected',
    [
        (['--report', '--report_queries', '0'], '--report_queries must be at least 1, not 0'),
        (
            ['--report', '--gallery', '.'],
            "--report covers the data base's own test set, not a --gallery folder; leave out "
            "one of them",
        ),
    ],
)
def test_test_py_refuses_a_report_it_cannot_write(script, run, flags, expected):
    folder, data_base = run
    assert says(refused(script, 'test', '--data_base', data_base, *flags, cwd=folder), expected)
    assert not list((folder / 'results').glob('*_report'))


@pytest.mark.parametrize('content', ['nothing', 'no images', 'no folder', 'only the query'])
def test_gallery_without_images_is_one_sentence(script, run, tmp_path, content):
    run_folder, data_base = run
    folder = tmp_path / 'empty'
    if content != 'no folder':
        os.makedirs(folder / 'sub')
    if content == 'no images':
        (folder / 'sub' / 'list.csv').write_text('a,b\n')
    query = tmp_path / 'q.jpg'
    write_image(str(query), 2, 0)
    if content == 'only the query':
        query = folder / 'sub' / 'q.jpg'
        write_image(str(query), 2, 0)
    status, _, err = script(
        'test',
        '--query_img_name',
        query,
        '--data_base',
        data_base,
        '--gallery',
        folder,
        cwd=run_folder,
    )
    line = error_sentence(status, err)
    expected = {
        'nothing': f'--gallery {folder} holds no image',
        'no images': f'--gallery {folder} holds no image',
        'no folder': f'--gallery {folder} is not a folder',
        'only the query': f'--gallery {folder} holds no readable image other than the query',
    }[content]
    assert line.startswith(f'error: {expected}')
    assert not glob.glob(str(run_folder / 'results' / '*_queries' / '*' / 'q'))


# ----------------------------------------------------------------------------------------------------------------------
# export.py


@pytest.mark.parametrize(
    'flags, expected',
    [
        ([], 'the following arguments are required: --data_base; see python export.py --help'),
        (
            ['--data_base', 'nowhere_data_base.pth'],
            'data base nowhere_data_base.pth was found neither as given nor '
            'under results/ as a file, run name or prefix of...: train.py '
            'writes results/..., so train a model first',
        ),
        (
            ['--format', 'tflite'],
            "argument --format: invalid choice: 'tflite' (choose from 'onnx', 'torchscript'); see "
            "python export.py --help",
        ),
    ],
)
def test_export_refuses_a_command_line(script, tmp_path, flags, expected):
    assert says(refused(script, 'export', *flags, cwd=tmp_path), expected)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------------------
# reproduce.py


@pytest.mark.parametrize(
    'data_sets, flags, expected',
    [
        (
            ['imagenet'],
            [],
            'no data set found under data: expected a folder car/, cub/, sop/ or inshop/ there ...',
        ),
        (
            ['car'],
            ['--learning_rate', '1'],
            'train.py would refuse the flags --data_path data --learning_rate 1 '
            '(unrecognized arguments: --learning_rate 1); see python train.py --help',
        ),
        (
            ['car'],
            ['--loss_name', 'normalized_softmax'],
            'reproduce.py sets --loss_name itself for each configuration of '
            'the tables from --losses; leave it out',
        ),
        (
            ['car'],
            ['--image_size', '256'],
            'reproduce.py sets --image_size itself for each configuration of the '
            'tables (224, and the sizes published otherwise); leave it out',
        ),
        (
            ['cub'],
            ['--seeds', '1,x'],
            "argument --seeds: --seeds must be integers separated by commas, like 1,2,3, not "
            "'1,x'; see python reproduce.py --help",
        ),
        (
            ['cub'],
            ['--seeds', '1,1'],
            'argument --seeds: --seeds lists a seed twice: 1,1; see python reproduce.py --help',
        ),
        (
            ['cub'],
            ['--seed', '4'],
            'reproduce.py sets --seed itself for each configuration of the tables from --seeds; '
            'leave it out',
        ),
        (
            ['cub'],
            ['--losses', 'triplet,triplet'],
            'argument --losses: --losses lists a loss twice: triplet,triplet; see '
            'python reproduce.py --help',
        ),
        (
            ['cub'],
            ['--losses', 'tripet'],
            'unknown --loss_name tripet (close: triplet): choose one of ...',
        ),
    ],
)
def test_reproduce_refuses_a_command_line(script, tmp_path, data_sets, flags, expected):
    for name in data_sets:
        os.makedirs(tmp_path / 'data' / name)
    assert says(
        refused(script, 'reproduce', '--data_path', 'data', '--dry_run', *flags, cwd=tmp_path),
        expected,
    )
    assert os.listdir(tmp_path) == ['data']
