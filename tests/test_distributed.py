"Two processes on the CPU (gloo on 127.0.0.1), launched by torchrun: the learner trains in step under `distrib_ctx`."
import json, os, subprocess, sys, textwrap, time
import pytest
import torch
from torch import nn
from dlcoders.data.load import DataLoader
from dlcoders.distributed import DistributedDL, shard_indices, free_port
from dlcoders.learner import Learner, rank_distrib, num_distrib
from dlcoders.data.load import DataLoaders

WORKER = textwrap.dedent('''
    import json, sys, torch
    from pathlib import Path
    from torch import nn
    import torch.nn.functional as F
    from dlcoders.data.load import DataLoaders
    from dlcoders.learner import Learner, load_learner
    from dlcoders.callback.core import Callback
    from dlcoders.metrics import accuracy, AccumMetric
    from dlcoders.distributed import rank_distrib
    from dlcoders.callback import schedule  # lr_find, fine_tune

    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)  # the same data in every process
    n, nv = 96, 51  # 51: the validation shares are uneven (26 and 25)
    x, xv = torch.randn(n, 4, generator=g), torch.randn(nv, 4, generator=g)
    w = torch.randn(4, 3, generator=g)
    y, yv = (x @ w).argmax(1), (xv @ w).argmax(1)

    class SeenItems(Callback):
        "The first feature of every training item, per epoch (each item's is unique)."
        def before_fit(self): self.seen = []
        def before_train(self): self.seen.append([])
        def before_batch(self):
            if self.training: self.seen[-1] += self.xb[0][:, 0].tolist()

    class Boom(Callback):
        def after_batch(self):
            if self.training and rank_distrib() == 1 and self.iter == 1: raise RuntimeError('rank 1 fails on purpose')

    def splitter(m): return [list(m[:3].parameters()), list(m[3:].parameters())]
    dls = DataLoaders.from_dsets((x, y), (xv, yv), bs=16, device='cpu')
    torch.manual_seed(rank_distrib())  # different initial weights: DDP must make them equal
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    acc_all = AccumMetric(lambda p, t: (p.argmax(-1) == t).float().mean(), flatten=False, name='acc_all')
    learn = Learner(dls, model, nn.CrossEntropyLoss(), metrics=[accuracy, acc_all], splitter=splitter, path=out, lr=1e-2)
    seen = SeenItems()
    res = {}
    with learn.distrib_ctx(timeout=60):
        if mode == 'fail': learn.fit(2, cbs=[Boom()])
        res['lr_find'] = list(learn.lr_find(num_it=6, show_plot=False))
        learn.fine_tune(1, freeze_epochs=1)
        learn.fit(2, cbs=[seen])
        res['values'] = learn.recorder.values[-1]
        res['validate'] = learn.validate()
        preds, targs = learn.get_preds()
        res['save'] = str(learn.save('final'))
        learn.export('export.pkl')  # rank 0 writes it; `load` below waits for every process
        learn.load('final')
    res['seen'] = seen.seen
    res['exported_cbs'] = [type(cb).__name__ for cb in load_learner(out/'export.pkl', trusted=True).cbs]
    res['plain_validate'] = learn.validate()  # one process, the whole validation set, the same weights
    plain_preds, plain_targs = learn.get_preds()
    res['preds_match'] = torch.allclose(preds, plain_preds, atol=1e-6) and torch.equal(targs, plain_targs)
    res['n_preds'], res['targs_in_order'] = len(preds), torch.equal(targs, yv)
    torch.save(learn.model.state_dict(), out/f'weights{rank_distrib()}.pt')
    (out/f'result{rank_distrib()}.json').write_text(json.dumps(res))
''')

def torchrun(tmp_path, mode:str, timeout:float=90):
    script = tmp_path/'worker.py'
    script.write_text(WORKER)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
           '--master_port', str(free_port()), str(script), str(tmp_path), mode]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    env.pop('RANK', None); env.pop('WORLD_SIZE', None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)

@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ddp')
    run = torchrun(tmp, 'ok')
    assert run.returncode == 0, run.stderr[-3000:]
    res = [json.loads((tmp/f'result{r}.json').read_text()) for r in range(2)]
    return tmp, run, res

def test_same_weights(two_ranks):
    tmp, _, _ = two_ranks
    w0, w1 = (torch.load(tmp/f'weights{r}.pt') for r in range(2))
    assert w0.keys() == w1.keys()
    for k in w0: assert torch.equal(w0[k], w1[k]), k  # parameters and BatchNorm statistics

def test_disjoint_halves(two_ranks):
    _, _, res = two_ranks
    s0, s1 = res[0]['seen'], res[1]['seen']
    assert len(s0) == len(s1) == 2
    for e0, e1 in zip(s0, s1):
        assert len(e0) == len(e1) == 48 and not set(e0) & set(e1) and len(set(e0) | set(e1)) == 96
    assert s0[0] != s0[1]  # reshuffled between epochs

def test_reduced_metrics_equal_one_process(two_ranks):
    _, _, res = two_ranks
    for r in res:
        # the last epoch's valid_loss, accuracy, acc_all; then validate() in the group, then alone on the whole set
        torch.testing.assert_close(torch.tensor(r['values'][1:]), torch.tensor(r['plain_validate']), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(r['validate']), torch.tensor(r['plain_validate']), atol=1e-5, rtol=1e-5)
    assert res[0]['values'] == res[1]['values']  # both processes hold the same results
    assert res[0]['lr_find'] == res[1]['lr_find']  # and stopped lr_find at the same batch

def test_get_preds_every_item_once_in_order(two_ranks):
    _, _, res = two_ranks
    for r in res: assert r['n_preds'] == 51 and r['targs_in_order'] and r['preds_match']

def test_only_rank0_prints_and_saves(two_ranks):
    tmp, run, res = two_ranks
    headers = [l for l in run.stdout.splitlines() if l.startswith('epoch')]
    assert len(headers) == 3  # fine_tune's two fits and fit(2), once each: not twice
    assert (tmp/'models'/'final.pth').exists()
    for r in res: assert 'DistributedTrainer' not in r['exported_cbs'] and 'Recorder' in r['exported_cbs']

def test_failing_rank_stops_the_other(tmp_path):
    start = time.time()
    run = torchrun(tmp_path, 'fail', timeout=90)
    assert run.returncode != 0 and 'rank 1 fails on purpose' in run.stderr
    assert time.time() - start < 80

def test_shards_in_one_process():
    # padding, shuffling and order, without processes
    for n, world in [(10, 3), (7, 2), (2, 4), (0, 2)]:
        parts = [shard_indices(n, r, world, shuffle=True, seed=3, epoch=1).tolist() for r in range(world)]
        assert len({len(p) for p in parts}) == 1 and set(sum(parts, [])) == set(range(n))
        uneven = [shard_indices(n, r, world, even=False).tolist() for r in range(world)]
        assert sum(uneven, []) == list(range(n))
    with pytest.raises(ValueError, match='rank must be'): shard_indices(4, 2, 2)

def test_distributed_dl_keeps_loader_attributes():
    x, y = torch.randn(30, 2), torch.arange(30)
    dl = DataLoader((x, y), bs=4, shuffle=True, device='cpu')
    shares = [DistributedDL(dl, rank=r, world_size=2, seed=0) for r in range(2)]
    assert [len(s) for s in shares] == [4, 4] and shares[0].bs == 4 and shares[0].device == dl.device
    ys = [torch.cat([yb for _, yb in s]) for s in shares]
    assert set(ys[0].tolist()).isdisjoint(ys[1].tolist()) and len(ys[0]) == 15

def test_alone_nothing_changes():
    assert (rank_distrib(), num_distrib()) == (0, 1)
    dls = DataLoaders.from_dsets((torch.randn(32, 2), torch.randn(32, 1)), (torch.randn(8, 2), torch.randn(8, 1)), bs=8, device='cpu')
    learn = Learner(dls, nn.Linear(2, 1), nn.MSELoss())
    with learn.no_logging(), learn.distrib_ctx():
        assert learn.dls.train is dls.train
        learn.fit(1)
    with pytest.raises(RuntimeError, match='process group'): learn.to_distributed()
