"""Train an embedding with Proxy-Anchor, Normalized-Softmax or a baseline loss and report Recall@K on the unseen
test classes.

One GPU or the CPU: `python train.py ...`; several GPUs: `torchrun --nproc_per_node N train.py ...`.
"""
import argparse
import inspect
import math
import os
import re
import shlex
import time

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from adamp import AdamP
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from model import BACKBONES, TIMM_PREFIX, Model, backbone_file_name, check_backbone
from runtime import (ArgumentParser, UserError, atomic_path, atomic_save, exclusive_run, gather, gather_shards,
                     pyplot, remove_temporaries, rng_state, run_main, safe_load, save_figure, set_kernels,
                     set_rng_state, set_seed, setup_device, unwrap)
from utils import (COLLAPSED, CROP_TYPES, DATA_NAMES, LOSSES, PML_PREFIX, EmbeddingLoss, ImageReader,
                   canonical_loss_args, check_loss_name, class_cosines, embed_batches, folder_name,
                   index_path, load_index, loss_entry, make_data_base, mean_pairwise_cosine, one_of,
                   parse_ranks, retrieval_metrics)

OPTIMIZERS = ('adamp', 'adamw', 'sgd')
CPU_BACKBONE = 'timm/resnet18'  # what the collapse warning suggests: it trains from random weights on a CPU
DEMO = 'digits'  # the demo data set that train.py writes itself when there is no folder of that name
BASE, NAMED = 'in every run name', 'names the run off its default'  # the two kinds of recipe flags


def recipe(action, kind=NAMED):
    """Mark a flag as changing what a run computes: --resume refuses another value, and off its default it names
    the run (_<flag><value>) unless it is one of the name's base parts (data, backbone, loss, dimension)."""
    action.recipe = kind
    return action


def default_workers():
    """min(8, this process's share of the cores): torchrun's processes on one machine share its cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return max(1, min(8, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))


def get_args_parser():
    """The command-line flags of train.py; the seed's names and defaults are the public interface."""
    parser = ArgumentParser(description='Train a deep metric learning model',
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group('data')
    data.add_argument('--data_path', default='/home/data', type=str, help='datasets path')
    recipe(data.add_argument('--data_name', default='car', type=folder_name,
                             help=f'dataset name: {", ".join(DATA_NAMES)}, or any other folder prepared by '
                                  f'data_utils.py; {DEMO} is written and prepared first if there is no such folder'),
           BASE)
    recipe(data.add_argument('--crop_type', default='uncropped', type=str, choices=CROP_TYPES,
                             help='images as downloaded, or cropped to their bounding boxes (data_utils.py --crop)'))
    data.add_argument('--cache_images', action='store_true',
                      help='decode every image once into memory (3 x H x W bytes each, per process), so that epochs '
                           'after the first only crop, resize and flip: several times faster input')
    model = parser.add_argument_group('model')
    recipe(model.add_argument('--backbone_type', default='resnet50', type=check_backbone,
                              help=f'backbone network type: {", ".join(BACKBONES)}, or {TIMM_PREFIX}<name> for any '
                                   f'timm model'), BASE)
    recipe(model.add_argument('--feature_dim', default=512, type=int, help='feature dim'), BASE)
    recipe(model.add_argument('--no_pretrained', action='store_true',
                              help='start the backbone from random weights instead of its pretrained ones (offline '
                                   'runs)'))
    loss = parser.add_argument_group('loss')
    recipe(loss.add_argument('--loss_name', default='proxy_anchor', type=check_loss_name,
                             help=f'loss name: {", ".join(LOSSES)}, or {PML_PREFIX}<class name> for any '
                                  f'pytorch-metric-learning loss'), BASE)
    recipe(loss.add_argument('--loss_args', default='', type=canonical_loss_args,
                             help=f'parameters of a {PML_PREFIX}<class name> loss, name=value,... (numbers, True/False '
                                  f'or words); the others are at their defaults'))
    for flag, (hyper, losses) in loss_flags().items():
        action = loss.add_argument(f'--{flag}', default=hyper.default, type=type(hyper.default),
                                   help=f'{hyper.help} ({", ".join(losses)})')
        if hyper.names_run:
            recipe(action)
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
                                     help='M: class-balanced batches of batch_size / M classes with M images each '
                                          '(the official code\'s --IPC); 0: the seed\'s shuffled order'))
    # raising --num_epochs continues a run, so it is no recipe flag
    optimisation.add_argument('--num_epochs', default=20, type=int, help='training epoch number')
    recipe(optimisation.add_argument('--warm_up', default=2, type=int,
                                     help='warm up number: epochs with a frozen backbone'))
    recipe(optimisation.add_argument('--seed', default=1, type=int, help='random seed'))
    recipe(optimisation.add_argument('--amp', action='store_true',
                                     help='speed mode: bf16 autocast and channels_last on CUDA, and cuDNN picks its '
                                          'fastest kernels (cudnn.benchmark on, deterministic off); without it cuDNN '
                                          'is deterministic, as in the published recipe'))
    run = parser.add_argument_group('running')
    run.add_argument('--num_workers', default=default_workers(), type=int,
                     help='data loading processes per training process: min(8, cores / processes on this machine)')
    run.add_argument('--resume', action='store_true',
                     help="continue this configuration's interrupted run from results/<name>_checkpoint.pth")
    run.add_argument('--tensorboard', action='store_true',
                     help="also log each epoch's figures for TensorBoard in results/tensorboard/<name>/")
    evaluation = parser.add_argument_group('evaluation')
    evaluation.add_argument('--recalls', default='1,2,4,8', type=str,
                            help='selected recall: the K of Recall@K, comma-separated (SOP is quoted at '
                                 '1,10,100,1000, In-shop at 1,10,20,30,40); a K above the number of other test images '
                                 'retrieves them all')
    recipe(evaluation.add_argument('--val_fraction', default=0.0, type=float,
                                   help='hold out this fraction of the training classes (the last ones by class id) '
                                        'as a validation set, evaluated every epoch like the test set; 0: none, as '
                                        'in the seed'))
    run.add_argument('--run_name', default=None, type=str,
                     help='appended to the output names (letters, digits, ".", "-", "_"), to tell apart runs the '
                          'flags do not')
    return parser


def loss_flags():
    """{flag: (hyper-parameter, the losses that take it)} over LOSSES, in their order."""
    flags = {}
    for loss_name, entry in LOSSES.items():
        for flag, hyper in entry.hyper.items():
            if flag in flags and flags[flag][0] != hyper:
                raise ValueError(f'--{flag} is declared twice with different defaults or ranges in LOSSES')
            flags.setdefault(flag, (hyper, []))[1].append(loss_name)
    return flags


def flags_of(*kinds):
    """train.py's flags of these recipe kinds, in --help's order."""
    return tuple(action.dest for action in get_args_parser()._actions if getattr(action, 'recipe', None) in kinds)


RECIPE_FLAGS = flags_of(BASE, NAMED)  # --resume refuses a checkpoint trained with other values
NAMED_FLAGS = flags_of(NAMED)  # off their defaults they name the run, so runs of other settings never share files


def check_args(args):
    """Flags out of range become one UserError; returns the parsed Recall@K ranks."""
    for flag, low in (('feature_dim', 1), ('batch_size', 1), ('num_epochs', 1), ('warm_up', 0), ('num_workers', 0),
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
            raise UserError(f'--images_per_class must be at least 2 (a class-balanced batch needs pairs of a class), '
                            f'not {args.images_per_class}; leave it out for the seed\'s shuffled batches')
        if args.batch_size % args.images_per_class:
            low = args.batch_size - args.batch_size % args.images_per_class
            raise UserError(f'--batch_size {args.batch_size} is not a multiple of --images_per_class '
                            f'{args.images_per_class}; use --batch_size {max(low, args.images_per_class)} or '
                            f'{low + args.images_per_class}')
    if args.loss_args and not args.loss_name.startswith(PML_PREFIX):
        raise UserError(f'--loss_args sets the parameters of a {PML_PREFIX}<class name> loss, not of '
                        f'{args.loss_name}, whose parameters are flags of their own (see --help); leave it out')
    loss_entry(args.loss_name, args.loss_args)  # an unknown or missing parameter of a PML loss stops here
    for flag, (hyper, losses) in loss_flags().items():
        value = getattr(args, flag)
        if not (value >= hyper.low if hyper.low_included else value > hyper.low):  # also refuses nan
            bound = ('positive' if hyper.low == 0 else f'above {hyper.low}') if not hyper.low_included else \
                f'{hyper.low:g} or more'
            raise UserError(f'--{flag} must be {bound}, not {value}')
        if args.loss_name not in losses and value != hyper.default:
            raise UserError(f'--{flag} is a parameter of the {" and ".join(losses)} loss{"es" * (len(losses) > 1)} '
                            f'only, not of {args.loss_name}; leave it out')
    if args.run_name is not None:
        if not re.fullmatch(r'[A-Za-z0-9._-]+', args.run_name):
            raise UserError(f'--run_name may hold only letters, digits, ".", "-" and "_" (it becomes part of file '
                            f'names), not {args.run_name!r}')
        if args.run_name.startswith(NAMED_FLAGS):
            raise UserError(f'--run_name {args.run_name} starts like the part a flag adds to a run name (such as '
                            f'_seed2), so two different runs could share files; choose a name that starts otherwise')
    return parse_ranks(args.recalls)


# ----------------------------------------------------------------------------------------------------------------------

def main():
    """Train, evaluating and saving after every epoch."""
    args = get_args_parser().parse_args()
    ranks = check_args(args)
    device, rank, world = setup_device()
    try:
        with exclusive_run(prefix_of(args), rank, world):
            train(args, ranks, device, rank, world)
    except torch.OutOfMemoryError:
        raise UserError(f'{device} ran out of memory with --batch_size {args.batch_size}; try a smaller one, such '
                        f'as --batch_size {max(1, args.batch_size // 2)}, or add --amp') from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, ranks, device, rank, world):
    """The training run behind main(): the splits, the model and its recipe, a resumed state, then per epoch one
    pass over the training set, the evaluation and the epoch's files."""
    set_seed(args.seed)
    set_kernels(args.amp)
    if args.batch_size % world:
        raise UserError(f'--batch_size {args.batch_size} is the batch over all {world} processes, so it must be a '
                        f'multiple of {world}')
    if args.data_name == DEMO:
        if rank == 0:
            write_demo(args.data_path)
        if world > 1:  # the other ranks read the demo once rank 0 has written it
            dist.barrier()
    splits = load_splits(args, rank)
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
        print(f'training on {device} ({name}){f" with {world} processes" if world > 1 else ""}')
    sampler = make_sampler(splits['train'], args, rank, world)
    # the workers' seeds come from a generator of the loader's own, so dropout draws the same for any --num_workers
    train_loader = DataLoader(splits['train'], batch_sampler=sampler, num_workers=args.num_workers,
                              pin_memory=device.type == 'cuda', persistent_workers=args.num_workers > 0,
                              multiprocessing_context=worker_context(splits['train'], args.num_workers),
                              generator=torch.Generator().manual_seed(args.seed))
    num_classes = splits['train'].num_classes
    # a loss on embeddings has no use for the model's proxies: it holds class proxies of its own, or none
    on_cosines = loss_entry(args.loss_name, args.loss_args).cosines
    model = Model(args.backbone_type, args.feature_dim, num_classes if on_cosines else 0, not args.no_pretrained).to(
        device)
    if args.amp:
        model = model.to(memory_format=torch.channels_last)
    loss_criterion = make_loss(args, num_classes).to(device)
    if world > 1:  # every rank computes the same global loss, so parameters equal at the start stay equal
        for parameter in loss_criterion.parameters():
            dist.broadcast(parameter.data, 0)
    if rank == 0:
        pair_hint(args, loss_criterion)
    optimizer, scheduler = make_optimizer(model, args, loss_criterion)
    evaluated = [split for split in ('test', 'val') if split in splits]
    columns = ['train_loss', 'train_accuracy'] + [f'{split}_{metric}' for split in evaluated for metric in
                                                  [f'recall@{k}' for k in ranks] + ['map@r', 'r_precision']]
    start_epoch, statistics = resume(args, model, loss_criterion, optimizer, scheduler, columns, rank)
    writer = tensorboard_writer(args, start_epoch) if args.tensorboard and rank == 0 else None

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    ddp_model, trainable = model, None
    for epoch in range(start_epoch, args.num_epochs + 1):
        if trainable is not (epoch > args.warm_up):
            trainable = epoch > args.warm_up
            set_backbone_trainable(model, trainable)
            if world > 1:  # DDP registers the parameters that need gradients when it wraps the model
                ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
        sampler.set_epoch(epoch)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        stats, train_features = train_one_epoch(ddp_model, train_loader, loss_criterion, optimizer, autocast, device,
                                                epoch, args, rank)
        eval_batch = 2 * max(1, args.batch_size // world)  # no activations kept: a larger batch fits
        features = {split: embed_split(model, data, eval_batch, args.num_workers, device, args.amp,
                                       rank, world)
                    for split, data in splits.items() if split != 'train'}
        features['train'] = train_features
        rates = [group['lr'] for group in optimizer.param_groups]  # the epoch's, before the decay
        scheduler.step()
        if rank == 0:
            statistics['train_loss'].append(stats['loss'])
            statistics['train_accuracy'].append(stats['accuracy'])
            report(evaluate(splits, features, ranks), statistics, stats, epoch, args, device)
            warn_if_collapsed(features['test'], epoch, args)
            if writer is not None:
                log_epoch(writer, epoch, statistics, stats, rates)
            save_epoch(args, epoch, model, loss_criterion, optimizer, scheduler, statistics, splits, features)
    if writer is not None:
        writer.close()
    if rank == 0:
        prefix = prefix_of(args)
        last = f'results/{prefix}_{args.num_epochs}'
        print(f'wrote {last}_data_base.pth, {last}_model.pth (epoch {args.num_epochs}) and '
              f'results/{prefix}_statistics.csv; see a retrieval: python test.py --data_base {last}_data_base.pth '
              f'--query_img_name {shlex.quote(splits["test"].images[0])}')


def write_demo(data_path):
    """Write and prepare the handwritten-digits demo as <data_path>/digits when there is no such folder; a folder of
    that name is the user's and is never written into, only prepared if it is not yet."""
    import data_utils
    root = os.path.join(data_path, DEMO)
    if not os.path.exists(root):
        print(f'there is no {root}, so the handwritten-digits demo is written there first')
        data_utils.make_demo(data_path)
    elif os.path.isfile(index_path(data_path, DEMO)):
        return
    data_utils.prepare(data_path, DEMO, workers=1)


def warn_if_collapsed(test_features, epoch, args):
    """One line when the epoch's test embeddings have collapsed onto one direction: their similarities then say
    nothing to a reader, and their rankings turn on differences in the sixth decimal, which training may wipe out."""
    cosine = mean_pairwise_cosine(test_features)
    if cosine > COLLAPSED:
        tries = ([f'--backbone_type {CPU_BACKBONE}'] if args.backbone_type != CPU_BACKBONE else []) + \
            (['pretrained weights (without --no_pretrained)'] if args.no_pretrained else []) + \
            [f'a lower --lr than {args.lr:g}']
        print(f'warning: the test embeddings of epoch {epoch} have collapsed onto one direction (mean cosine '
              f'between two test images {cosine:.6f}), so every similarity reads about 1.000 and the figures above '
              f'rest on tiny differences; try {one_of(tries)}')


def load_splits(args, rank):
    """{'train', 'test' (the queries of a query/gallery data set), and 'gallery' or 'val' if any: ImageReader}.

    An unprepared data set stops here, before anything is printed. In-shop and folders split that way evaluate
    queries against a gallery."""
    gallery = 'query' in load_index(args.data_path, args.data_name, args.crop_type)
    def read(split, **kwargs):
        return ImageReader(args.data_path, args.data_name, split, args.backbone_type, args.crop_type, **kwargs)

    splits = {'train': read('train', seed=args.seed), 'test': read('query' if gallery else 'test')}
    if gallery:
        splits['gallery'] = read('gallery')
    if args.val_fraction > 0:
        splits['val'] = hold_out(splits['train'], args)
    if args.cache_images:  # before any DataLoader worker starts, so that all of them share the decoded images
        start = time.perf_counter()
        caches = [data.cache_images() for data in splits.values()]
        if rank == 0:
            print(f'decoded {sum(map(len, caches))} images into memory ({sum(c.nbytes for c in caches) / 2 ** 30:.1f}'
                  f' GiB) in {time.perf_counter() - start:.0f} s')
    if args.batch_size > len(splits['train']):
        raise UserError(f'--batch_size {args.batch_size} is larger than the {len(splits["train"])} training images of '
                        f'{args.data_name}; use a smaller --batch_size')
    classes, per_batch = splits['train'].num_classes, args.batch_size // max(1, args.images_per_class)
    if args.images_per_class and per_batch > classes:
        raise UserError(f'--batch_size {args.batch_size} with --images_per_class {args.images_per_class} asks for '
                        f'{per_batch} classes per batch, but the training set of {args.data_name} has only {classes}; '
                        f'use a --batch_size of at most {classes * args.images_per_class} or a larger '
                        f'--images_per_class')
    return splits


def resume(args, model, loss_criterion, optimizer, scheduler, columns, rank):
    """(first epoch, statistics so far): those of this configuration's checkpoint with --resume, else (1, empty)."""
    prefix = prefix_of(args)
    checkpoint_path = f'results/{prefix}_checkpoint.pth'
    if rank == 0:  # what a run of this configuration killed mid-write left behind
        remove_temporaries('results', f'{prefix}_')
    if args.resume and os.path.exists(checkpoint_path):
        checkpoint = load_checkpoint(checkpoint_path, args)
        model.load_state_dict(checkpoint['model'])
        loss_criterion.load_state_dict(checkpoint.get('loss', {}))  # a checkpoint from before losses had any
        optimizer.load_state_dict(checkpoint['optimizer'])
        scheduler.load_state_dict(checkpoint['scheduler'])
        set_rng_state(checkpoint['rng'])
        if rank == 0:
            print(f'resuming {checkpoint_path} after epoch {checkpoint["epoch"]}')
        return checkpoint['epoch'] + 1, {column: checkpoint['statistics'][column] for column in columns}
    if args.resume:
        renamed_run(args)
    if rank == 0:
        if args.resume:
            print(f'no checkpoint at {checkpoint_path}, so training starts at epoch 1')
        elif os.path.exists(checkpoint_path):
            print(f'{checkpoint_path} holds an earlier run, which this one replaces after its first epoch; '
                  f'stop now and add --resume to continue that run instead')
    return 1, {column: [] for column in columns}


def evaluate(splits, features, ranks):
    """{split: metrics} for the test set (its queries against the gallery, if any) and the validation split."""
    gallery = {'gallery_features': features['gallery'], 'gallery_labels': torch.tensor(splits['gallery'].labels)} \
        if 'gallery' in splits else {}
    return {split: retrieval_metrics(features[split], torch.tensor(splits[split].labels), ranks,
                                     **(gallery if split == 'test' else {}))
            for split in ('val', 'test') if split in splits}  # validation first: the test line ends the report


def report(metrics, statistics, stats, epoch, args, device):
    """Append an epoch's metrics to the statistics and print them, one line per split."""
    memory = (f', peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB'
              if device.type == 'cuda' else '')
    for split, values in metrics.items():
        for metric, value in values.items():
            statistics[f'{split}_{metric}'].append(value)
        ranks = [metric[len('recall@'):] for metric in values if metric.startswith('recall@')]
        print(f'{split.capitalize()} Epoch {epoch}/{args.num_epochs} '
              + ' '.join(f'R@{k}:{100 * values[f"recall@{k}"]:.2f}%' for k in ranks)
              + f' MAP@R:{100 * values["map@r"]:.2f}% RP:{100 * values["r_precision"]:.2f}%'
              + (f' | train {stats["images_per_second"]:.1f} images/s{memory}' if split == 'test' else ''))


def tensorboard_writer(args, start_epoch):
    """A TensorBoard writer into results/tensorboard/<run name>/, one folder per run as `tensorboard --logdir
    results/tensorboard` shows them. purge_step hides what an earlier process logged there from start_epoch on: the
    epochs a resumed run trains again (logged, then killed before its checkpoint), or all of an earlier run that a
    fresh one replaces; so no step is shown twice."""
    from torch.utils.tensorboard import SummaryWriter  # imported here: it is slow, and only --tensorboard needs it
    return SummaryWriter(os.path.join('results', 'tensorboard', prefix_of(args)), purge_step=start_epoch)


LR_GROUPS = ('backbone_and_head', 'proxies')  # make_optimizer's parameter groups, in order


def log_epoch(writer, epoch, statistics, stats, rates):
    """An epoch's figures as TensorBoard scalars at step `epoch`: each statistics column under its split
    (train/loss, test/recall@1, val/map@r, ...), the training images per second and each parameter group's learning
    rate (lr/backbone_and_head, lr/proxies); flushed, so that a crash loses no finished epoch."""
    for column, values in statistics.items():
        split, metric = column.split('_', 1)
        writer.add_scalar(f'{split}/{metric}', values[-1], epoch)
    writer.add_scalar('train/images_per_second', stats['images_per_second'], epoch)
    for group, rate in zip(LR_GROUPS, rates):
        writer.add_scalar(f'lr/{group}', rate, epoch)
    writer.flush()


def save_epoch(args, epoch, model, loss_criterion, optimizer, scheduler, statistics, splits, features):
    """The epoch's statistics, model, data base and checkpoint, each written whole; the previous epoch's model and
    data base go."""
    prefix = prefix_of(args)
    save_statistics(statistics, prefix)
    weights = model.state_dict()
    atomic_save(weights, f'results/{prefix}_{epoch}_model.pth')
    proxies = F.normalize(data_base_proxies(model, loss_criterion).detach().cpu(), dim=-1)
    atomic_save(make_data_base(args, epoch, {split: splits[split] for split in ('train', 'test', 'gallery')
                                             if split in splits}, features, proxies, weights),
                f'results/{prefix}_{epoch}_data_base.pth')
    # the checkpoint is written last: once it names this epoch, every other file of the epoch is complete
    atomic_save({'model': weights, 'loss': loss_criterion.state_dict(), 'optimizer': optimizer.state_dict(),
                 'scheduler': scheduler.state_dict(), 'epoch': epoch, 'args': vars(args), 'rng': rng_state(),
                 'statistics': statistics},
                f'results/{prefix}_checkpoint.pth')
    for kind in ('model', 'data_base'):
        if epoch > 1 and os.path.exists(f'results/{prefix}_{epoch - 1}_{kind}.pth'):
            os.remove(f'results/{prefix}_{epoch - 1}_{kind}.pth')


# ----------------------------------------------------------------------------------------------------------------------
# one epoch: global batches dealt to the ranks, the loss over the gathered batch, the data sets' embeddings

PADDING = -1  # the label of a padding row


class GlobalBatches(Sampler):
    """This rank's share of every global batch of an epoch, as lists of (index, epoch) for a seeded ImageReader.

    The epoch's order is torch.randperm seeded with seed + epoch (as DistributedSampler's), cut into global batches
    of batch_size, the last one partial as in the seed (drop_last=False); rank r takes items r, r + W, ... of each.
    So the ranks together see exactly the batches one process sees. The ranks' shares of the last batch may differ
    in length by one: the shorter ones are filled up with their batch's first image, labelled PADDING by the epoch
    loop and left out by batch_loss, so that every rank takes the same number of steps and gathers equal-sized
    tensors.
    """

    def __init__(self, size, batch_size, rank=0, world=1, seed=0):
        self.size, self.batch_size, self.rank, self.world, self.seed = size, batch_size, rank, world, seed
        self.epoch = 0

    def set_epoch(self, epoch):
        """Select the shuffle order and augmentation seeds of one epoch."""
        self.epoch = epoch

    def global_batches(self):
        """The epoch's global batches of data-set indices, in the order one process would train on them."""
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        return [order[start:start + self.batch_size] for start in range(0, self.size, self.batch_size)]

    def shares(self, batch):
        """Each rank's part of one global batch, padded to equal length with PADDING."""
        length = -(-len(batch) // self.world)
        return [batch[r::self.world] + [PADDING] * (length - len(batch[r::self.world])) for r in range(self.world)]

    def __iter__(self):
        for batch in self.global_batches():
            share = self.shares(batch)[self.rank]
            yield [(batch[0] if index == PADDING else index, self.epoch) for index in share]

    def __len__(self):
        return -(-self.size // self.batch_size)


class ClassBalancedBatches(GlobalBatches):
    """GlobalBatches of P = batch_size / M classes with M images each (--images_per_class M), like PML's
    MPerClassSampler and the official Proxy-Anchor code's --IPC, dealt to the ranks as GlobalBatches deals them.

    An epoch sees every image at least once: each class's images, shuffled, are cut into groups of M, its last group
    filled up with other images of the class (a class smaller than M repeats its images to fill its one group). Each
    batch then takes one group from each of the P classes with the most groups left (ties, the common case, broken
    at random), which spreads large classes over the epoch and sees every group exactly once whenever the groups can
    be dealt so; once fewer than P classes have groups left, the batch is filled up with a fresh group of other
    classes. So an epoch is about (number of groups) / P batches, all full (the official code instead draws
    len(dataset) // batch_size batches with replacement). The draws are seeded by seed + epoch, so a resumed run and
    every torchrun rank draw the same batches.
    """

    def __init__(self, labels, batch_size, images_per_class, rank=0, world=1, seed=0):
        super().__init__(len(labels), batch_size, rank, world, seed)
        self.labels, self.per_class = torch.as_tensor(labels), images_per_class
        self.drawn = None  # (epoch, its batches): the epoch loop and the loader both read them

    def global_batches(self):
        """The epoch's global batches of data-set indices, each M images of each of P classes, one class after
        another."""
        if self.drawn is not None and self.drawn[0] == self.epoch:
            return self.drawn[1]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        members = [(self.labels == label).nonzero()[:, 0] for label in self.labels.unique()]  # per class
        groups = []  # per class: its groups of M images
        for images in members:
            images = images[torch.randperm(len(images), generator=generator)]
            whole = len(images) - len(images) % self.per_class  # the images in full groups: the last one's fillers
            groups.append(torch.cat([images, self.fill(images[:whole] if whole else images,
                                                       -len(images) % self.per_class, generator)]).view(
                -1, self.per_class))
        left = torch.tensor([len(group) for group in groups], dtype=torch.float64)  # (C,) groups not yet drawn
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
        self.drawn = self.epoch, batches
        return batches

    def fresh_group(self, images, generator):
        """M of a class's images drawn at random, all of them and repeats for a class smaller than M."""
        if len(images) >= self.per_class:
            return self.fill(images, self.per_class, generator)
        return torch.cat([images, self.fill(images, self.per_class - len(images), generator)])

    @staticmethod
    def fill(images, count, generator):
        """count more of a class's images drawn from images: without repeats where there are enough."""
        if len(images) >= count:
            return images[torch.randperm(len(images), generator=generator)[:count]]
        return images[torch.randint(len(images), (count,), generator=generator)]

    def __len__(self):
        return len(self.global_batches())


def batch_loss(model, images, labels, loss_criterion):
    """Loss of the global batch: embeddings and labels are gathered over all ranks before the loss.

    Proxy-Anchor's terms average over the proxies with positives in the batch, and a pair-based loss pairs every
    image with every other, so the loss is only the single-GPU loss when it sees the whole batch. Rows labelled
    PADDING (a rank's share of the last, partial batch filled up to the others' length) are left out. Returns
    (loss, global embeddings, their cosines to the class proxies or None for a loss without any, their labels).
    """
    embeddings, cosines = model(images)  # (B, D), (B, C)
    if dist.is_initialized():
        labels, embeddings = gather(labels), gather(embeddings)  # (W * B,), (W * B, D)
        keep = labels != PADDING
        labels, embeddings = labels[keep], embeddings[keep]
        cosines = unwrap(model).proxies(embeddings)  # (B_global, C)
    if not isinstance(loss_criterion, EmbeddingLoss):
        return loss_criterion(cosines, labels), embeddings, cosines, labels
    own = loss_criterion.class_proxies()  # (C, K, D) or None
    cosines = class_cosines(embeddings, own) if own is not None else None
    return loss_criterion(embeddings, labels), embeddings, cosines, labels


def train_one_epoch(model, loader, loss_criterion, optimizer, scaler_ctx, device, epoch, args, rank):
    """Train for one epoch of loader (whose batch_sampler is a GlobalBatches).

    Returns a stats dict with loss, accuracy and images per second, and the (N, D) embeddings the training pass
    produced, in data-set order: the seed stores those (augmented, and from weights that change along the epoch) as
    the data base's training features, which costs no extra pass.
    """
    model.train()
    if not args.no_pretrained:  # the backbone's BatchNorm statistics stay as pretrained on ImageNet
        for module in unwrap(model).backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    sampler = loader.batch_sampler
    features = torch.zeros(sampler.size, args.feature_dim, dtype=torch.float32)  # (N, D)
    total_loss, total_correct, total_num, start = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f'Train Epoch {epoch}/{args.num_epochs}', dynamic_ncols=True, disable=rank != 0)
    for step, ((images, labels), batch) in enumerate(zip(bar, sampler.global_batches()), 1):
        shares = sampler.shares(batch)
        labels[torch.tensor(shares[rank]) == PADDING] = PADDING
        images = images.to(device, non_blocking=True)
        if args.amp:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with scaler_ctx():
            loss, embeddings, cosines, labels = batch_loss(model, images, labels, loss_criterion)
        if not torch.isfinite(loss):
            kept = (f'the checkpoint of epoch {epoch - 1} is kept, so lower the learning rate or check the data, '
                    f'then run again with --resume' if epoch > 1 else
                    'no checkpoint was written yet, so lower the learning rate or check the data and run again')
            raise UserError(f'the loss became {loss.item()} at epoch {epoch}, step {step}; {kept}')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # the gathered rows are the ranks' shares one after the other, padding left out
        rows = [index for share in shares for index in share if index != PADDING]
        features[rows] = embeddings.detach().float().cpu()
        total_num += labels.size(0)
        total_loss += loss.item() * labels.size(0)
        if cosines is None:  # no class proxies: accuracy does not apply
            total_correct = math.nan
            bar.set_postfix(loss=f'{total_loss / total_num:.4f}')
            continue
        total_correct += (cosines.argmax(dim=-1) == labels).sum().item()
        bar.set_postfix(loss=f'{total_loss / total_num:.4f}', acc=f'{100 * total_correct / total_num:.2f}%')
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {'loss': total_loss / total_num, 'accuracy': total_correct / total_num,
            'images_per_second': total_num / seconds}, features


def worker_context(dataset, num_workers):
    """'fork' for DataLoader workers of a cached data set: they share its ImageCache, not a pickled copy each."""
    cached = getattr(dataset, 'cache', None) is not None
    return 'fork' if cached and num_workers > 0 and 'fork' in torch.multiprocessing.get_all_start_methods() else None


def embed_split(model, dataset, batch_size, num_workers, device, amp, rank, world):
    """Embeddings (N, D) of a whole split on the CPU, as test.py embeds images
    (utils.embed_batches); under torchrun each rank embeds 1/W and all gather."""
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size, num_workers=num_workers, pin_memory=device.type == 'cuda',
                        multiprocessing_context=worker_context(dataset, num_workers))
    features = embed_batches(unwrap(model), (images for images, _ in loader), amp)  # (N / W, D)
    return (gather_shards(features, len(dataset)) if world > 1 else features).cpu()


# ----------------------------------------------------------------------------------------------------------------------
# the recipe: optimizer, loss, warm-up, validation split

class ChannelsLastAdamP(AdamP):
    """AdamP that also steps channels_last weights (--amp): its per-channel views become reshapes.

    AdamP flattens each weight with .view(), which channels_last strides do not allow; .reshape() gives the same
    values (a copy only for channels_last), so the update is AdamP's exactly.
    """

    def _channel_view(self, x):
        return x.reshape(x.size(0), -1)

    def _layer_view(self, x):
        return x.reshape(1, -1)


def make_optimizer(model, args, loss_criterion=None):
    """The optimizer over two groups, the proxies (the model's, and the loss's own parameters) at --proxy_lr and the
    backbone and the head at --lr, and its StepLR."""
    backbone, head, proxies = model.parameter_groups()
    own = list(loss_criterion.parameters()) if loss_criterion is not None else []
    groups = [{'params': backbone + head}, {'params': proxies + own, 'lr': args.proxy_lr}]
    if args.optimizer == 'adamp':  # the seed's: AdamP's defaults otherwise (betas 0.9/0.999, eps 1e-8)
        optimizer = ChannelsLastAdamP(groups, lr=args.lr, weight_decay=args.weight_decay)
    elif args.optimizer == 'adamw':
        optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return optimizer, StepLR(optimizer, step_size=args.lr_step, gamma=args.lr_gamma)


def make_loss(args, num_classes=None):
    """The --loss_name loss, with its hyper-parameters' flags (or --loss_args), and the number of training classes
    and the embedding size when it holds class proxies of its own."""
    entry = loss_entry(args.loss_name, args.loss_args)
    sizes = {'num_classes': num_classes, 'embedding_size': args.feature_dim}
    wanted = inspect.signature(entry.build).parameters
    return entry.build(**{flag: getattr(args, flag) for flag in entry.hyper},
                       **{key: value for key, value in sizes.items() if key in wanted})


def pair_hint(args, loss_criterion):
    """One line for a pair-based loss trained on the seed's shuffled batches, which may hold few positive pairs."""
    if isinstance(loss_criterion, EmbeddingLoss) and loss_criterion.class_proxies() is None \
            and not args.images_per_class:
        print(f'{args.loss_name} learns from pairs of one class within a batch, which shuffled batches of '
              f'{args.batch_size} may hold few of; pass --images_per_class 4 (or 2) for class-balanced batches')


def make_sampler(data, args, rank, world):
    """This rank's GlobalBatches of the training set: class-balanced with --images_per_class, else shuffled."""
    if args.images_per_class:
        return ClassBalancedBatches(data.labels, args.batch_size, args.images_per_class, rank, world, args.seed)
    return GlobalBatches(len(data), args.batch_size, rank, world, args.seed)


def data_base_proxies(model, loss_criterion):
    """The class proxies a data base stores: the model's (C, D), or those the loss holds itself, (C, D) or (C, K, D)
    for K per class, or (0, D) for a loss without any."""
    if isinstance(loss_criterion, EmbeddingLoss):
        own = loss_criterion.class_proxies()
        if own is None:
            return model.proxies.weight.new_zeros(0, model.proxies.weight.size(1))
        return own[:, 0] if own.size(1) == 1 else own
    return model.proxies.weight


def set_backbone_trainable(model, trainable):
    """Freeze or unfreeze the backbone (the warm-up trains only the embedding layer and the proxies)."""
    for parameter in model.parameter_groups()[0]:
        parameter.requires_grad_(trainable)


def hold_out(train_data, args):
    """Move the last --val_fraction of the training classes (by class id) out of train_data into a validation set,
    which is embedded without augmentation like the test set; returns it."""
    classes = train_data.num_classes
    held = round(args.val_fraction * classes)
    if held < 2 or classes - held < 2:
        raise UserError(f'--val_fraction {args.val_fraction} of the {classes} training classes of {args.data_name} '
                        f'holds out {held} and trains on {classes - held}, but each side needs at least 2 classes; '
                        f'choose a fraction between {2 / classes:.3g} and {1 - 2 / classes:.3g}')
    val_data = ImageReader(args.data_path, args.data_name, 'train', args.backbone_type, args.crop_type, augment=False)
    val_data.keep_classes(classes - held, classes)
    train_data.keep_classes(0, classes - held)
    return val_data


# ----------------------------------------------------------------------------------------------------------------------
# outputs: run names, checkpoints, statistics

def flag_value(value):
    """A flag's value as a run name shows it: 0.2, 1e-05, 64 for 64.0, 2, adamw; distinct values stay distinct."""
    if isinstance(value, float):
        return f'{value:g}' if float(f'{value:g}') == value else repr(value)
    return str(value)


def prefix_of(args, named_flags=None):
    """The name every output of this run starts with: the seed's car_resnet50_proxy_anchor_512, then _<flag><value>
    (_<flag> for a switch) for each of NAMED_FLAGS off its default (car_resnet50_proxy_anchor_512_margin0.2_seed2),
    then _<--run_name>."""
    # pml/<class name> becomes pml-<class name>, as a timm backbone's name does
    name = (f'{args.data_name}_{backbone_file_name(args.backbone_type)}_{args.loss_name.replace("/", "-")}_'
            f'{args.feature_dim}')
    parser = get_args_parser()
    for flag in NAMED_FLAGS if named_flags is None else named_flags:
        value = getattr(args, flag, parser.get_default(flag))
        if value != parser.get_default(flag):
            name += f'_{flag}' + ('' if value is True else flag_value(value))
    if getattr(args, 'run_name', None):
        name += f'_{args.run_name}'
    return name


# the flags that named runs before every recipe flag did: such a run's files may still carry that name
OLD_NAMED_FLAGS = ('scale', 'margin', 'optimizer', 'lr', 'proxy_lr', 'weight_decay', 'lr_step', 'lr_gamma', 'seed',
                   'val_fraction')


def renamed_run(args):
    """A UserError if this run's checkpoint lies under the name it had before --crop_type, --no_pretrained,
    --batch_size, --warm_up and --amp named runs: --resume says how to rename its files."""
    old, new = prefix_of(args, OLD_NAMED_FLAGS), prefix_of(args)
    path = f'results/{old}_checkpoint.pth'
    if old == new or not os.path.isfile(path):
        return
    checkpoint = safe_load(path, 'checkpoint')
    if isinstance(checkpoint, dict) and not recipe_changes(checkpoint.get('args', {}), args):
        raise UserError(f'this run was written as {old} before every recipe flag named runs; to resume it, rename its '
                        f'files: for f in results/{old}_*; do mv "$f" "results/{new}${{f#results/{old}}}"; done')


def recipe_changes(saved, args):
    """[(flag, saved value)] of the recipe flags whose value in a checkpoint's saved args differs from args'; a
    checkpoint from before a flag existed was trained with the flag's default."""
    parser = get_args_parser()
    return [(flag, saved.get(flag, parser.get_default(flag))) for flag in RECIPE_FLAGS
            if saved.get(flag, parser.get_default(flag)) != getattr(args, flag)]


def load_checkpoint(path, args):
    """The checkpoint of an interrupted run of the same configuration."""
    checkpoint = safe_load(path, 'checkpoint')
    missing = {'model', 'optimizer', 'scheduler', 'epoch', 'args', 'rng', 'statistics'} - set(
        checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        raise UserError(f'{path} is not a checkpoint train.py wrote (it has no {", ".join(sorted(missing))}); move '
                        f'it away and start afresh without --resume')
    for flag, saved in recipe_changes(checkpoint['args'], args)[:1]:
        raise UserError(f'{path} was trained with --{flag} {saved}, not {getattr(args, flag)}; resume with the '
                        f'same flags or start afresh without --resume')
    if checkpoint['epoch'] >= args.num_epochs:
        raise UserError(f'{path} already finished epoch {checkpoint["epoch"]} of {args.num_epochs}; raise '
                        f'--num_epochs to train longer')
    return checkpoint


def save_statistics(statistics, prefix):
    """Rewrite the statistics CSV (one row per epoch) and redraw its curves."""
    frame = pd.DataFrame(statistics, index=pd.RangeIndex(1, len(statistics['train_loss']) + 1, name='epoch'))
    with atomic_path(f'results/{prefix}_statistics.csv') as tmp:
        # a loss without class proxies has no train accuracy: "n/a", which pandas reads back as NaN
        frame.to_csv(tmp, index_label='epoch', na_rep='n/a')
    plot_statistics(frame, f'results/{prefix}_statistics.png')


def plot_statistics(frame, path):
    """Loss and accuracy, then the test metrics (and the validation ones, if any) per epoch: a SciencePlots figure."""
    plt = pyplot()
    names = {'map@r': 'MAP@R', 'r_precision': 'R-Precision'}
    panels = [(split, title) for split, title in (('test', 'test (unseen classes)'),
                                                   ('val', 'validation (held-out training classes)'))
              if any(column.startswith(f'{split}_') for column in frame.columns)]
    with plt.style.context(['science', 'no-latex']):
        figure, axes = plt.subplots(1, 1 + len(panels), figsize=(4.2 * (1 + len(panels)) - 0.4, 2.8))
        left = axes[0]
        left.plot(frame.index, frame['train_loss'], marker='o', markersize=3, label='loss')
        left.set(xlabel='epoch', ylabel='train loss', title='training')
        lines = left.get_lines()
        if frame['train_accuracy'].notna().any():
            twin = left.twinx()
            twin.plot(frame.index, 100 * frame['train_accuracy'], marker='s', markersize=3, color='tab:red',
                      label='accuracy')
            twin.set_ylabel('train accuracy (%)')
            lines += twin.get_lines()
        else:  # a loss without class proxies
            left.text(0.5, 0.04, 'train accuracy: does not apply\n(the loss has no class proxies)',
                      transform=left.transAxes, ha='center', va='bottom', fontsize=7, color='tab:red')
        left.legend(handles=lines, loc='best', fontsize=7)
        for axis, (split, title) in zip(axes[1:], panels):
            for column in frame.columns:
                if column.startswith(f'{split}_'):
                    name = column[len(split) + 1:]
                    axis.plot(frame.index, 100 * frame[column], marker='o', markersize=3,
                              label=names.get(name, name.replace('recall', 'R')))
            axis.set(xlabel='epoch', ylabel=f'{split} metric (%)', title=title, ylim=(0, 100))
        axes[-1].legend(fontsize=7, loc='center left', bbox_to_anchor=(1.02, 0.5))
        for axis in axes:
            axis.xaxis.get_major_locator().set_params(integer=True)
        figure.tight_layout(w_pad=2.5)
        save_figure(figure, path)


if __name__ == '__main__':
    run_main(main)
