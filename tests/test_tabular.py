"Tables: procs at inference (unseen categories, missing values), bad column names, train-only statistics, predict, export."
import subprocess, sys, textwrap
import numpy as np, pandas as pd, pytest, torch
import torch.nn.functional as F
from dlcoders.torch_core import set_seed
from dlcoders.data.block import CategoryBlock, RegressionBlock
from dlcoders.data.load import TensorItems
from dlcoders.learner import load_learner
from dlcoders.metrics import accuracy
from dlcoders.vision.augment import Normalize
from dlcoders.tabular.core import *
from dlcoders.tabular.data import TabularDataLoaders
from dlcoders.tabular.model import TabularModel, get_emb_sz, emb_sz_rule
from dlcoders.tabular.learner import tabular_learner

def make_df(n=400, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({'color': rng.choice(['red', 'green', 'blue'], n), 'size': rng.choice(['S', 'M', 'L'], n),
                       'age': rng.normal(40, 10, n), 'income': rng.normal(50, 20, n)})
    df.loc[rng.random(n) < 0.1, 'income'] = np.nan
    df['y'] = np.where((df.color == 'red') ^ (df.age > 40), 'yes', 'no')
    df['price'] = (df.age * 2 + rng.normal(0, 1, n)).astype('float32')
    return df

SPLITS = (list(range(300)), list(range(300, 400)))
PROCS = [Categorify, FillMissing, Normalize]

def make_to(df=None, **kwargs):
    return TabularPandas(make_df() if df is None else df, PROCS, ['color', 'size'], ['age', 'income'], 'y',
                         splits=SPLITS, **kwargs)

def test_unseen_category_is_na():
    to = make_to()
    new = make_df(5, seed=1)
    new.loc[0, 'color'], new.loc[1, 'size'] = 'purple', None
    res = to.new(new)
    assert res.xs.color.iloc[0] == 0 and res.xs['size'].iloc[1] == 0
    assert res.xs.color.iloc[2] == to.classes['color'].o2i[new.color.iloc[2]]
    assert res.decode().color.iloc[0] == '#na#'

def test_missing_continuous_gets_training_fill():
    df = make_df()
    to = make_to(df)
    fill = df.age.iloc[SPLITS[0]].median()  # age had no missing values in training
    new = make_df(3, seed=2)
    new.loc[0, 'age'] = np.nan
    res = to.new(new)
    norm = next(p for p in to.procs if isinstance(p, TabularNormalize))
    assert np.isclose(res.xs.age.iloc[0], (fill - norm.means['age']) / norm.stds['age'], atol=1e-5)
    assert 'age_na' not in res.cat_names and not res.xs.isna().any().any()
    # income had holes: its fill value is the training median, and income_na flags the row
    new.loc[1, 'income'] = np.nan
    res = to.new(new)
    fm = next(p for p in to.procs if isinstance(p, FillMissing))
    assert np.isclose(fm.na_dict['income'], df.income.iloc[SPLITS[0]].median(), rtol=1e-6)
    assert res.decode()['income_na'].iloc[1] == True and np.isclose(res.decode().income.iloc[1], fm.na_dict['income'], atol=1e-4)

@pytest.mark.parametrize('kwargs, bad', [(dict(y_names='yy'), 'yy'), (dict(cat_names=['colour']), 'colour'),
                                         (dict(cont_names=['agee']), 'agee')])
def test_wrong_column_names_are_named(kwargs, bad):
    args = {**dict(cat_names=['color'], cont_names=['age'], y_names='y', splits=SPLITS), **kwargs}
    with pytest.raises(KeyError) as e: TabularPandas(make_df(), PROCS, **args)
    msg = str(e.value)
    assert repr(bad) in msg and "'color'" in msg and "'income'" in msg  # the columns present are listed
    with pytest.raises(KeyError, match='yy'): TabularDataLoaders.from_df(make_df(), y_names='yy')

def test_normalize_uses_training_rows_only():
    df = make_df()
    to = make_to(df)
    df2 = df.copy()
    df2.loc[SPLITS[1], ['age', 'income']] = df2.loc[SPLITS[1], ['age', 'income']] * 100 + 1e4
    df2.loc[SPLITS[1], 'color'] = 'purple'
    to2 = make_to(df2)
    n1, n2 = (next(p for p in t.procs if isinstance(p, TabularNormalize)) for t in (to, to2))
    assert n1.means == n2.means and n1.stds == n2.stds
    assert to.classes == to2.classes and to.train.xs.equals(to2.train.xs)
    assert np.allclose(to.train.conts.mean(), 0, atol=1e-5) and not np.allclose(to2.valid.conts.mean(), 0, atol=1)

def test_image_normalize_maps_to_tabular():
    for p in (Normalize, Normalize.from_stats([0.5], [0.5])):
        to = TabularPandas(make_df(), [Categorify, FillMissing, p], ['color'], ['age'], 'y', splits=SPLITS)
        assert any(isinstance(q, TabularNormalize) for q in to.procs)
    with pytest.raises(TypeError, match='TabularProc'): TabularPandas(make_df(), [len], ['color'], [], 'y')

def test_targets_and_blocks():
    to = make_to()
    assert to.y_kind == 'category' and list(to.vocab) == ['no', 'yes'] and to.c == 2
    to_r = TabularPandas(make_df(), PROCS, ['color'], ['age'], 'price', splits=SPLITS)
    assert to_r.y_kind == 'regression' and to_r.c == 1
    df = make_df(); df['n'] = np.arange(len(df)) % 7
    assert TabularPandas(df, PROCS, ['color'], ['age'], 'n', y_block=RegressionBlock(), splits=SPLITS).y_kind == 'regression'
    assert TabularPandas(df, PROCS, ['color'], ['age'], 'n', y_block=CategoryBlock, splits=SPLITS).c == 7
    df = make_df(); before = df.copy()
    make_to(df)
    pd.testing.assert_frame_equal(df, before)  # the caller's table is not changed

def test_add_datepart_seconds_any_resolution():
    for unit in ('s', 'ms', 'us', 'ns'):
        df = pd.DataFrame({'saledate': pd.to_datetime(['2013-01-01 05:00', '1969-12-31 00:00']).astype(f'datetime64[{unit}]')})
        add_datepart(df, 'saledate')
        assert list(df.saleElapsed) == [pd.Timestamp('2013-01-01 05:00').timestamp(), -86400]
    tz = pd.DataFrame({'date': pd.to_datetime(['2013-01-01T10:00:00Z'])})
    assert add_datepart(tz, 'date').Elapsed[0] == pd.Timestamp('2013-01-01 10:00').timestamp()
    with pytest.raises(KeyError, match="'datee'"): add_datepart(pd.DataFrame({'date': ['2020-01-01']}), 'datee')

def test_cont_cat_split_and_shrink():
    df = make_df(); df['n'] = np.arange(len(df)); df['few'] = df.n % 3
    cont, cat = cont_cat_split(df, max_card=20, dep_var='y')
    assert set(cont) == {'age', 'income', 'price', 'n'} and set(cat) == {'color', 'size', 'few'}
    small = df_shrink(df)
    assert small.few.dtype == np.int8 and small.n.dtype == np.int16 and small.age.dtype == np.float32
    assert small.memory_usage(deep=True).sum() < df.memory_usage(deep=True).sum()

def test_batches_are_one_gather():
    dls = make_to().dataloaders(bs=64, device='cpu')
    assert isinstance(dls.train.dataset, TensorItems) and dls.n_inp == 2
    x_cat, x_cont, y = dls.one_batch()
    assert x_cat.dtype == torch.long and x_cont.dtype == torch.float32 and y.shape == (64,)
    assert dls.train.n == 300 and len(dls.train) == 300 // 64 and dls.valid.n == 100

def test_same_seed_same_split_and_batches():
    def batches(seed):
        set_seed(seed)
        dls = TabularDataLoaders.from_df(make_df(), y_names='y', cat_names=['color'], cont_names=['age'], seed=3, device='cpu')
        return dls.table, [b[1] for b in dls.train]
    (t1, b1), (t2, b2) = batches(0), batches(0)
    assert all(torch.equal(a, b) for a, b in zip(b1, b2))

def test_predict_equals_get_preds_and_export(tmp_path):
    set_seed(0)
    df = make_df(600)
    dls = TabularDataLoaders.from_df(df, y_names='y', cat_names=['color', 'size'], cont_names=['age', 'income'],
                                     procs=PROCS, seed=0, bs=32, device='cpu', path=tmp_path)
    learn = tabular_learner(dls, metrics=accuracy, layers=[20])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 1e-2)
    preds, _ = learn.get_preds(dl=dls.test_dl(df.iloc[:20]))
    for i in (0, 7, 19):
        row, clas, probs = learn.predict(df.iloc[i])
        assert torch.allclose(probs, preds[i], atol=1e-6) and int(clas) == int(preds[i].argmax())
        assert row.decode().y.iloc[0] == dls.vocab[int(clas)] and row.decode().color.iloc[0] == df.color.iloc[i]
    row, clas, probs = learn.predict(df.iloc[0].drop('y'))  # without the target
    assert torch.allclose(probs, preds[0], atol=1e-6)
    learn.export('t.pkl')
    code = textwrap.dedent(f"""
        import pandas as pd, torch
        from dlcoders.learner import load_learner
        learn = load_learner({str(tmp_path/'t.pkl')!r})
        df = pd.read_pickle({str(tmp_path/'df.pkl')!r})
        preds, _ = learn.get_preds(dl=learn.dls.test_dl(df.iloc[:20]))
        torch.save(preds, {str(tmp_path/'p.pt')!r})
    """)
    df.to_pickle(tmp_path/'df.pkl')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=tmp_path)
    assert torch.allclose(torch.load(tmp_path/'p.pt'), preds, atol=1e-6)

def test_regression_learner_with_plain_loss():
    set_seed(0)
    to = TabularPandas(make_df(), PROCS, ['color'], ['age'], 'price', splits=SPLITS)
    learn = tabular_learner(to.dataloaders(64, device='cpu'), y_range=(0, 200), n_out=1, loss_func=F.mse_loss, layers=[16])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
    preds, targs = learn.get_preds()
    assert preds.shape == targs.shape == (100, 1) and ((preds > 0) & (preds < 200)).all()
    row, pred, _ = learn.predict(make_df().iloc[0])
    assert torch.allclose(pred, learn.get_preds(dl=learn.dls.test_dl(make_df().iloc[:1]))[0][0])

def test_model_and_emb_sz():
    to = make_to()
    assert get_emb_sz(to) == [(4, emb_sz_rule(4)), (4, emb_sz_rule(4)), (3, emb_sz_rule(3))]
    m = TabularModel(get_emb_sz(to), 2, 3, [8, 4], ps=[0.1, 0.1], embed_p=0.1)
    x_cat, x_cont, _ = to.dataloaders(16, device='cpu').one_batch()
    assert m(x_cat, x_cont).shape == (16, 3)
    no_cat = TabularPandas(make_df(), [FillMissing, Normalize], [], ['age'], 'y', splits=SPLITS)
    with pytest.raises(TypeError, match='Categorify'): TabularPandas(make_df(), [Normalize], ['color'], ['age'], 'y').tensors()
    cats, conts, _ = no_cat.tensors()
    assert cats.shape == (400, 0) and conts.shape == (400, 1)  # age has no holes: no age_na column
