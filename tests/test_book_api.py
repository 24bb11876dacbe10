"""The book's own calls, typed as the book types them (chapter in each test's name).

Each test is one numbered item of the book-fidelity issue: a call that fastai accepts and a reader will type."""
import math, os, subprocess, sys, warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from dlcoders.vision.all import *

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def mnist_tiny():
    "The shipped 28x28 MNIST sample (3s and 7s)."
    if 'DLCODERS_DATA_URL' not in os.environ: pytest.skip('no dataset mirror configured')
    return untar_data(URLs.MNIST_TINY)


def digit_dls(path, bs=16, **kwargs):
    return DataBlock(blocks=(ImageBlock(cls=PILImageBW), CategoryBlock), get_items=get_image_files,
                     splitter=GrandparentSplitter(), get_y=parent_label, **kwargs).dataloaders(path, bs=bs, num_workers=0)


def simple_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


# 1 -------------------------------------------------------------------------------------------------------
def test_01_ch4_dataloader_batch_size_alias():
    train_x, train_y = torch.rand(600, 28*28), torch.randint(0, 2, (600, 1)).float()
    dset = list(zip(train_x, train_y))
    dl = DataLoader(dset, batch_size=256, shuffle=True)
    xb, yb = first(dl)
    assert xb.shape == (256, 28*28) and yb.shape == (256, 1)
    assert [len(b[0]) for b in dl] == [256, 256, 88]
    coll = range(15)
    assert [len(b) for b in DataLoader(coll, 6)] == [6, 6, 3]  # positional batch size still works
    with pytest.raises(TypeError, match='bs.*batch_size|batch_size.*bs'):
        DataLoader(dset, bs=32, batch_size=64)


# 2 -------------------------------------------------------------------------------------------------------
def test_02_ch12_from_dsets_explicit_shuffle_and_drop_last():
    train_ds, valid_ds = list(range(100)), list(range(100, 130))
    dls = DataLoaders.from_dsets(train_ds, valid_ds, bs=16, drop_last=True, shuffle=False)
    assert [b.tolist() for b in dls.train][0] == list(range(16))  # kept in order
    assert len(dls.train) == 6 and len(dls.valid) == 1  # both drop the last incomplete batch
    dls = DataLoaders.from_dsets(train_ds, valid_ds, bs=16)
    assert dls.train.shuffle and dls.train.drop_last and not dls.valid.shuffle and not dls.valid.drop_last


def test_02_datasets_dataloaders_take_fastais_shuffle_and_drop_last(mnist_tiny):
    "`Datasets.dataloaders(shuffle=False)` and `DataBlock.dataloaders(..., shuffle=False)` as fastai spells them."
    dblock = DataBlock(blocks=(ImageBlock(cls=PILImageBW), CategoryBlock), get_items=get_image_files,
                       splitter=GrandparentSplitter(), get_y=parent_label)
    dls = dblock.dataloaders(mnist_tiny, bs=64, num_workers=0, shuffle=False)
    assert not dls.train.shuffle and not dls.train.drop_last and not dls.valid.shuffle
    assert [len(b[0]) for b in dls.train][-1] == len(dls.train_ds) % 64  # the short last batch is kept
    dls = dblock.datasets(mnist_tiny).dataloaders(bs=64, num_workers=0, shuffle=False, drop_last=True)
    assert not dls.train.shuffle and dls.train.drop_last
    dls = dblock.dataloaders(mnist_tiny, bs=64, num_workers=0)
    assert dls.train.shuffle and dls.train.drop_last and not dls.valid.shuffle and not dls.valid.drop_last
    dls = dblock.dataloaders(mnist_tiny, bs=64, num_workers=0, shuffle_train=False)  # the older name still works
    assert not dls.train.shuffle


# 3 -------------------------------------------------------------------------------------------------------
def test_03_ch4_ch11_fastcore_L(mnist_tiny):
    files = get_image_files(mnist_tiny)
    assert isinstance(files, L) and list(files) == sorted(files)
    assert set(files.map(parent_label).unique()) >= {'3', '7'}
    idxs = torch.tensor([0, 2, 4])
    assert list(files[idxs]) == [files[0], files[2], files[4]]
    assert list(files[[1, 3]]) == [files[1], files[3]]
    assert isinstance(get_files(mnist_tiny, extensions='.png'), L)
    learn = Learner(digit_dls(mnist_tiny), simple_cnn(), loss_func=F.cross_entropy, metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    accs = L(learn.recorder.values).itemgot(2)
    assert len(accs) == 1 and 0 <= accs[0] <= 1


def test_03_ch10_get_text_files_is_L(tmp_path):
    for n in 'ba': (tmp_path/f'{n}.txt').write_text(n)
    files = get_text_files(tmp_path)
    assert isinstance(files, L) and [f.name for f in files] == ['a.txt', 'b.txt']


# 4 -------------------------------------------------------------------------------------------------------
def test_04_ch13_single_callback_and_class(mnist_tiny):
    dls = digit_dls(mnist_tiny)
    learn = Learner(dls, simple_cnn(), loss_func=F.cross_entropy, metrics=accuracy, cbs=ActivationStats(with_hist=True))
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert isinstance(learn.activation_stats, ActivationStats) and len(learn.activation_stats.stats) > 0

    class CountBatches(Callback):
        def before_fit(self): self.n = 0
        def after_batch(self): self.n += self.training
    cb = CountBatches()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=cb)
    assert cb.n == len(dls.train) and cb not in learn.cbs  # added for that fit only
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, cbs=TerminateOnNaNCallback)
    learn2 = Learner(dls, simple_cnn(), loss_func=F.cross_entropy, cbs=CountBatches)
    assert isinstance(learn2.count_batches, CountBatches)


def test_04_ch16_run_before_single_class():
    class NaNStop(Callback): run_before = Recorder
    class AfterRec(Callback): run_after = Recorder
    cbs = sort_callbacks([AfterRec(), Recorder(), NaNStop()])
    assert [type(c) for c in cbs] == [NaNStop, Recorder, AfterRec]


# 5 -------------------------------------------------------------------------------------------------------
def test_05_ch6_metrics_setter(mnist_tiny):
    dls = digit_dls(mnist_tiny)
    learn = Learner(dls, simple_cnn(), loss_func=F.cross_entropy)
    learn.metrics = [accuracy, error_rate]
    loss, acc, err = learn.validate()
    assert acc + err == pytest.approx(1, abs=1e-6)
    x = torch.rand(64, 5)
    y = (x[:, :3] > 0.5).float()  # three labels per item, each on or off
    dls = DataLoaders.from_dsets((x[:48], y[:48]), (x[48:], y[48:]), bs=16, device='cpu')
    learn = Learner(dls, nn.Linear(5, 3), loss_func=BCEWithLogitsLossFlat())
    learn.metrics = partial(accuracy_multi, thresh=0.95)
    assert [m.name for m in learn.metrics] == ['accuracy_multi'] and len(learn.validate()) == 2
    learn.metrics = None
    assert learn.metrics == [] and len(learn.validate()) == 1


# 6 -------------------------------------------------------------------------------------------------------
def test_06_ch6_point_regression_knows_c_and_loss(mnist_tiny):
    def centre(f):  # the digit's centre of mass, in pixels: a real point target
        im = torch.as_tensor(np.array(PILImageBW.create(f)), dtype=torch.float32)
        ys, xs = torch.meshgrid(torch.arange(28.), torch.arange(28.), indexing='ij')
        return tensor([(im * xs).sum() / im.sum(), (im * ys).sum() / im.sum()])
    dblock = DataBlock(blocks=(ImageBlock, PointBlock), get_items=get_image_files, get_y=centre,
                       splitter=FuncSplitter(lambda o: o.parent.parent.name == 'valid'), item_tfms=Resize(32))
    dls = dblock.dataloaders(mnist_tiny, bs=16, num_workers=0)
    assert dls.c == 2 and isinstance(dls.loss_func, MSELossFlat)
    xb, yb = dls.one_batch()
    assert yb.shape == (16, 1, 2) and yb.abs().max() <= 1
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn = vision_learner(dls, resnet18, y_range=(-1, 1), pretrained=False)
    assert isinstance(learn.loss_func, MSELossFlat)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    preds, targs = learn.get_preds()
    assert preds.shape == (len(dls.valid_ds), 2) and targs.shape == (len(dls.valid_ds), 1, 2)
    assert preds.abs().max() <= 1


# 7 -------------------------------------------------------------------------------------------------------
def test_07_ch6_vocab_indexed_by_tensor():
    items = [('a', ['cat', 'dog']), ('b', ['dog']), ('c', ['bird', 'cat'])]
    dblock = DataBlock(blocks=(TransformBlock, MultiCategoryBlock), get_x=lambda o: o[0], get_y=lambda o: o[1],
                       splitter=IndexSplitter([1]))
    dsets = dblock.datasets(items)
    x, y = dsets.train[0]
    idxs = torch.where(y == 1.)[0]
    assert list(dsets.train.vocab[idxs]) == ['cat', 'dog']
    assert list(dsets.train.vocab[[0, 2]]) == ['bird', 'dog']
    assert dsets.train.vocab[1] == 'cat' and dsets.train.vocab.o2i['dog'] == 2


# 8 -------------------------------------------------------------------------------------------------------
def test_08_ch18_decoded_tensor_image_shows(mnist_tiny):
    import matplotlib.pyplot as plt
    dls = ImageDataLoaders.from_folder(mnist_tiny, valid='valid', num_workers=0, bs=8)
    x, = first(dls.test_dl([get_image_files(mnist_tiny/'valid')[0]]))
    assert type(x) is torch.Tensor  # the model gets plain tensors
    x_dec = TensorImage(dls.train.decode((x,))[0][0])
    assert x_dec.shape == (3, 28, 28)
    _, ax = plt.subplots()
    assert x_dec.show(ctx=ax) is ax and len(ax.images) == 1
    plt.close('all')


# 9 -------------------------------------------------------------------------------------------------------
def test_09_dataloaders_pass_to_train_loader(mnist_tiny):
    dls = ImageDataLoaders.from_folder(mnist_tiny, valid='valid', num_workers=0, bs=8)
    b = dls.one_batch()
    dec = dls.decode(b)
    assert isinstance(dec[0], TensorImage) and dec[0].dtype == torch.uint8
    assert dls.new(bs=4).bs == 4 and isinstance(dls.after_batch, Pipeline)
    with pytest.raises(AttributeError, match='no_such'): dls.no_such_thing


# 10 ------------------------------------------------------------------------------------------------------
def test_10_complete_learner_from_any_import():
    code = ("from dlcoders.vision.learner import vision_learner; from dlcoders.learner import Learner; "
            "assert all(hasattr(Learner, a) for a in ('fine_tune', 'fit_one_cycle', 'lr_find', 'fit_flat_cos'))")
    subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)
    code = "from dlcoders.learner import Learner; assert hasattr(Learner, 'fine_tune') and hasattr(Learner, 'to_fp16')"
    subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)


# 11 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('mod', ['dlcoders.basics', 'dlcoders.vision.all'])
def test_11_star_import_brings_the_usual_names(mod):
    names = 'np pd plt math torch nn F partial Path L to_np tensor doc first'.split()
    code = f"from {mod} import *\n" + ''.join(f"assert {n} is not None\n" for n in names) + \
           "assert to_np(tensor([1, 2])).tolist() == [1, 2] and Path('.').ls is not None"
    subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO, env={**os.environ, 'MPLBACKEND': 'Agg'})


# 12 ------------------------------------------------------------------------------------------------------
def test_12_load_learner_warns_and_has_a_safe_path(tmp_path, mnist_tiny):
    dls = digit_dls(mnist_tiny)
    learn = Learner(dls, simple_cnn(), path=tmp_path)  # the loss the data suggests
    fname = learn.export()
    with pytest.warns(UserWarning, match='unpickl'): load_learner(fname)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert isinstance(load_learner(fname, trusted=True), Learner)  # the caller vouches for the file: no warning
        safe = load_learner(fname, safe=True)  # library pieces only: restored without running code from the file
    item = get_image_files(mnist_tiny/'valid')[0]
    torch.testing.assert_close(safe.predict(item)[2], learn.predict(item)[2])
    # code of the user's own travels by value in the pickle: a safe load refuses it and says what to do instead
    learn.dls.train.after_item.fs.append(Transform(lambda x: x))
    with pytest.raises(Exception, match=r'refused .*export\.pkl.*trusted=True'):
        load_learner(learn.export(), safe=True)
    # weights only, into a learner the caller builds: `load` reads with torch's weights-only unpickler
    learn.save('weights', with_opt=False)
    fresh = Learner(dls, simple_cnn(), path=tmp_path)  # the loss the data suggests
    fresh.load('weights')
    for p, q in zip(fresh.model.parameters(), learn.model.parameters()): torch.testing.assert_close(p, q)


# 13 ------------------------------------------------------------------------------------------------------
def test_13_zero_epochs_do_nothing(mnist_tiny):
    learn = Learner(digit_dls(mnist_tiny), simple_cnn(), loss_func=F.cross_entropy)
    before = [p.detach().clone() for p in learn.model.parameters()]
    with learn.no_bar(), learn.no_logging():
        learn.fit(0)
        learn.fit_one_cycle(0)
        learn.fine_tune(0, freeze_epochs=0)
        learn.fit_flat_cos(0)
    for p, q in zip(before, learn.model.parameters()): assert torch.equal(p, q)
