"""A small Sphinx extension: nbdev's inline parameter docs in the API reference, and a link to each name's notebook.

nbdev documents parameters with a comment after each one (`arg:type, # what it is`: fastcore's "docments"), which
autodoc does not read. `autodoc-process-docstring` appends them as a field list, and a line that links the entry to
the notebook (and the anchor) that defines it, read from nbdev's `dlcoders/_modidx.py` via `_nbmap.json`.
"""
import json, re
from pathlib import Path

_re_name = re.compile(r'(?<![`\w])([A-Za-z]\w*_)(?![`\w])')   # `foo_` would be an RST reference: quote it


def _rst(s):
    "nbdev's markdown docstrings, made safe to read as reStructuredText (`names` stay interpreted text: links)"
    if not s: return ''
    if s.count('`') % 2: s = s.replace('`', "'")   # unbalanced backticks: read them as plain quotes
    parts = s.split('`')
    for i in range(0, len(parts), 2):
        p = parts[i].replace('\\', '\\\\').replace('*', '\\*').replace('|', '\\|')
        p = _re_name.sub(r'``\1``', p)
        # RST wants a space or punctuation around `interpreted text`: `Pipeline`s -> `Pipeline`\ s (no space shown)
        if i > 0 and re.match(r'\w', p): p = '\\ ' + p
        if i < len(parts)-1 and re.search(r'\w$', p): p = p + '\\ '
        parts[i] = p
    return '`'.join(parts)


def _docments(obj):
    from fastcore.docments import docments
    try: d = docments(obj, full=True)
    except Exception: return {}
    return d


def process_docstring(app, what, name, obj, options, lines):
    if what not in ('function', 'class', 'method', 'property', 'exception', 'staticmethod', 'classmethod'): return
    text = '\n'.join(lines)
    lines.clear()
    if text.strip(): lines.extend(_rst(text).splitlines())
    if what != 'property':
        fields = []
        for k, v in _docments(obj).items():
            doc = v.get('docment') if isinstance(v, dict) else None
            if not doc: continue
            if k == 'return': fields.append(f':returns: {_rst(doc)}')
            elif k != 'self': fields.append(f':param {k}: {_rst(doc)}')
        if fields: lines.extend([''] + fields)
    page = app.env.nbmap.get(name)
    if page:
        html, nb = page
        if html.endswith('_'): html = html[:-1] + '\\_'   # a trailing _ would make the URL a reference name
        lines.extend(['', f'Defined in notebook `{nb} <../{html}>`__.'])


def load_map(app):
    p = Path(app.srcdir)/'_nbmap.json'
    app.env.nbmap = json.loads(p.read_text()) if p.exists() else {}


def setup(app):
    app.connect('builder-inited', load_map)
    app.connect('autodoc-process-docstring', process_docstring)
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
