"""train.py with a baseline loss: a loss's own parameters train at --proxy_lr, go into the
checkpoint and the data base, and resume exactly; a pair-based loss builds no proxies and says
train accuracy does not apply; a pair loss on class-balanced batches learns an embedding for
unseen classes."""

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import runs
from conftest import train_in
from runs import DataBase, load_model
from script_runner import error_sentence, load_script
from test_utils_losses_learn import NUISANCE, PER_CLASS, SIGNAL, synthetic
from utils import LOSSES, EmbeddingLoss, recall

pytestmark = pytest.mark.usefixtures('without_onednn', 'quick_runs')  # quick_runs: see conftest.py
train = load_script('train')
PLOT = runs.plot_statistics  # the real one: quick_runs replaces it


def run_flags(data_path, loss_name, *extra, epochs=2):
    """A tiny GoogLeNet run of loss_name: 8 training images of 2 classes in batches of 4."""
    return [
        '--data_path',
        data_path,
        '--data_name',
        'cub',
        '--backbone_type',
        'googlenet',
        '--no_pretrained',
        '--feature_dim',
        8,
        '--batch_size',
        4,
        '--num_epochs',
        epochs,
        '--warm_up',
        1,
        '--num_workers',
        0,
        '--loss_name',
        loss_name,
        *extra,
    ]


def prefix(loss_name, *extra, epochs=2):
    """The run name of run_flags(...) with these extra flags."""
    return train.prefix_of(
        train.get_args_parser().parse_args(
            map(str, run_flags('data', loss_name, *extra, epochs=epochs))
        )
    )


def test_a_step_trains_the_backbone_after_warm_up_and_the_loss_own_proxies(
    prepared, tmp_path, recorded
):
    """Proxy-NCA's class weights are the loss's: in the optimizer at --proxy_lr, moved in the warm-up epoch as the
    embedding layer is while the backbone is not, and moved again with the backbone after it; the model builds no
    proxies, and the data base stores the loss's, normalised."""
    train_in(tmp_path, *run_flags(prepared, 'proxy_nca', '--proxy_lr', 0.02), watch=recorded)
    warm, after = recorded
    weights = 'loss.proxies'
    assert set(warm['loss_before']) == {weights}
    optimizer = warm['optimizer']
    assert any(p is warm['loss'].loss.proxies for p in optimizer.param_groups[1]['params'])
    assert optimizer.param_groups[1]['lr'] == 0.02 and len(optimizer.param_groups) == 2
    assert warm['model'].proxies.weight.shape == (0, 8)
    for epoch, backbone_moves in ((warm, False), (after, True)):
        params_before, params_after = epoch['before'][0], epoch['after'][0]
        assert not torch.equal(epoch['loss_before'][weights], epoch['loss_after'][weights])
        assert not torch.equal(params_before['embedding.weight'], params_after['embedding.weight'])
        moved = not torch.equal(
            params_before['backbone.conv1.conv.weight'], params_after['backbone.conv1.conv.weight']
        )
        assert moved == backbone_moves
    name = prefix('proxy_nca', '--proxy_lr', 0.02)
    data_base = DataBase.load(tmp_path / 'results' / f'{name}_2_data_base.pth')
    torch.testing.assert_close(data_base.proxies, F.normalize(after['loss_after'][weights], dim=-1))
    assert data_base.proxies.shape == (2, 8)
    checkpoint = torch.load(tmp_path / 'results' / f'{name}_checkpoint.pth', weights_only=True)
    assert torch.equal(checkpoint['loss'][weights], after['loss_after'][weights])
    statistics = pd.read_csv(tmp_path / 'results' / f'{name}_statistics.csv')
    assert statistics['train_accuracy'].between(0, 1).all()  # from the loss's own class proxies


def test_a_pair_loss_builds_no_proxies_and_says_accuracy_does_not_apply(prepared, tmp_path):
    """Multi-Similarity on class-balanced batches: no proxies in the model or the data base, 'n/a' for train accuracy
    in the CSV (read back as NaN), and the saved model opens like any other."""
    train_in(tmp_path, *run_flags(prepared, 'multi_similarity', '--images_per_class', 2, epochs=1))
    name = prefix('multi_similarity', '--images_per_class', 2, epochs=1)
    assert name.endswith('_images_per_class2_warm_up1')
    csv = (tmp_path / 'results' / f'{name}_statistics.csv').read_text().splitlines()
    assert csv[1].split(',')[2] == 'n/a'
    statistics = pd.read_csv(tmp_path / 'results' / f'{name}_statistics.csv')
    assert math.isnan(statistics['train_accuracy'][0]) and statistics['train_loss'][0] > 0
    path = str(tmp_path / 'results' / f'{name}_1_data_base.pth')
    data_base = DataBase.load(path)
    assert data_base.proxies.shape == (0, 8)
    model, _ = load_model(data_base, path)
    assert model.proxies.weight.shape == (0, 8)


def test_resume_of_a_loss_with_own_parameters_equals_an_uninterrupted_run(prepared, tmp_path):
    """SoftTriple (10 centres per class, its own parameters) stopped after epoch 1 and resumed ends as an
    uninterrupted run: the same statistics, model and loss weights, exactly."""
    flags = run_flags(prepared, 'soft_triple', '--images_per_class', 2, epochs=2)
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    train_in(tmp_path / 'a', *flags)
    stopped = list(flags)
    stopped[stopped.index('--num_epochs') + 1] = 1
    train_in(tmp_path / 'b', *stopped)
    train_in(tmp_path / 'b', *flags, '--resume')
    name = prefix('soft_triple', '--images_per_class', 2)
    read = {run: pd.read_csv(tmp_path / run / 'results' / f'{name}_statistics.csv') for run in 'ab'}
    pd.testing.assert_frame_equal(read['a'], read['b'], check_exact=True)
    assert len(read['a']) == 2
    checkpoints = {
        run: torch.load(tmp_path / run / 'results' / f'{name}_checkpoint.pth', weights_only=True)
        for run in 'ab'
    }
    assert checkpoints['a']['loss']['loss.fc'].shape == (8, 2 * 10)
    for key in ('loss', 'model'):
        for tensor, expected in zip(
            checkpoints['b'][key].values(), checkpoints['a'][key].values(), strict=True
        ):
            assert torch.equal(tensor, expected)


def test_resume_refuses_another_loss_setting(prepared, tmp_path, script):
    """A checkpoint trained with other class-balanced batches or loss arguments is refused by name."""
    name = prefix('pml/ContrastiveLoss', '--loss_args', 'neg_margin=0.5', '--images_per_class', 2)
    assert name == (
        'cub_googlenet_pml-ContrastiveLoss_8_no_pretrained_loss_argsneg_margin=0.5_batch_size4_'
        'images_per_class2_warm_up1'
    )
    saved = vars(
        train.get_args_parser().parse_args(
            map(
                str,
                run_flags(
                    prepared,
                    'pml/ContrastiveLoss',
                    '--loss_args',
                    'neg_margin=0.5',
                    '--images_per_class',
                    4,
                ),
            )
        )
    )
    (tmp_path / 'results').mkdir()
    torch.save(
        {
            'model': {},
            'optimizer': {},
            'scheduler': {},
            'epoch': 1,
            'args': saved,
            'rng': {},
            'statistics': {},
        },
        tmp_path / 'results' / f'{name}_checkpoint.pth',
    )
    status, _, err = script(
        'train',
        *run_flags(
            prepared,
            'pml/ContrastiveLoss',
            '--loss_args',
            'neg_margin=0.5',
            '--images_per_class',
            2,
            '--resume',
        ),
        cwd=tmp_path,
    )
    assert error_sentence(status, err) == (
        f'error: results/{name}_checkpoint.pth was trained with --images_per_class '
        f'4, not 2; resume with the same flags or start afresh without --resume'
    )


# ----------------------------------------------------------------------------------------------------------------------
# learning: a pair loss on class-balanced batches


class PairEmbedder(nn.Module):
    """A small MLP embedding, L2-normalised, without proxies (a pair loss needs none)."""

    def __init__(self, dim=16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(SIGNAL + NUISANCE, 64), nn.ReLU(), nn.Linear(64, dim, bias=False)
        )

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)


@pytest.mark.parametrize('loss_name', ['multi_similarity', 'contrastive'])
def test_a_pair_loss_on_class_balanced_batches_learns_unseen_classes(loss_name):
    """Synthetic classes (tests/test_utils_losses_learn.py's), batches of 16 classes x 4 images
    from train.py's sampler: R@1 on 20 held-out classes rises from about chance to well above it."""
    torch.manual_seed(0)
    (train_x, train_y), (test_x, test_y) = synthetic(num_train=60, num_test=20)
    net = PairEmbedder()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_criterion = LOSSES[loss_name].build(
        **{flag: hyper.default for flag, hyper in LOSSES[loss_name].hyper.items()}
    )
    sampler = train.ClassBalancedBatches(train_y.tolist(), 64, 4, seed=1)

    def held_out_recall():
        with torch.no_grad():
            return recall(net(test_x), test_y, [1])[0]

    chance = (PER_CLASS - 1) / (len(test_y) - 1)
    before, losses = held_out_recall(), []
    for epoch in range(1, 21):
        sampler.set_epoch(epoch)
        for batch in sampler.global_batches():
            loss = loss_criterion(net(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    after = held_out_recall()
    assert all(math.isfinite(value) for value in losses) and len(losses) >= 300
    assert (
        before < 0.25
    ), f'the task is too easy at initialisation: R@1 {before:.2f} (chance {chance:.2f})'
    assert (
        after > 0.8 and after > before + 0.5 and after > 10 * chance
    ), f'R@1 {before:.2f} -> {after:.2f}'


def test_every_loss_entry_declares_what_it_is_called_on():
    """A loss on cosines is a plain module, one on embeddings an EmbeddingLoss, as batch_loss tells them apart; each
    says where it comes from."""
    for name in LOSSES:
        args = train.get_args_parser().parse_args(['--loss_name', name])
        loss = train.make_loss(LOSSES[name], args, num_classes=3)
        assert isinstance(loss, EmbeddingLoss) != LOSSES[name].cosines, name
        assert LOSSES[name].source, name


def test_the_figure_says_accuracy_does_not_apply(monkeypatch):
    """Without class proxies the training panel draws the loss alone and says that train accuracy does not apply."""
    drawn = []
    monkeypatch.setattr(runs, 'save_figure', lambda figure, path: drawn.append(figure))
    frame = pd.DataFrame(
        {
            'train_loss': [0.5, 0.4],
            'train_accuracy': [math.nan, math.nan],
            'test_recall@1': [0.2, 0.3],
            'test_map@r': [0.1, 0.2],
        },
        index=pd.RangeIndex(1, 3, name='epoch'),
    )
    PLOT(frame, 'unused.png')
    (figure,) = drawn
    training = figure.axes[0]
    assert len(figure.axes) == 2  # the training panel and the test panel: no accuracy axis
    assert [line.get_label() for line in training.get_lines()] == ['loss']
    assert any('train accuracy: does not apply' in text.get_text() for text in training.texts)


@pytest.mark.parametrize('loss_args, proxies', [('margin=0.4,Tn=1', 0), ('sub_centers=2', 2)])
def test_a_pml_loss_by_name_reaches_the_run(
    prepared, tmp_path, script, recorded, loss_args, proxies
):
    """pml/<Name> with --loss_args: the run trains that class with those arguments, its weights (if any) in the
    proxy group, and the model without proxies; RankedListLoss needs its two arguments, which --loss_args gives.
    """
    name = 'pml/RankedListLoss' if proxies == 0 else 'pml/SubCenterArcFaceLoss'
    flags = run_flags(prepared, name, '--loss_args', loss_args, epochs=1)
    status, _, err = script('train', *flags, cwd=tmp_path, watch=recorded)
    assert status == 0, err
    loss, optimizer = recorded[0]['loss'], recorded[0]['optimizer']
    assert type(loss.loss).__name__ == name[len('pml/') :]
    assert recorded[0]['model'].proxies.weight.shape == (0, 8)
    own = list(loss.parameters())
    assert len(own) == (1 if proxies else 0)
    assert all(any(p is q for q in optimizer.param_groups[1]['params']) for p in own)
    if proxies:
        assert loss.loss.sub_centers == 2 and loss.class_proxies().shape == (2, 2, 8)
    else:
        assert (loss.loss.margin, loss.loss.Tn) == (0.4, 1)
