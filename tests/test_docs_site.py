"""The documentation site (`make docs`, tools/build_docs.py), read by a real browser: Debian's chromium, headless, via
Playwright, against the built site served on 127.0.0.1.

CI builds the site once (`make docs` in tools/test.sh, after the notebooks ran); here, a site that is missing is built
first (that executes the notebooks whose executed copy is missing: minutes). DLCODERS_DOCS_SITE points at another
built site. A failing check saves a screenshot of the page it was on in tests/_tmp_docs_screens/.
"""
import functools, http.server, json, os, re, shutil, subprocess, sys, threading
from pathlib import Path
from urllib.parse import urljoin, urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(os.environ.get('DLCODERS_DOCS_SITE', ROOT/'_build'/'site'))
SHOTS = ROOT/'tests'/'_tmp_docs_screens'
import playwright.sync_api  # a dev requirement: no silent skip when it is missing (the `browser` fixture is in conftest)


def chapter_pages():
    "The page of every notebook in nbs/, named as nbdev names it (`05_pet_breeds.ipynb` -> `pet_breeds.html`)"
    from nbdev.frontmatter import _nbpath2html
    return {p.name: _nbpath2html(Path(p.name)).name for p in sorted((ROOT/'nbs').glob('*.ipynb'))}


@pytest.fixture(scope='session')
def site():
    if not (SITE/'index.html').exists():
        r = subprocess.run([sys.executable, str(ROOT/'tools'/'build_docs.py'), '--out', str(SITE)], cwd=ROOT)
        assert r.returncode == 0, 'tools/build_docs.py failed: the site could not be built'
    return SITE


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass


@pytest.fixture(scope='session')
def server(site):
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Quiet, directory=str(site)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}/'
    httpd.shutdown(); httpd.server_close()


class Page:
    "A browser tab that records console errors, page errors and failed requests"
    def __init__(self, browser, name):
        self.ctx = browser.new_context(viewport={'width': 1280, 'height': 900})
        self.page, self.name, self.errors = self.ctx.new_page(), name, []
        self.page.on('console', lambda m: m.type == 'error' and self.errors.append(f'console: {m.text}'))
        self.page.on('pageerror', lambda e: self.errors.append(f'page error: {e}'))
        # a request cut short by the next navigation (ERR_ABORTED) is not an error of the page
        self.page.on('requestfailed', lambda r: 'ERR_ABORTED' not in (r.failure or '') and
                     self.errors.append(f'request failed: {r.url} {r.failure}'))
        self.page.on('response', lambda r: r.status >= 400 and self.errors.append(f'HTTP {r.status}: {r.url}'))

    def shot(self, tag):
        SHOTS.mkdir(exist_ok=True)
        p = SHOTS/(re.sub(r'[^\w.-]', '_', f'{self.name}-{tag}') + '.png')
        try: self.page.screenshot(path=str(p), full_page=False)
        except Exception: return None
        return p


@pytest.fixture
def tab(browser, request):
    t = Page(browser, request.node.name)
    failed_before = request.session.testsfailed
    yield t
    # the test's own report is counted before its fixtures are torn down
    if request.session.testsfailed > failed_before: print(f'screenshot: {t.shot("failure")}')
    t.ctx.close()


def _goto(t, url):
    t.page.goto(url, wait_until='load')


@pytest.fixture(scope='session')
def visited(server, browser):
    "Open every chapter page once: its console errors, failed requests, title and links (screenshot of a bad page)"
    t, res = Page(browser, 'chapter'), {}
    for nb, html in chapter_pages().items():
        t.errors.clear()
        _goto(t, server + html)
        title = t.page.locator('article h1').first.inner_text().strip(' #¶\n')
        hrefs = t.page.eval_on_selector_all('article a[href]', 'els => els.map(e => e.href)')
        errors = list(t.errors) + ([] if title else ['no title (h1)'])
        res[nb] = dict(html=html, title=title, hrefs=hrefs, errors=errors, shot=str(t.shot(html)) if errors else None)
    t.ctx.close()
    return res


def test_every_chapter_page_loads_without_console_errors(visited):
    assert len(visited) >= 10 and 'index.ipynb' in visited
    bad = {nb: v['errors'] + [f'screenshot: {v["shot"]}'] for nb, v in visited.items() if v['errors']}
    assert not bad, 'pages with errors:\n' + json.dumps(bad, indent=1)


def test_links_in_chapters_resolve(site, server, visited):
    "Every link from a chapter to a page of the site finds the page, and the anchor in it when it names one"
    seen, broken = {}, []
    for v in visited.values():
        for h in v['hrefs']:
            u = urlparse(h)
            if u.netloc != urlparse(server).netloc: continue
            path = u.path.lstrip('/') or 'index.html'
            if path not in seen: seen[path] = (site/path).read_bytes().decode('utf-8', 'replace') if (site/path).is_file() else None
            if seen[path] is None: broken.append(f'{v["html"]}: {h} (no page)')
            elif u.fragment and f'id="{u.fragment}"' not in seen[path]: broken.append(f'{v["html"]}: {h} (no anchor)')
    assert not broken, f'{len(broken)} broken links: {broken[:30]}'


def test_sidebar_lists_chapters_in_order_and_every_link_resolves(server, tab):
    _goto(tab, server + 'index.html')
    links = tab.page.eval_on_selector_all('.sidebar-tree a.reference', 'els => els.map(e => [e.getAttribute("href"), e.innerText])')
    hrefs = [urlparse(urljoin(server + 'index.html', h)).path.lstrip('/') for h, _ in links]
    pages = chapter_pages()
    want = [v for k, v in pages.items() if k != 'index.ipynb']
    # every notebook has a sidebar entry, in the order of nbs/ (nbdev's sidebar order), then the API reference
    in_bar = [h for h in hrefs if h in want]
    assert in_bar == want, f'sidebar chapters {in_bar} != notebooks in order {want}'
    assert 'api/index.html' in hrefs
    broken = []
    for h, text in links:
        url = urljoin(server + 'index.html', h)
        r = tab.page.request.get(url)
        if r.status != 200: broken.append(f'{text} -> {url}: HTTP {r.status}')
    assert not broken, broken
    titles = [t for h, t in links if urlparse(urljoin(server, h)).path.lstrip('/') in want]
    assert all(t.strip() for t in titles)


def test_search_finds_vision_learner_and_its_api_entry_shows_the_signature(server, tab):
    _goto(tab, server + 'intro.html')
    box = tab.page.locator('input[name="q"]').first
    box.fill('vision_learner')
    box.press('Enter')
    tab.page.wait_for_url('**/search.html?q=vision_learner*')
    hit = tab.page.locator('#search-results a', has_text='vision_learner').first
    hit.wait_for(timeout=30_000)
    hit.click()
    tab.page.wait_for_load_state('load')
    assert '/api/' in tab.page.url and tab.page.url.endswith('#dlcoders.vision.learner.vision_learner'), tab.page.url
    sig = tab.page.locator('dt[id="dlcoders.vision.learner.vision_learner"]')
    text = sig.inner_text()
    assert re.search(r'vision_learner\s*\(\s*dls', text) and 'arch' in text, text
    entry = tab.page.locator('dl.py.function:has(dt[id="dlcoders.vision.learner.vision_learner"])')
    body = entry.inner_text()
    assert 'parameters' in body.lower(), 'the inline parameter docs (docments) are missing'
    link = entry.locator('a', has_text=re.compile(r'\d\d\w*_\w+')).last
    href = link.get_attribute('href')
    assert href and '.html#vision_learner' in href, href
    link.click()
    tab.page.wait_for_load_state('load')
    assert tab.page.locator('[id="vision_learner"]').count() == 1, f'{tab.page.url} has no anchor for vision_learner'
    assert not tab.errors, tab.errors


def test_api_reference_covers_every_exported_name(site):
    from dlcoders._modidx import d
    html = {p.stem: p.read_text(encoding='utf-8') for p in (site/'api').glob('dlcoders*.html')}
    missing = []
    for mod, names in d['syms'].items():
        page = html.get(mod, '')
        for full in names:
            top = full[len(mod)+1:].split('.')
            if top[-1] == '__init__': continue
            if f'id="{full}"' not in page: missing.append(full)
    assert not missing, f'{len(missing)} exported names have no API entry: {missing[:20]}'


def test_a_chapter_figure_is_an_image_that_loaded(server, tab):
    _goto(tab, server + 'pet_breeds.html')
    imgs = tab.page.locator('article img')
    n = imgs.count()
    assert n >= 1, 'the pet breeds chapter shows no figure: were its outputs executed (tools/run_nbs.py)?'
    widths = [imgs.nth(i).evaluate('(img) => img.complete ? img.naturalWidth : 0') for i in range(n)]
    assert all(w > 0 for w in widths), f'images that did not load: {widths}'
    assert max(widths) >= 100
    assert not tab.errors, tab.errors


def test_a_chapter_table_is_rendered(server, tab):
    "A DataFrame or a results table in the output of a chapter (the tabular chapter shows several)"
    _goto(tab, server + 'tabular.html')
    tables = tab.page.locator('article .cell_output table')
    assert tables.count() >= 1
    assert tables.first.locator('td').count() >= 2
