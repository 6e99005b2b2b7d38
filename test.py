"""Retrieve the images nearest to a query from a trained model's data base, or from a folder of photos; draw them."""
import argparse
import difflib
import hashlib
import math
import os

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.transforms.v2.functional import to_pil_image

import gallery
import rerank
from neighbours import same_class_cosines, top_k
from report import write_report
from runs import RESULTS_VARIABLE, DataBase, load_model, output_folder
from runtime import ArgumentParser, UserError, atomic_dir, pyplot, remove_temporaries, run_main
from utils import (CROP_TYPES, embed_files, image_files, one_of, prepared_name, read_image,
                   unreadable_line)

# correct, wrong, query label unknown
BORDER = {True: (0, 160, 0), False: (220, 0, 0), None: (128, 128, 128)}
RESULT_COLUMNS = ['rank', 'path', 'similarity', 'same_class']  # results.csv, one row per result
PER_ROW = 10  # results per row of retrieval.png: many results wrap into rows


def get_args_parser():
    """The command-line flags of test.py; the seed's names and defaults are the public interface."""
    parser = ArgumentParser(description='Show the images a trained model retrieves for a query',
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--query_img_name', default='/home/data/car/uncropped/008055.jpg', type=str, nargs='+',
                        help='query image name: test images of the data base, any image files, or '
                             'folders of them (every image below each); the model and data base '
                             'load once, and each query gets its own folder in the call\'s '
                             '--output_dir')
    parser.add_argument('--data_base', default='car_resnet50_proxy_anchor_512_20_data_base.pth', type=str,
                        help='queried database: a path, or a file name, a run name (its newest '
                             'epoch) or an unambiguous prefix of one, looked for in results/, '
                             f'the folders ${RESULTS_VARIABLE} lists and the repository\'s '
                             f'results/')
    parser.add_argument('--retrieval_num', default=8, type=int, help='retrieval number')
    parser.add_argument('--output_dir', default=None, type=str,
                        help='the folder each query\'s results go to, one folder per query, none '
                             'of them replaced; by default a new numbered folder per call, '
                             '<data base name>_queries/<n>/, in the results/ folder the data base '
                             'lies in')
    parser.add_argument('--data_path', default=None, type=str,
                        help="the folder that holds the data base's data set now, if it has moved "
                             "since training (the one holding <data_name>/); by default the data "
                             "base's own --data_path")
    parser.add_argument('--gallery', default=None, type=str,
                        help='a folder of your own images to search instead of the test set: every '
                             'image below it, embedded by the model saved beside the data base and '
                             'kept under results/')
    parser.add_argument('--index', default=None, choices=gallery.INDEXES,
                        help=f'how --gallery is searched: exact, a faiss index built once and '
                             f'saved beside the embeddings, or a Milvus collection kept in step with '
                             f'them (default: exact below {gallery.EXACT_BELOW:,} images, else '
                             f'ivfpq)')
    parser.add_argument('--milvus_uri', default=None, type=str,
                        help='where --index milvus keeps the collection: a file for an embedded '
                             'Milvus Lite, or a server such as http://host:19530 (default: '
                             'results/<model>_gallery_<folder hash>.milvus.db)')
    parser.add_argument('--report', action='store_true',
                        help='instead of one query, write an HTML report on the whole test set: '
                             'results/<data base name>_report/index.html')
    parser.add_argument('--report_queries', default=20, type=int, help='worst queries the report shows')
    rerank.add_arguments(parser, 'order the test set\'s (or its gallery\'s) nearest images by this '
                                 're-ranking, each still shown with its plain cosine to the query; '
                                 f'with --gallery, the {gallery.SHORTLIST} nearest photos are '
                                 f're-ordered; with --report, the re-ranked metrics are added in a '
                                 f'row of their own (results/<data base name>_report_<method>/)')
    return parser


def find_query(query, images, data_base=None):
    """Position of the query among images (by path, then by a file name no other image has; with
    the data base, also as the user's original photo a data base image was prepared from), or
    None."""
    copy = None if data_base is None else prepared_copy(query, data_base)
    if copy is not None and copy in images:
        return images.index(copy)
    if query in images:
        return images.index(query)
    resolved = [os.path.realpath(image) for image in images]
    if os.path.realpath(query) in resolved:
        return resolved.index(os.path.realpath(query))
    same_name = [i for i, image in enumerate(images) if os.path.basename(image) == os.path.basename(query)]
    return same_name[0] if len(same_name) == 1 and not os.path.isfile(query) else None


def prepared_copy(path, data_base):
    """The data base's prepared copy of a photo of its labelled folder
    (<data_name>/<class>/IMG.png -> <data_name>/<crop type>/<class>/IMG.png.jpg), or None for a
    file outside that folder."""
    if data_base.data_name is None:
        return None
    folder = os.path.join(data_base.root, data_base.data_name)
    real, top = os.path.realpath(path), os.path.realpath(folder)
    if real == top or os.path.commonpath([real, top]) != top:
        return None
    relative = os.path.relpath(real, top)
    if relative.split(os.sep)[0] in CROP_TYPES:
        return None
    return os.path.join(folder, data_base.crop_type, prepared_name(relative))


def original_photo(image, data_base):
    """The user's own photo a data base image was prepared from, where it is still there, else the
    image itself (the benchmarks' copies are named otherwise than their sources)."""
    if data_base.data_name is None:
        return image
    folder = os.path.join(data_base.root, data_base.data_name)
    relative = os.path.relpath(image, os.path.join(folder, data_base.crop_type))
    if relative.startswith(os.pardir):
        return image
    for source in ([relative[:-len('.jpg')]] if relative.endswith('.jpg') else []) + [relative]:
        if prepared_name(source) == relative and os.path.isfile(os.path.join(folder, source)):
            return os.path.join(folder, source)
    return image


def missing_query(query):
    """The UserError for a query file that does not exist, with the close names in its folder."""
    folder = os.path.dirname(query) or os.curdir
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    close = difflib.get_close_matches(os.path.basename(query), names, n=3, cutoff=0.6)
    close = [os.path.join(os.path.dirname(query), name) for name in close]
    hint = (f'did you mean {one_of(close)}?' if close
            else f'{folder} holds no file of a similar name' if os.path.isdir(folder)
            else f'there is no folder {folder}')
    return UserError(f'query image {query} does not exist ({hint}); pass an image file, a folder '
                     f'of them or a test image of the data base')


def embedding_device():
    """Where test.py embeds images: the GPU when there is one (a large --gallery), else the CPU."""
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def query_files(names):
    """The queries --query_img_name names: each image as given, each folder as every image below it (sorted)."""
    queries = []
    for name in [names] if isinstance(names, str) else names:
        if os.path.isdir(name):
            images = image_files(name)[0]
            if not images:
                raise UserError(f'--query_img_name {name} is a folder without any image (any '
                                f'format PIL reads, searched in all its folders); name images or a '
                                f'folder of them')
            queries += images
        else:  # a file, or a data base image named by its file name alone
            queries.append(name)
    return queries


def embed_query(query, data_base, model):
    """The embedding (D,) of an image that is not in the data base by the model saved beside it, at
    the run's image size, or None where PIL cannot read the file."""
    if not os.path.isfile(query):
        raise missing_query(query)
    features, unreadable = embed_files(model, [query], data_base.image_size)
    return None if unreadable else features[0]  # (D,)


def gallery_store_path(folder, model_path, results):
    """<results>/<model>_gallery_<folder hash>/: one store per model file and folder."""
    digest = hashlib.sha1(os.path.realpath(folder).encode()).hexdigest()[:12]
    stem = os.path.basename(model_path)[:-len('.pth')]
    return os.path.join(results, f'{stem}_gallery_{digest}')


def gallery_images(folder):
    """Absolute paths of every image below folder (any format PIL reads), sorted."""
    if not os.path.isdir(folder):
        raise UserError(f'--gallery {folder} is not a folder; point it at a folder of images')
    paths = [os.path.abspath(path) for path in image_files(folder)[0]]
    if not paths:
        raise UserError(f'--gallery {folder} holds no image (any format PIL reads, searched in all '
                        f'its folders); point it at a folder of images')
    return paths


def search_gallery(args, queries, data_base, data_base_path):
    """Each query's (path, None, [(rank, path, cosine, None)] of its nearest images below --gallery,
    or None for a file PIL cannot read): the folder's store brought up to date first (gallery.py),
    then searched exactly or through --index."""
    images = gallery_images(args.gallery)
    model, model_path = load_model(data_base, data_base_path, embedding_device())
    # a mistyped query is reported now, not after the whole gallery has been embedded
    found = [(query, find_query(query, images),
              find_query(query, data_base.test.images, data_base)) for query in queries]
    for query, inside, known in found:
        if inside is None and known is None and not os.path.isfile(query):
            raise missing_query(query)
    path = gallery_store_path(args.gallery, model_path, output_folder(data_base_path))
    if os.path.isfile(f'{path}.pth'):
        print(f'{path}.pth is a gallery cache of an older version, no longer read; delete it')
    with gallery.open_store(path, model_path, model.embedding.out_features) as store:
        store.update(args.gallery, images, model, data_base.image_size)
        kind = args.index or gallery.default_index(int(store.live.sum()))
        index = kind if kind == 'exact' else gallery.open_index(store, kind, args.milvus_uri)
        for query, inside, known in found:
            row = None if inside is None else store.row(images[inside])
            # a photo of the folder: its stored embedding, and not its own result
            if row is not None:
                query_path, query_feature = images[inside], store.block(row, row + 1)[0]
            elif known is not None:  # a test image of the data base
                query_path = data_base.test.images[known]
                query_feature = data_base.test.features[known]
            else:
                query_path, query_feature = query, embed_query(query, data_base, model)
            if query_feature is None:  # no image PIL reads: main names it with the others skipped
                yield query_path, None, None
                continue
            if query_feature.size(0) != store.dim:
                raise UserError(f'the model embeds in {store.dim} dimensions but data base '
                                f'{data_base_path} holds {query_feature.size(0)}-d features; use '
                                f'the pair train.py wrote together')
            if store.live.sum() <= (row is not None):
                raise UserError(f'--gallery {args.gallery} holds no readable image other than the '
                                f'query; add images to search')
            results = store.search(query_feature, args.retrieval_num, exclude=row, index=index,
                                   rerank=(args.rerank, rerank.params(args)) if args.rerank else None)
            yield query_path, None, [(rank, result, similarity, None)
                                     for rank, (result, similarity) in enumerate(results, 1)]


def output_name(query_path, data_base, queries=()):
    """The query's folder name under results/: its file name without extension, as in the seed.
    Where the data base (or another of this run's queries) holds other images of that name
    (In-shop's 01_1_front.jpg is in almost every item's folder), the names of the folders above it
    come first, as many as make it unique: id_00000002_01_1_front."""
    parts = os.path.normpath(os.path.splitext(query_path)[0]).split(os.sep)
    paths = [path for split in (data_base.test, data_base.gallery, data_base.train)
             if split is not None for path in split.images] + list(queries)
    others = {os.path.normpath(os.path.splitext(path)[0]) for path in paths}
    others -= {os.path.normpath(os.path.splitext(query_path)[0])}
    for depth in range(1, len(parts) + 1):
        tail = parts[-depth:]
        if not any(other.split(os.sep)[-depth:] == tail for other in others):
            return '_'.join(part for part in tail if part not in ('', '.', '..'))
    return '_'.join(part for part in parts if part not in ('', '.', '..'))


def framed(path, correct=None, border=True):
    """The image at `path` as 224 x 224 RGB; results get a border: green if correct, red if wrong, else grey."""
    image = to_pil_image(read_image(path)).resize((224, 224), Image.BILINEAR)
    if border:
        ImageDraw.Draw(image).rectangle((0, 0, 223, 223), outline=BORDER[correct], width=5)
    return image


def draw_row(query_image, results, path):
    """The query, then its results in rows of up to PER_ROW: the figure the README shows (one row
    for up to PER_ROW results)."""
    plt = pyplot()
    columns, rows = min(len(results), PER_ROW) + 1, math.ceil(len(results) / PER_ROW)
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 2.0 * rows), squeeze=False)
    axes[0, 0].imshow(query_image)
    axes[0, 0].set_title('query', fontsize=9)
    cells = [axis for row in axes for axis in row[1:]]  # the first column holds only the query
    for axis, (image, rank, similarity, _) in zip(cells, results):
        axis.imshow(image)
        axis.set_title(f'#{rank}  {similarity:.3f}', fontsize=9)
    for axis in axes.flat:
        axis.axis('off')
    figure.tight_layout()
    figure.savefig(path, format='png', dpi=120)
    plt.close(figure)


def search_data_base(args, queries, data_base, data_base_path):
    """Each query's (path, its label or None, [(rank, path, cosine, same class or None)] of its
    nearest images, or None for a file PIL cannot read) in the test set, or in the gallery of a data
    set evaluated queries against a gallery (In-shop)."""
    images, labels, features = data_base.searched
    test = data_base.test
    model = None
    for query in queries:
        index = find_query(query, images, data_base)
        # searching a gallery, the query may still be a test image, such as an In-shop query: its
        # embedding is stored
        known = (None if index is not None or data_base.gallery is None
                 else find_query(query, test.images, data_base))
        if index is not None:
            query_feature, query_path, query_label = features[index], images[index], labels[index].item()
        elif known is not None:
            query_feature, query_path = test.features[known], test.images[known]
            query_label = test.labels[known].item()
        else:
            # loaded once, for the first query outside the data base
            if model is None and os.path.isfile(query):
                model = load_model(data_base, data_base_path, embedding_device())[0]
            query_feature, query_label, query_path = embed_query(query, data_base, model), None, query
            if query_feature is None:  # no image PIL reads: main names it with the others skipped
                yield query_path, None, None
                continue
        if query_feature.size(0) != features.size(1):
            raise UserError(f'the model embeds in {query_feature.size(0)} dimensions but data base '
                            f'{data_base_path} holds {features.size(1)}-d features; use the pair '
                            f'train.py wrote together')
        # a query of the searched split is not its own result
        leave_out = -1 if index is None else index
        if args.rerank:  # re-ranked, each result shown with its plain cosine to the query
            positions = rerank.reranked_lists(args.rerank, query_feature[None], features.float(),
                                              args.retrieval_num, leave_out,
                                              **rerank.params(args))  # (1, k)
            similarities = F.cosine_similarity(query_feature[None].float(),
                                               features[positions[0]].float())[None]  # (1, k)
        else:
            similarities, positions = top_k(query_feature[None], features.float(),
                                            args.retrieval_num, leave_out)  # (1, k), (1, k)
        found = zip(similarities[0].tolist(), positions[0].tolist())
        yield query_path, query_label, [
            (rank, images[position], similarity,
             None if query_label is None else labels[position].item() == query_label)
            for rank, (similarity, position) in enumerate(found, 1)]


def main():
    """Find each query's nearest neighbours and write them into this call's folder."""
    args = get_args_parser().parse_args()
    if args.retrieval_num < 1:
        raise UserError(f'--retrieval_num must be at least 1, not {args.retrieval_num}')
    rerank.params(args)  # its flags' ranges, checked before anything loads
    data_base, data_base_path = DataBase.open(args.data_base, args.data_path)
    if args.report:  # the whole test set instead of one query
        return write_report(args, data_base, data_base_path, framed, draw_row)
    queries = query_files(args.query_img_name)
    others = queries if len(queries) > 1 else ()
    if args.output_dir is not None:  # refused before anything is searched or written
        for query in queries:
            refuse_earlier_result(os.path.join(args.output_dir,
                                               output_name(query, data_base, others)))
    if args.gallery is not None:  # a folder of photos without labels
        searches = search_gallery(args, queries, data_base, data_base_path)
    # the test set, or the gallery of a data set evaluated queries against a gallery (In-shop)
    else:
        data_base.check_images_exist(data_base_path, args.data_path)
        searches = search_data_base(args, queries, data_base, data_base_path)
    skipped, folder, written = [], args.output_dir, 0
    for query_path, query_label, ranked in searches:
        if ranked is None:
            skipped.append(query_path)
            continue
        if folder is None:  # made for the first result: a call that writes nothing makes none
            folder = new_call_folder(data_base_path)
        if not written:  # said once, before the first results
            typical_similarity(data_base)
            if args.rerank:
                among = (f'the {gallery.SHORTLIST} nearest photos' if args.gallery is not None
                         else 'the nearest images')
                print(f'{among} re-ranked by {args.rerank}: each keeps its plain cosine to the '
                      f'query, so the similarities need not fall down the list')
            if len(ranked) < args.retrieval_num:
                print(f'--retrieval_num {args.retrieval_num} is more than the {len(ranked)} images '
                      f'there are to search (besides the query), so all {len(ranked)} are shown')
        name = output_name(query_path, data_base, others)
        refuse_earlier_result(os.path.join(folder, name))
        write_results(query_path, ranked, os.path.join(folder, name))
        # printed as the user's own photos where the data base's images are copies of them
        print_results(original_photo(query_path, data_base),
                      [(rank, original_photo(path, data_base), *rest)
                       for rank, path, *rest in ranked])
        hits = sum(correct is True for *_, correct in ranked)
        summary = f', {hits} of the same class' if query_label is not None else ''
        searched = f' in {args.gallery}' if args.gallery is not None else ''
        written += 1
        print(f'wrote the query and its {len(ranked)} nearest images{searched}{summary} to '
              f'{os.path.join(folder, name)}/', flush=True)
    if skipped and len(skipped) == len(queries):
        raise UserError(f'no query could be read: {", ".join(skipped)} (missing, truncated or not '
                        f'an image); pass image files')
    if skipped:
        print(unreadable_line(skipped, 'query image'))


def refuse_earlier_result(path):
    """A UserError if a query's folder `path` exists: an earlier result is never replaced."""
    if os.path.exists(path):
        raise UserError(f'{path} holds an earlier result, which test.py never replaces; pass '
                        f'another --output_dir, or leave it out for a new folder')


def new_call_folder(data_base_path):
    """A new folder for this call's queries, <results>/<data base name>_queries/<n>/ with n one
    above the highest so far: made here, so two calls at once never share one."""
    name = os.path.basename(data_base_path)
    for ending in ('_data_base.pth', '.pth'):
        name = name[:-len(ending)] if name.endswith(ending) else name
    parent = os.path.join(output_folder(data_base_path), f'{name}_queries')
    os.makedirs(parent, exist_ok=True)
    number = 1 + max((int(entry) for entry in os.listdir(parent) if entry.isdigit()), default=0)
    while True:
        try:
            os.mkdir(os.path.join(parent, str(number)))
            return os.path.join(parent, str(number))
        except FileExistsError:  # another call took it first
            number += 1


def typical_similarity(data_base):
    """Print the similarity the test set's own same-class pairs reach (median and quartiles), so
    that a result can be told from a nearest stranger of another class."""
    test = data_base.test
    cosines = same_class_cosines(test.features, test.labels).numpy()  # (P,)
    if len(cosines):
        low, median, high = np.quantile(cosines, [0.25, 0.5, 0.75])
        print(f'same-class pairs of the data base\'s test set reach a similarity of {median:.3f} '
              f'(median; half lie between {low:.3f} and {high:.3f}): a result well below that is '
              f'likely of another class than the query')


def write_results(query_path, ranked, path):
    """The folder `path`: the query, each result framed and named by its rank and similarity, the
    row of them all (retrieval.png) and results.csv, written whole. ranked: [(rank, path,
    similarity, same class or None)]."""
    results = [(framed(image, correct), rank, similarity, correct)
               for rank, image, similarity, correct in ranked]
    # left by a run killed while writing this query's folder
    remove_temporaries(os.path.dirname(path), f'{os.path.basename(path)}.')
    with atomic_dir(path) as folder:
        query_image = framed(query_path, border=False)
        query_image.save(os.path.join(folder, 'query_img.jpg'))
        for image, rank, similarity, _ in results:
            image.save(os.path.join(folder, f'retrieval_img_{rank}_{similarity:.4f}.jpg'))
        draw_row(query_image, results, os.path.join(folder, 'retrieval.png'))
        # same_class is empty where the query's class is unknown (a photo of your own, a gallery
        # without labels)
        pd.DataFrame(ranked, columns=RESULT_COLUMNS).to_csv(os.path.join(folder, 'results.csv'), index=False)


def print_results(query_path, ranked):
    """The ranked results as a table: rank, similarity, whether the class is the query's (when known), path."""
    print(f'{query_path}:')
    print(f'{"rank":>6}  {"similarity":>10}  {"same class":<10}  path')
    for rank, path, similarity, correct in ranked:
        same = '' if correct is None else 'yes' if correct else 'no'
        print(f'{rank:>6}  {similarity:>10.4f}  {same:<10}  {path}')


if __name__ == '__main__':
    run_main(main)
