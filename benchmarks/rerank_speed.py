"""Time and peak memory of re-ranking (rerank.rerank_metrics) and of the clustering metrics
(utils.clustering_metrics: NMI, AMI) against the plain evaluation (utils.retrieval_metrics) in the
same run, at SOP's size.

    python benchmarks/rerank_speed.py [--methods aqe,dba,kreciprocal,nmi_ami] [--num_images 60502]
                                      [--scale 1] [--ranks 1,10,100,1000] [--threads T]

The data are eval_speed.py's sop case: N = 60,502 float32 unit rows of 512 dimensions in SOP-like
classes (2 to 12 images, 11.3k classes), spread 2.15 (Recall@1 near 0.8). Each method runs once in a
fresh process (this script with --worker) that loads the features, records its resident memory,
resets its high-water mark and reads VmHWM after the method: the peak printed is the memory the
method needs above the features and the libraries (torch allocates outside Python's allocator, so
tracemalloc would miss it). Printed: wall and CPU time of each, its ratio to the plain evaluation of
the same run, the peak, and the figures (re-ranking moves them; it is not meant to keep them). The
re-rankers run with their default parameters (aqe and dba: k 10, alpha 3; kreciprocal: k1 20, k2 6,
lambda 0.3); nmi_ami is a k-means with k = the number of classes (faiss, 20 iterations), as
train.py --metrics nmi,ami computes it. --scale 0.1 runs a tenth of the rows for a quick look.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eval_speed import cpu_model, make_features, memory_status, reset_peak_memory  # noqa: E402
from runtime import UserError, run_main  # noqa: E402

METHODS = ('aqe', 'dba', 'kreciprocal', 'nmi_ami')


def measure(method, path, ranks, threads):
    """In a fresh process: (seconds, CPU seconds, peak bytes above the loaded features, metrics) of
    the plain evaluation ('plain') or one re-ranking method."""
    import torch

    import rerank
    from utils import clustering_metrics, retrieval_metrics
    torch.set_num_threads(threads)
    data = np.load(path)
    features, labels = torch.from_numpy(data['features']), torch.from_numpy(data['labels'])
    baseline = reset_peak_memory()
    start, cpu_start = time.perf_counter(), time.process_time()
    if method == 'plain':
        metrics = retrieval_metrics(features, labels, ranks)
    elif method == 'nmi_ami':
        metrics = clustering_metrics(features, labels)
    else:
        metrics = rerank.rerank_metrics(features, labels, ranks, method)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = memory_status()['VmHWM'] - baseline
    return seconds, cpu_seconds, peak, {key: float(value) for key, value in metrics.items()}


def run_worker(method, path, ranks, threads):
    """measure() in a child process of this script."""
    command = [sys.executable, os.path.abspath(__file__), '--worker', method, '--data', path,
               '--threads', str(threads), '--ranks', ranks]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise UserError(f'the {method} measurement failed:\n{result.stderr}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--methods', default=','.join(METHODS),
                        help=f'comma-separated, of {",".join(METHODS)}')
    parser.add_argument('--num_images', default=60502, type=int, help='N (SOP test set: 60,502)')
    parser.add_argument('--dim', default=512, type=int, help='D, the feature dimension')
    parser.add_argument('--spread', default=2.15, type=float, help='noise around the class centres')
    parser.add_argument('--ranks', default='1,10,100,1000', help="the K of Recall@K (SOP's)")
    parser.add_argument('--scale', default=1.0, type=float, help='N times this (0.1: quick)')
    parser.add_argument('--threads', default=None, type=int, help="threads (default: torch's)")
    parser.add_argument('--seed', default=0, type=int, help='random seed of the features')
    parser.add_argument('--worker', default=None, choices=('plain',) + METHODS,
                        help=argparse.SUPPRESS)
    parser.add_argument('--data', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    ranks = [int(k) for k in args.ranks.split(',')]
    if args.worker:
        print(json.dumps(measure(args.worker, args.data, ranks, args.threads)))
        return
    methods = [method for method in args.methods.split(',') if method]
    if not methods or not set(methods) <= set(METHODS):
        raise UserError(f'--methods must be some of {",".join(METHODS)} separated by commas, not '
                        f'{args.methods!r}')
    if not 0 < args.scale <= 1:
        raise UserError(f'--scale must be above 0 and at most 1, not {args.scale}')
    import torch
    threads = args.threads or torch.get_num_threads()
    print(f'{threads} threads on {os.cpu_count()} cores of {cpu_model()}; load average '
          f'{os.getloadavg()[0]:.1f}')
    features, labels = make_features(max(2, round(args.num_images * args.scale)), args.dim,
                                     args.spread, args.seed)
    print(f'N = {len(labels)}, D = {args.dim}, {labels.max() + 1} classes; features '
          f'{features.nbytes / 2 ** 20:.0f} MiB; ranks {args.ranks}')
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'features.npz')
        np.savez(path, features=features, labels=labels)
        for method in ['plain'] + methods:
            results[method] = run_worker(method, path, args.ranks, threads)
            seconds, cpu, peak, metrics = results[method]
            ratio = '' if method == 'plain' else f', {seconds / results["plain"][0]:.1f}x plain'
            print(f'{method:11s} {seconds:7.1f} s (CPU {cpu:.1f} s){ratio}; peak memory above the '
                  f'features {peak / 2 ** 30:.2f} GiB; '
                  + '  '.join(f'{key} {100 * value:.2f}' for key, value in metrics.items()))
    print(f'load average {os.getloadavg()[0]:.1f} at the end')


if __name__ == '__main__':
    run_main(main)
