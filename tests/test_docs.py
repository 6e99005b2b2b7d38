"""The README and docs/*.md: their flag tables are the parsers' own, their links and the files they
name exist, every command they show is accepted by its script's parser, and their examples run.

Every code block says what it holds. `python` blocks are examples, and each runs in a test: the
ONNX Runtime example of docs/export.md in tests/test_run_export.py, which has an exported model for it,
the others here. `bash` blocks are commands: the README's quick start runs here on the digits demo
it writes, with one epoch instead of three; the others need a downloaded data set,
a GPU, a network or many minutes, so their commands (and those quoted in the text) are parsed by
their scripts' own parsers instead. `text` blocks are output and layouts, never run.
"""

import argparse
import glob
import importlib.util
import os
import re
import shlex
from typing import NamedTuple

import pytest

from conftest import ROOT
from script_runner import load_script, query_folder

spec = importlib.util.spec_from_file_location('docs_flags', os.path.join(ROOT, 'docs', 'flags.py'))
flags = importlib.util.module_from_spec(spec)
spec.loader.exec_module(flags)

PAGES = [os.path.relpath(path, ROOT) for path in flags.pages()]
LANGUAGES = ('bash', 'python', 'text')
QUICK_START = 'Quick start (CPU, no download)'
# python blocks that another test runs, with what it needs: (page, heading) -> that test's file
RUN_ELSEWHERE = {
    ('docs/export.md', 'Embedding one image exactly as PP does'): 'tests/test_run_export.py'
}


class Block(NamedTuple):
    page: str
    heading: str  # the heading the block stands under, without its #s
    language: str
    code: str


def read(page):
    """The text of a page, by its path from the repository root."""
    with open(os.path.join(ROOT, page)) as file:
        return file.read()


def code_blocks(page):
    """Every fenced code block of a page, in order."""
    blocks, heading, fence = [], '', None
    for line in read(page).split('\n'):
        if fence is None and line.startswith('```'):
            fence, language, code = line, line[3:].strip(), []
        elif fence is not None and line.startswith('```'):
            blocks.append(Block(page, heading, language, '\n'.join(code) + '\n'))
            fence = None
        elif fence is not None:
            code.append(line)
        elif line.startswith('#'):
            heading = line.lstrip('#').strip()
    return blocks


def code_block(page, heading, language='python'):
    """The one code block of this language under a heading of a page."""
    found = [
        block.code
        for block in code_blocks(page)
        if block.heading == heading and block.language == language
    ]
    assert len(found) == 1, f'{page} has {len(found)} {language} blocks under "{heading}"'
    return found[0]


def slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation but - and _ left out, - for spaces."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def prose(page):
    """A page's text outside code blocks and generated flag tables (the parsers' own words)."""
    text = re.sub(r'^```.*?^```', '', read(page), flags=re.S | re.M)
    return flags.TABLE.sub('', text)


# --------------------------------------------------------------------------------------------------
# flag tables


def test_flag_tables_are_the_parsers_own():
    tables = {
        name: flags.table(name, load_script(name).get_args_parser()) for name in flags.SCRIPTS
    }
    where = {}
    for page in PAGES:
        text = read(page)
        for match in flags.TABLE.finditer(text):
            assert match.group(2) in flags.SCRIPTS, f'{page}: {match.group(2)}.py has no parser'
            where.setdefault(match.group(2), []).append(page)
        assert flags.rewrite(text, tables) == text, f'{page} is stale: run python docs/flags.py'
    assert {name: len(pages) for name, pages in where.items()} == dict.fromkeys(flags.SCRIPTS, 1)


def test_a_flag_table_by_hand():
    parser = argparse.ArgumentParser()
    parser.add_argument('--path', default='/home/data', help='where <name>/ lies')
    group = parser.add_argument_group('model')
    group.add_argument('--kind', default='a', choices=['a', 'b'], help='a | b')
    group.add_argument('--fast', action='store_true', help='skip _slow_ steps')
    group.add_argument('--name', default=None, nargs='+', help='names')
    group.add_argument('--run', required=True, help='the run')
    assert flags.table('nothing', parser) == (
        '| flags | default | what it sets |\n'
        '|---|---|---|\n'
        '| `--path` | `/home/data` | where &lt;name&gt;/ lies |\n'
        '\n'
        '| model flags | default | what it sets |\n'
        '|---|---|---|\n'
        r'| `--kind` | `a` | a \| b; one of `a`, `b` |'
        '\n'
        r'| `--fast` | off | skip \_slow\_ steps |'
        '\n'
        '| `--name` | none | names; one or more |\n'
        '| `--run` | required | the run |\n'
    )


# --------------------------------------------------------------------------------------------------
# links, names and words


def test_every_docs_page_is_linked_from_the_readme():
    readme = read('README.md')
    assert [page for page in PAGES[1:] if f']({page})' not in readme] == []


def test_links_and_anchors_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r'\]\(([^)\s]+)\)', read(page)):
            if re.match(r'https?://', target):
                continue
            path, _, anchor = target.partition('#')
            path = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(os.path.join(ROOT, path)):
                broken.append(f'{page}: {target}')
                continue
            if anchor and anchor not in {
                slug(line.lstrip('#')) for line in prose(path).split('\n') if line.startswith('#')
            }:
                broken.append(f'{page}: {target}')
    assert broken == []


def test_the_files_they_name_exist():
    named = set()
    for page in PAGES:
        text = read(page)
        named |= set(re.findall(r'(?<![\w/.-])((?:tests|benchmarks|docs)/\w+\.(?:py|md))\b', text))
        named |= set(re.findall(r'`(\w+\.py)`', text))
    assert 'tests/test_golden_run.py' in named and 'train.py' in named
    assert sorted(name for name in named if not os.path.exists(os.path.join(ROOT, name))) == []


def test_no_words_that_only_this_projects_history_knows():
    for page in PAGES:
        text = prose(page)
        assert re.findall(r'\bissue \d+', text, re.I) == [], page  # work orders, not for readers
        assert re.findall(r'\bthe seed\b', text, re.I) == [], page  # the original implementation
    for path in glob.glob(os.path.join(ROOT, 'tests', '*.py')):  # a test says what it checks
        with open(path) as file:
            assert re.findall(r'\bissue \d+', file.read(), re.I) == [], path


# --------------------------------------------------------------------------------------------------
# commands


def commands():
    """Every `python <script>.py ...` or `torchrun ... <script>.py ...` command of the pages, in
    their bash blocks or quoted in their text, as (page, argv after the script, script name)."""
    found = []
    for page in PAGES:
        lines = [
            line
            for block in code_blocks(page)
            if block.language == 'bash'
            for line in block.code.split('\n')
        ]
        quoted = re.findall(r'`((?:python|torchrun) [^`]+)`', prose(page))
        lines += [' '.join(command.split()) for command in quoted]
        loop = {}
        for line in lines:
            words = shlex.split(line, comments=True)
            if words[:1] == ['for'] and 'in' in words:  # for NAME in A B C; do: check with A
                loop = {f'${words[1]}': words[words.index('in') + 1]}
            script = next(
                (i for i, word in enumerate(words) if re.fullmatch(r'[\w/]+\.py', word)), None
            )
            if words[:1] not in (['python'], ['torchrun']) or script is None:
                continue
            argv = []
            for word in words[script + 1 :]:
                if word == '...' and not (argv and argv[-1].startswith('--')):
                    continue  # "and more flags"; after a flag, "..." stands for its value
                argv.append(loop.get(word, word))
            found.append((page, argv, words[script][:-3]))
    return found


def test_every_command_is_accepted_by_its_scripts_parser():
    checked = []
    for page, argv, name in commands():
        if name not in flags.SCRIPTS:  # a benchmark, or a script without flags
            assert name.startswith('benchmarks/') or name in ('model', 'docs/flags'), (page, name)
            assert name.startswith('benchmarks/') or argv == [], (page, name, argv)
            continue
        if '--help' in argv:
            continue
        parser = load_script(name).get_args_parser()
        try:
            if name == 'reproduce':  # reproduce.py passes the flags it does not know to train.py
                argv = parser.parse_known_args(argv)[1]
                parser = load_script('train').get_args_parser()
            parser.parse_args(argv)
        except Exception as error:  # a UserError sentence, or a type check's
            pytest.fail(f'{page}: python {name}.py {shlex.join(argv)}: {error}')
        checked.append(name)
    assert set(checked) == set(flags.SCRIPTS) and len(checked) > 40


def test_the_quick_start_runs(script, tmp_path):
    lines = code_block('README.md', QUICK_START, 'bash').strip().split('\n')
    assert lines[0] == 'pip install -r requirements.txt'
    train, test = (line.replace('--num_epochs 3', '--num_epochs 1') for line in lines[1:])
    assert '--num_epochs 1' in train
    status, out, err = script('train', *shlex.split(train)[2:], cwd=tmp_path)
    assert status == 0, err
    printed = code_block('README.md', QUICK_START, 'text').split('\n')
    for line in printed[:3]:  # the demo's own lines; the figures after them depend on the machine
        assert line in out
    status, out, err = script('test', *shlex.split(test)[2:], cwd=tmp_path)
    assert status == 0, err
    assert 'wrote the query and its 8 nearest images' in out
    assert (query_folder(tmp_path / 'results', 'digit_7_0003') / 'retrieval.png').is_file()
    # the Report section's command names a data base the quick start leaves
    report = [
        line
        for block in code_blocks('README.md')
        for line in block.code.split('\n')
        if line.startswith('python test.py') and '--report' in line
    ]
    assert len(report) == 1
    status, out, err = script('test', *shlex.split(report[0])[2:], cwd=tmp_path)
    assert status == 0, err
    assert 'wrote the report on 200 queries' in out


# --------------------------------------------------------------------------------------------------
# Python examples

PYTHON = [block for page in PAGES for block in code_blocks(page) if block.language == 'python']


def test_every_block_says_what_it_holds():
    unsaid = [
        block[:3]
        for page in PAGES
        for block in code_blocks(page)
        if block.language not in LANGUAGES
    ]
    assert unsaid == []
    assert set(RUN_ELSEWHERE) <= {(block.page, block.heading) for block in PYTHON}


@pytest.mark.parametrize(
    'block',
    [block for block in PYTHON if (block.page, block.heading) not in RUN_ELSEWHERE],
    ids=lambda block: f'{block.page}: {block.heading}',
)
def test_python_example_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    example = {}
    exec(compile(block.code, block.page, 'exec'), example)
    for name, function in example.items():
        if name.startswith('test_'):  # an example of a test: it must pass
            function()
