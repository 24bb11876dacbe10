"""Build the documentation site without Quarto (`make docs`): the pages `nbdev_docs` would render, made by Sphinx.

    python tools/build_docs.py [--out _build/site] [--no-exec]

1. Outputs. Every notebook in nbs/ needs an executed copy in _build/nbs (tools/run_nbs.py: `tools/test.sh` makes them
   while it tests the notebooks, so CI runs each notebook once). Copies that are missing, or stale (the notebook or
   the library changed since), are made now, the way `nbdev_test` runs notebooks; a failing notebook fails the build.
   `--no-exec` skips this and renders stale notebooks without outputs (a quick look at the text).
2. nbdev's processing, exactly as `nbdev_docs` does it before calling Quarto (`nbdev.processors.FilterDefaults`):
   frontmatter, hidden and exported cells, `show_doc` after each exported name, links to the API -> _build/proc.
3. What Quarto would read from cell options (`#| echo: false`, `#| output: false`, `#| include: false`), the title
   and description, and links between notebooks are turned into what Sphinx + MyST-NB read -> _build/docs_src, with one
   page per notebook (named like Quarto's: `05_pet_breeds.ipynb` -> `pet_breeds.html`) in the order of nbs/ (the
   order of nbdev's sidebar), and one API page per module listing every name of nbdev's `dlcoders/_modidx.py`.
4. `sphinx-build` (theme furo: sidebar and search box; search index and MathJax local) -> _build/site.
No list of notebooks is kept by hand: whatever notebooks nbs/ holds are built, in name order, index first.
"""
import argparse, json, os, re, shutil, subprocess, sys, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'tools'))
import run_nbs  # noqa: E402

BUILD = ROOT/'_build'
PROC, SRC = BUILD/'proc', BUILD/'docs_src'
CONF = ROOT/'tools'/'docs'
WIDGET_MIMES = ('application/vnd.jupyter.widget-view+json', 'application/vnd.jupyter.widget-state+json')


def doc_notebooks():
    "Every notebook of nbs/ in the order of nbdev's sidebar: index first, then by file name"
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    nbs = get_config().nbs_path
    files = sorted(nbglob(nbs, as_path=True, skip_folder_re=r'(?:^[_.]|^www\$)'), key=lambda p: (p.name != 'index.ipynb', str(p)))
    return [Path(f).absolute() for f in files]


def ensure_executed(files, no_exec=False):
    "Executed copies for `files` in _build/nbs; returns the path to read for each notebook"
    lib = run_nbs.lib_hash()
    stale = [f for f in files if not run_nbs.is_fresh(f, lib=lib)]
    if stale and not no_exec:
        print(f'== executing {len(stale)} notebook(s) with no up-to-date executed copy: ' + ' '.join(f.name for f in stale))
        if not run_nbs.run_all(stale, timing=False): sys.exit('FAIL: a notebook failed, so the site would miss its outputs')
        stale = []
    elif stale:
        # --no-exec: an executed copy, even a stale one, beats none; the rest are rendered without outputs
        stale = [f for f in stale if not (run_nbs.OUT/f.name).exists()]
        print(f'== --no-exec: {len(stale)} notebook(s) rendered without outputs')
    return [f if f in stale else run_nbs.OUT/f.name for f in files]


def nbdev_process(srcs):
    "nbdev's own docs processing (what `nbdev_docs` hands to Quarto) of each executed notebook, into _build/proc"
    from nbdev import serve_drv
    from nbdev.processors import FilterDefaults
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    cfg = get_config()
    PROC.mkdir(parents=True, exist_ok=True)
    newest = max(cfg.config_file.stat().st_mtime, (cfg.lib_path/'_modidx.py').stat().st_mtime)
    res, errors = [], []
    for src in srcs:
        dst = PROC/src.name
        if not dst.exists() or dst.stat().st_mtime < max(src.stat().st_mtime, newest):
            with working_directory(cfg.nbs_path), warnings.catch_warnings():
                warnings.simplefilter('ignore')
                try: serve_drv.main((src, dst, FilterDefaults))
                except Exception as e:
                    # what `nbdev_docs` would stop on; the page is still made, without its show_doc entries
                    errors.append(f'{src.name}: {e}')
                    serve_drv.main((src, dst, _NoShowDoc))
        res.append(dst)
    return res, errors


class _NoShowDoc:
    def __call__(self, nb):
        from nbdev.processors import FilterDefaults
        from nbdev.process import NBProcessor
        procs = [p for p in FilterDefaults().procs() if p.__name__ not in ('exec_show_docs', 'add_show_docs')]
        return NBProcessor(nb=nb, procs=procs).process()


_re_opt = re.compile(r'^\s*#\|\s*([\w-]+)\s*:\s*(.*?)\s*$')


def _cell_options(src):
    "Quarto's `#| key: value` options at the top of a code cell, and the code without them"
    lines, opts = src.splitlines(keepends=True), {}
    while lines and _re_opt.match(lines[0]):
        k, v = _re_opt.match(lines[0]).groups(); opts[k] = v.strip('"\'').lower(); lines.pop(0)
    while lines and lines[0].lstrip().startswith('#|'): lines.pop(0)
    return opts, ''.join(lines)


def _frontmatter(cell):
    import yaml
    s = cell['source'] if isinstance(cell['source'], str) else ''.join(cell['source'])
    m = re.match(r'\s*---\s*\n(.*?)\n---', s, re.S)
    return (yaml.safe_load(m.group(1)) or {}) if m else {}


class Linker:
    "Rewrite nbdev's absolute doc links and links to `NN_name.ipynb` into links inside this site"
    def __init__(self, pages, base, api):
        # pages: 'NN_name.ipynb' -> 'name.html'; api: nbdev's 'name.html#anchor' -> our 'api/module.html#module.name'
        self.pages, self.base, self.api = pages, base.rstrip('/') + '/', api

    def __call__(self, s, prefix=''):
        # a name nbdev links to its show_doc entry links to its API entry here (which links to the notebook)
        s = re.sub(re.escape(self.base) + r'([\w.-]+\.html#[\w.-]+)', lambda m: prefix + self.api.get(m.group(1), m.group(1)), s)
        s = s.replace(self.base, prefix)
        return re.sub(r'\]\((?!https?:|#)([^)#\s]+\.ipynb)(#[^)\s]*)?\)',
                      lambda m: f'](' + prefix + self.pages.get(Path(m.group(1)).name, m.group(1)) + (m.group(2) or '') + ')', s)


_re_sd_head = re.compile(r'^#{2,4} (\S.*)$', re.M)
_re_attrs = re.compile(r'\)\{[^}]*\}')


def _show_doc_md(md):
    "show_doc's markdown for a Quarto page -> for a MyST-NB page: an HTML heading with Quarto's anchor, no attributes"
    md = _re_attrs.sub(')', md)
    md = re.sub(r'^---\s*$', '', md, flags=re.M)
    def head(m):
        nm = m.group(1).strip()
        return f'<h4 class="nbdev-showdoc" id="{nm.lower()}"><code>{nm}</code></h4>'
    return _re_sd_head.sub(head, md, count=1)


def _lines(x): return ''.join(x) if isinstance(x, list) else (x or '')


def to_sphinx_nb(nb, title_fallback, link):
    "A processed notebook (nbdev's, for Quarto) -> a notebook MyST-NB renders the same way"
    cells = nb['cells']
    fm = _frontmatter(cells[0]) if cells and cells[0]['cell_type'] == 'raw' else {}
    if fm: cells = cells[1:]
    title = fm.get('title')
    if not title:
        print(f'WARNING: {title_fallback}: no "# Title" in its first markdown cell (nbdev and Quarto need one)')
        title = title_fallback
    head = f'# {title}\n'
    if fm.get('description'): head += f'\n<p class="nbdev-description">{fm["description"]}</p>\n'
    out = [{'cell_type': 'markdown', 'metadata': {}, 'source': link(head)}]
    for c in cells:
        if 'source' not in c or c['cell_type'] == 'raw': continue
        c.pop('has_sd', None)   # nbdev's marker on the show_doc cells it adds: not a notebook field
        src = _lines(c['source'])
        if c['cell_type'] == 'markdown':
            if src.strip().startswith('<!-- WARNING'): continue
            c['source'] = link(src)
            out.append(c); continue
        opts, code = _cell_options(src)
        if opts.get('include') == 'false': continue
        tags = []
        if opts.get('echo') == 'false' or not code.strip(): tags.append('remove-input')
        if opts.get('output') == 'false': tags.append('remove-output')
        outs = []
        for o in c.get('outputs', []):
            d = o.get('data')
            if d is not None:
                for k in WIDGET_MIMES: d.pop(k, None)
                if 'text/markdown' in d:
                    md = _lines(d['text/markdown'])
                    d['text/markdown'] = link(_show_doc_md(md) if opts.get('output') == 'asis' else md)
                    d.pop('text/plain', None)
                if not d: continue
            outs.append(o)
        if not code.strip() and not outs: continue
        c['source'], c['outputs'] = code, outs
        c['metadata'] = {'tags': tags} if tags else {}
        out.append(c)
    nb['cells'] = out
    nb['metadata'] = {k: v for k, v in nb.get('metadata', {}).items() if k in ('kernelspec', 'language_info')}
    nb['metadata'].setdefault('kernelspec', {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'})
    return nb, title


def api_pages(nbmap_pages):
    "One MyST page per module: autodoc entries for every name in nbdev's _modidx; and the map name -> notebook"
    from dlcoders._modidx import d
    syms, nbmap, mods = d['syms'], {}, []
    (SRC/'api').mkdir(parents=True, exist_ok=True)
    for mod, names in sorted(syms.items()):
        if not names: continue
        tops = {}
        for full, (url, _) in names.items():
            rel = full[len(mod)+1:]
            page = url.split('#')[0]
            nbmap[full] = (url, nbmap_pages.get(page, page))
            top, _, meth = rel.partition('.')
            tops.setdefault(top, [])
            if meth and '.' not in meth: tops[top].append(meth)
        lines = [f'# `{mod}`', '']
        nb = nbmap_pages.get(next(iter(names.values()))[0].split('#')[0])
        if nb: lines += [f'Defined in notebook [{nb}](../{next(iter(names.values()))[0].split("#")[0]}).', '']
        lines += ['```{eval-rst}', f'.. currentmodule:: {mod}', '']
        for top, meths in tops.items():
            try: obj = getattr(__import__(mod, fromlist=[top]), top)
            except Exception: obj = None
            if isinstance(obj, type) and obj.__module__ != mod and meths:
                # methods this module adds to a class defined elsewhere (fastcore's @patch): document just those
                lines += [f'.. automethod:: {top}.{m}' for m in meths if m != '__init__']
            elif isinstance(obj, type):
                kind = 'autoexception' if issubclass(obj, BaseException) else 'autoclass'
                lines.append(f'.. {kind}:: {top}')
                dunder = [m for m in meths if m.startswith('__') and m.endswith('__') and m != '__init__']
                private = [m for m in meths if m.startswith('_') and not m.startswith('__')]
                public = [m for m in meths if not m.startswith('_')]
                if public: lines.append(f'   :members: {", ".join(public)}')
                if private: lines.append(f'   :private-members: {", ".join(private)}')
                if dunder: lines.append(f'   :special-members: {", ".join(dunder)}')
                if meths: lines.append('   :undoc-members:')
            else: lines.append(f'.. autofunction:: {top}')
            lines.append('')
        lines += ['```', '']
        (SRC/'api'/f'{mod}.md').write_text('\n'.join(lines))
        mods.append(mod)
    idx = ['# API reference', '',
           'Every name the library exports, module by module: its signature, the parameters as the notebooks document '
           'them, and a link to the notebook that defines and explains it.', '',
           '```{toctree}', ':maxdepth: 1', ''] + mods + ['```', '']
    (SRC/'api'/'index.md').write_text('\n'.join(idx))
    (SRC/'_nbmap.json').write_text(json.dumps({k: v for k, v in nbmap.items()}))
    return mods


def build(out=BUILD/'site', no_exec=False, jobs='auto', strict=False, only_execute=False):
    from nbdev.config import get_config
    cfg = get_config()
    t0 = time.time()
    files = doc_notebooks()
    srcs = ensure_executed(files, no_exec)
    if only_execute: return print(f'== executed copies of {len(files)} notebooks are in {run_nbs.OUT.relative_to(ROOT)}')
    t1 = time.time()
    procs, errors = nbdev_process(srcs)
    t2 = time.time()
    if SRC.exists(): shutil.rmtree(SRC)
    SRC.mkdir(parents=True)
    pages = {}
    from nbdev.frontmatter import _nbpath2html
    for f in files: pages[f.name] = _nbpath2html(Path(f.name)).name
    base = f'{cfg.doc_host}{cfg.doc_baseurl}'
    from dlcoders._modidx import d as modidx
    api = {url: f'api/{mod}.html#{full.removesuffix(".__init__")}' for mod, names in modidx['syms'].items() for full, (url, _) in names.items()}
    linker = Linker(pages, base, api)
    docs = []
    for f, p in zip(files, procs):
        nb = json.loads(p.read_text(encoding='utf-8'))
        name = Path(pages[f.name]).stem
        nb, title = to_sphinx_nb(nb, f.stem, linker)
        (SRC/f'{name}.ipynb').write_text(json.dumps(nb, indent=1), encoding='utf-8')
        docs.append(name)
    api_pages({v: k.removesuffix('.ipynb') for k, v in pages.items()})
    # the sidebar: every notebook in order (index is the home page), then the API reference
    idx = json.loads((SRC/'index.ipynb').read_text(encoding='utf-8'))
    toc = ['```{toctree}', ':hidden:', ':caption: Chapters', ''] + [d for d in docs if d != 'index'] + ['```', '',
           '```{toctree}', ':hidden:', ':caption: Reference', '', 'api/index', '```', '']
    idx['cells'].append({'cell_type': 'markdown', 'metadata': {}, 'source': '\n'.join(toc)})
    (SRC/'index.ipynb').write_text(json.dumps(idx, indent=1), encoding='utf-8')
    t3 = time.time()
    cmd = [sys.executable, '-m', 'sphinx', '-b', 'html', '-c', str(CONF), '-j', str(jobs), '-q', '-E',
           str(SRC), str(out), '-d', str(BUILD/'doctrees')]
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore'}
    r = subprocess.run(cmd, cwd=ROOT, env=env)
    if r.returncode: sys.exit(f'FAIL: sphinx-build exited {r.returncode}')
    t4 = time.time()
    print(f'== site in {Path(out).relative_to(ROOT) if Path(out).is_relative_to(ROOT) else out}/index.html: '
          f'{len(docs)} notebook pages, API reference; executing {t1-t0:.0f} s, nbdev processing {t2-t1:.0f} s, '
          f'sources {t3-t2:.0f} s, sphinx {t4-t3:.0f} s')
    if errors:
        msg = ("nbdev's docs processing (the step `nbdev_docs` runs before Quarto) failed on these notebooks, whose pages "
               "lack their show_doc entries; `nbdev_docs` stops on the same error. nbdev re-runs the exported cells and "
               "every cell that imports, so keep imports in cells of their own:\n  " +
               '\n  '.join(e.split(' :')[0] for e in errors))
        if strict: sys.exit('FAIL: ' + msg + '\n' + '\n'.join(errors))
        print('WARNING: ' + msg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', default=str(BUILD/'site'))
    ap.add_argument('--no-exec', action='store_true', help='execute nothing: use executed copies even if stale, render notebooks without one with no outputs')
    ap.add_argument('--strict', action='store_true', help="fail when nbdev's processing fails on a notebook")
    ap.add_argument('--only-execute', action='store_true', help='only make the executed copies (for `make docs-quarto`)')
    ap.add_argument('--jobs', default='auto', help='sphinx-build -j')
    a = ap.parse_args(argv)
    build(Path(a.out).absolute(), a.no_exec, a.jobs, a.strict, a.only_execute)


if __name__ == '__main__': main()
