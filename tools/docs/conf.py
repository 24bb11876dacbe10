# Sphinx configuration of the docs site that `make docs` builds (tools/build_docs.py) without Quarto.
# The source folder (_build/docs_src) is generated: nbdev's processed notebooks, with their outputs, and one API page per
# module. Nothing here fetches anything from the network: the theme, the search index and MathJax are all local.
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

project = 'dlcoders'
author = 'dlcoders developers'
copyright = '2026 onwards, dlcoders developers'
html_title = 'dlcoders'

extensions = ['myst_nb', 'sphinx.ext.autodoc', 'local_mathjax', 'api_docments']

# the notebooks were executed before (tools/run_nbs.py): never run them again here
nb_execution_mode = 'off'
# show_doc's output is markdown: parse it as MyST (tables, code blocks, raw HTML anchors)
nb_render_markdown_format = 'myst'
# no widget JavaScript from a CDN: widgets show their text form
nb_ipywidgets_js = {}
nb_merge_streams = True
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'html_image', 'html_admonition']
# links are written as the site's own URLs (page.html#anchor) by tools/build_docs.py: pass them through as they are
myst_all_links_external = True

root_doc = 'index'
exclude_patterns = ['_build', '**.ipynb_checkpoints']
suppress_warnings = ['myst.header', 'mystnb.unknown_mime_type', 'myst.xref_missing', 'misc.highlighting_failure',
                     'ref.python', 'toc.not_included', 'autodoc.import_object', 'myst.nested_header']

autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_inherit_docstrings = False
# nbdev docstrings quote names in `backticks`: link them when they are documented, show them as code otherwise
default_role = 'py:obj'
add_module_names = False

html_theme = 'furo'
html_static_path = [str(Path(__file__).resolve().parent/'static')]
html_css_files = ['dlcoders.css']
html_favicon = str(Path(__file__).resolve().parent/'static'/'favicon.svg')
html_show_sourcelink = False
html_copy_source = False
html_last_updated_fmt = None
html_theme_options = {'navigation_with_keys': True}
