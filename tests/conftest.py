"Fixtures shared by the tests: an isolated cache, the offline dataset mirror, throwaway mirrors and a local HTTP server."
import functools, hashlib, os, shutil, threading, urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import dlcoders.data.external as ext

REPO = Path(__file__).resolve().parents[1]


def _mirror_from_env():
    "The mirror folder named by `DLCODERS_DATA_URL` when it is a local folder, else None."
    base = os.environ.get('DLCODERS_DATA_URL', '').strip()
    if base.startswith('file://'): base = urllib.parse.unquote(urllib.parse.urlsplit(base).path)
    elif '://' in base: return None
    return Path(base).expanduser() if base else None

# Read once at import, before any test changes the environment.
MIRROR = next((p for p in (_mirror_from_env(), REPO.parent/'shared'/'data'/'mirror')
               if p is not None and (p/'SHA256SUMS').is_file()), None)


def sha256_of(path):
    "Hex SHA-256 digest of the file at `path`."
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def dl_env(tmp_path, monkeypatch):
    "A fresh `DLCODERS_HOME` in `tmp_path`, offline, with no mirror configured and no remembered checksums."
    home = tmp_path/'home'
    monkeypatch.setenv('DLCODERS_HOME', str(home))
    monkeypatch.setenv('DLCODERS_OFFLINE', '1')
    monkeypatch.delenv('DLCODERS_DATA_URL', raising=False)
    # Servers on port 0 can reuse a port, so a checksum list remembered for one test must not leak into the next.
    monkeypatch.setattr(ext, '_checksum_cache', {})
    return home


@pytest.fixture(scope='session')
def mirror():
    "The read-only offline dataset mirror (skips when this machine has none)."
    if MIRROR is None: pytest.skip('no dataset mirror: set DLCODERS_DATA_URL or build one with tools/build_mirror.py')
    return MIRROR


@pytest.fixture
def make_mirror(tmp_path, mirror):
    "Factory: a writable mirror in tmp holding copies of some archives, with a `SHA256SUMS` of the *originals*."
    def _make(*rel_paths, name='mirror'):
        root = tmp_path/name
        sums = ext.parse_sha256sums((mirror/'SHA256SUMS').read_text())
        for rel in rel_paths:
            (root/rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(mirror/rel, root/rel)
        write_sha256sums(root, {rel: sums[rel] for rel in rel_paths})
        return root
    return _make


def write_sha256sums(root, sums):
    "Write `root/SHA256SUMS` from a mapping path -> digest, in the `sha256sum` format."
    text = ''.join(f'{digest}  {rel}\n' for rel, digest in sorted(sums.items()))
    (Path(root)/'SHA256SUMS').write_text(text)


class CountingHandler(SimpleHTTPRequestHandler):
    "Serves files like `SimpleHTTPRequestHandler`, quietly, and records each requested path on the server."
    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args): pass


@pytest.fixture
def serve():
    "Factory: serve a folder over HTTP on 127.0.0.1; returns the server (`.url`, `.requests`). Stopped at teardown."
    servers = []
    def _serve(root, handler=CountingHandler):
        server = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(handler, directory=str(root)))
        server.requests = []
        server.url = f'http://127.0.0.1:{server.server_port}'
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server
    yield _serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def one_thread():
    "Tiny models run faster on one thread, above all on a busy 2-core machine (a test may ask for more itself)."
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


CHROMIUM = os.environ.get('DLCODERS_CHROMIUM', '/usr/bin/chromium')
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
                 '--disable-sync', '--no-first-run', '--disable-dev-shm-usage']


@pytest.fixture(scope='session')
def browser():
    "Debian's headless chromium through Playwright, one for the whole run: Playwright's sync API allows one at a time."
    from playwright.sync_api import sync_playwright  # a dev requirement
    if not Path(CHROMIUM).exists(): pytest.fail(f'{CHROMIUM} is missing: apt-get install -y chromium')
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try: yield b
        finally: b.close()


@pytest.fixture(scope='session')
def pets(mirror):
    "The pets sample's image folder, from the mirror."
    mp = pytest.MonkeyPatch()
    mp.setenv('DLCODERS_DATA_URL', mirror.as_uri())
    mp.setenv('DLCODERS_OFFLINE', '1')
    try: yield ext.untar_data(ext.URLs.PETS)/'images'
    finally: mp.undo()


def breeds_block(size:int=64):
    "A DataBlock of the pets' breeds (from the file names), seeded 80/20 split, resized to `size`."
    from dlcoders.data.block import CategoryBlock, DataBlock, RandomSplitter, RegexLabeller, using_attr
    from dlcoders.vision.augment import Resize
    from dlcoders.vision.core import ImageBlock
    return DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=ext.get_image_files,
                     get_y=using_attr(RegexLabeller(r'^(.+)_\d+\.jpg$'), 'name'),
                     splitter=RandomSplitter(seed=42), item_tfms=Resize(size))
