"""Plumbing for test.py --gallery: a folder's embeddings kept on disk, appended as the folder
changes and searched memory-mapped, exactly, through a faiss index saved beside them, or through a
Milvus collection kept in step with them. Imports nothing from the research files but utils.py's
embed_files (images read, transformed and embedded as test.py and train.py do) and neighbours.py's
exact search.

A store is one folder, results/<model>_gallery_<folder hash>/, for one model file and one photo
folder:
  meta.json                    {version, model, dim, dtype, generation}: written whole; names the files below
  embeddings-<generation>.f2   row r: the embedding of image r, (D,) float16
  keys-<generation>.bin        record r: image r's key, KEY (where its path ends in the paths file,
                               size, mtime_ns, key_id), 32 bytes
  paths-<generation>.txt       the images' paths, one a line, in row order
  unreadable-<generation>.jsonl  one line per file PIL could not read: [path, size, mtime_ns]
  index-<kind>.faiss / .json   an index over the rows and what it was built from (hnsw, ivfpq)
The keys are memory-mapped as the rows are: at 10,000,000 images the process holds 17 bytes an image
for them (a sorted copy of the key ids to find an image by its key, and its order) and reads the
rest, about 80 bytes, through the page cache. New and changed images are appended a chunk at a
time, the rows first, then their paths, then their key records, each synced, so a run killed while
embedding loses at most the chunk it was on: rows and paths without a key record are cut off when
the store is next opened. The row of a removed or changed image stays until a compaction writes the
live rows into a new generation. A store of version 1 (keys as JSON lines) is converted on open.
--index milvus keeps a Milvus collection in step with the store instead (the store stays the source
of the vectors; see MilvusIndex).
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
from rerank import reranked_lists
from runtime import RunLock, UserError, atomic_path, remove_temporaries
from utils import embed_files, unreadable_line

VERSION = 2  # of the store's layout; a store of another version is written anew (1: converted)
INDEX_VERSION = 1  # of the faiss indexes' files: a converted store keeps them
# a key record: where the image's path ends in the paths file, its size, mtime_ns and key_id
KEY = np.dtype([('end', '<i8'), ('size', '<i8'), ('mtime', '<i8'), ('id', '<i8')])
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
        same = {key: value for key, value in expected.items() if key != 'version'}
        if (meta is not None and meta.get('version') == 1 and
                {key: meta.get(key) for key in same} == same):
            self.generation = meta['generation']
            self.convert()
            meta = {**meta, 'version': VERSION}
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
        """The path of this generation's embeddings, keys, paths or unreadable file."""
        extension = {'keys': 'bin', 'embeddings': np.dtype(DTYPE).str[1:],  # f2: float16
                     'paths': 'txt', 'unreadable': 'jsonl'}[kind]
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
        kinds = ('keys', 'embeddings', 'paths', 'unreadable')
        mine = {os.path.basename(self.file(kind)) for kind in kinds}
        for name in os.listdir(self.path):
            if name.startswith(tuple(f'{kind}-' for kind in kinds)) and name not in mine:
                os.remove(os.path.join(self.path, name))

    def convert(self):
        """Rewrite a version 1 store's keys (JSON lines, keys-<generation>.jsonl) as this version's
        files, keeping its rows; meta.json, written last, marks it done."""
        with open(os.path.join(self.path, f'keys-{self.generation}.jsonl'), 'rb') as file:
            text = file.read()
        keys, unreadable = [], []
        for line in text[:text.rfind(b'\n') + 1].splitlines():  # a line cut short is dropped
            path, size, mtime, *bad = json.loads(line)
            (unreadable if bad else keys).append((path, size, mtime))
        with atomic_path(self.file('unreadable')) as tmp, open(tmp, 'w') as file:
            file.writelines(f'{json.dumps(list(key))}\n' for key in unreadable)
        self.write_keys(keys, self.generation)
        self.write_json('meta.json', {'version': VERSION, 'model': self.model, 'dim': self.dim,
                                      'dtype': np.dtype(DTYPE).name, 'generation': self.generation})
        print(f'gallery store {self.path}: keys of {len(keys)} images converted to the version '
              f'{VERSION} layout')

    def write_keys(self, keys, generation):
        """Write the paths and key records of keys [(path, size, mtime_ns)], in row order, whole."""
        with (atomic_path(self.file('paths', generation)) as paths_tmp,
              atomic_path(self.file('keys', generation)) as keys_tmp):
            with open(paths_tmp, 'wb') as paths, open(keys_tmp, 'wb') as records:
                written = 0
                for start in range(0, len(keys), READ_ROWS):
                    block = keys[start:start + READ_ROWS]
                    encoded = [os.fsencode(path) + b'\n' for path, _, _ in block]
                    paths.write(b''.join(encoded))
                    records.write(key_records(block, encoded, written).tobytes())
                    written += sum(map(len, encoded))

    def load(self):
        """Map the keys and embeddings, cut off what an interrupted append left without key records,
        and sort the key ids for finding an image by its key."""
        row_bytes = self.dim * np.dtype(DTYPE).itemsize
        files = {kind: self.file(kind) for kind in ('keys', 'paths', 'embeddings', 'unreadable')}
        for path in files.values():
            open(path, 'ab').close()
        count = os.path.getsize(files['keys']) // KEY.itemsize  # a record cut short is dropped
        records = (np.memmap(files['keys'], dtype=KEY, mode='r', shape=(count,)) if count
                   else np.zeros(0, KEY))
        ends = {'keys': count * KEY.itemsize, 'paths': int(records['end'][-1]) if count else 0,
                'embeddings': count * row_bytes}
        # never written so: the paths and rows come before their key records
        if any(os.path.getsize(files[kind]) < size for kind, size in ends.items()):
            raise UserError(f'gallery store {self.path} has fewer embeddings or paths than keys; '
                            f'delete the folder and run again to embed the gallery anew')
        for kind, size in ends.items():
            if os.path.getsize(files[kind]) > size:
                os.truncate(files[kind], size)
        with open(files['unreadable'], 'rb') as file:
            text = file.read()
        whole = text[:text.rfind(b'\n') + 1]  # a line cut short by a kill is dropped
        if len(text) > len(whole):
            os.truncate(files['unreadable'], len(whole))
        self.unreadable = {tuple(json.loads(line)) for line in whole.splitlines()}
        paths = (np.memmap(files['paths'], dtype=np.uint8, mode='r') if ends['paths']
                 else np.zeros(0, np.uint8))
        self.keys = Keys(records, paths)
        # copy-on-write ('c') maps the file like 'r' but gives torch the writable array it wants;
        # nothing writes it
        self.rows = (np.memmap(files['embeddings'], dtype=DTYPE, mode='c', shape=(count, self.dim))
                     if count else np.zeros((0, self.dim), DTYPE))
        ids = np.asarray(records['id'])
        self.order = np.argsort(ids, kind='stable')  # (N,): equal ids keep row order
        self.sorted_ids = ids[self.order]  # (N,)
        # every image's latest row is live until an update lists the folder and finds some removed
        self.live = np.zeros(count, dtype=bool)
        self.live[self.order[np.r_[self.sorted_ids[1:] != self.sorted_ids[:-1], True]]
                  if count else []] = True

    def find(self, ids):
        """The latest row of each key id (K,) int64, or -1 for one the store does not hold: (K,) int64."""
        ids = np.asarray(ids, dtype=np.int64)
        at = np.searchsorted(self.sorted_ids, ids, side='right') - 1  # the last of equal ids
        held = (at >= 0) & (self.sorted_ids[at.clip(min=0)] == ids) if len(self.sorted_ids) else (
            np.zeros(len(ids), bool))
        return np.where(held, self.order[at.clip(min=0)] if len(self.order) else -1, -1)

    def read(self, start, stop):
        """Rows start:stop of the memory-mapped embeddings, as stored: a (stop - start, D) tensor on the map."""
        return torch.from_numpy(np.asarray(self.rows[start:stop]))

    def block(self, start, stop):
        """Rows start:stop of the memory-mapped embeddings as a float32 tensor (stop - start, D)."""
        return self.read(start, stop).float()

    def append(self, keys, features, unreadable):
        """Add a chunk: its embeddings (N, D), then their paths, then their key records, then the
        unreadable files' keys, each synced."""
        encoded = [os.fsencode(path) + b'\n' for path, _, _ in keys]
        written = os.path.getsize(self.file('paths'))
        parts = [('embeddings', np.ascontiguousarray(features, dtype=DTYPE).tobytes()),
                 ('paths', b''.join(encoded)),
                 ('keys', key_records(keys, encoded, written).tobytes()),
                 ('unreadable', ''.join(f'{json.dumps(list(key))}\n' for key in unreadable).encode())]
        for kind, data in parts:
            with open(self.file(kind), 'ab') as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())

    def update(self, folder, paths, model, image_size=None):
        """Embed what is new or changed below folder, cropped to image_size (the run's; default
        utils.IMAGE_SIZE), note what was removed, and compact when it is time; prints what it did
        in a line, and a line each for unreadable images and images that changed while embedded."""
        keys = []
        for path in paths:
            with contextlib.suppress(FileNotFoundError):  # removed since the folder was listed
                status = os.stat(path)
                keys.append((path, status.st_size, status.st_mtime_ns))
        rows = self.find([key_id(key) for key in keys])  # (K,)
        todo = [key for key, row in zip(keys, rows) if row < 0 and key not in self.unreadable]
        changed = []
        if todo:
            with tqdm(total=len(todo), desc=f'embedding {folder}', unit='img',
                      dynamic_ncols=True) as bar:
                for start in range(0, len(todo), CHUNK):
                    chunk = todo[start:start + CHUNK]
                    features, unreadable = embed_files(model, [path for path, _, _ in chunk],
                                                         image_size)
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
            rows = self.find([key_id(key) for key in keys])
        current = rows[rows >= 0]
        self.live[:] = False
        self.live[current] = True
        unreadable = [key[0] for key in keys if key in self.unreadable]
        embedded = int((self.find([key_id(key) for key in todo]) >= 0).sum())
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
        """Write the live rows (`current`, in order) and the unreadable keys into a new generation,
        streamed a block at a time; the new meta.json is the moment it takes over, and the old
        files go after."""
        generation = uuid.uuid4().hex[:12]
        with atomic_path(self.file('embeddings', generation)) as tmp, open(tmp, 'wb') as file:
            for start in range(0, len(current), READ_ROWS):
                file.write(np.ascontiguousarray(self.rows[current[start:start + READ_ROWS]]).tobytes())
        self.write_keys([self.keys[row] for row in current], generation)
        with atomic_path(self.file('unreadable', generation)) as tmp, open(tmp, 'w') as file:
            file.writelines(f'{json.dumps(list(key))}\n' for key in unreadable)
        meta = {
            'version': VERSION,
            'model': self.model,
            'dim': self.dim,
            'dtype': np.dtype(DTYPE).name,
            'generation': generation,
        }
        self.write_json('meta.json', meta)
        del self.rows, self.keys  # unmapped before their files are removed
        self.generation = generation
        self.remove_others()
        self.load()

    def row(self, path):
        """The live row of the image at path as it is now on disk, or None."""
        try:
            status = os.stat(path)
        except OSError:
            return None
        row = int(self.find([key_id((path, status.st_size, status.st_mtime_ns))])[0])
        return row if row >= 0 and self.live[row] else None

    def search(self, query, k, exclude=None, index='exact', rerank=None):
        """[(path, cosine)] of the k live rows nearest to query (D,), best first, leaving out row
        `exclude`; equal cosines in row order (neighbours.top_k).

        The exact scan (`index` 'exact') reads the memory map READ_ROWS rows at a time and
        multiplies them in float16 (its half products are accurate to about 1e-4 on unit rows, and
        converting the rows to float32 costs more than the product itself), keeping the
        candidates(k) best for a float32 re-rank, so only near-ties among more than that many could
        differ from a float32 scan. A faiss index gives candidates(k) approximate ones instead,
        re-ranked the same way. rerank, (method, parameters) of rerank.reranked_lists, re-orders
        the SHORTLIST(k) nearest by that method, the shortlist being its items (dba and
        kreciprocal see one another's neighbours only among them); each result keeps its cosine.
        """
        query = F.normalize(query.float(), dim=0)[None]  # (1, D)
        wanted = k if rerank is None else shortlist(k)
        # an index's approximate candidates (1, candidates(k)), or None: the exact scan finds its
        # own
        among = None if index == 'exact' else index_search(index, query.numpy(), candidates(wanted))
        similarities, rows = top_k(query, self.read(0, len(self.keys)), wanted,  # (1, w), (1, w)
                                   leave_out=-1 if exclude is None else exclude, live=self.live,
                                   among=among, block_rows=READ_ROWS, rerank=candidates(wanted))
        similarities, rows = similarities[0], rows[0]  # (w,), (w,)
        if rerank is not None and len(rows):
            method, params = rerank
            items = self.block_of(rows.numpy())  # (w, D) float32
            order = reranked_lists(method, query, items, min(k, len(rows)), **params)[0]
            similarities, rows = similarities[order], rows[order]  # plain cosines, re-ordered
        return [(self.keys[row][0], value)
                for row, value in zip(rows[:k].tolist(), similarities[:k].tolist())]

    def block_of(self, rows):
        """The embeddings of rows (w,) of the memory map, in that order, as float32 (w, D)."""
        return torch.from_numpy(np.asarray(self.rows[rows])).float()


def shortlist(k):
    """The nearest images a --rerank of a gallery search re-orders, for its k results."""
    return max(k, SHORTLIST)


SHORTLIST = 100


class Keys:
    """The store's keys as a read-only sequence over its memory-mapped files: keys[row] is image
    row's (path, size, mtime_ns)."""

    def __init__(self, records, paths):
        self.records, self.paths = records, paths  # (N,) KEY, the paths file's bytes

    def __len__(self):
        return len(self.records)

    def __getitem__(self, row):
        if not 0 <= row < len(self.records):
            raise IndexError(row)
        end, size, mtime, _ = self.records[row].tolist()
        start = int(self.records['end'][row - 1]) if row else 0
        return os.fsdecode(self.paths[start:end - 1].tobytes()), size, mtime  # without its newline


def key_records(keys, encoded, written):
    """The KEY records (N,) of keys [(path, size, mtime_ns)] whose encoded paths (with their
    newlines) follow `written` bytes of the paths file."""
    records = np.zeros(len(keys), KEY)
    records['end'] = written + np.cumsum([len(path) for path in encoded], dtype=np.int64)
    records['size'] = [size for _, size, _ in keys]
    records['mtime'] = [mtime for _, _, mtime in keys]
    records['id'] = [key_id(key) for key in keys]
    return records


def key_id(key):
    """A Milvus id of an image's key (path, size, mtime_ns): 63 bits of its BLAKE2 hash."""
    digest = hashlib.blake2b(json.dumps(list(key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') >> 1


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
        'version': INDEX_VERSION,
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
        ids = np.asarray(store.keys.records['id'][live])  # (L,)
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
