"""Tables at a million rows: how long `TabularPandas` takes and how much memory it needs, and how much `fit` adds.

One process, `torch.set_num_threads(--threads)` (default 1: on a machine shared with
other jobs, two threads on two cores make the timings swing by tens of percent). The table is the adult census sample (from the dataset
mirror or the public host) repeated to at least --rows rows (default 1,000,000), 6 categorical and 3 continuous
columns, target `salary`.

  (1) preprocessing: seconds for `TabularPandas(df, [Categorify, FillMissing, Normalize], ...)` and its peak memory
      (tracemalloc: NumPy and pandas allocations) against the DataFrame's own size (`memory_usage(deep=True)`).
      Target: peak <= 3x the DataFrame.
  (2) one training epoch at bs 1024 (--bs), median of --repeats (default 5) interleaved runs, same model
      (`TabularModel`, layers [200, 100]) and same optimizer (`torch.optim.Adam` through `OptimWrapper`, lr 1e-3):
        floor: a hand-written loop over the pre-built tensors (a `randperm` per epoch, one `index_select` per
               tensor per batch, forward, cross-entropy, backward, step, zero_grad);
        fit:   `tabular_learner(dls).fit(1)` with its default callbacks (progress bar, recorder), its validation
               pass timed apart and subtracted;
        fit_ourAdam: the same with the library's own `Adam` (the default of `tabular_learner`).
      Target: fit / floor <= 1.15.
Run from the repository root:  python bench/tabular.py [--rows 1000000] [--repeats 5] [--bs 1024] [--threads 1]
"""
import argparse, os, statistics, time, tracemalloc
from functools import partial
os.environ.setdefault('DLCODERS_OFFLINE', '1')
import numpy as np, pandas as pd, torch
import torch.nn.functional as F
from dlcoders.data.external import untar_data, URLs
from dlcoders.optimizer import OptimWrapper, Adam
from dlcoders.tabular.core import TabularPandas, Categorify, FillMissing, TabularNormalize
from dlcoders.tabular.model import TabularModel, get_emb_sz
from dlcoders.tabular.learner import tabular_learner
from _common import train_epoch_seconds

CAT = ['workclass', 'education', 'marital-status', 'occupation', 'relationship', 'race']
CONT = ['age', 'fnlwgt', 'education-num']

def big_table(rows):
    df = pd.read_csv(untar_data(URLs.ADULT_SAMPLE)/'adult.csv', skipinitialspace=True)
    return pd.concat([df] * -(-rows // len(df)), ignore_index=True)

def process(df, n_valid):
    splits = (np.arange(len(df) - n_valid), np.arange(len(df) - n_valid, len(df)))
    return TabularPandas(df, [Categorify, FillMissing, TabularNormalize], CAT, CONT, 'salary', splits=splits)

def floor_epoch(model, tensors, bs, lr):
    "The floor: shuffled index slices of pre-built tensors, then the bare forward/backward/step."
    cats, conts, ys = tensors
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    t0 = time.perf_counter()
    perm = torch.randperm(len(ys))
    for i in range(len(ys) // bs):
        idx = perm[i*bs:(i+1)*bs]
        xc, xn, yb = cats.index_select(0, idx), conts.index_select(0, idx), ys.index_select(0, idx)
        loss = F.cross_entropy(model(xc, xn), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return time.perf_counter() - t0

def fit_epoch(dls, make_model, lr, opt_func):
    learn = tabular_learner(dls, layers=[200, 100], opt_func=opt_func, lr=lr)
    learn.model = make_model()
    return train_epoch_seconds(learn)

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--rows', type=int, default=1_000_000)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--bs', type=int, default=1024)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    df = big_table(args.rows)
    df_mb = df.memory_usage(deep=True).sum() / 2**20
    n_valid = 2 * args.bs  # a small validation set: the epoch's training pass is what we time
    tracemalloc.start()
    t0 = time.perf_counter()
    to = process(df, n_valid)
    secs = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    print(f"TabularPandas on {len(df):,} rows ({df_mb:.0f} MB DataFrame): {secs:.2f}s, peak {peak:.0f} MB "
          f"= {peak/df_mb:.2f}x the DataFrame (target <= 3)", flush=True)
    dls = to.dataloaders(args.bs, device='cpu')
    train_t = dls.train.dataset.tensors
    emb_szs = get_emb_sz(to)
    def make_model():
        torch.manual_seed(0)
        return TabularModel(emb_szs, len(CONT), 2, [200, 100])
    lr = 1e-3
    runners = {'floor': lambda: floor_epoch(make_model(), train_t, args.bs, lr),
               'fit': lambda: fit_epoch(dls, make_model, lr, partial(OptimWrapper, opt=torch.optim.Adam)),
               'fit_ourAdam': lambda: fit_epoch(dls, make_model, lr, Adam)}
    times = {k: [] for k in runners}
    for _ in range(args.repeats):
        for k, run in runners.items(): times[k].append(run())
    med = {k: statistics.median(v) for k, v in times.items()}
    nb = len(dls.train)
    print(f"one epoch, {nb} batches of {args.bs}: " + ', '.join(f"{k} {v:.2f}s" for k, v in med.items()))
    best = {k: min(v) for k, v in times.items()}
    print(f"fit / floor = {med['fit']/med['floor']:.3f} (target <= 1.15; fastest runs: {best['fit']/best['floor']:.3f}), "
          f"overhead {(med['fit']-med['floor'])/nb*1e6:.0f}µs per batch; ourAdam / floor = {med['fit_ourAdam']/med['floor']:.3f}")

if __name__ == '__main__': main()
