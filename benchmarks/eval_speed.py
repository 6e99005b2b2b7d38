"""Time and peak memory of utils.retrieval_metrics against an exact faiss-cpu search, at SOP's and
In-shop's sizes.

    python benchmarks/eval_speed.py [--cases sop,inshop,large] [--num_images 60502] [--spread 2.15]
                                    [--scale 1] [--repeats 1] [--baseline REVISION]

The data, float32 unit rows, each its class centre plus Gaussian noise:
  sop     all-vs-all, Stanford Online Products' size: N = 60,502 rows of 512 dimensions in SOP-like classes (2 to 12
          images, about 5.3 on average, 11.3k classes); --spread 2.15 puts Recall@1 near 0.8, where
          trained SOP models are (79.1 for Proxy-Anchor). At both rank sets, 1,10,100,1000 (SOP's)
          and 1,2,4,8.
  inshop  queries against a gallery, In-shop Clothes' size: 14,218 queries and 12,612 gallery rows of 512
          dimensions from the same 3,985 classes (at least one of each on either side, 3.6 queries
          and 3.2 gallery images per class on average); spread 2.0 puts Recall@1 near 0.92 (91.9 for
          Proxy-Anchor). Ranks 1,10,20,30,40 (In-shop's).
  large   a large gallery: 10,000 queries of 4,000 classes against 500,000 gallery rows of 128 dimensions in 125,000
          classes, the queries' among them (4 gallery images per class on average); spread 1.2,
          Recall@1 near 0.84. Ranks 1,10,20,30,40.
--scale S multiplies every case's rows and classes by S (0.1: a tenth of each side, about a
hundredth of the work), for a quick run on a busy machine.
The methods:
  ours       utils.retrieval_metrics, as train.py calls it (every product in float32).
  screened   the same with screen=True: bfloat16 products, candidates re-scored exactly.
  extra      ours with extra=EXTRA (precision@k, mAP@k, MRR) too: their cost.
  per_query  the same with per_query=True and a progress callback, as a report of the worst queries calls it.
  before     with --baseline REVISION: retrieval_metrics of utils.py at that git revision (say main, or a commit),
             with the project files it imports (neighbours.py, runtime.py) of that revision too,
             so that one run times a change's before and after.
  faiss      faiss.IndexFlatIP (exact inner product) over the items (all rows, or the gallery) searched with every
             query for its k = max(max rank, max R) nearest (+1 without a gallery, the query then
             dropped from its own list by position), and the metric arithmetic the seed's evaluation
             does on such lists (the hits among the first K; precision at each hit among the first
             R).
All use the same number of threads (--threads, by default torch's, that is every core).

Each measurement runs in a fresh process that loads the features from a .npy file, imports its
libraries, records its resident memory and resets its high-water mark (`echo 5 >
/proc/self/clear_refs`), runs the method once, and reads VmHWM from /proc/self/status: the peak
reported is VmHWM minus the resident memory before the method, i.e. the memory the method needs
above the features and the libraries. tracemalloc would miss it: torch and faiss allocate outside
Python's allocator. The time is the wall-clock time of the method alone, and beside it the CPU time
of all its threads, which other processes on a busy machine inflate less. Methods alternate, and
with --repeats above 1 the fastest repeat of each is kept (and the least CPU time), since other
processes make single timings noisy. The metrics are printed side by side: ours, per_query's means
and before's are the same; faiss agrees but for near-ties: two cosines within float32 rounding
(1e-7) of each other may swap places between the two GEMMs, which moves a figure by a few
thousandths of a point at most. A first line compares the float32 GEMM of torch.mm (MKL) with
neighbours.cosine_block's (oneDNN).
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
from runtime import UserError, run_main  # noqa: E402

RANK_SETS = ('1,10,100,1000', '1,2,4,8')
EXTRA = ('precision@1', 'precision@10', 'map@10', 'mrr')  # the extra method's metrics
# name: (queries, gallery items, query classes, gallery classes, dimension, spread, ranks); see the
# docstring
GALLERY_CASES = {'inshop': (14218, 12612, 3985, 3985, 512, 2.0, '1,10,20,30,40'),
                 'large': (10000, 500000, 4000, 125000, 128, 1.2, '1,10,20,30,40')}


def make_features(num_images, dim, spread, seed):
    """(features (N, D) float32 unit rows, labels (N,) int64) in SOP-like classes of 2 to 12 images."""
    rng = np.random.default_rng(seed)
    # mean 5.3, as SOP's 60,502 / 11,316
    sizes = np.clip(2 + rng.poisson(3.35, size=num_images), 2, 12)
    sizes = sizes[:np.searchsorted(np.cumsum(sizes), num_images) + 1]
    sizes[-1] -= sizes.sum() - num_images
    sizes = sizes[sizes > 0]
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    centres = rng.standard_normal((len(sizes), dim), dtype=np.float32)
    features = centres[labels] + spread * rng.standard_normal((num_images, dim), dtype=np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features, labels.astype(np.int64)


def labels_of(count, classes, rng):
    """(count,) labels in random order, every one of classes at least once, the rest spread at random among them."""
    sizes = 1 + rng.multinomial(count - classes, np.full(classes, 1 / classes))
    return rng.permutation(np.repeat(np.arange(classes), sizes))


def make_gallery(num_queries, num_gallery, query_classes, gallery_classes, dim, spread, seed):
    """(queries (Q, D), query labels (Q,), gallery (G, D), gallery labels (G,)): float32 unit rows
    around one centre per class; the query classes are the first query_classes of the gallery's."""
    rng = np.random.default_rng(seed)
    query_labels = labels_of(num_queries, query_classes, rng)
    gallery_labels = labels_of(num_gallery, gallery_classes, rng)
    centres = rng.standard_normal((gallery_classes, dim), dtype=np.float32)
    sets = []
    for labels in (query_labels, gallery_labels):
        features = centres[labels] + spread * rng.standard_normal(
            (len(labels), dim), dtype=np.float32
        )
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        sets += [features, labels.astype(np.int64)]
    return tuple(sets)


def memory_status():
    """{'VmRSS': bytes, 'VmHWM': bytes} of this process, from /proc/self/status."""
    with open('/proc/self/status') as file:
        fields = dict(line.split(':', 1) for line in file)
    return {key: int(fields[key].split()[0]) * 1024 for key in ('VmRSS', 'VmHWM')}


def reset_peak_memory():
    """This process's resident bytes now, its high-water mark (VmHWM) reset to them (Linux 4.0+;
    elsewhere the mark stays)."""
    baseline = memory_status()['VmRSS']
    try:
        with open('/proc/self/clear_refs', 'w') as file:
            file.write('5')
    except OSError:
        pass
    return baseline


def faiss_metrics(features, labels, ranks, gallery_features=None, gallery_labels=None, chunk=4096):
    """The same metrics from an exact faiss IndexFlatIP search and the seed's arithmetic on neighbour lists."""
    import faiss
    symmetric = gallery_features is None
    items, item_labels = (features, labels) if symmetric else (gallery_features, gallery_labels)
    n = len(labels)
    r = np.bincount(item_labels, minlength=labels.max() + 1)[labels] - symmetric  # (N,) R per query
    # +1: the query finds itself, dropped below
    k = min(len(items), max(max(ranks), int(r.max())) + symmetric)
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)
    _, neighbours = index.search(features, k)  # (N, k)
    hits_at, ap_sum, rp_sum = np.zeros(len(ranks)), 0.0, 0.0
    positions = np.arange(1, k + 1 - symmetric)  # (k - 1,) or (k,)
    for start in range(0, n, chunk):
        found = neighbours[start:start + chunk]  # (b, k)
        queries = np.arange(start, start + len(found))
        if symmetric:
            is_self = found == queries[:, None]
            # a query beyond its own list: drop the last instead
            is_self[~is_self.any(axis=1), -1] = True
            # (b, k - 1) the query removed by position
            found = found[~is_self].reshape(len(found), k - 1)
        hits = item_labels[found] == labels[queries, None]  # (b, k - 1) or (b, k)
        for i, rank in enumerate(ranks):
            hits_at[i] += hits[:, :rank].any(axis=1).sum()
        r_chunk = r[queries]
        hits_in_r = hits & (positions[None] <= r_chunk[:, None])
        precision = np.cumsum(hits_in_r, axis=1) / positions
        ap_sum += ((precision * hits_in_r).sum(axis=1) / np.maximum(r_chunk, 1)).sum()
        rp_sum += (hits_in_r.sum(axis=1) / np.maximum(r_chunk, 1)).sum()
    with_r = int((r > 0).sum())
    metrics = {f'recall@{rank}': hits_at[i] / n for i, rank in enumerate(ranks)}
    metrics.update({'map@r': ap_sum / with_r, 'r_precision': rp_sum / with_r})
    return metrics


def import_from(tree, name):
    """Module `name` of the source tree in the folder tree, with the project modules it imports
    (utils.py's neighbours.py, runtime.py, ...) read from that tree too, not from this one."""
    for module, loaded in list(sys.modules.items()):
        path = getattr(loaded, '__file__', None)
        if module != '__main__' and path and os.path.dirname(os.path.abspath(path)) == ROOT:
            del sys.modules[module]
    sys.path.insert(0, tree)
    return importlib.import_module(name)


def baseline_tree(revision, folder):
    """(the folder under folder holding the source tree of a git revision, its short commit)."""
    tree = os.path.join(folder, 'before')
    os.makedirs(tree)
    archive = subprocess.run(['git', '-C', ROOT, 'archive', revision], capture_output=True)
    if archive.returncode:
        raise UserError(f'--baseline {revision!r} is not a git revision of {ROOT}: '
                        f'{archive.stderr.decode().strip()}')
    subprocess.run(['tar', '-x', '-C', tree], input=archive.stdout, check=True)
    commit = subprocess.run(['git', '-C', ROOT, 'rev-parse', '--short', revision],
                            capture_output=True, text=True).stdout.strip()
    return tree, commit


def measure(method, path, ranks, threads, tree=None):
    """Run in a fresh process: (seconds, CPU seconds of all its threads, peak bytes above the loaded
    features, metrics) of one method; per_query reports the means of its per-query figures, which
    must equal the averages."""
    import faiss
    import torch
    utils = import_from(tree, 'utils') if method == 'before' else importlib.import_module('utils')
    retrieval_metrics = utils.retrieval_metrics
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    data = np.load(path)
    features, labels = data['features'], data['labels']
    gallery = (
        (data['gallery_features'], data['gallery_labels']) if 'gallery_features' in data else ()
    )
    baseline = reset_peak_memory()
    inputs = (
        torch.from_numpy(features),
        torch.from_numpy(labels),
        ranks,
        *map(torch.from_numpy, gallery),
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    if method in ('ours', 'before'):
        metrics = retrieval_metrics(*inputs)
    elif method == 'screened':
        metrics = retrieval_metrics(*inputs, screen=True)
    elif method == 'extra':
        metrics = retrieval_metrics(*inputs, extra=EXTRA)
        metrics = {key: value for key, value in metrics.items() if key not in EXTRA}
    elif method == 'per_query':
        blocks = []
        _, per_query = retrieval_metrics(
            *inputs, per_query=True, progress=lambda done, total: blocks.append(done)
        )
    else:
        metrics = faiss_metrics(features, labels, ranks, *gallery)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = memory_status()['VmHWM'] - baseline
    if method == 'per_query':
        metrics = {
            key: per_query[key].double().mean().item()
            for key in per_query
            if key.startswith('recall@')
        }
        metrics['map@r'] = per_query['ap@r'].nanmean().item()
        metrics['r_precision'] = per_query['r_precision'].nanmean().item()
    return seconds, cpu_seconds, peak, {key: float(value) for key, value in metrics.items()}


def gemm_speeds(threads, size=2048, dim=512, repeats=5):
    """GFLOP/s of a (size, dim) x (dim, size) float32 product by torch.mm (MKL) and
    neighbours.cosine_block."""
    import torch
    from neighbours import cosine_block
    torch.set_num_threads(threads)
    a, b = torch.randn(size, dim), torch.randn(size, dim)
    speeds = {}
    for name, product in (('torch.mm (MKL)', lambda: a @ b.T),
                          ('neighbours.cosine_block (oneDNN)', lambda: cosine_block(a, b))):
        product()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            seconds.append(time.perf_counter() - start)
        speeds[name] = 2 * size * size * dim / min(seconds) / 1e9
    return speeds


def cpu_model():
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        with open('/proc/cpuinfo') as file:
            names = [line.split(':', 1)[1].strip() for line in file if line.startswith('model name')]
    except OSError:
        names = []
    return names[0] if names else 'an unknown CPU'


def run_worker(method, path, ranks, threads, tree):
    """measure() in a child process of this script."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        '--worker',
        method,
        '--data',
        path,
        '--threads',
        str(threads),
        '--ranks',
        ranks,
    ] + (['--tree', tree] if tree else [])
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise UserError(f'the {method} measurement failed:\n{result.stderr}')
    return json.loads(result.stdout.strip().splitlines()[-1])


# (method, baseline) pairs printed
RATIOS = (('ours', 'faiss'), ('screened', 'ours'), ('extra', 'ours'), ('per_query', 'ours'),
          ('ours', 'before'))
METHODS = ('ours', 'screened', 'extra', 'per_query', 'before', 'faiss')


def compare(label, path, ranks, threads, repeats, tree):
    """Measure every method on the features saved at path, alternating, and print the comparison;
    returns the ratios {(method, baseline): (fastest time / fastest time, least CPU time / least CPU
    time)}."""
    runs = {
        method: []
        for method in METHODS
        if method != 'before' or tree
    }
    for _ in range(repeats):
        for method in runs:
            runs[method].append(run_worker(method, path, ranks, threads, tree))
    best = {method: min(results, key=lambda result: result[0]) for method, results in runs.items()}
    cpu = {method: min(result[1] for result in results) for method, results in runs.items()}
    ratios = {
        pair: (best[pair[0]][0] / best[pair[1]][0], cpu[pair[0]] / cpu[pair[1]])
        for pair in RATIOS
        if set(pair) <= set(best)
    }
    print(
        f'\n{label}, ranks {ranks}: '
        + ', '.join(
            f'{method} {best[method][0]:.1f} s (CPU {cpu[method]:.1f} s)' for method in best
        )
    )
    print('  ratio ' + ', '.join(f'{method}/{baseline} {wall:.2f} (CPU {cpu_ratio:.2f})'
                                 for (method, baseline), (wall, cpu_ratio) in ratios.items()))
    print(
        '  peak memory above the features: '
        + ', '.join(f'{method} {best[method][2] / 2 ** 30:.3f} GiB' for method in best)
    )
    for method, (_, _, _, metrics) in best.items():
        print(
            f'  {method:9s} '
            + '  '.join(f'{key} {100 * value:.3f}' for key, value in metrics.items())
        )
    ours = best['ours'][3]
    for method in [method for method in best if method != 'ours']:
        difference = max(abs(ours[key] - best[method][3][key]) for key in ours)
        print(f'  largest difference between ours and {method}: {100 * difference:.4f} points')
    if repeats > 1:
        print(
            '  all times (s): '
            + '; '.join(
                f'{method} ' + ' '.join(f'{result[0]:.1f}' for result in results)
                for method, results in runs.items()
            )
        )
    return ratios


def main():
    """Generate the features of each case, measure both methods and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        '--cases',
        default='sop,inshop,large',
        help='comma-separated cases: sop (all-vs-all), inshop, large (queries against a gallery)',
    )
    parser.add_argument(
        '--num_images', default=60502, type=int, help='sop: N rows (SOP test set: 60,502)'
    )
    parser.add_argument('--dim', default=512, type=int, help='sop: D, the feature dimension')
    parser.add_argument(
        '--spread', default=2.15, type=float, help='sop: noise around the class centres'
    )
    parser.add_argument(
        '--threads', default=None, type=int, help="threads of both methods (default: torch's)"
    )
    parser.add_argument(
        '--repeats', default=1, type=int, help='runs of each method; the fastest is kept'
    )
    parser.add_argument('--seed', default=0, type=int, help='random seed of the features')
    parser.add_argument(
        '--baseline',
        default=None,
        help='a git revision whose utils.retrieval_metrics is timed too, as "before"',
    )
    parser.add_argument('--scale', default=1.0, type=float,
                        help="every case's rows and classes times this (0.1 for a quick run)")
    parser.add_argument('--worker', default=None, choices=METHODS,
                        help=argparse.SUPPRESS)
    parser.add_argument('--data', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--ranks', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--tree', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(
            json.dumps(
                measure(
                    args.worker,
                    args.data,
                    [int(k) for k in args.ranks.split(',')],
                    args.threads,
                    args.tree,
                )
            )
        )
        return
    cases = args.cases.split(',')
    if args.num_images < 2 or args.repeats < 1 or not 0 < args.scale <= 1:
        raise UserError('--num_images must be at least 2, --repeats at least 1 and --scale '
                        'above 0 and at most 1')
    if not cases or not set(cases) <= {'sop', *GALLERY_CASES}:
        raise UserError(f'--cases must be some of sop,{",".join(GALLERY_CASES)} separated by '
                        f'commas, not {args.cases!r}')
    import torch
    threads = args.threads or torch.get_num_threads()
    print(f'{threads} threads on {os.cpu_count()} cores of {cpu_model()}; load average '
          f'{os.getloadavg()[0]:.1f}')
    print(
        'float32 GEMM 2048 x 512 x 2048: '
        + ', '.join(f'{name} {speed:.0f} GFLOP/s' for name, speed in gemm_speeds(threads).items())
    )
    ratios = []
    with tempfile.TemporaryDirectory() as folder:
        path, tree = os.path.join(folder, 'features.npz'), None
        if args.baseline:
            tree, commit = baseline_tree(args.baseline, folder)
            print(f'before: utils.py of {args.baseline} ({commit}), with the files it imports of '
                  f'that revision')
        if 'sop' in cases:
            num_images = max(2, round(args.num_images * args.scale))
            features, labels = make_features(num_images, args.dim, args.spread, args.seed)
            print(f'\nsop: N = {len(labels)}, D = {args.dim}, {labels.max() + 1} classes of '
                  f'{np.bincount(labels).min()} to {np.bincount(labels).max()} images, spread '
                  f'{args.spread}; features {features.nbytes / 2 ** 20:.0f} MiB')
            np.savez(path, features=features, labels=labels)
            del features
            ratios += [
                compare('sop', path, ranks, threads, args.repeats, tree) for ranks in RANK_SETS
            ]
        for case in [case for case in GALLERY_CASES if case in cases]:
            *sizes, spread, ranks = GALLERY_CASES[case]
            sizes[:4] = [max(1, round(size * args.scale)) for size in sizes[:4]]
            queries, query_labels, gallery, gallery_labels = make_gallery(*sizes, spread, args.seed)
            r = np.bincount(gallery_labels)[query_labels]
            print(f'\n{case}: {len(queries)} queries x {len(gallery)} gallery items, D = '
                  f'{sizes[-1]}, R of 1 to {r.max()} (mean {r.mean():.1f}), spread {spread}; '
                  f'features {(queries.nbytes + gallery.nbytes) / 2 ** 20:.0f} MiB')
            np.savez(path, features=queries, labels=query_labels, gallery_features=gallery,
                     gallery_labels=gallery_labels)
            del queries, gallery
            ratios.append(compare(case, path, ranks, threads, args.repeats, tree))
    print()
    meanings = (
        'ours is no slower than faiss',
        'the screen is faster',
        'the extra metrics cost no time',
        'the per-query figures cost no time',
        'no slowdown since the baseline',
    )
    for (method, baseline), meaning in zip(RATIOS, meanings):
        found = [ratio[method, baseline] for ratio in ratios if (method, baseline) in ratio]
        if found:
            print(f'{method}/{baseline}: worst {max(wall for wall, _ in found):.2f}, all '
                  + ' '.join(f'{wall:.2f}' for wall, _ in found) + '; by CPU time '
                  + ' '.join(f'{cpu:.2f}' for _, cpu in found) + f' (at most 1.0 means {meaning})')


if __name__ == '__main__':
    run_main(main)
