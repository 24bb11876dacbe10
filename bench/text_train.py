"""How much does `Learner.fit` add to a hand-written loop when training an AWD-LSTM language model?

Language-model data from the IMDb sample (`TextBlock(is_lm=True)`, an `LMDataLoader`, bs 32, seq_len 72), a small
AWD-LSTM (emb 64, hidden 192, 2 layers, vocabulary capped at 4,000), the library's `Adam` over the same parameter
groups. One epoch (training, then a validation pass) each of, interleaved, median of --repeats (default 3):
  (a) loop: a hand-written loop over the same loaders: reset the state, forward, cross-entropy plus the same AR/TAR
      terms as `RNNRegularizer(alpha=2, beta=1)`, backward, step, zero_grad; then the validation loss and accuracy;
  (b) fit:  `language_model_learner(...).fit(1)` with its callbacks (progress bar, recorder, ModelResetter,
      RNNRegularizer, accuracy).
Prints tokens per second and fit / loop time. Target: <= 1.10.
Run: python bench/text_train.py [--repeats 3] [--threads 1]
"""
import argparse, os, statistics, time, warnings
import torch
import torch.nn.functional as F
import pandas as pd
from dlcoders.text.all import *
from dlcoders.optimizer import Adam

CONFIG = dict(emb_sz=64, n_hid=192, n_layers=2)

def loop_epoch(dls, model, lr:float) -> float:
    opt = Adam(awd_lstm_lm_split(model), lr=lr)
    t0 = time.perf_counter()
    model.train()
    model.reset()
    for xb, yb in dls.train:
        out, raw, dropped = model(xb)
        loss = F.cross_entropy(out.flatten(0, 1), yb.flatten())
        loss = loss + 2 * dropped.float().pow(2).mean() + (raw[:, 1:] - raw[:, :-1]).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.reset()
    tot, acc, n = 0., 0., 0
    with torch.no_grad():
        for xb, yb in dls.valid:
            out = model(xb)[0]
            tot += F.cross_entropy(out.flatten(0, 1), yb.flatten()) * len(xb)
            acc += (out.argmax(-1) == yb).float().mean() * len(xb)
            n += len(xb)
    (tot / n).item(), (acc / n).item()
    return time.perf_counter() - t0

def fit_epoch(dls, lr:float) -> float:
    learn = language_model_learner(dls, AWD_LSTM, config=CONFIG, pretrained=False, metrics=accuracy, lr=lr)
    t0 = time.perf_counter()
    learn.fit(1)
    return time.perf_counter() - t0

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--threads', type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter('ignore')
    path = untar_data(URLs.IMDB_SAMPLE)
    df = pd.read_csv(path/'texts.csv')
    dls = DataBlock(blocks=TextBlock.from_df('text', is_lm=True, max_vocab=4000),
                    splitter=RandomSplitter(0.1, seed=0)).dataloaders(df, path=path, bs=32, seq_len=72)
    n_tok = sum(x.numel() for x, _ in dls.train) + sum(x.numel() for x, _ in dls.valid)
    print(f"{n_tok:,} tokens per epoch (training and validation), vocabulary {len(dls.vocab)}, {args.threads} thread(s)")
    times = {'loop': [], 'fit': []}
    for i in range(args.repeats):
        set_seed(i)
        times['loop'].append(loop_epoch(dls, get_language_model(AWD_LSTM, len(dls.vocab), config=CONFIG), 1e-3))
        set_seed(i)
        times['fit'].append(fit_epoch(dls, 1e-3))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, t in med.items(): print(f"{k:<5} {t:7.2f} s  {n_tok / t:>9,.0f} tokens/s   (all: {', '.join(f'{v:.2f}' for v in times[k])})")
    print(f"fit / loop: {med['fit'] / med['loop']:.3f} (target <= 1.10)")

if __name__ == '__main__': main()
