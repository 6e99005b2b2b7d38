"""Write the flag tables of the docs from the scripts' own parsers: `python docs/flags.py`.

A table stands in a page between `<!-- flags of SCRIPT.py -->` and `<!-- end of flags -->`. It
lists every flag of that script's get_args_parser() with its default and help string, group by
group, so a flag added, renamed or given another default changes the docs with it;
tests/test_docs.py fails while a table differs from what this writes.
"""
import argparse
import glob
import importlib.util
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from runtime import atomic_path  # noqa: E402

SCRIPTS = ('data_utils', 'train', 'test', 'export', 'reproduce', 'tune')
# defaults computed on the machine the script runs on, in words instead of this machine's number
MACHINE_DEFAULTS = {('data_utils', '--workers'): 'all cores',
                    ('train', '--num_workers'): 'min(8, cores / processes)',
                    ('tune', '--num_workers'): 'min(8, cores / processes)'}
TABLE = re.compile(r'(<!-- flags of (\w+)\.py -->\n)(.*?)(<!-- end of flags -->)', re.S)


def pages():
    """The README and every page under docs/, by path."""
    docs = sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
    return [os.path.join(ROOT, 'README.md')] + docs


def load_parser(name):
    """The parser of ROOT/<name>.py, loaded by its path (`import test` may give the standard
    library's package of that name)."""
    path = os.path.join(ROOT, f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'pp_flags_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_args_parser()


def markdown(text):
    """Help text as table text: no cell breaks, tags or emphasis that the help does not mean."""
    text = text.replace('|', r'\|').replace('<', '&lt;').replace('>', '&gt;').replace('*', r'\*')
    return re.sub(r'(?<!\w)_|_(?!\w)', r'\_', text)


def default_of(name, action):
    """The default as the table shows it."""
    if (name, action.option_strings[-1]) in MACHINE_DEFAULTS:
        return MACHINE_DEFAULTS[name, action.option_strings[-1]]
    if action.required:
        return 'required'
    if action.nargs == 0:
        return 'on' if action.default else 'off'
    if action.default is None or action.default == '':
        return 'none'
    return f'`{action.default}`'


def table(name, parser):
    """The Markdown table of a script's flags, one section per argument group that holds any."""
    lines = []
    for group in parser._action_groups:
        actions = [action for action in group._group_actions
                   if not isinstance(action, argparse._HelpAction)]
        if not actions:
            continue
        untitled = group.title in ('options', 'optional arguments')
        lines += ['', f'| {"" if untitled else group.title + " "}flags | default | what it sets |',
                  '|---|---|---|']
        for action in actions:
            text = markdown(action.help)
            if action.choices is not None:
                text += f'; one of {", ".join(f"`{choice}`" for choice in action.choices)}'
            if action.nargs in ('+', '*'):
                text += '; one or more'
            flag = ', '.join(action.option_strings)
            lines.append(f'| `{flag}` | {default_of(name, action)} | {text} |')
    return '\n'.join(lines[1:]) + '\n'


def rewrite(text, tables):
    """The page text with each flag table replaced by tables[script]."""
    return TABLE.sub(lambda match: match.group(1) + tables[match.group(2)] + match.group(4), text)


def main():
    """Rewrite every page whose flag tables are not the parsers' own."""
    tables = {name: table(name, load_parser(name)) for name in SCRIPTS}
    for path in pages():
        with open(path) as file:
            text = file.read()
        if rewrite(text, tables) != text:
            with atomic_path(path) as tmp, open(tmp, 'w') as file:
                file.write(rewrite(text, tables))
            print(f'rewrote the flag tables of {os.path.relpath(path, ROOT)}')


if __name__ == '__main__':
    main()
