"Interpretation, the cleaner, the classifier app and download_images beyond their chapter notebooks."
import datetime, warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import breeds_block
from dlcoders.data.external import DownloadError, get_image_files
from dlcoders.interpret import ClassificationInterpretation, Interpretation
from dlcoders.metrics import error_rate
from dlcoders.torch_core import set_seed
from dlcoders.vision.learner import efficientnet_lite0, vision_learner
from dlcoders.vision.widgets import ImageClassifierCleaner, classifier_app, classify_bytes, download_images


@pytest.fixture(scope='module')
def learn(pets):
    "EfficientNet-Lite0 fine-tuned for one epoch on the three breeds at 64 px."
    block = breeds_block(64)
    dls = block.dataloaders(pets, bs=16, num_workers=0)
    set_seed(42)
    learn = vision_learner(dls, efficientnet_lite0, metrics=error_rate)
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1)
    return learn


@pytest.fixture(scope='module')
def interp(learn):
    return ClassificationInterpretation.from_learner(learn)


def _synthetic(learn, targs, decoded):
    "A classification interpretation of given targets and decoded predictions (3 classes)."
    preds = torch.nn.functional.one_hot(decoded, 3).float()
    return ClassificationInterpretation(learn, learn.dls.valid, torch.zeros(len(targs)), preds=preds, targs=targs,
                                        decoded=decoded)


# --- confusion matrix, most confused ----------------------------------------------------------------------

def test_confusion_matrix_matches_brute_force_count(learn, interp):
    preds, targs = learn.get_preds()
    cm = interp.confusion_matrix()
    brute = np.zeros((3, 3), dtype=np.int64)
    for t, p in zip(targs.tolist(), preds.argmax(1).tolist()): brute[t, p] += 1
    np.testing.assert_array_equal(cm, brute)
    assert cm.sum() == len(learn.dls.valid_ds)
    assert np.trace(cm) == (preds.argmax(1) == targs).sum().item()


def test_confusion_matrix_large_random(learn):
    g = torch.Generator().manual_seed(0)
    targs, decoded = torch.randint(0, 3, (5000,), generator=g), torch.randint(0, 3, (5000,), generator=g)
    cm = _synthetic(learn, targs, decoded).confusion_matrix()
    brute = np.zeros((3, 3), dtype=np.int64)
    for t, p in zip(targs.tolist(), decoded.tolist()): brute[t, p] += 1
    np.testing.assert_array_equal(cm, brute)
    assert isinstance(cm, np.ndarray)


def test_confusion_matrix_keeps_absent_classes(learn):
    cm = _synthetic(learn, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])).confusion_matrix()
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [0, 0, 0]])


def test_most_confused_sorted_and_filtered(learn):
    # actual -> predicted: (0->1) x3, (2->0) x2, (1->2) x1, plus correct ones
    targs = torch.tensor([0, 0, 0, 2, 2, 1, 0, 1, 2])
    decoded = torch.tensor([1, 1, 1, 0, 0, 2, 0, 1, 2])
    ci = _synthetic(learn, targs, decoded)
    v = ci.vocab
    assert ci.most_confused() == [(v[0], v[1], 3), (v[2], v[0], 2), (v[1], v[2], 1)]
    assert ci.most_confused(min_val=2) == [(v[0], v[1], 3), (v[2], v[0], 2)]
    assert ci.most_confused(min_val=4) == []


def test_most_confused_consistent_with_matrix(interp):
    cm = interp.confusion_matrix()
    confused = interp.most_confused()
    assert sum(c for *_, c in confused) == cm.sum() - np.trace(cm)
    for a, p, c in confused: assert cm[interp.vocab.index(a), interp.vocab.index(p)] == c


def test_classification_report_prints_every_class(interp, capsys):
    interp.print_classification_report()
    out = capsys.readouterr().out
    assert all(v in out for v in interp.vocab) and 'precision' in out


def test_plot_confusion_matrix_normalized(interp, tmp_path):
    import matplotlib.pyplot as plt
    fig = interp.plot_confusion_matrix(normalize=True, norm_dec=3, figsize=(3, 3))
    vals = np.array([float(t.get_text()) for t in fig.axes[0].texts]).reshape(3, 3)
    cm = interp.confusion_matrix()
    np.testing.assert_allclose(vals, cm / cm.sum(1, keepdims=True), atol=1e-3)
    fig.savefig(tmp_path/'cm.png')
    assert (tmp_path/'cm.png').stat().st_size > 5_000
    plt.close('all')


def test_rejects_multi_label_targets(learn):
    with pytest.raises(ValueError, match='one class index per item'):
        ClassificationInterpretation(learn, learn.dls.valid, torch.zeros(2), preds=torch.rand(2, 3),
                                     targs=torch.rand(2, 3), decoded=torch.rand(2, 3))


# --- top losses ---------------------------------------------------------------------------------------------

def test_top_losses_sorted_and_equal_to_get_preds(learn, interp):
    _, _, losses = learn.get_preds(with_loss=True)
    vals, idxs = interp.top_losses()
    assert len(vals) == len(learn.dls.valid_ds)
    assert (vals[:-1] >= vals[1:]).all()
    torch.testing.assert_close(vals, losses[idxs])
    small, _ = interp.top_losses(4, largest=False)
    assert (small[:-1] <= small[1:]).all() and small[0] == losses.min()


def test_top_losses_items_are_files(learn, interp):
    vals, idxs, fns = interp.top_losses(3, items=True)
    assert fns == [learn.dls.valid_ds.items[i] for i in idxs]
    assert all(Path(f).suffix == '.jpg' for f in fns)


def test_train_interpretation_covers_every_item(learn):
    it = Interpretation.from_learner(learn, ds_idx=0)
    assert len(it.losses) == len(learn.dls.train_ds)
    assert not it.dl.shuffle and not it.dl.drop_last
    assert learn.dls.train.shuffle  # the learner's own loader is untouched


def test_getitem_and_plot_top_losses(interp, tmp_path):
    import matplotlib.pyplot as plt
    vals, idxs = interp.top_losses(4)
    res = interp[idxs]
    assert [tuple(x.shape) for x in res.inputs] == [(3, 64, 64)] * 4
    assert res.targs == [interp.vocab[int(t)] for t in interp.targs[idxs]]
    assert res.decoded == [interp.vocab[int(p)] for p in interp.decoded[idxs]]
    axs = interp.plot_top_losses(4, nrows=2)
    pred, actual, loss, prob = axs[0].get_title().split('/')
    assert (pred, actual) == (res.decoded[0], res.targs[0])
    assert abs(float(loss) - vals[0].item()) < 0.006
    assert abs(float(prob) - interp.preds[idxs[0], interp.targs[idxs[0]]].item()) < 0.006
    plt.savefig(tmp_path/'top.png')
    assert (tmp_path/'top.png').stat().st_size > 5_000
    plt.close('all')


# --- cleaner ------------------------------------------------------------------------------------------------

def test_cleaner_delete_and_change(learn):
    cleaner = ImageClassifierCleaner(learn, max_n=5)
    cleaner.split.value = 'Valid'
    cleaner.category.value = 'Bengal'
    assert 0 < len(cleaner.fns) <= 5
    assert all(f.name.startswith('Bengal') and f in learn.dls.valid_ds.items for f in cleaner.fns)
    assert cleaner.delete() == [] and cleaner.change() == []
    cleaner.dropdowns[0].value = '<Delete>'
    cleaner.dropdowns[-1].value = 'american_bulldog'
    assert cleaner.delete() == [0]
    assert cleaner.change() == [(len(cleaner.fns) - 1, 'american_bulldog')]
    assert 'Bengal' not in cleaner.dropdowns[0].options  # relabelling to the same class is not offered


def test_cleaner_orders_by_loss_and_resets(learn):
    cleaner = ImageClassifierCleaner(learn, max_n=100)
    cleaner.dropdowns[0].value = '<Delete>'
    cleaner.category.value = 'american_bulldog'  # split stays 'Train'
    interp = cleaner.interps[0]
    items = list(interp.dl.dataset.items)
    losses = [interp.losses[items.index(f)].item() for f in cleaner.fns]
    assert losses == sorted(losses, reverse=True)
    expected = [f for f in learn.dls.train_ds.items if f.name.startswith('american_bulldog')]
    assert sorted(cleaner.fns) == sorted(expected)
    assert cleaner.delete() == []


# --- classify_bytes and the app -------------------------------------------------------------------------------

def _upload(upload, data, name='photo.jpg'):
    upload.value = ({'name': name, 'type': 'image/jpeg', 'size': len(data), 'content': memoryview(data),
                     'last_modified': datetime.datetime.now(datetime.timezone.utc)},)


def test_classify_bytes_matches_predict(learn, pets):
    fn = sorted(get_image_files(pets))[0]
    label, prob = classify_bytes(learn, fn.read_bytes())
    pred, idx, probs = learn.predict(fn)
    assert label == pred and isinstance(label, str)
    assert abs(prob - probs[idx].item()) < 1e-5 and 0 < prob <= 1


def test_app_from_export_classifies_upload(learn, pets, tmp_path):
    fn = sorted(get_image_files(pets))[-1]
    label, prob = classify_bytes(learn, fn.read_bytes())
    app = classifier_app(learn.export(tmp_path/'export.pkl'))
    app.classify()
    assert app.label.value == 'Upload an image first.'
    _upload(app.upload, fn.read_bytes())
    app.button.click()
    assert app.label.value == f'Prediction: {label}; probability: {prob:.02f}'
    assert app.image.value[:4] == b'\x89PNG'
    _upload(app.upload, b'not an image at all')
    app.button.click()
    assert 'not an image' in app.label.value


def test_app_reads_ipywidgets7_upload_dict(learn, pets):
    fn = sorted(get_image_files(pets))[0]
    app = classifier_app(learn)
    from dlcoders.vision.widgets import _uploaded_bytes
    class FakeUpload: value = {'a.jpg': {'content': fn.read_bytes(), 'metadata': {}}}
    assert _uploaded_bytes(FakeUpload()) == fn.read_bytes()
    assert app.learn is learn


# --- download_images ----------------------------------------------------------------------------------------

def test_download_images_offline_names_urls(tmp_path, monkeypatch):
    monkeypatch.setenv('DLCODERS_OFFLINE', '1')
    urls = [f'https://example.com/img{i}.jpg' for i in range(3)]
    with pytest.raises(DownloadError, match='downloads are disabled') as e:
        download_images(tmp_path/'out', urls=urls)
    assert all(u in str(e.value) for u in urls)
    assert not (tmp_path/'out').exists()


def test_download_images_from_local_server(pets, tmp_path, serve, monkeypatch):
    monkeypatch.setenv('DLCODERS_OFFLINE', '1')  # loopback addresses are still allowed
    server = serve(pets)
    names = sorted(f.name for f in get_image_files(pets))[:4]
    url_file = tmp_path/'urls.txt'
    url_file.write_text('\n'.join(f'{server.url}/{n}' for n in names) + f'\n{server.url}/missing.png\n\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        fns = download_images(tmp_path/'out', url_file=url_file, n_workers=3)
    assert len(fns) == 4
    assert sorted(f.read_bytes() for f in fns) == sorted((pets/n).read_bytes() for n in names)
    assert any('1 of 5 downloads failed' in str(w.message) for w in caught)
    again = download_images(tmp_path/'out', urls=[f'{server.url}/{names[0]}'] * 2, max_pics=1)
    assert len(again) == 1 and again[0] not in fns and len(list((tmp_path/'out').iterdir())) == 5


def test_download_images_needs_urls(tmp_path):
    with pytest.raises(ValueError, match='url_file'): download_images(tmp_path)
