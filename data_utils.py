"""Prepare CARS196, CUB-200-2011 and Stanford Online Products: RGB copies of every image and a train/test index."""
import argparse
import multiprocessing
import os
from collections import defaultdict

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils import (CROP_TYPES, DATA_NAMES, UserError, atomic_path, atomic_save, index_path, remove_temporaries,
                   run_main)

# what each data set's download looks like once extracted, and where to get it
LAYOUTS = {
    'car': ('car_ims/*.jpg and cars_annos.mat', 'https://ai.stanford.edu/~jkrause/cars/car_dataset.html '
            '(the original links are dead; mirrors of car_ims.tgz and cars_annos.mat exist)'),
    'cub': ('the extracted CUB_200_2011 folder renamed to cub: images/, images.txt, image_class_labels.txt, '
            'bounding_boxes.txt', 'https://www.vision.caltech.edu/datasets/cub_200_2011/'),
    'sop': ('the extracted Stanford_Online_Products folder renamed to sop: Ebay_train.txt, Ebay_test.txt and '
            'the *_final/ image folders', 'https://cvgl.stanford.edu/projects/lifted_struct/'),
}


def layout_error(root, data_name, missing):
    """A UserError naming what is missing, the layout expected and where to download it."""
    layout, url = LAYOUTS[data_name]
    return UserError(f'{missing} is missing, so {root} is not a complete {data_name} data set; it must hold '
                     f'{layout} (download from {url})')


def inside(root, relative, source):
    """Join an annotation's relative path to root, refusing paths that leave the data folder."""
    path = os.path.normpath(os.path.join(root, relative))
    if os.path.isabs(relative) or os.path.commonpath([os.path.abspath(root), os.path.abspath(path)]) != \
            os.path.abspath(root):
        raise UserError(f'{source} names {relative!r}, which lies outside {root}; the annotation file is not the '
                        f'official one, so download it again')
    return path


def read_text_table(path, columns, root, data_name, header=False):
    """Rows of a whitespace-separated annotation file, each split into exactly `columns` fields."""
    if not os.path.isfile(path):
        raise layout_error(root, data_name, path)
    with open(path, encoding='utf-8', errors='replace') as file:
        lines = [line.split() for line in file.read().splitlines() if line.strip()]
    if header:
        lines = lines[1:]
    for number, fields in enumerate(lines, 2 if header else 1):
        if len(fields) != columns:
            raise UserError(f'{path} is malformed at line {number} (expected {columns} fields, found '
                            f'{len(fields)}); download the data set again')
    return lines


def to_number(text, path, kind=int):
    """int(text) or float(text), with a UserError naming the file when it is not a number."""
    try:
        return kind(text)
    except ValueError:
        raise UserError(f'{path} is malformed: {text!r} is not a number; download the data set again') from None


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
        raise UserError(f'{path} is truncated or malformed ({type(error).__name__}: {error}); download it '
                        f'again') from None
    return entries


def read_cub(root):
    """CUB-200-2011: [(source path, class id, (x1, y1, x2, y2))] from its text files; the split is by class."""
    def table(name, columns):
        path = os.path.join(root, name)
        return path, read_text_table(path, columns, root, 'cub')

    images_path, images = table('images.txt', 2)
    labels_path, labels = table('image_class_labels.txt', 2)
    boxes_path, boxes = table('bounding_boxes.txt', 5)
    labels = {fields[0]: to_number(fields[1], labels_path) for fields in labels}
    boxes = {fields[0]: [to_number(v, boxes_path, float) for v in fields[1:]] for fields in boxes}
    entries = []
    for image_id, relative in images:
        if image_id not in labels or image_id not in boxes:
            raise UserError(f'image {image_id} of {images_path} has no line in '
                            f'{labels_path if image_id not in labels else boxes_path}; download the data set again')
        x, y, width, height = boxes[image_id]
        entries.append((inside(root, os.path.join('images', relative), images_path), labels[image_id],
                        (x, y, x + width, y + height)))
    return entries


def read_sop(root):
    """Stanford Online Products: ([(source path, class id, None)], set of test class ids) from the Ebay files."""
    entries, test_classes = [], set()
    for split in ('train', 'test'):
        path = os.path.join(root, f'Ebay_{split}.txt')
        for _, class_id, _, relative in read_text_table(path, 4, root, 'sop', header=True):
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
        # the first half of the classes trains and the second half tests: 1-98 / 99-196 and 1-100 / 101-200
        test_classes = set(classes[len(classes) // 2:])
    missing = [source for source, _, _ in entries if not os.path.isfile(source)]
    if missing:
        raise UserError(f'{len(missing)} of the {len(entries)} images the annotations name do not exist, such as '
                        f'{missing[0]}; extract the whole {data_name} download into {root}')
    names = defaultdict(list)
    for source, _, _ in entries:
        names[os.path.basename(source)].append(source)
    clashes = [paths for paths in names.values() if len(paths) > 1]
    if clashes:
        raise UserError(f'{clashes[0][0]} and {clashes[0][1]} share a file name, which the prepared layout keeps '
                        f'flat; rename one of them')
    return entries, test_classes


def convert(task):
    """Write one image as RGB (cropped to its box if given); returns an error text, or None on success."""
    source, target, box = task
    if os.path.exists(target):  # written atomically, so an existing file is complete
        return None
    try:
        with Image.open(source) as image:
            image = image.convert('RGB')
            if box is not None:
                image = image.crop(tuple(int(round(v)) for v in box))
            with atomic_path(target) as tmp:
                image.save(tmp, format='JPEG')
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f'{source}: {error}'
    return None


def prepare(data_path, data_name, crop_types=('uncropped',), workers=None):
    """Convert one raw data set into <data_path>/<data_name>/<crop type>/ and write its train/test index."""
    root = os.path.join(data_path, data_name)
    entries, test_classes = read_annotations(root, data_name)
    if data_name == 'sop' and 'cropped' in crop_types:
        print('sop has no bounding boxes, so only its uncropped variant is written')
        crop_types = ('uncropped',)
    for crop_type in crop_types:
        folder = os.path.join(root, crop_type)
        os.makedirs(folder, exist_ok=True)
        # a run killed mid-write leaves temporary files; its finished images are kept and skipped below
        remove_temporaries(folder)
        remove_temporaries(root, f'{crop_type}_data_dicts.pth.')
        tasks = [(source, os.path.join(folder, os.path.basename(source)), box if crop_type == 'cropped' else None)
                 for source, _, box in entries]
        with multiprocessing.Pool(workers or os.cpu_count()) as pool:
            errors = [error for error in tqdm(pool.imap(convert, tasks, chunksize=16), total=len(tasks),
                                              desc=f'{data_name} {crop_type}', unit='img', dynamic_ncols=True)
                      if error is not None]
        if errors:
            listing = '\n'.join(f'  {error}' for error in errors)
            print(f'{len(errors)} unreadable images:\n{listing}')
            raise UserError(f'{len(errors)} images of {data_name} could not be read (listed above); replace them '
                            f'with good copies from the download and run data_utils.py again')
        index = {'train': defaultdict(list), 'test': defaultdict(list)}
        for source, class_id, _ in entries:
            split = 'test' if class_id in test_classes else 'train'
            index[split][class_id].append(f'{crop_type}/{os.path.basename(source)}')
        index = {split: dict(classes) for split, classes in index.items()}
        atomic_save(index, index_path(data_path, data_name, crop_type))
        counts = {split: sum(map(len, classes.values())) for split, classes in index.items()}
        print(f'{data_name} {crop_type}: {len(index["train"])} classes / {counts["train"]} images train, '
              f'{len(index["test"])} classes / {counts["test"]} images test')


def make_demo(data_path, per_class=40):
    """Write scikit-learn's handwritten digits in the CUB-200-2011 layout as <data_path>/cub: a no-download demo."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    root = os.path.join(data_path, 'cub')
    lines = defaultdict(list)
    image_id = 0
    for digit in range(10):
        folder = f'{digit + 1:03d}.digit_{digit}'
        os.makedirs(os.path.join(root, 'images', folder), exist_ok=True)
        for k, pixels in enumerate(digits.images[digits.target == digit][:per_class]):
            image_id += 1
            relative = f'{folder}/digit_{digit}_{k:04d}.jpg'
            # 8x8 grey levels 0-16 -> a 64x64 grayscale JPEG, as CUB itself holds some grayscale images
            image = Image.fromarray(np.uint8(pixels * 255 / 16)).resize((64, 64), Image.BILINEAR)
            image.save(os.path.join(root, 'images', relative), format='JPEG', quality=95)
            lines['images.txt'].append(f'{image_id} {relative}')
            lines['image_class_labels.txt'].append(f'{image_id} {digit + 1}')
            lines['bounding_boxes.txt'].append(f'{image_id} 0.0 0.0 64.0 64.0')
            lines['train_test_split.txt'].append(f'{image_id} {int(k % 2 == 0)}')
    for name, rows in lines.items():
        with atomic_path(os.path.join(root, name)) as tmp, open(tmp, 'w') as file:
            file.write('\n'.join(rows) + '\n')
    print(f'wrote {image_id} handwritten digits in the CUB-200-2011 layout under {root}')


def get_args_parser():
    """The command-line flags of data_utils.py."""
    parser = argparse.ArgumentParser(description='Prepare the data sets: RGB copies and a train/test index',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--data_path', default='/home/data', type=str, help='datasets path')
    parser.add_argument('--data_name', default=None, choices=DATA_NAMES,
                        help='dataset name; by default every data set found under --data_path')
    parser.add_argument('--crop', action='store_true', help='also write the bounding-box cropped variant')
    parser.add_argument('--make_demo', action='store_true',
                        help='first write a small demo data set of handwritten digits as <data_path>/cub')
    parser.add_argument('--workers', default=os.cpu_count(), type=int, help='processes converting images')
    return parser


def main():
    """Prepare the requested data sets."""
    args = get_args_parser().parse_args()
    if args.workers < 1:
        raise UserError(f'--workers must be at least 1, not {args.workers}')
    if args.make_demo:
        make_demo(args.data_path)
        args.data_name = 'cub'
    if args.data_name is not None:
        names = [args.data_name]
    else:
        names = [name for name in DATA_NAMES if os.path.isdir(os.path.join(args.data_path, name))]
        if not names:
            raise UserError(f'no data set found under {args.data_path}: expected a folder car/, cub/ or sop/ '
                            f'there (see the README for each layout), or pass --data_path')
    crop_types = CROP_TYPES if args.crop else CROP_TYPES[:1]
    for name in names:
        prepare(args.data_path, name, crop_types, args.workers)


if __name__ == '__main__':
    run_main(main)
