"""tune.py: class-disjoint folds, the declared search space, a seeded and shareable study (journal
file and PostgreSQL), a killed worker, the reproductions' table; on tiny data, tiny images and
timm's test network."""

import getpass
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import optuna
import pandas as pd
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from conftest import ROOT, TINY, make_cub, write_image
from script_runner import error_sentence, load_script

# 8 classes of 3 images: 4 training classes, 2 folds of 2
QUICK = (
    '--data_name',
    'cub',
    '--backbone_type',
    TINY,
    '--no_pretrained',
    '--feature_dim',
    '8',
    '--num_epochs',
    '1',
    '--warm_up',
    '0',
    '--batch_size',
    '4',
    '--num_workers',
    '0',
    '--folds',
    '2',
    '--trials',
    '2',
    '--reproductions',
    '0',
    '--recalls',
    '1,2',
)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """A prepared CUB-layout data set of 8 classes x 3 images (4 training classes); its path."""
    import data_utils

    path = str(tmp_path_factory.mktemp('data'))
    make_cub(path, num_classes=8, per_class=3)
    data_utils.prepare(path, 'cub', workers=1)
    return path


def study_of(folder):
    """The study tune.py wrote into folder/results/ as its only journal file."""
    (path,) = glob.glob(os.path.join(folder, 'results', '*.journal'))
    storage = optuna.storages.JournalStorage(JournalFileBackend(path))
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def trials_of(study):
    """(number, state, params, value) of every trial of the study."""
    return [(trial.number, trial.state, trial.params, trial.value) for trial in study.trials]


# --------------------------------------------------------------------------------------------------
# folds and the search space


def test_folds_are_class_disjoint_and_cover_the_training_classes(data):
    tune = load_script('tune')
    for classes, count in ((10, 4), (8, 4), (9, 2)):
        partitions = tune.folds(classes, count, 'cub')
        labels = [label for part in partitions for label in part]
        assert sorted(labels) == list(range(classes))  # covering, each class once: disjoint
        assert max(map(len, partitions)) - min(map(len, partitions)) <= 1
    with pytest.raises(tune.UserError, match='too few for --folds 4'):
        tune.folds(7, 4, 'cub')
    args = tune.get_args_parser().parse_args(['--data_path', data, '--data_name', 'cub',
                                              '--image_size', '48', '--seed', '1'])
    reader = tune.training_data(args)
    reader.cache_images()
    for validation in tune.folds(reader.num_classes, 2, 'cub'):
        splits = tune.fold_splits(reader, validation)
        # every fold trains and validates on --image_size crops, as train.py would
        assert splits['train'][0][0].shape == splits['val'][0][0].shape == (3, 48, 48)
        # the class id is in each file's name: Bird_<class>_...
        classes = {
            name: {os.path.basename(path).split('_')[1] for path in split.images}
            for name, split in splits.items()
        }
        assert not classes['train'] & classes['val']
        assert len(classes['val']) == len(validation)
        assert len(splits['train']) + len(splits['val']) == len(reader)
        assert splits['val'].num_classes == len(validation)
        for split in splits.values():  # the shared cache gives each image its own pixels
            for index in range(len(split)):
                position = reader.images.index(split.images[index])
                assert torch.equal(split.cache[index], reader.cache[position])
                assert reader.labels[position] in (
                    validation if split is splits['val'] else set(range(4)) - set(validation)
                )


def test_search_space_is_the_declared_one(data):
    tune, train = load_script('tune'), load_script('train')
    from utils import LOSSES

    parser = tune.get_args_parser()
    for loss_name, entry in LOSSES.items():
        args = parser.parse_args(['--loss_name', loss_name])
        space = tune.search_space(args, entry)
        proxies = entry.cosines or loss_name in ('proxy_nca', 'soft_triple', 'arcface', 'cosface')
        assert set(space) == (
            {flag for flag, hyper in entry.hyper.items() if hyper.space}
            | {'lr'}
            | ({'proxy_lr'} if proxies else set())
        )
        for flag, hyper in entry.hyper.items():
            assert space[flag] == hyper.space
            assert hyper.space.low <= hyper.default <= hyper.space.high
    args = parser.parse_args(['--space', 'margin=0.05:0.5,lr=1e-5:1e-3:linear,scale=8:64'])
    space = tune.search_space(args, LOSSES['proxy_anchor'])
    assert space['margin'] == (0.05, 0.5, False) and space['lr'] == (1e-5, 1e-3, False)
    assert space['scale'] == (8.0, 64.0, True)  # the declared log scale is kept
    assert space['proxy_lr'] == train.OPTIMISER_SPACE['proxy_lr']
    for text, message in (
        ('ms_alpha=1:2', 'does not search'),
        ('margin=-1:1', '--margin must be'),
        ('lr=0:1e-3', 'log scale'),
    ):
        with pytest.raises(tune.UserError, match=message):
            tune.search_space(parser.parse_args(['--space', text]), LOSSES['proxy_anchor'])


def test_space_flag_errors_are_one_sentence(script, data, tmp_path, quick_runs):
    status, _, err = script(
        'tune', '--data_path', data, *QUICK, '--space', 'margin=0.5:0.1', cwd=tmp_path
    )
    assert 'must lie below its high' in error_sentence(status, err)
    status, _, err = script(
        'tune', '--data_path', data, *QUICK, '--metric', 'recall@4', cwd=tmp_path
    )
    assert 'map@r, r_precision, recall@1 or recall@2' in error_sentence(status, err)


# --------------------------------------------------------------------------------------------------
# the search: seeded, never reading the test classes, resumable


def test_same_command_gives_same_trials_and_test_images_change_nothing(
    script, data, tmp_path, quick_runs
):
    """Two searches by the same command on two copies of the data set, the second with every test
    image replaced by another picture: the same trials, values and best. The same command again
    then continues the finished study: no new trial."""
    other = tmp_path / 'other'
    shutil.copytree(data, other / 'data')
    import utils

    index = utils.load_index(str(other / 'data'), 'cub')
    replaced = 0
    for class_id, files in index['test'].items():
        for k, relative in enumerate(files):
            write_image(os.path.join(other, 'data', 'cub', relative), 50 + class_id, k)
            replaced += 1
    assert replaced == 12
    outputs = []
    for folder, root in ((tmp_path / 'one', data), (other, str(other / 'data'))):
        folder.mkdir(exist_ok=True)
        status, out, err = script('tune', '--data_path', root, *QUICK, '--trials', '3', cwd=folder)
        assert status == 0, err
        outputs.append(out)
    first, second = trials_of(study_of(tmp_path / 'one')), trials_of(study_of(other))
    assert first == second and len(first) == 3
    assert [state for _, state, _, _ in first] == [TrialState.COMPLETE] * 3
    assert len({tuple(params.items()) for _, _, params, _ in first}) == 3
    for _, _, params, _ in first:
        assert set(params) == {'scale', 'margin', 'lr', 'proxy_lr'}
        assert 0 <= params['margin'] <= 0.5 and 1e-6 <= params['lr'] <= 1e-3
    # a progress line per fold, the best at the end
    assert 'trial 2 fold 2/2: map@r ' in outputs[0] and 'best so far' in outputs[0]
    best = max(first, key=lambda trial: trial[3])
    assert f'best: trial {best[0]}, validation map@r {best[3]:.4f}' in outputs[0]
    status, out, err = script(
        'tune', '--data_path', data, *QUICK, '--trials', '3', cwd=tmp_path / 'one'
    )
    assert status == 0, err
    assert not re.search(r'trial \d+ fold', out) and trials_of(study_of(tmp_path / 'one')) == first
    status, _, err = script(
        'tune', '--data_path', data, *QUICK, '--trials', '3', '--folds', '4', cwd=tmp_path / 'one'
    )
    assert 'too few for --folds 4' in error_sentence(status, err)


# --------------------------------------------------------------------------------------------------
# workers: two on one machine, a killed one, two on PostgreSQL


def paused_worker(folder, data, *flags):
    """A tune.py worker in a process of its own, in folder, once it has stopped itself (SIGSTOP)
    in the first fold of its first trial: that trial is running, and its lock is held."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}
    worker = subprocess.Popen(
        [sys.executable, '-c', WORKER, data, *QUICK, *flags],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _, status = os.waitpid(worker.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), worker.stdout.read()
    return worker


# tests/conftest.py's quick_runs settings, a stop in the first fold, then tune.py's main
WORKER = '''
import os, signal, sys
sys.argv = ['tune.py', '--data_path'] + sys.argv[1:]
import torch, runs, utils, runtime, train, tune
utils.IMAGE_SIZE, utils.RESIZE_SIZE = 32, 37
runs.plot_statistics = lambda frame, path: None
torch.set_num_threads(1)
trained = train.train
def paused(*args, **kwargs):
    train.train = trained
    os.kill(os.getpid(), signal.SIGSTOP)
    return trained(*args, **kwargs)
train.train = paused
runtime.run_main(tune.main)
'''


def share_a_study(script, data, folder, load, *flags):
    """Worker 1 starts the study's first trial and pauses there, worker 2 runs the other trials,
    then worker 1 goes on: both finish, worker 1 with its one trial. Returns the study."""
    worker = paused_worker(folder, data, '--trials', '3', *flags)
    try:
        status, out, err = script(
            'tune', '--data_path', data, *QUICK, '--trials', '3', *flags, cwd=folder
        )
        assert status == 0, err
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    output, _ = worker.communicate(timeout=240)
    assert worker.returncode == 0, output
    study = load()
    workers = {trial.number: trial.user_attrs['worker'] for trial in study.trials}
    assert workers[0] == f'pid {worker.pid} on {socket.gethostname()}'
    assert set(workers) == {0, 1, 2, 3} and len(set(workers.values())) == 2
    assert all(trial.state == TrialState.COMPLETE for trial in study.trials)
    assert 'trial 0 fold 2/2' in output and 'trial 0 fold' not in out
    return study


def test_two_workers_share_the_journal_file(script, data, tmp_path, quick_runs):
    study = share_a_study(script, data, tmp_path, lambda: study_of(tmp_path))
    # the live, paused worker's trial was left running, not failed, while worker 2 searched
    assert len({tuple(trial.params.items()) for trial in study.trials}) == 4


def test_a_killed_worker_leaves_its_trial_failed(script, data, tmp_path, quick_runs):
    worker = paused_worker(tmp_path, data, '--trials', '3')
    worker.kill()
    worker.wait()
    status, out, err = script('tune', '--data_path', data, *QUICK, '--trials', '3', cwd=tmp_path)
    assert status == 0, err
    assert 'trial 0 failed: its worker is gone' in out
    states = [trial.state for trial in study_of(tmp_path).trials]
    assert states == [TrialState.FAIL] + [TrialState.COMPLETE] * 3


def postgres_binaries():
    """The folder of PostgreSQL's initdb and pg_ctl, or None."""
    found = shutil.which('initdb') or next(
        iter(sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb'))), None
    )
    return os.path.dirname(found) if found else None


@pytest.fixture
def postgres():
    """The URL of a database on a PostgreSQL server started here on a free port, in a folder of
    its own, stopped afterwards; skips with the reason where none can be started."""
    pytest.importorskip('psycopg2', reason='psycopg2 (requirements.txt) is not installed')
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip('no PostgreSQL server here (apt-get install postgresql)')
    # initdb refuses root: root runs the server as the postgres user
    as_user = []
    if os.geteuid() == 0:
        try:
            pwd.getpwnam('postgres')
        except KeyError:
            pytest.skip('running as root, and there is no postgres user to run the server as')
        as_user = ['runuser', '-u', 'postgres', '--']
    folder = tempfile.mkdtemp(prefix='pp-postgres-')
    if as_user:
        shutil.chown(folder, 'postgres')
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    user = 'postgres' if as_user else getpass.getuser()

    def run(*command):
        return subprocess.run(
            as_user + [os.path.join(binaries, command[0]), *command[1:]],
            capture_output=True,
            text=True,
            timeout=120,
        )

    made = run('initdb', '-D', f'{folder}/data', '-U', user, '--auth', 'trust')
    if made.returncode:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f'initdb failed: {made.stderr.strip()[-300:]}')
    started = run(
        'pg_ctl',
        '-D',
        f'{folder}/data',
        '-l',
        f'{folder}/log',
        '-w',
        '-o',
        f'-p {port} -k {folder} -h 127.0.0.1',
        'start',
    )
    if started.returncode:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f'the PostgreSQL server did not start: {started.stderr.strip()[-300:]}')
    try:
        yield f'postgresql://{user}@127.0.0.1:{port}/postgres'
    finally:
        run('pg_ctl', '-D', f'{folder}/data', '-m', 'immediate', 'stop')
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_a_postgresql_study(script, data, tmp_path, quick_runs, postgres):
    def load():
        # tune.py's driver (requirements.txt's psycopg2) for the plain URL a user gives
        storage = optuna.storages.RDBStorage(
            postgres.replace('postgresql:', 'postgresql+psycopg2:')
        )
        (name,) = optuna.get_all_study_names(storage)
        return optuna.load_study(study_name=name, storage=storage)

    share_a_study(script, data, tmp_path, load, '--storage', postgres)
    assert not os.path.exists(tmp_path / 'results') or not glob.glob(
        str(tmp_path / 'results' / '*.journal')
    )


# --------------------------------------------------------------------------------------------------
# the reproductions


def test_reproductions_table_has_mean_ci_and_both_ensembles(script, data, tmp_path, quick_runs):
    status, out, err = script(
        'tune', '--data_path', data, *QUICK, '--reproductions', '2', '--cache_images', cwd=tmp_path
    )
    assert status == 0, err
    (path,) = glob.glob(str(tmp_path / 'results' / '*_reproductions.csv'))
    frame = pd.read_csv(path)
    assert list(frame['seed']) == [1, 2]
    # each run's own evaluation: the model on all classes, and the fold models' mean
    statistics = {
        os.path.basename(name): pd.read_csv(name)
        for name in glob.glob(str(tmp_path / 'results' / 'cub_*_statistics.csv'))
    }
    assert len(statistics) == 2 * 3
    for seed, row in frame.iterrows():
        suffix = '_seed2' if seed else ''
        runs = {
            name: table for name, table in statistics.items() if ('_seed2' in name) == bool(seed)
        }
        (whole,) = [table for name, table in runs.items() if '_fold' not in name]
        folds = [table for name, table in runs.items() if '_fold' in name]
        assert row['all_map@r'] == pytest.approx(whole['test_map@r'].iloc[-1])
        assert row['separated_map@r'] == pytest.approx(
            np.mean([table['test_map@r'].iloc[-1] for table in folds])
        )
        assert suffix in ''.join(runs)
        # concatenated: the fold models' unit embeddings side by side, scored by brute force
        bases = sorted(glob.glob(str(tmp_path / 'results' / f'cub_*{suffix}_fold*_data_base.pth')))
        if not seed:
            bases = [base for base in bases if '_seed2' not in base]
        loaded = [torch.load(base) for base in bases]
        joined = torch.cat([F.normalize(base['test_features'], dim=-1) for base in loaded], 1)
        assert row['concatenated_map@r'] == pytest.approx(
            brute_map_at_r(joined, loaded[0]['test_labels'])
        )
    for model in (
        'trained on all training classes',
        'fold models concatenated',
        'fold models apart (mean)',
    ):
        assert f'| {model} |' in out
    values = 100 * frame['concatenated_map@r'].to_numpy()
    low, high = scipy.stats.t.interval(0.95, 1, loc=values.mean(), scale=scipy.stats.sem(values))
    (line,) = [line for line in out.splitlines() if line.startswith('| fold models concatenated')]
    assert f'{values.mean():.2f} ± {(high - low) / 2:.2f} |' in line
    # side by side with the losses not tuned yet left out
    recipe = [
        flag
        for flag in QUICK[2 : QUICK.index('--folds')]
        if flag != '--backbone_type' and flag != TINY
    ]
    status, out, err = script(
        'reproduce',
        '--data_path',
        data,
        '--backbones',
        TINY,
        '--losses',
        'proxy_anchor,triplet',
        '--tuned',
        *recipe,
        *QUICK[-2:],
        cwd=tmp_path,
    )
    assert status == 0, err
    (row,) = [line for line in out.splitlines() if line.startswith('| proxy_anchor |')]
    # loss, seeds, then concatenated R@1, R-Precision, MAP@R and separated ones
    assert row.split(' | ')[4] == f'{values.mean():.2f} ± {(high - low) / 2:.2f}'
    assert '| triplet |' not in out
    # the Reality Check's published figures of each loss named, beside the tuned ones
    assert '| triplet, published | 10 | 64.24 | 34.55 | 23.69 | 55.76 | 29.55 | 18.75 |' in out
    assert 'proxy_anchor, published' not in out  # the Reality Check has no Proxy-Anchor


def brute_map_at_r(features, labels):
    """MAP@R by its definition, one query at a time over all other rows by cosine similarity."""
    similarities = F.normalize(features, dim=-1) @ F.normalize(features, dim=-1).T
    scores = []
    for query in range(len(labels)):
        others = [i for i in range(len(labels)) if i != query]
        order = sorted(
            others, key=lambda i: (-similarities[query, i].item(), labels[i] == labels[query])
        )
        relevant = [labels[i] == labels[query] for i in order]
        r = sum(relevant)
        hits = np.cumsum(relevant[:r])
        scores.append(sum(hits[i] / (i + 1) for i in range(r) if relevant[i]) / r)
    return float(np.mean(scores))
