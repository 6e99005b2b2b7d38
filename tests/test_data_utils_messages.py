"""What data_utils.py and train.py say about a folder of your own photos: a path given as
--data_name, a cropped variant that only the benchmarks with boxes have, PP's own results/ folder,
which classes train and which test, and re-preparing without made-up speeds."""

import os

import pytest
import torch

import data_utils
import utils
from conftest import make_cub, make_folder
from script_runner import error_sentence


@pytest.mark.parametrize('name', ['data_utils', 'train'])
def test_a_path_as_data_name_is_refused_with_the_two_flags_to_pass(script, tmp_path, name):
    make_folder(str(tmp_path / 'data'), 'photos', ['a', 'b', 'c', 'd'])
    given = str(tmp_path / 'data' / 'photos')
    status, _, err = script(name, '--data_path', tmp_path, '--data_name', given, cwd=tmp_path)
    sentence = error_sentence(status, err)
    assert f'not the path {given!r}' in sentence
    assert sentence.endswith(
        f'pass its parent as --data_path {tmp_path / "data"} and its folder '
        f'name as --data_name photos'
    )
    # nothing was prepared or trained
    assert not os.path.exists(tmp_path / 'results')
    assert not os.path.exists(tmp_path / 'data' / 'photos' / 'uncropped')


def test_cropped_images_of_an_own_folder_are_said_once_to_exist_only_for_car_and_cub(
    script, tmp_path
):
    make_folder(str(tmp_path), 'photos', ['a', 'b', 'c', 'd'])
    status, out, _ = script(
        'data_utils',
        '--data_path',
        tmp_path,
        '--data_name',
        'photos',
        '--crop',
        '--workers',
        1,
        cwd=tmp_path,
    )
    assert status == 0
    assert out.count('cropped images exist only for car and cub') == 1
    assert not os.path.exists(utils.index_path(str(tmp_path), 'photos', 'cropped'))
    status, _, err = script(
        'train',
        '--data_path',
        tmp_path,
        '--data_name',
        'photos',
        '--crop_type',
        'cropped',
        '--no_pretrained',
        cwd=tmp_path,
    )
    sentence = error_sentence(status, err)
    assert 'cropped images exist only for car and cub' in sentence and 'data_utils' not in sentence
    assert not os.path.exists(tmp_path / 'results')
    utils.check_data_name('cub', 'cropped')  # the benchmarks with boxes keep their cropped variant
    utils.check_data_name('car', 'cropped')


def test_a_cropped_benchmark_not_yet_prepared_names_the_crop_flag(tmp_path):
    make_cub(str(tmp_path))
    data_utils.prepare(str(tmp_path), 'cub', workers=1)
    with pytest.raises(utils.UserError) as error:
        utils.load_index(str(tmp_path), 'cub', 'cropped')
    assert '--data_name cub --crop` first' in str(error.value)


def test_pp_results_folder_is_never_a_class_and_new_classes_are_listed(capsys, tmp_path):
    make_folder(str(tmp_path), 'photos', ['a', 'b', 'c', 'd'])
    data_utils.prepare(str(tmp_path), 'photos', workers=1)
    capsys.readouterr()
    # test.py run inside the photo folder leaves results/<query>/ there
    make_folder(str(tmp_path / 'photos'), 'results', ['query'])
    make_folder(str(tmp_path), 'photos', ['e'])
    data_utils.prepare(str(tmp_path), 'photos', workers=1)
    out = capsys.readouterr().out
    index = utils.load_index(str(tmp_path), 'photos')
    assert {**index['train'], **index['test']}.keys() == {'a', 'b', 'c', 'd', 'e'}
    assert (
        f'{tmp_path / "photos" / "results"}/ holds what PP scripts write, so it is no class' in out
    )
    # a and b train, c, d and e test: e is the class this preparation added
    assert '  train classes (2): a, b\n' in out and '  test classes (3): c, d, e\n' in out
    assert '  test classes new since the last preparation: e\n' in out
    assert 'train classes new' not in out and 'gone' not in out


def test_the_split_is_printed_by_count_and_first_and_last_names(capsys, tmp_path):
    names = [f'class{k:02d}' for k in range(30)]
    make_folder(str(tmp_path), 'many', names, per_class=1)
    data_utils.prepare(str(tmp_path), 'many', workers=1)
    out = capsys.readouterr().out
    assert (
        '  train classes (15): class00, class01, class02, ..., class12, class13, class14\n' in out
    )
    assert '  test classes (15): class15, class16, class17, ..., class27, class28, class29\n' in out


def test_preparing_again_converts_only_what_changed_and_says_so(script, tmp_path):
    make_folder(str(tmp_path), 'photos', ['a', 'b', 'c', 'd'])
    flags = ('--data_path', tmp_path, '--data_name', 'photos', '--workers', 1)
    status, _, err = script('data_utils', *flags, cwd=tmp_path)
    assert status == 0 and '8/8' in err  # the progress bar of the first preparation
    index = torch.load(utils.index_path(str(tmp_path), 'photos'), weights_only=True)
    status, out, err = script('data_utils', *flags, cwd=tmp_path)
    assert status == 0
    assert 'photos uncropped: 8 of 8 copies are up to date' in out
    assert 'img/s' not in err  # no progress bar, so no rate of copies never converted
    assert torch.load(utils.index_path(str(tmp_path), 'photos'), weights_only=True) == index
