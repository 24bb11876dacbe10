"""Collaborative filtering at a million ratings: how much `collab_learner(...).fit(1)` adds to a hand-written loop.

One process, `torch.set_num_threads(--threads)` (default 1: on a machine shared with
other jobs, two threads on two cores make the timings swing by tens of percent). The ratings of `movie_lens_sample` (from the dataset
mirror or the public host) repeated to at least --rows ratings (default 1,000,000). Same model (`EmbeddingDotBias`,
50 factors, y_range (0, 5.5)), same optimizer (`torch.optim.Adam` through `OptimWrapper`, lr 5e-3), one epoch,
median of --repeats (default 5) interleaved runs, at each batch size of --bs (default 1024 and 64, the book's):
  floor: a hand-written loop over the pre-built (user, item) code and rating tensors (a `randperm` per epoch, one
         `index_select` per batch, forward, MSE, backward, step, zero_grad);
  fit:   `collab_learner(dls).fit(1)` with its default callbacks, its validation pass timed apart and subtracted.
Target: fit / floor <= 1.10 at bs 1024.
Run from the repository root:  python bench/collab.py [--rows 1000000] [--repeats 5] [--bs 1024 64] [--threads 1]
"""
import argparse, os, statistics, time
from functools import partial
os.environ.setdefault('DLCODERS_OFFLINE', '1')
import numpy as np, pandas as pd, torch
import torch.nn.functional as F
from dlcoders.data.external import untar_data, URLs
from dlcoders.optimizer import OptimWrapper
from dlcoders.collab import CollabDataLoaders, EmbeddingDotBias, collab_learner
from _common import train_epoch_seconds

def floor_epoch(model, tensors, bs, lr):
    x, y = tensors
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    t0 = time.perf_counter()
    perm = torch.randperm(len(y))
    for i in range(len(y) // bs):
        idx = perm[i*bs:(i+1)*bs]
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        loss = F.mse_loss(model(xb), yb[:, 0])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return time.perf_counter() - t0

def fit_epoch(dls, make_model, lr):
    learn = collab_learner(dls, n_factors=50, y_range=(0, 5.5), opt_func=partial(OptimWrapper, opt=torch.optim.Adam), lr=lr)
    learn.model = make_model()
    return train_epoch_seconds(learn)

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--rows', type=int, default=1_000_000)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--bs', type=int, nargs='+', default=[1024, 64])
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratings = pd.read_csv(untar_data(URLs.ML_SAMPLE)/'ratings.csv')
    ratings = pd.concat([ratings] * -(-args.rows // len(ratings)), ignore_index=True)
    for bs in args.bs:
        dls = CollabDataLoaders.from_df(ratings, valid_pct=2*bs/len(ratings), bs=bs, seed=0, device='cpu')
        classes = dls.classes
        def make_model():
            torch.manual_seed(0)
            return EmbeddingDotBias.from_classes(50, classes, y_range=(0, 5.5))
        runners = {'floor': lambda: floor_epoch(make_model(), dls.train.dataset.tensors, bs, 5e-3),
                   'fit': lambda: fit_epoch(dls, make_model, 5e-3)}
        times = {k: [] for k in runners}
        for _ in range(args.repeats):
            for k, run in runners.items(): times[k].append(run())
        med = {k: statistics.median(v) for k, v in times.items()}
        nb = len(dls.train)
        print(f"{len(ratings):,} ratings, bs {bs} ({nb} batches): floor {med['floor']:.2f}s, fit {med['fit']:.2f}s, "
              f"fit / floor = {med['fit']/med['floor']:.3f}{' (target <= 1.10)' if bs == 1024 else ''} "
              f"(fastest runs: {min(times['fit'])/min(times['floor']):.3f}), "
              f"overhead {(med['fit']-med['floor'])/nb*1e6:.0f}µs per batch", flush=True)

if __name__ == '__main__': main()
