"""The cost of tune.py's search itself beside the training it runs: a study on the digits demo,
timed whole and inside train.train (each fold of each trial), in one process.

    python benchmarks/tune_speed.py                       # 8 trials of 2 folds, 1 epoch, 64 px
    python benchmarks/tune_speed.py --trials 4 --image_size 32

Everything tune.py does besides training (reading and splitting the training classes, Optuna's
journal file and TPE sampler, the trial locks, the progress lines) is the search's own cost; the
target is under 10% of the training time. The data set is written once before the clock starts,
and the study lives in a temporary folder, so nothing under results/ is touched.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
import tune  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--trials', default=8, type=int, help='trials of the study')
    parser.add_argument('--folds', default=2, type=int, help='folds of each trial')
    parser.add_argument('--num_epochs', default=1, type=int, help='epochs of each fold')
    parser.add_argument('--image_size', default=64, type=int, help='crop of the training images')
    args = parser.parse_args()

    inside = []  # seconds of each train.train call
    timed = train.train

    def train_timed(*arguments, **keywords):
        start = time.perf_counter()
        try:
            return timed(*arguments, **keywords)
        finally:
            inside.append(time.perf_counter() - start)

    folder = tempfile.mkdtemp(prefix='tune_speed_')
    cwd = os.getcwd()
    try:
        os.chdir(folder)
        train.write_demo('data')
        train.train = train_timed
        sys.argv = ['tune.py', '--data_path', 'data', '--data_name', train.DEMO,
                    '--backbone_type', 'timm/resnet18', '--no_pretrained',
                    '--image_size', str(args.image_size), '--num_epochs', str(args.num_epochs),
                    '--warm_up', '0', '--batch_size', '32', '--folds', str(args.folds),
                    '--trials', str(args.trials), '--reproductions', '0', '--cache_images',
                    '--num_workers', '0']
        start = time.perf_counter()
        tune.main()
        total = time.perf_counter() - start
    finally:
        train.train = timed
        os.chdir(cwd)
        shutil.rmtree(folder)
    training = sum(inside)
    print(f'\n{args.trials} trials x {args.folds} folds: {total:.1f} s in all, {training:.1f} s '
          f'in train.train ({len(inside)} calls), {total - training:.1f} s of search')
    print(f'search / training: {(total - training) / training:.3f} (target: under 0.10)')


if __name__ == '__main__':
    main()
