"""Prepare a data set: RGB copies of every image and a train/test (or query/gallery) index.

The benchmarks CARS196, CUB-200-2011, Stanford Online Products and In-shop Clothes are read from
their annotation files; any other folder under --data_path is read as labelled images, one folder
per class.
"""
import argparse
import multiprocessing
import os
from collections import defaultdict

import numpy as np
from PIL import Image
from tqdm import tqdm

from runtime import (
    ArgumentParser,
    UserError,
    atomic_path,
    atomic_save,
    remove_temporaries,
    run_main,
)
from utils import (BOXED, CROP_TYPES, DATA_NAMES, UNREADABLE, check_data_name, folder_name,
                   image_extensions, image_files, index_path, load_index, one_of, prepared_name,
                   rgb)

# what each data set's download looks like once extracted, and where to get it
LAYOUTS = {
    'car': (
        'car_ims/*.jpg and cars_annos.mat',
        (
            'https://ai.stanford.edu/~jkrause/cars/car_dataset.html '
            '(the original links are dead; mirrors of car_ims.tgz and cars_annos.mat exist)'
        ),
    ),
    'cub': (
        (
            'the extracted CUB_200_2011 folder renamed to cub: images/, images.txt,'
            ' image_class_labels.txt, bounding_boxes.txt'
        ),
        'https://www.vision.caltech.edu/datasets/cub_200_2011/',
    ),
    'sop': (
        (
            'the extracted Stanford_Online_Products folder renamed to sop: Ebay_train.txt,'
            ' Ebay_test.txt and the *_final/ image folders'
        ),
        'https://cvgl.stanford.edu/projects/lifted_struct/',
    ),
    'inshop': (
        'Eval/list_eval_partition.txt and the images of Img/img.zip extracted as Img/img/ or img/',
        'https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html',
    ),
}
SPLITS = ('train', 'test', 'query', 'gallery')  # in the order the index lists them
# the split folders a labelled folder may hold
FOLDER_SPLITS = (('train', 'test'), ('train', 'query', 'gallery'))
# what PP writes into the folder it runs in: never a class, even when a script ran in the photo
# folder itself
OUTPUTS = 'results'
FOLDER_LAYOUT = (
    '<class>/<images> (or train/<class>/... beside test/<class>/..., or query/ and gallery/)'
)


def layout_error(root, data_name, missing):
    """A UserError naming what is missing, the layout expected and where to download it."""
    layout, url = LAYOUTS[data_name]
    return UserError(f'{missing} is missing, so {root} is not a complete {data_name} data set; it '
                     f'must hold {layout} (download from {url})')


def inside(root, relative, source):
    """Join an annotation's relative path to root, refusing paths that leave the data folder."""
    path = os.path.normpath(os.path.join(root, relative))
    if os.path.isabs(relative) or os.path.commonpath(
        [os.path.abspath(root), os.path.abspath(path)]
    ) != os.path.abspath(root):
        raise UserError(f'{source} names {relative!r}, which lies outside {root}; the annotation '
                        f'file is not the official one, so download it again')
    return path


def read_text_table(path, columns, root, data_name, header_lines=0, what=None):
    """(header lines, rows) of a whitespace-separated annotation file, each line split into fields;
    every row has exactly `columns` fields (a malformed row is said as `what` they should be, if
    given)."""
    if not os.path.isfile(path):
        raise layout_error(root, data_name, path)
    with open(path, encoding='utf-8', errors='replace') as file:
        lines = [line.split() for line in file.read().splitlines() if line.strip()]
    if len(lines) < header_lines:
        raise UserError(
            f'{path} is malformed: it must start with {header_lines} header lines; download it'
            ' again'
        )
    for number, fields in enumerate(lines[header_lines:], header_lines + 1):
        if len(fields) != columns:
            raise UserError(f'{path} is malformed at line {number} (expected '
                            f'{what or f"{columns} fields"}, found {len(fields)}); download the '
                            f'data set again')
    return lines[:header_lines], lines[header_lines:]


def to_number(text, path, kind=int):
    """int(text) or float(text), with a UserError naming the file when it is not a number."""
    try:
        return kind(text)
    except ValueError:
        raise UserError(
            f'{path} is malformed: {text!r} is not a number; download the data set again'
        ) from None


def read_car(root):
    """CARS196: [(source path, class id, (x1, y1, x2, y2))] from cars_annos.mat; the split is by class."""
    from scipy.io import loadmat
    path = os.path.join(root, 'cars_annos.mat')
    if not os.path.isfile(path):
        raise layout_error(root, 'car', path)
    try:
        annotations = loadmat(path)['annotations'][0]
        entries = [(inside(root, str(a['relative_im_path'][0]), path), int(a['class'][0][0]),
                    tuple(float(a[f][0][0]) for f in ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2')))
                   for a in annotations]
    except UserError:
        raise
    except Exception as error:  # scipy raises many kinds of errors on a damaged file
        raise UserError(
            f'{path} is truncated or malformed ({type(error).__name__}: {error}); download it again'
        ) from None
    return entries


def read_cub(root):
    """CUB-200-2011: [(source path, class id, (x1, y1, x2, y2))] from its text files; the split is by class."""
    def table(name, columns):
        path = os.path.join(root, name)
        return path, read_text_table(path, columns, root, 'cub')[1]

    images_path, images = table('images.txt', 2)
    labels_path, labels = table('image_class_labels.txt', 2)
    boxes_path, boxes = table('bounding_boxes.txt', 5)
    labels = {fields[0]: to_number(fields[1], labels_path) for fields in labels}
    boxes = {fields[0]: [to_number(v, boxes_path, float) for v in fields[1:]] for fields in boxes}
    entries = []
    for image_id, relative in images:
        if image_id not in labels or image_id not in boxes:
            raise UserError(f'image {image_id} of {images_path} has no line in '
                            f'{labels_path if image_id not in labels else boxes_path}; download '
                            f'the data set again')
        x, y, width, height = boxes[image_id]
        entries.append(
            (
                inside(root, os.path.join('images', relative), images_path),
                labels[image_id],
                (x, y, x + width, y + height),
            )
        )
    return entries


def read_sop(root):
    """Stanford Online Products: ([(source path, class id, None)], set of test class ids) from the Ebay files."""
    entries, test_classes = [], set()
    for split in ('train', 'test'):
        path = os.path.join(root, f'Ebay_{split}.txt')
        for _, class_id, _, relative in read_text_table(path, 4, root, 'sop', header_lines=1)[1]:
            class_id = to_number(class_id, path)
            entries.append((inside(root, relative, path), class_id, None))
            if split == 'test':
                test_classes.add(class_id)
    return entries, test_classes


def read_annotations(root, data_name):
    """Every image of a raw data set as (source path, class id, box or None), and the set of test class ids."""
    if not os.path.isdir(root):
        raise layout_error(root, data_name, f'the folder {root}')
    if data_name == 'sop':
        entries, test_classes = read_sop(root)
    else:
        entries = read_car(root) if data_name == 'car' else read_cub(root)
        classes = sorted({class_id for _, class_id, _ in entries})
        # the first half of the classes trains and the second half tests: 1-98 / 99-196 and 1-100 /
        # 101-200
        test_classes = set(classes[len(classes) // 2:])
    check_sources([source for source, _, _ in entries], root, data_name)
    names = defaultdict(list)
    for source, _, _ in entries:
        names[os.path.basename(source)].append(source)
    clashes = [paths for paths in names.values() if len(paths) > 1]
    if clashes:
        raise UserError(f'{clashes[0][0]} and {clashes[0][1]} share a file name, which the '
                        f'prepared layout keeps flat; rename one of them')
    return entries, test_classes


def check_sources(sources, root, data_name):
    """A UserError unless every image the annotations name exists."""
    missing = [source for source in sources if not os.path.isfile(source)]
    if missing:
        raise UserError(f'{len(missing)} of the {len(sources)} images the annotations name do not '
                        f'exist, such as {missing[0]}; extract the whole {data_name} download into '
                        f'{root}')


def read_inshop(root):
    """In-shop Clothes: [(source, prepared name, item id, None, split)] from
    Eval/list_eval_partition.txt.

    The file holds a count line, a header line, then `image_name item_id evaluation_status` rows.
    Image names repeat across items (01_1_front.jpg), so the prepared images keep their relative
    paths.
    """
    path = os.path.join(root, 'Eval', 'list_eval_partition.txt')
    statuses = ('train', 'query', 'gallery')
    what = f'an image name, an item id and {one_of(statuses)}'
    (count_line, _), rows = read_text_table(path, 3, root, 'inshop', header_lines=2, what=what)
    if len(count_line) != 1:
        raise UserError(
            f'{path} is malformed: it must start with a count line and a header line; download it'
            ' again'
        )
    count = to_number(count_line[0], path)
    if count != len(rows):
        raise UserError(f'{path} is malformed: its first line counts {count} images but '
                        f'{len(rows)} rows follow; download it again')
    # Img/img.zip extracts to img/; kept inside Img/ or moved up beside Eval/
    images = os.path.join(root, 'Img') if os.path.isdir(os.path.join(root, 'Img', 'img')) else root
    entries = []
    for number, (relative, item, split) in enumerate(rows, 3):
        if split not in statuses:
            raise UserError(
                f'{path} is malformed at line {number} (expected {what}); download it again'
            )
        source = inside(images, relative, path)
        entries.append((source, os.path.relpath(source, images), item, None, split))
    check_sources([source for source, *_ in entries], root, 'inshop')
    return entries


def folder_error(root, what):
    """A UserError saying what is wrong with a labelled image folder and the layouts it may have."""
    return UserError(f'{what}; a labelled image folder holds {os.path.join(root, FOLDER_LAYOUT)}')


def own_entries(folder):
    """The names in folder, without hidden ones and what PP writes: prepared copies, their indices
    and the results/ folder of a script run there."""
    return [
        name
        for name in sorted(os.listdir(folder))
        if not name.startswith('.')
        and name not in (*CROP_TYPES, OUTPUTS)
        and not name.endswith('_data_dicts.pth')
    ]


def loose_files(folder, names, skipped):
    """Count the files `names` of folder, which lie beside its class folders, as skipped; returns the images."""
    extensions = image_extensions()
    images = [
        os.path.join(folder, name)
        for name in names
        if os.path.splitext(name)[1].lower() in extensions
    ]
    skipped['that PIL does not read as an image'] += [os.path.join(folder, name) for name in names
                                                      if os.path.join(folder, name) not in images]
    skipped['outside any class folder'] += images
    return images


def class_images(folder, root, skipped):
    """{class name: its images} of the class folders in `folder` (images may sit in nested folders
    below them).

    Other files are counted in `skipped`; a class folder without any image is no class.
    """
    classes, loose = {}, []
    for name in own_entries(folder):
        if os.path.isdir(os.path.join(folder, name)):
            classes[name], others = image_files(os.path.join(folder, name))
            skipped['that PIL does not read as an image'] += others
        else:
            loose.append(name)
    images = loose_files(folder, loose, skipped)
    classes = {name: paths for name, paths in classes.items() if paths}
    if not classes:
        raise folder_error(
            root, f'{folder} holds {"images but no class folders" if images else "no images"}'
        )
    return classes


def read_folder(root, data_name):
    """A labelled image folder: [(source, prepared name, class name, None, split)].

    Either one folder per class, sorted by name and split in halves as the benchmarks are (the first
    half trains, the second half tests on unseen classes), or split folders train/ with test/ (or
    query/ and gallery/) holding the class folders, used as they are. Prepared images keep their
    paths relative to root (names repeat across classes); a format other than JPEG gets .jpg
    appended, as the prepared copies are JPEGs.
    """
    if not os.path.isdir(root):
        raise folder_error(root, f'there is no folder {root}: put your images there, or name one '
                                 f'of the benchmarks {one_of(DATA_NAMES)}')
    entries = own_entries(root)
    folders = {name for name in entries if os.path.isdir(os.path.join(root, name))}
    skipped = defaultdict(list)
    for parent in [root] + [os.path.join(root, name) for name in sorted(folders & set(SPLITS))]:
        if os.path.isdir(os.path.join(parent, OUTPUTS)):
            print(f'{data_name}: {os.path.join(parent, OUTPUTS)}/ holds what PP scripts write, '
                  f'so it is no class')
    if folders and folders <= set(SPLITS):
        layout = next((splits for splits in FOLDER_SPLITS if folders == set(splits)), None)
        if layout is None:
            raise folder_error(root, f'{root} holds the split folders '
                                     f'{", ".join(sorted(folders))}, which are neither train/ and '
                                     f'test/ nor train/, query/ and gallery/')
        loose_files(root, [name for name in entries if name not in folders], skipped)
        splits = {split: class_images(os.path.join(root, split), root, skipped) for split in layout}
        for split, classes in splits.items():
            if len(classes) < 2:
                raise folder_error(root, f'{os.path.join(root, split)} holds one class, but each '
                                         f'side of the split needs at least two')
    else:
        classes = class_images(root, root, skipped)
        names = sorted(classes)
        half = len(names) // 2
        if half < 2:
            raise folder_error(root, f'{root} holds {len(names)} class '
                                     f'folder{"s" * (len(names) > 1)} with images, and split in '
                                     f'halves that leaves fewer than two classes on one side: it '
                                     f'needs at least four')
        splits = {'train': {name: classes[name] for name in names[:half]},
                  'test': {name: classes[name] for name in names[half:]}}
    counts = [f'{len(paths)} file{"s" * (len(paths) > 1)} {why} (such as {paths[0]})'
              for why, paths in skipped.items() if paths]
    if counts:
        print(f'{data_name}: skipped {" and ".join(counts)}')
    return [
        (
            source,
            prepared_name(os.path.relpath(source, root)),
            class_name,
            None,
            split,
        )
        for split, classes in splits.items()
        for class_name, sources in classes.items()
        for source in sources
    ]


def read_data_set(root, data_name):
    """Every image of a raw data set as (source path, prepared name, class, box or None, split)."""
    if data_name == 'inshop':
        return read_inshop(root)
    if data_name not in LAYOUTS:
        return read_folder(root, data_name)
    entries, test_classes = read_annotations(root, data_name)
    # CARS, CUB and SOP keep the seed's flat names (read_annotations checked that they are unique)
    return [
        (
            source,
            os.path.basename(source),
            class_id,
            box,
            'test' if class_id in test_classes else 'train',
        )
        for source, class_id, box in entries
    ]


def is_current(task):
    """Whether a task's copy is up to date. A copy takes its source's modification time, so a copy
    whose time differs is stale: the photo was edited (or replaced) after it was prepared. Copies
    are written atomically, so an existing one is complete."""
    source, target, _ = task
    try:
        return os.stat(target).st_mtime_ns == os.stat(source).st_mtime_ns
    except OSError:  # no copy yet (or the source is gone: convert says so)
        return False


def convert(task):
    """Write one image as RGB (utils.rgb: the pixels every script reads), cropped to its box if
    given, with its source's modification time; returns (what happened: 'written', 'updated' or
    'failed', an error text or None)."""
    source, target, box = task
    try:
        source_time = os.stat(source).st_mtime_ns
        existed = os.path.exists(target)
        with Image.open(source) as image:
            image = rgb(image)
            if box is not None:
                image = image.crop(tuple(int(round(v)) for v in box))
            with atomic_path(target) as tmp:
                image.save(tmp, format='JPEG')
                os.utime(tmp, ns=(source_time, source_time))
    except UNREADABLE as error:
        return 'failed', f'{source}: {error}'
    return 'updated' if existed else 'written', None


def remove_stale(folder, targets):
    """Delete the files below a prepared folder that are no copy of a current source (their photo
    was deleted or renamed), and the folders that leaves empty; returns how many files went."""
    removed = 0
    for parent, _, files in os.walk(folder, topdown=False):
        for name in files:
            if os.path.join(parent, name) not in targets:
                os.remove(os.path.join(parent, name))
                removed += 1
        if parent != folder and not os.listdir(parent):
            os.rmdir(parent)
    return removed


def prepare(data_path, data_name, crop_types=('uncropped',), workers=None):
    """Convert one raw data set into <data_path>/<data_name>/<crop type>/ and write its train/test index."""
    root = os.path.join(data_path, data_name)
    entries = read_data_set(root, data_name)
    if 'cropped' in crop_types and all(box is None for _, _, _, box, _ in entries):
        print(f'cropped images exist only for {" and ".join(BOXED)} (their bounding boxes), so '
              f'only the uncropped images of {data_name} are written')
        crop_types = ('uncropped',)
    for crop_type in crop_types:
        folder = os.path.join(root, crop_type)
        os.makedirs(folder, exist_ok=True)
        # a run killed mid-write leaves temporary files; its finished images are kept and skipped
        # below
        for parent in [parent for parent, _, _ in os.walk(folder)]:
            remove_temporaries(parent)
        remove_temporaries(root, f'{crop_type}_data_dicts.pth.')
        tasks = [(source, os.path.join(folder, name), box if crop_type == 'cropped' else None)
                 for source, name, _, box, _ in entries]
        # only the copies to write go through the bar: its images/s are those of real work
        stale = [task for task in tasks if not is_current(task)]
        if len(stale) < len(tasks):
            print(f'{data_name} {crop_type}: {len(tasks) - len(stale)} of {len(tasks)} copies are '
                  f'up to date')
        outcomes = []
        if stale:
            with multiprocessing.Pool(workers or os.cpu_count()) as pool:
                outcomes = list(tqdm(pool.imap(convert, stale, chunksize=16), total=len(stale),
                                     desc=f'{data_name} {crop_type}', unit='img',
                                     dynamic_ncols=True))
        errors = [error for _, error in outcomes if error is not None]
        if errors:
            listing = '\n'.join(f'  {error}' for error in errors)
            print(f'{len(errors)} unreadable images:\n{listing}')
            raise UserError(f'{len(errors)} images of {data_name} could not be read (listed '
                            f'above); replace them with good copies from the download and run '
                            f'data_utils.py again')
        updated = sum(outcome == 'updated' for outcome, _ in outcomes)
        removed = remove_stale(folder, {target for _, target, _ in tasks})
        if updated or removed:
            print(f'{data_name} {crop_type}: wrote {updated} copies anew (their photos changed '
                  f'since they were prepared) and removed {removed} (their photos are gone)')
        index = {
            split: defaultdict(list)
            for split in SPLITS
            if any(entry[4] == split for entry in entries)
        }
        for _, name, class_id, _, split in entries:
            index[split][class_id].append(f'{crop_type}/{name}')
        index = {split: dict(classes) for split, classes in index.items()}
        path = index_path(data_path, data_name, crop_type)
        earlier = load_index(data_path, data_name, crop_type) if os.path.isfile(path) else None
        atomic_save(index, path)
        print(f'{data_name} {crop_type}: ' + ', '.join(
            f'{len(classes)} classes / {sum(map(len, classes.values()))} images {split}'
            for split, classes in index.items()))
        if crop_type == crop_types[0]:
            print_classes(index, earlier)


def print_classes(index, earlier=None):
    """Say which classes each split holds (up to 12 by name, else the count and the first and last
    names) and, re-preparing, which classes are new or gone since the earlier index."""
    for split, classes in index.items():
        names = [str(name) for name in sorted(classes)]
        shown = ', '.join(names) if len(names) <= 12 else \
            f'{", ".join(names[:3])}, ..., {", ".join(names[-3:])}'
        print(f'  {split} classes ({len(names)}): {shown}')
    if earlier is None:
        return
    for split, classes in index.items():
        before = set(earlier.get(split, {}))
        for change, names in (('new', set(classes) - before), ('gone', before - set(classes))):
            if names and before:
                print(f'  {split} classes {change} since the last preparation: '
                      f'{", ".join(map(str, sorted(names)))}')


def make_demo(data_path, per_class=40):
    """Write scikit-learn's handwritten digits as a labelled image folder <data_path>/digits/<digit>/: a demo."""
    from sklearn.datasets import load_digits
    root = os.path.join(data_path, 'digits')
    if os.path.exists(root):  # the user's folder, or a demo written before: never written over
        print(f'{root} exists, so no demo is written into it')
        return
    digits = load_digits()
    for digit in range(10):
        folder = os.path.join(root, str(digit))
        os.makedirs(folder, exist_ok=True)
        for k, pixels in enumerate(digits.images[digits.target == digit][:per_class]):
            # 8x8 grey levels 0-16 -> a 64x64 grayscale JPEG
            image = Image.fromarray(np.uint8(pixels * 255 / 16)).resize((64, 64), Image.BILINEAR)
            with atomic_path(os.path.join(folder, f'digit_{digit}_{k:04d}.jpg')) as tmp:
                image.save(tmp, format='JPEG', quality=95)
    print(
        f'wrote {10 * per_class} handwritten digits, {per_class} of each, as {root}/<digit>/<image>'
    )


def get_args_parser():
    """The command-line flags of data_utils.py."""
    parser = ArgumentParser(description='Prepare the data sets: RGB copies and a train/test index',
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--data_path', default='/home/data', type=str, help='datasets path')
    parser.add_argument('--data_name', default=None, type=folder_name,
                        help=f'dataset name: one of the benchmarks {", ".join(DATA_NAMES)}, or any '
                             f'folder of labelled images under --data_path; by default every '
                             f'benchmark found there')
    parser.add_argument(
        '--crop', action='store_true', help='also write the bounding-box cropped variant'
    )
    parser.add_argument(
        '--make_demo',
        action='store_true',
        help='first write a small demo data set of handwritten digits as <data_path>/digits',
    )
    parser.add_argument(
        '--workers', default=os.cpu_count(), type=int, help='processes converting images'
    )
    return parser


def main():
    """Prepare the requested data sets."""
    args = get_args_parser().parse_args()
    if args.workers < 1:
        raise UserError(f'--workers must be at least 1, not {args.workers}')
    if args.data_name is not None:
        check_data_name(args.data_name)
    if args.make_demo:
        make_demo(args.data_path)
        args.data_name = 'digits'
    if args.data_name is not None:
        names = [args.data_name]
    else:
        names = [name for name in DATA_NAMES if os.path.isdir(os.path.join(args.data_path, name))]
        if not names:
            raise UserError(f'no data set found under {args.data_path}: expected a folder '
                            f'{one_of([f"{name}/" for name in DATA_NAMES])} there (see the README '
                            f'for each layout), or pass --data_path, or --data_name for a folder '
                            f'of your own images')
    crop_types = CROP_TYPES if args.crop else CROP_TYPES[:1]
    for name in names:
        prepare(args.data_path, name, crop_types, args.workers)


if __name__ == '__main__':
    run_main(main)
