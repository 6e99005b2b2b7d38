"""Run a top-level script's main() in this process as its command line would, and read what it
printed.

In-process runs skip the seconds of importing torch that a subprocess costs; they go through the
same runtime.run_main as `python <script>.py`, so an exception other than UserError still fails the
test loudly.
"""

import glob
import importlib.util
import os
import re
import sys

from conftest import ROOT

PROGRESS = re.compile(r'\d+%\|')  # a tqdm progress bar, which stderr may hold besides the error


def load_script(name):
    """The module of ROOT/<name>.py: the one `import <name>` gives, so that a monkeypatch reaches
    every user of it; only test.py is loaded under another name (`import test` gives the standard
    library's package).
    """
    if name != 'test':
        return importlib.import_module(name)
    key = f'pp_script_{name}'
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(ROOT, f'{name}.py'))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def error_sentence(status, stderr):
    """Check a failed run: exit status 1, no traceback, and stderr one 'error: ' line (besides progress bars)."""
    assert status == 1, stderr
    assert 'Traceback' not in stderr
    lines = [
        line for line in re.split(r'[\r\n]', stderr) if line.strip() and not PROGRESS.search(line)
    ]
    assert len(lines) == 1 and lines[0].startswith('error: '), stderr
    assert stderr.endswith('\n')
    return lines[0]


def temporaries(folder):
    """Temporary files or folders atomic_path/atomic_dir left anywhere under `folder`."""
    return [
        os.path.join(parent, name)
        for parent, folders, files in os.walk(folder)
        for name in folders + files
        if name.startswith('.') and name.endswith('.tmp')
    ]


def query_folder(results, name):
    """<results>/<data base name>_queries/<n>/<name>: the folder of query `name` from test.py's
    newest call that wrote one."""
    calls = sorted(
        glob.glob(os.path.join(glob.escape(str(results)), '*_queries', '*', glob.escape(name))),
        key=lambda path: int(os.path.basename(os.path.dirname(path))),
    )
    assert calls, f'test.py wrote no query {name} under {results}'
    return type(results)(calls[-1]) if not isinstance(results, str) else calls[-1]


def wrote_query(out, name):
    """Whether test.py's output says it wrote query `name` into a call's folder under a results/."""
    return (
        re.search(rf' to (\S*/)?results/\S*_queries/\d+/{re.escape(name)}/$', out, re.M) is not None
    )
