"""Retrieve the images nearest to a query from a trained model's data base and draw them."""
import argparse
import os

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.transforms.v2.functional import to_pil_image

from utils import (UserError, atomic_dir, pyplot, read_image, remove_temporaries, run_main, safe_load,
                   test_transform)

BORDER = {True: (0, 160, 0), False: (220, 0, 0), None: (128, 128, 128)}  # correct, wrong, query label unknown


def get_args_parser():
    """The command-line flags of test.py; the seed's names and defaults are the public interface."""
    parser = argparse.ArgumentParser(description='Show the images a trained model retrieves for a query',
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--query_img_name', default='/home/data/car/uncropped/008055.jpg', type=str,
                        help='query image name: a test image of the data base, or any image file')
    parser.add_argument('--data_base', default='car_resnet50_proxy_anchor_512_20_data_base.pth', type=str,
                        help='queried database (a path, or a file name under results/)')
    parser.add_argument('--retrieval_num', default=8, type=int, help='retrieval number')
    return parser


def find_data_base(name):
    """The data base file: the path as given, else the same name under results/."""
    for path in (name, os.path.join('results', name)):
        if os.path.isfile(path):
            return path
    raise UserError(f'data base {name} was found neither as given nor under results/; train.py writes '
                    f'results/<data>_<backbone>_<loss>_<dim>_<epoch>_data_base.pth, so train a model first')


def find_query(query, images):
    """Position of the query among the data base's test images (by path, then by file name), or None."""
    if query in images:
        return images.index(query)
    absolute = [os.path.abspath(image) for image in images]
    if os.path.abspath(query) in absolute:
        return absolute.index(os.path.abspath(query))
    same_name = [i for i, image in enumerate(images) if os.path.basename(image) == os.path.basename(query)]
    return same_name[0] if len(same_name) == 1 and not os.path.isfile(query) else None


def embed_query(query, data_base, data_base_path):
    """Embed an image that is not in the data base with the model saved beside the data base."""
    from model import Model
    model_path = data_base_path.replace('_data_base.pth', '_model.pth')
    example = data_base['test_images'][0]
    if not os.path.isfile(model_path):
        raise UserError(f'{query} is not in data base {data_base_path} (a valid name is {example}), and no model '
                        f'{model_path} was found to embed it; query a data base image or train a model first')
    if not os.path.isfile(query):
        raise UserError(f'query image {query} does not exist; a valid name is {example}')
    args = data_base['args']
    model = Model(args['backbone_type'], args['feature_dim'], data_base['proxies'].size(0), pretrained=False)
    try:
        model.load_state_dict(safe_load(model_path, 'model'))
    except RuntimeError:
        raise UserError(f'{model_path} does not match the model data base {data_base_path} describes '
                        f'({args["backbone_type"]}, {args["feature_dim"]}-d); use the pair train.py wrote '
                        f'together') from None
    image = test_transform()(read_image(query))
    with torch.inference_mode():
        return model.eval().embed(image[None])[0]  # (D,)


def framed(path, correct=None, border=True):
    """The image at `path` as 224 x 224 RGB; results get a border: green if correct, red if wrong, else grey."""
    image = to_pil_image(read_image(path)).resize((224, 224), Image.BILINEAR)
    if border:
        ImageDraw.Draw(image).rectangle((0, 0, 223, 223), outline=BORDER[correct], width=5)
    return image


def draw_row(query_image, results, path):
    """The query and its results in one row: the figure the README shows."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(results) + 1, figsize=(1.6 * (len(results) + 1), 2.0))
    axes[0].imshow(query_image)
    axes[0].set_title('query', fontsize=9)
    for axis, (image, rank, similarity, _) in zip(axes[1:], results):
        axis.imshow(image)
        axis.set_title(f'#{rank}  {similarity:.3f}', fontsize=9)
    for axis in axes:
        axis.axis('off')
    figure.tight_layout()
    figure.savefig(path, format='png', dpi=120)
    plt.close(figure)


def main():
    """Find the query's nearest neighbours and write them under results/<query name>/."""
    args = get_args_parser().parse_args()
    if args.retrieval_num < 1:
        raise UserError(f'--retrieval_num must be at least 1, not {args.retrieval_num}')
    data_base_path = find_data_base(args.data_base)
    data_base = safe_load(data_base_path, 'data base')
    missing = {'test_images', 'test_labels', 'test_features', 'proxies', 'args'} - set(
        data_base if isinstance(data_base, dict) else ())
    if missing:
        raise UserError(f'{data_base_path} is not a data base train.py wrote (it has no {", ".join(sorted(missing))}); '
                        f'pass a results/<data>_<backbone>_<loss>_<dim>_<epoch>_data_base.pth file')
    images, labels, features = data_base['test_images'], data_base['test_labels'], data_base['test_features']
    index = find_query(args.query_img_name, images)
    if index is None:
        query_feature, query_label, query_path = embed_query(args.query_img_name, data_base, data_base_path), None, \
            args.query_img_name
        if query_feature.size(0) != features.size(1):
            raise UserError(f'the model embeds in {query_feature.size(0)} dimensions but data base {data_base_path} '
                            f'holds {features.size(1)}-d features; use the pair train.py wrote together')
    else:
        query_feature, query_label, query_path = features[index], labels[index].item(), images[index]
    similarities = F.normalize(features.float(), dim=-1) @ F.normalize(query_feature.float(), dim=-1)  # (N,)
    if index is not None:
        similarities[index] = float('-inf')  # the query is not its own result
    num = min(args.retrieval_num, len(images) - (index is not None))
    top = similarities.topk(num)

    name = os.path.splitext(os.path.basename(query_path))[0]
    results = []
    for rank, (similarity, position) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        correct = None if query_label is None else labels[position].item() == query_label
        results.append((framed(images[position], correct), rank, similarity, correct))
    remove_temporaries('results', f'{name}.')  # left by a run killed while writing this query's folder
    with atomic_dir(os.path.join('results', name)) as folder:
        query_image = framed(query_path, border=False)
        query_image.save(os.path.join(folder, 'query_img.jpg'))
        for image, rank, similarity, _ in results:
            image.save(os.path.join(folder, f'retrieval_img_{rank}_{similarity:.4f}.jpg'))
        draw_row(query_image, results, os.path.join(folder, 'retrieval.png'))
    hits = sum(correct is True for *_, correct in results)
    summary = f', {hits} of the same class' if query_label is not None else ''
    print(f'wrote the query and its {num} nearest images{summary} to results/{name}/')


if __name__ == '__main__':
    run_main(main)
