"The training loop's contracts: event order, cancellation, interruption, save/load, determinism, export, get_preds."
import subprocess, sys, textwrap
import pytest, torch
from torch import nn
from dlcoders.torch_core import set_seed
from dlcoders.data.load import DataLoaders, DataLoader
from dlcoders.callback.core import *
from dlcoders.learner import Learner, load_learner
from dlcoders.optimizer import SGD, Adam

def make_dls(n=96, bs=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return DataLoaders.from_dsets((x[:64], y[:64]), (x[64:], y[64:]), bs=bs, device='cpu')

def make_learner(cbs=None, **kwargs):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return Learner(make_dls(), model, loss_func=nn.CrossEntropyLoss(), cbs=cbs, **kwargs)

class Tape(Callback):
    "Records every event it receives."
    def __init__(self): self.events = []
for _e in EVENTS: setattr(Tape, _e, (lambda e: lambda self: self.events.append(e))(_e))

BATCH_TRAIN = ['before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward', 'before_step',
               'after_step', 'after_batch']
BATCH_VALID = ['before_batch', 'after_pred', 'after_loss', 'after_batch']

def test_event_order():
    tape = Tape()
    learn = make_learner(cbs=[tape])
    with learn.no_logging(): learn.fit(1)
    # 64 training items at bs 32 (drop_last) -> 2 batches; 32 validation items at bs 64 -> 1 batch
    expected = (['after_create', 'before_fit', 'before_epoch', 'before_train'] + BATCH_TRAIN * 2 + ['after_train', 'before_validate']
                + BATCH_VALID + ['after_validate', 'after_epoch', 'after_fit'])
    assert tape.events == expected

def _raiser(event, exc, at_iter=None):
    "A callback raising `exc` at `event` (only at batch `at_iter` when given)."
    class Raise(Callback):
        order = -20  # before everything, so the rest of the step is really skipped
    def f(self):
        if at_iter is None or self.learn.iter == at_iter: raise exc()
    setattr(Raise, event, f)
    return Raise()

@pytest.mark.parametrize('event,exc,cancel_event,skipped', [
    ('before_batch', CancelBatchException, 'after_cancel_batch', 'after_pred'),
    ('before_backward', CancelBackwardException, 'after_cancel_backward', None),
    ('before_step', CancelStepException, 'after_cancel_step', None),
])
def test_cancel_inside_batch(event, exc, cancel_event, skipped):
    tape = Tape()
    learn = make_learner(cbs=[tape, _raiser(event, exc, at_iter=0)])
    with learn.no_logging(): learn.fit(1)
    ev = tape.events
    first_train = ev[ev.index('before_train'):ev.index('after_train')]
    first_batch = first_train[1:first_train.index('after_batch') + 1]
    assert cancel_event in first_batch and skipped not in first_batch
    # after_cancel_<step> is followed by the usual after_<step>
    assert first_batch[first_batch.index(cancel_event) + 1] == cancel_event.replace('after_cancel_', 'after_')
    assert first_batch[-1] == 'after_batch' 
    assert ev[-1] == 'after_fit'

def test_cancel_step_keeps_weights():
    learn = make_learner(cbs=[_raiser('before_step', CancelStepException, at_iter=0),
                              _raiser('before_step', CancelStepException, at_iter=1)])
    before = [p.detach().clone() for p in learn.model.parameters()]
    with learn.no_logging(): learn.fit(1)
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))

@pytest.mark.parametrize('event,exc,cancel_event,must_not_see', [
    ('before_train', CancelTrainException, 'after_cancel_train', 'after_pred'),
    ('before_validate', CancelValidException, 'after_cancel_validate', None),
    ('before_epoch', CancelEpochException, 'after_cancel_epoch', 'before_train'),
    ('before_fit', CancelFitException, 'after_cancel_fit', 'before_epoch'),
])
def test_cancel_phases(event, exc, cancel_event, must_not_see):
    tape = Tape()
    learn = make_learner(cbs=[tape, _raiser(event, exc)])
    with learn.no_logging(): learn.fit(2)
    assert cancel_event in tape.events
    if must_not_see == 'after_pred':  # training cancelled: only validation batches ran
        assert tape.events.count('after_pred') == 2
    elif must_not_see: assert must_not_see not in tape.events
    assert tape.events[-1] == 'after_fit'

def test_callback_cannot_shadow_learner_state():
    class Bad(Callback):
        def after_loss(self): self.loss = self.loss * 0
    learn = make_learner(cbs=[Bad()])
    with pytest.raises(AttributeError, match='self.learn.loss'):
        with learn.no_logging(): learn.fit(1)

def test_keyboard_interrupt_leaves_usable_learner(tmp_path):
    class Interrupt(Callback):
        def after_batch(self):
            if self.training and self.iter == 1: raise KeyboardInterrupt()
    learn = make_learner(cbs=[Interrupt()], path=tmp_path)
    with pytest.raises(KeyboardInterrupt): learn.fit(1)
    assert learn.logger is print  # the progress callback restored the logger
    learn.remove_cb(Interrupt)
    with learn.no_logging(): learn.fit(1)
    assert len(learn.recorder.values) == 1
    assert learn.save('after_interrupt').exists()

def test_save_load_round_trip_with_optimizer(tmp_path):
    set_seed(0)
    learn = make_learner(path=tmp_path)
    with learn.no_logging(): learn.fit(1)
    learn.save('ckpt')
    other = make_learner(path=tmp_path)
    other.load('ckpt')
    for a, b in zip(learn.model.parameters(), other.model.parameters()): assert torch.equal(a, b)
    sa, sb = learn.opt.state_dict(), other.opt.state_dict()
    for da, db in zip(sa['state'], sb['state']):
        assert da.keys() == db.keys()
        for k in da:
            if isinstance(da[k], torch.Tensor): assert torch.equal(da[k], db[k]), k
    # the same next step from both: the optimizer state really came back
    xb, yb = learn.dls.train.one_batch()
    for l in (learn, other):
        l.model.train()
        nn.CrossEntropyLoss()(l.model(xb), yb).backward()
        l.opt.step()
    for a, b in zip(learn.model.parameters(), other.model.parameters()): assert torch.equal(a, b)

def test_load_missing_file_names_it(tmp_path):
    learn = make_learner(path=tmp_path)
    with pytest.raises(FileNotFoundError, match='nothing_here.pth'): learn.load('nothing_here')

def test_same_seed_same_weights():
    def run():
        set_seed(42)
        learn = make_learner(opt_func=SGD, lr=0.1)
        learn.dls.train.shuffle = True
        with learn.no_logging(): learn.fit(1)
        return [p.detach().clone() for p in learn.model.parameters()]
    a, b = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a, b))

def test_get_preds_empty_and_one_item():
    learn = make_learner()
    x = torch.randn(1, 4)
    preds, targs = learn.get_preds(dl=DataLoader((x, torch.tensor([1])), bs=8, device='cpu'))
    assert preds.shape == (1, 2) and targs.tolist() == [1]
    preds, targs = learn.get_preds(dl=DataLoader((x[:0], torch.tensor([], dtype=torch.long)), bs=8, device='cpu'))
    assert len(preds) == 0 and len(targs) == 0
    preds, targs, losses = learn.get_preds(with_loss=True)
    assert preds.shape == (32, 2) and losses.shape == (32,)
    torch.testing.assert_close(losses.mean(), torch.tensor(learn.validate()[0]), rtol=1e-5, atol=1e-6)

EXPORTER = textwrap.dedent('''
    import sys, torch
    from torch import nn
    import torch.nn.functional as F
    from dlcoders.data.load import DataLoaders
    from dlcoders.learner import Learner

    def label_loss(pred, targ):  # defined in __main__: must travel by value
        return F.cross_entropy(pred, targ)

    class Net(nn.Module):  # also defined in __main__
        def __init__(self): super().__init__(); self.lin = nn.Linear(4, 2)
        def forward(self, x): return self.lin(x) * 2

    torch.manual_seed(0)
    x = torch.randn(64, 4); y = (x[:, 0] > 0).long()
    dls = DataLoaders.from_dsets((x[:48], y[:48]), (x[48:], y[48:]), bs=16, device='cpu')
    learn = Learner(dls, Net(), loss_func=label_loss, path=sys.argv[1])
    with learn.no_logging(): learn.fit(1)
    learn.export('export.pkl')
    print(learn.predict(torch.ones(4))[2].tolist())
''')

def test_export_load_in_fresh_process(tmp_path):
    script = tmp_path/'exporter.py'
    script.write_text(EXPORTER)
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = out.stdout.strip().splitlines()[-1]
    loader = (f"from dlcoders.learner import load_learner; import torch; "
              f"print(load_learner(r'{tmp_path/'export.pkl'}').predict(torch.ones(4))[2].tolist())")
    out2 = subprocess.run([sys.executable, '-c', loader], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out2.returncode == 0, out2.stderr
    assert out2.stdout.strip().splitlines()[-1] == expected

def test_load_learner_warns_about_trust_in_its_doc():
    assert 'trust' in load_learner.__doc__

def test_missing_loss_func_is_explained():
    with pytest.raises(ValueError, match='loss_func'):
        Learner(make_dls(), nn.Linear(4, 2))
