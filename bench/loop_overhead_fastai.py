"""The same measure as `loop_overhead.py`, with fastai's `Learner`: how much does fastai's `fit` add to the same
hand-written loop? Run only where fastai imports (it is never a dependency of dlcoders): otherwise it says so and
exits cleanly.

One process, `torch.set_num_threads(2)`, the MLP 784-50-10 and the small CNN of `loop_overhead.py` on --n random
MNIST-shaped tensors at bs 64 and 256, `torch.optim.SGD` (through fastai's `OptimWrapper`) at lr 0.01; interleaved
repeats (median of --repeats): the floor (pre-sliced batches) and `fastai.Learner.fit(1)` with its default
callbacks, its validation pass timed apart and subtracted, like ours.
Run: python bench/loop_overhead_fastai.py [--repeats 5] [--n 60000]
"""
import argparse, importlib.util, statistics, sys, time
from functools import partial
import torch
from torch import nn
from loop_overhead import mlp, cnn, floor_epoch

def fastai_fit_epoch(model, x, y, bs, lr):
    "fastai's `Learner.fit(1)`, default callbacks, minus a separate `validate()`."
    from fastai.data.core import DataLoaders, TfmdDL
    from fastai.learner import Learner
    from fastai.optimizer import OptimWrapper
    import fastai.callback.progress  # noqa: F401 (adds `no_bar`)
    train = TfmdDL(list(zip(x, y)), bs=bs, shuffle=True, device='cpu', num_workers=0)
    valid = TfmdDL(list(zip(x[:bs], y[:bs])), bs=bs, device='cpu', num_workers=0)
    learn = Learner(DataLoaders(train, valid), model, loss_func=nn.CrossEntropyLoss(),
                    opt_func=partial(OptimWrapper, opt=torch.optim.SGD), lr=lr)
    t0 = time.perf_counter()
    with learn.no_logging(): learn.fit(1)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.validate()
    return total - (time.perf_counter() - t0), len(train)

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--n', type=int, default=60_000)
    args = parser.parse_args()
    if importlib.util.find_spec('fastai') is None:
        print("fastai is not importable in this environment: nothing to compare (pip install fastai to compare)")
        return
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x, y = torch.randn(args.n, 1, 28, 28), torch.randint(0, 10, (args.n,))
    runners = {'floor': floor_epoch, 'fastai_fit': fastai_fit_epoch}
    print(f"{'model':<5} {'bs':>4} " + ' '.join(f'{k:>11}' for k in runners) + f" {'fastai_fit/floor':>17}")
    for name, make in [('mlp', mlp), ('cnn', cnn)]:
        for bs in (64, 256):
            times = {k: [] for k in runners}
            for _ in range(args.repeats):
                for k, run in runners.items():
                    t, nb = run(make(), x, y, bs, 0.01)
                    times[k].append(t)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{name:<5} {bs:>4} " + ' '.join(f'{med[k]*1000:>9.0f}ms' for k in runners) +
                  f" {med['fastai_fit'] / med['floor']:>17.3f}", flush=True)

if __name__ == '__main__': main()
