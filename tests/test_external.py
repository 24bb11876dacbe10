"""What `dlcoders.data.external` promises when things go wrong: downloads over HTTP and `file://`, the cache,
damaged and truncated archives, interrupted extractions, several processes at once, offline use, unsafe archives,
and listing files."""
import io, os, shutil, subprocess, sys, tarfile, textwrap, time
from pathlib import Path

import pytest

import dlcoders.data.external as ext
from dlcoders.data.external import (PUBLIC_BASE, URLs, DownloadError, download_url, get_files, get_image_files,
                                    get_text_files, untar_data)
from conftest import REPO, CountingHandler, sha256_of, write_sha256sums

pytestmark = pytest.mark.usefixtures('dl_env')

TINY = 'fast-ai-sample/mnist_tiny.tgz'
TINY_TGZ = f'/{TINY}'


def archive_files(archive):
    "Paths (below the top-level folder) of the regular files in a tar archive."
    with tarfile.open(archive) as t:
        return sorted(m.name.split('/', 1)[1] for m in t.getmembers() if m.isfile())


def folder_files(path):
    "Paths (below `path`) of the regular files in a folder."
    return sorted(p.relative_to(path).as_posix() for p in Path(path).rglob('*') if p.is_file())


def data_leftovers(home):
    "What `DLCODERS_HOME/data` holds (lock files live in `archive/`, so this is empty after a failure)."
    data = home/'data'
    return sorted(o.name for o in data.iterdir()) if data.exists() else []


def assert_complete_tiny(path, mirror):
    "`path` is a complete extraction of mnist_tiny."
    assert sorted(o.name for o in path.ls()) == ['labels.csv', 'test', 'train', 'valid']
    assert folder_files(path) == archive_files(mirror/TINY)


def tgz_requests(server):
    return [p for p in server.requests if p.endswith('.tgz')]


# ---------------------------------------------------------------- downloading


@pytest.mark.parametrize('how', ['http', 'file_url', 'folder'])
def test_download_and_extract(how, dl_env, mirror, serve, monkeypatch):
    base = {'http': lambda: serve(mirror).url, 'file_url': mirror.as_uri, 'folder': lambda: str(mirror)}[how]()
    monkeypatch.setenv('DLCODERS_DATA_URL', base)
    path = untar_data(URLs.MNIST_TINY)
    assert path == dl_env/'data'/'mnist_tiny'
    assert_complete_tiny(path, mirror)
    assert sha256_of(dl_env/'archive'/'mnist_tiny.tgz') == sha256_of(mirror/TINY)
    assert data_leftovers(dl_env) == ['mnist_tiny']


def test_cache_hit_does_not_download(dl_env, mirror, serve, monkeypatch):
    server = serve(mirror)
    monkeypatch.setenv('DLCODERS_DATA_URL', server.url)
    path = untar_data(URLs.MNIST_TINY)
    n_requests = len(server.requests)
    (dl_env/'archive'/'mnist_tiny.tgz').unlink()  # the extracted folder alone is enough
    def no_download(*args, **kwargs): raise AssertionError('downloaded again')
    monkeypatch.setattr(ext, 'download_url', no_download)
    start = time.perf_counter()
    assert untar_data(URLs.MNIST_TINY) == path
    assert time.perf_counter() - start < 0.1
    assert len(server.requests) == n_requests


def test_force_download_downloads_and_extracts_again(dl_env, mirror, serve, monkeypatch):
    server = serve(mirror)
    monkeypatch.setenv('DLCODERS_DATA_URL', server.url)
    path = untar_data(URLs.MNIST_TINY)
    (path/'labels.csv').unlink()
    (path/'stray.txt').write_text('not from the archive')
    assert untar_data(URLs.MNIST_TINY, force_download=True) == path
    assert tgz_requests(server) == [TINY_TGZ, TINY_TGZ]
    assert_complete_tiny(path, mirror)
    assert data_leftovers(dl_env) == ['mnist_tiny']


def truncate(path): path.write_bytes(path.read_bytes()[:-1000])

def flip_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data)//2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize('damage', [truncate, flip_bit])
@pytest.mark.parametrize('how', ['http', 'file_url'])
def test_damaged_download_is_rejected(damage, how, dl_env, make_mirror, serve, monkeypatch):
    root = make_mirror(TINY)
    damage(root/TINY)
    base = serve(root).url if how == 'http' else root.as_uri()
    monkeypatch.setenv('DLCODERS_DATA_URL', base)
    with pytest.raises(DownloadError) as err:
        untar_data(URLs.MNIST_TINY)
    msg = str(err.value)
    expected = ext.parse_sha256sums((root/'SHA256SUMS').read_text())[TINY]
    for part in (f'{base}/{TINY}', expected, sha256_of(root/TINY), str(dl_env/'archive'/'mnist_tiny.tgz')):
        assert part in msg
    assert data_leftovers(dl_env) == []
    assert not (dl_env/'archive'/'mnist_tiny.tgz').exists()


class ShortBodyHandler(CountingHandler):
    "Announces the full size of an archive but sends only half of it, as a dropped connection would."
    def do_GET(self):
        if not self.path.endswith('.tgz'): return super().do_GET()
        self.server.requests.append(self.path)
        data = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data)//2])


def test_short_http_body_is_rejected(dl_env, mirror, serve, monkeypatch):
    server = serve(mirror, handler=ShortBodyHandler)
    monkeypatch.setenv('DLCODERS_DATA_URL', server.url)
    with pytest.raises(DownloadError) as err:
        untar_data(URLs.MNIST_TINY)
    size = (mirror/TINY).stat().st_size
    msg = str(err.value)
    assert f'{server.url}/{TINY}' in msg and f'{size:,}' in msg and f'{size//2:,}' in msg
    assert data_leftovers(dl_env) == []


class ChunkedCutHandler(CountingHandler):
    "Starts a chunked response and hangs up in the middle of the first chunk."
    protocol_version = 'HTTP/1.1'
    def do_GET(self):
        self.send_response(200)
        self.send_header('Transfer-Encoding', 'chunked')
        self.end_headers()
        self.wfile.write(b'1000\r\n' + b'x'*100)
        self.close_connection = True


def test_cut_chunked_response_is_download_error(tmp_path, serve):
    server = serve(tmp_path, handler=ChunkedCutHandler)
    with pytest.raises(DownloadError, match='x.tgz'):
        download_url(f'{server.url}/x.tgz', tmp_path/'x.tgz', show_progress=False)


# ---------------------------------------------------------------- interrupted and damaged caches


def crash_on_folder_rename(real_replace):
    "An `os.replace` that fails when it is asked to move a folder (the extracted dataset) into place."
    def replace(src, dst, *args, **kwargs):
        if Path(src).is_dir(): raise OSError('simulated crash before the rename')
        return real_replace(src, dst, *args, **kwargs)
    return replace


def test_failed_rename_is_recovered(dl_env, mirror, monkeypatch):
    monkeypatch.setenv('DLCODERS_DATA_URL', str(mirror))
    with monkeypatch.context() as m:
        m.setattr(ext.os, 'replace', crash_on_folder_rename(os.replace))
        with pytest.raises(OSError, match='simulated crash'):
            untar_data(URLs.MNIST_TINY)
    assert data_leftovers(dl_env) == []
    assert_complete_tiny(untar_data(URLs.MNIST_TINY), mirror)
    assert data_leftovers(dl_env) == ['mnist_tiny']


KILLED_CHILD = textwrap.dedent('''
    import os
    from pathlib import Path
    from dlcoders.data.external import URLs, untar_data
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        if Path(src).is_dir(): os._exit(3)  # die like a killed process: no cleanup runs
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
    untar_data(URLs.MNIST_TINY)
''')


def test_process_killed_between_extract_and_rename_is_recovered(dl_env, mirror, monkeypatch):
    monkeypatch.setenv('DLCODERS_DATA_URL', str(mirror))
    child = subprocess.run([sys.executable, '-c', KILLED_CHILD], cwd=REPO, capture_output=True, text=True)
    assert child.returncode == 3, child.stderr
    left = data_leftovers(dl_env)
    assert len(left) == 1 and left[0].startswith('.tmp-mnist_tiny-')  # the half-done extraction
    assert_complete_tiny(untar_data(URLs.MNIST_TINY), mirror)
    assert data_leftovers(dl_env) == ['mnist_tiny']


def test_stale_temporary_folder_is_swept(dl_env, mirror, monkeypatch):
    monkeypatch.setenv('DLCODERS_DATA_URL', str(mirror))
    stale = dl_env/'data'/'.tmp-mnist_tiny-xxx'/'mnist_tiny'
    stale.mkdir(parents=True)
    (stale/'labels.csv').write_text('half written')
    assert_complete_tiny(untar_data(URLs.MNIST_TINY), mirror)
    assert data_leftovers(dl_env) == ['mnist_tiny']


def test_damaged_cached_archive_is_downloaded_again(dl_env, mirror, serve, monkeypatch):
    server = serve(mirror)
    monkeypatch.setenv('DLCODERS_DATA_URL', server.url)
    cached = dl_env/'archive'/'mnist_tiny.tgz'
    cached.parent.mkdir(parents=True)
    cached.write_bytes((mirror/TINY).read_bytes()[:50_000])
    assert_complete_tiny(untar_data(URLs.MNIST_TINY), mirror)
    assert tgz_requests(server) == [TINY_TGZ]
    assert sha256_of(cached) == sha256_of(mirror/TINY)


def test_interrupted_force_download_is_not_taken_for_complete(dl_env, mirror, monkeypatch):
    monkeypatch.setenv('DLCODERS_DATA_URL', str(mirror))
    path = untar_data(URLs.MNIST_TINY)
    real_rmtree = shutil.rmtree
    def rmtree_fails_halfway(p, *args, **kwargs):
        # the old copy is moved aside before it is deleted: fail halfway through deleting it
        if '-old-' not in str(p): return real_rmtree(p, *args, **kwargs)
        real_rmtree(Path(p)/path.name/'train')
        raise PermissionError(f'simulated failure while deleting {p}')
    with monkeypatch.context() as m:
        m.setattr(ext.shutil, 'rmtree', rmtree_fails_halfway)
        with pytest.raises(PermissionError):
            untar_data(URLs.MNIST_TINY, force_download=True)
    assert_complete_tiny(untar_data(URLs.MNIST_TINY), mirror)


# ---------------------------------------------------------------- several processes


RACING_CHILD = textwrap.dedent('''
    import sys, time
    from dlcoders.data.external import URLs, untar_data
    time.sleep(max(0., float(sys.argv[1]) - time.time()))  # start together
    print(untar_data(URLs.MNIST_TINY))
''')


def test_concurrent_processes_share_one_download(dl_env, mirror, serve, monkeypatch):
    server = serve(mirror)
    monkeypatch.setenv('DLCODERS_DATA_URL', server.url)
    start_at = str(time.time() + 1.0)
    procs = [subprocess.Popen([sys.executable, '-c', RACING_CHILD, start_at], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    outs = [p.communicate(timeout=50) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
    assert {out.strip() for out, _ in outs} == {str(dl_env/'data'/'mnist_tiny')}
    assert_complete_tiny(dl_env/'data'/'mnist_tiny', mirror)
    assert tgz_requests(server) == [TINY_TGZ]  # the others waited for the lock and found the folder
    assert data_leftovers(dl_env) == ['mnist_tiny']
    assert [o.name for o in (dl_env/'archive').iterdir() if o.suffix != '.lock'] == ['mnist_tiny.tgz']


# ---------------------------------------------------------------- offline


def test_offline_without_mirror_says_what_to_do(dl_env, monkeypatch):
    def no_network(*args, **kwargs): raise AssertionError('tried the network')
    monkeypatch.setattr(ext.urllib.request, 'urlopen', no_network)
    with pytest.raises(DownloadError) as err:
        untar_data(URLs.MNIST_TINY)
    msg = str(err.value)
    assert URLs.MNIST_TINY in msg and str(dl_env) in msg and 'DLCODERS_DATA_URL' in msg
    assert not (dl_env/'archive').exists() or not any((dl_env/'archive').iterdir())
    assert data_leftovers(dl_env) == []


def test_offline_refuses_a_public_host_named_like_loopback(tmp_path, monkeypatch):
    def no_network(*args, **kwargs): raise AssertionError('tried the network')
    monkeypatch.setattr(ext.urllib.request, 'urlopen', no_network)
    with pytest.raises(DownloadError, match='DLCODERS_OFFLINE'):
        download_url('http://127.example.com/x.tgz', tmp_path/'x.tgz', show_progress=False)


# ---------------------------------------------------------------- unsafe archives


def make_tar(path, members):
    "Write a gzipped tar at `path` from (TarInfo, bytes or None) pairs."
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, 'w:gz') as t:
        for info, data in members:
            if data is not None: info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data is not None else None)


def file_member(name, data=b'evil\n'): return tarfile.TarInfo(name), data

def link_member(name, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


@pytest.mark.parametrize('bad', [[file_member('evil_data/../../evil')],
                                 [file_member('../evil')],
                                 [link_member('evil_data/up', '../../..'), file_member('evil_data/up/evil')]],
                         ids=['dotdot-inside', 'dotdot-top', 'symlink-out'])
def test_archive_escaping_its_folder_is_refused(bad, dl_env, tmp_path, monkeypatch):
    root = tmp_path/'evil_mirror'
    make_tar(root/'fast-ai-sample/evil_data.tgz', [file_member('evil_data/ok.txt', b'ok\n')] + bad)
    write_sha256sums(root, {'fast-ai-sample/evil_data.tgz': sha256_of(root/'fast-ai-sample/evil_data.tgz')})
    monkeypatch.setenv('DLCODERS_DATA_URL', str(root))
    before = {p for p in tmp_path.rglob('*')}
    with pytest.raises((tarfile.TarError, OSError)):
        untar_data(f'{PUBLIC_BASE}/fast-ai-sample/evil_data.tgz')
    written = {p for p in tmp_path.rglob('*')} - before
    assert not [p for p in written if 'evil' in p.name and p.suffix != '.lock' and p.suffix != '.tgz']
    assert data_leftovers(dl_env) == []


# ---------------------------------------------------------------- listing files


@pytest.fixture
def tree(tmp_path):
    "A small folder with images, text, hidden entries and sub-folders."
    root = tmp_path/'tree'
    for rel in ['a.txt', 'B.PNG', '.hidden.png', 'sub/c.jpg', 'sub/d.txt', 'sub/deeper/g.jpeg', 'other/f.png',
                '.cache/e.png', 'sub/.secret/h.png', 'notes.md']:
        (root/rel).parent.mkdir(parents=True, exist_ok=True)
        (root/rel).write_bytes(b'x')
    return root


def rel(paths, root): return [p.relative_to(root).as_posix() for p in paths]


def test_get_files_lists_everything_visible_in_order(tree):
    assert rel(get_files(tree), tree) == ['B.PNG', 'a.txt', 'notes.md', 'other/f.png', 'sub/c.jpg', 'sub/d.txt',
                                          'sub/deeper/g.jpeg']
    assert get_files(tree) == get_files(tree)


def test_get_files_extensions_ignore_case(tree):
    assert rel(get_files(tree, extensions=['.txt']), tree) == ['a.txt', 'sub/d.txt']
    assert rel(get_files(tree, extensions=['.png']), tree) == ['B.PNG', 'other/f.png']
    assert rel(get_files(tree, extensions=['.PNG', '.md']), tree) == ['B.PNG', 'notes.md', 'other/f.png']


def test_get_image_and_text_files(tree):
    assert rel(get_image_files(tree), tree) == ['B.PNG', 'other/f.png', 'sub/c.jpg', 'sub/deeper/g.jpeg']
    assert rel(get_text_files(tree), tree) == ['a.txt', 'sub/d.txt']


def test_get_files_without_recursion(tree):
    assert rel(get_files(tree, recurse=False), tree) == ['B.PNG', 'a.txt', 'notes.md']
    assert rel(get_image_files(tree, recurse=False), tree) == ['B.PNG']
    assert get_image_files(tree/'sub'/'deeper', recurse=False) == [tree/'sub'/'deeper'/'g.jpeg']


def test_get_files_in_some_folders(tree):
    assert rel(get_image_files(tree, folders=['sub']), tree) == ['sub/c.jpg', 'sub/deeper/g.jpeg']
    assert rel(get_files(tree, folders=['other', 'sub']), tree) == ['other/f.png', 'sub/c.jpg', 'sub/d.txt',
                                                                    'sub/deeper/g.jpeg']
    assert get_files(tree, folders=['missing']) == []


@pytest.mark.parametrize('where', ['a.txt', 'nowhere'])
def test_get_files_on_a_non_folder_names_it(where, tree):
    with pytest.raises(FileNotFoundError, match=str(tree/where)):
        get_files(tree/where)


def test_get_image_files_on_real_data(mirror, monkeypatch):
    monkeypatch.setenv('DLCODERS_DATA_URL', str(mirror))
    path = untar_data(URLs.MNIST_TINY)
    files = get_image_files(path)
    assert len(files) == 709 + 699 + 20
    assert files == sorted(files)
    assert len(get_image_files(path, folders=['valid'])) == 699


def test_get_files_is_sorted_when_files_and_folders_mix(tmp_path):
    for name in ['z.txt', 'a/x.txt']:
        (tmp_path/name).parent.mkdir(exist_ok=True)
        (tmp_path/name).write_text('x')
    files = get_files(tmp_path)
    assert files == sorted(files)


def test_get_files_accepts_one_extension_as_a_string(tree):
    assert rel(get_files(tree, extensions='.txt'), tree) == ['a.txt', 'sub/d.txt']
