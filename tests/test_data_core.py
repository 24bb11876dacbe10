"Transforms, pipelines, datasets and typed batches (`dlcoders.data.core`): dispatch, decoding, splits, pickling, workers."
import os, pickle, subprocess, sys, textwrap
from pathlib import Path

import cloudpickle
import matplotlib
matplotlib.use('Agg')
import pytest
import torch
from torch import nn, Tensor
from torchvision import tv_tensors

from dlcoders.data.core import *
from dlcoders.data.core import _type_tree
from dlcoders.callback.core import Callback
from dlcoders.learner import Learner, load_learner
from dlcoders.losses import CrossEntropyLossFlat, BCEWithLogitsLossFlat, MSELossFlat
from dlcoders.torch_core import set_seed

REPO = Path(__file__).resolve().parents[1]


# --- small synthetic data: item i -> an 8x8 image whose pixels are i, labelled by parity ----------------------------
def make_image(i: int):
    return tv_tensors.Image(torch.full((3, 8, 8), i % 256, dtype=torch.uint8))

def parity(i: int): return 'even' if i % 2 == 0 else 'odd'

class ToFloat(Transform):
    order = 10
    def encodes(self, x: tv_tensors.Image): return x.float() / 255
    def decodes(self, x: tv_tensors.Image): return (x * 255).round().byte()

class AddNoise(Transform):
    "Training-only: a random value added to every image (per item)."
    split_idx = 0
    def encodes(self, x: tv_tensors.Image): return x + torch.randint(0, 3, (1,), dtype=torch.uint8)

class Zero(Transform):
    "Training-only batch transform that zeroes the images."
    split_idx, order = 0, 20
    def encodes(self, x: tv_tensors.Image): return x * 0

def parity_dsets(n=40, **kwargs):
    splits = [list(range(0, n, 4)) + list(range(1, n, 4)) + list(range(2, n, 4)), list(range(3, n, 4))]
    return Datasets(list(range(n)), [[make_image], [parity, Categorize()]], splits=splits, **kwargs)


# --- Transform: dispatch and tuples ---------------------------------------------------------------------------------
class OnlyInts(Transform):
    def encodes(self, x: int): return x * 10
    def decodes(self, x: int): return x // 10

class TwoTypes(Transform):
    def encodes(self, x: int): return x + 1
    def encodes(self, x: str): return x + '!'
    def encodes(self, x: tv_tensors.Image): return x * 2

class Child(TwoTypes):
    def encodes(self, x: str): return x + '?'

class Pair(fastuple): pass

class TakesPairs(Transform):
    def encodes(self, x: Pair): return Pair(x[1], x[0])

class WholeItem(ItemTransform):
    def encodes(self, x): return (x[1], x[0])


def test_transform_leaves_other_types_untouched():
    t = OnlyInts()
    assert t(3) == 30
    for x in ['a', 2.5, [3], None, torch.tensor([1.])]:
        assert t(x) is x
    assert t.decode(t(7)) == 7


def test_several_encodes_dispatch_on_type():
    t = TwoTypes()
    assert t(1) == 2 and t('a') == 'a!' and t(1.5) == 1.5
    assert t(True) == 2  # bool is an int: the closest registered type wins
    im = tv_tensors.Image(torch.ones(3, 2, 2))
    assert isinstance(t(im), tv_tensors.Image)  # `x * 2` is plain, the transform keeps the type
    assert torch.equal(t(torch.ones(2)), torch.ones(2))  # a plain tensor is not an Image: untouched
    c = Child()
    assert c('a') == 'a?' and c(1) == 2  # a subclass overrides one type and inherits the others


def test_function_and_decorator_forms():
    t = Transform(lambda x: x * 2)
    assert t(3) == 6 and t.decode(6) == 6
    t2 = Transform(enc=parity, dec=lambda s: s.upper())
    assert t2(3) == 'odd' and t2('odd') == 'odd' and t2.decode('odd') == 'ODD'
    assert t2.name == 'parity'
    @Transform
    def neg(x: int): return -x
    assert neg(2) == -2 and neg('a') == 'a' and neg.name == 'neg'


def test_tuple_rule():
    t = OnlyInts()
    assert t((1, 'a', (2, 3.0))) == (10, 'a', (20, 3.0))  # element by element, recursively
    p = Pair(1, 'a')
    res = t(p)
    assert type(res) is Pair and tuple(res) == (10, 'a')  # the tuple type is kept
    assert tuple(TakesPairs()(Pair(1, 2))) == (2, 1)  # an encodes for the tuple's own type gets it whole
    assert TakesPairs()((1, 2)) == (1, 2)  # a plain tuple is not a Pair: its elements pass through
    assert WholeItem()((1, 2)) == (2, 1)  # an ItemTransform always gets the tuple whole


def test_split_idx_on_transform():
    t = Zero()
    im = tv_tensors.Image(torch.ones(3, 2, 2, dtype=torch.uint8))
    assert t(im, split_idx=0).sum() == 0
    assert t(im, split_idx=1).sum() == 12 and t(im).sum() == 12


def test_pipeline_order_setup_decode():
    p = Pipeline([ToFloat(), make_image])  # sorted by order: make_image (0) then ToFloat (10)
    assert [t.name for t in p.fs] == ['make_image', 'ToFloat']
    x = p(5)
    assert isinstance(x, tv_tensors.Image) and x.dtype == torch.float32
    assert torch.equal(p.decode(x), make_image(5))
    tl = TfmdLists(list(range(10)), [parity, Categorize()])
    assert tl.vocab == ['even', 'odd'] and tl[3] == 1 and tl.decode(tl[3]) == 'odd'


# --- labels ----------------------------------------------------------------------------------------------------------
def test_categorize_round_trip_and_unknown_label():
    c = Categorize()
    c.setup(['b', 'a', 'c', 'a'])
    assert list(c.vocab) == ['a', 'b', 'c'] and c.c == 3
    for lbl in ['a', 'b', 'c']:
        assert c.decode(c(lbl)) == lbl and isinstance(c.decode(c(lbl)), Category)
    with pytest.raises(KeyError, match="'zebra'.*3 classes: 'a', 'b', 'c'"): c('zebra')
    assert isinstance(Datasets(['x'], [[str], [Categorize()]]).loss_func, CrossEntropyLossFlat)
    with pytest.raises(ValueError, match='no vocab'): Categorize()('a')


def test_multicategorize_round_trip():
    tl = TfmdLists([['cat', 'indoor'], ['dog'], ['cat', 'dog']], [MultiCategorize(), OneHotEncode()])
    assert list(tl.vocab) == ['cat', 'dog', 'indoor'] and tl.c == 3
    assert torch.equal(tl[0], torch.tensor([1., 0., 1.]))
    for i, labels in enumerate([['cat', 'indoor'], ['dog'], ['cat', 'dog']]):
        assert tl.decode(tl[i]) == labels
    assert isinstance(tl.loss_func, BCEWithLogitsLossFlat)
    mc = MultiCategorize(vocab=['a', 'b'])
    with pytest.raises(KeyError, match="'z'"): mc(['a', 'z'])
    with pytest.raises(TypeError, match='list of labels'): mc('a b')
    e = EncodedMultiCategorize(vocab=['a', 'b', 'c'])
    assert e.decode(e([0, 1, 1])) == ['b', 'c']
    r = TfmdLists([[1., 2.], [3., 4.]], [RegressionSetup()])
    assert r.c == 2 and isinstance(r.loss_func, MSELossFlat)


# --- datasets and loaders ---------------------------------------------------------------------------------------------
def test_split_idx_in_datasets_and_dataloaders():
    dsets = Datasets(list(range(20)), [[make_image, AddNoise()], [parity, Categorize()]],
                     splits=[list(range(16)), list(range(16, 20))])
    assert dsets.train.split_idx == 0 and dsets.valid.split_idx == 1
    for i in range(4):  # validation items are never noisy
        assert torch.equal(dsets.valid[i][0], make_image(16 + i))
    set_seed(0)
    assert any(not torch.equal(dsets.train[i][0], make_image(i)) for i in range(16))
    dls = parity_dsets().dataloaders(bs=4, after_batch=[ToFloat(), Zero()], num_workers=0)
    assert dls.train.one_batch()[0].abs().sum() == 0
    assert dls.valid.one_batch()[0].abs().sum() > 0


def test_vocab_comes_from_training_items_only():
    dsets = Datasets(list(range(8)), [[make_image], [parity, Categorize()]], splits=[[0, 2, 4], [1, 3, 5, 6, 7]])
    assert list(dsets.vocab) == ['even']


def test_batches_are_plain_and_decode_restores_types():
    dls = parity_dsets().dataloaders(bs=4, after_batch=[ToFloat()], num_workers=0)
    xb, yb = dls.valid.one_batch()
    assert type(xb) is Tensor and type(yb) is Tensor and xb.dtype == torch.float32
    items = dls.decode_batch((xb, yb), max_n=2)
    assert len(items) == 2
    x0, y0 = items[0]
    assert isinstance(x0, tv_tensors.Image) and torch.equal(x0, make_image(3))
    assert y0 == 'odd'


def test_typed_batches_through_worker_processes():
    dls = parity_dsets().dataloaders(bs=5, after_batch=[ToFloat()], num_workers=2)
    bs = list(dls.valid)
    assert len(bs) == 2 and all(type(x) is Tensor and x.dtype == torch.float32 for x, _ in bs)
    assert dls.decode_batch(bs[0], max_n=1)[0][1] == 'odd'


def test_same_seed_same_first_batch():
    dls = Datasets(list(range(40)), [[make_image, AddNoise()], [parity, Categorize()]],
                   splits=[list(range(32)), list(range(32, 40))]).dataloaders(bs=8, num_workers=2)
    set_seed(42)
    x1, y1 = dls.train.one_batch()
    set_seed(42)
    x2, y2 = dls.train.one_batch()
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    set_seed(43)
    x3, _ = dls.train.one_batch()
    assert not torch.equal(x1, x3)


def test_pickle_round_trip_new_empty_and_test_dl():
    dsets = parity_dsets()
    dls = dsets.dataloaders(bs=4, after_batch=[ToFloat()], num_workers=0)
    dls.valid.one_batch()
    for obj in (dsets, dls.train, dls):
        obj2 = cloudpickle.loads(cloudpickle.dumps(obj))
        assert type(obj2) is type(obj)
    ds2 = pickle.loads(pickle.dumps(dsets))  # module-level transforms: plain pickle works too
    assert ds2[5][1] == dsets[5][1] and torch.equal(ds2[5][0], dsets[5][0])
    dl2 = cloudpickle.loads(cloudpickle.dumps(dls.train))
    assert torch.equal(dl2.new(shuffle=False).one_batch()[1], dls.train.new(shuffle=False).one_batch()[1])
    empty = cloudpickle.loads(cloudpickle.dumps(dls.new_empty()))
    assert len(empty.train_ds) == 0 and list(empty.vocab) == ['even', 'odd'] and empty.n_inp == 1
    tdl = empty.test_dl([6, 7])
    (xb,) = tdl.one_batch()
    assert xb.shape == (2, 3, 8, 8) and type(xb) is Tensor
    assert torch.equal(tdl.decode_batch((xb,))[1][0], make_image(7))
    ldl = empty.test_dl([6, 7], with_labels=True)
    assert ldl.one_batch()[1].tolist() == [0, 1]


class CheckPlain(Callback):
    "Records the types of what the model gets."
    def __init__(self): self.seen = []
    def before_batch(self):
        self.seen.append(tuple(type(t) for t in self.learn.xb + self.learn.yb))

class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * 8 * 8, 2)
    def forward(self, x): return self.lin(x.flatten(1))


def test_model_gets_plain_tensors_and_predict_decodes():
    dls = parity_dsets().dataloaders(bs=8, after_batch=[ToFloat()], num_workers=0)
    cb = CheckPlain()
    learn = Learner(dls, TinyNet(), cbs=[cb])
    assert isinstance(learn.loss_func, CrossEntropyLossFlat)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert cb.seen and all(t == (Tensor, Tensor) for t in cb.seen)
    lbl, idx, probs = learn.predict(5)
    assert cb.seen[-1] == (Tensor,)  # predict: an input, no target
    assert lbl in ('even', 'odd') and lbl == dls.vocab[int(idx)] and probs.shape == (2,)
    axs = dls.show_batch(max_n=4)
    assert len(axs) == 4 and axs[0].get_title() in ('even', 'odd')
    learn.show_results(max_n=2)


def test_siamese_like_tuple_items_show(tmp_path):
    class Twin(fastuple):
        def show(self, ctx=None, **kwargs):
            return show_image(torch.cat([self[0], self[1]], dim=2), ctx=ctx, title=str(bool(self[2])), **kwargs)
    tl = TfmdLists(list(range(12)), [lambda i: Twin(make_image(i), make_image(i + 1), i % 3 == 0)],
                   splits=[list(range(8)), list(range(8, 12))])
    dls = tl.dataloaders(bs=4, after_batch=[ToFloat()], num_workers=0)
    b = dls.valid.one_batch()
    assert type(b) is tuple and len(b) == 3 and all(type(t) is Tensor for t in b)
    assert dls.n_inp == 2
    dec = dls.valid.decode_batch(b)
    assert isinstance(dec[0], Twin) and torch.equal(dec[0][0], make_image(8))
    axs = dls.valid.show_batch()
    axs[0].figure.savefig(tmp_path/'twins.png')
    assert (tmp_path/'twins.png').stat().st_size > 1000


EXPORT = '''
import sys, torch
from torch import nn
from torchvision import tv_tensors
from dlcoders.data.core import *
from dlcoders.learner import Learner

def make_image(i):
    return tv_tensors.Image(torch.full((3, 8, 8), i % 256, dtype=torch.uint8))

class ToFloat(Transform):
    def encodes(self, x: tv_tensors.Image): return x.float() / 255

dsets = Datasets(list(range(20)), [[make_image], [lambda i: 'big' if i >= 10 else 'small', Categorize()]],
                 splits=[list(range(16)), list(range(16, 20))])
dls = dsets.dataloaders(bs=4, after_batch=[ToFloat()], num_workers=0)
learn = Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(192, 2)))
learn.export(sys.argv[1])
'''

LOAD = '''
import sys
from dlcoders.learner import load_learner
learn = load_learner(sys.argv[1])
lbl, idx, probs = learn.predict(3)
assert lbl in ('big', 'small') and probs.shape == (2,), (lbl, probs)
(xb,) = learn.dls.test_dl([1, 2, 3]).one_batch()
assert xb.shape == (3, 3, 8, 8) and type(xb).__name__ == 'Tensor'
print('OK', lbl)
'''

def test_export_then_load_in_fresh_process(tmp_path):
    "A learner exported with transforms and a labelling lambda defined in a script loads and predicts elsewhere."
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}
    (tmp_path/'export.py').write_text(EXPORT)
    (tmp_path/'load.py').write_text(LOAD)
    fname = tmp_path/'model.pkl'
    subprocess.run([sys.executable, 'export.py', str(fname)], cwd=tmp_path, env=env, check=True, capture_output=True)
    other = tmp_path/'elsewhere'
    other.mkdir()
    res = subprocess.run([sys.executable, str(tmp_path/'load.py'), str(fname)], cwd=other, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith('OK')


def test_type_tree_is_picklable():
    t = _type_tree((tv_tensors.BoundingBoxes(torch.zeros(1, 4), format='XYXY', canvas_size=(8, 8)), 1))
    t2 = pickle.loads(pickle.dumps(t))
    assert t2.elems[0].meta['canvas_size'] == (8, 8)
