"""reproduce.py: the grid it runs, the table and figure it writes from statistics CSVs (fabricated here)."""

import os
import shlex
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from script_runner import error_sentence, load_script
from utils import index_path

BACKBONES = ['resnet50', 'inception', 'googlenet']
LARGER = (
    '--image_size',
    '256',
)  # the Proxy-Anchor paper's BN-Inception rows on CARS196, CUB and SOP


def data_folders(root, names, prepared=()):
    """Empty data set folders under root/data (an index file for the prepared ones); returns 'data'."""
    for name in names:
        os.makedirs(root / 'data' / name)
        if name in prepared:
            open(index_path(str(root / 'data'), name), 'w').close()
    return 'data'


def dry_run(script, cwd, *flags):
    """The commands `reproduce.py --dry_run` prints, each as (script name, {flag: value}), and its comments."""
    status, out, err = script('reproduce', '--data_path', 'data', '--dry_run', *flags, cwd=cwd)
    assert status == 0, err
    commands, comments = [], []
    for line in out.splitlines():
        if line.startswith('#'):
            comments.append(line)
            continue
        commands.append(parse_command(shlex.split(line)))
    return commands, comments


def parse_command(argv):
    """[python, script, flags...] -> (script name, {flag: value, or True for a switch})."""
    assert argv[0] == sys.executable
    flags, i = {}, 2
    while i < len(argv):
        takes_value = i + 1 < len(argv) and not argv[i + 1].startswith('--')
        flags[argv[i]] = argv[i + 1] if takes_value else True
        i += 2 if takes_value else 1
    return os.path.basename(argv[1]), flags


def train_run(data_name, backbone, *extra, resume=False):
    flags = {
        '--data_path': 'data',
        '--data_name': data_name,
        '--backbone_type': backbone,
        '--loss_name': 'proxy_anchor',
        **({'--resume': True} if resume else {}),
    }
    if data_name in ('sop', 'inshop'):
        flags['--recalls'] = {'sop': '1,10,100,1000', 'inshop': '1,10,20,30,40'}[data_name]
    for i in range(0, len(extra), 2):
        flags[extra[i]] = extra[i + 1]
    return 'train.py', flags


def test_dry_run_lists_the_full_grid(script, tmp_path):
    data_folders(tmp_path, ['car', 'cub', 'sop', 'inshop', 'notes'], prepared=['cub'])
    commands, _ = dry_run(script, tmp_path)
    expected = []
    for data_name in ('car', 'cub', 'sop', 'inshop'):
        if data_name != 'cub':  # cub is prepared already: no data_utils.py for it
            expected.append(('data_utils.py', {'--data_path': 'data', '--data_name': data_name}))
        expected += [train_run(data_name, backbone) for backbone in BACKBONES]
        if data_name != 'inshop':
            expected.append(train_run(data_name, 'inception', *LARGER))
    assert commands == expected
    assert not (tmp_path / 'results').exists()  # nothing ran


def test_dry_run_covers_only_the_data_present_and_passes_other_flags_on(script, tmp_path):
    data_folders(tmp_path, ['sop'], prepared=['sop'])
    commands, _ = dry_run(script, tmp_path, '--num_workers', '2')
    assert commands == [
        train_run('sop', backbone, '--num_workers', '2') for backbone in BACKBONES
    ] + [train_run('sop', 'inception', *LARGER, '--num_workers', '2')]


def test_finished_configurations_are_not_run_again(script, tmp_path):
    data_folders(tmp_path, ['car'], prepared=['car'])
    fabricate(tmp_path, 'car', 'resnet50', epochs=20)  # finished
    fabricate(tmp_path, 'car', 'googlenet', epochs=7)  # interrupted: resumes from its checkpoint
    (tmp_path / 'results' / 'car_googlenet_proxy_anchor_512_checkpoint.pth').write_bytes(b'')
    commands, comments = dry_run(script, tmp_path)
    assert commands == [
        train_run('car', 'inception'),
        train_run('car', 'googlenet', resume=True),
        train_run('car', 'inception', *LARGER),
    ]
    assert comments == [
        '# car_resnet50_proxy_anchor_512 already reached epoch 20: not trained again'
    ]
    commands, _ = dry_run(
        script, tmp_path, '--num_epochs', '25'
    )  # a longer schedule trains it further
    assert commands[0] == train_run('car', 'resnet50', '--num_epochs', '25')


# ----------------------------------------------------------------------------------------------------------------------
# the table and the figure


def fabricate(root, data_name, backbone, epochs=20, final=None, best=None, ranks=None, suffix=''):
    """A statistics CSV as train.py writes it: recall rising to `final` (fractions) at the last epoch, except at
    epoch `best`, higher than the final one, which the table must not report."""
    ranks = ranks or {'sop': [1, 10, 100, 1000], 'inshop': [1, 10, 20, 30, 40]}.get(
        data_name, [1, 2, 4, 8]
    )
    final = final or [0.5 + 0.1 * i for i in range(len(ranks))] + [0.3]  # recalls, then MAP@R
    rows = []
    for epoch in range(1, epochs + 1):
        scale = 0.8 + 0.2 * epoch / epochs
        row = {'train_loss': 2 / epoch, 'train_accuracy': 0.9 * scale}
        row.update({f'test_recall@{k}': value * scale for k, value in zip(ranks, final)})
        row.update({'test_map@r': final[-1] * scale, 'test_r_precision': final[-1] * scale + 0.05})
        rows.append(row)
    if best is not None:
        rows[best - 1]['test_recall@1'] = final[0] + 0.05
    folder = root / 'results'
    folder.mkdir(exist_ok=True)
    frame = pd.DataFrame(rows, index=pd.RangeIndex(1, epochs + 1, name='epoch'))
    frame.to_csv(
        folder / f'{data_name}_{backbone}_proxy_anchor_512{suffix}_statistics.csv',
        index_label='epoch',
    )


def read_table(path):
    """{data set title: {(backbone, row kind): [cells]}} from results/benchmarks.md."""
    tables, title, backbone = {}, None, None
    for line in path.read_text().splitlines():
        if line.startswith('## '):
            title = line[3:]
            tables[title] = {}
        elif line.startswith('| ') and title and not line.startswith('| Backbone'):
            cells = [cell.strip() for cell in line.strip('|').split('|')]
            backbone = cells[0] or backbone
            tables[title][backbone, cells[1]] = cells[2:]
        elif line.startswith('| Backbone'):
            tables[title]['header'] = [cell.strip() for cell in line.strip('|').split('|')][2:]
    return tables


def test_table_reports_the_final_epoch_beside_the_published_figures(script, tmp_path):
    fabricate(tmp_path, 'car', 'resnet50', final=[0.861, 0.922, 0.958, 0.971, 0.412], best=12)
    fabricate(tmp_path, 'cub', 'inception', epochs=5, final=[0.655, 0.77, 0.851, 0.906, 0.3])
    fabricate(tmp_path, 'sop', 'inception', final=[0.775, 0.9, 0.96, 0.99, 0.45])
    fabricate(
        tmp_path, 'sop', 'googlenet', ranks=[1, 2, 4, 8], final=[0.7, 0.75, 0.8, 0.85, 0.4]
    )  # wrong ranks
    fabricate(tmp_path, 'inshop', 'inception', final=[0.905, 0.978, 0.985, 0.99, 0.992, 0.6])
    # runs on folders of one's own images get their own tables, whatever the ranks, never a benchmark's
    fabricate(tmp_path, 'digits', 'inception', epochs=3, final=[0.965, 0.985, 0.99, 0.995, 0.534])
    fabricate(tmp_path, 'my_cars_2', 'resnet50', ranks=[1, 5], final=[0.4, 0.6, 0.2])
    (tmp_path / 'results' / 'digits_inception_proxy_anchor_64_statistics.csv').write_text(
        'not the tables\' dim'
    )
    status, out, err = script('reproduce', '--table', cwd=tmp_path)
    assert status == 0, err
    tables = read_table(tmp_path / 'results' / 'benchmarks.md')
    assert list(tables) == [
        'CARS196',
        'CUB200',
        'Stanford Online Products',
        'In-shop Clothes',
        'digits',
        'my_cars_2',
    ]

    car = tables['CARS196']
    assert car['header'] == ['R@1', 'R@2', 'R@4', 'R@8', 'MAP@R', 'Seeds']
    # the final epoch (86.1), not epoch 12 (91.1); published 87.0 / 92.5 / 95.6 / 97.4
    assert car['ResNet50', 'reproduced'] == ['86.1%', '92.2%', '95.8%', '97.1%', '41.2%', '1']
    assert car['ResNet50', 'published'][:4] == ['87.0%', '92.5%', '95.6%', '97.4%']
    assert car['ResNet50', 'difference'][:4] == ['-0.9', '-0.3', '+0.2', '-0.3']
    for backbone in ('Inception', 'GoogLeNet'):  # not run
        assert (
            car[backbone, 'reproduced'] == ['-'] * 5 + ['0 of 1']
            and car[backbone, 'difference'][:4] == ['-'] * 4
        )
    assert car['GoogLeNet', 'published'][:4] == ['78.8%', '86.2%', '91.5%', '95.1%']

    cub = tables['CUB200']
    # still training: not counted, but said
    assert cub['Inception', 'reproduced'] == ['-'] * 5 + ['0 of 1 (training: seed 1 at epoch 5)']
    assert cub['Inception', 'difference'][:4] == ['-'] * 4

    sop = tables['Stanford Online Products']
    assert sop['header'] == ['R@1', 'R@10', 'R@100', 'R@1000', 'MAP@R', 'Seeds']
    assert sop['Inception', 'reproduced'] == ['77.5%', '90.0%', '96.0%', '99.0%', '45.0%', '1']
    assert sop['Inception', 'published'][:4] == ['79.1%', '-', '-', '-']  # the paper's R@1 only
    assert sop['Inception', 'difference'][:4] == ['-1.6', '-', '-', '-']
    assert sop['GoogLeNet', 'reproduced'] == [
        '70.0%',
        '-',
        '-',
        '-',
        '40.0%',
        '1',
    ]  # run at 1,2,4,8: R@1 only
    assert sop['ResNet50', 'published'][:4] == ['-'] * 4

    inshop = tables['In-shop Clothes']
    assert inshop['header'] == ['R@1', 'R@10', 'R@20', 'R@30', 'R@40', 'MAP@R', 'Seeds']
    assert inshop['Inception', 'reproduced'] == [
        '90.5%',
        '97.8%',
        '98.5%',
        '99.0%',
        '99.2%',
        '60.0%',
        '1',
    ]
    assert inshop['Inception', 'published'][:5] == [
        '91.9%',
        '98.1%',
        '98.7%',
        '99.0%',
        '99.1%',
    ]  # official repo
    assert inshop['Inception', 'difference'][:5] == ['-1.4', '-0.3', '-0.2', '+0.0', '+0.1']

    digits = tables['digits']  # the quick start's run: 3 of 20 epochs
    assert digits['header'] == ['R@1', 'R@2', 'R@4', 'R@8', 'MAP@R', 'Seeds']
    assert digits['Inception', 'reproduced'] == ['-'] * 5 + ['0 of 1 (training: seed 1 at epoch 3)']
    assert set(digits) == {
        'header',
        ('Inception', 'reproduced'),
    }  # no published rows, no other backbones
    assert tables['my_cars_2']['header'] == ['R@1', 'R@5', 'MAP@R', 'Seeds']
    assert tables['my_cars_2']['ResNet50', 'reproduced'] == ['40.0%', '60.0%', '20.0%', '1']

    figure = tmp_path / 'results' / 'benchmarks.png'
    with Image.open(figure) as image:
        assert image.format == 'PNG' and image.size[0] > 1000
    assert not [name for name in os.listdir(tmp_path / 'results') if name.endswith('.tmp')]


def test_table_with_no_statistics_at_all(script, tmp_path):
    status, _, err = script('reproduce', '--table', cwd=tmp_path)
    assert status == 0, err
    tables = read_table(tmp_path / 'results' / 'benchmarks.md')
    for rows in tables.values():
        assert all(
            rows[backbone, 'reproduced'] == ['-'] * (len(rows['header']) - 1) + ['0 of 1']
            for backbone in ('ResNet50', 'Inception', 'GoogLeNet')
        )


def test_a_full_run_trains_the_grid_then_writes_the_table(script, tmp_path, monkeypatch):
    """Without --dry_run every command runs, in order (train.py replaced here by a fake that writes its CSV)."""
    data_folders(tmp_path, ['cub'], prepared=['cub'])
    expected, _ = dry_run(script, tmp_path)
    ran = []

    def fake_train(argv, **kwargs):
        args = load_script('train').get_args_parser().parse_args(argv[2:])
        ran.append(parse_command(argv))
        fabricate(
            tmp_path,
            args.data_name,
            args.backbone_type,
            epochs=args.num_epochs,
            final=[0.6, 0.7, 0.8, 0.9, 0.35],
            suffix='' if args.image_size == 224 else f'_image_size{args.image_size}',
        )
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(load_script('reproduce').subprocess, 'run', fake_train)
    status, out, err = script('reproduce', '--data_path', 'data', cwd=tmp_path)
    assert status == 0, err
    assert ran == expected and len(ran) == 4
    assert '[4/4] train cub_inception_proxy_anchor_512_image_size256' in out
    cub = read_table(tmp_path / 'results' / 'benchmarks.md')['CUB200']
    rows = ('ResNet50', 'Inception', 'GoogLeNet', 'Inception, 256 px')
    assert [cub[row, 'reproduced'][0] for row in rows] == ['60.0%'] * 4
    assert cub['Inception, 256 px', 'published'][:4] == ['71.1%', '-', '-', '-']  # the paper's R@1
    assert dry_run(script, tmp_path)[0] == []  # all finished: a second run has nothing left to do


def test_a_failed_run_stops_with_one_sentence(script, tmp_path, monkeypatch):
    data_folders(tmp_path, ['car'], prepared=['car'])
    reproduce = load_script('reproduce')
    monkeypatch.setattr(
        reproduce.subprocess, 'run', lambda argv, **kwargs: subprocess.CompletedProcess(argv, 1)
    )
    status, _, err = script('reproduce', '--data_path', 'data', cwd=tmp_path)
    assert 'train car_resnet50_proxy_anchor_512 failed' in error_sentence(status, err)


# ----------------------------------------------------------------------------------------------------------------------
# several seeds


def test_seeds_train_every_configuration_once_per_seed_with_the_other_flags(script, tmp_path):
    """--seeds 1,2,3 lists each configuration three times, seed 1 with the seed's command; other flags go along,
    and a run already finished under its own name is skipped."""
    data_folders(tmp_path, ['cub'], prepared=['cub'])
    fabricate(tmp_path, 'cub', 'resnet50', suffix='_margin0.2_seed2')
    commands, comments = dry_run(script, tmp_path, '--seeds', '1,2,3', '--margin', '0.2')
    expected = [
        train_run('cub', backbone, *larger, *seed, '--margin', '0.2')
        for backbone, larger in [(backbone, ()) for backbone in BACKBONES] + [('inception', LARGER)]
        for seed in ([], ['--seed', '2'], ['--seed', '3'])
    ]
    expected.remove(train_run('cub', 'resnet50', '--seed', '2', '--margin', '0.2'))
    assert commands == expected
    assert comments == [
        '# cub_resnet50_proxy_anchor_512_margin0.2_seed2 already reached epoch 20: not trained again'
    ]


@pytest.mark.parametrize(
    'flag',
    [
        'crop_type',
        'no_pretrained',
        'scale',
        'optimizer',
        'lr',
        'proxy_lr',
        'weight_decay',
        'lr_step',
        'lr_gamma',
        'batch_size',
        'warm_up',
        'amp',
        'val_fraction',
    ],
)
def test_the_table_finds_a_run_of_any_flag_off_its_default(script, tmp_path, flag):
    """reproduce.py --table with a recipe flag passed on reads the run train.py names after that flag, not the
    default run's."""
    from test_train_flags import OFF_DEFAULT

    flags = [f'--{flag}', *OFF_DEFAULT[flag][0]]
    train = load_script('train')
    name = train.prefix_of(train.get_args_parser().parse_args(['--data_name', 'cub', *flags]))
    fabricate(
        tmp_path,
        'cub',
        'resnet50',
        final=[0.71, 0.8, 0.9, 0.95, 0.3],
        suffix=name[len('cub_resnet50_proxy_anchor_512') :],
    )
    fabricate(
        tmp_path, 'cub', 'resnet50', final=[0.5, 0.6, 0.7, 0.8, 0.2]
    )  # the default run: not this table's
    status, out, err = script('reproduce', '--table', *flags, cwd=tmp_path)
    assert status == 0, err
    assert (
        read_table(tmp_path / 'results' / 'benchmarks.md')['CUB200']['ResNet50', 'reproduced'][0]
        == '71.0%'
    )


def test_table_reports_mean_and_sample_spread_over_the_finished_seeds(script, tmp_path):
    """Three seeds at R@1 70, 72 and 74 read 72.0 ± 2.0 (sample standard deviation); a seed still training is left
    out and said; one finished seed has no spread. The figure draws the spread as error bars."""
    for seed, r1 in ((1, 0.70), (2, 0.72), (3, 0.74)):
        fabricate(
            tmp_path,
            'cub',
            'resnet50',
            final=[r1, 0.8, 0.9, 0.95, 0.3 + seed / 100],
            suffix='_margin0.2' + ('' if seed == 1 else f'_seed{seed}'),
        )
    fabricate(tmp_path, 'cub', 'inception', final=[0.6, 0.7, 0.8, 0.9, 0.3], suffix='_margin0.2')
    fabricate(tmp_path, 'cub', 'inception', epochs=4, suffix='_margin0.2_seed2')
    fabricate(
        tmp_path, 'cub', 'googlenet', final=[0.9, 0.9, 0.9, 0.9, 0.9]
    )  # another margin: not this table's
    status, out, err = script(
        'reproduce', '--table', '--seeds', '1,2,3', '--margin', '0.2', cwd=tmp_path
    )
    assert status == 0, err
    cub = read_table(tmp_path / 'results' / 'benchmarks.md')['CUB200']
    assert cub['ResNet50', 'reproduced'] == [
        '72.0 ± 2.0',
        '80.0 ± 0.0',
        '90.0 ± 0.0',
        '95.0 ± 0.0',
        '32.0 ± 1.0',
        '3',
    ]
    assert cub['ResNet50', 'difference'][:4] == [
        '+2.0',
        '+0.4',
        '+3.1',
        '+2.8',
    ]  # against 70.0 79.6 86.9 92.2
    assert cub['Inception', 'reproduced'] == [
        '60.0%',
        '70.0%',
        '80.0%',
        '90.0%',
        '30.0%',
        '1 of 3 (training: seed 2 at epoch 4)',
    ]
    assert cub['GoogLeNet', 'reproduced'] == ['-'] * 5 + ['0 of 3']
    assert 'with --margin 0.2' in (tmp_path / 'results' / 'benchmarks.md').read_text()
    with Image.open(tmp_path / 'results' / 'benchmarks.png') as image:
        assert image.format == 'PNG'


# ----------------------------------------------------------------------------------------------------------------------
# several losses


def test_losses_train_each_configuration_once_per_loss_and_seed(script, tmp_path):
    """--losses lists every backbone x loss x seed, each with its --loss_name, the other flags passed on; a finished
    run of one loss is skipped under its own name."""
    data_folders(tmp_path, ['cub'], prepared=['cub'])
    fabricate(
        tmp_path, 'cub', 'resnet50', suffix='_images_per_class4_seed2'
    )  # proxy_anchor, seed 2: finished
    commands, comments = dry_run(
        script,
        tmp_path,
        '--backbones',
        'resnet50',
        '--losses',
        'proxy_anchor,multi_similarity',
        '--seeds',
        '1,2',
        '--images_per_class',
        '4',
    )
    expected = []
    for loss in ('proxy_anchor', 'multi_similarity'):
        for seed in ([], ['--seed', '2']):
            command = train_run('cub', 'resnet50', *seed, '--images_per_class', '4')
            command[1]['--loss_name'] = loss
            expected.append(command)
    del expected[1]
    assert commands == expected
    assert comments == [
        '# cub_resnet50_proxy_anchor_512_images_per_class4_seed2 already reached epoch 20: not '
        'trained again'
    ]


def test_table_has_a_row_per_backbone_and_loss(script, tmp_path):
    """--table --losses reads each loss's runs: Proxy-Anchor's rows carry the published figures, the others none."""
    (tmp_path / 'results').mkdir()
    for loss, r1 in (('proxy_anchor', 0.7), ('multi_similarity', 0.66)):
        frame = pd.DataFrame(
            {
                'train_loss': [1.0],
                'train_accuracy': [float('nan')],
                'test_recall@1': [r1],
                'test_recall@2': [0.8],
                'test_recall@4': [0.9],
                'test_recall@8': [0.95],
                'test_map@r': [0.3],
                'test_r_precision': [0.35],
            },
            index=pd.RangeIndex(1, 2, name='epoch'),
        )
        frame.to_csv(
            tmp_path / 'results' / f'cub_resnet50_{loss}_512_statistics.csv',
            index_label='epoch',
            na_rep='n/a',
        )
    status, _, err = script(
        'reproduce',
        '--table',
        '--backbones',
        'resnet50',
        '--losses',
        'proxy_anchor,multi_similarity',
        '--num_epochs',
        '1',
        cwd=tmp_path,
    )
    assert status == 0, err
    cub = read_table(tmp_path / 'results' / 'benchmarks.md')['CUB200']
    assert cub['ResNet50, proxy_anchor', 'reproduced'][0] == '70.0%'
    assert (
        cub['ResNet50, proxy_anchor', 'published'][0] == '70.0%'
    )  # the seed README's ResNet-50 CUB R@1
    assert cub['ResNet50, multi_similarity', 'reproduced'][0] == '66.0%'
    assert cub['ResNet50, multi_similarity', 'published'][:4] == ['-'] * 4
    assert (
        'losses proxy_anchor, multi_similarity'
        in (tmp_path / 'results' / 'benchmarks.md').read_text()
    )
