"""Time of test.py --gallery's exact scan (Store.search, --index exact) on a synthetic store; with
--baseline REVISION, gallery.py of that git revision is timed too, in the same run.

    python benchmarks/scan_speed.py [--num_images 1000000] [--dim 512] [--queries 20] [--k 8]
                                    [--dead 0.1] [--threads 2] [--repeats 3] [--baseline REVISION]

The store: --num_images random unit rows of --dim dimensions, written as test.py writes one
(float16, memory-mapped, a chunk at a time); a --dead share of them are marked removed, as
Store.update marks the images gone from the folder. The queries: --queries random unit vectors,
every other one a live row of the store that leaves itself out of its results, as a photo of the
folder does. Each method runs in a fresh process with --threads threads: it opens the store, runs
one search to bring the file into the page cache, then times each query, one at a time as test.py
searches (wall-clock and CPU time). Methods alternate; with --repeats above 1 the fastest repeat
of each is kept. Printed: the time per query of each, their ratio, and whether both found the same
results (random rows have no ties, so they must).
"""
import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from eval_speed import baseline_tree, import_from  # noqa: E402  (benchmarks/, this script's folder)
from runtime import UserError, run_main  # noqa: E402

ROWS_PER_APPEND = 1 << 14  # rows written and synced at a time while the store is made


def write_store(folder, num_images, dim, seed):
    """The path of a gallery store of num_images random float16 unit rows, as test.py writes one."""
    import gallery
    model = os.path.join(folder, 'model.pth')
    open(model, 'wb').close()
    path = os.path.join(folder, 'store')
    os.makedirs(path)
    store = gallery.Store(path, model, dim)
    rng = np.random.default_rng(seed)
    for start in range(0, num_images, ROWS_PER_APPEND):
        rows = rng.standard_normal((min(ROWS_PER_APPEND, num_images - start), dim), np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        keys = [(f'/photos/{row:08d}.jpg', 1, 1) for row in range(start, start + len(rows))]
        store.append(keys, rows, [])
    return path


def measure(method, path, args, tree=None):
    """Run in a fresh process: ([seconds], [CPU seconds], [[paths found]]), one each per query."""
    import torch
    if method == 'before':
        gallery = import_from(tree, 'gallery')
    else:
        gallery = importlib.import_module('gallery')
    torch.set_num_threads(args.threads)
    store = gallery.Store(path, os.path.join(os.path.dirname(path), 'model.pth'), args.dim)
    if len(store.keys) != args.num_images:
        raise UserError(f'gallery.py of the {method} method reads another store layout')
    rng = np.random.default_rng(args.seed + 1)
    store.live[rng.random(len(store.keys)) < args.dead] = False
    live = np.flatnonzero(store.live)
    searches = []
    for number in range(args.queries):
        if number % 2:  # a photo of the folder: its stored row, left out of its own results
            row = int(rng.choice(live))
            searches.append((store.block(row, row + 1)[0], row))
        else:
            searches.append((torch.from_numpy(rng.standard_normal(args.dim, np.float32)), None))
    store.search(searches[0][0], args.k)  # the file into the page cache
    seconds, cpu_seconds, found = [], [], []
    for query, row in searches:
        start, cpu_start = time.perf_counter(), time.process_time()
        results = store.search(query, args.k, exclude=row)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
        found.append([result for result, _ in results])
    return seconds, cpu_seconds, found


def run_worker(method, path, tree):
    """measure() in a child process of this script, with this process's flags."""
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], '--worker', method,
               '--store', path] + (['--tree', tree] if tree else [])
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise UserError(f'the {method} measurement failed:\n{result.stderr}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    """Write the store, time each method's scan over it and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--num_images', default=1_000_000, type=int, help='rows in the store')
    parser.add_argument('--dim', default=512, type=int, help='their dimensions')
    parser.add_argument('--queries', default=20, type=int, help='queries timed, one at a time')
    parser.add_argument('--k', default=8, type=int, help='results per query (--retrieval_num)')
    parser.add_argument('--dead', default=0.1, type=float, help='share of the rows marked removed')
    parser.add_argument('--threads', default=2, type=int, help='threads of torch')
    parser.add_argument('--repeats', default=3, type=int, help='runs of each; the fastest is kept')
    parser.add_argument('--seed', default=0, type=int, help='random seed of the rows and queries')
    parser.add_argument('--baseline', default=None,
                        help='a git revision whose gallery.Store.search is timed too, as "before"')
    parser.add_argument('--worker', choices=('ours', 'before'), help=argparse.SUPPRESS)
    parser.add_argument('--store', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--tree', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.store, args, args.tree)))
        return
    if args.num_images < 2 or args.queries < 1 or args.repeats < 1 or not 0 <= args.dead < 1:
        raise UserError('--num_images must be at least 2, --queries and --repeats at least 1, and '
                        '--dead at least 0 and below 1')
    with tempfile.TemporaryDirectory(dir=os.environ.get('TMPDIR')) as folder:
        tree = None
        if args.baseline:
            tree, commit = baseline_tree(args.baseline, folder)
            print(f'before: gallery.py of {args.baseline} ({commit}), with the files it imports of '
                  f'that revision')
        begin = time.perf_counter()
        path = write_store(folder, args.num_images, args.dim, args.seed)
        print(f'{args.num_images:,} x {args.dim} float16 store '
              f'({args.num_images * args.dim * 2 / 2 ** 20:,.0f} MiB) written in '
              f'{time.perf_counter() - begin:.1f} s; {args.dead:.0%} of its rows dead; '
              f'{args.queries} queries, every other one a row of the store left out of its '
              f'results; k {args.k}; {args.threads} threads')
        runs = {method: [] for method in ('ours', 'before') if method == 'ours' or tree}
        for _ in range(args.repeats):
            for method in runs:
                runs[method].append(run_worker(method, path, tree))
    best = {method: min(results, key=lambda result: sum(result[0]))
            for method, results in runs.items()}
    for method, (seconds, cpu_seconds, _) in best.items():
        print(f'{method:6s} {1000 * np.mean(seconds):8.2f} ms per query (CPU '
              f'{1000 * np.mean(cpu_seconds):.2f} ms), median {1000 * np.median(seconds):.2f} ms')
    if 'before' in best:
        (ours, ours_cpu, found), (before, before_cpu, expected) = best['ours'], best['before']
        print(f'ours/before {sum(ours) / sum(before):.2f} (CPU '
              f'{sum(ours_cpu) / sum(before_cpu):.2f}) (at most 1.0 means no slowdown since the '
              f'baseline)')
        differ = sum(a != b for a, b in zip(found, expected))
        same = 'the same for all' if not differ else f'different for {differ} of the'
        print(f'results: {same} {len(found)} queries')


if __name__ == '__main__':
    run_main(main)
