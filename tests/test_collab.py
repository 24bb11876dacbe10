"Collaborative filtering: loaders, unknown users and items, names in `weight`/`bias`, predict vs get_preds, export."
import numpy as np, pandas as pd, pytest, torch
from dlcoders.torch_core import set_seed
from dlcoders.learner import load_learner
from dlcoders.tabular.data import TabularDataLoaders
from dlcoders.collab import *

def make_ratings(n_users=30, n_items=20, n=900, seed=0):
    rng = np.random.default_rng(seed)
    u, i = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    taste, kind = rng.normal(size=n_users), rng.normal(size=n_items)
    r = np.clip(3 + taste[u] * kind[i] + rng.normal(0, 0.3, n), 0.5, 5).round(1)
    return pd.DataFrame({'user': [f'u{x}' for x in u], 'title': [f'film {x}' for x in i], 'rating': r, 'ts': np.arange(n)})

def test_loaders():
    ratings = make_ratings()
    dls = CollabDataLoaders.from_df(ratings, item_name='title', bs=64, seed=0, device='cpu')
    x, y = dls.one_batch()
    assert x.shape == (64, 2) and y.shape == (64, 1) and y.dtype == torch.float32 and dls.n_inp == 1
    assert isinstance(dls, TabularDataLoaders) and list(dls.classes) == ['user', 'title']
    assert dls.classes['title'][0] == '#na#' and len(dls.classes['user']) == ratings.user.nunique() + 1
    assert dls.train.n + dls.valid.n == len(ratings) and dls.valid.n == int(0.2 * len(ratings))
    with pytest.raises(KeyError, match="'titel'.*'title'"): CollabDataLoaders.from_df(ratings, item_name='titel')

def test_from_csv_defaults(tmp_path):
    ratings = make_ratings()[['user', 'title', 'rating']]
    ratings.to_csv(tmp_path/'r.csv', index=False)
    dls = CollabDataLoaders.from_csv(tmp_path/'r.csv', device='cpu')
    assert dls.cat_names == ['user', 'title'] and dls.y_names == ['rating']

@pytest.fixture(scope='module')
def learn():
    set_seed(0)
    dls = CollabDataLoaders.from_df(make_ratings(), item_name='title', bs=64, seed=0, device='cpu')
    learn = collab_learner(dls, n_factors=8, y_range=(0, 5.5))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(5, 5e-2, wd=0.01)
    return learn

def test_model_lookups_by_name(learn):
    m, classes = learn.model, learn.dls.classes
    assert isinstance(m, EmbeddingDotBias)
    films = ['film 3', 'film 0']
    codes = [classes['title'].o2i[f] for f in films]
    assert torch.allclose(m.bias(films, is_item=True), m.i_bias.weight[codes, 0].detach())
    assert torch.allclose(m.weight(['u1'], is_item=False), m.u_weight.weight[[classes['user'].o2i['u1']]].detach())
    with pytest.raises(KeyError, match='film 99'): m.bias(['film 99'])

def test_predict_equals_get_preds(learn):
    ratings = make_ratings()
    preds, targs = learn.get_preds(dl=learn.dls.test_dl(ratings.iloc[:10]))
    for i in (0, 4, 9):
        row, pred, _ = learn.predict(ratings.iloc[i])
        assert torch.allclose(pred, preds[i]) and row.decode().title.iloc[0] == ratings.title.iloc[i]
    assert torch.allclose(targs[:, 0], torch.tensor(ratings.rating.values[:10], dtype=torch.float32))
    valid_mse = learn.validate()[0]
    assert valid_mse < ((learn.dls.valid.dataset.tensors[1] - 3)**2).mean()  # better than a constant

def test_unknown_user_or_item(learn):
    with pytest.raises(KeyError, match="user.*'nobody'"): learn.predict({'user': 'nobody', 'title': 'film 1'})
    with pytest.raises(KeyError, match="film 999"): learn.dls.test_dl(pd.DataFrame({'user': ['u1'], 'title': ['film 999']}))
    dl = learn.dls.test_dl([{'user': 'nobody', 'title': 'film 1'}], unknown='na')
    assert dl.one_batch()[0][0, 0] == 0  # '#na#'
    p, _ = learn.get_preds(dl=dl)
    assert 0 < float(p[0]) < 5.5
    with pytest.raises(ValueError, match='unknown'): learn.dls.test_dl([{'user': 'u1', 'title': 'film 1'}], unknown='skip')

def test_nn_and_export(learn, tmp_path):
    set_seed(0)
    learn_nn = collab_learner(learn.dls, use_nn=True, y_range=(0, 5.5), layers=[16, 8])
    assert isinstance(learn_nn.model, EmbeddingNN)
    with learn_nn.no_bar(), learn_nn.no_logging(): learn_nn.fit_one_cycle(2, 1e-2)
    learn.path = tmp_path
    learn2 = load_learner(learn.export('c.pkl'))
    ratings = make_ratings()
    assert torch.allclose(learn2.predict(ratings.iloc[3])[1], learn.predict(ratings.iloc[3])[1])
    with pytest.raises(KeyError): learn2.predict({'user': 'nobody', 'title': 'film 1'})

def test_pca_and_one_hot():
    x = torch.randn(50, 6) @ torch.diag(torch.tensor([5., 3, 1, .1, .1, .1]))
    p = pca(x, 3)
    v = p.var(0)
    assert p.shape == (50, 3) and v[0] >= v[1] >= v[2]
    assert one_hot(3, 5).tolist() == [0, 0, 0, 1, 0] and one_hot([0, 2], 3).tolist() == [1, 0, 1]
