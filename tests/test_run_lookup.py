"""--data_base of test.py and export.py: a path, a file name, a run name or a prefix of one, looked for
in results/ of the working folder, in $PP_RESULTS and in the repository's results/; what they write goes
to the results/ folder the data base lies in; test.py writes one new folder per call."""

import os
import shutil

import pandas as pd
import pytest
import torch

import data_utils
import runs
from conftest import TINY, make_cub, train_in
from runs import DataBase
from runtime import UserError
from script_runner import error_sentence

PREFIX = 'cub_timm-test_resnet_proxy_anchor_8_no_pretrained_batch_size4'


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """tmp_path as the working folder, with no $PP_RESULTS and no repository results/ to look in."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(runs.RESULTS_VARIABLE, raising=False)
    monkeypatch.setattr(runs, '__file__', str(tmp_path / 'repository' / 'runs.py'))
    return tmp_path


def touch(folder, *names):
    """Empty files of these names in folder (made); find() looks at names only."""
    os.makedirs(folder, exist_ok=True)
    for name in names:
        open(os.path.join(folder, name), 'wb').close()


def test_a_run_name_means_its_newest_epochs_data_base(in_tmp):
    touch(
        'results', 'car_a_2_data_base.pth', 'car_a_10_data_base.pth', 'car_a_seed2_30_data_base.pth'
    )
    assert DataBase.find('car_a') == os.path.join('results', 'car_a_10_data_base.pth')
    # the exact run name wins over the longer name it is a prefix of
    assert DataBase.find('car_a_seed2') == os.path.join('results', 'car_a_seed2_30_data_base.pth')
    assert DataBase.find('car_a_10_data_base.pth') == os.path.join(
        'results', 'car_a_10_data_base.pth'
    )


def test_an_unambiguous_prefix_means_the_run_it_starts(in_tmp):
    touch(
        'results',
        'digits_inception_x_2_data_base.pth',
        'digits_inception_x_3_data_base.pth',
        'car_resnet50_y_1_data_base.pth',
    )
    assert DataBase.find('digits') == os.path.join('results', 'digits_inception_x_3_data_base.pth')
    assert DataBase.find('car_res') == os.path.join('results', 'car_resnet50_y_1_data_base.pth')


def test_an_ambiguous_prefix_is_one_sentence_listing_the_runs(in_tmp):
    touch('results', 'car_a_1_data_base.pth', 'car_b_1_data_base.pth', 'cub_c_1_data_base.pth')
    with pytest.raises(UserError) as error:
        DataBase.find('car')
    assert str(error.value) == (
        '--data_base car could mean the data base of any of the runs car_a, car_b; '
        'pass more of the name'
    )


def test_a_name_not_found_lists_the_data_bases_that_exist_closest_first(in_tmp):
    touch('results', 'car_resnet50_proxy_anchor_512_3_data_base.pth', 'sop_vit_1_data_base.pth')
    with pytest.raises(UserError) as error:
        DataBase.find('car_resnet50_proxy_anchor_512_2_data_base.pth')
    message = str(error.value)
    assert message.startswith(
        'data base car_resnet50_proxy_anchor_512_2_data_base.pth was found neither as '
        'given nor under results/'
    )
    assert "looked in the working folder's results/" in message and '\n' not in message
    closest = message.split('the closest that exist: ')[1].split(', ')
    assert closest[0] == 'car_resnet50_proxy_anchor_512_3_data_base.pth'
    assert closest.index('car_resnet50_proxy_anchor_512') < closest.index('sop_vit')


def test_nothing_trained_says_so(in_tmp):
    with pytest.raises(
        UserError,
        match=r'\(looked in .*: none exists\); none holds a data base: .*so train a '
        r'model first$',
    ):
        DataBase.find('car')


def test_the_folders_of_the_variable_and_the_repository_are_looked_in_after_results(
    in_tmp, monkeypatch
):
    touch('results', 'car_a_1_data_base.pth')
    touch('elsewhere', 'car_b_1_data_base.pth', 'car_a_9_data_base.pth')
    touch('repository/results', 'cub_c_4_data_base.pth')
    monkeypatch.setenv(runs.RESULTS_VARIABLE, f'{in_tmp / "missing"}{os.pathsep}elsewhere')
    assert DataBase.find('car_b') == os.path.join('elsewhere', 'car_b_1_data_base.pth')
    assert DataBase.find('cub_c_4_data_base.pth') == str(
        in_tmp / 'repository' / 'results' / 'cub_c_4_data_base.pth'
    )
    assert DataBase.find('cub') == str(in_tmp / 'repository' / 'results' / 'cub_c_4_data_base.pth')
    # a run in two folders: its newest epoch, wherever it lies
    assert DataBase.find('car_a') == os.path.join('elsewhere', 'car_a_9_data_base.pth')


def test_outputs_go_to_the_results_folder_the_data_base_lies_in(in_tmp):
    touch('results', 'x_1_data_base.pth')
    touch('run/results', 'y_1_data_base.pth')
    touch('loose', 'z_1_data_base.pth')
    assert runs.output_folder('results/x_1_data_base.pth') == 'results'
    assert runs.output_folder(str(in_tmp / 'results' / 'x_1_data_base.pth')) == 'results'
    assert runs.output_folder('run/results/y_1_data_base.pth') == str(in_tmp / 'run' / 'results')
    assert (
        runs.output_folder('loose/z_1_data_base.pth') == 'results'
    )  # no run's results/: the working folder's


# --------------------------------------------------------------------------------------------------
# test.py and export.py from another working folder, and test.py's folder per call


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 1-epoch run of the tiny network on 4 classes x 4 images: the folder holding its results/, and
    the data set's folder."""
    data = str(tmp_path_factory.mktemp('data'))
    make_cub(data, num_classes=4, per_class=4)
    data_utils.prepare(data, 'cub', workers=1)
    run = tmp_path_factory.mktemp('run')
    train_in(
        run,
        '--data_path',
        data,
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
    return run, data


def data_base_images(run):
    """The test images of the trained run's data base."""
    return torch.load(run / 'results' / f'{PREFIX}_1_data_base.pth', weights_only=True)[
        'test_images'
    ]


def test_test_py_from_another_folder_finds_the_run_and_writes_beside_it(
    script, trained, tmp_path, monkeypatch
):
    run, _ = trained
    monkeypatch.setenv(runs.RESULTS_VARIABLE, str(run / 'results'))
    query = data_base_images(run)[0]
    status, out, err = script(
        'test',
        '--data_base',
        'cub_timm',
        '--query_img_name',
        query,
        '--retrieval_num',
        2,
        cwd=tmp_path,
    )
    assert status == 0, err
    assert not (tmp_path / 'results').exists()  # nothing in the working folder
    calls = run / 'results' / f'{PREFIX}_1_queries'
    assert f'to {calls}/1/' in out
    assert len(pd.read_csv(next((calls / '1').iterdir()) / 'results.csv')) == 2


def test_export_py_from_another_folder_writes_beside_the_run(
    script, trained, tmp_path, monkeypatch
):
    run, _ = trained
    monkeypatch.setenv(runs.RESULTS_VARIABLE, str(run / 'results'))
    status, out, err = script(
        'export', '--data_base', PREFIX, '--format', 'torchscript', cwd=tmp_path
    )
    assert status == 0, err
    assert (run / 'results' / f'{PREFIX}_1.pt').is_file() and (
        run / 'results' / f'{PREFIX}_1.json'
    ).is_file()
    assert not (tmp_path / 'results').exists()


def test_each_call_gets_a_new_folder_and_a_folder_of_queries_makes_one(script, trained, tmp_path):
    run, _ = trained
    album = tmp_path / 'album'
    album.mkdir()
    for image in data_base_images(run):
        shutil.copy(image, album)
    calls = run / 'results' / f'{PREFIX}_1_queries'
    before = set(os.listdir(run / 'results'))
    numbers = sorted(int(name) for name in os.listdir(calls)) if calls.exists() else []
    status, out, err = script(
        'test', '--data_base', PREFIX, '--query_img_name', album, '--retrieval_num', 1, cwd=run
    )
    assert status == 0, err
    first = calls / str(max(numbers, default=0) + 1)
    assert len(os.listdir(first)) == len(os.listdir(album)) == 8  # one folder per query
    assert all((first / name / 'results.csv').is_file() for name in os.listdir(first))
    assert set(os.listdir(run / 'results')) <= before | {
        calls.name
    }  # 8 queries: one folder in results/
    kept = {name: (first / name / 'results.csv').read_bytes() for name in os.listdir(first)}
    status, out, err = script(
        'test', '--data_base', PREFIX, '--query_img_name', album, '--retrieval_num', 2, cwd=run
    )
    assert status == 0, err
    second = calls / str(int(first.name) + 1)
    assert sorted(os.listdir(second)) == sorted(kept)
    assert {
        name: (first / name / 'results.csv').read_bytes() for name in kept
    } == kept  # nothing replaced


def test_an_output_dir_never_replaces_an_earlier_result(script, trained, tmp_path):
    run, _ = trained
    query = data_base_images(run)[0]
    name = os.path.splitext(os.path.basename(query))[0]
    flags = ('--data_base', PREFIX, '--query_img_name', query, '--output_dir', tmp_path / 'mine')
    status, out, err = script('test', *flags, cwd=run)
    assert status == 0, err
    assert f'to {tmp_path / "mine" / name}/' in out
    earlier = (tmp_path / 'mine' / name / 'results.csv').read_bytes()
    status, _, err = script('test', *flags, '--retrieval_num', 3, cwd=run)
    assert error_sentence(status, err) == (
        f'error: {tmp_path / "mine" / name} holds an earlier result, which '
        f'test.py never replaces; pass another --output_dir, or leave it '
        f'out for a new folder'
    )
    assert (tmp_path / 'mine' / name / 'results.csv').read_bytes() == earlier
