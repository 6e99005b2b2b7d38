"""Re-ranking of nearest-neighbour lists, in memory bounded by the lists, never an N x N matrix.

- aqe: alpha-query expansion (Radenovic et al., TPAMI 2018; fast-reid's aqe, k = 10, alpha = 3):
  each query becomes the sum of itself and its k - 1 nearest items, each weighted by its cosine
  to the power alpha, and searches again.
- dba: database-side augmentation (Arandjelovic & Zisserman, CVPR 2012; Radenovic et al.): each
  item becomes that sum over itself and its k - 1 nearest items, and the queries search the
  augmented items; where the queries are the items (all-vs-all) they are augmented too, which is
  fast-reid's aqe exactly.
- kreciprocal: k-reciprocal encoding (Zhong et al., CVPR 2017, k1 = 20, k2 = 6, lambda = 0.3):
  the final distance mixes a Jaccard distance of k-reciprocal neighbour sets with the original
  one. The sets are sparse, so only items sharing a neighbour with the query have a Jaccard
  distance below 1; those and the query's nearest `length` items hold its first `length` places
  exactly.
Every method returns each query's first `length` items (lowest distance first); rerank_metrics
turns them into the retrieval metrics of utils.retrieval_metrics, for columns of their own.
"""
import math

import torch

from neighbours import chunk_bounds, top_k, unit_rows
from runtime import UserError
from utils import parse_extra

METHODS = ('aqe', 'dba', 'kreciprocal')
PAIR_BUDGET = 2 ** 23  # (query, item) pairs of the Jaccard step held at once


def add_arguments(group, help):
    """--rerank (its help, which says where the lists go) and the methods' parameters, for every
    script that re-ranks."""
    group.add_argument('--rerank', default=None, choices=METHODS, help=help)
    group.add_argument('--rerank_k', default=10, type=int,
                       help='aqe and dba: the rows summed, the query or item itself included')
    group.add_argument('--rerank_alpha', default=3.0, type=float,
                       help="aqe and dba: the power of each neighbour's cosine, its weight")
    group.add_argument('--rerank_k1', default=20, type=int,
                       help='kreciprocal: the neighbours whose reciprocity is checked')
    group.add_argument('--rerank_k2', default=6, type=int,
                       help='kreciprocal: the neighbours averaged in its local query expansion')
    group.add_argument('--rerank_lambda', default=0.3, type=float,
                       help='kreciprocal: the weight of the original distance against the '
                            'Jaccard one')


def params(args):
    """reranked_lists' parameters from add_arguments' flags; out-of-range ones are a UserError."""
    for flag, low in (('rerank_k', 1), ('rerank_k1', 1), ('rerank_k2', 1)):
        if getattr(args, flag) < low:
            raise UserError(f'--{flag} must be at least {low}, not {getattr(args, flag)}')
    if not args.rerank_alpha >= 0:
        raise UserError(f'--rerank_alpha must be 0 or more, not {args.rerank_alpha}')
    if not 0 <= args.rerank_lambda <= 1:
        raise UserError(f'--rerank_lambda must lie in [0, 1], not {args.rerank_lambda}')
    return {'aqe_k': args.rerank_k, 'aqe_alpha': args.rerank_alpha, 'k1': args.rerank_k1,
            'k2': args.rerank_k2, 'lambda_value': args.rerank_lambda}


def reranked_lists(method, queries, items, length, leave_out=None, aqe_k=10, aqe_alpha=3.0,
                   k1=20, k2=6, lambda_value=0.3):
    """(Q, length') int64 item indices, each query's re-ranked first length' = min(length, items
    it may rank) items, best first, by method (METHODS).

    queries (Q, D) and items (M, D) float rows; leave_out as neighbours.top_k's (the queries'
    own positions when they are the items: pass items is queries). aqe_k, aqe_alpha: the
    expansion of aqe and dba; k1, k2, lambda_value: k-reciprocal's.
    """
    symmetric = queries is items
    queries = unit_rows(torch.as_tensor(queries).float().clone())  # (Q, D)
    items = queries if symmetric else unit_rows(torch.as_tensor(items).float().clone())  # (M, D)
    if method == 'aqe':
        return top_k(expanded(queries, items, aqe_k, aqe_alpha, leave_out), items, length,
                     leave_out, block_rows=list_blocks(length))[1]
    if method == 'dba':
        augmented = expanded(items, items, aqe_k, aqe_alpha, torch.arange(len(items)))
        searching = augmented if symmetric else queries
        return top_k(searching, augmented, length, leave_out, block_rows=list_blocks(length))[1]
    if method == 'kreciprocal':
        return k_reciprocal(queries, items, symmetric, length, leave_out, k1, k2, lambda_value)
    raise ValueError(f'unknown re-ranking method {method!r}')


def expanded(rows, items, k, alpha, leave_out):
    """(n, D) unit rows: each row plus its k - 1 nearest items (leave_out as top_k's: its own
    position among them), each weighted by its cosine ** alpha."""
    sims, index = top_k(rows, items, k - 1, leave_out)  # (n, k - 1)
    # cosines below 0 would flip sign under an even alpha: they add nothing, as in fast-reid
    weights = sims.clamp(min=0) ** alpha  # (n, k - 1)
    total = rows.clone()
    for a, b in chunk_bounds(len(rows), 4096):
        total[a:b] += (weights[a:b, :, None] * items[index[a:b]]).sum(1)  # (b - a, D)
    return unit_rows(total)


def list_blocks(length):
    """top_k's item block for lists `length` long: at least 16 times as wide, since each block's
    best are merged into the running lists with a sort of 2 x length a query (at length 1,000 that
    made blocks of 16,384 rows 2.5 times faster than top_k's 4,096 on 12,000 rows)."""
    return max(4096, 16 * length)


# --------------------------------------------------------------------------------------------------
# k-reciprocal encoding on sparse neighbour sets

def k_reciprocal(queries, items, symmetric, length, leave_out, k1, k2, lambda_value):
    """reranked_lists' k-reciprocal lists. As in the original code, neighbour sets are taken in the
    union of queries and items (the items alone when they are the queries), and the original
    distance is the squared Euclidean one of unit rows, 2 - 2 cos, divided by each row's largest."""
    union = items if symmetric else torch.cat([queries, items])  # (A, D)
    first_item = 0 if symmetric else len(queries)  # the items' first row in the union
    near = top_k(union, union, k1 + 1)[1]  # (A, k1 + 1) itself first, but for duplicates
    farthest = 2 - 2 * -top_k(-union, union, 1)[0][:, 0]  # (A,) each row's largest distance
    farthest = farthest.clamp_min(1e-12)
    members, weights = encoded(union, near, farthest, k1)  # (A, W) sparse rows of V
    if k2 > 1:  # local query expansion: each row the mean of its k2 nearest rows' codes
        members, weights = averaged(members, weights, near[:, :k2], len(union))
    # candidates: each query's nearest items, which hold its list where Jaccard distances are 1
    candidates = top_k(queries, items, length, leave_out, block_rows=list_blocks(length))[1]
    length = candidates.size(1)
    columns = by_column(members, weights, len(union))
    out = []
    for a, b in jaccard_chunks(members, columns, len(queries)):
        rows, cols, shared = shared_weights(members[a:b], weights[a:b], columns)
        # the query's own row and, with a gallery, other queries are not items to rank
        keep = cols >= first_item
        if symmetric:
            own = torch.as_tensor(-1 if leave_out is None else leave_out).expand(len(queries))
            keep &= cols != own[a:b][rows]
        rows, cols, shared = rows[keep], cols[keep] - first_item, shared[keep]
        jaccard = 1 - shared / (2 - shared)
        # the candidates, at Jaccard distance 1 where they share nothing with the query
        rows = torch.cat([rows, torch.arange(b - a).repeat_interleave(length)])
        cols = torch.cat([cols, candidates[a:b].reshape(-1)])
        jaccard = torch.cat([jaccard, jaccard.new_ones((b - a) * length)])
        key, where = (rows * len(items) + cols).unique(return_inverse=True)
        jaccard = jaccard.new_ones(len(key)).scatter_reduce_(0, where, jaccard, 'amin')
        rows, cols = key // len(items), key % len(items)
        cosines = many_pair_cosines(queries[a:b], items, rows, cols)
        original = (2 - 2 * cosines) / farthest[a:b][rows]
        final = (1 - lambda_value) * jaccard + lambda_value * original
        out.append(first_of_each(rows, cols, final, b - a, length))
    return torch.cat(out)


def encoded(union, near, farthest, k1):
    """The sparse rows of V, (A, W) members (-1 for none) and weights: each row's k-reciprocal
    neighbours, extended by those of its members' k1 / 2-reciprocal sets that share more than two
    thirds with it, weighted by exp(-original distance) and summing to 1."""
    half = int(round(k1 / 2))  # numpy's around: half to even, as the original
    reciprocal = reciprocal_sets(near[:, :k1 + 1])  # (A, k1 + 1) members or -1
    halves = reciprocal_sets(near[:, :half + 1])  # (A, half + 1)
    members, weights = [], []
    for a, b in chunk_bounds(len(union), 1024):
        mine = reciprocal[a:b]  # (b - a, k1 + 1)
        theirs = halves[mine.clamp(min=0)]  # (b - a, k1 + 1, half + 1) each member's half set
        sizes = (theirs >= 0).sum(-1)  # (b - a, k1 + 1)
        common = ((theirs[..., None] == mine[:, None, None, :]) & (theirs[..., None] >= 0))
        common = common.any(-1).sum(-1)  # (b - a, k1 + 1)
        taken = (mine >= 0) & (common * 3 > 2 * sizes)
        extra = torch.where(taken[..., None], theirs, -1).flatten(1)  # (b - a, (k1 + 1)(half + 1))
        rows = distinct(torch.cat([mine, extra], 1))  # (b - a, W)
        cosines = pair_cosines(union[a:b], union, torch.arange(b - a)[:, None], rows.clamp(min=0))
        weight = torch.exp(-(2 - 2 * cosines) / farthest[a:b, None]) * (rows >= 0)
        members.append(rows)
        weights.append(weight / weight.sum(1, keepdim=True))
    width = max(m.size(1) for m in members)
    return (torch.cat([pad(m, width, -1) for m in members]),
            torch.cat([pad(w, width, 0.0) for w in weights]))


def reciprocal_sets(near):
    """(A, k + 1) each row's neighbours in near (A, k + 1) that have the row among theirs, -1
    for the others."""
    own = torch.arange(len(near))[:, None]
    found = torch.zeros(near.shape, dtype=torch.bool)
    for a, b in chunk_bounds(len(near), 4096):
        found[a:b] = (near[near[a:b]] == own[a:b, :, None]).any(-1)  # (b - a, k + 1)
    return torch.where(found, near, -1)


def distinct(rows):
    """(n, w) indices with each row's repeats and -1s replaced by -1, the rest sorted first."""
    rows = rows.sort(1).values
    repeat = torch.zeros_like(rows, dtype=torch.bool)
    repeat[:, 1:] = rows[:, 1:] == rows[:, :-1]
    rows = torch.where(repeat | (rows < 0), -1, rows)
    rows = rows.sort(1, descending=True).values  # members first, -1 last
    return rows[:, :max(1, int((rows >= 0).sum(1).max()))]


def pad(tensor, width, value):
    """tensor (n, w) padded with value to (n, width)."""
    return torch.nn.functional.pad(tensor, (0, width - tensor.size(1)), value=value)


def averaged(members, weights, near, size):
    """The sparse rows (members, weights) each replaced by the mean of the rows near (A, k2) names,
    as the original's local query expansion, in the same sparse form."""
    k2 = near.size(1)
    out_members, out_weights = [], []
    for a, b in chunk_bounds(len(members), 1024):
        rows = members[near[a:b]].flatten(1)  # (b - a, k2 * W)
        values = weights[near[a:b]].flatten(1) / k2
        owner = torch.arange(b - a)[:, None].expand_as(rows)
        live = rows >= 0
        key, where = (owner[live] * size + rows[live]).unique(return_inverse=True)
        summed = values.new_zeros(len(key)).index_add_(0, where, values[live])
        out_members.append(sparse_rows(key // size, key % size, b - a, -1))
        out_weights.append(sparse_rows(key // size, summed, b - a, 0.0))
    width = max(m.size(1) for m in out_members)
    return (torch.cat([pad(m, width, -1) for m in out_members]),
            torch.cat([pad(w, width, 0.0) for w in out_weights]))


def sparse_rows(owner, values, rows, fill):
    """(rows, w) the values of each owner (sorted), left-aligned, padded with fill."""
    counts = torch.bincount(owner, minlength=rows)
    slot = torch.arange(len(owner)) - (counts.cumsum(0) - counts)[owner]
    out = values.new_full((rows, max(1, int(counts.max()) if len(owner) else 1)), fill)
    out[owner, slot] = values
    return out


def by_column(members, weights, size):
    """V by column: (starts (A + 1,), rows, weights) of each column's nonzero entries."""
    live = members >= 0
    owner = torch.arange(len(members))[:, None].expand_as(members)[live]
    column, order = members[live].sort(stable=True)
    starts = torch.zeros(size + 1, dtype=torch.int64)
    starts[1:] = torch.bincount(column, minlength=size).cumsum(0)
    return starts, owner[order], weights[live][order]


def jaccard_chunks(members, columns, queries):
    """Chunks of query rows whose (query, row) pairs through shared columns stay within
    PAIR_BUDGET (one query at least)."""
    starts = columns[0]
    pairs = ((starts[1:] - starts[:-1])[members[:queries].clamp(min=0)]
             * (members[:queries] >= 0)).sum(1)  # (Q,)
    bounds, total, first = [], 0, 0
    for row, count in enumerate(pairs.tolist()):
        if total and total + count > PAIR_BUDGET:
            bounds.append((first, row))
            first, total = row, 0
        total += count
    return bounds + [(first, queries)] if queries else bounds


def shared_weights(members, weights, columns):
    """(rows, cols, sum over shared columns k of min(V[row, k], V[col, k])) for the queries whose
    sparse rows are given, over every union row that shares a column with them."""
    starts, owners, values = columns
    live = members >= 0
    query = torch.arange(len(members))[:, None].expand_as(members)[live]
    column, mine = members[live], weights[live]
    counts = starts[column + 1] - starts[column]
    entry = torch.arange(len(column)).repeat_interleave(counts)  # (P,) the query entry of a pair
    offset = torch.arange(len(entry)) - (counts.cumsum(0) - counts)[entry]
    position = starts[column][entry] + offset  # (P,) the column entry of a pair
    smaller = torch.minimum(mine[entry], values[position])
    key, where = (query[entry] * (len(starts) - 1) + owners[position]).unique(return_inverse=True)
    shared = smaller.new_zeros(len(key)).index_add_(0, where, smaller)
    return key // (len(starts) - 1), key % (len(starts) - 1), shared


def pair_cosines(queries, items, rows, cols):
    """Cosines of queries[rows] with items[cols] (unit rows), rows and cols broadcast together."""
    rows, cols = torch.broadcast_tensors(torch.as_tensor(rows), torch.as_tensor(cols))
    flat_rows, flat_cols = rows.reshape(-1), cols.reshape(-1)
    out = queries.new_empty(len(flat_rows))
    for a, b in chunk_bounds(len(out), 2 ** 16):
        out[a:b] = (queries[flat_rows[a:b]] * items[flat_cols[a:b]]).sum(1)
    return out.view(rows.shape)


def many_pair_cosines(queries, items, rows, cols, budget=2 ** 26):
    """pair_cosines for many pairs (P,) per query: each block of items is multiplied with all the
    queries at once (a GEMM, holding at most `budget` products) and the pairs whose item lies in it
    read from the product; gathering two rows for every pair would cost far more."""
    out = queries.new_empty(len(rows))
    block = max(256, budget // max(1, len(queries)))
    order = cols.argsort()
    bounds = torch.searchsorted(cols[order], torch.arange(0, len(items) + block, block)).tolist()
    for i, start in enumerate(range(0, len(items), block)):
        pick = order[bounds[i]:bounds[i + 1]]
        if len(pick):
            products = queries @ items[start:start + block].T  # (Q, block)
            out[pick] = products[rows[pick], cols[pick] - start]
    return out


def first_of_each(rows, cols, distance, queries, length):
    """(queries, length) the cols of each row with the lowest distances, equal ones in col order;
    rows, cols sorted by (row, col) as unique leaves them."""
    order = distance.sort(stable=True).indices
    order = order[rows[order].sort(stable=True).indices]  # by row, then distance, then col
    rows, cols = rows[order], cols[order]
    counts = torch.bincount(rows, minlength=queries)
    slot = torch.arange(len(rows)) - (counts.cumsum(0) - counts)[rows]
    kept = slot < length
    out = cols.new_full((queries, length), -1)
    out[rows[kept], slot[kept]] = cols[kept]
    return out


# --------------------------------------------------------------------------------------------------
# the retrieval metrics of re-ranked lists

def rerank_metrics(features, labels, ranks, method, gallery_features=None, gallery_labels=None,
                   extra=(), **params):
    """utils.retrieval_metrics' Recall@K, MAP@R and R-Precision of the lists method re-ranks
    (reranked_lists, with params), as fractions, and the precision@k and map@k that extra names
    (an MRR would need each whole list: left out); the lists are as long as the metrics read."""
    labels = torch.as_tensor(labels)
    symmetric = gallery_features is None
    features = torch.as_tensor(features).float()
    items = features if symmetric else torch.as_tensor(gallery_features).float()
    item_labels = labels if symmetric else torch.as_tensor(gallery_labels)
    classes, counts = item_labels.unique(return_counts=True)
    found = torch.searchsorted(classes, labels).clamp(max=len(classes) - 1)
    r = torch.where(classes[found] == labels, counts[found], 0) - int(symmetric)  # (N,)
    ranked = len(items) - int(symmetric)  # the items a query ranks, which caps a k
    extra = parse_extra(list_extra(extra))
    length = max([max(ranks), int(r.max())] + [min(k, ranked) for _, k in extra])
    leave_out = torch.arange(len(features)) if symmetric else None
    lists = reranked_lists(method, features, features if symmetric else items, length,
                           leave_out, **params)  # (N, L)
    same = (item_labels[lists.clamp(min=0)] == labels[:, None]) & (lists >= 0)  # (N, L)
    return list_metrics(same, r, ranks, extra, ranked)


def list_extra(names):
    """The extra metrics of names (utils.retrieval_metrics') that re-ranked lists give: precision@k
    and map@k; not mrr, which would need each query's whole list."""
    return [name for name, k in parse_extra(names) if k is not None]


def list_metrics(same, r, ranks, extra=(), ranked=None):
    """Recall@K, MAP@R and R-Precision from same (N, L), whether each query's i-th item is of its
    class, and r (N,) its R, and the (precision@k or map@k name, k) pairs of extra, k capped at
    ranked, the items a query ranks (utils.retrieval_metrics' definitions)."""
    has_r = r > 0
    metrics = {f'recall@{k}': (same[:, :k].any(1) & has_r).double().mean().item() for k in ranks}
    i = torch.arange(1, same.size(1) + 1)  # (L,)
    within = same & (i <= r[:, None])  # (N, L) hits among the R nearest
    precision = within.cumsum(1).double() / i  # (N, L) P(i) over the R nearest
    ap = (precision * within).sum(1) / r.clamp(min=1)
    metrics['map@r'] = ap[has_r].double().mean().item() if has_r.any() else math.nan
    rp = within.sum(1).double() / r.clamp(min=1)
    metrics['r_precision'] = rp[has_r].double().mean().item() if has_r.any() else math.nan
    for name, k in extra:
        k = min(k, same.size(1) if ranked is None else ranked)
        found = same[:, :k]  # (N, k) hits among the k nearest
        if name.startswith('precision@'):
            value = found.sum(1).double()
        else:
            value = (found.cumsum(1).double() / i[:k] * found).sum(1)
        value = value / r.clamp(min=1, max=k)
        metrics[name] = value[has_r].mean().item() if has_r.any() else math.nan
    return metrics
