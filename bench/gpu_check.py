"""The GPU path in one prepared check (about 3 minutes on one GPU; at most 5).

resnet50 (torchvision, random weights) at 224 px on synthetic data already on the GPU, bf16 autocast and
channels-last, SGD with momentum, one process:
  (1) images per second of `Learner.fit` (`to_bf16()`, `to_channels_last()`, default callbacks) ÷ a hand-written
      loop doing the same work (autocast, channels-last inputs, forward, cross-entropy, backward, step, zero_grad),
      interleaved, median of --reps (goal >= 0.97);
  (2) the same with the model compiled (`learn.compile()`; the hand loop runs the same compiled module);
  (3) achieved TFLOP/s of the training step (FLOPs counted by `torch.utils.flop_counter` on one batch) against the
      card's dense bf16 peak, where the card is known;
  (4) the distributed path: `torchrun --nproc_per_node 1` running `Learner.fit` inside `learn.distrib_ctx()` (DDP,
      NCCL, sharded loader, reduced losses and metrics), its images per second ÷ (1)'s `Learner.fit`.
Where there is no CUDA it says so and exits cleanly (status 0). `--device cpu` runs the same code on the CPU with a
small model and images, to check the script itself (its figures mean nothing).
Run from the repository root:  python bench/gpu_check.py [--quick] [--bs 128] [--steps 30] [--reps 3] [--no-compile]
"""
import argparse, json, os, statistics, subprocess, sys, time
from functools import partial
from pathlib import Path
import torch
from torch import nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dlcoders.data.load import DataLoaders
from dlcoders.learner import Learner
from dlcoders.optimizer import OptimWrapper
from dlcoders.callback import training  # to_bf16, to_channels_last, compile  # noqa: F401

# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets
BF16_PEAK = {'H200': 989., 'H100 SXM': 989., 'H100 NVL': 835., 'H100 PCIe': 756., 'H100': 756., 'GH200': 989.,
             'B200': 2250., 'A100': 312., 'A10G': 70., 'A10': 125., 'L40S': 362., 'L40': 181., 'L4': 121.,
             'RTX 4090': 165., 'RTX 6000 Ada': 364., 'A6000': 155.}

def card_peak(name:str):
    "The bf16 peak of the card whose name contains a known key (the longest match), else None."
    keys = [k for k in BF16_PEAK if k.lower() in name.lower()]
    return BF16_PEAK[max(keys, key=len)] if keys else None

def make_model(arch:str) -> nn.Module:
    import torchvision
    return getattr(torchvision.models, arch)(weights=None, num_classes=1000)

def synthetic(n:int, size:int, device) -> tuple:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g).to(device)
    return x, torch.randint(0, 1000, (n,), generator=g).to(device)

def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)

def hand_epoch(model, opt, x, y, bs:int, device) -> float:
    "The hand-written loop, one epoch over (x, y) in shuffled batches: seconds."
    model.train()
    sync(device)
    t0 = time.perf_counter()
    for idx in torch.randperm(len(x), device=device).split(bs):
        xb = x[idx].contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(xb), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
    sync(device)
    return time.perf_counter() - t0

def make_learner(model, x, y, bs:int, device) -> Learner:
    dls = DataLoaders.from_dsets((x, y), (x[:bs], y[:bs]), bs=bs, device=device)
    opt_func = partial(OptimWrapper, opt=partial(torch.optim.SGD, momentum=0.9))
    return Learner(dls, model, nn.CrossEntropyLoss(), opt_func=opt_func, lr=0.01).to_bf16().to_channels_last()

def fit_epoch(learn, device) -> float:
    "`learn.fit(1)`'s training pass: seconds (the one-batch validation pass is timed apart and taken off)."
    sync(device)
    t0 = time.perf_counter()
    with learn.no_logging(), learn.no_bar(): learn.fit(1)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    with learn.no_logging(), learn.no_bar(): learn.validate()
    sync(device)
    return total - (time.perf_counter() - t0)

def compare(model, x, y, a, device, label:str) -> dict:
    "Interleaved epochs of the hand loop and `Learner.fit` on the same model: images per second of each."
    hand_opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    learn = make_learner(model, x, y, a.bs, device)
    if label == 'compiled':
        learn.compile(check=False)  # the warm-up epochs below compile it (training graph, then evaluation graph)
    model.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    hand_epoch(model, hand_opt, x[:a.bs * 2], y[:a.bs * 2], a.bs, device)  # warm-up: cudnn plans, compilation
    fit_epoch(learn, device)
    warm = time.perf_counter() - t0
    times = {'hand': [], 'fit': []}
    for _ in range(a.reps):
        times['hand'].append(hand_epoch(model, hand_opt, x, y, a.bs, device))
        times['fit'].append(fit_epoch(learn, device))
    rates = {k: len(x) / statistics.median(v) for k, v in times.items()}
    print(f"{label:>9}: hand-written {rates['hand']:8.1f} img/s | Learner.fit {rates['fit']:8.1f} img/s | "
          f"fit / hand {rates['fit'] / rates['hand']:.3f} (goal >= 0.97) | warm-up {warm:.0f}s", flush=True)
    return rates

def train_flops_per_image(model, size:int, device) -> float:
    "FLOPs of one training step (forward and backward) per image, counted on a batch of 2."
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(2, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16): loss = model(x).float().sum()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2

def distributed_worker(a):
    "Run under torchrun: `Learner.fit` inside `distrib_ctx`; rank 0 writes its images per second to --out."
    from dlcoders.distributed import setup_distrib, rank_distrib, _comm_device
    setup_distrib()
    device = _comm_device() if a.device == 'cuda' else torch.device('cpu')
    x, y = synthetic(a.bs * a.steps, a.size, device)
    learn = make_learner(make_model(a.arch).to(device), x, y, a.bs, device)
    with learn.distrib_ctx():
        fit_epoch(learn, device)  # warm-up
        secs = statistics.median(fit_epoch(learn, device) for _ in range(a.reps))
        values = learn.recorder.values[-1]
    if rank_distrib() == 0: Path(a.out).write_text(json.dumps({'rate': len(x) / secs, 'values': values}))

def run_distributed(a) -> dict:
    out = Path(os.environ.get('TMPDIR', '/tmp'))/f'gpu_check_ddp_{os.getpid()}.json'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '1', '--master_addr', '127.0.0.1',
           '--master_port', str(_free_port()), __file__, '--worker', '--out', str(out), '--device', a.device,
           '--arch', a.arch, '--size', str(a.size), '--bs', str(a.bs), '--steps', str(a.steps), '--reps', str(a.reps)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    if res.returncode != 0 or not out.exists():
        print(f"distributed: torchrun failed (status {res.returncode}):\n{res.stderr[-3000:]}")
        return {}
    return json.loads(out.read_text())

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--device', default='cuda', help="'cuda', or 'cpu' to check the script itself")
    p.add_argument('--arch', default=None, help='a torchvision model (default resnet50; resnet18 on the CPU)')
    p.add_argument('--size', type=int, default=None, help='image size (default 224; 64 on the CPU)')
    p.add_argument('--bs', type=int, default=None, help='batch size (default 128; 8 on the CPU)')
    p.add_argument('--steps', type=int, default=None, help='batches per timed epoch (default 30; 4 on the CPU)')
    p.add_argument('--reps', type=int, default=3)
    p.add_argument('--quick', action='store_true', help='fewer steps and repeats')
    p.add_argument('--no-compile', action='store_true')
    p.add_argument('--no-distributed', action='store_true')
    p.add_argument('--timeout', type=float, default=240, help='seconds for the distributed run')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--out', help=argparse.SUPPRESS)
    a = p.parse_args()
    cpu = a.device == 'cpu'
    a.arch = a.arch or ('resnet18' if cpu else 'resnet50')
    a.size, a.bs = a.size or (64 if cpu else 224), a.bs or (8 if cpu else 128)
    a.steps = a.steps or (4 if cpu else 15 if a.quick else 30)
    if a.quick: a.reps = min(a.reps, 2)
    if a.worker: return distributed_worker(a)
    if not cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, so nothing to measure (run it on a machine with a GPU, or with "
              "--device cpu to check the script).")
        return
    device = torch.device(a.device)
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if not cpu else 'CPU'
    peak = None if cpu else card_peak(name)
    print(f"{name}, torch {torch.__version__}, {a.arch} at {a.size}px, bs {a.bs}, {a.steps} steps per epoch, "
          f"median of {a.reps}, bf16 autocast + channels-last", flush=True)
    start = time.perf_counter()
    x, y = synthetic(a.bs * a.steps, a.size, device)
    model = make_model(a.arch).to(device)
    flops = train_flops_per_image(model, a.size, device)
    eager = compare(model, x, y, a, device, 'eager')
    for label, rate in [('eager hand', eager['hand']), ('eager fit', eager['fit'])]:
        achieved = rate * flops / 1e12
        print(f"{label:>10}: {achieved:7.1f} TFLOP/s ({flops / 1e9:.1f} GFLOP per image per step)" +
              (f", {achieved / peak:.1%} of the {peak:.0f} TFLOP/s bf16 peak" if peak else ', peak unknown'), flush=True)
    if not a.no_compile:
        compiled = compare(make_model(a.arch).to(device), x, y, a, device, 'compiled')
        print(f"  compiled / eager: Learner.fit {compiled['fit'] / eager['fit']:.3f}", flush=True)
    if not a.no_distributed:
        res = run_distributed(a)
        if res: print(f"distributed (torchrun, 1 process): Learner.fit in distrib_ctx {res['rate']:.1f} img/s | "
                      f"distributed / Learner.fit {res['rate'] / eager['fit']:.3f} | last row {res['values']}", flush=True)
    print(f"gpu_check done in {time.perf_counter() - start:.0f}s")

if __name__ == '__main__': main()
