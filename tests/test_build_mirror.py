"""`tools/build_mirror.py`, offline: a fake public host in tmp with tiny archives laid out like the real ones,
served on 127.0.0.1; the builder must copy the small archives, cut the large ones down by the recipes of the
mirror's README, write `SHA256SUMS`, skip what is done, and produce a mirror `untar_data` reads."""
import functools, importlib.util, io, os, random, re, shutil, subprocess, sys, tarfile, threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

import dlcoders.data.external as ext
from dlcoders.data.external import URLs, untar_data
from conftest import MIRROR, REPO, CountingHandler, sha256_of

_spec = importlib.util.spec_from_file_location('build_mirror', REPO/'tools'/'build_mirror.py')
bm = sys.modules['build_mirror'] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bm)

PETS, NETTE, MNIST = bm.rel_path(URLs.PETS), bm.rel_path(URLs.IMAGENETTE_160), bm.rel_path(URLs.MNIST)
OFFLINE_ENV = dict(os.environ, DLCODERS_OFFLINE='1')  # the builder may only reach 127.0.0.1 and files
SMALL_SIZES = {PETS: dict(n_per_breed=7), NETTE: dict(n_train=4, n_valid=3), MNIST: dict(n_train=25, n_test=8)}


# ---------------------------------------------------------------- a fake public host


def write_tgz(path, files):
    "A gzipped tar at `path` holding `files` (archive name -> bytes), with their folders."
    path.parent.mkdir(parents=True, exist_ok=True)
    folders = {str(Path(n).parents[i]) for n in files for i in range(len(Path(n).parents) - 1)}
    with tarfile.open(path, 'w:gz') as t:
        for name in sorted(folders):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            t.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


PET_NUMBERS = [i for i in range(1, 61) if i % 7]  # numbered with gaps, as the real ones are
FAKE_BREEDS = ('Abyssinian', 'Bengal', 'american_bulldog', 'Persian')  # Persian is not part of the subset


def fake_pets():
    "Pets: images, trimaps (with macOS `._` litter), xmls for some, a stray .mat, split lists with a header."
    files, rows = {}, ['#Image CLASS-ID SPECIES BREED ID\n', '#All images with 1 Species are cats\n']
    for b, breed in enumerate(FAKE_BREEDS):
        for i in PET_NUMBERS:
            stem = f'{breed}_{i}'
            files[f'images/{stem}.jpg'] = f'jpg {stem}'.encode()
            files[f'annotations/trimaps/{stem}.png'] = f'trimap {stem}'.encode()
            files[f'annotations/trimaps/._{stem}.png'] = b'apple double'
            if i < 20: files[f'annotations/xmls/{stem}.xml'] = f'<xml>{stem}</xml>'.encode()
            rows.append(f'{stem} {b+1} {1 if breed[0].isupper() else 2} {b+1}\n')
    files['images/Abyssinian_100.mat'] = b'matlab'
    files['annotations/list.txt'] = ''.join(rows).encode()
    files['annotations/trainval.txt'] = ''.join(r for r in rows[2::2]).encode()
    files['annotations/test.txt'] = ''.join(r for r in rows[3::2]).encode()
    files['annotations/README'] = b'OXFORD-IIIT PET Dataset (fake)\n'
    return {f'oxford-iiit-pet/{k}': v for k, v in files.items()}


NETTE_CLASSES = ('n01440764', 'n02102040')


def fake_imagenette():
    "Imagenette: 2 classes x 8 train / 5 val files with names that sort differently as text and as numbers."
    files, rows = {}, []
    for split, n in (('train', 8), ('val', 5)):
        for cls in NETTE_CLASSES:
            for i in (9, 10, 100, 2, 33, 4, 55, 6)[:n]:
                path = f'{split}/{cls}/{cls}_{i}.JPEG'
                files[path] = f'jpeg {path}'.encode()
                rows.append(f'{path},{cls},{cls},{cls},{cls},{cls},{split == "val"}\n')
    random.Random(0).shuffle(rows)
    header = 'path,noisy_labels_0,noisy_labels_1,noisy_labels_5,noisy_labels_25,noisy_labels_50,is_valid\n'
    files['noisy_imagenette.csv'] = (header + ''.join(rows)).encode()
    return {f'imagenette2-160/{k}': v for k, v in files.items()}


def fake_mnist_png():
    "MNIST as PNGs: training/<digit>/<index>.png for 60 images, testing/... for 30; the digit is index % 10."
    files = {}
    for split, n in (('training', 60), ('testing', 30)):
        for i in range(n):
            files[f'mnist_png/{split}/{i % 10}/{i}.png'] = f'png {split} {i}'.encode()
    return files


def make_host(root):
    "A fake public host: the three large archives faked, two small ones real, the other small ones placeholders."
    write_tgz(root/PETS, fake_pets())
    write_tgz(root/NETTE, fake_imagenette())
    write_tgz(root/MNIST, fake_mnist_png())
    for rel in bm.AS_IS:
        name = Path(rel).name.removesuffix('.tgz')
        if MIRROR is not None and rel in ('fast-ai-sample/mnist_tiny.tgz', 'fast-ai-sample/human_numbers.tgz'):
            (root/rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(MIRROR/rel, root/rel)
        else: write_tgz(root/rel, {f'{name}/README.txt': f'placeholder for {name}\n'.encode()})
    return root


@pytest.fixture(scope='module')
def host(tmp_path_factory):
    "The fake public host, served over HTTP on 127.0.0.1 (`.url`, `.requests`, `.root`)."
    root = make_host(tmp_path_factory.mktemp('public_host'))
    server = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(CountingHandler, directory=str(root)))
    server.requests, server.url, server.root = [], f'http://127.0.0.1:{server.server_port}', root
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope='module')
def built(host, tmp_path_factory):
    "A mirror built from the fake host with small subset sizes, and the builder's output."
    dest = tmp_path_factory.mktemp('built')/'mirror'
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as m:
        m.setenv('DLCODERS_OFFLINE', '1')  # the fake host is on 127.0.0.1, so nothing else may be reached
        m.setattr(sys, 'stdout', out)
        bm.build_mirror(dest, host.url, sizes=SMALL_SIZES, show_progress=False)
    return dest, out.getvalue()


def tar_contents(path):
    "(top-level folder, {path below it: bytes}) of a tar archive's files."
    with tarfile.open(path) as t:
        files = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
    tops = {n.split('/', 1)[0] for n in files}
    assert len(tops) == 1
    return tops.pop(), {n.split('/', 1)[1]: data for n, data in files.items()}


def host_contents(host, rel): return tar_contents(host.root/rel)[1]


# ---------------------------------------------------------------- what the builder produced


def test_small_archives_are_copied_as_they_are(built, host):
    dest, out = built
    for rel in bm.AS_IS:
        assert (dest/rel).read_bytes() == (host.root/rel).read_bytes()
        assert rel in out


def test_pets_keep_lowest_numbered_images_with_their_annotations(built, host):
    top, files = tar_contents(built[0]/PETS)
    assert top == 'oxford-iiit-pet'
    stems = [f'{b}_{i}' for b in bm.PET_BREEDS for i in PET_NUMBERS[:7]]  # numeric order: 1..6, 8 (not 1, 10, 11)
    expected = ({f'images/{s}.jpg' for s in stems} | {f'annotations/trimaps/{s}.png' for s in stems}
                | {f'annotations/xmls/{s}.xml' for s in stems if int(s.rsplit('_', 1)[1]) < 20}
                | {'annotations/README', 'annotations/list.txt', 'annotations/trainval.txt', 'annotations/test.txt'})
    assert set(files) == expected
    original = host_contents(host, PETS)
    assert all(files[n] == original[n] for n in expected - {f'annotations/{n}' for n in ('list.txt', 'trainval.txt',
                                                                                        'test.txt')})


def test_pet_lists_keep_the_rows_of_the_chosen_breeds(built, host):
    files, original = tar_contents(built[0]/PETS)[1], host_contents(host, PETS)
    for name in ('list.txt', 'trainval.txt', 'test.txt'):
        rows = original[f'annotations/{name}'].decode().splitlines(keepends=True)
        want = [r for r in rows if not r.startswith('#') and bm.pet_breed(r.split()[0]) in bm.PET_BREEDS]
        assert files[f'annotations/{name}'].decode() == ''.join(want)
        assert want and all(not r.startswith('Persian') for r in want)


def test_imagenette_keeps_the_first_files_of_each_class_in_sorted_order(built, host):
    top, files = tar_contents(built[0]/NETTE)
    assert top == 'imagenette2-160'
    original = host_contents(host, NETTE)
    expected = set()
    for split, n in (('train', 4), ('val', 3)):
        for cls in NETTE_CLASSES:
            expected |= set(sorted(p for p in original if p.startswith(f'{split}/{cls}/'))[:n])
    assert set(files) == expected | {'noisy_imagenette.csv'}
    header, *rows = original['noisy_imagenette.csv'].decode().splitlines(keepends=True)
    want = header + ''.join(r for r in rows if r.split(',')[0] in expected)
    assert files['noisy_imagenette.csv'].decode() == want and len(want.splitlines()) == 1 + 2*(4 + 3)


def test_mnist_keeps_the_first_images_in_mnist_order(built):
    top, files = tar_contents(built[0]/MNIST)
    assert top == 'mnist_png'
    assert set(files) == ({f'training/{i % 10}/{i}.png' for i in range(25)}
                          | {f'testing/{i % 10}/{i}.png' for i in range(8)})


def test_sha256sums_lists_every_archive_sorted(built):
    dest = built[0]
    lines = (dest/'SHA256SUMS').read_text().splitlines()
    assert [line.split('  ', 1)[1] for line in lines] == sorted(bm.ARCHIVES)
    for line in lines:
        digest, rel = line.split('  ')
        assert re.fullmatch('[0-9a-f]{64}', digest) and digest == sha256_of(dest/rel)
    assert not [p for p in dest.rglob('*') if p.name.startswith('.') or p.name.endswith('.part')]


def test_untar_data_reads_the_built_mirror(built, dl_env, monkeypatch):
    monkeypatch.setenv('DLCODERS_DATA_URL', str(built[0]))
    pets = untar_data(URLs.PETS)
    assert len(list((pets/'images').iterdir())) == 3*7
    assert sorted(o.name for o in untar_data(URLs.IMAGENETTE_160).ls()) == ['noisy_imagenette.csv', 'train', 'val']
    assert len(ext.get_image_files(untar_data(URLs.MNIST))) == 25 + 8
    if MIRROR is not None:
        assert sorted(o.name for o in untar_data(URLs.MNIST_TINY).ls()) == ['labels.csv', 'test', 'train', 'valid']


# ---------------------------------------------------------------- running it again


def test_second_run_skips_everything(built, host, capsys):
    dest = built[0]
    before = {p: p.stat().st_mtime_ns for p in dest.rglob('*')}
    n_requests = len(host.requests)
    bm.build_mirror(dest, host.url, sizes=SMALL_SIZES, show_progress=False)
    assert len(host.requests) == n_requests
    assert {p: p.stat().st_mtime_ns for p in dest.rglob('*')} == before
    assert capsys.readouterr().out.count('skipped') == len(bm.ARCHIVES)


def test_damaged_or_missing_archives_are_rebuilt_identically(built, host, tmp_path, capsys):
    dest = tmp_path/'mirror'
    shutil.copytree(built[0], dest)
    sums = (dest/'SHA256SUMS').read_text()
    (dest/PETS).write_bytes((dest/PETS).read_bytes()[:-100])
    (dest/MNIST).unlink()
    n_requests = len(host.requests)
    bm.build_mirror(dest, host.url, sizes=SMALL_SIZES, show_progress=False)
    assert sorted(host.requests[n_requests:]) == sorted([f'/{PETS}', f'/{MNIST}'])
    assert (dest/'SHA256SUMS').read_text() == sums  # the archives are rebuilt byte for byte
    assert capsys.readouterr().out.count('skipped') == len(bm.ARCHIVES) - 2


def test_command_line_with_default_sizes(host, tmp_path):
    dest = tmp_path/'cli_mirror'
    cmd = [sys.executable, str(REPO/'tools'/'build_mirror.py'), str(dest), '--source-base', host.url, '--quiet']
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=OFFLINE_ENV)
    assert run.returncode == 0, run.stderr
    assert all(rel in run.stdout for rel in bm.ARCHIVES) and 'DLCODERS_DATA_URL' in run.stdout
    pets = tar_contents(dest/PETS)[1]
    assert sum(p.startswith('images/') for p in pets) == 3*50  # README's 50 per breed, from 60 fake ones
    nette = tar_contents(dest/NETTE)[1]
    assert sum(p.startswith('train/') for p in nette) == 2*8 and sum(p.startswith('val/') for p in nette) == 2*5
    assert len((dest/'SHA256SUMS').read_text().splitlines()) == len(bm.ARCHIVES)


def test_command_line_reports_an_unreachable_host(tmp_path):
    cmd = [sys.executable, str(REPO/'tools'/'build_mirror.py'), str(tmp_path/'m'), '--source-base',
           str(tmp_path/'no_such_host'), '--quiet']
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=OFFLINE_ENV)
    assert run.returncode == 1 and 'build_mirror: Could not download' in run.stderr
    assert 'Traceback' not in run.stderr


# ---------------------------------------------------------------- the recipes against CI's mirror


def test_archive_list_matches_the_mirror_readme():
    readme = REPO.parent/'shared'/'data'/'README.md'
    if not readme.exists(): pytest.skip('no mirror README beside this checkout')
    listed = set(re.findall(r'^\| (fast-ai-[\w-]+/[\w.-]+\.tgz) \|', readme.read_text(), flags=re.M))
    assert listed == set(bm.ARCHIVES)


@pytest.mark.parametrize('rel', [PETS, NETTE])
def test_recipe_reproduces_ci_mirror_from_itself(rel, tmp_path):
    "CI's subset holds exactly what the recipe keeps, so cutting it down again changes no file."
    if MIRROR is None: pytest.skip('no dataset mirror')
    bm.cut_down(MIRROR/rel, tmp_path/Path(rel).name, bm.SUBSETS[rel])
    assert tar_contents(tmp_path/Path(rel).name) == tar_contents(MIRROR/rel)
