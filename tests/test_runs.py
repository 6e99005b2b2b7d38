"""runs.py: the data base record and the checkpoint, each written and read back, and each refusal
one sentence."""

import hashlib
import os

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import runs
from conftest import TINY
from model import Model
from runs import DataBase
from runtime import UserError

RUN = {
    'data_path': 'data',
    'data_name': 'cub',
    'crop_type': 'cropped',
    'backbone_type': TINY,
    'feature_dim': 8,
    'loss_name': 'proxy_anchor',
    'recalls': '1,10',
    'seed': 2,
    'image_size': 224,
}
# the recipe of RUN as train.py hands it to load_checkpoint: {flag: (value, default)}
RECIPE = {
    'data_name': ('cub', 'car'),
    'crop_type': ('cropped', 'uncropped'),
    'feature_dim': (8, 512),
    'seed': (2, 1),
    'amp': (False, False),
}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """tmp_path as the working folder: results/ goes there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def splits(root, gallery=False):
    """{split: (image paths, labels, features)} of a made-up run under root: 3 train, 2 test (and 4
    gallery) images."""
    made = {'train': 3, 'test': 2, **({'gallery': 4} if gallery else {})}
    return {
        name: (
            [os.path.join(root, 'cub', name, f'{k}.jpg') for k in range(count)],
            list(range(count)),
            torch.randn(count, 8),
        )
        for name, count in made.items()
    }


def weights():
    """The state dict of a small Model, the same at every call."""
    torch.manual_seed(0)
    return Model(TINY, 8, 2, pretrained=False).state_dict()


def test_a_data_base_round_trips_in_the_files_format(in_tmp):
    made = splits('data', gallery=True)
    proxies = F.normalize(torch.randn(2, 8), dim=-1)
    data_base = runs.new_data_base(made, proxies, 3, 'data', weights(), RUN)
    assert data_base.root == str(in_tmp / 'data')
    assert data_base.test.images == [str(in_tmp / path) for path in made['test'][0]]  # absolute
    assert data_base.test.labels.dtype == torch.int64 and data_base.searched is data_base.gallery
    data_base.save('results/x_3_data_base.pth')

    saved = torch.load('results/x_3_data_base.pth', weights_only=True)  # the file's own format
    assert set(saved) == {'proxies', 'args', 'epoch', 'data_root', 'weights_sha256'} | {
        f'{split}_{part}' for split in made for part in ('images', 'labels', 'features')
    }
    assert saved['args'] == RUN and saved['epoch'] == 3
    assert saved['data_root'] == str(in_tmp / 'data')
    assert saved['weights_sha256'] == runs.weights_sha256(weights())
    for split, (_, labels, features) in made.items():
        assert saved[f'{split}_labels'].tolist() == labels
        assert torch.equal(saved[f'{split}_features'], features)

    loaded = DataBase.load('results/x_3_data_base.pth')
    assert loaded.run == RUN and loaded.epoch == 3
    assert loaded.weights_sha256 == data_base.weights_sha256
    for name in ('train', 'test', 'gallery'):
        ours, theirs = getattr(loaded, name), getattr(data_base, name)
        assert ours.images == theirs.images and torch.equal(ours.labels, theirs.labels)
        assert torch.equal(ours.features, theirs.features)
    assert (
        loaded.backbone_type,
        loaded.feature_dim,
        loaded.data_name,
        loaded.crop_type,
        loaded.recalls,
    ) == (TINY, 8, 'cub', 'cropped', '1,10')


def test_an_older_data_base_reads_with_the_defaults_of_its_time(in_tmp):
    """Without data_root (paths below the run's --data_path), weights_sha256, --crop_type, --recalls
    and a gallery."""
    made = splits('data')
    older = {
        'proxies': torch.zeros(2, 8),
        'epoch': 1,
        'args': {'data_path': 'data', 'data_name': 'cub', 'backbone_type': TINY, 'feature_dim': 8},
    }
    for split, (images, labels, features) in made.items():
        older.update(
            {
                f'{split}_images': images,
                f'{split}_labels': torch.tensor(labels),
                f'{split}_features': features,
            }
        )
    torch.save(older, 'old.pth')
    data_base = DataBase.load('old.pth')
    assert data_base.root == 'data' and data_base.weights_sha256 is None
    assert data_base.gallery is None and data_base.searched is data_base.test
    assert (data_base.crop_type, data_base.recalls) == ('uncropped', '1,2,4,8')
    assert data_base.test.images == made['test'][0]
    moved = data_base.moved_to(in_tmp / 'elsewhere')
    assert moved.root == str(in_tmp / 'elsewhere')
    assert moved.test.images == [
        str(in_tmp / 'elsewhere' / 'cub' / 'test' / f'{k}.jpg') for k in range(2)
    ]
    assert moved.train.images[0] == str(in_tmp / 'elsewhere' / 'cub' / 'train' / '0.jpg')


@pytest.mark.parametrize(
    'content, expected',
    [
        ({'test_images': []}, 'it has no args, proxies, test_features, test_labels'),
        ([1, 2], 'it has no args, proxies, test_features, test_images, test_labels'),
    ],
)
def test_what_is_no_data_base_is_refused_by_what_it_lacks(in_tmp, content, expected):
    torch.save(content, 'x.pth')
    refusal = f'x.pth is not a data base train.py wrote \\({expected}\\); pass a '
    with pytest.raises(UserError, match=refusal):
        DataBase.load('x.pth')
    with pytest.raises(
        UserError, match='data base nowhere.pth was found neither as given nor ' 'under results/'
    ):
        DataBase.find('nowhere.pth')


def test_a_data_base_is_found_as_given_or_under_results(in_tmp):
    data_base = runs.new_data_base(splits('data'), torch.zeros(2, 8), 1, 'data', {}, RUN)
    data_base.save('results/x_1_data_base.pth')
    assert DataBase.find('x_1_data_base.pth') == os.path.join('results', 'x_1_data_base.pth')
    path = str(in_tmp / 'results' / 'x_1_data_base.pth')
    assert DataBase.open(path)[0].root == str(in_tmp / 'data')
    opened, found = DataBase.open(path, data_path='moved')
    assert found == path and opened.root == str(in_tmp / 'moved')


def test_the_short_name_train_prints_finds_that_run_alone(in_tmp):
    os.makedirs('results')
    for name in ('zz9_a_b_3_data_base.pth', 'zz9_a_b_2_data_base.pth', 'zz9_c_1_data_base.pth'):
        open(os.path.join('results', name), 'w').close()
    assert runs.short_name('zz9_a_b') == 'zz9_a' and runs.short_name('zz9_c') == 'zz9_c'
    assert DataBase.find('zz9_a') == os.path.join('results', 'zz9_a_b_3_data_base.pth')
    os.remove(os.path.join('results', 'zz9_c_1_data_base.pth'))
    assert runs.short_name('zz9_a_b') == 'zz9'


def test_missing_images_are_named_with_where_they_were_looked_for(in_tmp):
    data_base = runs.new_data_base(splits('data'), torch.zeros(2, 8), 1, 'data', {}, RUN)
    with pytest.raises(UserError) as error:
        data_base.check_images_exist('x.pth')
    assert str(error.value) == (
        f'the images of data base x.pth are not under {in_tmp / "data"}, where it was trained '
        f'(there is no {in_tmp / "data" / "cub" / "test" / "0.jpg"}); if they moved, pass the '
        f'folder that now holds cub/ as --data_path'
    )
    for path in data_base.test.images:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, 'w').close()
    data_base.check_images_exist('x.pth')  # the split searched is there: the training one is not


def test_weights_digest_is_sha256_of_names_dtypes_shapes_and_bytes():
    state = {'a': torch.tensor([1.0, 2.0]), 'b': torch.tensor([[3]], dtype=torch.int8)}
    expected = hashlib.sha256(
        b'a torch.float32 (2,)\n'
        + state['a'].numpy().tobytes()
        + b'b torch.int8 (1, 1)\n'
        + state['b'].numpy().tobytes()
    )
    assert runs.weights_sha256(state) == expected.hexdigest()


def test_load_model_gives_the_weights_beside_the_data_base_or_one_sentence(in_tmp):
    saved = weights()
    data_base = runs.new_data_base(splits('data'), torch.zeros(2, 8), 1, 'data', saved, RUN)
    path = 'results/x_1_data_base.pth'
    with pytest.raises(
        UserError,
        match='^data base results/x_1_data_base.pth has no model '
        'results/x_1_model.pth beside it, which embeds images',
    ):
        runs.load_model(data_base, path)
    os.makedirs('results')
    torch.save(saved, 'results/x_1_model.pth')
    model, model_path = runs.load_model(data_base, path)
    assert model_path == 'results/x_1_model.pth' and not model.training
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())
    torch.save(
        {name: value + 1 if value.is_floating_point() else value for name, value in saved.items()},
        'results/x_1_model.pth',
    )
    with pytest.raises(
        UserError, match='holds other weights than those data base ' 'results/x_1_data_base.pth was'
    ):
        runs.load_model(data_base, path)
    runs.load_model(data_base._replace(weights_sha256=None), path)  # an older data base: no digest
    with pytest.raises(
        UserError,
        match=f'does not match the model data base {path} describes ' f'\\({TINY}, 16-d\\)',
    ):
        runs.load_model(data_base._replace(run=dict(RUN, feature_dim=16)), path)


def test_run_names_show_each_flag_off_its_default():
    named = [
        ('margin', 0.2, 0.1),
        ('lr', 1e-4, 1e-4),
        ('amp', True, False),
        ('lr_step', 10, 5),
        ('scale', 64.0, 32.0),
        ('proxy_lr', 0.00012345678, 0.01),
    ]
    assert runs.run_name('car', 'resnet50', 'proxy_anchor', 512) == 'car_resnet50_proxy_anchor_512'
    assert runs.run_name('cub', 'timm/resnet18', 'pml/ArcFaceLoss', 64, named, 'try2') == (
        'cub_timm-resnet18_pml-ArcFaceLoss_64_margin0.2_amp_lr_step10_scale64'
        '_proxy_lr0.00012345678_try2'
    )


def save(epoch, states=None):
    """runs.save_epoch of a made-up run named x in the working folder; returns its statistics."""
    saved = weights()
    data_base = runs.new_data_base(splits('data'), torch.zeros(2, 8), epoch, 'data', saved, RUN)
    statistics = {'train_loss': [1.0] * epoch, 'train_accuracy': [float('nan')] * epoch}
    states = states or {'loss': {}, 'optimizer': {}, 'scheduler': {}}
    runs.save_epoch('x', epoch, statistics, saved, data_base, states)
    return statistics


def test_an_epoch_writes_its_files_and_the_checkpoint_reads_back(in_tmp, monkeypatch):
    monkeypatch.setattr(runs, 'plot_statistics', lambda frame, path: open(path, 'w').close())
    save(1)
    states = {'loss': {'w': torch.ones(2)}, 'optimizer': {'lr': 3}, 'scheduler': {'step': 2}}
    statistics = save(2, states)
    assert sorted(os.listdir('results')) == [  # epoch 1's model and data base are gone
        'x_2_data_base.pth',
        'x_2_model.pth',
        'x_checkpoint.pth',
        'x_statistics.csv',
        'x_statistics.png',
    ]
    assert open('results/x_statistics.csv').read().splitlines() == [
        'epoch,train_loss,train_accuracy',
        '1,1.0,n/a',
        '2,1.0,n/a',
    ]
    checkpoint = runs.load_checkpoint(runs.checkpoint_path('x'), RECIPE, 3)
    assert set(checkpoint) == runs.CHECKPOINT_KEYS | {'loss'}
    assert checkpoint['epoch'] == 2 and checkpoint['args'] == RUN
    assert checkpoint['optimizer'] == {'lr': 3} and checkpoint['scheduler'] == {'step': 2}
    assert torch.equal(checkpoint['loss']['w'], torch.ones(2))
    pd.testing.assert_frame_equal(pd.DataFrame(checkpoint['statistics']), pd.DataFrame(statistics))
    assert set(checkpoint['rng']) == {'python', 'torch', 'cuda', 'numpy'}
    assert all(torch.equal(value, weights()[name]) for name, value in checkpoint['model'].items())


def test_resume_refusals_are_one_sentence_each(in_tmp):
    path = runs.checkpoint_path('x')
    os.makedirs('results')
    # a checkpoint from before losses had parameters, and before --amp existed: trained without it
    older = {
        'model': {},
        'optimizer': {},
        'scheduler': {},
        'epoch': 2,
        'rng': {},
        'statistics': {},
        'args': {flag: value for flag, (value, _) in RECIPE.items() if flag != 'amp'},
    }
    torch.save(older, path)
    assert runs.load_checkpoint(path, RECIPE, 3)['loss'] == {}
    with pytest.raises(UserError) as error:  # the first flag that differs
        runs.load_checkpoint(path, dict(RECIPE, seed=(3, 1), feature_dim=(16, 512)), 3)
    assert str(error.value) == (
        f'{path} was trained with --feature_dim 8, not 16; resume with the '
        f'same flags or start afresh without --resume'
    )
    with pytest.raises(UserError, match='was trained with --amp False, not True'):
        runs.load_checkpoint(path, dict(RECIPE, amp=(True, False)), 3)
    with pytest.raises(
        UserError,
        match=f'^{path} already finished epoch 2 of 2; raise ' f'--num_epochs to train longer$',
    ):
        runs.load_checkpoint(path, RECIPE, 2)
    torch.save({'model': {}, 'epoch': 1}, path)
    with pytest.raises(
        UserError,
        match=f'^{path} is not a checkpoint train.py wrote \\(it has no '
        f'args, optimizer, rng, scheduler, statistics\\); move it '
        f'away and start afresh',
    ):
        runs.load_checkpoint(path, RECIPE, 3)


def test_a_run_under_its_old_name_is_told_how_to_rename(in_tmp):
    os.makedirs('results')
    torch.save({'args': {'seed': 2}}, runs.checkpoint_path('old'))
    with pytest.raises(
        UserError,
        match='this run was written as old before every recipe flag '
        'named runs; to resume it, rename its files: for f in '
        'results/old_',
    ):
        runs.refuse_renamed_run('old', 'new', {'seed': (2, 1)})
    runs.refuse_renamed_run('old', 'new', {'seed': (3, 1)})  # another run's: nothing to say
    runs.refuse_renamed_run('none', 'new', {'seed': (2, 1)})  # no checkpoint under the old name
