"""What a training run leaves under results/, and how every script reads it back. It receives plain
values (a run name, tensors, state dicts, the run's settings as a dict), never train.py's parser or
namespace.

Every file of a run starts with its name, <run> (run_name: car_resnet50_proxy_anchor_512, then
_<flag><value> for each flag off its default, then _<--run_name>). Each is written whole or not at
all, the checkpoint last. Under results/:
  <run>_<epoch>_data_base.pth  the data base of the last finished epoch (DataBase), a dict:
    <split>_images    N absolute image paths, for split train, test and, for a query/gallery data
                      set (In-shop), gallery
    <split>_labels    (N,) int64 labels 0..C-1 in class-id order; a query split and its gallery
                      share them
    <split>_features  (N, D) float32 unit embeddings: test-time ones for test and gallery; for train
                      those of the epoch's training pass (augmented, from weights that changed
                      along it), as the seed stored them
    proxies           (C, D) unit class proxies, (C, K, D) for a loss with K centres per class, or
                      (0, D) for a loss without any
    epoch             the epoch it was written after
    data_root         the absolute --data_path the images lie under (absent before it was recorded)
    weights_sha256    the digest of the model's weights (absent before it was recorded)
    args              the run's settings, {flag: value} as train.py parsed them
  <run>_<epoch>_model.pth      the Model's state dict of that epoch, which embeds images test.py
                               searches for and which export.py exports
  <run>_checkpoint.pth         what --resume reads: model, loss, optimizer and scheduler (their
                               state dicts), epoch, args, rng (the random generators' states),
                               statistics
  <run>_statistics.csv, .png   one row per epoch: train_loss, train_accuracy ("n/a" for a loss
                               without class proxies), then test_<metric> and val_<metric>
  tensorboard/<run>/           with --tensorboard: the same figures, the learning rates, images/s
  .<run>.lock                  held while the run trains (runtime.exclusive_run)
"""
import difflib
import glob
import hashlib
import os
import re
from typing import NamedTuple, Optional

import pandas as pd
import torch

from model import Model, backbone_file_name
from runtime import UserError, atomic_path, atomic_save, pyplot, rng_state, safe_load, save_figure

DATA_BASE_FILE = 'results/<data>_<backbone>_<loss>_<dim>_<epoch>_data_base.pth'
SPLITS = ('train', 'test', 'gallery')
# the settings a run had before train.py had these flags; a data base of such a run lacks them
EARLIER_RUN = {'crop_type': 'uncropped', 'recalls': '1,2,4,8', 'image_size': 224}
# the flags that named runs before every recipe flag did: such a run's files may carry that name
OLD_NAMED_FLAGS = ('scale', 'margin', 'optimizer', 'lr', 'proxy_lr', 'weight_decay', 'lr_step',
                   'lr_gamma', 'seed', 'val_fraction')
# folders (os.pathsep-separated) where --data_base names are looked for after ./results/
RESULTS_VARIABLE = 'PP_RESULTS'
CHECKPOINT_KEYS = {'model', 'optimizer', 'scheduler', 'epoch', 'args', 'rng', 'statistics'}


# --------------------------------------------------------------------------------------------------
# the data base

class Split(NamedTuple):
    """A split of a data base: images (N absolute paths), labels (N,) int64, features (N, D)."""
    images: list
    labels: torch.Tensor
    features: torch.Tensor


class DataBase(NamedTuple):
    """The data base of one epoch, as the module docstring lists it: train, test and gallery Splits
    (gallery None for a data set without one), the proxies, the epoch, root (the absolute data
    root), weights_sha256 (None before it was recorded) and run, the run's settings as a plain dict;
    its properties read what the scripts need of them."""
    train: Optional[Split]
    test: Split
    gallery: Optional[Split]
    proxies: torch.Tensor
    epoch: Optional[int]
    root: str
    weights_sha256: Optional[str]
    run: dict

    @property
    def backbone_type(self):
        return self.run['backbone_type']

    @property
    def feature_dim(self):
        return self.run['feature_dim']

    @property
    def data_name(self):
        """The prepared folder's name, or None for a data base that does not record it."""
        return self.run.get('data_name')

    @property
    def loss_name(self):
        return self.run['loss_name']

    @property
    def crop_type(self):
        return self.run['crop_type']

    @property
    def image_size(self):
        """The side of the square crop the run's model sees (train.py --image_size): every image
        embedded for this data base is cropped so."""
        return self.run['image_size']

    @property
    def recalls(self):
        """The K of Recall@K the run evaluated, as --recalls spells them: '1,2,4,8'."""
        return self.run['recalls']

    @property
    def searched(self):
        """The split a query searches: a query/gallery data set's gallery (In-shop), else test."""
        return self.gallery if self.gallery is not None else self.test

    def save(self, path):
        """Write the data base whole, as the module docstring lists it."""
        saved = {'proxies': self.proxies, 'args': self.run, 'epoch': self.epoch,
                 'data_root': self.root}
        if self.weights_sha256 is not None:
            saved['weights_sha256'] = self.weights_sha256
        for name in SPLITS:
            split = getattr(self, name)
            if split is not None:
                saved.update({f'{name}_images': split.images, f'{name}_labels': split.labels,
                              f'{name}_features': split.features})
        atomic_save(saved, path)

    @classmethod
    def load(cls, path):
        """A data base train.py wrote, also one written before data_root, weights_sha256,
        --crop_type, --recalls or --image_size were recorded; anything else is a UserError."""
        saved = safe_load(path, 'data base', f'a {DATA_BASE_FILE} file train.py wrote')
        missing = {'test_images', 'test_labels', 'test_features', 'proxies', 'args'} - set(
            saved if isinstance(saved, dict) else ())
        if missing:
            raise UserError(f'{path} is not a data base train.py wrote (it has no '
                            f'{", ".join(sorted(missing))}); pass a {DATA_BASE_FILE} file')
        splits = {name: Split(*(saved[f'{name}_{part}'] for part in Split._fields))
                  if f'{name}_features' in saved else None for name in SPLITS}
        run = dict(saved['args'])
        for flag, value in EARLIER_RUN.items():
            run.setdefault(flag, value)
        # before data_root was recorded, paths were stored as given to train.py, below --data_path
        return cls(**splits, proxies=saved['proxies'], epoch=saved.get('epoch'),
                   root=saved.get('data_root', run.get('data_path')),
                   weights_sha256=saved.get('weights_sha256'), run=run)

    @staticmethod
    def find(name):
        """The data base file `name` means, as --data_base takes it: a path; else, in each of
        results_folders(), a file name, a run name (its newest epoch's data base) or an unambiguous
        prefix of one (the newest data base among those of the run it names). Not found, it is a
        UserError that says where it looked and names the data bases there, closest first."""
        if os.path.isfile(name):
            return name
        folders = results_folders()
        for folder in folders:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
        found = {path: run_of(path) for folder in folders for path in
                 sorted(glob.glob(os.path.join(glob.escape(folder), '*_data_base.pth')))}
        # the run of that name, else the one run whose name starts so
        for matching in ({path: run for path, run in found.items() if run == name},
                         {path: run for path, run in found.items() if run.startswith(name)}):
            if len(set(matching.values())) > 1:
                raise UserError(f'--data_base {name} could mean the data base of any of the runs '
                                f'{", ".join(sorted(set(matching.values())))}; pass more of the '
                                f'name')
            if matching:  # the newest epoch of the run, then the newest file
                return max(matching, key=lambda path: (epoch_of(path), os.path.getmtime(path)))
        where = ', '.join(folders) or 'none exists'
        names = {os.path.basename(path) for path in found} | set(found.values())
        close = difflib.get_close_matches(name, names, n=5, cutoff=0)
        exist = (f'; the closest that exist: {", ".join(close)}' if close else
                 f'; none holds a data base: train.py writes {DATA_BASE_FILE}, so train a model '
                 f'first')
        raise UserError(f'data base {name} was found neither as given nor under results/ as a '
                        f'file, run name or prefix of one (looked in the working folder\'s results/, '
                        f'the folders ${RESULTS_VARIABLE} lists, then the repository\'s results/: '
                        f'{where}){exist}')

    @classmethod
    def open(cls, name, data_path=None):
        """(data base, its path): found as find() finds it; with data_path, its images are looked
        for below that folder instead of where they were trained (the data has moved)."""
        path = cls.find(name)
        data_base = cls.load(path)
        return (data_base if data_path is None else data_base.moved_to(data_path)), path

    def moved_to(self, data_path):
        """The data base with its image paths moved from its root to data_path."""
        root = os.path.abspath(data_path)

        def moved(split):
            return None if split is None else split._replace(images=[
                os.path.join(root, os.path.relpath(path, self.root)) for path in split.images])
        return self._replace(train=moved(self.train), test=moved(self.test),
                             gallery=moved(self.gallery), root=root)

    def check_images_exist(self, path, data_path=None):
        """A UserError unless the images a query searches are where the data base (at path) says: it
        names where they were looked for and how to point test.py at their new place."""
        moved = self.images_moved(path, data_path)
        if moved is not None:
            raise UserError(moved)

    def images_moved(self, path, data_path=None):
        """The sentence check_images_exist raises, or None when the images are there."""
        missing = next((image for image in self.searched.images if not os.path.isfile(image)), None)
        if missing is None:
            return None
        trained = f'under {self.root}, where it was trained'
        where = f'under --data_path {data_path}' if data_path is not None else trained
        return (f'the images of data base {path} are not {where} (there is no {missing}); if they '
                f'moved, pass the folder that now holds {self.data_name}/ as --data_path')


def results_folders():
    """Where a --data_base name is looked for, each once, in this order: results/ of the working
    folder, the folders $PP_RESULTS lists, and results/ beside these scripts, where train.py writes
    when run from the repository; only those that exist."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
    listed = [folder for folder in os.environ.get(RESULTS_VARIABLE, '').split(os.pathsep) if folder]
    folders = []
    for folder in ['results', *listed, here]:
        if os.path.isdir(folder) and not any(os.path.samefile(folder, seen) for seen in folders):
            folders.append(folder)
    return folders


def run_of(path):
    """The run name of a data base file: its file name without _<epoch>_data_base.pth."""
    return re.sub(r'(_\d+)?_data_base\.pth$', '', os.path.basename(path))


def short_name(run):
    """The shortest start of a run's name, cut where its parts meet ('digits', 'digits_resnet18',
    ...), that --data_base takes for this run alone among the data bases that exist now."""
    runs = {run_of(path) for folder in results_folders()
            for path in glob.glob(os.path.join(glob.escape(folder), '*_data_base.pth'))}
    parts = run.split('_')
    for end in range(1, len(parts) + 1):
        start = '_'.join(parts[:end])
        if {other for other in runs if other.startswith(start)} <= {run}:
            return start
    return run


def epoch_of(path):
    """The epoch in a data base's file name (0 where it has none)."""
    found = re.search(r'_(\d+)_data_base\.pth$', os.path.basename(path))
    return int(found.group(1)) if found else 0


def output_folder(data_base_path):
    """Where test.py and export.py write what they make of a data base: the results/ folder it lies
    in (its run's, wherever the script runs), else results/ of the working folder."""
    folder = os.path.dirname(os.path.abspath(data_base_path))
    if os.path.basename(folder) != 'results' or (
            os.path.isdir('results') and os.path.samefile(folder, 'results')):
        return 'results'
    return folder


def new_data_base(splits, proxies, epoch, data_path, weights, run):
    """The data base of an epoch: splits {name: (image paths, labels, (N, D) features)} for train,
    test and the gallery if any, the (C, D) unit proxies, the run's --data_path, the model's state
    dict (its digest is kept) and the run's settings. The paths become absolute, so that test.py
    finds them from any working folder."""
    made = {name: Split([os.path.abspath(path) for path in images], torch.tensor(labels), features)
            for name, (images, labels, features) in splits.items()}
    return DataBase(made['train'], made['test'], made.get('gallery'), proxies, epoch,
                    os.path.abspath(data_path), weights_sha256(weights), dict(run))


def weights_sha256(state_dict):
    """SHA-256 hex digest of a state dict's names, dtypes, shapes and bytes, in key order: it tells
    one model's weights from another's of the same shapes."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f'{name} {tensor.dtype} {tuple(tensor.shape)}\n'.encode())
        # the bytes of any dtype, bf16 included
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_model(data_base, data_base_path, device='cpu'):
    """(the model saved beside the data base, in eval mode on device, its path). Weights other than
    those the data base was written with are refused: a model of the same shapes from another run
    would embed images in another space, and every similarity would be wrong."""
    model_path = data_base_path.replace('_data_base.pth', '_model.pth')
    if not os.path.isfile(model_path):
        raise UserError(f'data base {data_base_path} has no model {model_path} beside it, '
                        f'which embeds images outside the data base (your own queries, a --gallery '
                        f'folder) and is what export.py exports; pass the data base of a train.py '
                        f'run with its _model.pth file beside it')
    weights = safe_load(model_path, 'model',
                        f'the _model.pth file train.py wrote beside data base {data_base_path}')
    # the model's own proxies: the data base's may be a loss's instead, or none
    proxies = (weights['proxies.weight'].size(0)
               if isinstance(weights, dict) and 'proxies.weight' in weights
               else data_base.proxies.size(0))
    model = Model(data_base.backbone_type, data_base.feature_dim, proxies, pretrained=False,
                  image_size=data_base.image_size)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError):  # other shapes or names, or no state dict
        raise UserError(f'{model_path} does not match the model data base {data_base_path} '
                        f'describes ({data_base.backbone_type}, {data_base.feature_dim}-d); use '
                        f'the pair train.py wrote together') from None
    # a data base written before the digest was recorded cannot be checked, and says nothing
    if data_base.weights_sha256 is not None and weights_sha256(weights) != data_base.weights_sha256:
        raise UserError(f'{model_path} holds other weights than those data base {data_base_path} '
                        f'was written with (a model of another run or epoch); put the _model.pth '
                        f'file train.py wrote with this data base beside it')
    return model.to(device).eval(), model_path


# --------------------------------------------------------------------------------------------------
# run names, the epoch's files, checkpoints and --resume

def flag_value(value):
    """A flag's value as a run name shows it: 0.2, 1e-05, 64 for 64.0, 2, adamw; distinct values
    stay distinct."""
    if isinstance(value, float):
        return f'{value:g}' if float(f'{value:g}') == value else repr(value)
    return str(value)


def run_name(data_name, backbone_type, loss_name, feature_dim, named=(), suffix=None):
    """The name every output of a run starts with: the seed's car_resnet50_proxy_anchor_512, then
    _<flag><value> (_<flag> for a switch) for each (flag, value, default) of `named` whose value is
    off its default (car_resnet50_proxy_anchor_512_margin0.2_seed2), then _<suffix> (--run_name)."""
    # timm/<name> and pml/<class name> become timm-<name> and pml-<class name>
    name = (f'{data_name}_{backbone_file_name(backbone_type)}_{loss_name.replace("/", "-")}_'
            f'{feature_dim}')
    for flag, value, default in named:
        if value != default:
            name += f'_{flag}' + ('' if value is True else flag_value(value))
    return name + (f'_{suffix}' if suffix else '')


def checkpoint_path(prefix):
    """Where a run's checkpoint lies."""
    return f'results/{prefix}_checkpoint.pth'


def save_epoch(prefix, epoch, statistics, weights, data_base, states):
    """The epoch's statistics ({column: [one value per epoch]}), model (weights, its state dict),
    data base and checkpoint, each written whole; the previous epoch's model and data base go. The
    checkpoint holds the weights, states {'loss', 'optimizer', 'scheduler': their state dicts}, the
    epoch, the run's settings, the random generators' states and the statistics."""
    save_statistics(statistics, prefix)
    atomic_save(weights, f'results/{prefix}_{epoch}_model.pth')
    data_base.save(f'results/{prefix}_{epoch}_data_base.pth')
    # the checkpoint goes last: once it names this epoch, every other file of the epoch is complete
    atomic_save({'model': weights, **states, 'epoch': epoch, 'args': data_base.run,
                 'rng': rng_state(), 'statistics': statistics}, checkpoint_path(prefix))
    for kind in ('model', 'data_base'):
        if epoch > 1 and os.path.exists(f'results/{prefix}_{epoch - 1}_{kind}.pth'):
            os.remove(f'results/{prefix}_{epoch - 1}_{kind}.pth')


def recipe_changes(saved, recipe):
    """[(flag, saved value)] of the recipe flags, recipe {flag: (value, default)}, whose value in a
    checkpoint's saved settings differs; a checkpoint from before a flag existed was trained with
    the flag's default."""
    return [(flag, saved.get(flag, default)) for flag, (value, default) in recipe.items()
            if saved.get(flag, default) != value]


def load_checkpoint(path, recipe, num_epochs):
    """The checkpoint of an interrupted run of the same recipe ({flag: (value, default)}) that has
    not reached num_epochs yet; a checkpoint from before losses had parameters gets an empty
    'loss'."""
    checkpoint = safe_load(path, 'checkpoint')
    missing = CHECKPOINT_KEYS - set(checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        raise UserError(f'{path} is not a checkpoint train.py wrote (it has no '
                        f'{", ".join(sorted(missing))}); move it away and start afresh without '
                        f'--resume')
    for flag, saved in recipe_changes(checkpoint['args'], recipe)[:1]:
        raise UserError(f'{path} was trained with --{flag} {saved}, not {recipe[flag][0]}; resume '
                        f'with the same flags or start afresh without --resume')
    if checkpoint['epoch'] >= num_epochs:
        raise UserError(f'{path} already finished epoch {checkpoint["epoch"]} of {num_epochs}; '
                        f'raise --num_epochs to train longer')
    return {'loss': {}, **checkpoint}


def refuse_renamed_run(old, new, recipe):
    """A UserError if the checkpoint of the run named `new` lies under `old`, the name it had before
    --crop_type, --no_pretrained, --batch_size, --warm_up and --amp named runs: it says how to
    rename its files."""
    path = checkpoint_path(old)
    if old == new or not os.path.isfile(path):
        return
    checkpoint = safe_load(path, 'checkpoint')
    if isinstance(checkpoint, dict) and not recipe_changes(checkpoint.get('args', {}), recipe):
        raise UserError(f'this run was written as {old} before every recipe flag named runs; to '
                        f'resume it, rename its files: for f in results/{old}_*; do mv "$f" '
                        f'"results/{new}${{f#results/{old}}}"; done')


def refuse_resume_without_checkpoint(path, recipe):
    """The UserError of --resume where this run has no checkpoint (at path): --resume continues a
    run, so it names the checkpoints of the same data set and backbone, with the flags in which
    each differs from this run's recipe ({flag: (value, default)}), fewest first."""
    data_name, backbone = recipe['data_name'][0], recipe['backbone_type'][0]
    pattern = glob.escape(f'{data_name}_{backbone_file_name(backbone)}_') + '*_checkpoint.pth'
    near = []
    for other in glob.glob(os.path.join('results', pattern)):
        saved = saved_args(other)
        if saved is not None and (saved.get('data_name'), saved.get('backbone_type')) == (
                data_name, backbone):
            changes = recipe_changes(saved, recipe)
            near.append((len(changes), other, ', '.join(
                flag_words(flag, value) for flag, value in changes) or 'no recipe flag'))
    listed = '; '.join(f'{other} (its {changes})' for _, other, changes in sorted(near)[:5])
    close = (f'; the checkpoints of {data_name} and {backbone} differ in their flags: {listed}, so '
             f'resume one with its flags' if near else '')
    raise UserError(f'--resume continues a run, but there is no {path} (no epoch of this run was '
                    f'saved){close}; leave out --resume to start this run')


def saved_args(path):
    """The settings a checkpoint holds (only they are read: the file is mapped), or None for a
    file that is no checkpoint train.py wrote."""
    try:
        saved = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # any unreadable file is simply not listed
        return None
    args = saved.get('args') if isinstance(saved, dict) else None
    return args if isinstance(args, dict) else None


def flag_words(flag, value):
    """A flag as a command line has it: --batch_size 16, --no_pretrained; 'no --amp' for a switch
    that is off."""
    if isinstance(value, bool):
        return f'--{flag}' if value else f'no --{flag}'
    return f'--{flag} {flag_value(value)}'


# --------------------------------------------------------------------------------------------------
# statistics: the CSV, its curves, TensorBoard

def save_statistics(statistics, prefix):
    """Rewrite the statistics CSV ({column: [one value per epoch]}) and redraw its curves."""
    epochs = pd.RangeIndex(1, len(statistics['train_loss']) + 1, name='epoch')
    frame = pd.DataFrame(statistics, index=epochs)
    with atomic_path(f'results/{prefix}_statistics.csv') as tmp:
        # a loss without class proxies has no train accuracy: "n/a", which pandas reads back as NaN
        frame.to_csv(tmp, index_label='epoch', na_rep='n/a')
    plot_statistics(frame, f'results/{prefix}_statistics.png')


def plot_statistics(frame, path):
    """Loss and accuracy, then the test metrics (and the validation ones, if any) per epoch: a
    SciencePlots figure."""
    plt = pyplot()
    names = {'map@r': 'MAP@R', 'r_precision': 'R-Precision'}
    panels = [(split, title) for split, title in (
        ('test', 'test (unseen classes)'), ('val', 'validation (held-out training classes)'))
              if any(column.startswith(f'{split}_') for column in frame.columns)]
    with plt.style.context(['science', 'no-latex']):
        figure, axes = plt.subplots(1, 1 + len(panels),
                                    figsize=(4.2 * (1 + len(panels)) - 0.4, 2.8))
        left = axes[0]
        left.plot(frame.index, frame['train_loss'], marker='o', markersize=3, label='loss')
        left.set(xlabel='epoch', ylabel='train loss', title='training')
        lines = left.get_lines()
        if frame['train_accuracy'].notna().any():
            twin = left.twinx()
            twin.plot(frame.index, 100 * frame['train_accuracy'], marker='s', markersize=3,
                      color='tab:red', label='accuracy')
            twin.set_ylabel('train accuracy (%)')
            lines += twin.get_lines()
        else:  # a loss without class proxies
            left.text(0.5, 0.04, 'train accuracy: does not apply\n(the loss has no class proxies)',
                      transform=left.transAxes, ha='center', va='bottom', fontsize=7,
                      color='tab:red')
        # below the axes: inside, 'best' avoids the loss curve only, not the twin's accuracy curve
        left.legend(handles=lines, loc='upper center', bbox_to_anchor=(0.5, -0.22), ncol=2,
                    fontsize=7, frameon=False)
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


def tensorboard_writer(prefix, start_epoch):
    """A TensorBoard writer into results/tensorboard/<run name>/, one folder per run as `tensorboard
    --logdir results/tensorboard` shows them. purge_step hides what an earlier process logged there
    from start_epoch on: the epochs a resumed run trains again (logged, then killed before its
    checkpoint), or all of an earlier run that a fresh one replaces; so no step is shown twice."""
    # imported here: it is slow, and only --tensorboard needs it
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(os.path.join('results', 'tensorboard', prefix), purge_step=start_epoch)


def log_epoch(writer, epoch, statistics, images_per_second, rates):
    """An epoch's figures as TensorBoard scalars at step `epoch`: each statistics column under its
    split (train/loss, test/recall@1, val/map@r, ...), the training images per second and the
    learning rate of each parameter group, rates {group name: rate} (lr/backbone_and_head,
    lr/proxies); flushed, so that a crash loses no finished epoch."""
    for column, values in statistics.items():
        split, metric = column.split('_', 1)
        writer.add_scalar(f'{split}/{metric}', values[-1], epoch)
    writer.add_scalar('train/images_per_second', images_per_second, epoch)
    for group, rate in rates.items():
        writer.add_scalar(f'lr/{group}', rate, epoch)
    writer.flush()
