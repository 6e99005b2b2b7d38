"""Time test.py --report at Stanford Online Products' size: 60,502 random 512-d test features in
SOP-like classes.

    python benchmarks/report_speed.py [--num_images 60502] [--dim 512] [--spread 2.15]

The data base is written to a temporary folder with image paths that do not exist (no thumbnails, as
for a data base whose images are gone; drawing 20 rows of 9 images adds a few seconds where they
exist), and report.write_report runs on it as `test.py --report` would, with --report_queries 20 and
--retrieval_num 8. The features are eval_speed.py's: each its class centre plus Gaussian noise,
classes of 2 to 12 images (about 11.3k classes); --spread 2.15 puts Recall@1 near 0.8, where trained
SOP models are. Printed: the wall-clock and CPU time of the whole report and of its three costly
steps (the per-query metrics, the nearest-neighbour search, the 2-D map), and the peak resident
memory.
"""
import argparse
import importlib.util
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import report  # noqa: E402
from runtime import run_main  # noqa: E402


def load(name, path):
    """The module of the file at path, under name (test.py is not importable as `test`: the standard library's)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(function, times):
    """function, recording its wall-clock and CPU seconds into times[function's name] on each call."""
    def wrapper(*args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            times[function.__name__] = (time.perf_counter() - start, time.process_time() - cpu)
    return wrapper


def main():
    """Write a random SOP-sized data base, then time the report on it."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--num_images', default=60502, type=int, help='test images (SOP: 60,502)')
    parser.add_argument('--dim', default=512, type=int, help='feature dimension')
    parser.add_argument('--spread', default=2.15, type=float, help='noise around the class centres')
    args = parser.parse_args()
    eval_speed = load('eval_speed', os.path.join(ROOT, 'benchmarks', 'eval_speed.py'))
    test = load('pp_test', os.path.join(ROOT, 'test.py'))
    features, labels = eval_speed.make_features(args.num_images, args.dim, args.spread, seed=0)
    times = {}
    report.retrieval_metrics = timed(report.retrieval_metrics, times)
    report.top_k = timed(report.top_k, times)
    report.embedding_map = timed(report.embedding_map, times)
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        os.makedirs('results')
        data_base = {
            'test_images': [f'gone/{i}.jpg' for i in range(len(labels))],
            'test_labels': torch.from_numpy(labels),
            'test_features': torch.from_numpy(features),
            'proxies': torch.zeros(1, args.dim),
            'epoch': 1,
            'args': {
                'data_path': 'gone',
                'data_name': 'sop',
                'recalls': '1,10,100,1000',
                'backbone_type': 'resnet50',
                'loss_name': 'proxy_anchor',
                'feature_dim': args.dim,
            },
        }
        path = 'results/sop_resnet50_proxy_anchor_512_1_data_base.pth'
        flags = SimpleNamespace(gallery=None, report_queries=20, retrieval_num=8)
        start, cpu = time.perf_counter(), time.process_time()
        report.write_report(flags, data_base, path, test.framed, test.draw_row)
        total = time.perf_counter() - start, time.process_time() - cpu
        size = sum(
            os.path.getsize(os.path.join(parent, name))
            for parent, _, names in os.walk('results')
            for name in names
        )
    with open('/proc/self/status') as file:
        peak = next(int(line.split()[1]) * 1024 for line in file if line.startswith('VmHWM'))
    print(f'{len(labels):,} x {args.dim} features, {labels.max() + 1:,} classes, '
          f'{torch.get_num_threads()} threads; the report\'s folder holds {size / 2 ** 20:.1f} MiB')
    steps = [('per-query metrics', times['retrieval_metrics']),
             ('nearest neighbours (top_k)', times['top_k']), ('2-D map', times['embedding_map']),
             ('whole report', total)]
    for step, (wall, cpu) in steps:
        print(f'{step:<28} {wall:7.1f} s wall {cpu:7.1f} s CPU')
    print(
        f'peak resident memory {peak / 2 ** 30:.2f} GiB (features {features.nbytes / 2 ** 30:.2f}'
        ' GiB)'
    )


if __name__ == '__main__':
    run_main(main)
