"""Render `nbs/index.ipynb` (the docs home) into `README.md`, or check that the two agree.

nbdev's own `nbdev_readme` needs Quarto; this does the same job for our plain markdown home page.
Usage: `python tools/make_readme.py` writes README.md; `python tools/make_readme.py --check` fails when it is stale.
"""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def render(nb_path: Path) -> str:
    "Markdown cells as they are; code cells (without nbdev directives) as fenced python blocks."
    cells = json.loads(nb_path.read_text(encoding='utf-8'))['cells']
    parts = []
    for cell in cells:
        src = ''.join(cell['source']).strip('\n')
        if cell['cell_type'] == 'code':
            lines = [l for l in src.splitlines() if not l.startswith('#|')]
            if not lines: continue
            src = '```python\n' + '\n'.join(lines) + '\n```'
        parts.append(src)
    return '\n\n'.join(parts) + '\n'

def main(argv):
    text = render(root/'nbs'/'index.ipynb')
    readme = root/'README.md'
    if '--check' in argv:
        if not readme.exists() or readme.read_text(encoding='utf-8') != text:
            print('README.md is out of step with nbs/index.ipynb: run `python tools/make_readme.py`', file=sys.stderr)
            return 1
        return 0
    readme.write_text(text, encoding='utf-8')
    return 0

if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
