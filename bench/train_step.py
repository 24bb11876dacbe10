"""Does `Learner.fit` train an xresnet18 on real images as fast as a hand-written PyTorch loop?

One process, interleaved repeats (median of --repeats, default 5), one training epoch each of:
  (a) hand:  a hand-written loop (forward, cross-entropy, backward, step, zero_grad) over the training `DataLoader`
             of the chapter 14 `DataBlock` (imagenette, `Resize(160)` per item, `aug_transforms(size=128,
             min_scale=0.5)` + `Normalize` per batch), model in train mode,
  (b) fit:   `Learner.fit(1)` with its default callbacks (progress bar, recorder), over the same `DataLoader`, its
             validation pass timed separately and left out (`_common.train_epoch_seconds`),
with a freshly built `xresnet18(n_out=10)` (same seed) and the same optimizer, `torch.optim.SGD(lr=1e-3,
momentum=0.9)` (wrapped in `OptimWrapper` for the Learner). Also (c) fit with the library's default `Adam`,
for information. The data loading and batch augmentation are in every variant, as in real training.
Prints each median, fit / hand, and the overhead per batch. Target: fit / hand <= 1.05.
Run from the repository root:  python bench/train_step.py [--repeats 5] [--batches N] [--bs 64] [--size 128]
--batches N trains on the first N batches of the (shuffled, seeded) training set only: a few minutes on 2 CPU cores
with the default mirror. With the offline mirror set `DLCODERS_DATA_URL` (see README) and `DLCODERS_OFFLINE=1`.
"""
import argparse, os, random, statistics, time
from functools import partial
os.environ.setdefault('DLCODERS_OFFLINE', '1')
import torch
from torch import nn
import torch.nn.functional as F
from dlcoders.data.external import untar_data, URLs, get_image_files
from dlcoders.data.block import DataBlock, CategoryBlock, GrandparentSplitter, parent_label
from dlcoders.vision.core import ImageBlock
from dlcoders.vision.augment import Resize, aug_transforms, Normalize, imagenet_stats
from dlcoders.vision.models.xresnet import xresnet18
from dlcoders.learner import Learner
from dlcoders.optimizer import OptimWrapper, Adam
from dlcoders.torch_core import set_seed
from _common import train_epoch_seconds

LR, MOM = 1e-3, 0.9

def get_dls(bs, size, n_batches, device):
    "The chapter's imagenette loaders; with `n_batches`, a seeded random `n_batches * bs` of the training files."
    path = untar_data(URLs.IMAGENETTE_160)
    def items(p):
        files = get_image_files(p)
        if n_batches is None: return files
        train = [f for f in files if f.parent.parent.name == 'train']
        random.Random(0).shuffle(train)
        return train[:n_batches * bs] + [f for f in files if f.parent.parent.name == 'val'][:bs]
    dls = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=items, splitter=GrandparentSplitter(valid_name='val'),
                    get_y=parent_label, item_tfms=Resize(size * 5 // 4),
                    batch_tfms=[*aug_transforms(min_scale=0.5, size=size), Normalize.from_stats(*imagenet_stats)],
                    ).dataloaders(path, bs=bs, num_workers=0, device=device)
    return dls

def new_model(dls):
    set_seed(0)
    return xresnet18(n_out=dls.c).to(dls.device)

def hand_epoch(dls, opt_cls=torch.optim.SGD, **opt_kw):
    "The hand-written loop over the same training DataLoader."
    model = new_model(dls)
    opt = opt_cls(model.parameters(), lr=LR, **opt_kw)
    model.train()
    t0 = time.perf_counter()
    n = 0
    for xb, yb in dls.train:
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        n += 1
    if dls.device.type == 'cuda': torch.cuda.synchronize()
    return time.perf_counter() - t0, n

def fit_epoch(dls, opt_func):
    "`Learner.fit(1)` with default callbacks, validation left out."
    learn = Learner(dls, new_model(dls), loss_func=nn.CrossEntropyLoss(), opt_func=opt_func, lr=LR)
    return train_epoch_seconds(learn), len(dls.train)

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--batches', type=int, default=None, help='train on this many batches per epoch (default: all)')
    parser.add_argument('--bs', type=int, default=64)
    parser.add_argument('--size', type=int, default=128)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--device', default=None, help="'cpu' or 'cuda' (default: cuda when available)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    dls = get_dls(args.bs, args.size, args.batches, device)
    runners = {'hand': partial(hand_epoch, momentum=MOM),
               'fit': partial(fit_epoch, opt_func=partial(OptimWrapper, opt=torch.optim.SGD, momentum=MOM)),
               'fit_ourAdam': partial(fit_epoch, opt_func=Adam),
               'hand_torchAdam': partial(hand_epoch, opt_cls=torch.optim.Adam)}
    print(f"xresnet18, {args.size}px, bs {args.bs}, {len(dls.train)} batches/epoch, {len(dls.train_ds)} training images, "
          f"device {device}, {args.threads} threads, median of {args.repeats}", flush=True)
    hand_epoch(dls, momentum=MOM)  # warm-up: first-call costs (allocator, kernels, file cache) out of the timings
    times = {k: [] for k in runners}
    for _ in range(args.repeats):  # interleaved: each repeat runs every variant once
        for k, run in runners.items():
            t, nb = run(dls)
            times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(' '.join(f'{k:>15}' for k in runners))
    print(' '.join(f'{med[k]*1000:>13.0f}ms' for k in runners))
    ratio = med['fit'] / med['hand']
    over = (med['fit'] - med['hand']) / nb * 1e3
    print(f"fit / hand (same torch SGD): {ratio:.3f}  (target <= 1.05), overhead {over:+.1f} ms/batch; "
          f"our Adam in fit / torch Adam by hand: {med['fit_ourAdam'] / med['hand_torchAdam']:.3f}", flush=True)

if __name__ == '__main__': main()
