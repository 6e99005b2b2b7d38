"""Reproduce the README's benchmark tables: train every configuration, then tabulate and plot what
was reproduced.

    python reproduce.py --data_path /home/data              # prepare and train the whole grid, then --table
    python reproduce.py --data_path /home/data --dry_run    # only print the commands
    python reproduce.py --table                             # results/benchmarks.md and .png from the CSVs so far

The grid: each data set found under --data_path (car, cub, sop, inshop) x each backbone of
--backbones (by default the tables' resnet50, inception, googlenet; any train.py --backbone_type,
such as vit_small_dino) x each loss of --losses (by default proxy_anchor; any train.py --loss_name)
x each seed of --seeds (by default 1), with train.py's defaults, which are the seed's
hyper-parameters; a backbone the Proxy-Anchor paper also published at 256 x 256 crops (BN-Inception
on CARS196, CUB and SOP) is trained at --image_size 256 too, a row of its own; SOP is evaluated at
Recall@1/10/100/1000 and In-shop at Recall@1/10/20/30/40, the ranks their results are quoted at.
A run with a checkpoint is started with --resume, so running this again after an interruption continues the
unfinished configuration from its checkpoint, and one whose statistics CSV already reaches the final
epoch is not trained again. Any other flag is passed on to every
train.py run (say --amp, --num_workers 4 or --margin 0.2).

The table reports each run's final epoch, never its best one: picking the best epoch by its test
score is feedback from the test set. Runs of the same configuration on other prepared data sets
(train.py --data_name NAME) get a table of their own, without published figures.
"""

import argparse
import itertools
import os
import shlex
import subprocess
import sys
from typing import NamedTuple

import pandas as pd

from model import check_backbone
from runtime import ArgumentParser, UserError, atomic_path, pyplot, run_main, save_figure
from utils import DATA_NAMES, IMAGE_SIZE, check_loss_name, index_path, one_of, ranked_metric

ROOT = os.path.dirname(os.path.abspath(__file__))
PUBLISHED_BACKBONES = ('resnet50', 'inception', 'googlenet')  # the tables', in the README's order
BACKBONE_NAMES = {'resnet50': 'ResNet50', 'inception': 'Inception', 'googlenet': 'GoogLeNet'}
DEFAULT_RANKS = (1, 2, 4, 8)  # train.py's --recalls
LOSS, FEATURE_DIM = 'proxy_anchor', 512  # the published figures are Proxy-Anchor's


class Benchmark(NamedTuple):
    """A benchmark's table: its title, the K of its Recall@K, where its published figures come from,
    and those figures per backbone (Recall@K in %, None where the source gives none) at train.py's
    default --image_size; sized: {(backbone, image_size): figures} published at another size (from
    SIZED_SOURCE), rows of their own."""
    title: str
    ranks: tuple
    source: str
    published: dict
    sized: dict = {}


SIZED_SOURCE = 'the Proxy-Anchor paper (CVPR 2020), BN-Inception 512-d, R@1 only'


BENCHMARKS = {
    'car': Benchmark('CARS196', (1, 2, 4, 8), 'the original PP README', {
        'resnet50': (87.0, 92.5, 95.6, 97.4), 'inception': (84.0, 90.5, 94.3, 96.6),
        'googlenet': (78.8, 86.2, 91.5, 95.1)}, {('inception', 256): (88.3, None, None, None)}),
    'cub': Benchmark('CUB200', (1, 2, 4, 8), 'the original PP README', {
        'resnet50': (70.0, 79.6, 86.9, 92.2), 'inception': (66.7, 77.3, 85.7, 91.0),
        'googlenet': (62.5, 73.6, 82.8, 89.8)}, {('inception', 256): (71.1, None, None, None)}),
    # its R@10/100/1000 are not given at 512-d
    'sop': Benchmark('Stanford Online Products', (1, 10, 100, 1000),
                     'the Proxy-Anchor paper (CVPR 2020), BN-Inception 512-d; R@1 only',
                     {'inception': (79.1, None, None, None)},
                     {('inception', 256): (80.3, None, None, None)}),
    'inshop': Benchmark('In-shop Clothes', (1, 10, 20, 30, 40),
                        'the official Proxy-Anchor repository, BN-Inception 512-d',
                        {'inception': (91.9, 98.1, 98.7, 99.0, 99.1)}),
}
assert tuple(BENCHMARKS) == DATA_NAMES


def run_name(data_path, data_name, backbone, seed, extra, loss=LOSS):
    """The name train.py gives this run's outputs, with every flag passed on (car_resnet50_proxy_anchor_512_seed2)."""
    from train import prefix_of
    return prefix_of(train_args(train_flags(data_path, data_name, backbone, seed, extra, loss)))


def rows(data_name, backbones, losses):
    """[(backbone, loss, image_size)] of a data set's table and grid: each backbone and loss at
    train.py's default size, then each backbone published at another size (Benchmark.sized)."""
    sized = BENCHMARKS[data_name].sized if data_name in BENCHMARKS else {}
    return ([(backbone, loss, IMAGE_SIZE)
             for backbone, loss in itertools.product(backbones, losses)]
            + [(backbone, loss, size) for (backbone, size) in sized for loss in losses
               if backbone in backbones])


def sized(extra, image_size):
    """The flags passed on to train.py for a row at image_size: its --image_size first, so that one
    in extra shows (commands refuses it)."""
    return (['--image_size', str(image_size)] if image_size != IMAGE_SIZE else []) + list(extra)


def statistics_path(results, name):
    """Where train.py writes a run's per-epoch statistics."""
    return os.path.join(results, f'{name}_statistics.csv')


def present_data(data_path):
    """The data sets with a folder under data_path, in the README's order."""
    names = [name for name in DATA_NAMES if os.path.isdir(os.path.join(data_path, name))]
    if not names:
        folders = one_of([f'{name}/' for name in DATA_NAMES])
        raise UserError(f'no data set found under {data_path}: expected a folder {folders} there '
                        f'(see the README for each layout), or pass --data_path')
    return names


def train_flags(data_path, data_name, backbone, seed, extra, loss=LOSS):
    """train.py's flags for one run: everything else stays at the seed's defaults or as passed on in extra."""
    flags = [
        '--data_path',
        data_path,
        '--data_name',
        data_name,
        '--backbone_type',
        backbone,
        '--loss_name',
        loss,
    ]
    ranks = BENCHMARKS[data_name].ranks if data_name in BENCHMARKS else DEFAULT_RANKS
    if ranks != DEFAULT_RANKS:
        flags += ['--recalls', ','.join(map(str, ranks))]
    if seed != 1:  # train.py's default: seed 1's command stays the seed's
        flags += ['--seed', str(seed)]
    return flags + list(extra)


def train_args(flags):
    """train.py's arguments for these flags, checked by train.py's own parser."""
    from train import get_args_parser
    parser = get_args_parser()

    def refuse(message):
        raise UserError(
            f'train.py would refuse the flags {shlex.join(flags)} ({message}); see python train.py'
            ' --help'
        )

    parser.error = refuse  # one sentence instead of argparse's usage text and exit
    return parser.parse_args(flags)


def finished_epochs(path):
    """The number of epochs a statistics CSV holds (0 if it does not exist)."""
    return len(pd.read_csv(path)) if os.path.isfile(path) else 0


def commands(data_path, extra, results='results', backbones=PUBLISHED_BACKBONES, seeds=(1,),
             losses=(LOSS,)):
    """[(description, argv)] of the whole grid: data_utils.py for an unprepared set, then each
    train.py run, once per loss and seed."""
    grid = []
    for data_name in present_data(data_path):
        if not os.path.isfile(index_path(data_path, data_name)):
            grid.append(
                (
                    f'prepare {data_name}',
                    [
                        sys.executable,
                        os.path.join(ROOT, 'data_utils.py'),
                        '--data_path',
                        data_path,
                        '--data_name',
                        data_name,
                    ],
                )
            )
        for (backbone, loss, size), seed in itertools.product(rows(data_name, backbones, losses),
                                                              seeds):
            flags = train_flags(data_path, data_name, backbone, seed, sized(extra, size), loss)
            args, fixed = train_args(flags), {
                'data_name': data_name,
                'backbone_type': backbone,
                'loss_name': loss,
                'feature_dim': FEATURE_DIM,
                'seed': seed,
                'image_size': size,
            }
            if BENCHMARKS[data_name].ranks != DEFAULT_RANKS:
                fixed['recalls'] = ','.join(map(str, BENCHMARKS[data_name].ranks))
            for flag, value in fixed.items():
                if getattr(args, flag) != value:
                    instead = {'seed': ' from --seeds', 'loss_name': ' from --losses',
                               'image_size': f' ({IMAGE_SIZE}, and the sizes published otherwise)'
                               }.get(flag, '')
                    raise UserError(f'reproduce.py sets --{flag} itself for each configuration of '
                                    f'the tables{instead}; leave it out')
            name = run_name(data_path, data_name, backbone, seed, sized(extra, size), loss)
            epochs, done = args.num_epochs, finished_epochs(statistics_path(results, name))
            if done >= epochs:
                print(f'# {name} already reached epoch {done}: not trained again')
                continue
            # --resume continues a run that saved an epoch, and is refused where none did
            resume = ['--resume'] * os.path.isfile(os.path.join(results, f'{name}_checkpoint.pth'))
            grid.append((f'train {name}',
                         [sys.executable, os.path.join(ROOT, 'train.py')] + flags + resume))
    return grid


# --------------------------------------------------------------------------------------------------
# the table and the figure

# figures train.py records only when --metrics names them or with --rerank: a table shows their
# columns where a run computed them, the re-ranked ones apart from the plain
EXTRA = {'precision': 'P@{}', 'map': 'mAP@{}', 'mrr': 'MRR', 'nmi': 'NMI', 'ami': 'AMI',
         'rerank_recall@1': 'R@1 re-ranked', 'rerank_map@r': 'MAP@R re-ranked'}


def extra_label(key):
    """A table's heading of an EXTRA figure: P@5 for 'precision@5', NMI for 'nmi'."""
    kind, _, k = key.partition('@')
    return EXTRA[key] if key in EXTRA else EXTRA[kind].format(k)


def is_extra(key):
    """Whether a statistics column's metric (without test_) is one of EXTRA's figures."""
    return key in EXTRA or ranked_metric(key)


def extra_columns(runs):
    """The EXTRA figures that any of the runs (reproduced's summaries) has, in EXTRA's order."""
    found = {key for run in runs for key in run if is_extra(key)}
    kinds = list(EXTRA)
    return sorted(found, key=lambda key: (kinds.index(key if key in EXTRA else key.split('@')[0]),
                                          len(key), key))


def final_epoch(path, data_name):
    """{'epoch': n, 'recall@K': %, ..., 'map@r': %} of a statistics CSV's final epoch, or None if there is none."""
    if not os.path.isfile(path):
        return None
    frame = pd.read_csv(path, index_col='epoch')
    if frame.empty:
        return None
    last = frame.iloc[-1]  # the final epoch, never the best one
    row = {'epoch': int(frame.index[-1])}
    ranks = (
        BENCHMARKS[data_name].ranks
        if data_name in BENCHMARKS
        else [
            column[len('test_recall@') :]
            for column in frame.columns
            if column.startswith('test_recall@')
        ]
    )
    extras = [column[len('test_'):] for column in frame.columns
              if column.startswith('test_') and is_extra(column[len('test_'):])]
    for key in [f'recall@{k}' for k in ranks] + ['map@r'] + extras:
        if f'test_{key}' in frame.columns and pd.notna(last[f'test_{key}']):
            row[key] = 100 * float(last[f'test_{key}'])
    return row


def reproduced(results, data_name, backbone, seeds, epochs, data_path='data', extra=(), loss=LOSS):
    """One configuration over its seeds: {'seeds': the finished ones, 'training': [(seed, epoch)] of
    the unfinished, 'ranks': the K of every Recall@K found, metric: (mean, sample standard deviation
    or None for one seed) over the finished seeds}."""
    finished, summary = [], {'seeds': [], 'training': [], 'ranks': set()}
    for seed in seeds:
        row = final_epoch(
            statistics_path(results, run_name(data_path, data_name, backbone, seed, extra, loss)),
            data_name,
        )
        if row is None:
            continue
        summary['ranks'] |= {int(key[len('recall@'):]) for key in row if key.startswith('recall@')}
        if row['epoch'] < epochs:
            summary['training'].append((seed, row['epoch']))
            continue
        summary['seeds'].append(seed)
        finished.append(row)
    for key in sorted({key for row in finished for key in row if key != 'epoch'}):
        values = pd.Series([row[key] for row in finished if key in row], dtype=float)
        if len(values) == len(finished):
            # pandas' std: the sample's
            summary[key] = (values.mean(), values.std() if len(values) > 1 else None)
    return summary


def other_data(results, configurations, seeds, data_path, extra):
    """The data names beyond the benchmarks with a run of the tables' configurations (backbone,
    loss) in results, sorted."""
    found = set()
    names = os.listdir(results) if os.path.isdir(results) else []
    for backbone, loss in configurations:
        for seed in seeds:
            # a run's name is the data name followed by what the other flags add, the same for every
            # data name
            tail = run_name(data_path, 'x', backbone, seed, extra, loss)[1:] + '_statistics.csv'
            found |= {
                name[: -len(tail)]
                for name in names
                if name.endswith(tail) and len(name) > len(tail)
            }
    return sorted(found - set(DATA_NAMES))


def cell(value, signed=False):
    """A table cell: '87.0%', '72.0 ± 2.0' for (mean, spread) over seeds, '+0.4' for a difference, '-' for none."""
    if value is None:
        return '-'
    if isinstance(value, tuple):
        mean, spread = value
        return f'{mean:.1f}%' if spread is None else f'{mean:.1f} ± {spread:.1f}'
    return f'{value:+.1f}' if signed else f'{value:.1f}%'


def seeds_cell(summary, requested):
    """How many seeds a row holds, and which runs are still training."""
    text = str(len(summary['seeds'])) + (
        f' of {requested}' if len(summary['seeds']) < requested else ''
    )
    if summary['training']:
        text += (
            ' (training: '
            + ', '.join(f'seed {seed} at epoch {epoch}' for seed, epoch in summary['training'])
            + ')'
        )
    return text


def label(backbone, loss, losses, image_size=IMAGE_SIZE):
    """A row's name: the backbone's, then its crop when not the default ('Inception, 256 px'), then
    the loss's when the table compares losses."""
    name = BACKBONE_NAMES.get(backbone, backbone)
    name += f', {image_size} px' if image_size != IMAGE_SIZE else ''
    return name if tuple(losses) == (LOSS,) else f'{name}, {loss}'


def published_figures(data_name, backbone, loss, image_size):
    """A row's published Recall@K (%), None for each where there is none."""
    benchmark = BENCHMARKS[data_name]
    figures = (benchmark.published.get(backbone) if image_size == IMAGE_SIZE
               else benchmark.sized.get((backbone, image_size)))
    return figures if figures is not None and loss == LOSS else (None,) * len(benchmark.ranks)


def table(results, epochs, backbones=PUBLISHED_BACKBONES, seeds=(1,), data_path='data', extra=(),
          losses=(LOSS,)):
    """results/benchmarks.md: per data set, the reproduced final-epoch figures beside the published
    ones (those of Proxy-Anchor: other losses have none)."""
    configurations = list(itertools.product(backbones, losses))
    named = 'Proxy-Anchor loss' if tuple(losses) == (LOSS,) else f'losses {", ".join(losses)}'
    lines = [
        '# Reproduced benchmarks',
        '',
        f'{named}, {FEATURE_DIM}-d embeddings, train.py defaults (the original PP hyper-parameters)'
        + (f' with {shlex.join(extra)}' if extra else '')
        + '. "reproduced" is the final epoch of each run (the statistics CSV\'s last row, after'
        f' {epochs} epochs), never the best one: the mean ± sample standard deviation over the'
        f' seeds that have finished (asked for: {", ".join(map(str, seeds))}; "Seeds" counts'
        ' those finished; one seed has no spread). Runs still training are not counted.'
        ' "difference" is the mean minus the published figure, in points. "-" marks a'
        ' configuration with no finished run or a figure the source does not give. Written by'
        ' `python reproduce.py --table`.',
        '',
    ]
    for data_name in DATA_NAMES:
        benchmark = BENCHMARKS[data_name]
        ranks = benchmark.ranks
        sizes = sorted({size for _, size in benchmark.sized})
        source = benchmark.source + ''.join(f'; the {size} px rows: {SIZED_SOURCE}' for size in sizes)
        table_rows = rows(data_name, backbones, losses)
        summaries = [reproduced(results, data_name, backbone, seeds, epochs, data_path,
                                sized(extra, size), loss) for backbone, loss, size in table_rows]
        extras = extra_columns(summaries)
        lines += [f'## {benchmark.title}', '', f'Published: {source}.', '',
                  '| Backbone | | ' + ' | '.join(f'R@{k}' for k in ranks) + ' | MAP@R | '
                  + ''.join(f'{extra_label(key)} | ' for key in extras) + 'Seeds |',
                  '|---|---|' + '---|' * (len(ranks) + 2 + len(extras))]
        for (backbone, loss, size), ours in zip(table_rows, summaries):
            published = published_figures(data_name, backbone, loss, size)
            mine = [ours.get(f'recall@{k}') for k in ranks]
            difference = [
                None if a is None or b is None else a[0] - b for a, b in zip(mine, published)
            ]
            lines.append(
                f'| {label(backbone, loss, losses, size)} | reproduced | '
                + ' | '.join(map(cell, mine))
                + f' | {cell(ours.get("map@r"))} | '
                + ''.join(f'{cell(ours.get(key))} | ' for key in extras)
                + f'{seeds_cell(ours, len(seeds))} |'
            )
            lines.append('| | published | ' + ' | '.join(map(cell, published)) + ' | - | '
                         + '- | ' * len(extras) + '|')
            lines.append(
                '| | difference | '
                + ' | '.join(cell(d, signed=True) for d in difference)
                + ' | | ' + '| ' * len(extras) + '|'
            )
        lines.append('')
    # your own images: none published
    for data_name in other_data(results, configurations, seeds, data_path, extra):
        runs = {
            (backbone, loss): reproduced(
                results, data_name, backbone, seeds, epochs, data_path, extra, loss
            )
            for backbone, loss in configurations
        }
        ranks = sorted(set().union(*(run['ranks'] for run in runs.values())))
        extras = extra_columns(runs.values())
        lines += [f'## {data_name}', '', 'Not a benchmark: nothing published to compare with.', '',
                  '| Backbone | | ' + ' | '.join(f'R@{k}' for k in ranks) + ' | MAP@R | '
                  + ''.join(f'{extra_label(key)} | ' for key in extras) + 'Seeds |',
                  '|---|---|' + '---|' * (len(ranks) + 2 + len(extras))]
        for (backbone, loss), run in runs.items():
            if run['seeds'] or run['training']:
                lines.append(f'| {label(backbone, loss, losses)} | reproduced | ' +
                             ' | '.join(cell(run.get(f'recall@{k}')) for k in ranks) +
                             f' | {cell(run.get("map@r"))} | ' +
                             ''.join(f'{cell(run.get(key))} | ' for key in extras) +
                             f'{seeds_cell(run, len(seeds))} |')
        lines.append('')
    path = os.path.join(results, 'benchmarks.md')
    with atomic_path(path) as tmp, open(tmp, 'w') as file:
        file.write('\n'.join(lines))
    return path


def figure(results, epochs, backbones=PUBLISHED_BACKBONES, seeds=(1,), data_path='data', extra=(),
           losses=(LOSS,)):
    """results/benchmarks.png: reproduced (mean over the finished seeds, their spread as error bars)
    against published Recall@1, one panel per data set, one pair of bars per backbone and loss."""
    # every data set's rows, each drawn in the panels of the data sets that have it
    configurations = list(dict.fromkeys(row for data_name in DATA_NAMES
                                        for row in rows(data_name, backbones, losses)))
    import numpy as np
    from matplotlib.patches import Patch
    plt = pyplot()
    published_colour, reproduced_colour = '0.65', 'tab:blue'
    with plt.style.context(['science', 'no-latex']):
        fig, axes = plt.subplots(
            1, len(DATA_NAMES), figsize=(9.5 * max(1, len(configurations) / 3), 2.9), sharey=True
        )
        x, width = np.arange(len(configurations)), 0.38
        for axis, data_name in zip(axes, DATA_NAMES):
            own = rows(data_name, backbones, losses)
            runs = [reproduced(results, data_name, b, seeds, epochs, data_path, sized(extra, size),
                               loss) for b, loss, size in configurations]
            published = [published_figures(data_name, b, loss, size)[0]
                         for b, loss, size in configurations]
            bars = [
                (
                    -width / 2,
                    [(value, None) for value in published],
                    published_colour,
                    'not published',
                ),
                (
                    width / 2,
                    [run.get('recall@1', (None, None)) for run in runs],
                    reproduced_colour,
                    'not finished',
                ),
            ]
            for offset, values, colour, missing in bars:
                for position, (value, spread), row in zip(x + offset, values, configurations):
                    if row not in own:  # a row of another data set: an empty place
                        continue
                    if value is None:
                        axis.text(
                            position,
                            2,
                            missing,
                            rotation=90,
                            ha='center',
                            va='bottom',
                            fontsize=6,
                            color='0.35',
                        )
                        continue
                    axis.bar(
                        position,
                        value,
                        width,
                        color=colour,
                        edgecolor='white',
                        linewidth=0,
                        yerr=spread,
                        error_kw={'elinewidth': 0.8, 'capsize': 2, 'ecolor': 'black'},
                    )
                    axis.text(
                        position,
                        value + (spread or 0) + 1,
                        f'{value:.1f}',
                        ha='center',
                        va='bottom',
                        fontsize=5.5,
                    )
            tilted = len(configurations) > 3  # more names than fit side by side
            names = [label(b, loss, losses, size) for b, loss, size in configurations]
            axis.set_xticks(x, names, fontsize=7,
                            rotation=35 if tilted else 0, ha='right' if tilted else 'center')
            axis.tick_params(axis='x', which='both', top=False, bottom=False)
            axis.set_xlim(-0.6, len(configurations) - 0.4)
            axis.set_ylim(0, 100)
            axis.set_title(BENCHMARKS[data_name].title, fontsize=8)
        axes[0].set_ylabel('Recall@1 (%)')
        spread = 'mean ± sample std over finished seeds' if len(seeds) > 1 else 'final epoch'
        handles = [Patch(color=published_colour, label='published'),
                   Patch(color=reproduced_colour, label=f'reproduced ({spread})')]
        fig.legend(handles=handles, loc='upper center', ncol=2, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 0.9))
        path = os.path.join(results, 'benchmarks.png')
        save_figure(fig, path, dpi=200)
    return path


# "A Metric Learning Reality Check" (Musgrave et al., ECCV 2020), test set, BN-Inception trunk:
# P@1 (= R@1), R-Precision, MAP@R (%) of the 4 fold models' embeddings concatenated (4 x 128-d),
# then of the models apart (mean), each the mean over its 10 runs; the paper prints a 95% confidence
# interval beside each. Read from the paper's tables as two later papers reprint them (the
# WithinPairMining README, SimPLE's Table 7): CUB200-2011 and Cars196; SOP was not at hand.
REALITY_CHECK = {
    'cub': {
        'contrastive': (68.13, 37.24, 26.53, 59.73, 31.98, 21.18),
        'triplet': (64.24, 34.55, 23.69, 55.76, 29.55, 18.75),
        'proxy_nca': (65.69, 35.14, 24.21, 57.88, 30.16, 19.32),
        'normalized_softmax': (65.65, 35.99, 25.25, 58.75, 31.75, 20.96),
        'cosface': (67.32, 37.49, 26.70, 59.63, 31.99, 21.21),
        'arcface': (67.50, 37.31, 26.45, 60.17, 32.37, 21.49),
        'multi_similarity': (65.04, 35.40, 24.70, 57.60, 30.84, 20.15),
        'soft_triple': (67.27, 37.34, 26.51, 59.94, 32.12, 21.31),
    },
    'car': {
        'contrastive': (81.87, 35.11, 24.89, 69.80, 27.78, 17.24),
        'triplet': (79.13, 33.71, 23.02, 65.68, 26.67, 15.82),
        'proxy_nca': (83.56, 35.62, 25.38, 73.46, 28.90, 18.29),
        'normalized_softmax': (83.16, 36.20, 26.00, 72.55, 29.35, 18.73),
        'cosface': (85.52, 37.32, 27.57, 74.67, 29.01, 18.80),
        'arcface': (85.44, 37.02, 27.22, 72.10, 27.29, 17.11),
        'multi_similarity': (85.14, 38.09, 28.07, 73.77, 29.92, 19.32),
        'soft_triple': (84.49, 37.03, 27.08, 73.69, 29.29, 18.89),
    },
}


def tuned_table(results, data_path, backbones, losses, extra):
    """tune.py's reproductions of each loss side by side, per data set and backbone, as the Reality
    Check's tables: the fold models concatenated and apart, R@1, R-Precision and MAP@R, each mean ±
    95% confidence interval (%) over the seeds; from results/tune_<run name>_reproductions.csv."""
    import tune
    from utils import loss_entry
    header = ' | '.join(f'{how} {metric}' for how in ('concatenated', 'separated')
                        for metric in tune.METRICS.values())
    lines = []
    for data_name in present_data(data_path):
        for backbone in backbones:
            rows = []
            for loss in losses:
                args = train_args(train_flags(data_path, data_name, backbone, 1, extra, loss))
                name = tune.study_name(args, loss_entry(loss, args.loss_args))
                path = os.path.join(results, f'{name}_reproductions.csv')
                if os.path.isfile(path):
                    frame = pd.read_csv(path)
                    cells = [tune.mean_ci(frame[f'{how}_{metric}'])
                             for how in ('concatenated', 'separated') for metric in tune.METRICS]
                    rows.append(f'| {loss} | {len(frame)} | ' + ' | '.join(cells) + ' |')
            if rows:
                lines += ['', f'{data_name}, {backbone} (tune.py, test set, mean ± 95% CI, %)',
                          f'| loss | seeds | {header} |', '|---' * 8 + '|', *rows]
        published = [(loss, REALITY_CHECK.get(data_name, {}).get(loss)) for loss in losses]
        published = [(loss, figures) for loss, figures in published if figures]
        if published and any(line.startswith(f'{data_name}, ') for line in lines):
            lines += ['', f'{data_name}, published by A Metric Learning Reality Check (BN-Inception, '
                          f'fold models of 128 dimensions; means of 10 runs, %)',
                      f'| loss | runs | {header} |', '|---' * 8 + '|']
            lines += [f'| {loss}, published | 10 | ' + ' | '.join(f'{value:.2f}' for value in
                                                                  figures) + ' |'
                      for loss, figures in published]
    if not lines:
        raise UserError(f'no tune.py reproductions of {", ".join(losses)} under {results}/; run '
                        f'python tune.py --loss_name <loss> with the same flags first')
    return '\n'.join(lines[1:])


def backbone_list(text):
    """--backbones: comma-separated backbone types, each checked as train.py checks --backbone_type."""
    return tuple(check_backbone(name) for name in text.split(','))


def loss_list(text):
    """--losses: comma-separated distinct loss names, each checked as train.py checks --loss_name."""
    losses = tuple(check_loss_name(name) for name in text.split(','))
    if len(set(losses)) != len(losses):
        raise argparse.ArgumentTypeError(f'--losses lists a loss twice: {text}')
    return losses


def seed_list(text):
    """--seeds: comma-separated distinct integers."""
    try:
        seeds = tuple(int(part) for part in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'--seeds must be integers separated by commas, like 1,2,3, not {text!r}'
        ) from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f'--seeds lists a seed twice: {text}')
    return seeds


def get_args_parser():
    """The command-line flags of reproduce.py; flags it does not know go to train.py."""
    parser = ArgumentParser(
        description=(
            'Train every configuration of the README benchmark tables, '
            'then tabulate the reproduced figures beside the published '
            'ones; any other flag is passed on to train.py'
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        '--data_path',
        default='/home/data',
        type=str,
        help='datasets path: every one of car/, cub/, sop/ and inshop/ found there is run',
    )
    parser.add_argument(
        '--backbones',
        default=','.join(PUBLISHED_BACKBONES),
        type=backbone_list,
        help='comma-separated backbones to train and tabulate: any train.py --backbone_type',
    )
    parser.add_argument('--losses', default=LOSS, type=loss_list,
                        help='comma-separated losses to train and tabulate: any train.py '
                             '--loss_name (the published figures are proxy_anchor\'s)')
    parser.add_argument(
        '--seeds',
        default='1',
        type=seed_list,
        help=(
            'comma-separated random seeds: every configuration is trained once '
            'per seed, and the table reports the mean ± sample standard deviation '
            'over them'
        ),
    )
    parser.add_argument(
        '--dry_run', action='store_true', help='print the commands instead of running them'
    )
    parser.add_argument('--tuned', action='store_true',
                        help='only print tune.py\'s reproductions of each loss of --losses side by '
                             'side (results/tune_<run name>_reproductions.csv), as the Metric '
                             'Learning Reality Check\'s tables')
    parser.add_argument('--table', action='store_true',
                        help='only write results/benchmarks.md and results/benchmarks.png from the '
                             'statistics CSVs that exist')
    return parser


def main():
    """Run (or print) the grid, then write the table and the figure."""
    args, extra = get_args_parser().parse_known_args()
    if args.tuned:
        print(tuned_table('results', args.data_path, args.backbones, args.losses, extra))
        return
    epochs = train_args(['--data_path', args.data_path] + extra).num_epochs
    if not args.table:
        grid = commands(
            args.data_path, extra, backbones=args.backbones, seeds=args.seeds, losses=args.losses
        )
        for number, (description, argv) in enumerate(grid, 1):
            if args.dry_run:
                print(shlex.join(argv))
                continue
            print(f'[{number}/{len(grid)}] {description}: {shlex.join(argv)}', flush=True)
            if subprocess.run(argv).returncode:
                raise UserError(f'{description} failed (its error is above); fix that and run '
                                f'reproduce.py again: finished runs are skipped and this one '
                                f'resumes from its last checkpoint')
        if args.dry_run:
            return
    grid = args.backbones, args.seeds, args.data_path, extra, args.losses
    print(f'wrote {table("results", epochs, *grid)} and {figure("results", epochs, *grid)}')


if __name__ == '__main__':
    run_main(main)
