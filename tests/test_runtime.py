"""runtime.py's outputs: a SIGKILL at any moment leaves each file either old and whole or new and
whole, with the umask's permissions; a failed write keeps the old file and leaves no temporary."""

import os
import random
import signal
import time

import pandas as pd
import pytest
import torch
from PIL import Image

import runtime
from script_runner import temporaries


def write(folder, version):
    """One version of a 4 MB tensor file and of a 20,000-row CSV."""
    runtime.atomic_save(
        {'version': version, 'values': torch.full((1_000_000,), float(version))},
        os.path.join(folder, 'big.pth'),
    )
    with runtime.atomic_path(os.path.join(folder, 'table.csv')) as tmp:
        pd.DataFrame({'version': [version] * 20_000}).to_csv(tmp)


def test_sigkill_leaves_the_old_or_the_new_file_whole(tmp_path):
    rng, versions, interrupted = random.Random(0), [], 0
    write(str(tmp_path), 0)  # the old files, complete
    for _ in range(12):
        pid = os.fork()
        if pid == 0:  # the child writes until the parent kills it; it never returns into pytest
            try:
                torch.set_num_threads(
                    1
                )  # as in a DataLoader worker: no OpenMP pool inherited through fork
                for version in range(1, 10**6):  # new versions until killed
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
