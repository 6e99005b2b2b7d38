"""Reproduce the README's benchmark tables: train every configuration, then tabulate and plot what was reproduced.

    python reproduce.py --data_path /home/data              # prepare and train the whole grid, then --table
    python reproduce.py --data_path /home/data --dry_run    # only print the commands
    python reproduce.py --table                             # results/benchmarks.md and .png from the CSVs so far

The grid: each data set found under --data_path (car, cub, sop, inshop) x each backbone (resnet50, inception,
googlenet), with the Proxy-Anchor loss and train.py's defaults, which are the seed's hyper-parameters; SOP is evaluated
at Recall@1/10/100/1000 and In-shop at Recall@1/10/20/30/40, the ranks their results are quoted at. Every run is
started with --resume, so running this again after an interruption continues the unfinished configuration from its
checkpoint, and one whose statistics CSV already reaches the final epoch is not trained again. Any other flag is
passed on to every train.py run (say --amp or --num_workers 4).

The table reports each run's final epoch, never its best one: picking the best epoch by its test score is feedback
from the test set. Runs of the same configuration on other prepared data sets (train.py --data_name NAME) get a
table of their own, without published figures.
"""
import argparse
import os
import re
import shlex
import subprocess
import sys

import pandas as pd

from utils import DATA_NAMES, UserError, atomic_path, index_path, pyplot, run_main, save_figure

ROOT = os.path.dirname(os.path.abspath(__file__))
BACKBONES = ('resnet50', 'inception', 'googlenet')  # in the README's order
BACKBONE_NAMES = {'resnet50': 'ResNet50', 'inception': 'Inception', 'googlenet': 'GoogLeNet'}
DATA_TITLES = {'car': 'CARS196', 'cub': 'CUB200', 'sop': 'Stanford Online Products', 'inshop': 'In-shop Clothes'}
RANKS = {'car': (1, 2, 4, 8), 'cub': (1, 2, 4, 8), 'sop': (1, 10, 100, 1000), 'inshop': (1, 10, 20, 30, 40)}
DEFAULT_RANKS = (1, 2, 4, 8)  # train.py's --recalls
LOSS, FEATURE_DIM = 'proxy_anchor', 512

# published Recall@K (%) at RANKS[data]; None where the source gives no figure
PUBLISHED = {
    # the seed README
    ('car', 'resnet50'): (87.0, 92.5, 95.6, 97.4),
    ('car', 'inception'): (84.0, 90.5, 94.3, 96.6),
    ('car', 'googlenet'): (78.8, 86.2, 91.5, 95.1),
    ('cub', 'resnet50'): (70.0, 79.6, 86.9, 92.2),
    ('cub', 'inception'): (66.7, 77.3, 85.7, 91.0),
    ('cub', 'googlenet'): (62.5, 73.6, 82.8, 89.8),
    # Proxy-Anchor (Kim et al., CVPR 2020), BN-Inception, 512-d; its R@10/100/1000 are not given at 512-d
    ('sop', 'inception'): (79.1, None, None, None),
    # the official Proxy-Anchor repository (tjddus9597/Proxy-Anchor-CVPR2020), BN-Inception, 512-d
    ('inshop', 'inception'): (91.9, 98.1, 98.7, 99.0, 99.1),
}
SOURCES = {'car': 'the seed README', 'cub': 'the seed README',
           'sop': 'the Proxy-Anchor paper (CVPR 2020), BN-Inception 512-d; R@1 only',
           'inshop': 'the official Proxy-Anchor repository, BN-Inception 512-d'}


def prefix(data_name, backbone):
    """The name train.py gives this configuration's outputs."""
    return f'{data_name}_{backbone}_{LOSS}_{FEATURE_DIM}'


def statistics_path(results, data_name, backbone):
    """Where train.py writes the configuration's per-epoch statistics."""
    return os.path.join(results, f'{prefix(data_name, backbone)}_statistics.csv')


def present_data(data_path):
    """The data sets with a folder under data_path, in the README's order."""
    names = [name for name in DATA_NAMES if os.path.isdir(os.path.join(data_path, name))]
    if not names:
        raise UserError(f'no data set found under {data_path}: expected a folder car/, cub/, sop/ or inshop/ there '
                        f'(see the README for each layout), or pass --data_path')
    return names


def train_flags(data_path, data_name, backbone, extra):
    """train.py's flags for one configuration: everything else stays at the seed's defaults."""
    flags = ['--data_path', data_path, '--data_name', data_name, '--backbone_type', backbone, '--loss_name', LOSS,
             '--resume']
    if RANKS[data_name] != DEFAULT_RANKS:
        flags += ['--recalls', ','.join(map(str, RANKS[data_name]))]
    return flags + list(extra)


def train_args(flags):
    """train.py's arguments for these flags, checked by train.py's own parser."""
    from train import get_args_parser
    parser = get_args_parser()

    def refuse(message):
        raise UserError(f'train.py would refuse the flags {shlex.join(flags)} ({message}); see python train.py --help')

    parser.error = refuse  # one sentence instead of argparse's usage text and exit
    return parser.parse_args(flags)


def finished_epochs(path):
    """The number of epochs a statistics CSV holds (0 if it does not exist)."""
    return len(pd.read_csv(path)) if os.path.isfile(path) else 0


def commands(data_path, extra, results='results'):
    """[(description, argv)] of the whole grid: data_utils.py for an unprepared set, then each train.py run."""
    grid = []
    for data_name in present_data(data_path):
        if not os.path.isfile(index_path(data_path, data_name)):
            grid.append((f'prepare {data_name}', [sys.executable, os.path.join(ROOT, 'data_utils.py'),
                                                  '--data_path', data_path, '--data_name', data_name]))
        for backbone in BACKBONES:
            flags = train_flags(data_path, data_name, backbone, extra)
            args, fixed = train_args(flags), {'data_name': data_name, 'backbone_type': backbone,
                                              'loss_name': LOSS, 'feature_dim': FEATURE_DIM}
            if RANKS[data_name] != DEFAULT_RANKS:
                fixed['recalls'] = ','.join(map(str, RANKS[data_name]))
            for flag, value in fixed.items():
                if getattr(args, flag) != value:
                    raise UserError(f'reproduce.py sets --{flag} itself for each configuration of the tables; '
                                    f'leave it out')
            epochs, done = args.num_epochs, finished_epochs(statistics_path(results, data_name, backbone))
            if done >= epochs:
                print(f'# {prefix(data_name, backbone)} already reached epoch {done}: not trained again')
                continue
            grid.append((f'train {prefix(data_name, backbone)}',
                         [sys.executable, os.path.join(ROOT, 'train.py')] + flags))
    return grid


# ----------------------------------------------------------------------------------------------------------------------
# the table and the figure

def reproduced(results, data_name, backbone):
    """{'epoch': n, 'recall@K': %, ..., 'map@r': %} of the configuration's final epoch, or None if not run."""
    path = statistics_path(results, data_name, backbone)
    if not os.path.isfile(path):
        return None
    frame = pd.read_csv(path, index_col='epoch')
    if frame.empty:
        return None
    last = frame.iloc[-1]  # the final epoch, never the best one
    row = {'epoch': int(frame.index[-1])}
    ranks = RANKS.get(data_name) or [column[len('test_recall@'):] for column in frame.columns
                                     if column.startswith('test_recall@')]
    for key in [f'recall@{k}' for k in ranks] + ['map@r']:
        if f'test_{key}' in frame.columns and pd.notna(last[f'test_{key}']):
            row[key] = 100 * float(last[f'test_{key}'])
    return row


def other_data(results):
    """The data names beyond the benchmarks with a run of the tables' configuration in results, sorted."""
    pattern = re.compile(rf'(.+)_({"|".join(BACKBONES)})_{LOSS}_{FEATURE_DIM}_statistics\.csv')
    found = {match.group(1) for match in map(pattern.fullmatch, os.listdir(results) if os.path.isdir(results) else [])
             if match}
    return sorted(found - set(DATA_NAMES))


def epoch_cell(run, epochs):
    """The table's Epoch cell: the run's final epoch, marked when short of the schedule."""
    return '-' if not run else str(run['epoch']) + ('' if run['epoch'] >= epochs else ' (unfinished)')


def cell(value, signed=False):
    """A table cell: '87.0%', '+0.4' for a difference, '-' for no figure."""
    if value is None:
        return '-'
    return f'{value:+.1f}' if signed else f'{value:.1f}%'


def table(results, epochs):
    """results/benchmarks.md: per data set, reproduced final-epoch figures beside the published ones."""
    lines = ['# Reproduced benchmarks', '',
             f'Proxy-Anchor loss, {FEATURE_DIM}-d embeddings, train.py defaults (the seed\'s hyper-parameters). '
             f'"reproduced" is the final epoch of each run (the statistics CSV\'s last row; {epochs} epochs when '
             'complete), never the best one; "difference" is reproduced minus published, in points. '
             '"-" marks a configuration not yet run or a figure the source does not give. Written by '
             '`python reproduce.py --table`.', '']
    for data_name in DATA_NAMES:
        ranks = RANKS[data_name]
        lines += [f'## {DATA_TITLES[data_name]}', '', f'Published: {SOURCES[data_name]}.', '',
                  '| Backbone | | ' + ' | '.join(f'R@{k}' for k in ranks) + ' | MAP@R | Epoch |',
                  '|---|---|' + '---|' * (len(ranks) + 2)]
        for backbone in BACKBONES:
            ours = reproduced(results, data_name, backbone) or {}
            published = PUBLISHED.get((data_name, backbone), (None,) * len(ranks))
            mine = [ours.get(f'recall@{k}') for k in ranks]
            difference = [None if a is None or b is None else a - b for a, b in zip(mine, published)]
            name = BACKBONE_NAMES[backbone]
            lines.append(f'| {name} | reproduced | ' + ' | '.join(map(cell, mine)) +
                         f' | {cell(ours.get("map@r"))} | {epoch_cell(ours, epochs)} |')
            lines.append('| | published | ' + ' | '.join(map(cell, published)) + ' | - | |')
            lines.append('| | difference | ' + ' | '.join(cell(d, signed=True) for d in difference) + ' | | |')
        lines.append('')
    for data_name in other_data(results):  # a folder of the user's own images: nothing published to compare with
        runs = {backbone: reproduced(results, data_name, backbone) for backbone in BACKBONES}
        runs = {backbone: run for backbone, run in runs.items() if run}
        ranks = sorted({int(key[len('recall@'):]) for run in runs.values() for key in run if key.startswith('recall@')})
        lines += [f'## {data_name}', '', 'Not a benchmark: nothing published to compare with.', '',
                  '| Backbone | | ' + ' | '.join(f'R@{k}' for k in ranks) + ' | MAP@R | Epoch |',
                  '|---|---|' + '---|' * (len(ranks) + 2)]
        for backbone, run in runs.items():
            lines.append(f'| {BACKBONE_NAMES[backbone]} | reproduced | ' +
                         ' | '.join(cell(run.get(f'recall@{k}')) for k in ranks) +
                         f' | {cell(run.get("map@r"))} | {epoch_cell(run, epochs)} |')
        lines.append('')
    path = os.path.join(results, 'benchmarks.md')
    with atomic_path(path) as tmp, open(tmp, 'w') as file:
        file.write('\n'.join(lines))
    return path


def figure(results, epochs):
    """results/benchmarks.png: reproduced against published Recall@1, one panel per data set."""
    import numpy as np
    from matplotlib.patches import Patch
    plt = pyplot()
    published_colour, reproduced_colour = '0.65', 'tab:blue'
    with plt.style.context(['science', 'no-latex']):
        fig, axes = plt.subplots(1, len(DATA_NAMES), figsize=(9.5, 2.9), sharey=True)
        x, width = np.arange(len(BACKBONES)), 0.38
        for axis, data_name in zip(axes, DATA_NAMES):
            runs = [reproduced(results, data_name, b) or {} for b in BACKBONES]
            bars = [(-width / 2, [PUBLISHED.get((data_name, b), (None,))[0] for b in BACKBONES], published_colour,
                     [''] * len(BACKBONES), 'not published'),
                    (width / 2, [run.get('recall@1') for run in runs], reproduced_colour,
                     ['////' if run and run['epoch'] < epochs else '' for run in runs], 'not run')]
            for offset, values, colour, hatches, missing in bars:
                for position, value, hatch in zip(x + offset, values, hatches):
                    if value is None:
                        axis.text(position, 2, missing, rotation=90, ha='center', va='bottom', fontsize=6,
                                  color='0.35')
                        continue
                    axis.bar(position, value, width, color=colour, hatch=hatch, edgecolor='white', linewidth=0)
                    axis.text(position, value + 1, f'{value:.1f}', ha='center', va='bottom', fontsize=5.5)
            axis.set_xticks(x, [BACKBONE_NAMES[b] for b in BACKBONES], fontsize=7)
            axis.tick_params(axis='x', which='both', top=False, bottom=False)
            axis.set_xlim(-0.6, len(BACKBONES) - 0.4)
            axis.set_ylim(0, 100)
            axis.set_title(DATA_TITLES[data_name], fontsize=8)
        axes[0].set_ylabel('Recall@1 (%)')
        handles = [Patch(color=published_colour, label='published'),
                   Patch(color=reproduced_colour, label='reproduced (final epoch)'),
                   Patch(facecolor=reproduced_colour, hatch='////', edgecolor='white',
                         label=f'reproduced, unfinished (< {epochs} epochs)')]
        fig.legend(handles=handles, loc='upper center', ncol=3, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 0.9))
        path = os.path.join(results, 'benchmarks.png')
        save_figure(fig, path, dpi=200)
    return path


def get_args_parser():
    """The command-line flags of reproduce.py; flags it does not know go to train.py."""
    parser = argparse.ArgumentParser(description='Train every configuration of the README benchmark tables, then '
                                                 'tabulate the reproduced figures beside the published ones; any '
                                                 'other flag is passed on to train.py',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument('--data_path', default='/home/data', type=str,
                        help='datasets path: every one of car/, cub/, sop/ and inshop/ found there is run')
    parser.add_argument('--dry_run', action='store_true', help='print the commands instead of running them')
    parser.add_argument('--table', action='store_true',
                        help='only write results/benchmarks.md and results/benchmarks.png from the statistics CSVs '
                             'that exist')
    return parser


def main():
    """Run (or print) the grid, then write the table and the figure."""
    args, extra = get_args_parser().parse_known_args()
    epochs = train_args(['--data_path', args.data_path] + extra).num_epochs
    if not args.table:
        grid = commands(args.data_path, extra)
        for number, (description, argv) in enumerate(grid, 1):
            if args.dry_run:
                print(shlex.join(argv))
                continue
            print(f'[{number}/{len(grid)}] {description}: {shlex.join(argv)}', flush=True)
            if subprocess.run(argv).returncode:
                raise UserError(f'{description} failed (its error is above); fix that and run reproduce.py again: '
                                f'finished runs are skipped and this one resumes from its last checkpoint')
        if args.dry_run:
            return
    print(f'wrote {table("results", epochs)} and {figure("results", epochs)}')


if __name__ == '__main__':
    run_main(main)
