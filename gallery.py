"""Plumbing for test.py --gallery: a folder's embeddings kept on disk, appended as the folder
changes and searched memory-mapped, exactly or through a faiss index saved beside them. Imports
nothing from the research files but utils.py's embed_files (images read, transformed and embedded as
test.py and train.py do) and neighbours.py's exact search.

A store is one folder, results/<model>_gallery_<folder hash>/, for one model file and one photo
folder:
  meta.json                    {version, model, dim, dtype, generation}: written whole; names the two files below
  keys-<generation>.jsonl      one line per image: [path, size, mtime_ns], or [path, size, mtime_ns, "unreadable"]
  embeddings-<generation>.f16  row r: the embedding of the r-th line that is not unreadable, (D,) float16
  index-<kind>.faiss / .json   an index over the rows and what it was built from (hnsw, ivfpq)
--index milvus keeps a Milvus collection in step with the store instead (the store stays the source
of the vectors; see MilvusIndex).
New and changed images are appended a chunk at a time, the rows first and then their keys, so a run
killed while embedding loses at most the chunk it was on: rows without keys are cut off when the
store is next opened. The row of a removed or changed image stays until a compaction writes the live
rows into a new generation.
"""

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from neighbours import top_k
from runtime import RunLock, UserError, atomic_path, remove_temporaries
from utils import embed_files, unreadable_line

VERSION = 1  # of the store's layout; a store or index of another version is written anew
# half of float32's disk and page cache; exact recall@10 0.9997 at 200,000 rows (index_speed.py)
DTYPE = np.float16
CHUNK = 256  # images embedded, then appended and synced together: what an interruption can lose
READ_ROWS = 1 << 16  # rows read from the memory map at a time: 64 MiB of float16 at 512-d
# compact when dead rows (removed or changed images) are this share of the store
COMPACT_FRACTION = 0.25
INDEXES = ('exact', 'hnsw', 'ivfpq', 'milvus')
EXACT_BELOW = 1_000_000  # the default --index: exact below this many images, ivfpq from it (README)
# HNSW: 16 links per node and faiss's default construction depth, half the build time of 32 links at
# the same recall after re-ranking (measured at 50,000 vectors). A fixed search depth that is enough
# at 200,000 images (recall@10 0.957 with 200) finds only 0.734 at 1,000,000, so the depth is
# calibrated when the index is built: doubled from the candidates fetched until the exact 10 nearest
# of HNSW_SAMPLE stored images are found with recall HNSW_RECALL (above the 0.95 sought, for queries
# from outside the gallery), at most HNSW_EF_MAX
HNSW_M, HNSW_EF_CONSTRUCTION = 16, 40
HNSW_SAMPLE, HNSW_RECALL, HNSW_EF_MAX, HNSW_K = 200, 0.97, 8192, 10
# IVF-PQ: faiss's fast-scan codes, 4 bits per 8 dimensions (32 bytes a 512-d row); with 8-bit codes
# training the product quantizer took minutes at 20,000 rows on this machine, with 4-bit codes
# seconds
IVFPQ_BITS = 4
# k-means of 16 centroids per part: faiss asks for 39 training rows per centroid
IVFPQ_MIN = 39 * 2 ** IVFPQ_BITS
# inverted lists visited per query: an eighth of them, at least 32; at 1,000,000 vectors (1,000
# lists) 32 found 0.90 of the exact top 10, 64 found 0.95 and 128 found 0.98 in 3.1 ms
# (benchmarks/index_speed.py)
IVFPQ_NPROBE, IVFPQ_PROBED_SHARE = 32, 8
# Milvus (--index milvus): rows inserted or ids deleted per request, what an interruption loses;
# ids listed per request; seconds to wait for a server; its limits on results and search depth
MILVUS_CHUNK, MILVUS_LIST, MILVUS_TIMEOUT, MILVUS_TOP_K, MILVUS_EF_MAX = 1024, 16384, 10, 16384, 32768
MILVUS_EF_CONSTRUCTION = 200  # built by the server, on all its cores
MILVUS_FIELDS = {'id': 'INT64', 'embedding': 'FLOAT_VECTOR', 'path': 'VARCHAR', 'size': 'INT64',
                 'mtime': 'INT64'}
MILVUS_PROPERTY = 'pp.gallery'  # the collection property naming the model its embeddings come from
RERANK = 20  # approximate candidates per result, re-ranked by their exact cosines from the store


def candidates(k):
    """How many approximate neighbours to fetch from an index for k exact ones."""
    return max(RERANK * k, 200)


# --------------------------------------------------------------------------------------------------
# the store

@contextlib.contextmanager
def open_store(path, model_path, dim):
    """The Store at path, held by this process alone for the block: a second one stops with one sentence."""
    lock = RunLock(os.path.join(path, '.lock'))
    holder = lock.acquire()
    if holder is not None:
        raise UserError(
            f'another process ({holder}) is using gallery store {path} right now; wait for it'
            ' to end'
        )
    try:
        yield Store(path, model_path, dim)
    finally:
        lock.release()


class Store:
    """The embeddings of one photo folder by one model file, on disk and memory-mapped (see the module docstring)."""

    def __init__(self, path, model_path, dim):
        status = os.stat(model_path)
        self.path, self.dim = path, dim
        self.model = [os.path.realpath(model_path), status.st_size, status.st_mtime_ns]
        meta = self.read_json('meta.json')
        expected = {
            'version': VERSION,
            'model': self.model,
            'dim': dim,
            'dtype': np.dtype(DTYPE).name,
        }
        if meta is None or {key: meta.get(key) for key in expected} != expected:
            if meta is not None:
                print(
                    f'gallery store {path} was written by another model file or version, so it is'
                    ' written anew'
                )
            meta = {**expected, 'generation': uuid.uuid4().hex[:12]}
            self.write_json('meta.json', meta)
        self.generation = meta['generation']
        self.remove_others()
        self.load()

    def file(self, kind, generation=None):
        """The path of this generation's keys or embeddings file."""
        extension = {'keys': 'jsonl', 'embeddings': np.dtype(DTYPE).str[1:]}[kind]  # f2: float16
        return os.path.join(self.path, f'{kind}-{generation or self.generation}.{extension}')

    def read_json(self, name):
        """A JSON file of the store, or None when it is missing or not JSON."""
        try:
            with open(os.path.join(self.path, name)) as file:
                return json.load(file)
        except (OSError, ValueError):
            return None

    def write_json(self, name, value):
        """Write a JSON file of the store whole."""
        with atomic_path(os.path.join(self.path, name)) as tmp, open(tmp, 'w') as file:
            json.dump(value, file)

    def remove_others(self):
        """Delete other generations' files and what a killed run left half-written."""
        remove_temporaries(self.path)
        mine = {os.path.basename(self.file('keys')), os.path.basename(self.file('embeddings'))}
        for name in os.listdir(self.path):
            if name.startswith(('keys-', 'embeddings-')) and name not in mine:
                os.remove(os.path.join(self.path, name))

    def load(self):
        """Read the keys, cut off what an interrupted append left without keys, and map the embeddings."""
        keys_path, rows_path = self.file('keys'), self.file('embeddings')
        for path in (keys_path, rows_path):
            open(path, 'ab').close()
        with open(keys_path, 'rb') as file:
            text = file.read()
        whole = text[:text.rfind(b'\n') + 1]  # a line cut short by a kill is dropped
        self.keys, self.row_of, self.unreadable = [], {}, set()
        for line in whole.splitlines():
            path, size, mtime, *unreadable = json.loads(line)
            if unreadable:
                self.unreadable.add((path, size, mtime))
            else:
                self.row_of[path, size, mtime] = len(self.keys)  # a later row of the same key wins
                self.keys.append((path, size, mtime))
        row_bytes = self.dim * np.dtype(DTYPE).itemsize
        # never written so: the keys follow their rows
        if os.path.getsize(rows_path) < len(self.keys) * row_bytes:
            raise UserError(f'gallery store {self.path} has fewer embeddings than keys; delete the '
                            f'folder and run again to embed the gallery anew')
        for path, size in ((keys_path, len(whole)), (rows_path, len(self.keys) * row_bytes)):
            if os.path.getsize(path) > size:
                os.truncate(path, size)
        # copy-on-write ('c') maps the file like 'r' but gives torch the writable array it wants;
        # nothing writes it
        self.rows = (np.memmap(rows_path, dtype=DTYPE, mode='c', shape=(len(self.keys), self.dim))
                     if self.keys else np.zeros((0, self.dim), DTYPE))
        # every image's latest row is live until an update lists the folder and finds some removed
        self.live = np.zeros(len(self.keys), dtype=bool)
        self.live[list(self.row_of.values())] = True
        self.current = {key[0]: row for key, row in self.row_of.items()}

    def read(self, start, stop):
        """Rows start:stop of the memory-mapped embeddings, as stored: a (stop - start, D) tensor on the map."""
        return torch.from_numpy(np.asarray(self.rows[start:stop]))

    def block(self, start, stop):
        """Rows start:stop of the memory-mapped embeddings as a float32 tensor (stop - start, D)."""
        return self.read(start, stop).float()

    def append(self, keys, features, unreadable):
        """Add a chunk: its embeddings (N, D), synced, then their keys and the unreadable files' keys, synced."""
        with open(self.file('embeddings'), 'ab') as file:
            file.write(np.ascontiguousarray(features, dtype=DTYPE).tobytes())
            file.flush()
            os.fsync(file.fileno())
        lines = [json.dumps(list(key)) for key in keys] + [
            json.dumps([*key, 'unreadable']) for key in unreadable
        ]
        with open(self.file('keys'), 'a') as file:
            file.write(''.join(f'{line}\n' for line in lines))
            file.flush()
            os.fsync(file.fileno())

    def update(self, folder, paths, model):
        """Embed what is new or changed below folder, note what was removed, and compact when it is
        time; prints what it did in a line, and a line each for unreadable images and images that
        changed while embedded."""
        keys = []
        for path in paths:
            with contextlib.suppress(FileNotFoundError):  # removed since the folder was listed
                status = os.stat(path)
                keys.append((path, status.st_size, status.st_mtime_ns))
        todo = [key for key in keys if key not in self.row_of and key not in self.unreadable]
        changed = []
        if todo:
            with tqdm(total=len(todo), desc=f'embedding {folder}', unit='img',
                      dynamic_ncols=True) as bar:
                for start in range(0, len(todo), CHUNK):
                    chunk = todo[start:start + CHUNK]
                    features, unreadable = embed_files(model, [path for path, _, _ in chunk])
                    unreadable = set(unreadable)
                    # a file whose size or time now differ from its key's was written while read
                    same = {key: unchanged(key) for key in chunk}
                    changed += [key[0] for key in chunk if not same[key]]
                    readable = [key for key in chunk if key[0] not in unreadable]
                    kept = torch.tensor([same[key] for key in readable], dtype=torch.bool)  # (R,)
                    self.append([key for key in readable if same[key]], features[kept].numpy(),
                                [key for key in chunk if key[0] in unreadable and same[key]])
                    bar.update(len(chunk))
            self.load()
        current = [key for key in keys if key in self.row_of]
        self.live[:] = False
        self.live[[self.row_of[key] for key in current]] = True
        self.current = {key[0]: self.row_of[key] for key in current}
        unreadable = [key[0] for key in keys if key in self.unreadable]
        embedded = sum(key in self.row_of for key in todo)
        print(f'gallery {folder}: {len(current)} images, {embedded} embedded now, '
              f'{len(current) - embedded} from {self.path}/')
        if unreadable:
            print(f'gallery {folder}: {unreadable_line(unreadable)}')
        if changed:
            print(f'gallery {folder}: {len(changed)} image{"s" * (len(changed) > 1)} changed while '
                  f'being embedded and {"were" if len(changed) > 1 else "was"} left out (such as '
                  f'{changed[0]}); run again to embed {"them" if len(changed) > 1 else "it"}')
        dead = len(self.keys) - len(current)
        if dead and dead >= COMPACT_FRACTION * len(self.keys):
            self.compact(current, [key for key in keys if key in self.unreadable])

    def compact(self, current, unreadable):
        """Write the live rows (the keys `current`, in order) and the unreadable keys into a new
        generation, streamed a block at a time; the new meta.json is the moment it takes over, and
        the old files go after."""
        generation = uuid.uuid4().hex[:12]
        rows = np.array([self.row_of[key] for key in current], dtype=np.int64)
        with atomic_path(self.file('embeddings', generation)) as tmp, open(tmp, 'wb') as file:
            for start in range(0, len(rows), READ_ROWS):
                file.write(np.ascontiguousarray(self.rows[rows[start:start + READ_ROWS]]).tobytes())
        with atomic_path(self.file('keys', generation)) as tmp, open(tmp, 'w') as file:
            file.writelines(f'{json.dumps(list(key))}\n' for key in current)
            file.writelines(f'{json.dumps([*key, "unreadable"])}\n' for key in unreadable)
        meta = {
            'version': VERSION,
            'model': self.model,
            'dim': self.dim,
            'dtype': np.dtype(DTYPE).name,
            'generation': generation,
        }
        self.write_json('meta.json', meta)
        del self.rows  # unmapped before its file is removed
        self.generation = generation
        self.remove_others()
        self.load()

    def row(self, path):
        """The live row of an image path listed by the last update, or None."""
        return self.current.get(path)

    def search(self, query, k, exclude=None, index='exact'):
        """[(path, cosine)] of the k live rows nearest to query (D,), best first, leaving out row
        `exclude`; equal cosines in row order (neighbours.top_k).

        The exact scan (`index` 'exact') reads the memory map READ_ROWS rows at a time and
        multiplies them in float16 (its half products are accurate to about 1e-4 on unit rows, and
        converting the rows to float32 costs more than the product itself), keeping the
        candidates(k) best for a float32 re-rank, so only near-ties among more than that many could
        differ from a float32 scan. A faiss index gives candidates(k) approximate ones instead,
        re-ranked the same way.
        """
        query = F.normalize(query.float(), dim=0)[None]  # (1, D)
        # an index's approximate candidates (1, candidates(k)), or None: the exact scan finds its
        # own
        among = None if index == 'exact' else index_search(index, query.numpy(), candidates(k))
        similarities, rows = top_k(query, self.read(0, len(self.keys)), k,  # (1, k), (1, k)
                                   leave_out=-1 if exclude is None else exclude, live=self.live,
                                   among=among, block_rows=READ_ROWS, rerank=candidates(k))
        return [(self.keys[row][0], value)
                for row, value in zip(rows[0].tolist(), similarities[0].tolist())]


def unchanged(key):
    """Whether the file of key (path, size, mtime_ns) still has that size and modification time."""
    try:
        status = os.stat(key[0])
    except FileNotFoundError:
        return False
    return (status.st_size, status.st_mtime_ns) == tuple(key[1:])


# --------------------------------------------------------------------------------------------------
# faiss indexes over the store's rows; row r is the index's id r, and dead rows are filtered out after a search

def default_index(count):
    """The --index used when none is given: exact below EXACT_BELOW images, else ivfpq."""
    return 'exact' if count < EXACT_BELOW else 'ivfpq'


def ivfpq_shape(count, dim):
    """(inverted lists, sub-vectors) of the IVF-PQ index for count vectors: about sqrt(count) lists
    with at least 39 training vectors each (faiss's minimum), and sub-vectors of 8 dimensions."""
    lists = max(1, min(int(np.sqrt(count)), count // 39))
    parts = max(part for part in range(1, dim + 1) if dim % part == 0 and part <= max(1, dim // 8))
    return lists, parts


def new_index(kind, dim, count):
    """An empty faiss index of this kind for count vectors of dim dimensions (L2, which on unit
    vectors ranks as the cosine does)."""
    import faiss
    if kind == 'hnsw':
        index = faiss.IndexHNSWFlat(dim, HNSW_M)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index
    lists, parts = ivfpq_shape(count, dim)
    return faiss.IndexIVFPQFastScan(faiss.IndexFlatL2(dim), dim, lists, parts, IVFPQ_BITS)


def build_index(kind, vectors, count, dim, start=0, index=None):
    """Train (ivfpq) and fill a new index from vectors(start, stop) -> (stop - start, D) float32, or
    extend `index` with rows start:count."""
    if index is None:
        index = new_index(kind, dim, count)
        # trained on rows spread evenly over the store, 64 per list (k-means needs 39)
        if kind == 'ivfpq':
            lists, _ = ivfpq_shape(count, dim)
            index.train(
                sampled_rows(
                    vectors,
                    np.linspace(0, count - 1, min(count, max(64 * lists, 10_000))).astype(np.int64),
                )
            )
    for begin in range(start, count, READ_ROWS):
        rows = vectors(begin, min(begin + READ_ROWS, count))
        index.add(np.ascontiguousarray(rows, dtype=np.float32))
    return index


def sampled_rows(vectors, sample):
    """The rows `sample` (sorted), read block by block so a memory map is read once in order: (len, D) float32."""
    parts = []
    for begin in range(0, int(sample[-1]) + 1, READ_ROWS):
        inside = sample[(sample >= begin) & (sample < begin + READ_ROWS)]
        if len(inside):
            parts.append(vectors(begin, begin + READ_ROWS)[inside - begin])
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def index_search(index, queries, k):
    """(Q, k) ids of the approximate nearest rows of float32 queries (Q, D); -1 where fewer were found."""
    import faiss
    if isinstance(index, MilvusIndex):
        return index.search(queries, k)
    if isinstance(index, faiss.IndexHNSW):
        # the calibrated depth (open_index), deeper where more candidates are asked for
        index.hnsw.efSearch = max(index.hnsw.efSearch, k)
    else:
        index.nprobe = min(max(IVFPQ_NPROBE, index.nlist // IVFPQ_PROBED_SHARE), index.nlist)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]


def calibration_sample(store):
    """(queries (S, D) float32, their exact HNSW_K nearest other live rows (S, K')): HNSW_SAMPLE live
    rows spread evenly over the store, each leaving itself out."""
    live = np.flatnonzero(store.live)
    rows = live[np.linspace(0, len(live) - 1, min(HNSW_SAMPLE, len(live))).astype(np.int64)]
    queries = sampled_rows(lambda a, b: store.block(a, b).numpy(), rows)  # (S, D)
    _, truth = top_k(torch.from_numpy(queries), store.read(0, len(store.keys)), HNSW_K,  # (S, K')
                     leave_out=torch.from_numpy(rows), live=store.live, block_rows=READ_ROWS)
    return queries, truth.numpy()


def calibrated_depth(search, queries, truth, target=HNSW_RECALL, start=None, most=HNSW_EF_MAX):
    """(depth, recall@K reached): the smallest search depth, doubled from `start` (candidates(K)),
    at which search(queries, depth) -> (Q, candidates(K)) ids holds `target` of truth (Q, K) exact
    nearest ids, the re-rank keeping those it holds; `most` when none up to it does."""
    depth = start or candidates(truth.shape[1])
    while True:
        found = search(queries, depth)
        recall = np.mean([len(set(want) & set(got)) / len(want) for want, got in zip(truth, found)])
        if recall >= target or depth >= most:
            return depth, float(recall)
        depth = min(2 * depth, most)


def hnsw_search(index):
    """search(queries, depth) of a faiss HNSW index at that depth, for calibrated_depth."""
    def search(queries, depth):
        index.hnsw.efSearch = depth
        return index.search(queries, candidates(HNSW_K))[1]
    return search


def calibrate(store, search, name):
    """The search depth of an HNSW index (faiss's or Milvus's) calibrated on the store (calibrated_depth),
    printed in a line; None when the store is too small to sample."""
    if store.live.sum() <= HNSW_K:
        return None
    queries, truth = calibration_sample(store)
    depth, recall = calibrated_depth(search, queries, truth)
    short = '' if recall >= HNSW_RECALL else f', below the {HNSW_RECALL} sought: prefer --index ivfpq'
    print(f'index {name}: search depth {depth} finds {recall:.3f} of the exact {HNSW_K} nearest of '
          f'{len(queries)} sampled images{short}')
    return depth


def open_index(store, kind, milvus_uri=None):
    """The store's index of this kind: read from disk if built from the same model, store generation
    and rows; extended if the store has grown since; built anew otherwise (hnsw: its search depth
    calibrated whenever it changes). milvus: the collection at milvus_uri brought in step with the
    store (MilvusIndex). Prints what it did."""
    import faiss
    if kind == 'milvus':
        return MilvusIndex.open(store, milvus_uri or f'{store.path}.milvus.db')
    if kind == 'ivfpq' and store.live.sum() < IVFPQ_MIN:
        raise UserError(f'--index ivfpq learns its codes from the gallery and needs at least '
                        f'{IVFPQ_MIN} images for that, but this one holds {store.live.sum()}; use '
                        f'--index exact (or hnsw)')
    path = os.path.join(store.path, f'index-{kind}.faiss')
    made = {
        'version': VERSION,
        'model': store.model,
        'generation': store.generation,
        'dim': store.dim,
    }
    meta, index = store.read_json(f'index-{kind}.json'), None
    if meta is not None and os.path.isfile(path):
        try:
            index = faiss.read_index(path)
        except RuntimeError:
            index = None
        valid = (index is not None and {key: meta.get(key) for key in made} == made and
                 index.ntotal == meta.get('rows') <= len(store.keys) and index.d == store.dim)
        if not valid:
            print(f'{path} was built from another model or an older store, so it is built anew')
            index = None
        elif kind == 'ivfpq' and len(store.keys) > 2 * meta['trained_on']:
            print(f'{path} was trained on {meta["trained_on"]} images and the store has grown to '
                  f'{len(store.keys)}, so it is trained anew')
            index = None
    before = 0 if index is None else index.ntotal
    if index is not None and before == len(store.keys):
        if kind == 'hnsw' and 'depth' in meta:
            index.hnsw.efSearch = meta['depth']
        if kind != 'hnsw' or 'depth' in meta:  # an older version's hnsw is calibrated below
            return index
    else:
        begin = time.perf_counter()
        index = build_index(
            kind, lambda a, b: store.block(a, b).numpy(), len(store.keys), store.dim, before, index
        )
        done = (
            f'extended by {index.ntotal - before} images'
            if before
            else f'built over {index.ntotal} images'
        )
        print(f'index {kind}: {done} in {time.perf_counter() - begin:.1f} s, saved as {path}')
    calibrated = {}
    if kind == 'hnsw':
        calibrated['depth'] = calibrate(store, hnsw_search(index), kind) or candidates(HNSW_K)
        index.hnsw.efSearch = calibrated['depth']
    with atomic_path(path) as tmp:
        faiss.write_index(index, tmp)
    trained_on = meta['trained_on'] if before else len(store.keys)
    store.write_json(f'index-{kind}.json',
                     {**made, 'rows': index.ntotal, 'trained_on': trained_on, **calibrated})
    return index


# --------------------------------------------------------------------------------------------------
# Milvus: a collection kept in step with the store, for galleries that outgrow one machine

class MilvusIndex:
    """A Milvus collection (an embedded Milvus Lite file, or a server) holding the store's live rows:
    each image's embedding, path, size and modification time, its id a hash of those three, and the
    model's digest in the collection's properties. The store stays the source of the vectors: each
    open lists the collection's ids and inserts the live rows it lacks and deletes the ids the store
    no longer holds, MILVUS_CHUNK at a time, so an interrupted update loses at most one request and
    the next open finishes it. Searches give row numbers for the store's exact re-rank."""

    def __init__(self, client, name, store, uri):
        self.client, self.name, self.store, self.uri = client, name, store, uri
        self.ids, self.rows, self.depth = np.zeros(0, np.int64), np.zeros(0, np.int64), None

    @classmethod
    def open(cls, store, uri):
        """The collection for this store at uri, created or rebuilt as needed and brought in step."""
        from pymilvus import MilvusClient, MilvusException
        # its id listing warns on every call that Milvus Lite keeps no server-side timestamp
        logging.getLogger('pymilvus').setLevel(logging.ERROR)
        local = '://' not in uri
        if local:  # Milvus Lite wants the file's folder to exist
            os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        try:
            client = MilvusClient(uri, timeout=MILVUS_TIMEOUT)
        except MilvusException:
            raise UserError(f'cannot reach Milvus at --milvus_uri {uri}; start the server, or give '
                            f'a file path (such as results/gallery.db) for an embedded Milvus Lite')
        name = 'pp_' + ''.join(c if c.isalnum() else '_' for c in os.path.basename(store.path))
        self = cls(client, name[:255], store, uri)
        self.prepare()
        self.sync()
        return self

    def marker(self):
        """The collection property naming the model and dimension its embeddings come from."""
        digest = hashlib.sha1(json.dumps(self.store.model).encode()).hexdigest()[:16]
        return json.dumps({'version': VERSION, 'model': digest, 'dim': self.store.dim})

    def prepare(self):
        """Create the collection, rebuild it for another model, or refuse one that is not PP's."""
        client, name = self.client, self.name
        if client.has_collection(name):
            described = client.describe_collection(name)
            fields = {field['name']: field for field in described['fields']}
            made = json.loads(described.get('properties', {}).get(MILVUS_PROPERTY, 'null') or 'null')
            if set(fields) != set(MILVUS_FIELDS) or not isinstance(made, dict):
                raise UserError(f'Milvus collection {name} at {self.uri} was not made by test.py '
                                f'--gallery (its fields are {", ".join(fields)}); drop it, or give '
                                f'another --milvus_uri')
            mine = json.loads(self.marker())
            if made.get('model') != mine['model'] or made.get('version') != VERSION:
                print(f'Milvus collection {name} at {self.uri} holds another model\'s embeddings, '
                      f'so it is rebuilt')
                client.drop_collection(name)
            elif int(fields['embedding']['params']['dim']) != self.store.dim:
                raise UserError(f'Milvus collection {name} at {self.uri} holds '
                                f'{fields["embedding"]["params"]["dim"]}-d embeddings but the model '
                                f'embeds in {self.store.dim}; drop the collection, or give another '
                                f'--milvus_uri')
        if not client.has_collection(name):
            from pymilvus import DataType
            schema = client.create_schema(auto_id=False)
            for field, kind in MILVUS_FIELDS.items():
                extra = {'is_primary': True} if field == 'id' else {
                    'embedding': {'dim': self.store.dim}, 'path': {'max_length': 65535}}.get(field, {})
                schema.add_field(field, getattr(DataType, kind), **extra)
            params = client.prepare_index_params()
            params.add_index(field_name='embedding', index_type='HNSW', metric_type='COSINE',
                             params={'M': HNSW_M, 'efConstruction': MILVUS_EF_CONSTRUCTION})
            client.create_collection(name, schema=schema, index_params=params)
            client.alter_collection_properties(name, properties={MILVUS_PROPERTY: self.marker()})
        client.load_collection(name)

    def held(self):
        """The ids the collection holds, (H,) int64."""
        iterator = self.client.query_iterator(self.name, batch_size=MILVUS_LIST,
                                              output_fields=['id'])
        ids = []
        while batch := iterator.next():
            ids += [row['id'] for row in batch]
        iterator.close()
        return np.array(ids, dtype=np.int64)

    def sync(self):
        """Insert the live rows the collection lacks, delete the ids the store no longer holds,
        MILVUS_CHUNK at a time; calibrate the search depth when anything changed. Prints a line."""
        store = self.store
        live = np.flatnonzero(store.live)
        ids = np.array([key_id(store.keys[row]) for row in live], dtype=np.int64)  # (L,)
        order = np.argsort(ids)
        self.ids, self.rows = ids[order], live[order]
        held = self.held()
        gone = held[~np.isin(held, ids)]
        new = live[~np.isin(ids, held)]
        for start in range(0, len(gone), MILVUS_CHUNK):
            self.client.delete(self.name, ids=gone[start:start + MILVUS_CHUNK].tolist())
        with tqdm(total=len(new), desc=f'Milvus {self.name}', unit='img', dynamic_ncols=True,
                  disable=not len(new)) as bar:
            for start in range(0, len(new), MILVUS_CHUNK):
                self.insert(new[start:start + MILVUS_CHUNK])
                bar.update(len(new[start:start + MILVUS_CHUNK]))
        if len(gone) or len(new):
            self.client.flush(self.name)
        print(f'Milvus collection {self.name} at {self.uri}: {len(live)} images, {len(new)} added, '
              f'{len(gone)} removed')
        marker = os.path.join(store.path, 'index-milvus.json')
        made = {'uri': self.uri, 'name': self.name, 'generation': store.generation,
                'live': int(len(live)), 'ids': hashlib.sha1(self.ids.tobytes()).hexdigest()}
        calibrated = store.read_json(os.path.basename(marker)) or {}
        if {key: calibrated.get(key) for key in made} == made and 'depth' in calibrated:
            self.depth = calibrated['depth']
        else:
            self.depth = calibrate(store, self.depth_search, 'milvus') or candidates(HNSW_K)
            store.write_json(os.path.basename(marker), {**made, 'depth': self.depth})

    def insert(self, rows):
        """Insert the store's rows (R,) (sorted) with their keys."""
        vectors = sampled_rows(lambda a, b: self.store.block(a, b).numpy(), rows)  # (R, D)
        keys = [self.store.keys[row] for row in rows]
        self.client.insert(self.name, [
            {'id': key_id(key), 'embedding': vector, 'path': key[0], 'size': key[1],
             'mtime': key[2]} for key, vector in zip(keys, vectors)])

    def depth_search(self, queries, depth):
        """(Q, candidates(HNSW_K)) store rows found at this search depth, for calibrated_depth."""
        return self.found(queries, candidates(HNSW_K), depth)

    def search(self, queries, k):
        """(Q, k) store rows of the approximate nearest neighbours of queries (Q, D); -1 for none."""
        return self.found(queries, k, max(self.depth or k, k))

    def found(self, queries, k, depth):
        """(Q, k) store rows of Milvus's k nearest at search depth `depth`, -1 where fewer."""
        k = min(k, MILVUS_TOP_K)
        hits = self.client.search(self.name, data=[np.asarray(query, np.float32) for query in queries],
                                  limit=k, search_params={'params': {'ef': min(depth, MILVUS_EF_MAX)}},
                                  output_fields=['id'])
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        for q, found in enumerate(hits):
            ids = np.array([hit['id'] for hit in found], dtype=np.int64)
            at = np.searchsorted(self.ids, ids).clip(max=max(len(self.ids) - 1, 0))
            known = self.ids[at] == ids if len(self.ids) else np.zeros(len(ids), bool)
            rows[q, :len(ids)] = np.where(known, self.rows[at] if len(self.rows) else -1, -1)
        return rows


def key_id(key):
    """A Milvus id of an image's key (path, size, mtime_ns): 63 bits of its BLAKE2 hash."""
    digest = hashlib.blake2b(json.dumps(list(key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') >> 1
