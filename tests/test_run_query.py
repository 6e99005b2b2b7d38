"""test.py retrieves for any image, embedding one outside the data base with the model saved
beside it."""

import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data_utils
import utils
from conftest import make_cub, train_in
from model import Model
from script_runner import error_sentence, query_folder, temporaries, wrote_query

PREFIX = 'cub_googlenet_proxy_anchor_16_no_pretrained_batch_size4'
DATA_BASE = f'{PREFIX}_1_data_base.pth'


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 1-epoch train.py run on 4 classes x 4 images: returns the folder holding its results/."""
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
        'googlenet',
        '--no_pretrained',
        '--feature_dim',
        16,
        '--batch_size',
        4,
        '--num_epochs',
        1,
        '--num_workers',
        0,
    )
    assert (run / 'results' / DATA_BASE).exists() and (
        run / 'results' / f'{PREFIX}_1_model.pth'
    ).exists()
    return run


def photo(path, seed=0):
    """A fresh PNG, in no data base: random smooth colours at a size unlike the data set's."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((120, 90), Image.BILINEAR).save(path, format='PNG')
    return str(path)


def written(folder):
    """{rank: similarity} of the retrieval_img_<rank>_<similarity>.jpg files in a result folder."""
    files = [name for name in os.listdir(folder) if name.startswith('retrieval_img_')]
    return {int(name.split('_')[2]): float(name.split('_')[3][:-4]) for name in files}


def independent_similarities(run, query):
    """Cosines of the query with the data base's test features, embedded here from the saved model file."""
    data_base = torch.load(run / 'results' / DATA_BASE, weights_only=True)
    model = Model('googlenet', 16, data_base['proxies'].size(0), pretrained=False)
    model.load_state_dict(torch.load(run / 'results' / f'{PREFIX}_1_model.pth', weights_only=True))
    with torch.inference_mode():
        embedding = model.eval().embed(utils.test_transform()(utils.read_image(query))[None])[
            0
        ]  # (D,)
    return F.normalize(data_base['test_features'], dim=-1) @ embedding, embedding, data_base


def test_image_outside_the_data_base_is_embedded_and_retrieved(script, trained, tmp_path):
    query = photo(tmp_path / 'my_photo.png')
    status, out, err = script(
        'test',
        '--query_img_name',
        query,
        '--data_base',
        DATA_BASE,
        '--retrieval_num',
        3,
        cwd=trained,
    )
    assert status == 0, err
    assert 'wrote the query and its 3 nearest images to results/' in out and wrote_query(
        out, 'my_photo'
    )
    folder = query_folder(trained / 'results', 'my_photo')
    assert sorted(os.listdir(folder))[:3] == ['query_img.jpg', 'results.csv', 'retrieval.png']
    similarities, _, _ = independent_similarities(trained, query)
    expected = similarities.topk(3).values.tolist()
    assert sorted(written(folder)) == [1, 2, 3]
    np.testing.assert_allclose([written(folder)[rank] for rank in (1, 2, 3)], expected, atol=2e-4)
    with Image.open(folder / 'retrieval_img_1_' f'{expected[0]:.4f}.jpg') as image:
        # no label for the query, so the border is grey rather than green or red
        assert (
            image.size == (224, 224)
            and np.abs(np.array(image)[2, 112].astype(int) - 128).max() < 30
        )
    assert not temporaries(str(trained / 'results'))


def test_copy_of_a_data_base_image_retrieves_as_the_original(script, trained, tmp_path):
    """The same pixels under another path embed to the stored feature, so the results match the known query's."""
    data_base = torch.load(trained / 'results' / DATA_BASE, weights_only=True)
    original = data_base['test_images'][0]
    copy = str(tmp_path / 'copy_of_it.jpg')
    shutil.copyfile(original, copy)
    _, embedding, _ = independent_similarities(trained, copy)
    torch.testing.assert_close(embedding, data_base['test_features'][0], atol=1e-5, rtol=0)

    assert (
        script(
            'test',
            '--query_img_name',
            original,
            '--data_base',
            DATA_BASE,
            '--retrieval_num',
            4,
            cwd=trained,
        )[0]
        == 0
    )
    status, _, err = script(
        'test',
        '--query_img_name',
        copy,
        '--data_base',
        DATA_BASE,
        '--retrieval_num',
        5,
        cwd=trained,
    )
    assert status == 0, err
    known = written(
        query_folder(trained / 'results', os.path.splitext(os.path.basename(original))[0])
    )
    unknown = written(query_folder(trained / 'results', 'copy_of_it'))
    assert unknown[1] == pytest.approx(1.0, abs=1e-4)  # the original itself ranks first
    for rank in range(1, 5):
        assert unknown[rank + 1] == pytest.approx(known[rank], abs=2e-4)


def test_no_model_beside_the_data_base_names_what_it_looked_for(script, trained, tmp_path):
    shutil.copyfile(trained / 'results' / DATA_BASE, tmp_path / 'lonely_3_data_base.pth')
    query = photo(tmp_path / 'holiday.png')
    status, _, err = script(
        'test',
        '--query_img_name',
        query,
        '--data_base',
        tmp_path / 'lonely_3_data_base.pth',
        cwd=tmp_path,
    )
    line = error_sentence(status, err)
    assert line.startswith(
        f'error: data base {tmp_path / "lonely_3_data_base.pth"} has no model '
        f'{tmp_path / "lonely_3_model.pth"} beside it, which embeds images '
        f'outside the data base (your own queries, a --gallery folder)'
    )
    assert not os.path.exists(tmp_path / 'results')


def test_missing_query_file_is_named(script, trained, tmp_path):
    status, _, err = script(
        'test', '--query_img_name', tmp_path / 'typo.jpg', '--data_base', DATA_BASE, cwd=trained
    )
    assert error_sentence(status, err).startswith(
        f'error: query image {tmp_path / "typo.jpg"} does not exist'
    )


def data_base_pair(trained, folder, name, change_features=None, model_dim=None):
    """Copy the trained data base and model to folder as name_1_*, changing the features or the model's size."""
    data_base = torch.load(trained / 'results' / DATA_BASE, weights_only=True)
    if change_features is not None:
        data_base['test_features'] = change_features(data_base['test_features'])
    torch.save(data_base, folder / f'{name}_1_data_base.pth')
    if model_dim is None:
        shutil.copyfile(
            trained / 'results' / f'{PREFIX}_1_model.pth', folder / f'{name}_1_model.pth'
        )
    else:
        torch.save(
            Model(
                'googlenet', model_dim, data_base['proxies'].size(0), pretrained=False
            ).state_dict(),
            folder / f'{name}_1_model.pth',
        )
    return folder / f'{name}_1_data_base.pth'


def test_data_base_features_of_another_size_than_the_model(script, trained, tmp_path):
    path = data_base_pair(
        trained, tmp_path, 'wide', change_features=lambda features: torch.randn(len(features), 32)
    )
    status, _, err = script(
        'test', '--query_img_name', photo(tmp_path / 'q.png'), '--data_base', path, cwd=tmp_path
    )
    assert error_sentence(status, err) == (
        f'error: the model embeds in 16 dimensions but data base {path} holds '
        f'32-d features; use the pair train.py wrote together'
    )
    assert not os.path.exists(tmp_path / 'results')


def test_model_of_another_size_than_the_data_base(script, trained, tmp_path):
    path = data_base_pair(trained, tmp_path, 'mixed', model_dim=32)
    status, _, err = script(
        'test', '--query_img_name', photo(tmp_path / 'q.png'), '--data_base', path, cwd=tmp_path
    )
    line = error_sentence(status, err)
    assert line.startswith(
        f'error: {tmp_path / "mixed_1_model.pth"} does not match the model data base {path} '
        f'describes (googlenet, 16-d)'
    )
    assert not os.path.exists(tmp_path / 'results')
