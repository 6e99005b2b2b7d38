"""Train an embedding with Proxy-Anchor, Normalized-Softmax or a baseline loss and report Recall@K
on the unseen test classes.

One GPU or the CPU: `python train.py ...`; several GPUs: `torchrun --nproc_per_node N train.py ...`.
The file reads top down: the flags, main() and train() with the helpers it calls in their order,
then one epoch, the samplers and the recipe. What a run writes under results/ is runs.py's.
"""
import argparse
import difflib
import inspect
import math
import os
import re
import shlex
import sys
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from adamp import AdamP
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import rerank
import runs
import utils  # its IMAGE_SIZE is read when the parser is built: the tests' smaller crops set it
from model import BACKBONES, TIMM_PREFIX, Model, check_backbone
from runtime import (ArgumentParser, UserError, exclusive_run, gather, gather_shards,
                     remove_temporaries, run_main, set_kernels, set_rng_state, set_seed,
                     setup_device, unwrap)
from utils import (COLLAPSED, CROP_TYPES, DATA_NAMES, LOSSES, PML_PREFIX, ImageReader, Space,
                   canonical_loss_args, check_data_name, check_loss_name, class_cosines,
                   clustering_metrics, cross_batch_loss, embed_batches, folder_name, index_path,
                   load_index, loss_entry, mean_pairwise_cosine, one_of, parse_ranks, ranked_metric,
                   retrieval_metrics)

OPTIMIZERS = ('adamp', 'adamw', 'sgd')
# where tune.py searches the learning rates (the losses' hyper-parameters declare theirs in LOSSES);
# --proxy_lr only for a loss with class proxies
OPTIMISER_SPACE = {'lr': Space(1e-6, 1e-3, log=True), 'proxy_lr': Space(1e-4, 1.0, log=True)}
# what the collapse warning suggests: it trains from random weights on a CPU
CPU_BACKBONE = 'timm/resnet18'
# the demo data set that train.py writes itself when there is no folder of that name
DEMO = 'digits'
BASE, NAMED = 'in every run name', 'names the run off its default'  # the two kinds of recipe flags
MIN_IMAGE_SIZE = 32  # the smallest crop every named backbone takes (GoogLeNet ends on a 1 x 1 map)
# --metrics: what an epoch can print; recall stands for Recall@K at every K of --recalls
METRICS = ('recall', 'map@r', 'r_precision', 'nmi', 'ami', 'precision@K', 'map@K', 'mrr')
PRINTED = ('recall', 'map@r', 'r_precision')  # the original PP code's line
CLUSTERING = ('nmi', 'ami')  # computed only when --metrics names them


# --------------------------------------------------------------------------------------------------
# the flags

def recipe(action, kind=NAMED):
    """Mark a flag as changing what a run computes: --resume refuses another value, and off its
    default it names the run (_<flag><value>) unless it is one of the name's base parts (data,
    backbone, loss, dimension)."""
    action.recipe = kind
    return action


def default_workers():
    """min(8, this process's share of the cores): torchrun's processes on one machine share its
    cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return max(1, min(8, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))


def get_args_parser():
    """The command-line flags of train.py; the seed's names and defaults are the public
    interface."""
    parser = ArgumentParser(description='Train a deep metric learning model',
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group('data')
    data.add_argument('--data_path', default='/home/data', type=str, help='datasets path')
    recipe(data.add_argument('--data_name', default='car', type=folder_name,
                             help=f'dataset name: {", ".join(DATA_NAMES)}, or any other folder '
                                  f'prepared by data_utils.py; {DEMO} is written and prepared '
                                  f'first if there is no such folder'),
           BASE)
    recipe(data.add_argument('--crop_type', default='uncropped', type=str, choices=CROP_TYPES,
                             help='images as downloaded, or cropped to their bounding boxes (data_utils.py --crop)'))
    recipe(data.add_argument('--image_size', default=utils.IMAGE_SIZE, type=int,
                             help=f'the side of the square crop a model sees, in training and at '
                                  f'test time, where the shorter side is first resized to '
                                  f'{utils.RESIZE_SIZE}/{utils.IMAGE_SIZE} of it (the Proxy-Anchor '
                                  f'paper also reports 256)'))
    data.add_argument('--cache_images', action='store_true',
                      help='decode every image once into memory (3 x H x W bytes each, per '
                           'process), so that epochs after the first only crop, resize and flip: '
                           'several times faster input')
    model = parser.add_argument_group('model')
    recipe(model.add_argument('--backbone_type', default='resnet50', type=check_backbone,
                              help=f'backbone network type: {", ".join(BACKBONES)}, or {TIMM_PREFIX}<name> for any '
                                   f'timm model'), BASE)
    recipe(model.add_argument('--feature_dim', default=512, type=int, help='feature dim'), BASE)
    recipe(model.add_argument('--no_pretrained', action='store_true',
                              help='start the backbone from random weights instead of its '
                                   'pretrained ones (offline runs)'))
    loss = parser.add_argument_group('loss')
    recipe(loss.add_argument('--loss_name', default='proxy_anchor', type=check_loss_name,
                             help=f'loss name: {", ".join(LOSSES)}, or {PML_PREFIX}<class name> for any '
                                  f'pytorch-metric-learning loss'), BASE)
    recipe(loss.add_argument('--loss_args', default='', type=canonical_loss_args,
                             help=f'parameters of a {PML_PREFIX}<class name> loss, name=value,... '
                                  f'(numbers, True/False or words); the others are at their '
                                  f'defaults'))
    for flag, (hyper, losses) in loss_flags().items():
        action = loss.add_argument(f'--{flag}', default=hyper.default, type=type(hyper.default),
                                   help=f'{hyper.help} ({", ".join(losses)})')
        if hyper.names_run:
            recipe(action)
    recipe(loss.add_argument('--xbm_size', default=0, type=int,
                             help='a pair or tuple loss also pairs each batch with a cross-batch '
                                  'memory of this many past embeddings (XBM; at least the batch '
                                  'size); 0: none'))
    recipe(loss.add_argument('--xbm_start', default=0, type=int,
                             help='training steps before the memory fills and is used (the '
                                  'official XBM code: 1000)'))
    optimisation = parser.add_argument_group('optimisation')
    recipe(optimisation.add_argument('--optimizer', default='adamp', type=str, choices=list(OPTIMIZERS),
                                     help='AdamP, AdamW, or SGD with momentum 0.9'))
    recipe(optimisation.add_argument('--lr', default=1e-4, type=float,
                                     help='learning rate of the backbone and the embedding layer'))
    recipe(optimisation.add_argument('--proxy_lr', default=1e-2, type=float, help='learning rate of the proxies'))
    recipe(optimisation.add_argument('--weight_decay', default=0.0, type=float,
                                     help='weight decay of every parameter'))
    recipe(optimisation.add_argument('--lr_step', default=5, type=int, help='epochs between two learning-rate decays'))
    recipe(optimisation.add_argument('--lr_gamma', default=0.5, type=float, help='factor of each learning-rate decay'))
    recipe(optimisation.add_argument('--batch_size', default=64, type=int,
                                     help='training batch size (over all GPUs)'))
    recipe(optimisation.add_argument('--images_per_class', default=0, type=int,
                                     help='M: class-balanced batches of batch_size / M classes '
                                          'with M images each (the official code\'s --IPC); 0: a '
                                          'plain shuffle, as the original PP code'))
    # raising --num_epochs continues a run, so it is no recipe flag
    optimisation.add_argument('--num_epochs', default=20, type=int, help='training epoch number')
    recipe(optimisation.add_argument('--warm_up', default=2, type=int,
                                     help='warm up number: epochs with a frozen backbone'))
    recipe(optimisation.add_argument('--seed', default=1, type=int, help='random seed'))
    recipe(optimisation.add_argument('--amp', action='store_true',
                                     help='speed mode: bf16 autocast and channels_last on CUDA, '
                                          'and cuDNN picks its fastest kernels (cudnn.benchmark '
                                          'on, deterministic off); without it cuDNN is '
                                          'deterministic, as in the published recipe'))
    run = parser.add_argument_group('running')
    run.add_argument('--num_workers', default=default_workers(), type=int,
                     help='data loading processes per training process: min(8, cores / processes on this machine)')
    run.add_argument('--resume', action='store_true',
                     help="continue this configuration's interrupted run from results/<name>_checkpoint.pth")
    run.add_argument('--tensorboard', action='store_true',
                     help="also log each epoch's figures for TensorBoard in results/tensorboard/<name>/")
    evaluation = parser.add_argument_group('evaluation')
    evaluation.add_argument('--recalls', default='1,2,4,8', type=str,
                            help='selected recall: the K of Recall@K, comma-separated (SOP is '
                                 'quoted at 1,10,100,1000, In-shop at 1,10,20,30,40); a K above '
                                 'the number of other test images retrieves them all')
    evaluation.add_argument('--metrics', default=','.join(PRINTED), type=metric_names,
                            help=f'the metrics each epoch prints, comma-separated, of '
                                 f'{", ".join(METRICS)} (recall: Recall@K at --recalls; K of '
                                 f'precision@K and map@K a number, as in precision@5); Recall@K, '
                                 f'MAP@R and R-Precision are always in the statistics CSV, the '
                                 f'others only when named')
    rerank.add_arguments(evaluation, 'also evaluate the test set with its lists re-ranked by this '
                                     'method, into columns of their own (test_rerank_...)')
    recipe(evaluation.add_argument('--val_fraction', default=0.0, type=float,
                                   help='hold out this fraction of the training classes (the last '
                                        'ones by class id) as a validation set, evaluated every '
                                        'epoch like the test set; 0: none, as in the original PP '
                                        'code'))
    run.add_argument('--run_name', default=None, type=str,
                     help='appended to the output names (letters, digits, ".", "-", "_"), to tell '
                          'apart runs the flags do not')
    return parser


def metric_names(text):
    """--metrics checked (its argparse type): each name one of METRICS, with a number for K, else
    one UserError."""
    names = list(dict.fromkeys(name.strip() for name in text.split(',') if name.strip()))
    for name in names:
        if name not in METRICS[:5] and not ranked_metric(name):
            close = difflib.get_close_matches(name, METRICS[:5] + ('precision@5', 'map@10', 'mrr'),
                                              n=1)
            hint = f' (did you mean {close[0]}?)' if close else ''
            raise UserError(f'--metrics names {name!r}{hint}; choose among '
                            f'{", ".join(METRICS)} (K a whole number from 1), separated by '
                            f'commas')
    if not names:
        raise UserError(f'--metrics names no metric; choose among {", ".join(METRICS)}')
    return ','.join(names)


def ranked_metrics(args):
    """The extra ranking metrics --metrics names, in its order (utils.retrieval_metrics' extra)."""
    return [name for name in args.metrics.split(',') if ranked_metric(name)]


def loss_flags():
    """{flag: (hyper-parameter, the losses that take it)} over LOSSES, in their order."""
    flags = {}
    for loss_name, entry in LOSSES.items():
        for flag, hyper in entry.hyper.items():
            if flag in flags and flags[flag][0] != hyper:
                raise ValueError(f'--{flag} is declared twice with different defaults or ranges in LOSSES')
            flags.setdefault(flag, (hyper, []))[1].append(loss_name)
    return flags


def flags_of(parser, *kinds):
    """The parser's flags of these recipe kinds (BASE: in every run name; NAMED: name the run off
    their default), in --help's order."""
    return tuple(action.dest for action in parser._actions
                 if getattr(action, 'recipe', None) in kinds)


def recipe_of(args):
    """{flag: (value, default)} of every recipe flag: --resume refuses a checkpoint trained with
    other values."""
    parser = get_args_parser()
    return {flag: (getattr(args, flag), parser.get_default(flag))
            for flag in flags_of(parser, BASE, NAMED)}


def prefix_of(args, named_flags=None):
    """The name every output of this run starts with (runs.run_name): its base parts, then each of
    the NAMED flags (or of named_flags) off its default, then --run_name."""
    parser = get_args_parser()
    named = [(flag, getattr(args, flag, parser.get_default(flag)), parser.get_default(flag))
             for flag in (flags_of(parser, NAMED) if named_flags is None else named_flags)]
    return runs.run_name(args.data_name, args.backbone_type, args.loss_name, args.feature_dim,
                         named, getattr(args, 'run_name', None))


def check_args(args, parser):
    """Flags out of range become one UserError; returns the parsed Recall@K ranks and the loss's
    LossEntry, resolved here once (a pml/<name> loss from its --loss_args)."""
    check_data_name(args.data_name, args.crop_type)
    for flag, low in (('image_size', MIN_IMAGE_SIZE), ('feature_dim', 1), ('batch_size', 1),
                      ('num_epochs', 1), ('warm_up', 0), ('num_workers', 0),
                      ('lr_step', 1)):
        if getattr(args, flag) < low:
            raise UserError(f'--{flag} must be at least {low}, not {getattr(args, flag)}')
    for flag in ('lr', 'proxy_lr'):
        if not getattr(args, flag) > 0:  # also refuses nan
            raise UserError(f'--{flag} must be positive, not {getattr(args, flag)}')
    if not 0 < args.lr_gamma <= 1:
        raise UserError(f'--lr_gamma must lie in (0, 1] (1 keeps the learning rate constant), not {args.lr_gamma}')
    if not args.weight_decay >= 0:
        raise UserError(f'--weight_decay must be 0 or more, not {args.weight_decay}')
    if not 0 <= args.val_fraction < 1:
        raise UserError(f'--val_fraction must lie in [0, 1), not {args.val_fraction}')
    if args.images_per_class:
        if args.images_per_class < 2:
            raise UserError(f'--images_per_class must be at least 2 (a class-balanced batch needs '
                            f'pairs of a class), not {args.images_per_class}; leave it out for '
                            f'plainly shuffled batches')
        if args.batch_size % args.images_per_class:
            low = args.batch_size - args.batch_size % args.images_per_class
            raise UserError(f'--batch_size {args.batch_size} is not a multiple of '
                            f'--images_per_class {args.images_per_class}; use --batch_size '
                            f'{max(low, args.images_per_class)} or {low + args.images_per_class}')
    if args.xbm_size < 0 or args.xbm_start < 0:
        raise UserError(f'--xbm_size and --xbm_start must be 0 or more, not {args.xbm_size} and '
                        f'{args.xbm_start}')
    if args.xbm_size and args.xbm_size < args.batch_size:
        raise UserError(f'--xbm_size {args.xbm_size} holds less than one batch of '
                        f'{args.batch_size}; use at least --xbm_size {args.batch_size}')
    if args.xbm_start and not args.xbm_size:
        raise UserError('--xbm_start delays a cross-batch memory, which only --xbm_size makes; '
                        'add --xbm_size or leave --xbm_start out')
    if args.loss_args and not args.loss_name.startswith(PML_PREFIX):
        raise UserError(f'--loss_args sets the parameters of a {PML_PREFIX}<class name> loss, not '
                        f'of {args.loss_name}, whose parameters are flags of their own (see '
                        f'--help); leave it out')
    # resolved once, here: an unknown or missing parameter of a PML loss stops the run at once
    entry = loss_entry(args.loss_name, args.loss_args)
    for flag, (hyper, losses) in loss_flags().items():
        value = getattr(args, flag)
        # also refuses nan
        if not (value >= hyper.low if hyper.low_included else value > hyper.low):
            bound = ('positive' if hyper.low == 0 else f'above {hyper.low}') if not hyper.low_included else \
                f'{hyper.low:g} or more'
            raise UserError(f'--{flag} must be {bound}, not {value}')
        if args.loss_name not in losses and value != hyper.default:
            raise UserError(f'--{flag} is a parameter of the {" and ".join(losses)} '
                            f'loss{"es" * (len(losses) > 1)} only, not of {args.loss_name}; leave '
                            f'it out')
    if args.run_name is not None:
        if not re.fullmatch(r'[A-Za-z0-9._-]+', args.run_name):
            raise UserError(f'--run_name may hold only letters, digits, ".", "-" and "_" (it '
                            f'becomes part of file names), not {args.run_name!r}')
        if args.run_name.startswith(flags_of(parser, NAMED)):
            raise UserError(f'--run_name {args.run_name} starts like the part a flag adds to a run '
                            f'name (such as _seed2), so two different runs could share files; '
                            f'choose a name that starts otherwise')
    rerank.params(args)  # its flags' ranges, checked before any training
    return parse_ranks(args.recalls), entry


# --------------------------------------------------------------------------------------------------
# main, train, and the helpers train calls, in the order it calls them

def main(watch=None):
    """Train, evaluating and saving after every epoch; `watch` (a Watch) follows the run."""
    parser = get_args_parser()
    args = parser.parse_args()
    ranks, entry = check_args(args, parser)
    device, rank, world = setup_device()
    prefix, watch = prefix_of(args), Watch() if watch is None else watch
    started = time.time()
    try:
        with exclusive_run(prefix, rank, world):
            train(args, prefix, ranks, entry, device, rank, world, watch)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(interrupted(args, prefix, started, world)) from None
    except torch.OutOfMemoryError:
        raise UserError(f'{device} ran out of memory with --batch_size {args.batch_size}; try a smaller one, such '
                        f'as --batch_size {max(1, args.batch_size // 2)}, or add --amp') from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def interrupted(args, prefix, started, world):
    """What Ctrl-C leaves: the epoch this run saved last (its checkpoint, if this run resumed it or
    wrote it since `started`) and the command that continues it, or that no epoch was saved yet."""
    path = runs.checkpoint_path(prefix)
    epoch = None
    if os.path.isfile(path) and (args.resume or os.path.getmtime(path) >= started):
        # mapped, not read: only the epoch is wanted
        epoch = torch.load(path, map_location='cpu', weights_only=True, mmap=True)['epoch']
    again = [arg for arg in sys.argv[1:] if arg != '--resume']
    if epoch is not None:
        again.append('--resume')
    command = shlex.join(['python', sys.argv[0], *again]) if world == 1 else (
        f'your torchrun command{" with --resume" if epoch is not None else ""}')
    if epoch is None:
        return f'no epoch of {prefix} was saved yet; start it again with: {command}'
    return f'epoch {epoch} of {prefix} is saved in {path}; continue it with: {command}'


class Watch:
    """What a caller sees of a run (the tests watch the training loop through it): train() calls
    started(run) once the Run is set up (and resumed), and trained(run, epoch, stats, features)
    after each epoch's training pass, before its evaluation and its learning-rate decay, with what
    train_one_epoch returned. This one watches nothing."""

    def started(self, run):
        """The run is set up; nothing of it has trained yet."""

    def trained(self, run, epoch, stats, features):
        """The training pass of `epoch` is done."""


class Run(NamedTuple):
    """What set_up() makes: the splits {'train', 'test', and 'gallery' or 'val' if any:
    ImageReader}, the training sampler and its loader, the model (never wrapped in DDP), the loss,
    the optimizer and its learning-rate schedule, the statistics so far ({column: [one value per
    epoch]}) and the first epoch to train."""
    splits: dict
    sampler: Sampler
    loader: DataLoader
    model: Model
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: StepLR
    statistics: dict
    start_epoch: int


def train(args, prefix, ranks, entry, device, rank, world, watch, splits=None):
    """The training run behind main(): set up, then per epoch one pass over the training set, the
    evaluation and the epoch's files; returns the statistics. splits (load_splits' dict) given, it
    trains on those instead (tune.py's folds); prefix None writes no file (a search's fold)."""
    run = set_up(args, prefix, ranks, entry, device, rank, world, splits)
    watch.started(run)
    writer = None
    if args.tensorboard and rank == 0 and prefix is not None:
        writer = runs.tensorboard_writer(prefix, run.start_epoch)
    eval_batch = 2 * max(1, args.batch_size // world)  # no activations kept: a larger batch fits
    model, trainable = run.model, None  # model: what trains, wrapped in DDP under torchrun
    for epoch in range(run.start_epoch, args.num_epochs + 1):
        if trainable is not (epoch > args.warm_up):
            trainable = epoch > args.warm_up
            set_backbone_trainable(run.model, trainable)
            if world > 1:  # DDP registers the parameters needing gradients when it wraps the model
                model = DistributedDataParallel(
                    run.model, device_ids=[device.index] if device.type == 'cuda' else None)
        run.sampler.set_epoch(epoch)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        stats, train_features = train_one_epoch(model, run.loader, run.loss, entry.cosines,
                                                run.optimizer, device, epoch, args, rank)
        watch.trained(run, epoch, stats, train_features)
        features = {split: embed_split(run.model, data, eval_batch, args.num_workers, device,
                                       args.amp, rank, world)
                    for split, data in run.splits.items() if split != 'train'}
        features['train'] = train_features
        # the epoch's learning rates, before the decay
        rates = dict(zip(LR_GROUPS, (group['lr'] for group in run.optimizer.param_groups)))
        run.scheduler.step()
        if rank == 0:
            metrics = evaluate(run.splits, features, ranks, args)
            record(run.statistics, stats, metrics)
            print_epoch(metrics, stats, epoch, args.num_epochs, device, args)
            if prefix is None:  # a search's fold: its validation classes are its only figures
                continue
            warn_if_collapsed(features['test'], epoch, args)
            if writer is not None:
                runs.log_epoch(writer, epoch, run.statistics, stats['images_per_second'], rates)
            save_epoch(args, prefix, epoch, run, entry, features)
    if writer is not None:
        writer.close()
    if rank == 0 and prefix is not None:
        last = f'results/{prefix}_{args.num_epochs}'
        print(f'wrote {last}_data_base.pth, {last}_model.pth (epoch {args.num_epochs}) and '
              f'results/{prefix}_statistics.csv; see a retrieval: python test.py --data_base '
              f'{runs.short_name(prefix)} --query_img_name '
              f'{shlex.quote(run.splits["test"].images[0])}')
    return run.statistics


def set_up(args, prefix, ranks, entry, device, rank, world, splits=None):
    """The run's data (load_splits', unless splits are given), model and recipe, and where it
    starts (resume): a Run."""
    set_seed(args.seed)
    set_kernels(args.amp)
    if args.batch_size % world:
        raise UserError(f'--batch_size {args.batch_size} is the batch over all {world} processes, '
                        f'so it must be a multiple of {world}')
    if args.data_name == DEMO:
        if rank == 0:
            write_demo(args.data_path)
        if world > 1:  # the other ranks read the demo once rank 0 has written it
            dist.barrier()
    splits = load_splits(args, rank) if splits is None else splits
    check_batches(splits['train'], args)
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
        print(f'training on {device} ({name}){f" with {world} processes" if world > 1 else ""}')
    sampler = make_sampler(splits['train'], args, rank, world)
    # the workers' seeds come from the loader's own generator: one dropout for any --num_workers
    loader = DataLoader(Marked(splits['train']), batch_sampler=sampler,
                        num_workers=args.num_workers, pin_memory=device.type == 'cuda',
                        persistent_workers=args.num_workers > 0,
                        multiprocessing_context=worker_context(splits['train'], args.num_workers),
                        generator=torch.Generator().manual_seed(args.seed))
    num_classes = splits['train'].num_classes
    # a loss on embeddings needs no proxies in the model: it holds class proxies of its own, or none
    model = Model(args.backbone_type, args.feature_dim, num_classes if entry.cosines else 0,
                  not args.no_pretrained, args.image_size).to(device)
    if args.amp:
        model = model.to(memory_format=torch.channels_last)
    loss_criterion = make_loss(entry, args, num_classes).to(device)
    # every rank computes the same global loss, so parameters equal at the start stay equal
    if world > 1:
        for parameter in loss_criterion.parameters():
            dist.broadcast(parameter.data, 0)
    if rank == 0:
        pair_hint(args, entry, loss_criterion)
    optimizer, scheduler = make_optimizer(model, args, loss_criterion)
    evaluated = [split for split in ('test', 'val') if split in splits]
    columns = ['train_loss', 'train_accuracy'] + [f'{split}_{metric}' for split in evaluated
                                                  for metric in metric_columns(args, ranks)]
    start_epoch, statistics = resume(args, prefix, model, loss_criterion, optimizer, scheduler,
                                     columns, rank)
    return Run(splits, sampler, loader, model, loss_criterion, optimizer, scheduler, statistics,
               start_epoch)


def write_demo(data_path):
    """Write and prepare the handwritten-digits demo as <data_path>/digits when there is no such
    folder; a folder of that name is the user's and is never written into, only prepared if it is
    not yet."""
    import data_utils
    root = os.path.join(data_path, DEMO)
    if not os.path.exists(root):
        print(f'there is no {root}, so the handwritten-digits demo is written there first')
        data_utils.make_demo(data_path)
    elif os.path.isfile(index_path(data_path, DEMO)):
        return
    data_utils.prepare(data_path, DEMO, workers=1)


def load_splits(args, rank):
    """{'train', 'test' (the queries of a query/gallery data set), and 'gallery' or 'val' if any:
    ImageReader}.

    An unprepared data set stops here, before anything is printed. In-shop and folders split that
    way evaluate queries against a gallery."""
    gallery = 'query' in load_index(args.data_path, args.data_name, args.crop_type)
    def read(split, **kwargs):
        return ImageReader(args.data_path, args.data_name, split, args.backbone_type,
                           args.crop_type, image_size=args.image_size, **kwargs)

    splits = {'train': read('train', seed=args.seed), 'test': read('query' if gallery else 'test')}
    if gallery:
        splits['gallery'] = read('gallery')
    if args.val_fraction > 0:
        splits['val'] = hold_out(splits['train'], args)
    # before any DataLoader worker starts, so that all of them share the decoded images
    if args.cache_images:
        start = time.perf_counter()
        caches = [data.cache_images() for data in splits.values()]
        if rank == 0:
            print(f'decoded {sum(map(len, caches))} images into memory '
                  f'({sum(c.nbytes for c in caches) / 2 ** 30:.1f} GiB) in '
                  f'{time.perf_counter() - start:.0f} s')
    return splits


def check_batches(train_data, args):
    """A UserError where --batch_size and --images_per_class ask for more images or classes than the
    training set has."""
    if args.batch_size > len(train_data):
        raise UserError(f'--batch_size {args.batch_size} is larger than the {len(train_data)} '
                        f'training images of {args.data_name}; use a smaller --batch_size')
    classes, per_batch = train_data.num_classes, args.batch_size // max(1, args.images_per_class)
    if args.images_per_class and per_batch > classes:
        raise UserError(f'--batch_size {args.batch_size} with --images_per_class '
                        f'{args.images_per_class} asks for {per_batch} classes per batch, but the '
                        f'training set of {args.data_name} has only {classes}; use a --batch_size '
                        f'of at most {classes * args.images_per_class} or a larger '
                        f'--images_per_class')


def resume(args, prefix, model, loss_criterion, optimizer, scheduler, columns, rank):
    """(first epoch, statistics so far): those of this configuration's checkpoint with --resume,
    else (1, empty)."""
    if prefix is None:  # a search's fold: nothing to resume
        return 1, {column: [] for column in columns}
    path = runs.checkpoint_path(prefix)
    if rank == 0:  # what a run of this configuration killed mid-write left behind
        remove_temporaries('results', f'{prefix}_')
    if args.resume and os.path.exists(path):
        checkpoint = runs.load_checkpoint(path, recipe_of(args), args.num_epochs)
        model.load_state_dict(checkpoint['model'])
        loss_criterion.load_state_dict(checkpoint['loss'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        scheduler.load_state_dict(checkpoint['scheduler'])
        set_rng_state(checkpoint['rng'])
        if rank == 0:
            print(f'resuming {path} after epoch {checkpoint["epoch"]}')
        # a column --metrics or --rerank adds now is empty (NaN) for the epochs before; one it
        # no longer adds keeps its figures
        earlier = checkpoint['statistics']
        statistics = {column: earlier.get(column, [math.nan] * checkpoint['epoch'])
                      for column in columns}
        return checkpoint['epoch'] + 1, {**statistics, **earlier, **statistics}
    if args.resume:
        runs.refuse_renamed_run(prefix_of(args, runs.OLD_NAMED_FLAGS), prefix, recipe_of(args))
        runs.refuse_resume_without_checkpoint(path, recipe_of(args))
    if rank == 0:
        if os.path.exists(path):
            print(f'{path} holds an earlier run, which this one replaces after its first epoch; '
                  f'stop now and add --resume to continue that run instead')
    return 1, {column: [] for column in columns}


def metric_columns(args, ranks):
    """The metrics an evaluated split records, in the statistics CSV's order: the retrieval ones,
    the ranking ones --metrics names (precision@K, map@K, mrr), NMI and AMI when it names either,
    and with --rerank the retrieval ones and the named precision@K and map@K re-ranked."""
    retrieval = [f'recall@{k}' for k in ranks] + ['map@r', 'r_precision']
    clustering = list(CLUSTERING) if set(args.metrics.split(',')) & set(CLUSTERING) else []
    reranked = (retrieval + rerank.list_extra(ranked_metrics(args))) if args.rerank else []
    reranked = [f'{RERANKED}{metric}' for metric in reranked]
    return retrieval + ranked_metrics(args) + clustering + reranked


RERANKED = 'rerank_'  # the prefix of the re-ranked figures' columns: never mixed with the plain


def evaluate(splits, features, ranks, args):
    """{split: {metric column: value}} for the test set (its queries against the gallery, if any)
    and the validation split, the columns of metric_columns."""
    gallery = {'gallery_features': features['gallery'], 'gallery_labels': torch.tensor(splits['gallery'].labels)} \
        if 'gallery' in splits else {}
    columns, metrics = metric_columns(args, ranks), {}
    for split in ('val', 'test'):  # validation first: the test line ends the report
        if split not in splits:
            continue
        labels, searched = torch.tensor(splits[split].labels), gallery if split == 'test' else {}
        metrics[split] = retrieval_metrics(features[split], labels, ranks, **searched,
                                           extra=ranked_metrics(args))
        if CLUSTERING[0] in columns:
            metrics[split].update(clustering_metrics(features[split], labels))
        if args.rerank:
            reranked = rerank.rerank_metrics(features[split], labels, ranks, args.rerank,
                                             **searched, extra=ranked_metrics(args),
                                             **rerank.params(args))
            metrics[split].update({RERANKED + key: value for key, value in reranked.items()})
    return metrics


def record(statistics, stats, metrics):
    """Append an epoch's training figures (train_one_epoch's stats) and its metrics {split: {metric:
    value}} to the statistics; a column the epoch does not compute (kept from a resumed run) gets
    NaN."""
    statistics['train_loss'].append(stats['loss'])
    statistics['train_accuracy'].append(stats['accuracy'])
    for split, values in metrics.items():
        for metric, value in values.items():
            statistics[f'{split}_{metric}'].append(value)
    for values in statistics.values():
        values.extend([math.nan] * (len(statistics['train_loss']) - len(values)))


SHORT = {'map@r': 'MAP@R', 'r_precision': 'RP', 'nmi': 'NMI', 'ami': 'AMI', 'mrr': 'MRR',
         'precision': 'P', 'map': 'mAP'}  # print_epoch's names


def short_name(name):
    """A metric's name in print_epoch's line: MAP@R, RP, P@5, mAP@10, MRR."""
    kind, at, k = name.partition('@')
    return SHORT[name] if name in SHORT else f'{SHORT[kind]}{at}{k}'


def print_epoch(metrics, stats, epoch, num_epochs, device, args):
    """An epoch's metrics that --metrics names, one line per split, and with --rerank one more of
    the re-ranked ones; the test line ends with the training speed."""
    memory = (f', peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB'
              if device.type == 'cuda' else '')
    named = args.metrics.split(',')
    for split, values in metrics.items():
        lines = [('', '')] + ([(f' ({args.rerank})', RERANKED)] if args.rerank else [])
        for label, prefix in lines:
            figures = []
            for name in named:
                if name == 'recall':
                    figures += [f'R@{column[len(prefix) + len("recall@"):]}:'
                                f'{100 * value:.2f}%' for column, value in values.items()
                                if column.startswith(f'{prefix}recall@')]
                elif prefix + name in values:
                    figures.append(f'{short_name(name)}:{100 * values[prefix + name]:.2f}%')
            speed = (f' | train {stats["images_per_second"]:.1f} images/s{memory}'
                     if split == 'test' and not prefix else '')
            print(f'{split.capitalize()}{label} Epoch {epoch}/{num_epochs} '
                  + ' '.join(figures) + speed)


def warn_if_collapsed(test_features, epoch, args):
    """One line when the epoch's test embeddings have collapsed onto one direction: their
    similarities then say nothing to a reader, and their rankings turn on differences in the sixth
    decimal, which training may wipe out."""
    cosine = mean_pairwise_cosine(test_features)
    if cosine > COLLAPSED:
        tries = ([f'--backbone_type {CPU_BACKBONE}'] if args.backbone_type != CPU_BACKBONE else [])
        tries += ['pretrained weights (without --no_pretrained)'] if args.no_pretrained else []
        tries += [f'a lower --lr than {args.lr:g}']
        print(f'warning: the test embeddings of epoch {epoch} have collapsed onto one direction '
              f'(mean cosine between two test images {cosine:.6f}), so every similarity reads '
              f'about 1.000 and the figures above rest on tiny differences; try {one_of(tries)}')


def save_epoch(args, prefix, epoch, run, entry, features):
    """The epoch's files (runs.save_epoch): its weights, the data base of the train, test and
    gallery features with the unit class proxies, and the loss's, optimizer's and schedule's states
    for the checkpoint."""
    weights = run.model.state_dict()
    proxies = data_base_proxies(run.model, run.loss, entry.cosines).detach().cpu()
    proxies = F.normalize(proxies, dim=-1)
    splits = {split: (data.images, data.labels, features[split])
              for split, data in run.splits.items() if split != 'val'}
    data_base = runs.new_data_base(splits, proxies, epoch, args.data_path, weights, vars(args))
    states = {'loss': run.loss.state_dict(), 'optimizer': run.optimizer.state_dict(),
              'scheduler': run.scheduler.state_dict()}
    runs.save_epoch(prefix, epoch, run.statistics, weights, data_base, states)


def data_base_proxies(model, loss_criterion, on_cosines):
    """The class proxies a data base stores: the model's (C, D) for a loss on cosines, or those the
    loss holds itself, (C, D) or (C, K, D) for K per class, or (0, D) for a loss without any."""
    if on_cosines:
        return model.proxies.weight
    own = loss_criterion.class_proxies()
    if own is None:
        return model.proxies.weight.new_zeros(0, model.proxies.weight.size(1))
    return own[:, 0] if own.size(1) == 1 else own


# --------------------------------------------------------------------------------------------------
# one epoch: global batches dealt to the ranks, the loss over the gathered batch, the embeddings

def train_one_epoch(model, loader, loss_criterion, on_cosines, optimizer, device, epoch, args,
                    rank):
    """Train for one epoch of loader (a Marked data set read by a GlobalBatches), with a loss on the
    cosines to the model's proxies (on_cosines, LossEntry.cosines) or on the embeddings; under --amp
    in bf16 autocast.

    Returns a stats dict with loss, accuracy and images per second, and the (N, D) embeddings the
    training pass produced, in data-set order: the seed stores those (augmented, and from weights
    that change along the epoch) as the data base's training features, which costs no extra pass.
    """
    model.train()
    if not args.no_pretrained:  # the backbone's BatchNorm statistics stay as pretrained on ImageNet
        for module in unwrap(model).backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    features = torch.zeros(len(loader.dataset), args.feature_dim, dtype=torch.float32)  # (N, D)
    total_loss, total_correct, total_num, start = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f'Train Epoch {epoch}/{args.num_epochs}', dynamic_ncols=True,
               disable=rank != 0)
    for step, (images, labels, indices) in enumerate(bar, 1):
        images = images.to(device, non_blocking=True)
        if args.amp:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss, embeddings, cosines, labels = batch_loss(model, images, labels, loss_criterion,
                                                           on_cosines)
        if not torch.isfinite(loss):
            kept = (f'the checkpoint of epoch {epoch - 1} is kept, so lower the learning rate or '
                    f'check the data, then run again with --resume' if epoch > 1 else
                    'no checkpoint was written yet, so lower the learning rate or check the data '
                    'and run again')
            raise UserError(f'the loss became {loss.item()} at epoch {epoch}, step {step}; {kept}')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # the data-set indices of the gathered rows: the order batch_loss keeps them in
        rows = gather(indices.to(device))
        features[rows[rows != PADDING].cpu()] = embeddings.detach().float().cpu()
        total_num += labels.size(0)
        total_loss += loss.item() * labels.size(0)
        if cosines is None:  # no class proxies: accuracy does not apply
            total_correct = math.nan
            bar.set_postfix(loss=f'{total_loss / total_num:.4f}')
            continue
        total_correct += (cosines.argmax(dim=-1) == labels).sum().item()
        bar.set_postfix(loss=f'{total_loss / total_num:.4f}',
                        acc=f'{100 * total_correct / total_num:.2f}%')
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {'loss': total_loss / total_num, 'accuracy': total_correct / total_num,
            'images_per_second': total_num / seconds}, features


def batch_loss(model, images, labels, loss_criterion, on_cosines):
    """Loss of the global batch: embeddings and labels are gathered over all ranks before the loss.

    Proxy-Anchor's terms average over the proxies with positives in the batch, and a pair-based loss
    pairs every image with every other, so the loss is only the single-GPU loss when it sees the
    whole batch. Rows labelled PADDING (a rank's share of the last, partial batch filled up to the
    others' length) are left out. The loss is called on the cosines to the model's proxies
    (on_cosines) or on the embeddings. Returns (loss, global embeddings, their cosines to the class
    proxies or None for a loss without any, their labels).
    """
    embeddings, cosines = model(images)  # (B, D), (B, C)
    if dist.is_initialized():
        labels, embeddings = gather(labels), gather(embeddings)  # (W * B,), (W * B, D)
        keep = labels != PADDING
        labels, embeddings = labels[keep], embeddings[keep]
        cosines = unwrap(model).proxies(embeddings)  # (B_global, C)
    if on_cosines:
        return loss_criterion(cosines, labels), embeddings, cosines, labels
    own = loss_criterion.class_proxies()  # (C, K, D) or None
    cosines = class_cosines(embeddings, own) if own is not None else None
    return loss_criterion(embeddings, labels), embeddings, cosines, labels


def embed_split(model, dataset, batch_size, num_workers, device, amp, rank, world):
    """Embeddings (N, D) of a whole split on the CPU, as test.py embeds images
    (utils.embed_batches); under torchrun each rank embeds 1/W and all gather."""
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size, num_workers=num_workers, pin_memory=device.type == 'cuda',
                        multiprocessing_context=worker_context(dataset, num_workers))
    features = embed_batches(unwrap(model), (images for images, _ in loader), amp)  # (N / W, D)
    return (gather_shards(features, len(dataset)) if world > 1 else features).cpu()



def worker_context(dataset, num_workers):
    """'fork' for DataLoader workers of a cached data set: they share its ImageCache, not a pickled
    copy each."""
    cached = getattr(dataset, 'cache', None) is not None
    forks = 'fork' in torch.multiprocessing.get_all_start_methods()
    return 'fork' if cached and num_workers > 0 and forks else None


# --------------------------------------------------------------------------------------------------
# the samplers: global batches of data-set indices, each rank's share, the padding that evens them

PADDING = -1  # the label and index of a padding row


def make_sampler(data, args, rank, world):
    """This rank's GlobalBatches of the training set: class-balanced with --images_per_class, else
    shuffled."""
    if args.images_per_class:
        return ClassBalancedBatches(data.labels, args.batch_size, args.images_per_class, rank,
                                    world, args.seed)
    return GlobalBatches(len(data), args.batch_size, rank, world, args.seed)


class Marked(Dataset):
    """A seeded ImageReader as GlobalBatches reads it: item (index, epoch, padding) -> (augmented
    image, label, index), the label and the index PADDING for a padding row; so the epoch loop knows
    its padding by this mark."""

    def __init__(self, data):
        self.data = data

    def __getitem__(self, item):
        index, epoch, padding = item
        image, label = self.data[index, epoch]
        return (image, PADDING, PADDING) if padding else (image, label, index)

    def __len__(self):
        return len(self.data)


class GlobalBatches(Sampler):
    """This rank's share of every global batch of an epoch: lists of (index, epoch, padding) items.

    The epoch's order is torch.randperm seeded with seed + epoch (as DistributedSampler's), cut into
    global batches of batch_size, the last one partial as in the seed (drop_last=False); rank r
    takes items r, r + W, ... of each. So the ranks together see exactly the batches one process
    sees. The ranks' shares of the last batch may differ in length by one: the shorter ones are
    filled up with their batch's first image, made here with padding True, so that every rank takes
    the same number of steps and gathers equal-sized tensors; batch_loss and the epoch loop leave it
    out.
    """

    def __init__(self, size, batch_size, rank=0, world=1, seed=0):
        self.size, self.batch_size, self.rank, self.world, self.seed = size, batch_size, rank, world, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        """Select the shuffle order and augmentation seeds of one epoch."""
        self.epoch = epoch

    def global_batches(self):
        """The epoch's global batches of data-set indices, in the order one process would train on
        them."""
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        return [order[start:start + self.batch_size] for start in range(0, self.size, self.batch_size)]

    def __iter__(self):
        for batch in self.global_batches():
            share = batch[self.rank::self.world]
            # 1 for a shorter share of a partial batch, else 0
            padding = -(-len(batch) // self.world) - len(share)
            yield ([(index, self.epoch, False) for index in share]
                   + [(batch[0], self.epoch, True)] * padding)

    def __len__(self):
        return -(-self.size // self.batch_size)


class ClassBalancedBatches(GlobalBatches):
    """GlobalBatches of P = batch_size / M classes with M images each (--images_per_class M), like
    PML's MPerClassSampler and the official Proxy-Anchor code's --IPC, dealt to the ranks as
    GlobalBatches deals them.

    An epoch sees every image at least once: each class's images, shuffled, are cut into groups of
    M, its last group filled up with other images of the class (a class smaller than M repeats its
    images to fill its one group). Each batch then takes one group from each of the P classes with
    the most groups left (ties, the common case, broken at random), which spreads large classes over
    the epoch and sees every group exactly once whenever the groups can be dealt so; once fewer than
    P classes have groups left, the batch is filled up with a fresh group of other classes. So an
    epoch is about (number of groups) / P batches, all full (the official code instead draws
    len(dataset) // batch_size batches with replacement). The draws are seeded by seed + epoch, so a
    resumed run and every torchrun rank draw the same batches.
    """

    def __init__(self, labels, batch_size, images_per_class, rank=0, world=1, seed=0):
        super().__init__(len(labels), batch_size, rank, world, seed)
        self.labels, self.per_class = torch.as_tensor(labels), images_per_class

    def global_batches(self):
        """The epoch's global batches of data-set indices, each M images of each of P classes, one
        class after another."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        # per class
        members = [(self.labels == label).nonzero()[:, 0] for label in self.labels.unique()]
        groups = []  # per class: its groups of M images
        for images in members:
            images = images[torch.randperm(len(images), generator=generator)]
            # the images in full groups: the last one's fillers
            whole = len(images) - len(images) % self.per_class
            groups.append(torch.cat([images, self.fill(images[:whole] if whole else images,
                                                       -len(images) % self.per_class, generator)]).view(
                -1, self.per_class))
        # (C,) groups not yet drawn
        left = torch.tensor([len(group) for group in groups], dtype=torch.float64)
        classes, batches = self.batch_size // self.per_class, []
        while left.sum() > 0:
            priority = torch.where(left > 0, left + torch.rand(len(left), generator=generator, dtype=left.dtype), -1)
            chosen = priority.topk(min(classes, int((left > 0).sum()))).indices.tolist()
            batch = []
            for label in chosen:
                batch += groups[label][len(groups[label]) - int(left[label])].tolist()
                left[label] -= 1
            others = torch.ones(len(groups), dtype=torch.float64)
            others[chosen] = 0
            fillers = torch.multinomial(others, classes - len(chosen), generator=generator).tolist() \
                if len(chosen) < classes else []
            for label in fillers:
                batch += self.fresh_group(members[label], generator).tolist()
            batches.append(batch)
        return batches

    def fresh_group(self, images, generator):
        """M of a class's images drawn at random, all of them and repeats for a class smaller than
        M."""
        if len(images) >= self.per_class:
            return self.fill(images, self.per_class, generator)
        return torch.cat([images, self.fill(images, self.per_class - len(images), generator)])

    @staticmethod
    def fill(images, count, generator):
        """count more of a class's images drawn from images: without repeats where there are
        enough."""
        if len(images) >= count:
            return images[torch.randperm(len(images), generator=generator)[:count]]
        return images[torch.randint(len(images), (count,), generator=generator)]

    def __len__(self):
        return len(self.global_batches())  # drawn again: the same batches, seeded by seed + epoch



# --------------------------------------------------------------------------------------------------
# the recipe: validation split, loss, optimizer, warm-up

def hold_out(train_data, args):
    """Move the last --val_fraction of the training classes (by class id) out of train_data into a
    validation set, which is embedded without augmentation like the test set; returns it."""
    classes = train_data.num_classes
    held = round(args.val_fraction * classes)
    if held < 2 or classes - held < 2:
        raise UserError(f'--val_fraction {args.val_fraction} of the {classes} training classes of '
                        f'{args.data_name} holds out {held} and trains on {classes - held}, but '
                        f'each side needs at least 2 classes; choose a fraction between '
                        f'{2 / classes:.3g} and {1 - 2 / classes:.3g}')
    val_data = ImageReader(args.data_path, args.data_name, 'train', args.backbone_type,
                           args.crop_type, augment=False, image_size=args.image_size)
    val_data.keep_classes(classes - held, classes)
    train_data.keep_classes(0, classes - held)
    return val_data


def make_loss(entry, args, num_classes=None):
    """The loss of a LossEntry (check_args resolves --loss_name's), with its hyper-parameters'
    flags, and the number of training classes and the embedding size when it holds class proxies of
    its own."""
    sizes = {'num_classes': num_classes, 'embedding_size': args.feature_dim}
    wanted = inspect.signature(entry.build).parameters
    loss = entry.build(**{flag: getattr(args, flag) for flag in entry.hyper},
                       **{key: value for key, value in sizes.items() if key in wanted})
    if not getattr(args, 'xbm_size', 0):
        return loss
    return cross_batch_loss(loss, args.loss_name, args.xbm_size, args.xbm_start, args.feature_dim)


def pair_hint(args, entry, loss_criterion):
    """One line for a pair-based loss (on embeddings, without class proxies) trained on the seed's
    shuffled batches, which may hold few positive pairs."""
    if not entry.cosines and loss_criterion.class_proxies() is None and not args.images_per_class:
        print(f'{args.loss_name} learns from pairs of one class within a batch, which shuffled '
              f'batches of {args.batch_size} may hold few of; pass --images_per_class 4 (or 2) for '
              f'class-balanced batches')


def make_optimizer(model, args, loss_criterion=None):
    """The optimizer over two groups, the proxies (the model's, and the loss's own parameters) at
    --proxy_lr and the backbone and the head at --lr, and its StepLR."""
    backbone, head, proxies = model.parameter_groups()
    own = list(loss_criterion.parameters()) if loss_criterion is not None else []
    groups = [{'params': backbone + head}, {'params': proxies + own, 'lr': args.proxy_lr}]
    # the seed's: AdamP's defaults otherwise (betas 0.9/0.999, eps 1e-8)
    if args.optimizer == 'adamp':
        optimizer = ChannelsLastAdamP(groups, lr=args.lr, weight_decay=args.weight_decay)
    elif args.optimizer == 'adamw':
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return optimizer, StepLR(optimizer, step_size=args.lr_step, gamma=args.lr_gamma)


LR_GROUPS = ('backbone_and_head', 'proxies')  # make_optimizer's parameter groups, in order


class ChannelsLastAdamP(AdamP):
    """AdamP that also steps channels_last weights (--amp): its per-channel views become reshapes.

    AdamP flattens each weight with .view(), which channels_last strides do not allow; .reshape()
    gives the same values (a copy only for channels_last), so the update is AdamP's exactly.
    """

    def _channel_view(self, x):
        return x.reshape(x.size(0), -1)

    def _layer_view(self, x):
        return x.reshape(1, -1)


def set_backbone_trainable(model, trainable):
    """Freeze or unfreeze the backbone (the warm-up trains only the embedding layer and the
    proxies)."""
    for parameter in model.parameter_groups()[0]:
        parameter.requires_grad_(trainable)


if __name__ == '__main__':
    run_main(main)
