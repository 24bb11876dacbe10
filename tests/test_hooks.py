"Hooks and hook callbacks: nothing stays registered, backward hooks see autograd's gradients, stats follow the batches."
import pickle

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.testing import assert_close

from dlcoders.callback.hook import (Hook, HookBwd, Hooks, hook_output, hook_outputs, HookCallback, ActivationStats,
                                    model_sizes, num_features_model, dummy_eval)
from dlcoders.data.load import DataLoaders
from dlcoders.learner import Learner
from dlcoders.callback.core import Callback, CancelFitException


def _cnn(bn=False):
    def block(ni, nf):
        layers = [nn.Conv2d(ni, nf, 3, stride=2, padding=1)] + ([nn.BatchNorm2d(nf)] if bn else []) + [nn.ReLU()]
        return nn.Sequential(*layers)
    return nn.Sequential(block(1, 4), block(4, 8), nn.Conv2d(8, 3, 3, stride=2, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _no_hooks(model):
    return all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def _learner(model, n_train=80, n_valid=40, bs=16, cbs=None):
    torch.manual_seed(0)
    x, xv = torch.randn(n_train, 1, 12, 12), torch.randn(n_valid, 1, 12, 12)
    y, yv = torch.randint(0, 3, (n_train,)), torch.randint(0, 3, (n_valid,))
    dls = DataLoaders.from_dsets((x, y), (xv, yv), bs=bs, device='cpu')
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), cbs=cbs)
    return learn


def test_hook_removed_after_context():
    model = _cnn()
    with hook_output(model[0]) as h:
        assert len(model[0]._forward_hooks) == 1
        out = model[0](torch.randn(2, 1, 12, 12))
    assert_close(h.stored, out.detach())
    assert _no_hooks(model)
    h.remove()  # a second removal is harmless
    with hook_outputs(list(model)) as hooks:
        model(torch.randn(2, 1, 12, 12))
        assert len(hooks) == 5 and all(s is not None for s in hooks.stored)
    assert _no_hooks(model)


def test_hook_removed_on_error():
    model = _cnn()
    with pytest.raises(RuntimeError):
        with Hooks(list(model), lambda m, i, o: o.shape):
            model(torch.randn(2, 5, 12, 12))  # wrong number of channels
    assert _no_hooks(model)


def test_hook_detach_and_cpu():
    layer = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with hook_output(layer, detach=False) as h:
        layer(x)
    assert h.stored.requires_grad
    with hook_output(layer, cpu=True) as h:
        layer(x)
    assert not h.stored.requires_grad and h.stored.device.type == 'cpu'


def test_hook_bwd_matches_autograd():
    torch.manual_seed(0)
    model = _cnn()
    x = torch.randn(6, 1, 12, 12)
    with hook_output(model[1], detach=False) as fwd, HookBwd(model[1]) as bwd:
        loss = model(x).pow(2).sum()
        expected, = torch.autograd.grad(loss, fwd.stored, retain_graph=True)
        loss.backward()
    assert_close(bwd.stored, expected)
    assert _no_hooks(model)


def test_hook_bwd_cross_entropy_gradient():
    "The gradient of the mean cross-entropy with respect to the logits is (softmax - one_hot) / bs."
    torch.manual_seed(0)
    model = _cnn()
    x, y = torch.randn(5, 1, 12, 12), torch.randint(0, 3, (5,))
    with hook_output(model[-1], grad=True) as h:
        out = model(x)
        F.cross_entropy(out, y).backward()
    assert_close(h.stored, (out.detach().softmax(-1) - F.one_hot(y, 3)) / 5)


def test_model_sizes_and_num_features():
    model = _cnn()
    sizes = model_sizes(model, (16, 16))
    assert [tuple(s) for s in sizes] == [(1, 4, 8, 8), (1, 8, 4, 4), (1, 3, 2, 2), (1, 3, 1, 1), (1, 3)]
    body = model[:3]
    assert num_features_model(body) == 3
    assert model.training and _no_hooks(model)
    assert dummy_eval(body, (8, 8)).shape == (1, 3, 1, 1)


def test_hook_callback_removes_hooks_after_fit():
    model = _cnn()
    cb = HookCallback()
    learn = _learner(model, cbs=[cb])
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert len(cb.hooks) == 3  # the three convolutions (the only layers with parameters)
    assert _no_hooks(model)


def test_hook_callback_removes_hooks_after_cancelled_fit():
    class Stop(Callback):
        def after_batch(self): raise CancelFitException()
    model = _cnn()
    learn = _learner(model, cbs=[ActivationStats(), Stop()])
    with learn.no_bar(), learn.no_logging(): learn.fit(2)
    assert len(learn.activation_stats.records) == 1
    assert _no_hooks(model)


def test_activation_stats_one_record_per_training_batch():
    model = _cnn(bn=True)
    stats = ActivationStats(with_hist=True)
    learn = _learner(model, n_train=80, n_valid=40, bs=16, cbs=[stats])
    seen = []
    class Count(Callback):
        def after_batch(self): seen.append(self.training)
    learn.add_cb(Count())
    with learn.no_bar(), learn.no_logging(): learn.fit(2)
    n_train = len(learn.dls.train)
    assert seen.count(True) == 2 * n_train and seen.count(False) > 0  # validation batches did run
    assert len(stats.records) == 2 * n_train  # ... but recorded nothing
    n_layers = len([m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))])
    assert stats.stats.shape == (2 * n_train, n_layers, 43)
    mean, std, near_zero = stats.layer_stats(0)
    assert ((near_zero >= 0) & (near_zero <= 1)).all() and (std > 0).all()
    assert stats.hist(0).shape == (40, 2 * n_train)
    assert _no_hooks(model)


def test_activation_stats_values_and_every():
    model = _cnn()
    stats = ActivationStats(every=2, modules=[model[0]])
    learn = _learner(model, cbs=[stats])
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert len(stats.records) == (len(learn.dls.train) + 1) // 2
    o = torch.randn(4, 3, 5, 5)
    assert_close(stats.hook(None, None, o), torch.stack([o.mean(), o.std(), (o <= 0.05).float().mean()]))
    with pytest.raises(ValueError, match='with_hist'): stats.hist(0)


def test_activation_stats_validate_records_nothing():
    model = _cnn()
    stats = ActivationStats()
    learn = _learner(model, cbs=[stats])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
        n = len(stats.records)
        learn.validate()
        learn.get_preds()
    assert len(stats.records) == n
    assert _no_hooks(model)


def test_learner_with_activation_stats_pickles(tmp_path):
    model = _cnn()
    learn = _learner(model, cbs=[ActivationStats()])
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    pickle.loads(pickle.dumps(learn.activation_stats.stats))
    learn.export(tmp_path/'export.pkl')
