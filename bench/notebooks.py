"""How the chapters read, measured from the notebooks' JSON (issue 10's table), for this project or any nbdev one.

For each notebook of `--nbs` (default nbs/; fastcore's nbs/01_basics.ipynb is the yardstick we compare to):
- exported lines per `#| export` cell: median and 90th percentile;
- public functions and classes followed by an example within a few cells: of the names an exported
  cell defines (not starting with `_`), the share that a later non-exported code cell within
  `--within` cells uses (its name appears there);
- code cells whose output a reader sees: code cells with saved outputs (what the docs site and GitHub show),
  of all code cells;
- exported lines over 100 characters;
- `show_doc` calls, and whether the test-import cell is hidden (`#| hide`).

    python bench/notebooks.py [--nbs nbs] [--within 2] [paths ...]
"""
import argparse
import ast
import json
import re
import statistics
from pathlib import Path


def code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())['cells'] if c['cell_type'] == 'code']


def directives(source: str) -> set:
    return {m.group(1) for m in re.finditer(r'^#\|\s*(\w+)', source, re.M)}


def body(source: str) -> list[str]:
    "The code lines of a cell, without nbdev directives and blank lines."
    return [line for line in source.splitlines() if line.strip() and not line.lstrip().startswith('#|')]


def defined_names(source: str) -> list[str]:
    try: tree = ast.parse(source)
    except SyntaxError: return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and not n.name.startswith('_')]


def measure(paths: list[Path], within: int) -> dict:
    exported_lengths, hidden = [], []
    long_lines = exported_lines = names = shown = seen = code = show_docs = 0
    for path in paths:
        cells = code_cells(path)
        for i, cell in enumerate(cells):
            source = ''.join(cell['source'])
            flags = directives(source)
            code += 1
            if 'export' in flags or 'exports' in flags:
                lines = body(source)
                exported_lengths.append(len(lines))
                exported_lines += len(lines)
                long_lines += sum(len(line) > 100 for line in lines)
                for name in defined_names(source):
                    names += 1
                    later = [''.join(c['source']) for c in cells[i + 1:i + 1 + within]]
                    shown += any(re.search(rf'\b{re.escape(name)}\b', s) and not directives(s) & {'export', 'exports'}
                                 for s in later)
            else:
                if cell.get('outputs'): seen += 1
                show_docs += len(re.findall(r'\bshow_doc\(', source))
            if re.search(r'from fastcore\.test import', source): hidden.append('hide' in flags)
    quantiles = statistics.quantiles(exported_lengths, n=10) if len(exported_lengths) > 1 else [0] * 9
    return {'exported lines per cell, median': statistics.median(exported_lengths or [0]),
            'exported lines per cell, 90th percentile': round(quantiles[8], 1),
            'public functions followed by an example': f'{shown / max(names, 1):.0%} of {names}',
            'code cells whose output a reader sees': f'{seen / max(code, 1):.0%} of {code}',
            'exported lines over 100 characters': f'{long_lines / max(exported_lines, 1):.0%} of {exported_lines}',
            'show_doc calls': show_docs, 'test imports hidden': f'{sum(hidden)} of {len(hidden)}'}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('paths', nargs='*', type=Path)
    parser.add_argument('--nbs', type=Path, default=Path('nbs'))
    parser.add_argument('--within', type=int, default=2, help='cells after a definition that count as "followed by"')
    args = parser.parse_args()
    paths = args.paths or sorted(p for p in args.nbs.glob('[0-9]*.ipynb'))
    for key, value in measure(paths, args.within).items(): print(f'{key}: {value}')


if __name__ == '__main__':
    main()
