"""Run the notebooks the way `nbdev_test` does, and keep executed copies for the docs site.

    python tools/run_nbs.py [NOTEBOOK_OR_GLOB ...] [--timing] [--flags "slow"] [--n_workers N] [--out DIR]

Each notebook runs in execnb's `CaptureShell` from inside nbs/, cells flagged with a `tst_flags` flag of settings.ini
(`#| slow`) or `#| eval: false` are skipped, and a notebook stops at its first error: the rules of `nbdev_test`.
Notebooks run two at a time on two cores (`nbdev_test`'s default). What differs: each notebook that passes is saved,
with its outputs, to `_build/nbs/NAME.ipynb` (git-ignored, never into nbs/), stamped with a fingerprint of its source
and of the library, so that `tools/build_docs.py` reuses it instead of running the notebook a second time.
A notebook that fails leaves no copy behind. Exits 1, naming the failed notebooks, if any failed.
"""
import argparse, hashlib, json, os, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT/'_build'/'nbs'
STAMP = 'dlcoders_executed'


def lib_hash(lib=None):
    "md5 of every .py file of the library: executed outputs are stale when the library changes"
    lib = Path(lib or ROOT/'dlcoders')
    h = hashlib.md5()
    for p in sorted(lib.rglob('*.py')):
        if '__pycache__' in p.parts: continue
        h.update(str(p.relative_to(lib)).encode()); h.update(p.read_bytes())
    return h.hexdigest()


def nb_hash(fn): return hashlib.md5(Path(fn).read_bytes()).hexdigest()


def fingerprint(fn, lib=None, flags=''): return {'source_md5': nb_hash(fn), 'lib_md5': lib or lib_hash(), 'flags': flags}


def is_fresh(fn, out=OUT, lib=None, flags=''):
    "Is there an executed copy of notebook `fn` in `out`, made from this source, library and set of forced flags?"
    dst = Path(out)/Path(fn).name
    if not dst.exists(): return False
    try: meta = json.loads(dst.read_text(encoding='utf-8'))['metadata'].get(STAMP, {})
    except (ValueError, KeyError): return False
    return meta == fingerprint(fn, lib, flags)


def run_nb(fn, skip_flags=(), force_flags=(), out=OUT, lib=None, basepath=None, showerr=True):
    "Execute notebook `fn` as `nbdev.test.test_nb` does; on success write it with its outputs to `out`"
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from fastcore.basics import str2bool
    from nbdev.process import NBProcessor, extract_directives, nb_lang
    from nbdev.frontmatter import FrontmatterProc
    fn = Path(fn)
    if basepath and str(basepath) not in sys.path: sys.path.insert(0, str(basepath))
    os.environ['IN_TEST'] = '1'
    flags = set(skip_flags) - set(force_flags)
    dst = Path(out)/fn.name
    if dst.exists(): dst.unlink()
    fm = getattr(NBProcessor(fn, procs=FrontmatterProc, process=True).nb, 'frontmatter_', {})
    nb = read_nb(fn)
    lang = nb_lang(nb)
    for cell in nb.cells: cell.directives_ = extract_directives(cell, remove=False, lang=lang)
    skip_all = str2bool(fm.get('skip_exec', False)) or lang != 'python'

    def _no_eval(cell):
        if cell.cell_type != 'code': return True
        if 'nbdev_export'+'(' in cell.source: return True
        direc = getattr(cell, 'directives_', {}) or {}
        if direc.get('eval:', [''])[0].lower() == 'false': return True
        return flags & direc.keys()

    start = time.time()
    if not skip_all:
        k = CaptureShell(fn)
        try:
            with working_directory(fn.parent): k.run_all(nb, exc_stop=True, preproc=_no_eval)
        except BaseException:
            if showerr: sys.stderr.write(k.prettytb(fname=fn)+'\n')
            return False, time.time()-start
    took = time.time()-start
    nb.metadata[STAMP] = fingerprint(fn, lib, ' '.join(sorted(force_flags)))
    Path(out).mkdir(parents=True, exist_ok=True)
    write_nb(nb, dst)
    return True, took


def notebooks(paths=None):
    "The notebooks `nbdev_test` would pick for `paths` (all of nbs/ by default), sorted by name"
    from nbdev.doclinks import nbglob
    from nbdev.test import _keep_file
    files = []
    for p in (paths or [None]): files += list(nbglob(p, as_path=True))
    return [f.absolute() for f in sorted(set(files)) if _keep_file(f, '.notest')]


def run_all(files, flags='', n_workers=None, out=OUT, timing=False):
    "Run `files` in parallel like `nbdev_test`; returns True when every notebook passed"
    from fastcore.parallel import parallel
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    from fastcore.parallel import num_cpus
    cfg = get_config()
    if not files: print('No files were eligible for testing'); return True
    if n_workers is None: n_workers = 0 if len(files) == 1 else min(num_cpus(), 8)
    lib = lib_hash(cfg.lib_path)
    # IPython's shell replaces sys.modules['__main__'] in a worker, so the worker must find `run_nb` in a module
    if str(Path(__file__).parent) not in sys.path: sys.path.insert(0, str(Path(__file__).parent))
    from run_nbs import run_nb as _run_nb
    with working_directory(cfg.nbs_path):
        results = parallel(_run_nb, files, skip_flags=cfg.tst_flags.split(), force_flags=flags.split(), out=out,
                           lib=lib, basepath=cfg.config_path, n_workers=n_workers, pause=0.01)
    passed, times = zip(*results)
    if all(passed): print('Success.')
    else:
        failed = '\n\t'.join(f.name for p, f in zip(passed, files) if not p)
        sys.stderr.write(f"\nnbdev Tests Failed On The Following Notebooks:\n{'='*50}\n\t{failed}\n")
    if timing:
        for i, t in sorted(enumerate(times), key=lambda o: o[1], reverse=True): print(f'{files[i].name}: {int(t)} secs')
    return all(passed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('path', nargs='*', help='notebooks or globs (default: every notebook in nbs/)')
    ap.add_argument('--flags', default='', help='space separated test flags to run that are normally skipped')
    ap.add_argument('--n_workers', type=int, default=None)
    ap.add_argument('--timing', action='store_true', help='print the seconds each notebook took, slowest first')
    ap.add_argument('--out', default=str(OUT), help='folder for the executed copies (default _build/nbs)')
    a = ap.parse_args(argv)
    ok = run_all(notebooks(a.path), a.flags, a.n_workers, Path(a.out), a.timing)
    sys.exit(0 if ok else 1)


if __name__ == '__main__': main()
