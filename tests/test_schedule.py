"Schedules, one-cycle training and the learning-rate finder: exact restoration, even when interrupted."
import copy, math
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from dlcoders.callback.core import Callback
from dlcoders.callback.schedule import *
from dlcoders.data.load import DataLoaders
from dlcoders.learner import Learner
from dlcoders.optimizer import Optimizer, sgd_step


def make_learner(seed=0, n=512, **kwargs):
    "A small classifier (with batch norm, whose buffers must come back too) on synthetic data."
    torch.manual_seed(seed)
    x = torch.randn(n, 10)
    y = (x[:, :5].sum(1) > 0).long()
    dls = DataLoaders.from_dsets((x[:n*3//4], y[:n*3//4]), (x[n*3//4:], y[n*3//4:]), bs=32, device='cpu')
    model = nn.Sequential(nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU()), nn.Linear(16, 2))
    return Learner(dls, model, loss_func=nn.CrossEntropyLoss(), default_cbs=True, **kwargs)


def state_equal(a, b) -> bool:
    "Exact equality of nested dicts/lists/tuples of tensors and plain values."
    if isinstance(a, torch.Tensor): return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict): return a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


def snapshot(learn):
    return copy.deepcopy(learn.model.state_dict()), copy.deepcopy(learn.opt.state_dict())


def assert_restored(learn, snap):
    model_state, opt_state = snap
    for (k, v), (k2, v2) in zip(learn.model.state_dict().items(), model_state.items()):
        assert k == k2 and torch.equal(v, v2), k
    assert all(torch.equal(p, model_state[k]) for k, p in learn.model.named_parameters())
    assert state_equal(learn.opt.state_dict(), opt_state)


def quiet_fit(learn, *args, method='fit', **kwargs):
    with learn.no_bar(), learn.no_logging(): getattr(learn, method)(*args, **kwargs)


# --- annealers and schedules -------------------------------------------------------------------

@pytest.mark.parametrize('f', [sched_lin, sched_cos, sched_exp, partial(sched_poly, power=2), partial(sched_poly, power=0.5)])
def test_annealer_endpoints(f):
    assert math.isclose(f(0.5, 4., 0.), 0.5) and math.isclose(f(0.5, 4., 1.), 4.)


def test_schedule_values():
    assert SchedNo(3, 7)(0.) == 3 and SchedNo(3, 7)(1.) == 3
    assert math.isclose(SchedCos(0, 2)(0.5), 1.) and math.isclose(SchedLin(0, 2)(0.25), 0.5)
    assert math.isclose(SchedExp(1e-4, 1e-2)(0.5), 1e-3) and math.isclose(SchedPoly(0, 1, 3)(0.5), 0.125)
    for s in (SchedLin(1, 3), SchedCos(1, 3), SchedExp(1, 3), SchedPoly(1, 3, 2)):
        assert math.isclose(s(0.), 1.) and math.isclose(s(1.), 3.)
    np.testing.assert_allclose(SchedCos(np.array([1., 10.]), np.array([0., 0.]))(0.5), [0.5, 5.])


def test_combine_scheds():
    f = combine_scheds([0.25, 0.75], [SchedLin(0., 1.), SchedLin(1., 0.)])
    assert f(0.) == 0 and math.isclose(f(0.125), 0.5) and math.isclose(f(0.25), 1.) and math.isclose(f(1.), 0., abs_tol=1e-12)
    g = combined_cos(0.3, 1., 10., 0.)
    vals = [g(p) for p in np.linspace(0, 1, 101)]
    assert int(np.argmax(vals)) == 30 and math.isclose(vals[0], 1.) and math.isclose(vals[-1], 0., abs_tol=1e-12)
    assert combine_scheds([0., 1.], [SchedNo(5, 5), SchedLin(0, 1)])(0.) == 0  # an empty piece is skipped
    with pytest.raises(ValueError): combine_scheds([0.5, 0.6], [SchedLin(0, 1), SchedLin(0, 1)])
    with pytest.raises(ValueError): combine_scheds([1.], [SchedLin(0, 1), SchedLin(0, 1)])


# --- one cycle ----------------------------------------------------------------------------------

def test_one_cycle_shape():
    learn = make_learner()
    quiet_fit(learn, 4, 1e-2, method='fit_one_cycle')
    assert not any(isinstance(cb, ParamScheduler) for cb in learn.cbs)
    lrs, moms = np.array(learn.recorder.hps['lr']), np.array(learn.recorder.hps['mom'])
    n = len(lrs)
    assert n == 4 * len(learn.dls.train)
    assert abs(int(lrs.argmax()) - n // 4) <= 1 and math.isclose(lrs.max(), 1e-2, rel_tol=1e-3)
    assert math.isclose(lrs[0], 1e-2 / 25) and lrs[-1] < 1e-2 / 500
    assert np.all(np.diff(lrs[:n // 4]) > 0) and np.all(np.diff(lrs[n // 4 + 1:]) < 0)
    assert int(moms.argmin()) == int(lrs.argmax()) and math.isclose(moms.min(), 0.85, rel_tol=1e-3)
    assert math.isclose(moms[0], 0.95) and math.isclose(moms[-1], 0.95, abs_tol=1e-3)


def test_one_cycle_discriminative_and_no_momentum():
    learn = make_learner(splitter=lambda m: [list(m[0].parameters()), list(m[1].parameters())])
    quiet_fit(learn, 1, slice(1e-4, 1e-2), method='fit_one_cycle')
    lo, hi = (h['lr'] for h in learn.opt.hypers)
    assert math.isclose(hi / lo, 100, rel_tol=1e-6)
    # an optimizer without a 'mom' hyper-parameter: only the learning rate is scheduled
    learn = make_learner(opt_func=lambda params, lr: Optimizer(params, [sgd_step], lr=lr))
    quiet_fit(learn, 1, 0.1, method='fit_one_cycle')
    assert 'mom' not in learn.recorder.hps and len(learn.recorder.hps['lr']) == len(learn.dls.train)


def test_sgdr_restarts_and_flat_cos():
    learn = make_learner()
    quiet_fit(learn, 2, 1, 1e-2, method='fit_sgdr')
    lrs, nb = np.array(learn.recorder.hps['lr']), len(learn.dls.train)
    assert len(lrs) == 3 * nb and list(np.nonzero(np.diff(lrs) > 0)[0]) == [nb - 1]
    learn = make_learner()
    quiet_fit(learn, 2, 1e-2, method='fit_flat_cos')
    lrs = np.array(learn.recorder.hps['lr'])
    assert np.allclose(lrs[:int(0.75 * len(lrs))], 1e-2) and lrs[-1] < 1e-3


def test_fine_tune_freezes_then_discriminates():
    learn = make_learner(splitter=lambda m: [list(m[0].parameters()), list(m[1].parameters())])
    body = [p.detach().clone() for p in learn.model[0].parameters()]

    class FirstFit(Callback):
        def after_fit(self):
            if not hasattr(self, 'body'): self.body = [p.detach().clone() for p in self.model[0].parameters()]

    cb = FirstFit()
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, 1e-2, cbs=[cb])
    # batch norm layers keep training while frozen (train_bn), the linear layer of the body does not
    assert torch.equal(cb.body[0], body[0]) and torch.equal(cb.body[1], body[1])
    assert not torch.equal(learn.model[0][0].weight, body[0])
    assert learn.opt.hypers[0]['lr'] < learn.opt.hypers[-1]['lr']


# --- the learning-rate finder -------------------------------------------------------------------

def test_lr_find_restores_exactly():
    learn = make_learner()
    quiet_fit(learn, 1, 1e-2)  # Adam now has state to lose
    snap = snapshot(learn)
    res = learn.lr_find(num_it=50, show_plot=False, suggest_funcs=(valley, minimum, steep, slide))
    assert_restored(learn, snap)
    assert res._fields == ('valley', 'minimum', 'steep', 'slide')
    assert all(1e-7 <= lr <= 10 for lr in res)
    # it looped over the training set (12 batches) several times
    assert len(learn.recorder.lrs) > len(learn.dls.train)
    assert learn.recorder.lrs == sorted(learn.recorder.lrs)


def test_lr_find_fresh_learner_and_stop_div():
    learn = make_learner()
    assert learn.opt is None
    weights = copy.deepcopy(learn.model.state_dict())
    learn.lr_find(start_lr=1e-3, end_lr=1e6, num_it=60, show_plot=False)
    losses = learn.recorder.losses
    assert len(losses) < 60 and (losses[-1] > 4 * min(losses) or not math.isfinite(losses[-1]))
    assert all(torch.equal(v, weights[k]) for k, v in learn.model.state_dict().items())


def test_lr_find_diverging_at_once():
    learn = make_learner()
    weights = copy.deepcopy(learn.model.state_dict())
    with pytest.raises(RuntimeError, match='diverged'): learn.lr_find(start_lr=1e3, end_lr=1e6, show_plot=False)
    assert all(torch.equal(v, weights[k]) for k, v in learn.model.state_dict().items())


class Interrupt(Callback):
    "Raise `exc` after `n` training batches."
    order = 100
    def __init__(self, n, exc=KeyboardInterrupt): self.n, self.exc = n, exc
    def after_batch(self):
        if self.training and self.train_iter >= self.n: raise self.exc()


@pytest.mark.parametrize('exc', [KeyboardInterrupt, RuntimeError])
def test_lr_find_restores_when_interrupted(exc):
    learn = make_learner()
    quiet_fit(learn, 1, 1e-2)
    snap = snapshot(learn)
    learn.add_cb(Interrupt(20, exc))
    with pytest.raises(exc): learn.lr_find(num_it=50, show_plot=False)
    learn.remove_cb(Interrupt)
    assert_restored(learn, snap)
    assert not any(isinstance(cb, LRFinder) for cb in learn.cbs) and hasattr(learn, 'progress')
    quiet_fit(learn, 1, 1e-3)  # and the learner still trains
    assert learn.recorder.values[-1][0] == learn.recorder.values[-1][0]


def test_suggestions_on_a_known_curve():
    lrs = np.logspace(-6, 0, 100)
    x = np.log10(lrs)
    losses = 1 - 0.5 / (1 + np.exp(-3 * (x + 3)))  # flat, falls around 1e-3, flat again
    losses[-10:] += np.linspace(0, 2, 10)  # then blows up
    v, pt = valley(lrs, losses, 100)
    assert 1e-4 < v < 1e-2 and pt == (v, losses[list(lrs).index(v)])
    assert math.isclose(np.log10(steep(lrs, losses, 100)[0]), -3, abs_tol=0.1)
    m = minimum(lrs, losses, 100)[0]
    assert math.isclose(m, lrs[np.argmin(losses)] / 10)
    assert lrs[0] <= slide(lrs, losses, 100)[0] <= lrs[-1]
