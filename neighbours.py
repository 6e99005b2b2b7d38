"""Exact nearest neighbours by cosine similarity, in blocks: no N x N matrix is ever held.

- top_k: each query's k most similar items, most similar first. One tie rule: of equal
  similarities, the lower item index comes first. One way to leave a query out of its own list:
  by its item index. test.py's search of a data base, the report's neighbour lists and the
  gallery's exact scan (a float16 memory map) use it.
- class_lists: what the retrieval metrics read of each query (utils.retrieval_metrics holds their
  definitions): its similarities to the items of its class, and its largest ones to the items of
  other classes, swept block by block on all cores.
Both multiply float32 blocks through cosine_block, which uses oneDNN on the CPU where it can.
"""
import bisect
import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional

import torch

from runtime import UserError

CHUNK_BYTES = 32 * 2 ** 20  # similarities held at once: a block a thread (class_lists), one (top_k)


# --------------------------------------------------------------------------------------------------
# top_k: the k nearest items of each query

def top_k(queries, items, k, leave_out=None, live=None, among=None, block_rows=4096,
          chunk_bytes=CHUNK_BYTES, rerank=200, progress=None):
    """(similarities (Q, k') float32, item indices (Q, k') int64): each query's k' most similar
    items by cosine, most similar first, equal similarities in item order; k' = min(k, the fewest
    items a query ranks).

    queries (Q, D) and items (M, D), rows of any scale. leave_out (Q,), or one for all: the item
    index each query leaves out of its own list (-1: none), such as its own when the items are the
    queries; live (M,) bool: the items that may be found (None: all). Items are read block_rows
    at a time, in order (a memory map is read once), each block against as many queries as keep
    its similarities within chunk_bytes. float16 items, unit rows as a gallery store's are, are
    multiplied as stored, which is faster than converting them: each query's best max(k, rerank)
    are kept and re-ranked by their float32 cosines, so only near-ties (equal float16 products
    among them) among more than that many could differ from a float32 scan. among (Q, c), when
    given, holds the only items each query may find (an approximate index's candidates, -1 for
    none): no block is read, they are re-ranked in the same way. progress, when given, is called
    as progress(blocks done, blocks in all).
    """
    device = items.device
    queries = unit_rows(torch.as_tensor(queries).to(device, torch.float32, copy=True))  # (Q, D)
    n, m = len(queries), len(items)
    leave_out = torch.as_tensor(-1 if leave_out is None else leave_out)
    leave_out = leave_out.to(device, torch.int64).expand(n)  # (Q,)
    live = torch.as_tensor(True if live is None else live).to(device, torch.bool).expand(m)  # (M,)
    leaves_live = bool(((leave_out >= 0) & live[leave_out.clamp(min=0)]).any()) if m else False
    k = max(0, min(k, int(torch.count_nonzero(live)) - leaves_live))
    if n == 0 or k == 0:
        return queries.new_zeros((n, 0)), leave_out.new_zeros((n, 0))
    if among is not None:
        among = torch.as_tensor(among).to(device, torch.int64)  # (Q, c)
        allowed = (among >= 0) & (among < m)
        allowed &= live[among.clamp(0, m - 1)] & (among != leave_out[:, None])
        return reranked(queries, items, torch.where(allowed, among, -1), k, chunk_bytes)
    half = items.dtype in (torch.float16, torch.bfloat16)
    kept = min(m, max(k, rerank)) if half else k  # per query while the blocks are read
    blocks = [(start, min(start + block_rows, m)) for start in range(0, m, block_rows)]
    chunks = chunk_bounds(n, max(1, chunk_bytes // (4 * min(block_rows, m))))  # of queries
    found = [(queries.new_zeros((b - a, 0)), leave_out.new_zeros((b - a, 0))) for a, b in chunks]
    dead = ~live if not live.all() else None  # (M,)
    # (item, query) of each query's item left out, in item order: a block hides those within it
    left = sorted((item, q) for q, item in enumerate(leave_out.tolist()) if item >= 0)
    for done, (start, stop) in enumerate(blocks):
        block, norms = prepared(items[start:stop], n)  # (B, D), (B,) or None
        inside = left[bisect.bisect_left(left, (start,)):bisect.bisect_left(left, (stop,))]
        for i, (a, b) in enumerate(chunks):
            sims = products(queries[a:b], block, norms)  # (b - a, B)
            if dead is not None:
                sims.masked_fill_(dead[start:stop], -math.inf)
            mine = [(q - a, item - start) for item, q in inside if a <= q < b]
            if mine:
                sims[tuple(torch.tensor(mine, device=device).T)] = -math.inf
            # float16 products tie often, and the float32 re-rank settles their ties
            values, columns = block_top(sims, min(kept, stop - start), ties=not half)
            values = torch.cat([found[i][0], values], 1)
            index = torch.cat([found[i][1], columns + start], 1)
            found[i] = ranked(values, index, kept, ties=not half)
            if progress is not None:
                progress(done * len(chunks) + i + 1, len(blocks) * len(chunks))
    values = torch.cat([values for values, _ in found])  # (Q, kept)
    index = torch.cat([index for _, index in found])
    if not half:
        return values, index
    return reranked(queries, items, torch.where(values > -math.inf, index, -1), k, chunk_bytes)


def prepared(block, n):
    """An item block (B, D) for its products with n queries, and the norms (B,) to divide them
    by, or None. float16 rows as stored (unit rows); float32 rows of any scale as a unit copy for
    many queries, or, for fewer queries than dimensions, as they are with their norms: n x B
    divisions then cost less than the copy."""
    if block.dtype in (torch.float16, torch.bfloat16):
        return block, None
    if n >= block.size(1):
        return unit_rows(block.to(torch.float32, copy=True)), None
    block = block.float()
    return block, block.norm(dim=1).clamp_min(1e-12)


def products(queries, block, norms):
    """(q, B) float32 cosines of unit queries (q, D) with a block (B, D) and norms from prepared:
    a float16 block multiplied as stored."""
    if block.dtype != torch.float32:
        return (queries.to(block.dtype) @ block.T).float()
    sims = cosine_block(queries, block)
    return sims if norms is None else sims.div_(norms)


def block_top(sims, k, ties):
    """Each row's k largest similarities of sims (q, B) and their columns, largest first; with
    ties, equal values at the k-th place go to the lower columns (without, as torch.topk picks)."""
    width = min(k + 1, sims.size(1)) if ties else k
    # (q, width); which of several equal values topk keeps is unspecified
    values, columns = sims.topk(width, dim=1)
    if width > k:
        # rows whose (k + 1)-th value equals their k-th have equal values on both sides of the
        # cut, rare but for duplicates: sorted whole (stable: equal values keep column order)
        cut = (values[:, k] == values[:, k - 1]) & (values[:, k] > -math.inf)
        if cut.any():
            tied = cut.nonzero()[:, 0]
            order = sims[tied].sort(dim=1, descending=True, stable=True)
            values[tied], columns[tied] = order.values[:, :width], order.indices[:, :width]
    return values[:, :k], columns[:, :k]


def ranked(values, index, k, ties=True):
    """The k largest of values (q, w), with their item index (q, w), largest first; with ties,
    equal values in index order (without, as torch.topk picks them)."""
    if not ties:
        top = values.topk(min(k, values.size(1)), dim=1)
        return top.values, index.gather(1, top.indices)
    by_index = index.argsort(dim=1)
    values, index = values.gather(1, by_index), index.gather(1, by_index)
    order = values.sort(dim=1, descending=True, stable=True).indices[:, :k]  # (q, k)
    return values.gather(1, order), index.gather(1, order)


def reranked(queries, items, index, k, chunk_bytes):
    """top_k's lists from candidates index (Q, c) (item indices, -1 for none): the k' = min(k, the
    fewest candidates a query has) best by their float32 products with the unit queries (Q, D),
    the items being unit rows, as float16 items and an approximate index's are."""
    k = min(k, int((index >= 0).sum(1).min()))
    width = max(1, index.size(1) * queries.size(1) * 4)  # bytes of a query's candidates in float32
    out = []
    for a, b in chunk_bounds(len(queries), max(1, chunk_bytes // width)):
        # sorted: a memory map is read in order
        rows, where = index[a:b].clamp(min=0).unique(return_inverse=True)
        cosines = (items[rows].float() @ queries[a:b].T).T.gather(1, where)  # (b - a, c)
        cosines.masked_fill_(index[a:b] < 0, -math.inf)
        out.append(ranked(cosines, index[a:b], k))
    return torch.cat([values for values, _ in out]), torch.cat([index for _, index in out])


# --------------------------------------------------------------------------------------------------
# class_lists: the block sweep behind the retrieval metrics

class ByClass(NamedTuple):
    """Queries and items as unit rows sorted by class key, so that each class is a run of rows."""
    queries: torch.Tensor  # (n, D)
    keys: torch.Tensor  # (n,) each query's class key
    items: torch.Tensor  # (M, D): the queries themselves without a gallery
    item_keys: torch.Tensor  # (M,)
    first: torch.Tensor  # (n,) the first item of each query's class
    r: torch.Tensor  # (n,) R: the items of its class the query ranks
    where: torch.Tensor  # (n,) the query's row among the caller's
    symmetric: bool  # the items are the queries, each leaving itself out by its position


class ClassLists(NamedTuple):
    """What the retrieval metrics read of each query, the queries sorted by class."""
    positives: torch.Tensor  # (n, m = max R) its R same-class similarities, descending, then -inf
    top: torch.Tensor  # (n, m) its largest other-class similarities, descending
    ahead_of_nearest: Optional[torch.Tensor]  # (n,) other-class items >= its nearest classmate
    r: torch.Tensor  # (n,) R
    where: torch.Tensor  # (n,) the query's row among the caller's


def class_lists(features, labels, ranks, gallery_features=None, gallery_labels=None,
                chunk_bytes=CHUNK_BYTES, progress=None, depth=0, count_all=False, screen=False):
    """The ClassLists of retrieval_metrics' queries (features (N, D), labels (N,)) against all the
    others, or against a gallery (gallery_features (G, D), gallery_labels (G,)).

    Queries whose class has no gallery item are left out. top is exact in the values the metrics
    read: a list's first R, its first max(ranks) when Recall@K comes from it, and its first depth
    (the precision@k and mAP@k metrics' largest k); ahead_of_nearest is None unless a K of ranks
    exceeds the lists or count_all (the reciprocal rank needs it), and then counts over all items.
    chunk_bytes bounds the similarity blocks held at once; progress, when given, is called as
    progress(blocks done, blocks in all) while the other classes are swept. screen: screen each
    block with bfloat16 products and re-score its candidates exactly (True), or compute every
    product in float32 (False, the default: the screen is exact but not yet faster).
    """
    data = sorted_by_class(features, labels, gallery_features, gallery_labels)
    with block_pool(data, chunk_bytes) as (side, pool):
        if screen:
            positives = same_class_exact(data)  # (n, m)
            sweep = Screen(data)
        else:
            positives = same_class_similarities(data, side, pool)  # (n, m)
            sweep = None
        top, ahead = other_class_top(data, positives, ranks, side, pool, progress, depth,
                                     count_all, sweep)  # (n, width), (n,)
    return ClassLists(positives, top, ahead, data.r, data.where)


def same_class_cosines(features, labels, chunk_bytes=CHUNK_BYTES):
    """(P,) the cosine of every pair of features (N, D) of the same label, each pair twice (once
    from each side), swept as class_lists sweeps them: only each class's own block is computed."""
    data = sorted_by_class(features, labels, None, None)
    with block_pool(data, chunk_bytes) as (side, pool):
        positives = same_class_similarities(data, side, pool)  # (N, m)
    return positives[positives > -math.inf]


@contextlib.contextmanager
def block_pool(data, chunk_bytes):
    """(side, pool): the side of the square float32 blocks and the threads that sweep them.

    On the CPU the blocks are spread over torch's threads, each running its ops single-threaded:
    ops that each split across threads stall at every barrier on a busy machine. chunk_bytes holds
    one block per thread.
    """
    workers = torch.get_num_threads() if data.queries.device.type == 'cpu' else 1
    side = max(1, math.isqrt(max(1, chunk_bytes // (4 * workers))))  # float32 blocks side x side
    with single_threaded_ops(), ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                                                   initargs=(1,)) as pool:
        yield side, pool


def sorted_by_class(features, labels, gallery_features, gallery_labels):
    """ByClass of the queries and items. Without a gallery the items are the queries; with one, a
    query whose class has no gallery item (R = 0) is left out."""
    features = torch.as_tensor(features).float()
    labels = torch.as_tensor(labels).to(features.device)
    if gallery_features is None:
        if len(labels) < 2:
            raise UserError(f'retrieval needs at least two items, got {len(labels)}')
        keys, where = labels.sort(stable=True)
        queries = unit_rows(features[where])  # (N, D) a copy
        _, inverse, counts = torch.unique_consecutive(keys, return_inverse=True,
                                                      return_counts=True)
        first = (counts.cumsum(0) - counts)[inverse]
        return ByClass(queries, keys, queries, keys, first, counts[inverse] - 1, where,
                       symmetric=True)
    gallery_features = torch.as_tensor(gallery_features).float().to(features.device)
    gallery_labels = torch.as_tensor(gallery_labels).to(device=features.device, dtype=labels.dtype)
    if len(labels) == 0 or len(gallery_labels) == 0:
        raise UserError(f'retrieval needs at least one query and one gallery item, got '
                        f'{len(labels)} queries and {len(gallery_labels)} gallery items')
    return query_gallery(features, labels, gallery_features, gallery_labels)


def unit_rows(features):
    """features (N, D), a copy the caller owns, scaled in place to unit rows."""
    return features.div_(features.norm(dim=1, keepdim=True).clamp_min(1e-12))


def query_gallery(features, labels, gallery_features, gallery_labels):
    """sorted_by_class with a gallery: a class's key is its index among the queries' classes, and
    gallery items of any other class all take the key after the last, so they come last and match
    no query."""
    classes = labels.unique()  # (C,) sorted
    index = torch.searchsorted(classes, gallery_labels).clamp_(max=len(classes) - 1)
    item_keys, order = torch.where(classes[index] == gallery_labels, index, len(classes)) \
        .sort(stable=True)
    items = unit_rows(gallery_features[order])  # (G, D)
    # (C,) gallery items of each query class
    counts = torch.bincount(item_keys, minlength=len(classes) + 1)[:-1]
    keys = torch.searchsorted(classes, labels)  # (N,)
    kept = (counts[keys] > 0).nonzero()[:, 0]
    keys, order = keys[kept].sort(stable=True)
    where = kept[order]
    queries = unit_rows(features[where])  # (n, D)
    first = (counts.cumsum(0) - counts)[keys]
    return ByClass(queries, keys, items, item_keys, first, counts[keys], where, symmetric=False)


def same_class_similarities(data, side, pool):
    """(n, m = max R): each query's cosines with the items of its class, descending, padded with
    -inf.

    The classes of the sorted queries a:b lie within the items first[a]:ends[b - 1], so a block
    holds only those columns, at most side x side of them (and at least one query). Without a
    gallery each query is left out of its own class by its position.
    """
    n, m = len(data.keys), int(data.r.max()) if len(data.keys) else 0
    out = data.queries.new_full((n, m), -math.inf)
    # (n,) one past each query's class among the items, itself included
    ends = (data.first + data.r + int(data.symmetric)).tolist()
    first = data.first.tolist()
    starts = [0]
    while starts[-1] < n:  # up to 256 queries whose block fits in side x side, at least one
        a = starts[-1]
        fits = bisect.bisect_right(range(a + 1, min(n, a + 256) + 1), side * side,
                                   key=lambda b: (b - a) * (ends[b - 1] - first[a]))
        starts.append(a + max(1, fits))

    def fill(a, b):
        """One block: the sorted queries a:b against the items of their classes."""
        lo, hi = first[a], ends[b - 1]
        sims = cosine_block(data.queries[a:b], data.items[lo:hi])  # (b - a, hi - lo)
        same_class = data.keys[a:b, None] == data.item_keys[None, lo:hi]
        if data.symmetric:
            position = torch.arange(b - a, device=sims.device)
            same_class[position, position + a - lo] = False  # the query itself, by its position
        k = min(m, hi - lo)
        out[a:b, :k] = sims.masked_fill_(~same_class, -math.inf).topk(k, dim=1).values

    list(pool.map(fill, starts[:-1], starts[1:]))
    return out


def other_class_top(data, positives, ranks, side, pool, progress, depth=0, count_all=False,
                    screen=None):
    """(n, width) each query's largest other-class similarities, descending, width = max(m, depth),
    and (n,) how many other-class items are at least as similar as its nearest same-class one, or
    None when no K exceeds the width and count_all is False (the lists then give Recall@K).

    Both sides are cut into chunks of side rows and compared block by block, a block being one
    chunk of queries against one chunk of items; memory beyond the blocks in flight is O(n x
    width). Only the values the metrics read need be exact: a list's first R, its first max(ranks)
    when Recall@K comes from it, and its first depth. screen, a Screen, has each block computed
    in bfloat16 and only its candidates re-scored exactly (Screen.candidates).
    """
    n, m = positives.shape
    width = max(m, depth)
    # a K beyond every list: Recall@K needs a count over all items
    counted = count_all or max(ranks) > width
    ahead_of_nearest = positives.new_zeros(n, dtype=torch.int32) if counted else None
    top = positives.new_full((n, width), -math.inf)
    if m == 0:  # no query has an item of its class
        return top, ahead_of_nearest
    floor, nearest, needed = list_bounds(positives, data.r, ranks, counted, depth)
    chunks, item_chunks = chunk_bounds(n, side), chunk_bounds(len(data.item_keys), side)
    keys, item_keys = data.keys.tolist(), data.item_keys.tolist()
    locks = [threading.Lock() for _ in chunks]  # two threads may fold blocks into one chunk's lists

    def fold(i, sims, columns, other):
        """Fold a block into the lists of chunk i's queries, which are its rows or its columns;
        other: the first row of the other side (an item, or without a gallery a query)."""
        lo, hi = chunks[i]
        # top may be older than another thread's latest merge: a lower value at needed, so still
        # a safe bound
        bound = torch.maximum(floor[lo:hi], top[lo:hi].gather(1, needed[lo:hi, None])[:, 0])
        near = nearest[lo:hi] if counted else None
        if screen is None:
            found = block_candidates(sims, bound, near, width, columns)
        else:
            found = screen.candidates(sims, bound, near, width, columns, lo, other)
        if found is None:
            return
        with locks[i]:
            if found.ahead is not None:
                ahead_of_nearest[lo:hi] += found.ahead
            touched = lo + found.touched
            top[touched] = torch.cat([top[touched], found.values], dim=1).topk(width, dim=1).values

    def block(pair):
        """Cosines of query chunk i with item chunk j, same-class pairs hidden, folded into chunk
        i's queries and, without a gallery, into chunk j's too: the matrix is symmetric, so the
        blocks from the diagonal on cover every pair once."""
        (a, b), (c, d) = chunks[pair[0]], item_chunks[pair[1]]
        if screen is None:
            sims = cosine_block(data.queries[a:b], data.items[c:d])  # (b - a, d - c)
        else:
            sims = bfloat16_block(screen.queries[a:b], screen.items[c:d])  # (b - a, d - c)
        if keys[a] <= item_keys[d - 1] and item_keys[c] <= keys[b - 1]:  # the chunks share a class
            sims.masked_fill_(data.keys[a:b, None] == data.item_keys[None, c:d], -math.inf)
        fold(pair[0], sims, columns=False, other=c)
        if data.symmetric and pair[1] != pair[0]:
            fold(pair[1], sims, columns=True, other=a)

    pairs = [(i, j) for i in range(len(chunks))
             for j in range(i if data.symmetric else 0, len(item_chunks))]
    for done, _ in enumerate(pool.map(block, pairs), 1):
        if progress is not None:
            progress(done, len(pairs))
    return top, ahead_of_nearest


def list_bounds(positives, r, ranks, counted, depth=0):
    """Per query (n,): floor, at or below which an other-class value never counts; nearest, its
    nearest same-class similarity (inf where R = 0); needed, the index of the last list value the
    metrics read."""
    has_r, inf = r > 0, torch.tensor(math.inf, device=positives.device)
    least = positives.gather(1, (r - 1).clamp(min=0)[:, None])[:, 0]  # (n,) least similar classmate
    # an other-class value equal to the least similar same-class one ranks before it, so the floor
    # is just below
    floor = torch.where(has_r, torch.nextafter(least, -inf), inf)
    nearest = torch.where(has_r, positives[:, 0], inf)
    needed = (r if counted else r.clamp(min=max(ranks))).clamp(min=max(1, depth)) - 1
    return floor, nearest, needed


def chunk_bounds(size, rows):
    """Chunks (start, end) of `rows` rows covering range(size)."""
    bounds = list(range(0, size, rows)) + [size]
    return list(zip(bounds[:-1], bounds[1:]))


class Candidates(NamedTuple):
    """What one block changes for the queries of its chunk."""
    touched: torch.Tensor  # (t,) the queries, within the chunk, with values that matter
    values: torch.Tensor  # (t, w <= m) their values that matter, padded with -inf
    ahead: Optional[torch.Tensor]  # (q,) each query's values >= its nearest classmate's, or None


def block_candidates(sims, bound, nearest, m, columns):
    """The Candidates of a block for its queries, the rows of sims (b, c) or, when columns is
    True, its columns; None when no value matters.

    A value matters if it can enter its query's list, being above the query's bound (q,), or, when
    nearest (q,) is given, if it is at least the query's nearest same-class similarity, to be
    counted.
    """
    threshold = bound  # (q,)
    if nearest is not None:
        below_nearest = torch.nextafter(nearest, nearest.new_tensor(-math.inf))
        threshold = torch.minimum(threshold, below_nearest)
    dim = 0 if columns else 1  # along which a query's values lie
    # past the first blocks few queries have values that matter, and few of theirs: each query's
    # largest value (one cheap reduction) tells which queries to look at
    touched = (sims.amax(dim) > threshold).nonzero()[:, 0]  # (t,)
    if len(touched) == 0:
        return None
    if len(touched) < len(threshold):
        sims = sims.index_select(1 - dim, touched)  # (b, t) or (t, c)
    shape = (1, -1) if columns else (-1, 1)
    above = sims > threshold[touched].view(shape)
    ahead = None if nearest is None else torch.zeros_like(threshold, dtype=torch.int32)
    if 8 * int(above.sum(dtype=torch.int32)) > sims.numel():  # most matter: each query's m largest
        if ahead is not None:
            ahead[touched] = (sims >= nearest[touched].view(shape)).sum(dim, dtype=torch.int32)
        per_query = sims.T.contiguous() if columns else sims  # (t, w)
        return Candidates(touched, per_query.topk(min(m, per_query.size(1)), dim=1).values, ahead)
    # few matter: gather them one by one rather than sorting whole rows
    flat = above.view(-1).nonzero()[:, 0]  # (E,) positions in the block of the values that matter
    values = sims.view(-1)[flat]
    # (E,) the touched query each belongs to
    owner = flat % sims.size(1) if columns else flat // sims.size(1)
    if columns:
        owner, order = owner.sort(stable=True)
        values = values[order]
    return packed(touched, owner, values, nearest, ahead)


def packed(touched, owner, values, nearest, ahead):
    """Candidates of the values (E,) of touched queries (t,), grouped by owner (E,), the index of
    each one's query in touched; ahead (q,), when given, gains the values >= nearest (q,)."""
    if ahead is not None:
        ahead.index_add_(0, touched[owner], (values >= nearest[touched[owner]]).int())
    if len(owner) == 0:
        return None if ahead is None else Candidates(touched[:0], values.new_zeros((0, 0)), ahead)
    counts = torch.bincount(owner, minlength=len(touched))  # (t,)
    slot = torch.arange(len(owner), device=values.device) - (counts.cumsum(0) - counts)[owner]
    candidates = values.new_full((len(touched), int(counts.max())), -math.inf)
    candidates[owner, slot] = values
    return Candidates(touched, candidates, ahead)


# --------------------------------------------------------------------------------------------------
# the bfloat16 screen: each block's products in bfloat16, its candidates re-scored exactly

BFLOAT16_ROUNDING = 2.0 ** -8  # relative error of a float32 rounded to bfloat16 (8 bits, to nearest)
PAIRS_AT_ONCE = 4096  # exact_pairs' products held at once


class Screen:
    """The bfloat16 copies of the sweep's unit rows and the bound on what rounding them costs.

    A block's products are computed from the bfloat16 rows (twice the float32 speed on CPUs with
    AVX512-BF16 or AMX) and accumulated in float32, then rounded to bfloat16. For unit rows q, x
    and their roundings q' = q - e, x' = x - f: q.x - q'.x' = q.f + e.x - e.f, so |q.x - q'.x'| <=
    |e| + |f| + |e| |f| (Cauchy-Schwarz); the float32 sum of D exact products adds at most
    gamma_D = D u / (1 - D u), u = 2^-24, times |q'| |x'|; the bfloat16 result at most 2^-8 of
    its size; the exact value's own float32 rounding 2^-24. Every product that may exceed a
    query's threshold t in exact arithmetic thus screens at or above lowered(t), and only those
    are re-scored (exact_pairs): the lists are exactly those of exact scores, ties included.
    """

    def __init__(self, data):
        self.data = data
        self.queries = data.queries.bfloat16()  # (n, D)
        self.query_error = rounding_error(data.queries, self.queries)  # (n,) |e|
        if data.symmetric:
            self.items, self.item_error = self.queries, self.query_error
        else:
            self.items = data.items.bfloat16()  # (M, D)
            self.item_error = rounding_error(data.items, self.items)  # (M,)
        dim_u = data.queries.size(1) * 2.0 ** -24
        self.gamma = dim_u / (1 - dim_u)

    def candidates(self, sims, bound, nearest, width, columns, lo, other):
        """block_candidates for a bfloat16 block sims (b, c) whose queries start at row lo of the
        queries (the rows of sims, or its columns) and whose other side at row other of the
        items (or, for columns, of the queries): the values are exact."""
        threshold = bound  # (q,)
        if nearest is not None:
            threshold = torch.minimum(threshold, torch.nextafter(nearest, nearest.new_tensor(
                -math.inf)))
        own = self.query_error[lo:lo + len(threshold)]  # (q,)
        rows, others, error = ((self.data.queries, self.data.queries, self.query_error) if columns
                               else (self.data.queries, self.data.items, self.item_error))
        worst = float(error.max())
        slack = (own + worst + own * worst + self.gamma * (1 + own) * (1 + worst)) * (1 + 1e-5)
        lowered = threshold - (slack + 2.0 ** -22)  # (q,) exact values above t are above this
        lowered = lowered - BFLOAT16_ROUNDING * lowered.abs().clamp(max=2)  # and after rounding
        dim = 0 if columns else 1
        touched = (sims.amax(dim).float() >= lowered).nonzero()[:, 0]  # (t,)
        if len(touched) == 0:
            return None
        if len(touched) < len(threshold):
            sims = sims.index_select(1 - dim, touched)  # (b, t) or (t, c)
        shape = (1, -1) if columns else (-1, 1)
        flat = (sims >= lowered[touched].view(shape)).view(-1).nonzero()[:, 0]  # (E,)
        owner, place = ((flat % sims.size(1), flat // sims.size(1)) if columns
                        else (flat // sims.size(1), flat % sims.size(1)))
        values = exact_pairs(rows, lo + touched[owner], others, other + place)  # (E,)
        keep = values > threshold[touched[owner]]
        owner, values = owner[keep], values[keep]
        if columns:
            owner, order = owner.sort(stable=True)
            values = values[order]
        ahead = None if nearest is None else torch.zeros_like(threshold, dtype=torch.int32)
        return packed(touched, owner, values, nearest, ahead)


def rounding_error(rows, rounded):
    """(N,) the length of each row's rounding error, rows (N, D) float32, rounded (N, D)."""
    return (rows - rounded.float()).norm(dim=1)


def exact_pairs(rows, row_index, others, other_index):
    """(E,) float32 products of rows[row_index] and others[other_index] (E,), each summed in
    float64 and rounded once: the one exact score of the screened path, the same for the same
    pair of rows wherever it is computed."""
    out = rows.new_empty(len(row_index))
    for start in range(0, len(row_index), PAIRS_AT_ONCE):
        part = slice(start, start + PAIRS_AT_ONCE)
        out[part] = (rows[row_index[part]].double() * others[other_index[part]].double()).sum(1)
    return out


def same_class_exact(data):
    """same_class_similarities with every value from exact_pairs, as the screened sweep scores:
    (n, m = max R) each query's cosines with the items of its class, descending, then -inf."""
    n, m = len(data.keys), int(data.r.max()) if len(data.keys) else 0
    span = data.r + int(data.symmetric)  # (n,) the items of its class, itself included
    owner = torch.repeat_interleave(torch.arange(n, device=span.device), span)  # (P,)
    offset = torch.arange(len(owner), device=span.device) - (span.cumsum(0) - span)[owner]
    item = data.first[owner] + offset  # (P,)
    values = exact_pairs(data.queries, owner, data.items, item)
    if data.symmetric:
        values.masked_fill_(item == owner, -math.inf)  # the query itself, by its position
    out = data.queries.new_full((n, int(span.max()) if n else 0), -math.inf)
    out[owner, offset] = values
    return out.sort(dim=1, descending=True).values[:, :m].contiguous()


def bfloat16_block(queries, items):
    """(b, D) and (c, D) bfloat16 rows -> (b, c) bfloat16 products, accumulated in float32 (oneDNN
    where it can, as cosine_block)."""
    if queries.device.type == 'cpu':
        try:
            return torch.ops.mkldnn._linear_pointwise(queries, items, None, 'none', [], '')
        except (AttributeError, RuntimeError):
            pass
    return queries @ items.T


# --------------------------------------------------------------------------------------------------
# what both searches share

def cosine_block(queries, items):
    """(b, D) and (c, D) float32 rows -> (b, c) float32 products: cosines where they are unit rows.

    On the CPU through oneDNN's float32 GEMM, which uses AVX-512 on any x86 CPU, while MKL's keeps
    to AVX2 on AMD ones and is about 2.2 times slower there (benchmarks/eval_speed.py prints both).
    The op is private: where it is missing or fails, or where oneDNN is switched off
    (torch.backends.mkldnn.flags(enabled=False)), a plain matmul.
    """
    mkldnn = torch.backends.mkldnn
    if queries.device.type == 'cpu' and mkldnn.is_available() and mkldnn.enabled:
        try:
            return torch.ops.mkldnn._linear_pointwise(queries, items, None, 'none', [], '')
        except (AttributeError, RuntimeError):
            pass
    return queries @ items.T


@contextlib.contextmanager
def single_threaded_ops():
    """Run torch CPU ops on one thread each inside the block; the caller's thread count is
    restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
