"The `dlcoders` command: each subcommand in its own process, on the mirror's photos, with tiny settings."
import contextlib, io, json, os, shutil, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest

from dlcoders.data.external import URLs, get_image_files, untar_data
from dlcoders.quickstart import main, photo_dls

PETS_RE = r'^(.+)_\d+\.jpg$'


@pytest.fixture(scope='module')
def env(mirror, tmp_path_factory):
    "The environment of the subprocesses: the offline mirror, and the cache the tests use."
    return {**os.environ, 'DLCODERS_DATA_URL': mirror.as_uri(), 'DLCODERS_OFFLINE': '1', 'MPLBACKEND': 'Agg',
            'OMP_NUM_THREADS': '1'}


@pytest.fixture(scope='module')
def pets(env):
    mp = pytest.MonkeyPatch()
    for k in ('DLCODERS_DATA_URL', 'DLCODERS_OFFLINE'): mp.setenv(k, env[k])
    try: yield untar_data(URLs.PETS)/'images'
    finally: mp.undo()


def dlcoders(*args, env, check=True):
    "Run `dlcoders ARGS` in a new process; the completed process (stdout and stderr as text)."
    exe = shutil.which('dlcoders')
    cmd = [exe] if exe else [sys.executable, '-c', 'import sys; from dlcoders.quickstart import main; sys.exit(main())']
    res = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=300)
    if check: assert res.returncode == 0, f"dlcoders {' '.join(map(str, args))} failed:\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope='module')
def trained(pets, env, tmp_path_factory):
    "`dlcoders train` on the pets folder: 64 px, one epoch after the frozen one."
    out = tmp_path_factory.mktemp('train')
    res = dlcoders('train', pets, '--label-re', PETS_RE, '--epochs', 1, '--size', 64, '--bs', 32, '--out', out, env=env)
    return out, res


def test_help_of_every_command(env, capsys):
    res = dlcoders('--help', env=env)
    for command in ('quickstart', 'train', 'predict', 'serve', 'lr-find'): assert command in res.stdout
    for command, option in [('train', '--valid-pct'), ('predict', '--json'), ('serve', '--max-mb'),
                            ('lr-find', '--num-it'), ('quickstart', '--epochs')]:
        with pytest.raises(SystemExit) as e: main([command, '--help'])
        assert e.value.code == 0 and option in capsys.readouterr().out


def test_train_writes_the_export_the_matrix_and_the_table(trained):
    out, res = trained
    assert (out/'export.pkl').is_file()
    assert (out/'confusion_matrix.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert '120 training and 30 validation photos; 3 classes' in res.stdout
    header = next(l for l in res.stdout.splitlines() if l.startswith('epoch'))
    assert header.split()[:5] == ['epoch', 'train_loss', 'valid_loss', 'error_rate', 'accuracy']
    err = float(res.stdout.split('error rate ')[-1].split(';')[0])
    assert 0 <= err < 1 - 1 / 3  # better than chance for three breeds


def test_predict_table_and_json(trained, pets, env, tmp_path):
    out, _ = trained
    photos = sorted(get_image_files(pets))[:2]
    text = tmp_path/'notes.txt'
    text.write_text('not a photo')
    table = dlcoders('predict', out/'export.pkl', *photos, text, env=env, check=False)
    assert table.returncode == 1 and 'notes.txt is not an image' in table.stderr  # the others are still classified
    rows = [l.split() for l in table.stdout.splitlines()[1:]]
    assert rows[-1] == [str(text), '(error)']
    as_json = json.loads(dlcoders('predict', out/'export.pkl', *photos, '--json', env=env).stdout)
    assert [r[0] for r in rows[:2]] == [str(p) for p in photos] == [a['file'] for a in as_json]
    assert [r[1] for r in rows[:2]] == [a['label'] for a in as_json]
    assert [float(r[2]) for r in rows[:2]] == [round(a['probability'], 4) for a in as_json]
    for a in as_json: assert abs(sum(a['probabilities'].values()) - 1) < 1e-4


def test_lr_find_on_class_folders(env, tmp_path):
    mp = pytest.MonkeyPatch()
    for k in ('DLCODERS_DATA_URL', 'DLCODERS_OFFLINE'): mp.setenv(k, env[k])
    try: digits = untar_data(URLs.MNIST_TINY)/'train'
    finally: mp.undo()
    res = dlcoders('lr-find', digits, '--size', 32, '--bs', 64, '--num-it', 12, '--out', tmp_path, env=env)
    lrs = {l.split(':')[0].strip(): float(l.split(':')[1]) for l in res.stdout.splitlines() if ':' in l and 'plot' not in l}
    assert set(lrs) == {'minimum', 'steep', 'valley', 'slide'} and all(1e-7 <= v <= 10 for v in lrs.values())
    assert (tmp_path/'lr_find.png').stat().st_size > 0


def test_csv_of_files_and_labels(pets, tmp_path):
    "A CSV of file,label rows, relative to its folder, gives the same classes as the file names."
    files = sorted(get_image_files(pets))[::5]
    for f in files: shutil.copy(f, tmp_path/f.name)
    pd.DataFrame({'file': [f.name for f in files], 'label': [f.name.rsplit('_', 1)[0] for f in files]}
                 ).to_csv(tmp_path/'labels.csv', index=False)
    dls = photo_dls(tmp_path/'labels.csv', size=32)
    assert list(dls.vocab) == sorted({f.name.rsplit('_', 1)[0] for f in files})
    assert len(dls.train_ds) + len(dls.valid_ds) == len(files)


def _error(argv) -> str:
    "The message `main(argv)` exits with (status 2, as argparse does)."
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e: main([str(a) for a in argv])
    assert e.value.code == 2
    return err.getvalue()


def test_errors_name_the_bad_argument(pets, tmp_path):
    (tmp_path/'bad.csv').write_text('file\nnowhere.jpg\n')
    (tmp_path/'export.pkl').write_bytes(b'not read: the FILES are checked first')
    assert 'argument FOLDER: ' in _error(['train', tmp_path/'missing'])
    assert 'argument FOLDER: ' in _error(['train', tmp_path/'bad.csv']) and 'file,label' in _error(['train', tmp_path/'bad.csv'])
    assert 'argument --valid-pct: 1.5 is not between 0 and 1' in _error(['train', pets, '--valid-pct', '1.5'])
    assert 'argument --epochs: 0 is not 1 or more' in _error(['train', pets, '--epochs', '0'])
    assert 'argument --label-re: ' in _error(['train', pets, '--label-re', '^([a-z]+)_'])
    assert "argument --arch: Unknown architecture 'no_such_net'" in _error(
        ['lr-find', pets, '--label-re', PETS_RE, '--arch', 'no_such_net'])
    assert 'argument FILES: no such file(s): ' in _error(['predict', tmp_path/'export.pkl', tmp_path/'gone.jpg'])
    assert 'argument EXPORT: no such file' in _error(['serve', tmp_path/'missing.pkl'])
