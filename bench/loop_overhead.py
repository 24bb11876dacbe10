"""How much does `Learner.fit` add to a hand-written PyTorch loop?

One process, `torch.set_num_threads(2)`, interleaved repeats (median of --repeats, default 5), one epoch each of:
  (a) floor:   a hand-written loop over pre-sliced in-memory tensors,
  (b) torch:   a hand-written loop over a plain `torch.utils.data.DataLoader` (TensorDataset, shuffled),
  (c) fit:     `Learner.fit(1)` with its default callbacks (progress bar and recorder on),
for an MLP 784-50-10 and a small CNN (three stride-2 3x3 convs, 8/16/32 channels) on 60,000 MNIST-shaped random
tensors at bs 64 and 256, same model, same SGD (`torch.optim.SGD` through `OptimWrapper`, lr 0.01).
Also (d) fit with the library's own `SGD` optimizer.
Prints each time, fit / floor, and the per-batch overhead in microseconds. Targets: CNN <= 1.10, MLP <= 1.30.
Run: python bench/loop_overhead.py [--repeats 5] [--n 60000]
"""
import argparse, statistics, time
from functools import partial
import torch
from torch import nn
import torch.nn.functional as F
import torch.utils.data as tud
from dlcoders.data.load import DataLoaders
from dlcoders.learner import Learner
from dlcoders.optimizer import OptimWrapper, SGD
from _common import train_epoch_seconds

def mlp(): return nn.Sequential(nn.Flatten(), nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10))
def cnn(): return nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

def floor_epoch(model, x, y, bs, lr):
    "The floor: pre-sliced batches, the bare forward/backward/step."
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batches = [(x[i:i+bs], y[i:i+bs]) for i in range(0, len(x), bs)]
    model.train()
    t0 = time.perf_counter()
    for xb, yb in batches:
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return time.perf_counter() - t0, len(batches)

def torch_dl_epoch(model, x, y, bs, lr):
    "A plain torch DataLoader over a TensorDataset."
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    dl = tud.DataLoader(tud.TensorDataset(x, y), batch_size=bs, shuffle=True)
    model.train()
    t0 = time.perf_counter()
    for xb, yb in dl:
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return time.perf_counter() - t0, len(dl)

def fit_epoch(model, x, y, bs, lr, opt_func):
    "Learner.fit(1) with default callbacks; a 1-batch validation set keeps validation out of the timing."
    dls = DataLoaders.from_dsets((x, y), (x[:bs], y[:bs]), bs=bs, device='cpu')
    dls.train.drop_last = False
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=opt_func, lr=lr)
    return train_epoch_seconds(learn), len(dls.train)

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--n', type=int, default=60_000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x, y = torch.randn(args.n, 1, 28, 28), torch.randint(0, 10, (args.n,))
    lr = 0.01
    runners = {'floor': floor_epoch, 'torch_dl': torch_dl_epoch,
               'fit': partial(fit_epoch, opt_func=partial(OptimWrapper, opt=torch.optim.SGD)),
               'fit_ourSGD': partial(fit_epoch, opt_func=SGD)}
    print(f"{'model':<5} {'bs':>4} " + ' '.join(f'{k:>11}' for k in runners) + f" {'fit/floor':>10} {'overhead/batch':>15}")
    for name, make in (('mlp', mlp), ('cnn', cnn)):
        for bs in (64, 256):
            times = {k: [] for k in runners}
            for _ in range(args.repeats):  # interleaved: each repeat runs every variant once
                for k, run in runners.items():
                    t, nb = run(make(), x, y, bs, lr)
                    times[k].append(t)
            med = {k: statistics.median(v) for k, v in times.items()}
            ratio = med['fit'] / med['floor']
            over = (med['fit'] - med['floor']) / nb * 1e6
            print(f"{name:<5} {bs:>4} " + ' '.join(f'{med[k]*1000:>9.0f}ms' for k in runners) +
                  f" {ratio:>10.3f} {over:>13.0f}µs  (ourSGD/floor {med['fit_ourSGD']/med['floor']:.3f})", flush=True)

if __name__ == '__main__': main()
