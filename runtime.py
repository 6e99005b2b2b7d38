"""Plumbing that no research idea depends on: errors a user can fix, files written whole or not at
all, one run per name, random-generator states and kernel settings, torchrun's processes and
gathers. Imports nothing from the project."""
import argparse
import contextlib
import difflib
import fcntl
import os
import pickle
import random
import re
import shutil
import socket
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


# --------------------------------------------------------------------------------------------------
# errors a user can cause, and files that are written whole or not at all

class UserError(Exception):
    """An error the user can fix: the scripts print its message as one sentence and exit non-zero."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a bad choice or number) are one UserError sentence,
    not its usage text and exit status 2; an unknown flag close to a known one is suggested."""

    def error(self, message):
        unknown = re.fullmatch(r'unrecognized arguments: (.*)', message)
        if unknown:
            options = [option for action in self._actions for option in action.option_strings]
            for word in unknown.group(1).split():
                flag = word.split('=')[0]
                # --retrieval-num for --retrieval_num: the flag with its dashes as underscores
                spelled = '--' + flag.lstrip('-').replace('-', '_')
                close = ([spelled] if spelled in options
                         else difflib.get_close_matches(flag, options, n=2, cutoff=0.6))
                if word.startswith('-') and close:
                    message += f' (did you mean {" or ".join(close)}?)'
        raise UserError(f'{message}; see python {self.prog} --help')


def run_main(main):
    """Run a script's main(), turning a UserError into one sentence on stderr and exit status 1,
    and Ctrl-C into exit status 130 (with what the script said of it); each line printed shows at
    once, also through a pipe (| tee log)."""
    if hasattr(sys.stdout, 'reconfigure'):  # not pytest's capture
        sys.stdout.reconfigure(line_buffering=True)
    try:
        main()
    except UserError as error:
        message = str(error)
        # raised in a DataLoader worker, which prepends its traceback
        if '\nOriginal Traceback' in message:
            message = message.rstrip().rsplit(f'{type(error).__name__}: ', 1)[-1]  # or a subclass's
        sys.stderr.write(f'error: {message}\n')
        sys.exit(1)
    except KeyboardInterrupt as interrupt:
        # the script may say what was saved and how to go on; written at once, for a pipe (tee)
        with contextlib.suppress(OSError):  # the pipe's reader may have died of the same Ctrl-C
            sys.stderr.write(f'interrupted; {interrupt}\n' if interrupt.args else 'interrupted\n')
            sys.stderr.flush()
        sys.exit(130)


def umask():
    """This process's umask; reading it means setting it, so it is set straight back."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary file name beside `path`; it replaces `path` only if the block completes."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    # mkstemp's 0600 would hide results from the rest of a shared group
    os.fchmod(fd, 0o666 & ~umask())
    os.close(fd)
    try:
        yield tmp
        # atomic on POSIX: readers see the old file or the new one, never half of one
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside `path`; it replaces the folder `path` only if the block completes."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    os.chmod(tmp, 0o777 & ~umask())  # not mkdtemp's 0700
    try:
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(path)}.', suffix='.old')
            os.replace(path, os.path.join(old, 'previous'))
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_temporaries(folder, prefix=''):
    """Delete what atomic_path and atomic_dir left in `folder` for names starting with `prefix` when killed."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(folder):
            if name.startswith(f'.{prefix}') and name.endswith(('.tmp', '.old')):
                path = os.path.join(folder, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, with SciencePlots' 'science' styles registered."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import scienceplots  # noqa: F401  registers the 'science' styles
    return plt


def save_figure(figure, path, dpi=150):
    """Write a matplotlib figure as PNG through a temporary file, then close it."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format='png', dpi=dpi)
    pyplot().close(figure)


def atomic_save(obj, path):
    """torch.save through a temporary file, so a crash never leaves a half-written `path`."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def safe_load(path, what='file', expected='a file this project wrote'):
    """torch.load with weights_only=True onto the CPU: tensors and plain containers only, never
    arbitrary code.

    A file that is no PyTorch file at all (a CSV, an image, a text file named .pth) is refused for
    what it is, in one sentence that names `expected`, what the caller wanted instead."""
    if not os.path.isfile(path):
        raise UserError(f'{what} {path} does not exist')
    kind = non_torch_kind(path)
    if kind is not None:
        raise UserError(f'{path} is not a {what} but {kind}; pass {expected}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f'refused to load {what} {path}: it holds Python objects other than tensors and plain '
                        f'containers, which could run code; only load files this project wrote') from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as error:
        # a pickle stream cut short or garbled fails in the unpickler's own bookkeeping (KeyError,
        # IndexError)
        raise UserError(f'could not read {what} {path} ({type(error).__name__}); it may be truncated or not '
                        f'a PyTorch file, so write it again') from None


# torch.save's zip archive, or the pickle stream of its legacy format
TORCH_MAGIC = (b'PK\x03\x04', b'\x80')


def non_torch_kind(path):
    """What a file is when it cannot be a PyTorch file ('a JPEG image', 'a text file', 'an empty file'), else None."""
    with open(path, 'rb') as file:
        head = file.read(4096)
    if head.startswith(TORCH_MAGIC):
        return None
    if not head:
        return 'an empty file'
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            return f'a {image.format} image'
    except (UnidentifiedImageError, OSError, ValueError):
        pass
    try:
        head.decode('utf-8')
        return 'a text file'
    # a multi-byte character cut by the 4096-byte read is still text
    except UnicodeDecodeError as error:
        return 'a text file' if error.start > len(head) - 4 else 'neither a PyTorch file nor text'


# --------------------------------------------------------------------------------------------------
# one run per name

class RunLock:
    """An exclusive lock on a run's name, so that two processes never train (and write) under it at
    once.

    fcntl.flock: the kernel releases it when its holder dies, even by SIGKILL, so a crashed run
    never blocks the next one. A forked child (a DataLoader worker) closes its copy at once: it
    would otherwise hold the lock until it noticed its parent's death, seconds later. The file
    names its holder, for the refusal, and is removed on release.
    """

    def __init__(self, path):
        self.path, self.fd, self.folder = path, None, os.path.dirname(path) or '.'
        self.made_folder = False

    def acquire(self):
        """Take the lock; returns None, or a description of the live process that holds it."""
        self.made_folder = not os.path.isdir(self.folder)
        os.makedirs(self.folder, exist_ok=True)
        deadline = time.monotonic() + DEAD_HOLDER_WAIT
        while True:
            # os.open's descriptors are close-on-exec: a program the run starts never holds it
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 1000).decode(errors='replace').strip() or 'a process starting up'
                os.close(fd)
                if not holder_ended(holder):
                    return holder
                # its holder has died; the kernel drops the lock once its last copy is closed
                if time.monotonic() > deadline:
                    return 'a process left behind by a run that has ended'
                time.sleep(0.05)
                continue
            # the holder may have removed the file between our open and our lock: then lock the new
            # one
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f'pid {os.getpid()} on {socket.gethostname()}, started {time.strftime("%Y-%m-%d %H:%M:%S")}'
                 .encode())
        self.fd = fd
        os.register_at_fork(after_in_child=self.close_in_child)
        return None

    def close_in_child(self):
        """In a forked child, close its copy of the lock: only the process that took it holds it."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self):
        """Remove the file, then drop the lock; a folder made for it and left empty (a run that
        failed at once) goes too, so that such a run leaves nothing behind."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        os.close(self.fd)
        self.fd = None
        if self.made_folder:
            with contextlib.suppress(OSError):  # not empty: the run wrote its outputs there
                os.rmdir(self.folder)


# how long a lock whose holder has died may take to be dropped (its last copy closed) before the
# refusal says so
DEAD_HOLDER_WAIT = 10


def holder_ended(holder):
    """Whether the process a lock file names ('pid N on HOST, ...') has ended: only one on this
    host can be checked; a zombie (killed, not yet waited for) has ended too."""
    found = re.match(r'pid (\d+) on (\S+),', holder)
    if found is None or found.group(2) != socket.gethostname():
        return False
    try:
        with open(f'/proc/{found.group(1)}/stat') as file:
            return file.read().rsplit(')', 1)[1].split()[0] in ('Z', 'X')
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(int(found.group(1)), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


@contextlib.contextmanager
def exclusive_run(prefix, rank, world):
    """Hold results/.<prefix>.lock for the block; a run of the same name already running is one
    UserError.

    Rank 0 holds the lock for the whole torchrun job and tells the other ranks whether it got it.
    """
    lock = RunLock(os.path.join('results', f'.{prefix}.lock')) if rank == 0 else None
    holder = lock.acquire() if lock else None
    if world > 1:
        shared = [holder]
        dist.broadcast_object_list(shared, src=0)
        holder = shared[0]
    if holder is not None:
        raise UserError(f'another process ({holder}) is training {prefix} right now, and two runs '
                        f'under one name would mix their files; wait for it to end, or tell this '
                        f'run apart with --run_name')
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


# --------------------------------------------------------------------------------------------------
# random generators and kernel settings

def set_seed(seed):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


@contextlib.contextmanager
def cpu_generator_seeded(seed):
    """Seed torch's CPU generator for the block, then give its state back: the caller's draws go on untouched."""
    state = torch.default_generator.get_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.default_generator.set_state(state)


def set_kernels(amp):
    """Fix for the whole run the kernel settings its figures depend on.

    cuDNN as the seed set it, except in the --amp speed mode, which autotunes. Until torch's thread
    count is first set, MKL picks one per call and sums in another order, so it is set here, once,
    before anything is computed.
    """
    torch.backends.cudnn.deterministic = not amp
    torch.backends.cudnn.benchmark = amp
    torch.set_num_threads(torch.get_num_threads())


# --------------------------------------------------------------------------------------------------
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


def gather_shards(part, size):
    """All `size` rows of a tensor whose rows r, r + W, ... rank r holds as `part` (the sharding of
    a Subset over range(rank, size, W)), in order, on every rank; not differentiable."""
    world = dist.get_world_size()
    rows = -(-size // world)
    padded = part.new_zeros(rows, *part.shape[1:])  # equal shapes for all_gather
    padded[:len(part)] = part
    parts = gather(padded).view(world, rows, *part.shape[1:])  # (W, rows, ...)
    whole = part.new_empty(size, *part.shape[1:])
    for r in range(world):
        whole[r::world] = parts[r, :len(range(r, size, world))]
    return whole
