"The web app of `dlcoders serve`, driven in a real browser (Debian's chromium through Playwright)."
import json, os, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

from conftest import breeds_block
from dlcoders.data.external import get_image_files
from dlcoders.learner import load_learner
from dlcoders.metrics import error_rate
from dlcoders.torch_core import set_seed
from dlcoders.vision.learner import efficientnet_lite0, vision_learner



@pytest.fixture(scope='session')
def export_file(pets, tmp_path_factory):
    "A small EfficientNet-Lite0 classifier of the three breeds (64 px, one frozen epoch), exported."
    block = breeds_block(64)
    dls = block.dataloaders(pets, bs=32, num_workers=0)
    set_seed(42)
    learn = vision_learner(dls, efficientnet_lite0, metrics=error_rate)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 3e-3)
    return learn.export(tmp_path_factory.mktemp('model')/'export.pkl')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _get_json(url):
    with urllib.request.urlopen(url, timeout=10) as res: return json.load(res)


@pytest.fixture(scope='session')
def server(export_file, tmp_path_factory):
    "`dlcoders serve export.pkl` in its own process; yields its address."
    port = _free_port()
    log = open(tmp_path_factory.mktemp('serve')/'server.log', 'w+')
    cmd = shutil.which('dlcoders')
    cmd = [cmd] if cmd else [sys.executable, '-c', 'import sys; from dlcoders.quickstart import main; sys.exit(main())']
    proc = subprocess.Popen(cmd + ['serve', str(export_file), '--port', str(port), '--max-mb', '10'],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    url = f'http://127.0.0.1:{port}'
    try:
        for _ in range(240):
            if proc.poll() is not None: break
            try:
                _get_json(url + '/health')
                break
            except OSError: time.sleep(0.25)
        else: pytest.fail('the server did not start in 60 s')
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f'dlcoders serve exited with status {proc.returncode}:\n{log.read()}')
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def page(browser, server, request, tmp_path):
    "A fresh page on the app; saves a screenshot when the test fails."
    ctx = browser.new_context()
    pg = ctx.new_page()
    errors = []
    pg.on('pageerror', lambda e: errors.append(str(e)))
    pg.goto(server + '/')
    failed_before = request.session.testsfailed
    yield pg
    if request.session.testsfailed > failed_before:  # the call phase of this test failed
        shot = Path(os.environ.get('DLCODERS_TEST_SCREENSHOTS', tmp_path))/f'{request.node.name}.png'
        pg.screenshot(path=str(shot))
        print(f'screenshot saved to {shot}')
    ctx.close()
    assert not errors, errors


def _classify(page, file):
    "Choose `file` in the page, click Classify, wait for the answer or the message; return (label, error)."
    page.set_input_files('#file', str(file))
    page.click('#classify')
    page.wait_for_function("document.getElementById('error').textContent || "
                           "!document.getElementById('result').hidden", timeout=30_000)
    return page.text_content('#label') if page.is_visible('#result') else None, page.text_content('#error')


def test_upload_a_photo_shows_its_label_and_probabilities(page, pets, export_file):
    photo = sorted(get_image_files(pets))[0]
    label, error = _classify(page, photo)
    learn = load_learner(export_file, trusted=True)
    expected = str(learn.predict(photo)[0])
    assert error == '' and label == expected
    rows = page.locator('#probs tr')
    assert rows.count() == len(learn.dls.vocab)
    shown = [float(rows.nth(i).locator('td').nth(1).text_content().rstrip('%')) for i in range(rows.count())]
    assert shown == sorted(shown, reverse=True) and abs(sum(shown) - 100) < 0.5
    assert page.evaluate("document.getElementById('preview').naturalWidth") > 0


def test_bad_files_get_clear_messages_and_the_server_keeps_answering(page, server, pets, tmp_path):
    text = tmp_path/'notes.txt'
    text.write_text('a shopping list, not a photo\n')
    empty = tmp_path/'empty.jpg'
    empty.write_bytes(b'')
    huge = tmp_path/'huge.jpg'
    with open(huge, 'wb') as f: f.truncate(50_000_000)
    expected = {text: 'notes.txt is not an image', empty: 'empty.jpg is empty', huge: 'the limit is 10.0 MB'}
    for file, words in expected.items():
        label, error = _classify(page, file)
        assert label is None and words in error, (file.name, error)
        assert _get_json(server + '/health')['status'] == 'ok'
    label, error = _classify(page, sorted(get_image_files(pets))[-1])
    assert error == '' and label in _get_json(server + '/health')['classes']


def test_server_refuses_a_50mb_body_itself(page, server):
    "The page checks sizes before sending; a program that sends 50 MB anyway gets a 413 and a message."
    status, answer = page.evaluate("""async () => {
        const res = await fetch('predict?name=big.bin', {method: 'POST', body: new Uint8Array(50000000)});
        return [res.status, await res.json()];
    }""")
    assert status == 413 and 'big.bin is 50.0 MB: the limit is 10.0 MB' in answer['error']
    assert _get_json(server + '/health')['status'] == 'ok'


def test_json_endpoint_for_programs(server, pets):
    photo = sorted(get_image_files(pets))[1]
    req = urllib.request.Request(server + '/predict', data=photo.read_bytes(), method='POST',
                                 headers={'Content-Type': 'application/octet-stream'})
    with urllib.request.urlopen(req, timeout=30) as res: answer = json.load(res)
    classes = _get_json(server + '/health')['classes']
    assert answer['label'] in classes and set(answer['probabilities']) == set(classes)
    assert answer['probability'] == max(answer['probabilities'].values())
