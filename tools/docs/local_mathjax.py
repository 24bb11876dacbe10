"""MathJax from local files, so that pages with math load nothing from the network.

The files come from the `sphinx-mathjax-offline` package (MathJax 3, bundled); this wrapper copies them into the site
and, unlike that package, says it is safe for Sphinx's parallel build.
"""
import importlib.util, os
from pathlib import Path
from sphinx.util.fileutil import copy_asset


def _mathjax_dir():
    spec = importlib.util.find_spec('sphinx-mathjax-offline')
    return Path(spec.origin).parent/'static'/'mathjax'


def copy_mathjax(app, exc):
    if exc is None and app.builder.format == 'html':
        copy_asset(str(_mathjax_dir()), os.path.join(app.outdir, '_static', 'mathjax'))


def setup(app):
    app.config.mathjax_path = 'mathjax/tex-chtml.js'
    app.connect('build-finished', copy_mathjax)
    return {'parallel_read_safe': True, 'parallel_write_safe': True}
