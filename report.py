"""An HTML report of a trained model on its test set (`python test.py --data_base ... --report`):
the headline metrics, the classes and the queries it fails, the classes it confuses, a map of its
embedding space and its training curves, in one folder that opens offline."""
import contextlib
import html
import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from neighbours import top_k
from runs import output_folder
from runtime import UserError, atomic_dir, pyplot, remove_temporaries, save_figure
import rerank
from utils import (clustering_metrics, load_index, parse_ranks, ranked_metric,
                   retrieval_metrics)

# t-SNE up to this many embeddings; beyond, PCA: t-SNE's time grows past minutes on a CPU
TSNE_LIMIT = 3000
PAIRS = 20  # confused class pairs on the page
PICTURES = 'images of the worst queries'  # what the page's Missing line says of absent pictures
PERPLEXITY = 30  # t-SNE's usual perplexity, lowered only for fewer embeddings than it needs


def write_report(args, data_base, data_base_path, framed, draw_row):
    """Write results/<data base file name without .pth>_report/ (index.html, its pictures and CSV
    files) whole.

    args are test.py's flags (--report_queries worst queries, each with its --retrieval_num
    nearest); framed and draw_row are test.py's, so that a worst query is drawn as test.py draws any
    query.
    """
    if args.gallery is not None:
        raise UserError(
            '--report covers the data base\'s own test set, not a --gallery folder; leave out one'
            ' of them'
        )
    for flag in ('report_queries', 'retrieval_num'):
        if getattr(args, flag) < 1:
            raise UserError(f'--{flag} must be at least 1, not {getattr(args, flag)}')
    # a re-ranked report has a folder of its own: its figures never replace the plain ones
    name = (f'{os.path.basename(data_base_path)[:-len(".pth")]}_report'
            + (f'_{args.rerank}' if args.rerank else ''))
    moved = data_base.images_moved(data_base_path, args.data_path)
    if moved is not None:
        if has_pictures(os.path.join('results', name)):
            raise UserError(f'{moved}; results/{name}/ holds an earlier report with its pictures, '
                            f'which is not replaced by one without them unless you move it away')
        print(f'warning: {moved} (the report is written without their pictures)')
    found = analyse(data_base, args.retrieval_num, args.report_queries,
                    (args.rerank, rerank.params(args)) if args.rerank else None)
    if found['k'] < args.retrieval_num:
        print(f'--retrieval_num {args.retrieval_num} is more than the {found["k"]} images there '
              f'are to search (besides the query), so each query shows all {found["k"]}')
    # results/<run name>, whose statistics lie beside
    run = re.sub(r'_\d+_data_base\.pth$', '', data_base_path)
    results = output_folder(data_base_path)  # the run's results/, where the data base lies
    remove_temporaries(results, f'{name}.')  # left by a report killed while it was written
    with atomic_dir(os.path.join(results, name)) as folder:
        missing = draw_queries(found, folder, framed, draw_row)
        curves = f'{run}_statistics.png'
        if os.path.isfile(curves):
            shutil.copyfile(curves, os.path.join(folder, 'statistics.png'))
        else:
            missing.append(f'the training curves ({curves})')
        method = embedding_map(found, os.path.join(folder, 'map.png'))
        found['per_class'].to_csv(os.path.join(folder, 'classes.csv'), index=False)
        found['pairs'].to_csv(os.path.join(folder, 'confused_pairs.csv'), index=False)
        found['worst'].drop(columns=['neighbours']).to_csv(
            os.path.join(folder, 'worst_queries.csv'), index=False
        )
        with open(os.path.join(folder, 'summary.json'), 'w') as file:
            json.dump({'data_base': data_base_path, 'epoch': data_base.epoch,
                       'metrics': found['metrics'], **reranked_summary(found), 'map': method,
                       'missing': missing}, file,
                      indent=1)
        with open(os.path.join(folder, 'index.html'), 'w', encoding='utf-8') as file:
            file.write(
                page(
                    found,
                    data_base,
                    data_base_path,
                    f'{run}_statistics.csv',
                    missing,
                    method,
                    os.path.isfile(curves),
                )
            )
    print(
        f'wrote the report on {len(found["labels"])} queries to {results}/{name}/index.html (it'
        ' opens'
        ' offline)'
    )


def reranked_summary(found):
    """The re-ranked figures of summary.json, under their own key, when the report has them."""
    if found['reranked'] is None:
        return {}
    method, params = found['rerank']
    return {'rerank': {'method': method, **params, 'metrics': found['reranked']}}


def has_pictures(folder):
    """Whether folder holds a report written with every picture of its worst queries."""
    try:
        with open(os.path.join(folder, 'summary.json')) as file:
            missing = json.load(file)['missing']
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return not any(PICTURES in part for part in missing)


# --------------------------------------------------------------------------------------------------
# the figures: metrics per query and per class, nearest neighbours, confused pairs

def analyse(data_base, k, num_queries, reranking=None):
    """Everything the page shows, as numbers: {'metrics', 'reranked', 'per_class', 'worst', 'pairs',
    ...}.

    The metrics are retrieval_metrics' on the stored test features, as train.py evaluated them
    (queries against the gallery of a query/gallery data set), so they equal what train.py printed
    for that epoch, with the ranking metrics its --metrics named (precision@K, map@K, mrr) and NMI
    and AMI if it named either.
    reranking, (method, parameters) of rerank.reranked_lists, adds 'reranked': the Recall@K, MAP@R
    and R-Precision of the re-ranked lists (rerank.rerank_metrics), apart from the plain ones; the
    rest of the page stays plain.
    """
    ranks = parse_ranks(data_base.recalls)
    images, labels, queries = data_base.test
    queries = queries.float()
    item_images, item_labels, items = data_base.searched
    split = 'test' if data_base.gallery is None else 'gallery'
    gallery = (items.float(), item_labels) if split == 'gallery' else ()
    with progress_bar('metrics per query') as progress:
        # Recall@1 is swept too whatever the run's ranks: the per-class table shows it
        metrics, per_query = retrieval_metrics(
            queries, labels, sorted(set(ranks) | {1}), *gallery, per_query=True, progress=progress,
            extra=named_extra(data_base)
        )
    retrieval = [f'recall@{rank}' for rank in ranks] + ['map@r', 'r_precision']
    metrics = {key: metrics[key] for key in retrieval + named_extra(data_base)}
    if {'nmi', 'ami'} & set(named_metrics(data_base)):
        print('clustering the test embeddings for NMI and AMI')
        metrics.update(clustering_metrics(queries, labels))  # as train.py: of the queries
    reranked = None
    if reranking is not None:
        method, params = reranking
        print(f're-ranking the lists by {method}')
        reranked = rerank.rerank_metrics(queries, labels, ranks, method, *gallery, **params,
                                         extra=named_extra(data_base))
    with progress_bar('nearest neighbours') as progress:
        # searching the test set itself, each query is left out of its own list
        own = torch.arange(len(queries)) if split == 'test' else None
        similarities, neighbours = top_k(queries, items.float(), k, leave_out=own,
                                         progress=progress)
    similarities, neighbours = similarities.numpy(), neighbours.numpy()  # (N, k), (N, k)
    names = class_names(data_base, split)
    shown = (
        names
        if names is not None
        else [str(label) for label in range(int(max(labels.max(), item_labels.max())) + 1)]
    )
    labels, item_labels = labels.numpy(), item_labels.numpy()
    hit, ap = per_query['recall@1'].numpy(), per_query['ap@r'].numpy()
    return {
        'metrics': metrics,
        'reranked': reranked,
        'rerank': reranking,
        'labels': labels,
        'item_labels': item_labels,
        'images': images,
        'item_images': item_images,
        'gallery': split == 'gallery',
        'names': shown,
        'named': names is not None,
        'features': queries,
        'items': items.float(),
        'k': similarities.shape[1],
        'per_class': per_class(labels, item_labels, hit, ap, shown, split == 'gallery'),
        'worst': worst_queries(
            per_query,
            labels,
            item_labels,
            images,
            item_images,
            similarities,
            neighbours,
            shown,
            num_queries,
        ),
        'pairs': confused_pairs(labels, item_labels[neighbours], shown),
    }


def named_metrics(data_base):
    """The metrics the run's --metrics named (none for a run older than the flag)."""
    return str(data_base.run.get('metrics') or '').split(',')


def named_extra(data_base):
    """The ranking metrics (precision@K, map@K, mrr) the run's --metrics named, in its order."""
    return [name for name in named_metrics(data_base) if ranked_metric(name)]


@contextlib.contextmanager
def progress_bar(description):
    """A progress bar over blocks, and the progress(done, total) callback that moves it."""
    with tqdm(desc=description, unit='block', dynamic_ncols=True) as bar:
        def progress(done, total):
            bar.total, bar.n = total, done
            bar.refresh()
        yield progress


def class_names(data_base, split):
    """Each label's class as the prepared index names it (a labelled folder's name, a benchmark's
    class id, an In-shop item id), or None when the index is gone or no longer lists the data base's
    images."""
    try:
        index = load_index(data_base.root, data_base.data_name, data_base.crop_type)
    except UserError:
        return None
    root = os.path.join(data_base.root, data_base.data_name)
    # labels number the classes in sorted order, a query split and its gallery together
    # (utils.ImageReader)
    searched = ('query', 'gallery') if split == 'gallery' else ('test',)
    if not all(part in index for part in searched):
        return None
    classes = sorted(set().union(*(index[part] for part in searched)))
    listed = {
        os.path.join(root, relative): label
        for label, key in enumerate(classes)
        for part in searched
        for relative in index[part].get(key, ())
    }
    pairs = [(path, label) for part in (data_base.test, data_base.gallery) if part is not None
             for path, label in zip(part.images, part.labels.tolist())]
    if any(listed.get(path) != label for path, label in pairs):
        return None
    return [str(key) for key in classes]


def per_class(labels, item_labels, hit, ap, names, gallery):
    """One row per class, worst first (by MAP@R, then Recall@1): its images (queries and gallery
    images with a gallery), Recall@1 and MAP@R over its queries (MAP@R over those with R > 0; NaN
    where there are none)."""
    frame = pd.DataFrame({'label': labels, 'hit': hit.astype(np.float64), 'ap': ap})
    table = frame.groupby('label').agg(
        queries=('label', 'size'), recall_at_1=('hit', 'mean'), map_at_r=('ap', 'mean')
    )
    classes = np.union1d(labels, item_labels) if gallery else np.unique(labels)
    table = table.reindex(classes)
    table['queries'] = table['queries'].fillna(0).astype(int)
    table.insert(0, 'class', [names[label] for label in classes])
    if gallery:
        table.insert(2, 'gallery_images', np.bincount(item_labels, minlength=len(names))[classes])
    else:
        table = table.rename(columns={'queries': 'images'})
    table = table.rename(columns={'recall_at_1': 'recall@1', 'map_at_r': 'map@r'})
    return table.reset_index().sort_values(
        ['map@r', 'recall@1', 'label'], na_position='last', kind='stable'
    )


def worst_queries(
    per_query, labels, item_labels, images, item_images, similarities, neighbours, names, count
):
    """The `count` queries of lowest AP@R (queries with R = 0 have none and are left out), worst
    first, each with its nearest items: a frame of position, image, class, ap@r, r_precision, hit@1,
    nearest (JSON [[image, similarity], ...], for the CSV) and neighbours [(item position,
    similarity)]."""
    ap = per_query['ap@r'].numpy()
    ranked = np.flatnonzero(~np.isnan(ap))
    order = ranked[np.lexsort((ranked, ap[ranked]))][:count]  # lowest AP@R first, ties by position
    return pd.DataFrame(
        {
            'position': order,
            'image': [images[q] for q in order],
            'class': [names[labels[q]] for q in order],
            'ap@r': ap[order],
            'r_precision': per_query['r_precision'].numpy()[order],
            'hit@1': per_query['recall@1'].numpy()[order],
            'nearest': [
                json.dumps(
                    [
                        [item_images[i], round(float(s), 6)]
                        for i, s in zip(neighbours[q], similarities[q])
                    ]
                )
                for q in order
            ],
            'neighbours': [
                list(zip(neighbours[q].tolist(), similarities[q].tolist())) for q in order
            ],
        }
    )


def confused_pairs(labels, neighbour_labels, names):
    """The PAIRS (query class, other class) pairs whose images the query class's queries find most
    often among their nearest (neighbour_labels (N, k)), with the count and its share of those
    queries' neighbours."""
    query_labels = np.broadcast_to(labels[:, None], neighbour_labels.shape)
    other = query_labels != neighbour_labels
    size = max(labels.max(), neighbour_labels.max()) + 1
    codes, counts = np.unique(query_labels[other].astype(np.int64) * size + neighbour_labels[other],
                              return_counts=True)
    top = np.lexsort((codes, -counts))[:PAIRS]  # most often first, ties by class
    first, second = codes[top] // size, codes[top] % size
    queries = np.bincount(labels, minlength=size)
    return pd.DataFrame(
        {
            'query_class': [names[c] for c in first],
            'retrieved_class': [names[c] for c in second],
            'count': counts[top],
            'share': counts[top] / (queries[first] * neighbour_labels.shape[1]),
        }
    )


# --------------------------------------------------------------------------------------------------
# the pictures

def draw_queries(found, folder, framed, draw_row):
    """Draw each worst query's row into folder/queries/<n>.png with test.py's framed and draw_row;
    returns the one line's parts naming what could not be drawn (images no longer on disk)."""
    os.makedirs(os.path.join(folder, 'queries'))
    missing, needed, drawn = [], set(), []
    for number, query in enumerate(found['worst'].to_dict('records'), 1):
        paths = [query['image']] + [found['item_images'][i] for i, _ in query['neighbours']]
        needed.update(paths)
        absent = [path for path in paths if not os.path.isfile(path)]
        missing += absent
        if absent:
            drawn.append(False)
            continue
        label = found['labels'][query['position']]
        try:
            results = [
                (
                    framed(found['item_images'][i], bool(found['item_labels'][i] == label)),
                    rank,
                    similarity,
                    bool(found['item_labels'][i] == label),
                )
                for rank, (i, similarity) in enumerate(query['neighbours'], 1)
            ]
            draw_row(
                framed(query['image'], border=False),
                results,
                os.path.join(folder, 'queries', f'{number}.png'),
            )
            drawn.append(True)
        except UserError:  # a file that is there but no longer an image
            missing += [paths[0]]
            drawn.append(False)
    found['drawn'] = drawn
    if not missing:
        return []
    return [f'{len(set(missing))} of the {len(needed)} {PICTURES} (such as '
            f'{missing[0]}), so {drawn.count(False)} of the {len(drawn)} queries are listed '
            f'without pictures']


def embedding_map(found, path):
    """A 2-D map of the test embeddings (queries and gallery with a gallery) coloured by class into
    path; returns which map it is: t-SNE up to TSNE_LIMIT embeddings, PCA beyond."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    features = (
        torch.cat([found['features'], found['items']]) if found['gallery'] else found['features']
    )
    labels = (
        np.concatenate([found['labels'], found['item_labels']])
        if found['gallery']
        else found['labels']
    )
    points = F.normalize(features, dim=-1).numpy()
    if len(points) <= TSNE_LIMIT:
        # t-SNE on the first 50 principal components, the usual step that speeds it up and removes
        # noise
        reduced = (
            PCA(min(50, *points.shape), random_state=0).fit_transform(points)
            if points.shape[1] > 50
            else points
        )
        # scikit-learn needs a perplexity below the number of points
        perplexity = PERPLEXITY if len(points) > PERPLEXITY else max(1.0, (len(points) - 1) / 3)
        xy = TSNE(2, perplexity=perplexity, init='pca', random_state=0).fit_transform(reduced)
        lowered = (f', lowered from {PERPLEXITY} for {len(points)} embeddings'
                   if perplexity != PERPLEXITY else '')
        method = f't-SNE (perplexity {perplexity:.3g}{lowered}' + (
            f', on the first {reduced.shape[1]} principal components)'
            if reduced is not points
            else ')'
        )
    else:
        xy = PCA(2, random_state=0).fit_transform(points)
        method = (
            f'PCA (the first two principal components; t-SNE takes too long beyond {TSNE_LIMIT:,}'
            ' embeddings)'
        )
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(4.6, 4.6))
    colours = plt.get_cmap('tab20')(colour_index(labels))
    size = 16 if len(points) <= 1000 else 3 if len(points) <= 10000 else 0.5
    queries = len(found['labels'])
    axis.scatter(
        xy[:queries, 0], xy[:queries, 1], c=colours[:queries], s=size, marker='o', linewidths=0
    )
    if found['gallery']:
        axis.scatter(
            xy[queries:, 0], xy[queries:, 1], c=colours[queries:], s=size * 1.5, marker='+'
        )
    classes = np.unique(labels)
    if len(classes) <= 20:
        for label in classes:
            axis.scatter(
                [], [], color=plt.get_cmap('tab20')(colour_index(label)),
                label=found['names'][label], s=16
            )
        axis.legend(fontsize=7, loc='best', title='class', title_fontsize=7)
    axis.set(xticks=[], yticks=[])
    axis.set_title(method.split(' (')[0] + f' of {len(points):,} test embeddings', fontsize=9)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)
    return method


def colour_index(labels):
    """tab20's colour of each label: its ten strong hues for labels 0-9, then their pale twins, so
    that neighbouring labels never get a colour and its pale twin."""
    labels = labels % 20
    return 2 * (labels % 10) + labels // 10


# --------------------------------------------------------------------------------------------------
# the page: every string that goes into it is escaped

def page(found, data_base, data_base_path, statistics_csv, missing, method, curves):
    """The report's index.html: the run and its headline metrics, the classes it fails beside the
    pairs it confuses, the map beside the training curves, then the worst queries (the long part)
    last."""
    metrics, esc, epoch = found['metrics'], html.escape, data_base.epoch
    heading = {'map@r': 'MAP@R', 'r_precision': 'R-Precision', 'nmi': 'NMI', 'ami': 'AMI'}
    searched = (
        f'{len(found["labels"]):,} queries against a gallery of {len(found["item_labels"]):,}'
        ' images'
        if found['gallery']
        else f'{len(found["labels"]):,} test images, each a query against the others'
    )
    parts = [f'<h1>{esc(os.path.basename(data_base_path))}</h1>',
             f'<p>{esc(str(data_base.data_name))}, {esc(str(data_base.backbone_type))}, '
             f'{esc(str(data_base.loss_name))}, {esc(str(data_base.feature_dim))}-d, '
             f'epoch {esc(str(epoch))}: '
             f'{searched}, {len(np.unique(found["labels"])):,} classes.</p>']
    if missing:
        parts.append(f'<p class="missing">Missing: {esc("; ".join(missing))}.</p>')
    parts.append('<h2>Headline metrics</h2>')
    names = [heading.get(key, key.replace('recall', 'Recall').replace('precision', 'P')
                         .replace('map@', 'mAP@').replace('mrr', 'MRR')) for key in metrics]
    if found['reranked'] is None:
        parts.append(html_table(names, [[percent(value) for value in metrics.values()]]))
    else:  # the re-ranked figures in a row of their own, never in place of the plain ones
        method, params = found['rerank']
        reranked = found['reranked']
        parts.append(html_table(['lists', *names], [
            ['plain', *[percent(value) for value in metrics.values()]],
            [f're-ranked by {method}', *[percent(reranked.get(key, float('nan')))
                                         for key in metrics]]]))
        parts.append(f'<p>Re-ranked by {esc(method)} ({esc(rerank_settings(method, params))}); '
                     f'the classes, pairs and queries below are of the plain lists.</p>')
    parts.append(f'<p>{esc(statistics_sentence(metrics, statistics_csv, epoch))}</p>')
    parts.append(
        '<div'
        f' class="row"><div>{classes_section(found)}</div><div>{pairs_section(found)}</div></div>'
    )
    marks = ' Queries are dots, gallery images crosses.' if found['gallery'] else ''
    pictures = [f'<div><h2>Embedding map</h2><p>{esc(method)}, coloured by class (20 colours, '
                f'repeated beyond 20 classes).{marks}</p><img class="map" src="map.png" alt="2-D '
                f'map of the test embeddings"></div>']
    if curves:
        pictures.append('<div><h2>Training curves</h2><p>train.py\'s statistics figure of this '
                        'run.</p><img class="curves" src="statistics.png" alt="training '
                        'curves"></div>')
    parts.append(f'<div class="row">{"".join(pictures)}</div>')
    parts += worst_section(found)
    return PAGE.format(title=esc(os.path.basename(data_base_path)), body='\n'.join(parts))


def classes_section(found):
    """The per-class table, worst first, with the total of its image counts."""
    per = found['per_class']
    counts = ['queries', 'gallery_images'] if found['gallery'] else ['images']
    names = '' if found['named'] else (' The data set\'s index is not where the data base says, so '
                                       'classes are shown by their labels.')
    return (
        f'<h2>Classes, worst first</h2><p>{len(per):,} classes by MAP@R, then'
        f' Recall@1.{html.escape(names)} <a href="classes.csv">classes.csv</a></p><div'
        ' class="scroll">'
        + html_table(
            ['class', *[c.replace('_', ' ') for c in counts], 'Recall@1', 'MAP@R'],
            [
                [
                    row['class'],
                    *[f'{row[c]:,}' for c in counts],
                    percent(row['recall@1']),
                    percent(row['map@r']),
                ]
                for row in per.to_dict('records')
            ],
            total=['all', *[f'{per[c].sum():,}' for c in counts], '', ''],
        )
        + '</div>'
    )


def pairs_section(found):
    """The most confused class pairs, with their counts."""
    return (
        '<h2>Most confused classes</h2><p>How often images of the second class are among the'
        f' {found["k"]} nearest of the first class\'s queries, and their share of those nearest. <a'
        ' href="confused_pairs.csv">confused_pairs.csv</a></p>'
        + html_table(
            ['query class', 'retrieved class', 'count', 'share'],
            [
                [row['query_class'], row['retrieved_class'], row['count'], percent(row['share'])]
                for row in found['pairs'].to_dict('records')
            ],
        )
    )


def worst_section(found):
    """The worst queries: each with its picture, or its list of nearest when its images are missing."""
    esc, worst = html.escape, found['worst']
    parts = ['<h2>Worst queries</h2>',
             f'<p>The {len(worst)} queries of lowest AP@R, each with its {found["k"]} nearest '
             f'{"gallery images" if found["gallery"] else "test images"} (green border: same '
             f'class; red: another; above each, its rank and cosine similarity). <a '
             f'href="worst_queries.csv">worst_queries.csv</a></p>']
    for number, (query, drawn) in enumerate(zip(worst.to_dict('records'), found['drawn']), 1):
        caption = (f'{number}. {query["image"]}: class {query["class"]}, AP@R '
                   f'{percent(query["ap@r"])}, R-Precision {percent(query["r_precision"])}, '
                   f'nearest {"right" if query["hit@1"] else "wrong"}')
        parts.append(f'<div class="query"><p>{esc(caption)}</p>')
        if drawn:
            parts.append(
                f'<img class="wide" src="queries/{number}.png" alt="query {number} and its'
                ' nearest">'
            )
        else:
            label = found['labels'][query['position']]
            parts.append(
                html_table(
                    ['rank', 'image', 'class', 'similarity'],
                    [
                        [
                            rank,
                            found['item_images'][i],
                            found['names'][found['item_labels'][i]],
                            f'{similarity:.3f}',
                        ]
                        for rank, (i, similarity) in enumerate(query['neighbours'], 1)
                    ],
                    marks=[found['item_labels'][i] == label for i, _ in query['neighbours']],
                )
            )
        parts.append('</div>')
    return parts


def statistics_sentence(metrics, statistics_csv, epoch):
    """One sentence: whether train.py's statistics CSV holds the same figures for this epoch."""
    if not os.path.isfile(statistics_csv):
        return (
            f'Computed from the stored test features ({statistics_csv} is not there to compare'
            ' with).'
        )
    frame = pd.read_csv(statistics_csv, index_col='epoch')
    columns = [f'test_{key}' for key in metrics]
    if epoch not in frame.index or not set(columns) <= set(frame.columns):
        return (
            f'Computed from the stored test features; {statistics_csv} has no row for epoch {epoch}'
            ' to compare.'
        )
    same = np.allclose(
        frame.loc[epoch, columns].to_numpy(float), list(metrics.values()), rtol=1e-9, atol=0
    )
    return (f'Computed from the stored test features: '
            f'{"the same as" if same else "NOT the same as"} what train.py printed for epoch '
            f'{epoch} ({statistics_csv}).')


def rerank_settings(method, params):
    """The parameters a re-ranking method used, as test.py's flags name them."""
    flags = {'aqe_k': 'rerank_k', 'aqe_alpha': 'rerank_alpha', 'k1': 'rerank_k1',
             'k2': 'rerank_k2', 'lambda_value': 'rerank_lambda'}
    used = ('k1', 'k2', 'lambda_value') if method == 'kreciprocal' else ('aqe_k', 'aqe_alpha')
    return ', '.join(f'--{flags[key]} {params[key]:g}' for key in used)


def percent(value):
    """A fraction as train.py prints it (95.50%); a dash for NaN."""
    return '–' if value != value else f'{100 * value:.2f}%'


def html_table(header, rows, total=None, marks=None):
    """An HTML table of escaped cells; total is a last row, marks a right (True) or wrong (False) flag per row."""
    def cells(row, tag):
        return ''.join(f'<{tag}>{html.escape(str(cell))}</{tag}>' for cell in row)
    lines = [f'<table><thead><tr>{cells(header, "th")}</tr></thead><tbody>']
    for i, row in enumerate(rows):
        mark = '' if marks is None else f' class="{"right" if marks[i] else "wrong"}"'
        lines.append(f'<tr{mark}>{cells(row, "td")}</tr>')
    lines.append(
        '</tbody>' + (f'<tfoot><tr>{cells(total, "td")}</tr></tfoot>' if total else '') + '</table>'
    )
    return '\n'.join(lines)


PAGE = '''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{font-family: system-ui, sans-serif; max-width: 1240px; margin: 1.5em auto; padding: 0 1em; color: #222}}
h1 {{font-size: 1.4em; word-break: break-all}}
h2 {{font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ccc}}
table {{border-collapse: collapse; font-size: 0.9em}} th, td {{padding: 0.2em 0.7em; border-bottom: 1px solid #eee;
text-align: left}} th {{background: #f3f3f3; position: sticky; top: 0}} tfoot td {{font-weight: bold}}
tr.right td {{color: #070}} tr.wrong td {{color: #b00}}
.missing {{background: #fff4d6; padding: 0.5em}} .wide {{max-width: 100%}}
.row {{display: flex; flex-wrap: wrap; gap: 0 3em; align-items: flex-start}}
.row > div {{flex: 1 1 0; min-width: 22em}}
.map, .curves {{max-width: 100%}}
.query p {{margin: 0.8em 0 0.2em; font-size: 0.9em; word-break: break-all}}
.scroll {{max-height: 24em; overflow-y: auto}}
</style></head>
<body>
{body}
</body></html>
'''
