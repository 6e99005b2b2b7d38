"""A run stopped (Ctrl-C, SIGKILL) and continued: --resume only continues, Ctrl-C says what is saved and
how to go on, and a killed run's lock never blocks the next one."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import runtime
import train
from conftest import ROOT, TINY
from runtime import RunLock
from script_runner import error_sentence

RUN = [
    '--data_name',
    'cub',
    '--backbone_type',
    TINY,
    '--no_pretrained',
    '--feature_dim',
    '8',
    '--batch_size',
    '4',
    '--num_workers',
    '0',
]
PREFIX = 'cub_timm-test_resnet_proxy_anchor_8_no_pretrained_batch_size4'


def checkpoint(folder, name, **flags):
    """A checkpoint of run `name` under folder/results/, trained with RUN's flags changed by flags."""
    args = vars(train.get_args_parser().parse_args(RUN + ['--data_path', 'data']))
    args.update(flags)
    os.makedirs(folder / 'results', exist_ok=True)
    torch.save(
        {
            'model': {},
            'optimizer': {},
            'scheduler': {},
            'epoch': 1,
            'args': args,
            'rng': {},
            'statistics': {},
        },
        folder / 'results' / f'{name}_checkpoint.pth',
    )


def test_resume_without_a_checkpoint_of_this_run_names_those_of_the_data_and_backbone(
    script, prepared, tmp_path
):
    """A forgotten flag: nothing trains, and the refusal names each near checkpoint with its differences."""
    checkpoint(tmp_path, f'{PREFIX}_batch_size16', batch_size=16)
    checkpoint(tmp_path, f'{PREFIX}_lr0.001_seed2', lr=0.001, seed=2)
    checkpoint(
        tmp_path, 'cub_googlenet_proxy_anchor_8', backbone_type='googlenet'
    )  # another backbone
    status, _, err = script('train', '--data_path', prepared, *RUN, '--resume', cwd=tmp_path)
    assert error_sentence(status, err) == (
        f'error: --resume continues a run, but there is no results/{PREFIX}_checkpoint.pth (no epoch of this '
        f'run was saved); the checkpoints of cub and {TINY} differ in their flags: '
        f'results/{PREFIX}_batch_size16_checkpoint.pth (its --batch_size 16); '
        f'results/{PREFIX}_lr0.001_seed2_checkpoint.pth (its --lr 0.001, --seed 2), so resume one with its '
        f'flags; leave out --resume to start this run'
    )
    assert sorted(os.listdir(tmp_path / 'results')) == sorted(
        f'{name}_checkpoint.pth'
        for name in (
            f'{PREFIX}_batch_size16',
            f'{PREFIX}_lr0.001_seed2',
            'cub_googlenet_proxy_anchor_8',
        )
    )


def test_resume_without_any_checkpoint_says_to_start_without_it(script, prepared, tmp_path):
    status, _, err = script('train', '--data_path', prepared, *RUN, '--resume', cwd=tmp_path)
    assert error_sentence(status, err) == (
        f'error: --resume continues a run, but there is no results/{PREFIX}_checkpoint.pth (no epoch of this '
        f'run was saved); leave out --resume to start this run'
    )


class Interrupt(train.Watch):
    """Ctrl-C at the start of the training pass of epoch `at` (0: before any)."""

    def __init__(self, at):
        self.at = at

    def started(self, run):
        if self.at == 0:
            raise KeyboardInterrupt

    def trained(self, run, epoch, stats, features):
        if epoch == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize('at, saved', [(0, None), (3, 2)])
def test_ctrl_c_says_which_epoch_is_saved_and_the_command_that_continues_it(
    script, prepared, tmp_path, quick_runs, at, saved
):
    flags = ['--data_path', prepared, *RUN, '--num_epochs', '4', '--warm_up', '1']
    status, _, err = script('train', *flags, cwd=tmp_path, watch=Interrupt(at))
    assert status == 130
    prefix = f'{PREFIX}_warm_up1'
    if saved is None:
        assert err.splitlines()[-1] == (
            f'interrupted; no epoch of {prefix} was saved yet; start it again '
            f'with: {shlex.join(["python", "train.py", *flags])}'
        )
        assert not (tmp_path / 'results' / f'{prefix}_checkpoint.pth').exists()
        return
    command = f'{shlex.join(["python", "train.py", *flags, "--resume"])}'
    assert err.splitlines()[-1] == (
        f'interrupted; epoch {saved} of {prefix} is saved in '
        f'results/{prefix}_checkpoint.pth; continue it with: {command}'
    )
    path = tmp_path / 'results' / f'{prefix}_checkpoint.pth'
    assert torch.load(path, weights_only=True)['epoch'] == saved
    # the command it gives continues the run: it resumes after the saved epoch
    status, out, err = script('train', *shlex.split(command)[2:], cwd=tmp_path, watch=Interrupt(4))
    assert status == 130 and f'resuming results/{prefix}_checkpoint.pth after epoch {saved}' in out
    assert f'interrupted; epoch 3 of {prefix} is saved' in err


def test_ctrl_c_through_a_pipe_shows_each_line_at_once_and_exits_130(prepared, tmp_path):
    """Ctrl-C to the whole process group, loader worker included, with stdout a pipe (as `| tee` makes it):
    the epoch's line arrives while the run goes on, and the last words on stderr say what is saved.
    """
    command = [
        sys.executable,
        os.path.join(ROOT, 'train.py'),
        '--data_path',
        prepared,
        *RUN[:-1],
        '1',
        '--num_epochs',
        '50',
    ]
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # a suite started in the background by a shell without job control ignores SIGINT, and
        # its children inherit that: the run here takes Ctrl-C as a terminal's does
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = process.stdout.readline()
        while line and 'Test Epoch 1/50' not in line:
            line = process.stdout.readline()
        assert (
            process.poll() is None
        ), 'the run ended before it printed its first epoch through the pipe'
        path = tmp_path / 'results' / f'{PREFIX}_checkpoint.pth'
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130
    saved = torch.load(path, weights_only=True)['epoch']
    assert err.splitlines()[-1].startswith(
        f'interrupted; epoch {saved} of {PREFIX} is saved in '
        f'results/{PREFIX}_checkpoint.pth; continue it with: python '
    )
    assert 'Traceback' not in err


# --------------------------------------------------------------------------------------------------
# SIGKILL and the run's lock


HOLD_AND_FORK = """
import os, sys, time
sys.path.insert(0, {root!r})
from runtime import RunLock
lock = RunLock({path!r})
assert lock.acquire() is None
child = os.fork()  # a child that lives on, as a DataLoader worker does
if child == 0:
    time.sleep(60)
    os._exit(0)
print(os.getpid(), child, flush=True)
time.sleep(60)
"""


def test_a_killed_holders_forked_child_does_not_keep_the_lock(tmp_path):
    """The holder runs in a fresh interpreter: forking pytest itself, whose gRPC and torch threads
    may hold locks at the fork, can hang the child."""
    path = str(tmp_path / 'results' / '.run.lock')
    holder = subprocess.Popen(
        [sys.executable, '-c', HOLD_AND_FORK.format(root=str(ROOT), path=path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    holder_pid, child_pid = map(int, holder.stdout.readline().split())
    try:
        assert RunLock(path).acquire().startswith(f'pid {holder_pid} on ')  # held while it lives
        holder.kill()
        holder.wait()
        os.kill(child_pid, 0)  # the child lives on, as a worker does after its parent's death
        lock = RunLock(path)
        assert lock.acquire() is None
        lock.release()
    finally:
        os.kill(child_pid, signal.SIGKILL)


def test_a_lock_held_after_its_named_holder_ended_never_names_that_process(tmp_path, monkeypatch):
    """A lock kept by some process the lock file does not name (its named holder ended): the refusal
    waits for it, then says so without naming the ended process as the one training."""
    ended = subprocess.Popen([sys.executable, '-c', 'pass'])
    ended.wait()
    path = tmp_path / '.run.lock'
    keeper = subprocess.Popen(
        [
            sys.executable,
            '-c',
            f'''
import fcntl, os, socket, time
fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f'pid {ended.pid} on {{socket.gethostname()}}, started then'.encode())
print('locked', flush=True)
time.sleep(60)
''',
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert keeper.stdout.readline().strip() == 'locked'
        monkeypatch.setattr(runtime, 'DEAD_HOLDER_WAIT', 0.3)
        start = time.monotonic()
        holder = RunLock(str(path)).acquire()
        assert holder == 'a process left behind by a run that has ended'
        assert time.monotonic() - start >= 0.3  # it waited for the lock to go
    finally:
        keeper.kill()
        keeper.wait()


def test_a_run_killed_with_loader_workers_running_resumes_at_once(prepared, tmp_path):
    """SIGKILL to train.py alone, its DataLoader worker left running (as a job scheduler's kill of the main
    process does), then --resume at once: it resumes, never refused for the dead run."""
    command = [
        sys.executable,
        os.path.join(ROOT, 'train.py'),
        '--data_path',
        prepared,
        *RUN[:-1],
        '1',
        '--num_epochs',
        '2',
        '--warm_up',
        '1',
    ]
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    path = tmp_path / 'results' / f'{PREFIX}_warm_up1_checkpoint.pth'
    deadline = time.monotonic() + 120
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    with open(f'/proc/{process.pid}/task/{process.pid}/children') as file:
        workers = [int(pid) for pid in file.read().split()]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, 'train.py ended before it could be killed'
    assert workers, 'no loader worker was running'
    resumed = subprocess.run(command + ['--resume'], cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'resuming' in resumed.stdout and 'after epoch 1' in resumed.stdout
