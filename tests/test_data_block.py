"The data block API (`dlcoders.data.block`): errors that name the step and the item, splitters, determinism, `new`."
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import numpy as np
import pandas as pd
import pytest
import torch
from torchvision import tv_tensors

from dlcoders.data.block import *
from dlcoders.data.core import Transform, ToTensor
from dlcoders.torch_core import set_seed


# --- small synthetic data: item i -> an 8x8 image whose pixels are i; a label read from a fake file name -------------
def fname(i: int) -> str: return f"/data/{'train' if i % 4 else 'valid'}/{'cat' if i % 2 else 'dog'}/img_{i}.jpg"

def make_image(o) -> tv_tensors.Image:
    i = int(Path(o).stem.split('_')[1])
    return tv_tensors.Image(torch.full((3, 8, 8), i, dtype=torch.uint8))

ITEMS = [fname(i) for i in range(40)]

class AddOne(Transform):
    order = 10
    def encodes(self, x: tv_tensors.Image): return x + 1

def image_block(): return TransformBlock(type_tfms=make_image)

def block(**kwargs):
    args = dict(blocks=(image_block, CategoryBlock), get_y=parent_label, splitter=RandomSplitter(seed=3))
    return DataBlock(**{**args, **kwargs})


# --- summary and errors name the step and the item ------------------------------------------------------------------
def fail_on_17(o):
    if o.endswith('img_17.jpg'): raise ValueError('corrupt label file')
    return parent_label(o)

def test_summary_names_failing_step_and_item(capsys):
    db = block(get_y=fail_on_17, splitter=IndexSplitter([0, 1]))
    with pytest.raises(DataBlockError) as e:
        db.summary(ITEMS)
    msg = str(e.value)
    assert msg.startswith('get_y fail_on_17 failed')
    assert 'items[17]' in msg and 'img_17.jpg' in msg   # which item, and the raw item
    assert 'training item 15' in msg                     # its place in the training set (0 and 1 are validation)
    assert 'ValueError: corrupt label file' in msg
    assert isinstance(e.value.__cause__, ValueError)     # chained to the original exception

def test_summary_names_failing_type_transform(capsys):
    def bad_image(o):
        if o.endswith('img_5.jpg'): raise OSError('truncated file')
        return make_image(o)
    db = block(blocks=(TransformBlock(type_tfms=bad_image), CategoryBlock), splitter=IndexSplitter([]))
    with pytest.raises(DataBlockError, match=r'type transform bad_image of the input.*items\[5\]') as e:
        db.summary(ITEMS[:8], bs=8)
    assert 'img_5.jpg' in str(e.value) and 'truncated file' in str(e.value)

def test_summary_reports_collation_failure(capsys):
    def sized(o): return tv_tensors.Image(torch.zeros(3, 8 + int(Path(o).stem.split('_')[1]), 8, dtype=torch.uint8))
    db = block(blocks=(TransformBlock(type_tfms=sized), CategoryBlock))
    with pytest.raises(DataBlockError, match='collating 4 items'):
        db.summary(ITEMS)

def test_summary_prints_every_step(capsys):
    block(item_tfms=AddOne()).summary(ITEMS, bs=2)
    out = capsys.readouterr().out
    for step in ['Items: 40', 'Split by RandomSplitter', 'make_image', 'get_y parent_label', 'Categorize',
                 'item transform AddOne', 'Collating 2 items', 'Batch transforms', 'shape (2, 3, 8, 8)']:
        assert step in out, step

def test_get_items_failure_names_source():
    def boom(src): raise FileNotFoundError(src)
    with pytest.raises(DataBlockError, match=r'get_items \(boom\) failed'):
        block(get_items=boom).datasets('/no/such/folder')


# --- getters and labellers ------------------------------------------------------------------------------------------
def test_regex_labeller_names_item_and_pattern():
    lbl = RegexLabeller(r'/(cat)/')
    assert lbl(fname(1)) == 'cat'
    with pytest.raises(ValueError) as e: lbl(fname(2))
    assert fname(2) in str(e.value) and "'/(cat)/'" in str(e.value)
    with pytest.raises(ValueError, match='needs a group'): RegexLabeller(r'cat')

def test_col_reader_names_missing_column_and_existing_ones():
    df = pd.DataFrame({'fname': ['a.jpg', 'b.jpg'], 'label': ['x', 'y']})
    with pytest.raises(KeyError) as e: ColReader('labels')(df.iloc[0])
    assert "'labels'" in str(e.value) and "['fname', 'label']" in str(e.value)
    db = DataBlock(get_x=ColReader('fname'), get_y=ColReader('lbl'), splitter=IndexSplitter([1]))
    with pytest.raises(DataBlockError) as e: db.datasets(df)
    assert "'lbl'" in str(e.value) and "['fname', 'label']" in str(e.value)
    with pytest.raises(KeyError, match="'is_val'.*fname"): ColSplitter('is_val')(df)

def test_col_reader_forms():
    df = pd.DataFrame({'fname': ['a.jpg'], 'tags': ['x y'], 'n': [3]})
    r = df.iloc[0]
    assert ColReader('fname', pref=Path('/d'))(r) == '/d/a.jpg'
    assert ColReader('fname', pref='p_', suff='.bak')(r) == 'p_a.jpg.bak'
    assert ColReader('tags', label_delim=' ')(r) == ['x', 'y']
    assert ColReader(['fname', 'n'])(r) == ['a.jpg', 3]
    assert ColReader(2)(r) == 3
    assert ColReader('fname')(next(df.itertuples())) == 'a.jpg'

def test_item_and_attr_getters():
    assert ItemGetter(0)(('a', 'b')) == 'a'   # the whole tuple, not element-wise
    assert AttrGetter('stem')(Path('/x/y.jpg')) == 'y'
    assert using_attr(str.upper, 'stem')(Path('/x/y.jpg')) == 'Y'


# --- splitters ------------------------------------------------------------------------------------------------------
def check_split(train, valid, n, complete=True):
    assert not set(train) & set(valid)
    assert len(set(train)) == len(train) and len(set(valid)) == len(valid)
    assert all(0 <= i < n for i in train + valid)
    if complete: assert sorted(train + valid) == list(range(n))

def test_every_splitter(tmp_path):
    n = 20
    check_split(*RandomSplitter(0.25, seed=1)(ITEMS[:n]), n)
    assert len(RandomSplitter(0.25, seed=1)(ITEMS[:n])[1]) == 5
    check_split(*TrainTestSplitter(0.25, random_state=1)(ITEMS[:n]), n)
    strat = ['a'] * 10 + ['b'] * 10
    tr, va = TrainTestSplitter(0.2, random_state=0, stratify=strat)(ITEMS[:n])
    assert sorted(strat[i] for i in va) == ['a', 'a', 'b', 'b']
    assert IndexSplitter([2, 5])(ITEMS[:n])[1] == [2, 5]
    check_split(*IndexSplitter([2, 5])(ITEMS[:n]), n)
    mask = [i % 3 == 0 for i in range(n)]
    assert MaskSplitter(mask)(ITEMS[:n])[1] == [i for i in range(n) if i % 3 == 0]
    with pytest.raises(ValueError): MaskSplitter(mask[:5])(ITEMS[:n])
    tr, va = FuncSplitter(lambda o: '/cat/' in o)(ITEMS[:n])
    assert va == list(range(1, n, 2))
    check_split(tr, va, n)
    tr, va = GrandparentSplitter()(ITEMS[:n])
    assert va == list(range(0, n, 4))
    check_split(tr, va, n)
    with pytest.raises(ValueError, match=r"\['train', 'valid'\]"): GrandparentSplitter(valid_name='val')(ITEMS)
    (tmp_path/'valid.txt').write_text('img_3.jpg\nimg_7.jpg\n')
    assert FileSplitter(tmp_path/'valid.txt')(ITEMS[:n])[1] == [3, 7]
    df = pd.DataFrame({'x': range(n), 'is_valid': mask, 'fold': [i % 4 for i in range(n)]})
    assert ColSplitter()(df)[1] == [i for i in range(n) if mask[i]]
    assert ColSplitter('fold', on=2)(df)[1] == list(range(2, n, 4))
    assert ColSplitter('fold', on=[0, 1])(df)[1] == sorted(list(range(0, n, 4)) + list(range(1, n, 4)))
    check_split(*ColSplitter()(df), n)
    tr, va = RandomSubsetSplitter(0.5, 0.2, seed=2)(ITEMS[:n])
    assert (len(tr), len(va)) == (10, 4)
    check_split(tr, va, n, complete=False)
    with pytest.raises(ValueError): RandomSubsetSplitter(0.8, 0.5)
    with pytest.raises(IndexError): IndexSplitter([25])(ITEMS[:n])

def test_same_seed_same_split_whatever_the_global_rng():
    torch.manual_seed(0)
    np.random.seed(0)
    a = RandomSplitter(seed=7)(ITEMS)
    torch.rand(100)
    b = RandomSplitter(seed=7)(ITEMS)
    assert a == b
    assert RandomSplitter(seed=8)(ITEMS) != a
    assert RandomSubsetSplitter(0.3, 0.3, seed=7)(ITEMS) == RandomSubsetSplitter(0.3, 0.3, seed=7)(ITEMS)

def test_same_seed_same_first_batch():
    def first():
        set_seed(5)
        dls = block(item_tfms=AddOne()).dataloaders(ITEMS, bs=8, num_workers=0)
        return dls.train.items if hasattr(dls.train, 'items') else dls.train_ds.items, dls.one_batch()
    (items1, (x1, y1)), (items2, (x2, y2)) = first(), first()
    assert items1 == items2
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


# --- the DataBlock --------------------------------------------------------------------------------------------------
def test_dataloaders_batches_and_vocab():
    dls = block(item_tfms=AddOne()).dataloaders(ITEMS, bs=4, num_workers=0)
    xb, yb = dls.one_batch()
    assert type(xb) is torch.Tensor and xb.shape == (4, 3, 8, 8)
    assert dls.vocab == ['cat', 'dog'] and dls.c == 2
    assert (len(dls.train_ds), len(dls.valid_ds)) == (32, 8)
    labels = [dls.vocab[int(y)] for y in yb]
    pixels = [int(x[0, 0, 0]) - 1 for x in xb]               # AddOne ran once
    assert labels == ['cat' if i % 2 else 'dog' for i in pixels]

def test_new_keeps_blocks_changes_transforms():
    db = block(item_tfms=AddOne(), batch_tfms=AddOne(order=20))
    db2 = db.new(item_tfms=[])
    assert db2.blocks is db.blocks and db2.getters == db.getters and db2.splitter is db.splitter
    assert [type(t) for t in db2.item_tfms] == [ToTensor]
    assert [type(t) for t in db.item_tfms] == [ToTensor, AddOne]   # sorted by order
    assert len(db2.batch_tfms) == 1                          # not given: kept
    x1 = db.dataloaders(ITEMS, bs=2, num_workers=0).valid.one_batch()[0]
    x2 = db2.dataloaders(ITEMS, bs=2, num_workers=0).valid.one_batch()[0]
    assert torch.equal(x1, x2 + 1)                            # one item transform fewer

def test_user_transform_replaces_block_default_of_same_type():
    db = block(blocks=(TransformBlock(type_tfms=make_image, item_tfms=AddOne()), CategoryBlock), item_tfms=AddOne())
    assert [type(t) for t in db.item_tfms] == [ToTensor, AddOne]

def test_vocab_not_shared_between_builds():
    db = block()
    assert db.datasets(ITEMS).vocab == ['cat', 'dog']
    other = [o.replace('/cat/', '/cow/').replace('/dog/', '/pig/') for o in ITEMS]
    assert db.datasets(other).vocab == ['cow', 'pig']

def test_getter_count_errors():
    with pytest.raises(ValueError, match='get_y has 2'): block(get_y=[parent_label, parent_label])
    with pytest.raises(ValueError, match='3 getters for 2 blocks'): block(getters=[None, None, None])

def test_dataframe_source_multicategory_and_regression():
    df = pd.DataFrame({'fname': ITEMS[:12], 'tags': ['a b', 'b', 'c a'] * 4, 'y': np.arange(12) / 2,
                       'is_valid': [i < 3 for i in range(12)]})
    db = DataBlock(blocks=(image_block, MultiCategoryBlock, RegressionBlock), n_inp=1,
                   getters=[ColReader('fname'), ColReader('tags', label_delim=' '), ColReader('y')],
                   splitter=ColSplitter())
    dls = db.dataloaders(df, bs=3, num_workers=0)
    xb, yb, zb = dls.valid.one_batch()
    assert dls.valid_ds.tls[1].tfms[1].vocab == ['a', 'b', 'c']
    assert yb.tolist() == [[1., 1., 0.], [0., 1., 0.], [1., 0., 1.]]
    assert zb.tolist() == [0., 0.5, 1.]

def test_show_batch_and_show_at_save_to_file(tmp_path):
    import matplotlib.pyplot as plt
    dls = block().dataloaders(ITEMS, bs=4, num_workers=0)
    axs = dls.show_batch(max_n=4, nrows=1)
    assert len(axs) == 4 and all(ax.get_title() in ('cat', 'dog') for ax in axs)
    plt.savefig(tmp_path/'b.png')
    assert (tmp_path/'b.png').stat().st_size > 1000
    dsets = block().datasets(ITEMS)
    ax = show_at(dsets.train, 0)
    assert ax.get_title() in ('cat', 'dog')
    plt.close('all')
