"""Recall, build time, query time and memory of test.py --gallery's searches on a synthetic
million-image store.

    python benchmarks/index_speed.py [--num_images 1000000] [--dim 512] [--queries 1000] [--threads
    2] [--indexes exact,hnsw,ivfpq,milvus]
    python benchmarks/index_speed.py --keys_only --num_images 10000000

--keys_only measures the store's keys alone: --num_images keys (paths of about 45 characters) are
written as Store.append writes them, beside a sparse embeddings file that stands in for the rows;
then the store is opened (timed), the memory the process grew by is read from /proc (anonymous,
what it holds, and file-backed, the mapped keys the kernel may drop), and 10,000 random keys are
looked up and checked.

The data: --num_images unit vectors of --dim dimensions in clusters of about 100 (each its cluster
centre, a standard normal vector, plus --spread times as much standard normal noise, normalised),
and --queries more drawn the same way. The truth is each query's 10 nearest vectors by exact float32
inner product (faiss.IndexFlatIP over the float32 vectors). The vectors are written into a
gallery.Store as test.py writes one (float16 rows, memory-mapped), and each method is gallery.py's
own code:
  exact f32 RAM  the search before the store: the float32 embeddings in memory, one matrix product and a top-k per
                 query (the baseline of the ratios)
  exact f32      Store.search streaming a float32 store (gallery.DTYPE set to float32) a block at a time
  exact f16      Store.search streaming the float16 store, test.py's default below gallery.EXACT_BELOW images
  hnsw, ivfpq    gallery.open_index (built, written to disk) and Store.search through it: the
                 index's candidates re-ranked by their exact cosines from the float16 store (hnsw:
                 its search depth calibrated on 200 stored vectors as it is built)
  milvus         the same through an embedded Milvus Lite collection (gallery.MilvusIndex) filled
                 from the store; its RAM is what the process grew by while filling and searching it
                 (Milvus Lite runs inside the process)
Query time is per query, one query at a time as test.py searches: the mean over every query for the
indexes and over the first --timed_queries for the exact searches, which read the whole store per
query. Recall@10 is over every query; for the exact stores it is computed as one batch over the same
float16 (or float32) values that Store.search multiplies, and the timed queries are checked to
return those same neighbours. Memory: `RAM` is what the method holds in the process (the float32
matrix, or the index as faiss writes it); `mapped` is the store file the search reads through the
page cache (the kernel keeps it or drops it as memory allows; only the re-ranked rows are read
through an index). The ratios divide the exact float32 search in RAM by each method, measured in the
same run.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import gallery  # noqa: E402
from runtime import UserError, run_main  # noqa: E402

K = 10


def clustered(count, dim, spread, centres, rng):
    """(count, dim) float32 unit rows, each a random row of centres plus spread x standard normal noise."""
    rows = centres[rng.integers(0, len(centres), count)] + spread * rng.standard_normal(
        (count, dim), np.float32
    )
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def write_store(folder, vectors, dtype):
    """A gallery.Store of these rows written as test.py writes one (a chunk at a time), opened for search."""
    gallery.DTYPE = dtype
    model = os.path.join(folder, 'model.pth')
    open(model, 'wb').close()
    path = os.path.join(folder, f'store_{np.dtype(dtype).name}')
    os.makedirs(path)
    store = gallery.Store(path, model, vectors.shape[1])
    for start in range(0, len(vectors), gallery.READ_ROWS):
        block = vectors[start:start + gallery.READ_ROWS]
        store.append(
            [(f'/photos/{row:08d}.jpg', 1, 1) for row in range(start, start + len(block))],
            block,
            [],
        )
    store.load()
    store.live[:] = True  # what Store.update marks for the images still in the folder
    return store


def resident_bytes(kind='VmRSS'):
    """This process's resident memory now, in bytes (Linux): VmRSS all, RssAnon held, RssFile mapped."""
    with open('/proc/self/status') as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(kind))


def synthetic_key(row):
    """The key (path, size, mtime_ns) of synthetic image `row`: a path of about 45 characters."""
    return (f'/home/user/Pictures/{2000 + row % 25}/{row % 12 + 1:02d}/IMG_{row:09d}.jpg',
            100_000 + row % 900_000, 1_700_000_000_000_000_000 + row)


def measure_keys(count, dim):
    """Write count keys into a store (rows sparse), open it, and print its time and memory."""
    with tempfile.TemporaryDirectory(dir=os.environ.get('TMPDIR')) as folder:
        model = os.path.join(folder, 'model.pth')
        open(model, 'wb').close()
        path = os.path.join(folder, 'store')
        os.makedirs(path)
        store = gallery.Store(path, model, dim)
        begin = time.perf_counter()
        with open(store.file('paths'), 'ab') as paths, open(store.file('keys'), 'ab') as records:
            written = 0
            for start in range(0, count, gallery.READ_ROWS):
                keys = [synthetic_key(row) for row in range(start, min(start + gallery.READ_ROWS,
                                                                        count))]
                encoded = [os.fsencode(key[0]) + b'\n' for key in keys]
                paths.write(b''.join(encoded))
                records.write(gallery.key_records(keys, encoded, written).tobytes())
                written += sum(map(len, encoded))
        os.truncate(store.file('embeddings'), count * dim * np.dtype(gallery.DTYPE).itemsize)
        wrote = time.perf_counter() - begin
        del store
        held, mapped, begin = resident_bytes('RssAnon'), resident_bytes('RssFile'), time.perf_counter()
        store = gallery.Store(path, model, dim)
        opened = time.perf_counter() - begin
        held, mapped = resident_bytes('RssAnon') - held, resident_bytes('RssFile') - mapped
        asked = np.random.default_rng(0).integers(0, count, 10_000)
        begin = time.perf_counter()
        rows = store.find([gallery.key_id(synthetic_key(row)) for row in asked.tolist()])
        looked = (time.perf_counter() - begin) / len(asked)
        assert (rows == asked).all() and store.keys[int(asked[0])] == synthetic_key(int(asked[0]))
        on_disk = os.path.getsize(store.file('keys')) + os.path.getsize(store.file('paths'))
        print(f'{count:,} keys: written in {wrote:.1f} s, opened in {opened:.2f} s; the process grew '
              f'by {held / 2 ** 20:,.0f} MiB held ({held / count:.0f} bytes an image) and '
              f'{mapped / 2 ** 20:,.0f} MiB of mapped keys ({mapped / count:.0f} bytes an image; '
              f'{on_disk / count:.0f} on disk); a key found in {looked * 1e6:.1f} us')


def recall(found, truth):
    """Mean share of each query's true K nearest among the K found: (Q, K) row numbers each."""
    return np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth)])


def exact_truth(base, queries, threads):
    """(Q, K) row numbers of each query's exact nearest rows by float32 inner product."""
    import faiss
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    return index.search(queries, K)[1]


def time_store(store, queries, kind, index=None):
    """(seconds per query, (Q, K) rows found) of Store.search, one query at a time."""
    import torch
    rows = {path: row for row, (path, _, _) in enumerate(store.keys)}
    found, begin = [], time.perf_counter()
    for query in queries:
        found.append(
            [
                rows[path]
                for path, _ in store.search(torch.from_numpy(query), K, index=index or kind)
            ]
        )
    return (time.perf_counter() - begin) / len(queries), np.array(found)


def main():
    """Build, search and measure every method on one synthetic data set; print a table with ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--num_images', default=1_000_000, type=int, help='vectors in the store')
    parser.add_argument('--dim', default=512, type=int, help='their dimensions')
    parser.add_argument('--queries', default=1000, type=int, help='queries (not in the store)')
    parser.add_argument(
        '--spread', default=1.0, type=float, help='noise around each cluster centre, in its units'
    )
    parser.add_argument(
        '--timed_queries', default=20, type=int, help='queries timed for the exact store searches'
    )
    parser.add_argument('--threads', default=2, type=int, help='threads of faiss and torch')
    parser.add_argument('--seed', default=0, type=int, help='random seed of the data')
    parser.add_argument(
        '--indexes',
        default=','.join(gallery.INDEXES),
        help='the indexes to build, comma-separated (exact is always measured; hnsw takes longest '
             'to build)',
    )
    parser.add_argument('--keys_only', action='store_true',
                        help='measure only the keys: writing, opening and memory (see above)')
    args = parser.parse_args()
    if args.keys_only:
        return measure_keys(args.num_images, args.dim)
    indexes = [kind for kind in args.indexes.split(',') if kind and kind != 'exact']
    if not set(indexes) <= set(gallery.INDEXES):
        raise UserError(f'--indexes takes {", ".join(gallery.INDEXES)}, not {args.indexes}')
    import faiss
    import torch
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((max(1, args.num_images // 100), args.dim), np.float32)
    starts = range(0, args.num_images, gallery.READ_ROWS)
    base = np.concatenate([clustered(min(gallery.READ_ROWS, args.num_images - start), args.dim,
                                     args.spread, centres, rng) for start in starts])
    queries = clustered(args.queries, args.dim, args.spread, centres, rng)
    timed = queries[:args.timed_queries]
    print(
        f'{args.num_images:,} x {args.dim} clustered unit vectors, {args.queries} queries,'
        f' {args.threads} threads'
    )
    truth = exact_truth(base, queries, args.threads)
    rows = []

    # the search before the store: float32 embeddings in memory
    matrix = torch.from_numpy(base)
    begin = time.perf_counter()
    found = np.array(
        [(matrix @ torch.from_numpy(query)).topk(K).indices.numpy() for query in timed]
    )
    rows.append(
        (
            'exact f32 RAM',
            recall(found, truth),
            0.0,
            (time.perf_counter() - begin) / len(timed),
            base.nbytes,
            0,
        )
    )
    print(rows[-1], flush=True)
    del matrix

    with tempfile.TemporaryDirectory(dir=os.environ.get('TMPDIR')) as folder:
        for dtype, name in ((np.float32, 'exact f32'), (np.float16, 'exact f16')):
            begin = time.perf_counter()
            store = write_store(folder, base, dtype)
            written = time.perf_counter() - begin
            per_query, found = time_store(store, timed, 'exact')
            batch = exact_truth(np.asarray(store.rows, dtype=np.float32), queries, args.threads)
            assert (
                recall(found, batch[: len(timed)]) > 0.99
            ), 'Store.search disagrees with the same values in a batch'
            rows.append((name, recall(batch, truth), written, per_query, 0, store.rows.nbytes))
            print(rows[-1], flush=True)
        del base
        for kind in indexes:
            begin, resident = time.perf_counter(), resident_bytes()
            index = gallery.open_index(store, kind, os.path.join(folder, 'gallery.milvus.db'))
            built = time.perf_counter() - begin
            per_query, found = time_store(store, queries, kind, index)
            held = (resident_bytes() - resident if kind == 'milvus' else
                    os.path.getsize(os.path.join(store.path, f'index-{kind}.faiss')))
            rows.append((kind, recall(found, truth), built, per_query, held, store.rows.nbytes))
            print(rows[-1], flush=True)
            del index

    base_time, base_memory = rows[0][3], rows[0][4]
    print(f'| method | recall@10 | build | per query | RAM | mapped | faster | less RAM |')
    print('|---|---|---|---|---|---|---|---|')
    for name, value, build, per_query, ram, mapped in rows:
        less = f'{base_memory / ram:.1f}x' if ram else 'all'
        print(f'| {name} | {value:.4f} | {build:.1f} s | {per_query * 1000:.2f} ms | '
              f'{ram / 2 ** 20:,.0f} MiB | {mapped / 2 ** 20:,.0f} MiB | '
              f'{base_time / per_query:.1f}x | {less} |')


if __name__ == '__main__':
    run_main(main)
