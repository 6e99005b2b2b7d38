"""Search a loss's hyper-parameters as "A Metric Learning Reality Check" (Musgrave, Belongie, Lim,
ECCV 2020) does, on Optuna, then train the best setting again and score it on the test classes.

    python tune.py --data_path /home/data --data_name cub --loss_name proxy_anchor --cache_images

The protocol: the test classes are never read while searching. The training classes are cut into
--folds class-disjoint partitions (contiguous ranges of class ids); fold i trains on the others and
validates on partition i. Each trial trains one fold after another (in this process, on images
decoded once with --cache_images) and scores the mean of the folds' validation --metric after the
last epoch; Optuna's TPE sampler chooses the next trial's hyper-parameters. Once the study has
--trials finished trials, the best setting is trained again with --reproductions seeds: per seed the
fold models and a model on all training classes, which are ordinary train.py runs under results/.
The test set is scored by the model on all classes, by the fold models' unit embeddings
concatenated, and by the fold models apart (the mean of their scores); the table gives each one's
mean and 95% confidence interval over the seeds.

The study lives in results/<study>.journal (Optuna's journal file, which several tuning processes
on one machine share), or in any database given as --storage (PostgreSQL for workers on several
machines). Running the same command again continues it; a worker killed mid-trial leaves that trial
failed, and the others go on.
"""
import argparse
import contextlib
import copy
import os
import re
import shlex
import socket
import time
import warnings

import numpy as np
import optuna
import pandas as pd
import scipy.stats
import torch
import torch.nn.functional as F
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

import runs
import train
from runtime import RunLock, UserError, atomic_path, exclusive_run, run_main, setup_device
from utils import ImageReader, Space, one_of, parse_ranks, retrieval_metrics, test_transform

METRICS = {'recall@1': 'R@1 (P@1)', 'r_precision': 'R-Precision', 'map@r': 'MAP@R'}  # the table's
MODELS = {'all': 'trained on all training classes', 'concatenated': 'fold models concatenated',
          'separated': 'fold models apart (mean)'}
# seconds between a database worker's heartbeats; a trial silent for GRACE is marked failed
HEARTBEAT, GRACE = 60, 180


# --------------------------------------------------------------------------------------------------
# the flags

def get_args_parser():
    """train.py's flags (the recipe every fold trains with) and the search's."""
    parser = train.get_args_parser()
    parser.description = ('Search the hyper-parameters of a loss with class-disjoint cross-validation '
                          '(the Metric Learning Reality Check protocol), then score the best setting')
    search = parser.add_argument_group('search')
    search.add_argument('--folds', default=4, type=int,
                        help='class-disjoint partitions of the training classes: each fold '
                             'validates on one and trains on the others')
    search.add_argument('--trials', default=50, type=int,
                        help='finished trials the study runs to, over all its workers')
    search.add_argument('--metric', default='map@r', type=str,
                        help='validation metric maximised, averaged over the folds: map@r, '
                             'r_precision or recall@K for a K of --recalls')
    search.add_argument('--space', default='', type=parse_space,
                        help='narrow or widen the searched ranges, name=low:high[:log|:linear],...'
                             ' (e.g. margin=0.05:0.5,lr=1e-5:1e-3:log); the others stay as '
                             'declared (utils.LOSSES, train.OPTIMISER_SPACE)')
    search.add_argument('--prune_below', default=25.0, type=float,
                        help='stop a trial whose mean over its folds so far lies below this '
                             'percentile of the other trials\' at the same fold; 0: never')
    search.add_argument('--storage', default=None, type=str,
                        help='an Optuna database URL shared by workers on several machines '
                             '(postgresql://user:password@host/database); none: the journal file '
                             'results/<study>.journal, shared by the workers on this machine')
    search.add_argument('--reproductions', default=10, type=int,
                        help='seeds the best setting is trained with after the search; 0 for the '
                             'second, third, ... worker')
    return parser


def parse_space(text):
    """{name: (low, high, 'log', 'linear' or None to keep the declared scale)} of --space:
    name=low:high[:log|:linear],..."""
    space = {}
    for item in filter(None, text.split(',')):
        name, _, bounds = item.partition('=')
        parts = bounds.split(':')
        try:
            low, high = float(parts[0]), float(parts[1])
            if len(parts) > 3 or len(parts) == 3 and parts[2] not in ('log', 'linear'):
                raise ValueError
        except (ValueError, IndexError):
            raise argparse.ArgumentTypeError(
                f'--space takes name=low:high[:log|:linear] items separated by commas, not '
                f'{item!r}') from None
        if not low < high:
            raise argparse.ArgumentTypeError(f'--space {name}: its low {low:g} must lie below its '
                                             f'high {high:g}')
        space[name.strip()] = (low, high, parts[2] if len(parts) == 3 else None)
    return space


def search_space(args, entry):
    """{flag: Space} the study searches: the loss's declared hyper-parameters, --lr, --proxy_lr
    for a loss with class proxies, each as --space changes it; a range a flag cannot take is one
    UserError."""
    declared = {flag: hyper.space for flag, hyper in entry.hyper.items() if hyper.space}
    declared['lr'] = train.OPTIMISER_SPACE['lr']
    if entry.cosines or any(True for _ in train.make_loss(entry, args, 2).parameters()):
        declared['proxy_lr'] = train.OPTIMISER_SPACE['proxy_lr']
    for name, (low, high, scale) in args.space.items():
        if name not in declared:
            raise UserError(f'--space names {name}, which {args.loss_name} training does not '
                            f'search; name {one_of(list(declared))}')
        declared[name] = Space(low, high, declared[name].log if scale is None else scale == 'log')
    for name, space in declared.items():
        if space.log and space.low <= 0:
            raise UserError(f'--space {name} is searched on a log scale, so its low must be '
                            f'positive, not {space.low:g}; give a positive low or add :linear')
        for value in (space.low, space.high):  # train.py's own checks of the flag
            train.check_args(argparse.Namespace(**{**vars(args), name: kind(entry, name)(value)}),
                             train.get_args_parser())
    return declared


def kind(entry, name):
    """int for a hyper-parameter declared with an int default, else float."""
    hyper = entry.hyper.get(name)
    return int if hyper is not None and isinstance(hyper.default, int) else float


def check_search(args, parser):
    """train.py's checks of the recipe, then the search's flags; returns (ranks, loss entry)."""
    ranks, entry = train.check_args(args, parser)
    for flag, low in (('folds', 2), ('trials', 1), ('reproductions', 0)):
        if getattr(args, flag) < low:
            raise UserError(f'--{flag} must be at least {low}, not {getattr(args, flag)}')
    if not 0 <= args.prune_below < 100:
        raise UserError(f'--prune_below is a percentile in [0, 100), not {args.prune_below}')
    metrics = ['map@r', 'r_precision'] + [f'recall@{k}' for k in ranks]
    if args.metric not in metrics:
        raise UserError(f'--metric {args.metric} is not one this run computes; choose '
                        f'{one_of(metrics)}')
    if args.val_fraction:
        raise UserError('--val_fraction holds out one validation split, but tune.py validates on '
                        '--folds class-disjoint folds of the training classes; leave it out')
    return ranks, entry


# --------------------------------------------------------------------------------------------------
# main: the search, then the reproductions

def main():
    """Run (or join, or continue) the study, then train its best setting with --reproductions
    seeds."""
    parser = get_args_parser()
    args = parser.parse_args()
    ranks, entry = check_search(args, parser)
    device, _, world = setup_device()
    if world > 1:
        raise UserError('tune.py trains its folds one after another in one process; start it with '
                        'python, not torchrun, and run several workers instead (docs/tuning.md)')
    space = search_space(args, entry)
    if args.data_name == train.DEMO:
        train.write_demo(args.data_path)
    train_data = training_data(args)
    partitions = folds(train_data.num_classes, args.folds, args.data_name)
    if args.cache_images:
        start = time.perf_counter()
        train_data.cache_images()
        print(f'decoded {len(train_data)} training images into memory once for every fold in '
              f'{time.perf_counter() - start:.0f} s')
    fold_data = [fold_splits(train_data, validation) for validation in partitions]
    for splits in fold_data:
        train.check_batches(splits['train'], args)
    name = study_name(args, entry)
    study, lease = open_study(args, name, space)
    print(f'searching {args.trials} trials of {args.folds} folds: '
          + ', '.join(f'{flag} {value.low:g}..{value.high:g}{" (log)" * value.log}'
                      for flag, value in space.items()))
    objective = Objective(args, space, entry, fold_data, device, lease)
    search(study, objective, args.trials, lease)
    if args.reproductions:  # the best is final once no other worker runs a trial
        wait_for_others(study, lease)
    best = study.best_trial
    print(f'best: trial {best.number}, validation {args.metric} {best.value:.4f} with '
          f'{flags_text(rounded(best.params))} (study {name})')
    if args.reproductions:
        settings = argparse.Namespace(**{**vars(args), **rounded(best.params)})
        rows = reproduce(settings, entry, ranks, train_data, partitions, device)
        path = f'results/{name}_reproductions.csv'
        with atomic_path(path) as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)
        print(reproductions_table(pd.DataFrame(rows), name))
        print(f'wrote {path}')


def training_data(args):
    """The training classes as --image_size crops, augmented; the search never opens a test
    image."""
    return ImageReader(args.data_path, args.data_name, 'train', args.backbone_type, args.crop_type,
                       seed=args.seed, image_size=args.image_size)


def folds(num_classes, count, data_name):
    """The validation classes of each fold: count contiguous, class-disjoint ranges of labels
    0..num_classes-1 that together cover them all."""
    if num_classes < 2 * count:
        raise UserError(f'{data_name} has {num_classes} training classes, too few for --folds '
                        f'{count} (each fold validates on at least 2); use --folds '
                        f'{max(2, num_classes // 2)} or fewer')
    return [part.tolist() for part in np.array_split(np.arange(num_classes), count)]


def fold_splits(train_data, validation):
    """{'train': the other classes, augmented, 'val': the validation classes, as the test set is
    embedded}; both read train_data's decoded images, if any."""
    others = [label for label in range(train_data.num_classes) if label not in set(validation)]
    trained, validated = copy.copy(train_data), copy.copy(train_data)
    trained.select_classes(others)
    validated.select_classes(validation)
    validated.transform = test_transform(train_data.image_size)  # the run's --image_size
    return {'train': trained, 'val': validated}


def study_name(args, entry):
    """tune_<run name>: the run name of train.py's flags, less the searched ones (and
    --run_name)."""
    searched = set(entry.hyper) | set(train.OPTIMISER_SPACE)
    parser = train.get_args_parser()
    named = [flag for flag in train.flags_of(parser, train.NAMED) if flag not in searched]
    return 'tune_' + train.prefix_of(argparse.Namespace(**{**vars(args), 'run_name': None}), named)


def flags_text(params):
    """The hyper-parameters as train.py's flags: --margin 0.12 --lr 3.1e-05."""
    return shlex.join(part for flag, value in params.items()
                      for part in (f'--{flag}', runs.flag_value(value)))


# --------------------------------------------------------------------------------------------------
# the study: its storage, the trials, a killed worker's trial

def open_study(args, name, space):
    """(the study, created or loaded, its TrialLeases). Its settings are recorded when it is
    created; a worker with other folds, epochs, metric or space is refused, as its trials would
    not compare."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress lines below say it all
    if args.storage is None:
        path = f'results/{name}.journal'
        os.makedirs('results', exist_ok=True)
        storage = optuna.storages.JournalStorage(JournalFileBackend(path))
        lease = TrialLeases(name, storage)
        print(f'study {name} in {path}; watch it with: optuna-dashboard {path}')
    else:
        # SQLAlchemy 2.1 reads postgresql:// as the psycopg (3) driver; requirements.txt pins
        # psycopg2
        url = re.sub(r'^postgres(ql)?://', 'postgresql+psycopg2://', args.storage)
        try:
            # the heartbeat marks a killed worker's trial failed once it has been silent for GRACE
            with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning,
                                         action='ignore'):
                storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT,
                                                     grace_period=GRACE)
        except Exception as error:  # SQLAlchemy's many errors: a bad URL, no server, no driver
            raise UserError(f'could not open --storage {args.storage} '
                            f'({type(error).__name__}: {str(error).splitlines()[0]}); check the '
                            f'URL and that the database server is reachable') from None
        lease = None
        print(f'study {name} in {args.storage}; watch it with: optuna-dashboard {args.storage}')
    # Percentile, not Wilcoxon: with 4 folds the Wilcoxon signed-rank test cannot reach p < 0.1
    # before the last fold (its smallest one-sided p-value over 3 pairs is 1/8), so it would prune
    # nothing; a trial whose running mean is among the other trials' worst quarter at the same
    # fold is clearly behind
    pruner = (optuna.pruners.PercentilePruner(args.prune_below, n_startup_trials=5)
              if args.prune_below else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=name, storage=storage, direction='maximize',
                                sampler=sampler(args.seed, 0), pruner=pruner, load_if_exists=True)
    settings = {'folds': args.folds, 'num_epochs': args.num_epochs, 'metric': args.metric,
                'space': {flag: list(value) for flag, value in space.items()}}
    recorded = study.user_attrs.get('settings')
    if recorded is None:
        study.set_user_attr('settings', settings)
    elif recorded != settings:
        changed = next(key for key in settings if settings[key] != recorded.get(key))
        raise UserError(f'study {name} was searched with --{changed} {recorded.get(changed)}, not '
                        f'{settings[changed]}; run with the same flags to continue it, or pass '
                        f'other --storage to start another')
    return study, lease


def sampler(seed, number):
    """TPE seeded by the seed and the trial's number: one worker draws the same trials each time,
    and two workers never draw the same random start-up trial. constant_liar: a trial another
    worker is running counts as a poor result, so that workers spread out."""
    return optuna.samplers.TPESampler(seed=seed * 100_003 + number, constant_liar=True)


class Objective:
    """A trial: its hyper-parameters drawn from the space, then one fold after another trained,
    each validation score reported (the pruner may stop the trial after any fold), and the mean
    over the folds returned."""

    def __init__(self, args, space, entry, fold_data, device, lease):
        self.args, self.space, self.entry = args, space, entry
        self.fold_data, self.device, self.lease = fold_data, device, lease

    def __call__(self, trial):
        trial.study.sampler = sampler(self.args.seed, trial.number)
        params = {flag: suggest(trial, flag, space, kind(self.entry, flag))
                  for flag, space in self.space.items()}
        settings = argparse.Namespace(**{**vars(self.args), **rounded(params)})
        with self.lease.hold(trial.number) if self.lease else contextlib.nullcontext():
            # which worker runs it, as optuna-dashboard shows a trial's attributes
            trial.set_user_attr('worker', f'pid {os.getpid()} on {socket.gethostname()}')
            values = []
            for fold, splits in enumerate(self.fold_data):
                try:
                    statistics = train.train(settings, None, parse_ranks(settings.recalls),
                                             self.entry, self.device, 0, 1, train.Watch(), splits)
                except UserError as error:  # the loss diverged: a setting as poor as it gets
                    print(f'trial {trial.number} fold {fold + 1}/{len(self.fold_data)}: {error}')
                    raise optuna.TrialPruned() from None
                values.append(statistics[f'val_{self.args.metric}'][-1])
                trial.report(float(np.mean(values)), fold)
                print(f'trial {trial.number} fold {fold + 1}/{len(self.fold_data)}: '
                      f'{self.args.metric} {values[-1]:.4f}, mean so far {np.mean(values):.4f}; '
                      f'best so far {best_text(trial.study)}', flush=True)
                if trial.should_prune():
                    print(f'trial {trial.number} pruned: behind the other trials at this fold')
                    raise optuna.TrialPruned()
        return float(np.mean(values))


def rounded(params):
    """The sampled hyper-parameters to 4 significant digits, as every run trains them: short run
    names and flags (margin0.1234, not margin0.12340981224817263), no difference in what they
    learn."""
    return {flag: value if isinstance(value, int) else float(f'{value:.4g}')
            for flag, value in params.items()}


def suggest(trial, flag, space, type_):
    """The trial's value of flag, drawn from its Space by the sampler: an int or a float."""
    if type_ is int:
        return trial.suggest_int(flag, int(space.low), int(space.high), log=space.log)
    return trial.suggest_float(flag, space.low, space.high, log=space.log)


def best_text(study):
    """'0.4321 (trial 3)', or 'none yet'."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return 'none yet'
    best = max(done, key=lambda trial: trial.value)
    return f'{best.value:.4f} (trial {best.number})'


def search(study, objective, trials, lease):
    """Run trials until the study has `trials` finished ones (complete or pruned), counting every
    worker's; a failed trial (its worker killed) does not count."""
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    if lease:
        lease.fail_orphans(study)
    if len(study.get_trials(deepcopy=False, states=finished)) < trials:
        # Optuna's default, without gc_after_trial: a trial's model is freed by reference counting
        # when it ends, and a forced full collection (0.3 s a trial here) only moved the time the
        # collector spends during training
        study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(trials, finished)])
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise UserError(f'no trial of study {study.study_name} finished all its folds (every one '
                        f'was pruned or failed); widen --space or lower --prune_below')


def wait_for_others(study, lease):
    """Wait until no other worker is running a trial of the study, so that the best is final."""
    while True:
        if lease:
            lease.fail_orphans(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        print(f'waiting for {len(running)} trial(s) other workers are running', flush=True)
        time.sleep(10)


class TrialLeases:
    """The journal file's heartbeat: a worker holds results/.<study>_trial<N>.lock (a
    runtime.RunLock, which the kernel releases when its holder dies, even by SIGKILL) while it runs
    trial N, so that any worker finding a running trial's lock file unheld marks the trial failed
    at once. Optuna's own heartbeat is for database storages only."""

    def __init__(self, name, storage):
        self.name, self.storage = name, storage

    def path(self, number):
        return f'results/.{self.name}_trial{number}.lock'

    @contextlib.contextmanager
    def hold(self, number):
        """Hold trial number's lock for the block."""
        lock = RunLock(self.path(number))
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def fail_orphans(self, study):
        """Mark failed each running trial whose lock file is left but held by no process."""
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # no file yet: a worker that has just created the trial and takes its lock next
            if not os.path.exists(self.path(trial.number)):
                continue
            lock = RunLock(self.path(trial.number))
            if lock.acquire() is None:
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(
                    self.storage.get_study_id_from_name(study.study_name), trial.number)
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
                print(f'trial {trial.number} failed: its worker is gone')
                lock.release()


# --------------------------------------------------------------------------------------------------
# the reproductions: the best setting trained again, scored once on the test classes

def reproduce(settings, entry, ranks, train_data, partitions, device):
    """Train the best setting (settings) with seeds seed, seed + 1, ...: per seed the fold models
    and a model on all training classes, each an ordinary train.py run under results/ (a finished
    one is read back, an interrupted one resumed). Returns one row per seed: seed, then
    <model>_<metric> for each of MODELS and each metric the runs computed."""
    test_splits = {split: data for split, data in train.load_splits(argparse.Namespace(
        **{**vars(settings), 'cache_images': False}), 0).items() if split != 'train'}
    if settings.cache_images:  # the training images are decoded already, the test ones once here
        for data in test_splits.values():
            data.cache_images()
    rows = []
    for seed in range(settings.seed, settings.seed + settings.reproductions):
        seeded = copy.copy(train_data)
        seeded.seed = seed
        trained = {'all': seeded}
        for fold, validation in enumerate(partitions, 1):
            trained[f'fold{fold}'] = fold_splits(seeded, validation)['train']
        features = {}
        for run_name, data in trained.items():
            run = argparse.Namespace(**{**vars(settings), 'seed': seed, 'resume': False,
                                        'run_name': None if run_name == 'all' else run_name})
            features[run_name] = reproduction(run, entry, ranks, {'train': data, **test_splits},
                                              device)
        rows.append({'seed': seed, **scores(features, ranks)})
        print(f'reproduction {seed - settings.seed + 1}/{settings.reproductions}: '
              + ', '.join(f'{model} {METRICS["map@r"]} {rows[-1][f"{model}_map@r"]:.4f}'
                          for model in MODELS), flush=True)
    return rows


def reproduction(run, entry, ranks, splits, device):
    """(test features, test labels, gallery features or None, gallery labels or None) of one
    reproduction run: read from its final data base, training it first (or resuming it) unless it
    has finished."""
    prefix = train.prefix_of(run)
    path = f'results/{prefix}_{run.num_epochs}_data_base.pth'
    if not os.path.isfile(path):
        # an interrupted reproduction continues from its checkpoint
        run.resume = os.path.isfile(runs.checkpoint_path(prefix))
        with exclusive_run(prefix, 0, 1):
            train.train(run, prefix, ranks, entry, device, 0, 1, train.Watch(), splits)
    data_base = runs.DataBase.load(path)
    gallery = data_base.gallery
    return (data_base.test.features, data_base.test.labels,
            gallery.features if gallery else None, gallery.labels if gallery else None)


def scores(features, ranks):
    """{<model>_<metric>: value} of one seed's runs (features {run: reproduction()}): the model on
    all classes; the fold models' unit embeddings concatenated; the mean of the fold models'
    own."""
    folds = [value for run, value in features.items() if run != 'all']

    def metrics(test, labels, gallery, gallery_labels):
        extra = {} if gallery is None else {'gallery_features': gallery,
                                            'gallery_labels': gallery_labels}
        return retrieval_metrics(test, labels, ranks, **extra)

    def joined(index):  # (N, folds x D)
        return torch.cat([F.normalize(fold[index].float(), dim=-1) for fold in folds], dim=1)

    has_gallery = folds[0][2] is not None
    apart = [metrics(*fold) for fold in folds]
    results = {'all': metrics(*features['all']),
               'concatenated': metrics(joined(0), folds[0][1], joined(2) if has_gallery else None,
                                       folds[0][3]),
               'separated': {metric: float(np.mean([one[metric] for one in apart]))
                             for metric in apart[0]}}
    return {f'{model}_{metric}': value for model, values in results.items()
            for metric, value in values.items()}


def reproductions_table(frame, name):
    """The reproductions as the Reality Check's tables: per model, R@1, R-Precision and MAP@R in %,
    each mean ± the half-width of its 95% confidence interval over the seeds (Student's t)."""
    lines = [f'{name}: {len(frame)} seed(s), test set, mean ± 95% confidence interval (%)',
             '| model | ' + ' | '.join(METRICS.values()) + ' |',
             '|---' * (1 + len(METRICS)) + '|']
    for model, title in MODELS.items():
        cells = [mean_ci(frame[f'{model}_{metric}']) for metric in METRICS]
        lines.append(f'| {title} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def mean_ci(values):
    """'61.23 ± 0.45': the mean of fractions in %, ± the half-width of its 95% confidence interval
    (Student's t over the values); '61.23 ± n/a' for a single value."""
    values = 100 * np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return f'{values.mean():.2f} ± n/a'
    half = scipy.stats.t.ppf(0.975, len(values) - 1) * scipy.stats.sem(values)
    return f'{values.mean():.2f} ± {half:.2f}'


if __name__ == '__main__':
    run_main(main)
