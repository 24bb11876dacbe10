"Losses and metrics: per-item losses through a Learner, pickling round trips, and clear errors for misshapen targets."
import subprocess, sys
from types import SimpleNamespace

import cloudpickle
import pytest
import sklearn.metrics as skm
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from dlcoders.data.load import DataLoaders
from dlcoders.learner import Learner, load_learner
from dlcoders.losses import *
from dlcoders.metrics import *


def _fitted(loss_func, y, model, x=None, metrics=None):
    "A learner trained for one epoch on random inputs `x` and targets `y` (64 to train, the rest to validate)."
    torch.manual_seed(0)
    x = torch.randn(len(y), 5) if x is None else x
    dls = DataLoaders.from_dsets((x[:64], y[:64]), (x[64:], y[64:]), bs=16, device='cpu')
    learn = Learner(dls, model, loss_func=loss_func, metrics=metrics, lr=1e-2)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    return learn, x[64:], y[64:]


def _per_item(loss):
    "Per-element losses reduced to one loss per item (a learner may return either)."
    return loss.flatten(1).mean(1) if loss.dim() > 1 else loss


torch.manual_seed(0)
_Y_CLASS, _Y_MULTI, _Y_REG = torch.randint(0, 3, (96,)), torch.randint(0, 2, (96, 4)), torch.randn(96)

LOSS_CASES = {
    'cross_entropy': (CrossEntropyLossFlat, _Y_CLASS, 3, lambda raw, y: F.cross_entropy(raw, y, reduction='none'),
                      lambda raw: F.softmax(raw, dim=-1)),
    'bce_logits': (BCEWithLogitsLossFlat, _Y_MULTI, 4,
                   lambda raw, y: F.binary_cross_entropy_with_logits(raw, y.float(), reduction='none'), torch.sigmoid),
    'mse': (MSELossFlat, _Y_REG, 1, lambda raw, y: F.mse_loss(raw[:, 0], y, reduction='none'), None),
    'l1': (L1LossFlat, _Y_REG, 1, lambda raw, y: F.l1_loss(raw[:, 0], y, reduction='none'), None),
    'label_smoothing': (LabelSmoothingCrossEntropyFlat, _Y_CLASS, 3,
                        lambda raw, y: F.cross_entropy(raw, y, reduction='none', label_smoothing=0.1),
                        lambda raw: F.softmax(raw, dim=-1)),
    'focal': (FocalLossFlat, _Y_CLASS, 3,
              lambda raw, y: (1 - torch.exp(-F.cross_entropy(raw, y, reduction='none')))**2 * F.cross_entropy(raw, y, reduction='none'),
              lambda raw: F.softmax(raw, dim=-1)),
}


@pytest.mark.parametrize('case', list(LOSS_CASES))
def test_get_preds_with_loss_sets_and_restores_reduction(case):
    loss_cls, y, n_out, ref_loss, act = LOSS_CASES[case]
    learn, xv, yv = _fitted(loss_cls(), y, nn.Linear(5, n_out))
    preds, targs, losses = learn.get_preds(with_loss=True)
    assert learn.loss_func.reduction == 'mean'
    with torch.no_grad(): raw = learn.model(xv)
    assert_close(preds, raw if act is None else act(raw))
    assert_close(targs, yv)
    assert len(losses) == len(yv)
    assert_close(_per_item(losses), _per_item(ref_loss(raw, yv)))
    # the mean of the per-item losses is the loss the learner reports
    assert_close(learn.loss_func(raw, yv), ref_loss(raw, yv).mean())


def test_segmentation_losses_per_pixel_through_learner():
    torch.manual_seed(0)
    x = torch.randn(96, 1, 4, 4)
    y = torch.randint(0, 3, (96, 4, 4), dtype=torch.uint8)
    learn, xv, yv = _fitted(CrossEntropyLossFlat(axis=1), y, nn.Conv2d(1, 3, 1), x=x)
    preds, targs, decoded, losses = learn.get_preds(with_decoded=True, with_loss=True)
    with torch.no_grad(): raw = learn.model(xv)
    assert preds.shape == (32, 3, 4, 4) and decoded.shape == (32, 4, 4)
    assert_close(preds.sum(dim=1), torch.ones(32, 4, 4))
    ref = F.cross_entropy(raw, yv.long(), reduction='none')
    assert_close(_per_item(losses), _per_item(ref))
    assert learn.loss_func.reduction == 'mean'


def test_reduction_property_passes_through():
    loss = BCEWithLogitsLossFlat(axis=1)
    loss.reduction = 'sum'
    assert loss.func.reduction == 'sum'
    pred, targ = torch.randn(2, 3, 5), torch.randint(0, 2, (2, 3, 5))
    assert_close(loss(pred, targ), F.binary_cross_entropy_with_logits(pred, targ.float(), reduction='sum'))
    loss.reduction = 'none'
    assert_close(loss(pred, targ), F.binary_cross_entropy_with_logits(pred, targ.float(), reduction='none'))
    soft = F.softmax(torch.randn(2, 3, 5), dim=1)  # class probabilities as targets: one loss per item
    ce = CrossEntropyLossFlat(axis=1, reduction='none')
    assert_close(ce(pred, soft), F.cross_entropy(pred, soft, reduction='none'))


# --- pickling -------------------------------------------------------------------------------------

def _loss_inputs():
    torch.manual_seed(1)
    return {CrossEntropyLossFlat(): (torch.randn(8, 3), torch.randint(0, 3, (8,))),
            CrossEntropyLossFlat(axis=1, weight=torch.tensor([1., 2., 3.])): (torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))),
            BCEWithLogitsLossFlat(thresh=0.3): (torch.randn(8, 4), torch.randint(0, 2, (8, 4))),
            BCEWithLogitsLossFlat(pos_weight=torch.tensor([1., 2.])): (torch.randn(8, 2), torch.randint(0, 2, (8, 2))),
            BCELossFlat(): (torch.rand(8, 4), torch.randint(0, 2, (8, 4))),
            MSELossFlat(): (torch.randn(8, 1), torch.randn(8)),
            L1LossFlat(): (torch.randn(8, 1), torch.randn(8)),
            LabelSmoothingCrossEntropy(eps=0.2): (torch.randn(8, 3), torch.randint(0, 3, (8,))),
            LabelSmoothingCrossEntropyFlat(): (torch.randn(8, 3), torch.randint(0, 3, (8,))),
            FocalLoss(gamma=1.5): (torch.randn(8, 3), torch.randint(0, 3, (8,))),
            FocalLossFlat(): (torch.randn(8, 3), torch.randint(0, 3, (8,)))}


def test_losses_pickle_round_trip():
    for loss, (pred, targ) in _loss_inputs().items():
        loaded = cloudpickle.loads(cloudpickle.dumps(loss))
        assert type(loaded) is type(loss)
        assert_close(loaded(pred, targ), loss(pred, targ))
        if hasattr(loss, 'activation'):
            assert_close(loaded.activation(pred), loss.activation(pred))
            assert torch.equal(loaded.decodes(loss.activation(pred)), loss.decodes(loss.activation(pred)))


def _metric_inputs():
    torch.manual_seed(2)
    cls_out, cls_targ = torch.randn(40, 2), torch.randint(0, 2, (40,))
    multi_out, multi_targ = torch.randn(40, 3), torch.randint(0, 2, (40, 3))
    three_targ = torch.arange(40) % 3
    three_out = torch.randn(40, 3) + F.one_hot(three_targ, 3)
    reg_pred, reg_targ = torch.rand(40, 1) * 3, torch.rand(40) * 3
    return [(F1Score(), cls_out, cls_targ), (RocAucBinary(), cls_out, cls_targ), (Precision(), cls_out, cls_targ),
            (MatthewsCorrCoef(), cls_out, cls_targ), (RocAuc(), three_out, three_targ),
            (F1Score(average='macro'), three_out, three_targ), (CohenKappa(), three_out, three_targ),
            (F1ScoreMulti(thresh=0.3), multi_out, multi_targ), (APScoreMulti(), multi_out, multi_targ),
            (rmse, reg_pred, reg_targ), (msle, reg_pred, reg_targ), (exp_rmspe, reg_pred, reg_targ),
            (R2Score(), reg_pred, reg_targ), (ExplainedVariance(), reg_pred, reg_targ)]


def test_accum_metrics_pickle_round_trip_and_drop_accumulated_values():
    for metric, out, targ in _metric_inputs():
        metric.reset()
        metric.accumulate(SimpleNamespace(pred=out, yb=(targ,)))
        expected = metric.value
        loaded = cloudpickle.loads(cloudpickle.dumps(metric))
        assert loaded.name == metric.name
        assert loaded.value is None, f'{metric.name} kept its accumulated predictions'
        assert loaded(out, targ) == pytest.approx(expected)
        loaded.accumulate(SimpleNamespace(pred=out, yb=(targ,)))
        assert loaded.value == pytest.approx(expected)
        assert metric.value == pytest.approx(expected)  # pickling left the original alone


def test_function_and_counting_metrics_pickle_round_trip():
    torch.manual_seed(3)
    out, targ = torch.randn(20, 5), torch.randint(0, 5, (20,))
    for f in (accuracy, error_rate, top_k_accuracy):
        assert_close(cloudpickle.loads(cloudpickle.dumps(f))(out, targ), f(out, targ))
    multi_out, multi_targ = torch.randn(20, 3), torch.randint(0, 2, (20, 3))
    assert_close(cloudpickle.loads(cloudpickle.dumps(accuracy_multi))(multi_out, multi_targ), accuracy_multi(multi_out, multi_targ))
    seg_out, seg_targ = torch.randn(2, 2, 6, 6), torch.randint(0, 2, (2, 6, 6))
    for metric in (Dice(), JaccardCoeff(), DiceMulti()):
        metric.reset()
        metric.accumulate(SimpleNamespace(pred=seg_out, yb=(seg_targ,)))
        loaded = cloudpickle.loads(cloudpickle.dumps(metric))
        assert loaded.value == pytest.approx(metric.value) and loaded.name == metric.name
    ppl = Perplexity()
    ppl.reset()
    ppl.accumulate(SimpleNamespace(loss=torch.tensor(1.5), yb=(torch.zeros(4),)))
    assert cloudpickle.loads(cloudpickle.dumps(ppl)).value == pytest.approx(ppl.value)


def test_losses_and_metrics_load_in_a_fresh_process(tmp_path):
    "Pickles refer to the library by name, so another process loads them without any of this file's code."
    torch.manual_seed(4)
    pred, targ = torch.randn(30, 2), torch.randint(0, 2, (30,))
    objs = [CrossEntropyLossFlat(), BCEWithLogitsLossFlat(), LabelSmoothingCrossEntropyFlat(), FocalLossFlat(),
            F1Score(), RocAucBinary(), rmse, accuracy]
    file = tmp_path/'objs.pkl'
    file.write_bytes(cloudpickle.dumps((objs, pred, targ)))
    expected = [o(pred, targ.float()[:, None].expand(-1, 2) if isinstance(o, BCEWithLogitsLossFlat) else targ) for o in objs[:4]]
    expected += [objs[4](pred, targ), objs[5](pred, targ), objs[6](pred[:, 0], targ.float()), objs[7](pred, targ).item()]
    code = (f"import pickle, torch\nobjs, pred, targ = pickle.load(open({str(file)!r}, 'rb'))\n"
            "res = [float(o(pred, targ.float()[:, None].expand(-1, 2) if type(o).__name__ == 'BCEWithLogitsLossFlat' else targ)) for o in objs[:4]]\n"
            "res += [objs[4](pred, targ), objs[5](pred, targ), objs[6](pred[:, 0], targ.float()), objs[7](pred, targ).item()]\n"
            "print(repr([float(r) for r in res]))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert eval(out.stdout.strip()) == pytest.approx([float(e) for e in expected])


def test_exported_learner_keeps_loss_and_metrics(tmp_path):
    learn, xv, yv = _fitted(CrossEntropyLossFlat(), _Y_CLASS, nn.Linear(5, 3), metrics=[accuracy, F1Score(average='macro')])
    with torch.no_grad(): raw = learn.model(xv)
    learn.path = tmp_path
    loaded = load_learner(learn.export('export.pkl'))
    assert_close(loaded.loss_func(raw, yv), learn.loss_func(raw, yv))
    assert [m.name for m in loaded.metrics] == ['accuracy', 'f1_score']
    assert loaded.metrics[1].value is None
    assert loaded.metrics[1](raw, yv) == pytest.approx(skm.f1_score(yv, raw.argmax(1), average='macro'))


# --- bad input ------------------------------------------------------------------------------------

def test_wrong_target_shape_is_a_clear_error():
    cases = [(CrossEntropyLossFlat(), torch.randn(4, 3), torch.zeros(8, dtype=torch.long), r'shape \(4, 3\).*need 4 targets.*\(8,\)'),
             (CrossEntropyLossFlat(axis=1), torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 3, dtype=torch.long),
              r'\(2, 3, 4, 4\).*axis 1.*need 32 targets.*\(2, 4, 3\)'),
             (BCEWithLogitsLossFlat(), torch.randn(4, 3), torch.zeros(4, 2), r'need 12 targets.*\(4, 2\)'),
             (MSELossFlat(), torch.randn(4, 1), torch.zeros(5), r'need 4 targets.*\(5,\)'),
             (LabelSmoothingCrossEntropyFlat(), torch.randn(4, 3), torch.zeros(3, dtype=torch.long), 'need 4 targets')]
    for loss, pred, targ, msg in cases:
        with pytest.raises(ValueError, match=msg): loss(pred, targ)
    with pytest.raises(ValueError, match=r'\(4,\).*\(5,\).*different numbers of elements'):
        accuracy(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match='different numbers of elements'):
        accuracy_multi(torch.randn(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match='different numbers of elements'):
        top_k_accuracy(torch.randn(4, 6), torch.zeros(3, dtype=torch.long), k=2)
    with pytest.raises(ValueError, match='different numbers of elements'): F1Score()(torch.randn(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match='different numbers of elements'): rmse(torch.randn(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match='activation must be one of'): AccumMetric(skm.f1_score, activation='softplus')


def test_wrong_target_shape_stops_fit_with_the_shapes():
    y = torch.randint(0, 3, (96, 2))  # two labels per item given to a single-label loss
    torch.manual_seed(0)
    x = torch.randn(96, 5)
    dls = DataLoaders.from_dsets((x[:64], y[:64]), (x[64:], y[64:]), bs=16, device='cpu')
    learn = Learner(dls, nn.Linear(5, 3), loss_func=CrossEntropyLossFlat())
    with pytest.raises(ValueError, match=r'predictions of shape \(16, 3\).*need 16 targets.*\(16, 2\)'):
        with learn.no_bar(), learn.no_logging(): learn.fit(1)
