"""Train an embedding with Proxy-Anchor or Normalized-Softmax and report Recall@K on the unseen test classes.

One GPU or the CPU: `python train.py ...`; several GPUs: `torchrun --nproc_per_node N train.py ...`.
"""
import argparse
import os
import random
import time

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from adamp import AdamP
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from model import BACKBONES, Model
from utils import (CROP_TYPES, DATA_NAMES, LOSSES, ImageReader, SeededSampler, UserError, atomic_path, atomic_save,
                   load_index, parse_ranks, pyplot, remove_temporaries, retrieval_metrics, run_main, safe_load,
                   save_figure, set_seed)

# flags that change what a run computes: a resumed run must use the same ones
RECIPE_FLAGS = ('data_name', 'crop_type', 'backbone_type', 'feature_dim', 'no_pretrained', 'loss_name', 'batch_size',
                'warm_up', 'seed', 'amp')


def default_workers():
    """min(8, this process's share of the cores): torchrun's processes on one machine share its cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return max(1, min(8, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))


def get_args_parser():
    """The command-line flags of train.py; the seed's names and defaults are the public interface."""
    parser = argparse.ArgumentParser(description='Train a proxy-based deep metric learning model',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    parser.add_argument('--data_path', default='/home/data', type=str, help='datasets path')
    parser.add_argument('--data_name', default='car', type=str,
                        help=f'dataset name: {", ".join(DATA_NAMES)}, or any other folder prepared by data_utils.py')
    parser.add_argument('--crop_type', default='uncropped', type=str, choices=CROP_TYPES,
                        help='images as downloaded, or cropped to their bounding boxes (data_utils.py --crop)')
    parser.add_argument('--cache_images', action='store_true',
                        help='decode every image once into memory (3 x H x W bytes each, per process), so that '
                             'epochs after the first only crop, resize and flip: several times faster input')
    # model
    parser.add_argument('--backbone_type', default='resnet50', type=str, choices=list(BACKBONES),
                        help='backbone network type')
    parser.add_argument('--feature_dim', default=512, type=int, help='feature dim')
    parser.add_argument('--no_pretrained', action='store_true',
                        help='start the backbone from random weights instead of ImageNet (offline runs)')
    # loss
    parser.add_argument('--loss_name', default='proxy_anchor', type=str, choices=list(LOSSES), help='loss name')
    # optimisation
    parser.add_argument('--batch_size', default=64, type=int, help='training batch size (over all GPUs)')
    parser.add_argument('--num_epochs', default=20, type=int, help='training epoch number')
    parser.add_argument('--warm_up', default=2, type=int, help='warm up number: epochs with a frozen backbone')
    parser.add_argument('--seed', default=1, type=int, help='random seed')
    parser.add_argument('--amp', action='store_true', help='bf16 autocast and channels_last on CUDA')
    parser.add_argument('--num_workers', default=default_workers(), type=int,
                        help='data loading processes per training process: min(8, cores / processes on this machine)')
    parser.add_argument('--resume', action='store_true',
                        help="continue this configuration's interrupted run from results/<name>_checkpoint.pth")
    # evaluation
    parser.add_argument('--recalls', default='1,2,4,8', type=str,
                        help='selected recall: the K of Recall@K, comma-separated (SOP is quoted at 1,10,100,1000, '
                             'In-shop at 1,10,20,30,40); a K above the number of other test images retrieves them all')
    return parser


def check_args(args):
    """Flags out of range become one UserError; returns the parsed Recall@K ranks."""
    for flag, low in (('feature_dim', 1), ('batch_size', 1), ('num_epochs', 1), ('warm_up', 0), ('num_workers', 0)):
        if getattr(args, flag) < low:
            raise UserError(f'--{flag} must be at least {low}, not {getattr(args, flag)}')
    return parse_ranks(args.recalls)


# ----------------------------------------------------------------------------------------------------------------------
# several processes: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK

def setup_device():
    """(device, rank, world size), joining the process group when started by torchrun."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    if torch.cuda.is_available():
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    if world > 1:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return device, rank, world


class GatherLayer(torch.autograd.Function):
    """all_gather along dim 0 that sends each rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (W * B, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank computed the same global loss: sum their gradients
        size = grad.size(0) // dist.get_world_size()
        return grad[dist.get_rank() * size:(dist.get_rank() + 1) * size]


def gather(x):
    """Concatenate a tensor over all ranks (itself when not distributed); differentiable."""
    return GatherLayer.apply(x) if dist.is_initialized() else x


def unwrap(model):
    """The Model inside a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def batch_loss(model, images, labels, loss_criterion):
    """Loss of the global batch: embeddings and labels are gathered over all ranks before the loss.

    Proxy-Anchor's terms average over the proxies with positives in the batch, so the loss is only the
    single-GPU loss when it sees the whole batch. Returns (loss, global cosines, global labels).
    """
    embeddings, cosines = model(images)  # (B, D), (B, C)
    if dist.is_initialized():
        labels = gather(labels)
        cosines = unwrap(model).proxies(gather(embeddings))  # (W * B, C)
    return loss_criterion(cosines, labels), cosines, labels


# ----------------------------------------------------------------------------------------------------------------------
# one epoch of training, and evaluation

class ChannelsLastAdamP(AdamP):
    """AdamP that also steps channels_last weights (--amp): its per-channel views become reshapes.

    AdamP flattens each weight with .view(), which channels_last strides do not allow; .reshape() gives the same
    values (a copy only for channels_last), so the update is AdamP's exactly.
    """

    def _channel_view(self, x):
        return x.reshape(x.size(0), -1)

    def _layer_view(self, x):
        return x.reshape(1, -1)


def set_backbone_trainable(model, trainable):
    """Freeze or unfreeze the backbone (the warm-up trains only the embedding layer and the proxies)."""
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(trainable)


def train_one_epoch(model, loader, loss_criterion, optimizer, scaler_ctx, device, epoch, args, rank):
    """Train for one epoch; returns a stats dict with loss, accuracy and images per second."""
    model.train()
    if not args.no_pretrained:  # the backbone's BatchNorm statistics stay as pretrained on ImageNet
        for module in unwrap(model).backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    total_loss, total_correct, total_num, start = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=f'Train Epoch {epoch}/{args.num_epochs}', dynamic_ncols=True, disable=rank != 0)
    for step, (images, labels) in enumerate(bar, 1):
        images = images.to(device, non_blocking=True)
        if args.amp:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with scaler_ctx():
            loss, cosines, labels = batch_loss(model, images, labels, loss_criterion)
        if not torch.isfinite(loss):
            kept = (f'the checkpoint of epoch {epoch - 1} is kept, so lower the learning rate or check the data, '
                    f'then run again with --resume' if epoch > 1 else
                    'no checkpoint was written yet, so lower the learning rate or check the data and run again')
            raise UserError(f'the loss became {loss.item()} at epoch {epoch}, step {step}; {kept}')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_num += labels.size(0)
        total_loss += loss.item() * labels.size(0)
        total_correct += (cosines.argmax(dim=-1) == labels).sum().item()
        bar.set_postfix(loss=f'{total_loss / total_num:.4f}', acc=f'{100 * total_correct / total_num:.2f}%')
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {'loss': total_loss / total_num, 'accuracy': total_correct / total_num,
            'images_per_second': total_num / seconds}


def worker_context(dataset, num_workers):
    """'fork' for DataLoader workers of a cached data set: they share its ImageCache, not a pickled copy each."""
    cached = getattr(dataset, 'cache', None) is not None
    return 'fork' if cached and num_workers > 0 and 'fork' in torch.multiprocessing.get_all_start_methods() else None


@torch.inference_mode()
def embed(model, dataset, batch_size, num_workers, device, amp, rank, world):
    """Embeddings (N, D) of a whole dataset on the CPU; under torchrun each rank embeds 1/W and all gather."""
    model.eval()
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size, num_workers=num_workers, pin_memory=device.type == 'cuda',
                        multiprocessing_context=worker_context(dataset, num_workers))
    features = []
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            features.append(unwrap(model).embed(images).float())
    features = torch.cat(features)  # (N / W, D)
    if world > 1:
        rows = -(-len(dataset) // world)
        padded = features.new_zeros(rows, features.size(1))
        padded[:len(features)] = features
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        features = features.new_empty(len(dataset), features.size(1))
        for r, part in enumerate(parts):
            features[r::world] = part[:len(range(r, len(dataset), world))]
    return features.cpu()


# ----------------------------------------------------------------------------------------------------------------------
# outputs: every file is written to a temporary name and renamed into place

def rng_state():
    """The random generators' states, in a form torch.load(weights_only=True) accepts."""
    key, state, position, has_gauss, gauss = np.random.get_state()
    return {'python': random.getstate(), 'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'numpy': [key, torch.from_numpy(state.astype(np.int64)), position, has_gauss, gauss]}


def set_rng_state(state):
    """Restore what rng_state() saved."""
    random.setstate((state['python'][0], tuple(state['python'][1]), state['python'][2]))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    key, array, position, has_gauss, gauss = state['numpy']
    np.random.set_state((key, array.numpy().astype(np.uint32), position, has_gauss, gauss))


def save_statistics(statistics, prefix):
    """Rewrite the statistics CSV (one row per epoch) and redraw its curves."""
    frame = pd.DataFrame(statistics, index=pd.RangeIndex(1, len(statistics['train_loss']) + 1, name='epoch'))
    with atomic_path(f'results/{prefix}_statistics.csv') as tmp:
        frame.to_csv(tmp, index_label='epoch')
    plot_statistics(frame, f'results/{prefix}_statistics.png')


def plot_statistics(frame, path):
    """Loss and accuracy, and the test metrics, per epoch: a two-panel SciencePlots figure."""
    plt = pyplot()
    names = {'map@r': 'MAP@R', 'r_precision': 'R-Precision'}
    with plt.style.context(['science', 'no-latex']):
        figure, (left, right) = plt.subplots(1, 2, figsize=(8, 2.8))
        left.plot(frame.index, frame['train_loss'], marker='o', markersize=3, label='loss')
        left.set(xlabel='epoch', ylabel='train loss', title='training')
        twin = left.twinx()
        twin.plot(frame.index, 100 * frame['train_accuracy'], marker='s', markersize=3, color='tab:red',
                  label='accuracy')
        twin.set_ylabel('train accuracy (%)')
        left.legend(handles=left.get_lines() + twin.get_lines(), loc='best', fontsize=7)
        for column in frame.columns:
            if column.startswith('test_'):
                name = column[5:]
                right.plot(frame.index, 100 * frame[column], marker='o', markersize=3,
                           label=names.get(name, name.replace('recall', 'R')))
        right.set(xlabel='epoch', ylabel='test metric (%)', title='test (unseen classes)', ylim=(0, 100))
        right.legend(fontsize=7, loc='center left', bbox_to_anchor=(1.02, 0.5))
        for axis in (left, right):
            axis.xaxis.get_major_locator().set_params(integer=True)
        figure.tight_layout(w_pad=2.5)
        save_figure(figure, path)


def prefix_of(args):
    """The name every output of this configuration starts with, as the seed: car_resnet50_proxy_anchor_512."""
    return f'{args.data_name}_{args.backbone_type}_{args.loss_name}_{args.feature_dim}'


def load_checkpoint(path, args):
    """The checkpoint of an interrupted run of the same configuration."""
    checkpoint = safe_load(path, 'checkpoint')
    missing = {'model', 'optimizer', 'scheduler', 'epoch', 'args', 'rng', 'statistics'} - set(
        checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        raise UserError(f'{path} is not a checkpoint train.py wrote (it has no {", ".join(sorted(missing))}); move '
                        f'it away and start afresh without --resume')
    for flag in RECIPE_FLAGS:
        if checkpoint['args'].get(flag) != getattr(args, flag):
            raise UserError(f'{path} was trained with --{flag} {checkpoint["args"].get(flag)}, not '
                            f'{getattr(args, flag)}; resume with the same flags or start afresh without --resume')
    if checkpoint['epoch'] >= args.num_epochs:
        raise UserError(f'{path} already finished epoch {checkpoint["epoch"]} of {args.num_epochs}; raise '
                        f'--num_epochs to train longer')
    return checkpoint


# ----------------------------------------------------------------------------------------------------------------------

def main():
    """Train, evaluating and saving after every epoch."""
    args = get_args_parser().parse_args()
    ranks = check_args(args)
    device, rank, world = setup_device()
    try:
        train(args, ranks, device, rank, world)
    except torch.OutOfMemoryError:
        raise UserError(f'{device} ran out of memory with --batch_size {args.batch_size}; try a smaller one, such '
                        f'as --batch_size {max(1, args.batch_size // 2)}, or add --amp') from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, ranks, device, rank, world):
    """The training run behind main()."""
    set_seed(args.seed)
    if args.batch_size % world:
        raise UserError(f'--batch_size {args.batch_size} is the batch over all {world} processes, so it must be a '
                        f'multiple of {world}')
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'
        print(f'training on {device} ({name}){f" with {world} processes" if world > 1 else ""}')
    prefix = prefix_of(args)
    train_data = ImageReader(args.data_path, args.data_name, 'train', args.backbone_type, args.crop_type, args.seed)
    # In-shop and folders split that way evaluate queries against a gallery; the test_* names then hold the queries
    gallery = 'query' in load_index(args.data_path, args.data_name, args.crop_type)
    test_data = ImageReader(args.data_path, args.data_name, 'query' if gallery else 'test', args.backbone_type,
                            args.crop_type)
    gallery_data = ImageReader(args.data_path, args.data_name, 'gallery', args.backbone_type, args.crop_type) \
        if gallery else None
    train_eval_data = ImageReader(args.data_path, args.data_name, 'train', args.backbone_type, args.crop_type,
                                  augment=False)
    if args.cache_images:  # before any DataLoader worker starts, so that all of them share the decoded images
        start = time.perf_counter()
        caches = [train_data.cache_images(), test_data.cache_images()] + ([gallery_data.cache_images()] if gallery
                                                                          else [])
        train_eval_data.cache_images(caches[0])
        if rank == 0:
            print(f'decoded {sum(map(len, caches))} images into memory ({sum(c.nbytes for c in caches) / 2 ** 30:.1f}'
                  f' GiB) in {time.perf_counter() - start:.0f} s')
    if args.batch_size > len(train_data):
        raise UserError(f'--batch_size {args.batch_size} is larger than the {len(train_data)} training images of '
                        f'{args.data_name}; use a smaller --batch_size')
    sampler = SeededSampler(DistributedSampler(train_data, num_replicas=world, rank=rank, shuffle=True,
                                               seed=args.seed, drop_last=True))
    train_loader = DataLoader(train_data, args.batch_size // world, sampler=sampler, num_workers=args.num_workers,
                              pin_memory=device.type == 'cuda', drop_last=True,
                              persistent_workers=args.num_workers > 0,
                              multiprocessing_context=worker_context(train_data, args.num_workers))

    model = Model(args.backbone_type, args.feature_dim, train_data.num_classes, not args.no_pretrained).to(device)
    if args.amp:
        model = model.to(memory_format=torch.channels_last)
    proxies = list(model.proxies.parameters())
    others = [p for p in model.parameters() if all(p is not q for q in proxies)]
    optimizer = ChannelsLastAdamP([{'params': others}, {'params': proxies, 'lr': 1e-2}], lr=1e-4)
    scheduler = StepLR(optimizer, step_size=5, gamma=0.5)
    loss_criterion = LOSSES[args.loss_name]()
    columns = ['train_loss', 'train_accuracy'] + [f'test_recall@{k}' for k in ranks] + ['test_map@r',
                                                                                        'test_r_precision']
    statistics, start_epoch = {column: [] for column in columns}, 1
    checkpoint_path = f'results/{prefix}_checkpoint.pth'
    if rank == 0:  # what a run of this configuration killed mid-write left behind
        remove_temporaries('results', f'{prefix}_')
    if args.resume and os.path.exists(checkpoint_path):
        checkpoint = load_checkpoint(checkpoint_path, args)
        model.load_state_dict(checkpoint['model'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        scheduler.load_state_dict(checkpoint['scheduler'])
        statistics = {column: checkpoint['statistics'][column] for column in columns}
        set_rng_state(checkpoint['rng'])
        start_epoch = checkpoint['epoch'] + 1
        if rank == 0:
            print(f'resuming {checkpoint_path} after epoch {checkpoint["epoch"]}')
    elif rank == 0:
        if args.resume:
            print(f'no checkpoint at {checkpoint_path}, so training starts at epoch 1')
        elif os.path.exists(checkpoint_path):
            print(f'{checkpoint_path} holds an earlier run, which this one replaces after its first epoch; '
                  f'stop now and add --resume to continue that run instead')

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
        stats = train_one_epoch(ddp_model, train_loader, loss_criterion, optimizer, autocast, device, epoch, args,
                                rank)
        eval_batch = 2 * max(1, args.batch_size // world)  # no activations kept: a larger batch fits
        test_features = embed(model, test_data, eval_batch, args.num_workers, device, args.amp, rank, world)
        train_features = embed(model, train_eval_data, eval_batch, args.num_workers, device, args.amp, rank, world)
        gallery_set = {}  # each query ranks the gallery rather than the other queries
        if gallery:
            gallery_set = {'gallery_features': embed(model, gallery_data, eval_batch, args.num_workers, device,
                                                     args.amp, rank, world),
                           'gallery_labels': torch.tensor(gallery_data.labels)}
        scheduler.step()
        if rank != 0:
            continue
        metrics = retrieval_metrics(test_features, torch.tensor(test_data.labels), ranks, **gallery_set)
        values = [stats['loss'], stats['accuracy']] + [metrics[f'recall@{k}'] for k in ranks] + [
            metrics['map@r'], metrics['r_precision']]
        for column, value in zip(columns, values):
            statistics[column].append(value)
        memory = (f', peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB'
                  if device.type == 'cuda' else '')
        print(f'Test Epoch {epoch}/{args.num_epochs} '
              + ' '.join(f'R@{k}:{100 * metrics[f"recall@{k}"]:.2f}%' for k in ranks)
              + f' MAP@R:{100 * metrics["map@r"]:.2f}% RP:{100 * metrics["r_precision"]:.2f}%'
              + f' | train {stats["images_per_second"]:.1f} images/s{memory}')

        save_statistics(statistics, prefix)
        weights = model.state_dict()
        atomic_save(weights, f'results/{prefix}_{epoch}_model.pth')
        atomic_save({'test_images': test_data.images, 'test_labels': torch.tensor(test_data.labels),
                     'test_features': test_features, 'train_images': train_data.images,
                     'train_labels': torch.tensor(train_data.labels), 'train_features': train_features,
                     'proxies': model.proxies.weight.detach().cpu(), 'args': vars(args), 'epoch': epoch, **gallery_set,
                     **({'gallery_images': gallery_data.images} if gallery else {})},
                    f'results/{prefix}_{epoch}_data_base.pth')
        # the checkpoint is written last: once it names this epoch, every other file of the epoch is complete
        atomic_save({'model': weights, 'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                     'epoch': epoch, 'args': vars(args), 'rng': rng_state(), 'statistics': statistics},
                    checkpoint_path)
        for kind in ('model', 'data_base'):
            if epoch > 1 and os.path.exists(f'results/{prefix}_{epoch - 1}_{kind}.pth'):
                os.remove(f'results/{prefix}_{epoch - 1}_{kind}.pth')


if __name__ == '__main__':
    run_main(main)
