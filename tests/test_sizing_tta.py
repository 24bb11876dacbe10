"Chapter 7's training tricks: `Learner.tta`, `MixUp`, `CutMix` and label smoothing, on small synthetic data."
import pytest, torch
from torch import nn
import torch.nn.functional as F
from dlcoders.data.load import DataLoaders
from dlcoders.learner import Learner
from dlcoders.callback.core import Callback, CancelFitException
from dlcoders.callback.mixup import MixUp, CutMix, sample_beta
from dlcoders.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropy
from dlcoders.torch_core import set_seed
import dlcoders.tta, dlcoders.callback.schedule  # noqa: F401 (they add `tta` and `fit_one_cycle` to Learner)

torch.set_num_threads(1)

def _data(n=96, c=3, shuffle=False, bs=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 4, 4, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()  # 3 classes that depend on x
    return DataLoaders.from_dsets((x[:64], y[:64]), (x[64:], y[64:]), bs=bs, shuffle=shuffle, device='cpu')

def _learner(dls, seed=0, **kwargs):
    set_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), lr=1e-2, **kwargs)

def _params(learn): return torch.cat([p.detach().flatten() for p in learn.model.parameters()])

def test_tta_without_augmentation_equals_get_preds():
    dls = _data()
    learn = _learner(dls)
    learn.fit(1)
    preds, targs = learn.get_preds()
    for beta in (0.25, 0., 1.):
        tp, tt = learn.tta(n=3, beta=beta)
        torch.testing.assert_close(tp, preds)
        torch.testing.assert_close(tt, targs)
    mp, _ = learn.tta(n=2, use_max=True)
    torch.testing.assert_close(mp, preds)
    (aug, plain), _ = learn.tta(n=2, beta=None)
    torch.testing.assert_close(aug, preds)
    torch.testing.assert_close(plain, preds)
    tp, tt = learn.tta(ds_idx=0)  # the training set, in order, every item
    assert len(tp) == len(tt) == 64
    torch.testing.assert_close(tt, dls.train.dataset.tensors[1])

def test_tta_bad_arguments():
    learn = _learner(_data())
    with pytest.raises(ValueError, match='at least 1'): learn.tta(n=0)
    with pytest.raises(ValueError, match='between 0 and 1'): learn.tta(beta=-0.1)

def _fit(cbs=None, epochs=2):
    learn = _learner(_data(), cbs=cbs)
    learn.fit(epochs)
    return learn

def test_mixup_alpha_near_zero_trains_like_no_mixup():
    plain, near0 = _fit(), _fit(MixUp(1e-4))
    torch.testing.assert_close(_params(near0), _params(plain), atol=1e-4, rtol=1e-4)
    for a, b in zip(near0.recorder.values, plain.recorder.values):
        torch.testing.assert_close(torch.tensor(a[:3]), torch.tensor(b[:3]), atol=1e-4, rtol=1e-4)
    # the comparison can fail: real mixing trains another model
    mixed = _fit(MixUp(1.))
    assert not torch.allclose(_params(mixed), _params(plain), atol=1e-3)

def test_cutmix_alpha_near_zero_trains_like_no_cutmix():
    plain, near0 = _fit(), _fit(CutMix(1e-4))
    torch.testing.assert_close(_params(near0), _params(plain), atol=1e-4, rtol=1e-4)

def test_loss_func_restored_after_fit_and_after_an_error():
    learn = _fit(MixUp(0.4), epochs=1)
    assert isinstance(learn.loss_func, CrossEntropyLossFlat)
    class Boom(Callback):
        order = 5
        def after_loss(self):
            if self.training: raise RuntimeError('boom')
    learn = _learner(_data(), cbs=[CutMix(), Boom()])
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1)
    assert isinstance(learn.loss_func, CrossEntropyLossFlat)

def test_validation_sees_plain_batches_and_the_plain_loss():
    seen = []
    class Watch(Callback):
        order = 1
        def after_loss(self):
            if not self.training: seen.append((self.learn.loss_func, self.xb[0].clone()))
    learn = _learner(_data(), cbs=[MixUp(1.), Watch()])
    learn.fit(1)
    valid_x = learn.dls.valid.dataset.tensors[0]
    assert all(isinstance(lf, CrossEntropyLossFlat) for lf, _ in seen)
    torch.testing.assert_close(torch.cat([x for _, x in seen]), valid_x)

def test_mixed_loss_is_lerp_of_the_two_losses():
    class Grab(Callback):
        order = 1
        def after_loss(self):
            self.got = (self.learn.pred.detach(), self.learn.loss)
            raise CancelFitException()
    mix, grab = MixUp(1.), Grab()
    learn = _learner(_data(shuffle=True), cbs=[mix, grab])
    learn.fit(1)
    pred, loss = grab.got
    y1 = mix.yb1[0]  # the partners' targets: y[shuffle]
    targ = torch.empty_like(y1)
    targ[mix.shuffle] = y1
    expected = (mix.lam * F.cross_entropy(pred, targ, reduction='none')
                + (1 - mix.lam) * F.cross_entropy(pred, y1, reduction='none')).mean()
    torch.testing.assert_close(loss, expected)

def test_bad_input_is_named():
    with pytest.raises(ValueError, match='positive'): MixUp(0.)
    with pytest.raises(ValueError, match='positive'): CutMix('a')
    x, y = torch.randint(0, 5, (32, 4)), torch.randint(0, 2, (32,))
    dls = DataLoaders.from_dsets((x, y), (x, y), bs=8, device='cpu')
    learn = Learner(dls, nn.Sequential(nn.Embedding(5, 2), nn.Flatten(), nn.Linear(8, 2)),
                    loss_func=CrossEntropyLossFlat(), cbs=MixUp())
    with pytest.raises(TypeError, match='torch.int64'): learn.fit(1)
    assert isinstance(learn.loss_func, CrossEntropyLossFlat)

def test_sample_beta_matches_beta_moments_and_tiny_alpha():
    torch.manual_seed(0)
    lam = sample_beta(0.4, 100_000)
    assert abs(lam.mean().item() - 0.5) < 0.01
    assert abs(lam.var().item() - 1 / (4 * 1.8)) < 0.01
    tiny = sample_beta(1e-4, 10_000)
    assert ((tiny < 1e-3) | (tiny > 1 - 1e-3)).float().mean() > 0.99

def test_label_smoothing_matches_the_book():
    "The book's formula: (1-eps) * NLL + eps * mean over classes of -log p."
    torch.manual_seed(0)
    out, targ, eps = torch.randn(20, 5), torch.randint(0, 5, (20,)), 0.1
    logp = F.log_softmax(out, -1)
    book = (1 - eps) * F.nll_loss(logp, targ) + eps * (-logp.sum(-1)).mean() / 5
    torch.testing.assert_close(LabelSmoothingCrossEntropy(eps)(out, targ), book)
    # and the target of each class: 1-eps+eps/c for the right one, eps/c for the others
    smooth = torch.full((20, 5), eps / 5)
    smooth[torch.arange(20), targ] += 1 - eps
    torch.testing.assert_close(LabelSmoothingCrossEntropy(eps)(out, targ), -(smooth * logp).sum(-1).mean())


def test_tta_takes_fastais_arguments_in_fastais_order():
    "fastai: tta(ds_idx=1, dl=None, n=4, item_tfms=None, batch_tfms=None, beta=0.25, use_max=False)."
    import inspect
    from dlcoders.learner import Learner
    import dlcoders.tta  # noqa: F401  (patches Learner.tta)
    ps = inspect.signature(Learner.tta).parameters
    assert list(ps)[1:] == ['ds_idx', 'dl', 'n', 'item_tfms', 'batch_tfms', 'beta', 'use_max']
    assert [ps[k].default for k in ('ds_idx', 'n', 'beta', 'use_max')] == [1, 4, 0.25, False]
