"""No host synchronisation per training batch in the default callbacks.

On a GPU, reading a tensor's value from Python (`.item()`, `float(t)`, `.tolist()`, `.cpu()`, `bool(t)`...) makes
the host wait for every kernel queued so far: the GPU then idles while Python prepares the next batch. Without
CUDA we count those calls instead: inside the training batch loop of `fit` with the default callbacks, there must
be none; the recorder reads the losses once per epoch.
"""
import contextlib
import pytest
import torch
from torch import nn
from dlcoders.data.load import DataLoaders
from dlcoders.learner import Learner
from dlcoders.callback.core import Callback
from dlcoders.metrics import accuracy, Dice
from dlcoders.callback import training  # to_bf16, ChannelsLast

READS = ('item', 'tolist', 'cpu', 'numpy', '__float__', '__int__', '__bool__', '__index__')

class SyncCounter:
    "Count calls of the methods in `READS` while `counting` is on (with the stack of each, to say where)."
    def __init__(self): self.counting, self.calls = False, []

    @contextlib.contextmanager
    def patched(self):
        olds = {name: getattr(torch.Tensor, name) for name in READS}
        def wrap(name, old):
            def f(t, *args, **kwargs):
                if self.counting:
                    import traceback
                    self.calls.append((name, ''.join(traceback.format_stack(limit=6)[:-1])))
                return old(t, *args, **kwargs)
            return f
        for name, old in olds.items(): setattr(torch.Tensor, name, wrap(name, old))
        try: yield self
        finally:
            for name, old in olds.items(): setattr(torch.Tensor, name, old)

def count_training_reads(learn:Learner, n_epoch:int=2) -> tuple:
    "Reads counted inside the training phases' batch loops (`all_batches` while training) of `learn.fit(n_epoch)`."
    counter, n_batches = SyncCounter(), [0]
    plain = learn.all_batches
    def all_batches():
        counter.counting = learn.training
        try: plain()
        finally: counter.counting = False
        if learn.training: n_batches[0] += learn.n_iter
    learn.all_batches = all_batches  # an instance attribute: this learner only
    try:
        with counter.patched(): learn.fit(n_epoch)
    finally: del learn.all_batches
    return counter.calls, n_batches[0]

def make_learner(**kwargs):
    torch.manual_seed(0)
    x, y = torch.randn(256, 3, 8, 8), torch.randint(0, 4, (256,))
    dls = DataLoaders.from_dsets((x, y), (x[:64], y[:64]), bs=32, device='cpu')
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    learn = Learner(dls, model, nn.CrossEntropyLoss(), metrics=[accuracy], **kwargs)
    return learn

@pytest.mark.parametrize('setup', ['default', 'train_metrics', 'bf16', 'channels_last', 'one_cycle'])
def test_no_reads_per_training_batch(setup):
    learn = make_learner()
    if setup == 'train_metrics': learn.recorder.train_metrics = True
    if setup == 'bf16': learn.to_bf16()
    if setup == 'channels_last': learn.to_channels_last()
    if setup == 'one_cycle':
        from dlcoders.callback.schedule import ParamScheduler, SchedCos
        learn.add_cb(ParamScheduler({'lr': SchedCos(1e-2, 1e-4)}))
    with learn.no_logging(): calls, n = count_training_reads(learn)
    assert n == 2 * len(learn.dls.train)
    assert not calls, f"{len(calls)} host reads in {n} training batches, the first from:\n{calls[0][1]}"
    assert len(learn.recorder.losses) == n  # the losses were still recorded, once per epoch

class ReadsLossEachBatch(Callback):
    def after_batch(self):
        if self.training: self.last = self.loss.item()

def test_counter_sees_a_read_per_batch():
    "The check can fail: a callback that reads the loss every batch is caught, once per batch."
    learn = make_learner(cbs=[ReadsLossEachBatch()])
    with learn.no_logging(): calls, n = count_training_reads(learn)
    assert len(calls) == n and {name for name, _ in calls} == {'item'}
    assert 'after_batch' in calls[0][1]

def test_counter_sees_python_conversions():
    counter = SyncCounter()
    t = torch.ones(())
    with counter.patched():
        counter.counting = True
        float(t), int(t), bool(t), t.tolist(), t.cpu()
        counter.counting = False
    assert [name for name, _ in counter.calls] == ['__float__', '__int__', '__bool__', 'tolist', 'cpu']
