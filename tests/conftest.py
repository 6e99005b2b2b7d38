"""Fixtures that write small data sets in the exact raw layouts of the downloads (no download ever
happens)."""

import os
import random
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_image(path, class_id, k, size=(40, 30), gray=False):
    """A small JPEG whose colour depends on its class, with some noise; grayscale ('L') when
    gray."""
    rng = np.random.default_rng(1000 * class_id + k)
    base = np.array(
        [(37 * class_id) % 256, (91 * class_id) % 256, (151 * class_id) % 256], dtype=np.float64
    )
    pixels = np.clip(base + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if gray:
        image = image.convert('L')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format='JPEG')


def make_cub(data_path, num_classes=4, per_class=3, gray_every=4):
    """<data_path>/cub in CUB-200-2011's layout: images/<class folder>/*.jpg and its four text
    files."""
    root = os.path.join(data_path, 'cub')
    images, labels, boxes, split = [], [], [], []
    image_id = 0
    for class_id in range(1, num_classes + 1):
        folder = f'{class_id:03d}.Bird_{class_id}'
        for k in range(per_class):
            image_id += 1
            relative = f'{folder}/Bird_{class_id}_{k:04d}_{image_id}.jpg'
            write_image(
                os.path.join(root, 'images', relative), class_id, k, gray=image_id % gray_every == 0
            )
            images.append(f'{image_id} {relative}')
            labels.append(f'{image_id} {class_id}')
            boxes.append(f'{image_id} 2.0 3.0 30.0 20.0')
            split.append(f'{image_id} {k % 2}')
    for name, rows in (
        ('images.txt', images),
        ('image_class_labels.txt', labels),
        ('bounding_boxes.txt', boxes),
        ('train_test_split.txt', split),
    ):
        with open(os.path.join(root, name), 'w') as file:
            file.write('\n'.join(rows) + '\n')
    return root


def make_car(data_path, num_classes=4, per_class=3, gray_every=4):
    """<data_path>/car in CARS196's layout: car_ims/*.jpg and cars_annos.mat, a MATLAB struct
    array."""
    root = os.path.join(data_path, 'car')
    fields = ['relative_im_path', 'bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'class', 'test']
    records = []
    image_id = 0
    for class_id in range(1, num_classes + 1):
        for k in range(per_class):
            image_id += 1
            relative = f'car_ims/{image_id:06d}.jpg'
            write_image(os.path.join(root, relative), class_id, k, gray=image_id % gray_every == 0)
            records.append((relative, 2, 3, 30, 20, class_id, k % 2))
    annotations = np.zeros((1, len(records)), dtype=[(field, 'O') for field in fields])
    for i, record in enumerate(records):
        # the download's types: a string, uint16 box corners, uint8 class and test flag
        annotations[0, i] = tuple(
            (
                np.array([v])
                if isinstance(v, str)
                else np.array([[v]], dtype=np.uint8 if f in ('class', 'test') else np.uint16)
            )
            for f, v in zip(fields, record)
        )
    savemat(
        os.path.join(root, 'cars_annos.mat'),
        {
            'annotations': annotations,
            'class_names': np.array(
                [[f'Car {c}' for c in range(1, num_classes + 1)]], dtype=object
            ),
        },
    )
    return root


def make_sop(data_path, num_classes=6, per_class=2):
    """<data_path>/sop in Stanford Online Products' layout: *_final/ folders and Ebay_train.txt /
    Ebay_test.txt."""
    root = os.path.join(data_path, 'sop')
    rows = {
        'train': ['image_id class_id super_class_id path'],
        'test': ['image_id class_id super_class_id path'],
    }
    image_id = 0
    for class_id in range(1, num_classes + 1):
        split = 'train' if class_id <= num_classes // 2 else 'test'
        super_class = 1 + class_id % 2
        folder = ['bicycle_final', 'chair_final'][super_class - 1]
        for k in range(per_class):
            image_id += 1
            relative = f'{folder}/{111000 + class_id}_{k}.JPG'
            write_image(os.path.join(root, relative), class_id, k)
            rows[split].append(f'{image_id} {class_id} {super_class} {relative}')
    for split, lines in rows.items():
        with open(os.path.join(root, f'Ebay_{split}.txt'), 'w') as file:
            file.write('\n'.join(lines) + '\n')
    return root


class Pairs(torch.utils.data.Dataset):
    """(image, label) pairs of two tensors, indexed like a seeded ImageReader: by index or (index,
    epoch), and with an int label."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item
        return self.images[index], int(self.labels[index])

    def __len__(self):
        return len(self.images)


def process_state():
    """The process-wide settings and generators a computation in this process depends on."""
    import utils

    return {
        'threads': torch.get_num_threads(),
        'onednn': torch.backends.mkldnn.enabled,
        'cudnn': (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
        'deterministic': torch.are_deterministic_algorithms_enabled(),
        'matmul': torch.get_float32_matmul_precision(),
        'dtype': torch.get_default_dtype(),
        'grad': torch.is_grad_enabled(),
        'sizes': (utils.IMAGE_SIZE, utils.RESIZE_SIZE),
        'rng': (torch.get_rng_state(), np.random.get_state(), random.getstate()),
    }


def set_process_state(state):
    """Put back what process_state() read."""
    import utils

    torch.set_num_threads(state['threads'])
    torch.backends.mkldnn.enabled = state['onednn']
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state['cudnn']
    torch.use_deterministic_algorithms(state['deterministic'])
    torch.set_float32_matmul_precision(state['matmul'])
    torch.set_default_dtype(state['dtype'])
    torch.set_grad_enabled(state['grad'])
    utils.IMAGE_SIZE, utils.RESIZE_SIZE = state['sizes']
    torch.set_rng_state(state['rng'][0])
    np.random.set_state(state['rng'][1])
    random.setstate(state['rng'][2])


@pytest.fixture(autouse=True)
def same_process_state():
    """Whatever a test changes of the process-wide state is put back after it, so that no test
    computes differently for what ran before it in this process (a thread-count call once left
    MKL in another mode)."""
    state = process_state()
    yield
    set_process_state(state)


@pytest.fixture
def without_onednn():
    """PyTorch's own CPU convolutions instead of oneDNN's, whose first call for each new tensor
    shape costs seconds: a test's tiny training runs meet a new shape at almost every call (batch
    sizes, the last batch, evaluation)."""
    with torch.backends.mkldnn.flags(enabled=False):
        yield


INSHOP_VIEWS = ('1_front', '2_side', '3_back', '4_full')


def make_inshop(data_path, train_items=2, test_items=3, views=3, under_img=True):
    """<data_path>/inshop in In-shop Clothes Retrieval's layout: Eval/list_eval_partition.txt (a
    count line, a header line, then `image_name item_id evaluation_status` rows) and the images of
    Img/img.zip as Img/img/... (or img/... when not under_img). Every item has the same file names,
    as the download's items do; a test item's first view is a query, the others are gallery images,
    except the last item's, all queries (a query class with no gallery image). Returns {image_name:
    (item id, split)}."""
    root = os.path.join(data_path, 'inshop')
    images = os.path.join(root, 'Img') if under_img else root
    rows = {}
    for number in range(1, train_items + test_items + 1):
        item = f'id_{number:08d}'
        kind = ('WOMEN/Dresses', 'MEN/Denim')[number % 2]
        for view in range(views):
            name = f'img/{kind}/{item}/{view + 1:02d}_{INSHOP_VIEWS[view % 4]}.jpg'
            write_image(os.path.join(images, name), number, view)
            last = number == train_items + test_items
            split = (
                'train' if number <= train_items else 'query' if view == 0 or last else 'gallery'
            )
            rows[name] = (item, split)
    os.makedirs(os.path.join(root, 'Eval'), exist_ok=True)
    with open(os.path.join(root, 'Eval', 'list_eval_partition.txt'), 'w') as file:
        file.write(f'{len(rows)}\nimage_name item_id evaluation_status\n')
        # the download pads its columns with runs of spaces
        file.writelines(f'{name:<60}{item:<20}{split}\n' for name, (item, split) in rows.items())
    return rows


def make_folder(data_path, name, classes, per_class=2, split=None, nested=False):
    """<data_path>/<name>/[<split>/]<class>/[nested/]<file>: a labelled image folder as
    torchvision's ImageFolder reads it. The file names repeat across classes; returns {class:
    [paths]}."""
    written = {}
    for number, class_name in enumerate(classes, 1):
        folder = os.path.join(
            data_path,
            name,
            *([split] if split else []),
            class_name,
            *(['nested'] if nested else []),
        )
        written[class_name] = []
        for k in range(per_class):
            path = os.path.join(folder, f'img_{k}.jpg')
            write_image(path, number, k)
            written[class_name].append(path)
    return written


def write_png16(path, pixels):
    """A 16-bit RGB or RGBA PNG of (H, W, 3 or 4) uint16 pixels: PIL reads such files, but cannot
    write them."""
    height, width, channels = pixels.shape
    rows = b''.join(b'\x00' + row.astype('>u2').tobytes() for row in pixels)  # filter 0 each row

    def chunk(kind, data):
        crc = zlib.crc32(kind + data)
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', crc)

    header = struct.pack('>IIBBBBB', width, height, 16, {3: 2, 4: 6}[channels], 0, 0, 0)
    with open(path, 'wb') as file:
        file.write(
            b'\x89PNG\r\n\x1a\n'
            + chunk(b'IHDR', header)
            + chunk(b'IDAT', zlib.compress(rows))
            + chunk(b'IEND', b'')
        )


def write_album(folder, size=(40, 30)):
    """A real photo (scikit-learn's china.jpg, shrunk to size) in every pixel format and container
    below, the files a camera, a scanner or an image editor leaves in a photo album; returns
    {file name: path}."""
    from sklearn.datasets import load_sample_image

    os.makedirs(folder, exist_ok=True)
    photo = Image.fromarray(load_sample_image('china.jpg')).resize(size, Image.BILINEAR)
    rgb = np.asarray(photo)
    alpha = np.broadcast_to(np.linspace(0, 255, size[0]).astype(np.uint8), rgb.shape[:2])  # (H, W)
    gray = np.asarray(photo.convert('L'))
    palette = photo.convert('P', palette=Image.ADAPTIVE, colors=16)
    rotated = Image.Exif()
    rotated[0x0112] = 6  # Orientation: shown turned by 90 degrees; the pixels are stored unturned
    flipped = photo.transpose(Image.FLIP_LEFT_RIGHT)
    formats = {
        'baseline.jpg': (photo, {'quality': 90}),
        'progressive.jpg': (photo, {'quality': 90, 'progressive': True}),
        'gray.jpg': (photo.convert('L'), {}),
        'cmyk.jpg': (photo.convert('CMYK'), {}),
        'exif rotated.jpg': (photo, {'exif': rotated}),
        'rgb.png': (photo, {}),
        'rgba.png': (Image.fromarray(np.dstack([rgb, alpha])), {}),
        'la.png': (Image.fromarray(np.dstack([gray, alpha])), {}),
        'bilevel.png': (photo.convert('1'), {}),
        'palette transparent.png': (palette, {'transparency': 3}),
        'gray16.png': (Image.fromarray(gray.astype(np.uint16) * 257), {}),
        'gray16.tif': (Image.fromarray(gray.astype(np.uint16) * 257), {}),
        'int32.tif': (Image.fromarray(gray.astype(np.int32) * 3), {}),
        'float.tif': (Image.fromarray(gray.astype(np.float32) / 2), {}),
        'cmyk.tif': (photo.convert('CMYK'), {}),
        'lossy.webp': (photo, {'quality': 90}),
        'alpha.webp': (Image.fromarray(np.dstack([rgb, alpha])), {'lossless': True, 'exact': True}),
        'animated.webp': (photo, {'save_all': True, 'append_images': [flipped]}),
        'still.gif': (photo, {}),
        'transparent.gif': (palette, {'transparency': 3}),
        'animated.gif': (photo, {'save_all': True, 'append_images': [flipped]}),
        'rgb.bmp': (photo, {}),
        'rgb.tga': (photo, {}),
        'gray.pgm': (photo.convert('L'), {}),
    }
    written = {}
    for name, (image, options) in formats.items():
        written[name] = os.path.join(folder, name)
        image.save(written[name], **options)
    for name, pixels in (('rgb16.png', rgb), ('rgba16.png', np.dstack([rgb, alpha]))):
        written[name] = os.path.join(folder, name)
        write_png16(written[name], pixels.astype(np.uint16) * 257)
    return written


def train_in(folder, *flags, watch=None):
    """Run train.py's main() in this process with these flags, in `folder` (its results/ go there),
    watched by `watch` (a train.Watch) if one is given."""
    from script_runner import load_script

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, 'argv', ['train.py', *map(str, flags)])
        patch.chdir(folder)
        load_script('train').main(watch)


def prepared_cub(tmp_path_factory, num_classes, per_class):
    """The path of a new folder holding a CUB-layout data set, prepared by data_utils.py."""
    import data_utils

    path = str(tmp_path_factory.mktemp('data'))
    make_cub(path, num_classes=num_classes, per_class=per_class)
    data_utils.prepare(path, 'cub', workers=1)
    return path


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    """A prepared CUB-layout data set of 4 classes x 4 images (8 train, 8 test), one per test
    module; its path."""
    return prepared_cub(tmp_path_factory, num_classes=4, per_class=4)


@pytest.fixture
def cub_root(tmp_path):
    """A raw CUB-layout data set of 4 classes x 3 images under tmp_path/cub; returns tmp_path."""
    make_cub(str(tmp_path))
    return tmp_path


@pytest.fixture
def car_root(tmp_path):
    """A raw CARS196-layout data set of 4 classes x 3 images under tmp_path/car; returns
    tmp_path."""
    make_car(str(tmp_path))
    return tmp_path


@pytest.fixture
def script(capsys, monkeypatch):
    """script(name, *flags, cwd=...) -> (exit status, stdout, stderr) of `python <name>.py flags`
    run in cwd; watch=... passes train.py's main() a train.Watch (such as the `recorded`
    fixture)."""

    def run(name, *flags, cwd, watch=None):
        from script_runner import load_script
        import runtime

        module = load_script(name)
        monkeypatch.setattr(sys, 'argv', [f'{name}.py', *map(str, flags)])
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            runtime.run_main(module.main if watch is None else lambda: module.main(watch))
            status = 0
        except SystemExit as exit_:
            status = exit_.code
        out, err = capsys.readouterr()
        return status, out, err

    return run


# ----------------------------------------------------------------------------------------------------------------------
# train.py's epochs, observed

TINY = 'timm/test_resnet'  # timm's test network (370,000 parameters): a run of seconds


def bn_buffers(net):
    """Copies of the running statistics of the backbone's BatchNorm layers."""
    return {
        name: value.clone()
        for name, value in net.named_buffers()
        if name.startswith('backbone.') and 'running_' in name
    }


@pytest.fixture
def small_crops(monkeypatch):
    """64-pixel crops instead of the recipe's 224 for the runs below: a dozen times less arithmetic,
    same recipe."""
    import utils

    monkeypatch.setattr(utils, 'IMAGE_SIZE', 64)
    monkeypatch.setattr(utils, 'RESIZE_SIZE', 73)


@pytest.fixture
def quick_runs(monkeypatch):
    """train.py runs of seconds, for tests of the training loop rather than of what it learns:
    32-pixel crops (GoogLeNet still ends on a 1 x 1 map), one thread (two stall at every barrier on
    a busy machine: ten times slower) and no statistics figure (half a second an epoch;
    test_train_losses draws one)."""
    import runs
    import utils

    monkeypatch.setattr(utils, 'IMAGE_SIZE', 32)
    monkeypatch.setattr(utils, 'RESIZE_SIZE', 37)
    monkeypatch.setattr(runs, 'plot_statistics', lambda frame, path: None)
    torch.set_num_threads(1)


@pytest.fixture
def recorded():
    """A train.Watch for the runs a test passes it to (script(..., watch=recorded)): a list with one
    record per epoch of the parameters and BatchNorm statistics before and after its training pass
    (the loss's own parameters too), each parameter group's learning rate during it, the training
    pass's stats and features, and the run's optimizer, model, loader and loss."""
    from script_runner import load_script

    def state(run):
        return (
            {n: p.detach().clone() for n, p in run.model.named_parameters()},
            bn_buffers(run.model),
            {n: p.detach().clone() for n, p in run.loss.named_parameters()},
        )

    class Recorder(load_script('train').Watch, list):
        def started(self, run):
            self.state = state(run)

        def trained(self, run, epoch, stats, features):
            before, after = self.state, state(run)
            self.append(
                {
                    'before': before[:2],
                    'after': after[:2],
                    'loss_before': before[2],
                    'loss_after': after[2],
                    'lrs': [group['lr'] for group in run.optimizer.param_groups],
                    'epoch': epoch,
                    'stats': stats,
                    'features': features,
                    'optimizer': run.optimizer,
                    'model': run.model,
                    'loader': run.loader,
                    'loss': run.loss,
                }
            )
            self.state = after

    return Recorder()


@pytest.fixture
def faiss_numpy(monkeypatch):
    """faiss's own numpy methods for one test. pytorch-metric-learning's AccuracyCalculator, which
    some test modules import, imports faiss.contrib.torch_utils, and that replaces every index's
    methods process-wide with ones that refuse the keyword arguments Milvus Lite passes."""
    import faiss

    for name in dir(faiss):
        the_class = getattr(faiss, name)
        if isinstance(the_class, type) and issubclass(the_class, faiss.Index):
            for method, value in list(vars(the_class).items()):
                original = vars(the_class).get(f'{method}_numpy')
                if getattr(value, '__name__', '').startswith('torch_replacement_') and original:
                    monkeypatch.setattr(the_class, method, original)
