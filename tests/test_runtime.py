"""A SIGKILL at any moment leaves each output either old and whole or new and whole; reruns finish the job (issue 3)."""
import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from PIL import Image

import data_utils
import runtime
import utils
from conftest import ROOT, make_cub, write_image
from script_runner import temporaries


def write(folder, version):
    """One version of a 4 MB tensor file and of a 20,000-row CSV."""
    runtime.atomic_save({'version': version, 'values': torch.full((1_000_000,), float(version))},
                      os.path.join(folder, 'big.pth'))
    with runtime.atomic_path(os.path.join(folder, 'table.csv')) as tmp:
        pd.DataFrame({'version': [version] * 20_000}).to_csv(tmp)


def test_sigkill_leaves_the_old_or_the_new_file_whole(tmp_path):
    rng, versions, interrupted = random.Random(0), [], 0
    write(str(tmp_path), 0)  # the old files, complete
    for _ in range(12):
        pid = os.fork()
        if pid == 0:  # the child writes until the parent kills it; it never returns into pytest
            try:
                torch.set_num_threads(1)  # as in a DataLoader worker: no OpenMP pool inherited through fork
                for version in range(1, 10 ** 6):  # new versions until killed
                    write(str(tmp_path), version)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        saved = torch.load(tmp_path / 'big.pth', weights_only=True)
        assert saved['values'].shape == (1_000_000,) and (saved['values'] == saved['version']).all()
        table = pd.read_csv(tmp_path / 'table.csv')
        assert len(table) == 20_000 and table['version'].nunique() == 1
        versions.append(saved['version'])
        leftovers = temporaries(str(tmp_path))
        interrupted += bool(leftovers)
        runtime.remove_temporaries(str(tmp_path))
        assert not temporaries(str(tmp_path))
    assert interrupted >= 3, 'too few kills landed mid-write for the test to mean anything'
    assert len(set(versions)) > 1


def test_outputs_keep_the_permissions_of_ordinary_files(tmp_path):
    """mkstemp makes 0600 files; outputs must honour the umask like any file the user writes (0644 under 022)."""
    old = os.umask(0o027)
    try:
        runtime.atomic_save({'x': torch.zeros(2)}, tmp_path / 'a.pth')
        with runtime.atomic_dir(tmp_path / 'folder') as folder:
            Image.new('RGB', (4, 4)).save(os.path.join(folder, 'b.jpg'))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / 'a.pth').st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / 'folder').st_mode & 0o777 == 0o750


def test_failed_block_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    runtime.atomic_save({'x': torch.ones(3)}, tmp_path / 'a.pth')
    with pytest.raises(ZeroDivisionError):
        with runtime.atomic_path(tmp_path / 'a.pth') as tmp:
            with open(tmp, 'wb') as file:
                file.write(b'half')
            1 / 0
    assert torch.load(tmp_path / 'a.pth', weights_only=True)['x'].tolist() == [1, 1, 1]
    assert not temporaries(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------------
# data_utils.py: reruns skip finished images and complete interrupted runs

def outputs(root):
    """{path: mtime_ns} of every converted image."""
    folder = os.path.join(root, 'uncropped')
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


def test_rerun_skips_finished_images(tmp_path):
    root = make_cub(str(tmp_path), num_classes=4, per_class=3)
    data_utils.prepare(str(tmp_path), 'cub', workers=1)
    before = outputs(root)
    assert len(before) == 12
    time.sleep(0.01)
    data_utils.prepare(str(tmp_path), 'cub', workers=1)
    assert outputs(root) == before  # not one image rewritten


def test_rerun_completes_a_run_that_lost_images_and_left_temporaries(tmp_path):
    root = make_cub(str(tmp_path), num_classes=4, per_class=3)
    data_utils.prepare(str(tmp_path), 'cub', workers=1)
    index = utils.load_index(str(tmp_path), 'cub')
    folder = os.path.join(root, 'uncropped')
    lost = sorted(os.listdir(folder))[::3]
    for name in lost:
        os.remove(os.path.join(folder, name))
    os.remove(utils.index_path(str(tmp_path), 'cub'))
    # what a SIGKILL during a write leaves: an image's and the index's temporary files
    strays = os.path.join(folder, f'.{lost[0]}.k3x9_a1.tmp'), os.path.join(root, '.uncropped_data_dicts.pth.z.tmp')
    for stray in strays:
        with open(stray, 'wb') as file:
            file.write(b'\xff\xd8 half an image')
    kept = {name: mtime for name, mtime in outputs(root).items() if not name.startswith('.')}
    data_utils.prepare(str(tmp_path), 'cub', workers=1)
    after = outputs(root)
    assert set(after) == set(kept) | set(lost)
    assert all(after[name] == mtime for name, mtime in kept.items())
    assert utils.load_index(str(tmp_path), 'cub') == index
    assert not temporaries(str(tmp_path))


def test_sigkill_during_conversion_then_rerun(tmp_path):
    """Kill data_utils.py mid-conversion: every image written is whole, no index yet; the next call completes."""
    root = make_cub(str(tmp_path), num_classes=4, per_class=10)
    with open(os.path.join(root, 'images.txt')) as file:
        for line in file:
            image_id, relative = line.split()
            # large noisy images, so converting them takes long enough to be interrupted
            write_image(os.path.join(root, 'images', relative), int(relative[:3]), int(image_id), size=(900, 700))
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, 'data_utils.py'), '--data_path', str(tmp_path),
                                '--data_name', 'cub', '--workers', '1'],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    folder = os.path.join(root, 'uncropped')
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        if os.path.isdir(folder) and len([n for n in os.listdir(folder) if not n.startswith('.')]) >= 5:
            break
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, 'data_utils.py finished before it could be killed'
    done = [name for name in os.listdir(folder) if not name.startswith('.')]
    assert 5 <= len(done) < 40
    assert not os.path.exists(utils.index_path(str(tmp_path), 'cub'))
    for name in done:
        with Image.open(os.path.join(folder, name)) as image:
            image.load()  # whole: a half-written JPEG raises here
            assert image.size == (900, 700)
    before = outputs(root)
    data_utils.prepare(str(tmp_path), 'cub', workers=1)
    after = outputs(root)
    assert len(after) == 40 and all(after[name] == before[name] for name in done)
    assert sum(map(len, utils.load_index(str(tmp_path), 'cub')['train'].values())) == 20
    assert not temporaries(str(tmp_path))
