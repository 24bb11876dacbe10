"vision_learner beyond the chapter: first-conv adaptation, pretrained weights offline and without network, freezing."
import pickle, sys, types, urllib.error, warnings
from pathlib import Path

import pytest
import torch
from torch import nn
import torchvision
from torchvision.models import resnet18

from dlcoders.data.external import DownloadError
from dlcoders.data.load import DataLoaders
from dlcoders.data.core import Pipeline
from dlcoders.learner import load_learner
from dlcoders.losses import CrossEntropyLossFlat
from dlcoders.vision.learner import (Normalize, create_body, create_head, create_vision_model, default_split,
                                     imagenet_stats, vision_learner, cnn_learner, weights_file, _tv_weights)

RN18_FILE = 'resnet18-f37072fd.pth'


def tiny_dls(n=32, size=32, c=2):
    "Random RGB images in [0, 1] with random labels, as in-memory `DataLoaders` with `c` classes."
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, size, size, generator=g), torch.randint(0, c, (n,), generator=g)
    dls = DataLoaders.from_dsets((x[:n//2], y[:n//2]), (x[n//2:], y[n//2:]), bs=8, device='cpu')
    dls.c = c
    return dls


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    "An empty torch hub cache (`TORCH_HOME`) in tmp; returns its checkpoints folder."
    monkeypatch.setenv('TORCH_HOME', str(tmp_path/'torch'))
    return tmp_path/'torch'/'hub'/'checkpoints'


@pytest.fixture
def no_network(monkeypatch):
    "Any download through torch hub fails as it does on a machine without network."
    calls = []
    def fail(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', fail)
    return calls


# --- first conv adaptation -------------------------------------------------------------------------------

def test_create_body_one_channel_sums_weights():
    rn = resnet18(weights=None)
    w = rn.conv1.weight.detach().clone()
    body = create_body(rn, n_in=1, pretrained=True)
    assert body[0].weight.shape == (64, 1, 7, 7) and body[0].in_channels == 1
    torch.testing.assert_close(body[0].weight.detach(), w.sum(1, keepdim=True))
    assert body(torch.rand(2, 1, 64, 64)).shape == (2, 512, 2, 2)


def test_create_body_two_and_four_channels():
    rn = resnet18(weights=None)
    w = rn.conv1.weight.detach().clone()
    body2 = create_body(rn, n_in=2)
    torch.testing.assert_close(body2[0].weight.detach(), w[:, :2] * 1.5)
    rn = resnet18(weights=None)
    w = rn.conv1.weight.detach().clone()
    body4 = create_body(rn, n_in=4)
    assert body4[0].weight.shape == (64, 4, 7, 7)
    # the channels repeat the pretrained ones (R, G, B, R), scaled by 3/4 to keep the activations' size
    torch.testing.assert_close(body4[0].weight.detach(), torch.cat([w, w[:, :1]], 1) * 0.75)
    assert body4(torch.rand(2, 4, 64, 64)).shape == (2, 512, 2, 2)


def test_create_body_random_weights_reinitialized():
    body = create_body(resnet18(weights=None), n_in=5, pretrained=False)
    assert body[0].weight.shape == (64, 5, 7, 7) and body[0].weight.std() > 0


def test_create_body_cut_options():
    assert len(create_body(resnet18(weights=None), cut=-3)) == 7
    body = create_body(resnet18(weights=None), cut=lambda m: nn.Sequential(m.conv1, m.bn1))
    assert len(body) == 2
    with pytest.raises(TypeError, match='cut'): create_body(resnet18(weights=None), cut='layer4')
    with pytest.raises(ValueError, match='cut='): create_body(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


# --- pretrained weights: cache, offline, no network ----------------------------------------------------------

def test_weights_file_in_torch_hub_cache(torch_home):
    assert weights_file(_tv_weights(resnet18)) == torch_home/RN18_FILE


def test_offline_warns_and_uses_random_weights(torch_home, monkeypatch, no_network):
    monkeypatch.setenv('DLCODERS_OFFLINE', '1')
    dls = tiny_dls()
    with pytest.warns(UserWarning, match=RN18_FILE):
        learn = vision_learner(dls, resnet18, loss_func=CrossEntropyLossFlat())
    assert no_network == []  # offline: the network is not even tried
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    assert len(learn.recorder.values) == 1


def test_no_network_error_names_file_cache_and_fix(torch_home, monkeypatch, no_network):
    monkeypatch.delenv('DLCODERS_OFFLINE', raising=False)
    with pytest.raises(DownloadError) as exc:
        vision_learner(tiny_dls(), resnet18, loss_func=CrossEntropyLossFlat())
    msg = str(exc.value)
    assert RN18_FILE in msg and str(torch_home) in msg and 'pretrained=False' in msg
    assert no_network and no_network[0].endswith(RN18_FILE)
    assert isinstance(exc.value.__cause__, urllib.error.URLError)


def test_pretrained_false_never_downloads(torch_home, monkeypatch, no_network):
    monkeypatch.delenv('DLCODERS_OFFLINE', raising=False)
    learn = vision_learner(tiny_dls(), resnet18, pretrained=False, loss_func=CrossEntropyLossFlat())
    assert no_network == []
    assert all(p.requires_grad for p in learn.model.parameters())  # not frozen
    assert learn.dls.train.after_batch is None  # no pretrained stats to normalize with


@pytest.mark.parametrize('offline', ['1', None])
def test_cached_weights_load_even_offline(torch_home, monkeypatch, no_network, offline):
    if offline: monkeypatch.setenv('DLCODERS_OFFLINE', offline)
    else: monkeypatch.delenv('DLCODERS_OFFLINE', raising=False)
    ref = resnet18(weights=None)
    torch_home.mkdir(parents=True)
    torch.save(ref.state_dict(), torch_home/RN18_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        learn = vision_learner(tiny_dls(), 'resnet18', loss_func=CrossEntropyLossFlat())
    assert no_network == []
    torch.testing.assert_close(learn.model[0][0].weight, ref.conv1.weight)
    torch.testing.assert_close(learn.model[0][7][1].bn2.running_var, ref.layer4[1].bn2.running_var)


# --- n_out, normalization, freezing -----------------------------------------------------------------------

def test_n_out_from_dls_c_or_clear_error():
    learn = vision_learner(tiny_dls(c=3), resnet18, pretrained=False, loss_func=CrossEntropyLossFlat())
    assert learn.model[1][-1].out_features == 3
    dls = tiny_dls()
    del dls.c
    with pytest.raises(ValueError, match='n_out='):
        vision_learner(dls, resnet18, pretrained=False, loss_func=CrossEntropyLossFlat())
    learn = vision_learner(dls, resnet18, pretrained=False, n_out=4, loss_func=CrossEntropyLossFlat())
    assert learn.model[1][-1].out_features == 4


def test_normalize_added_once_and_composed(torch_home, monkeypatch):
    monkeypatch.setenv('DLCODERS_OFFLINE', '1')
    dls = tiny_dls()
    seen = []
    def spy(b):
        seen.append(b[0].mean().item())
        return b
    dls.train.after_batch = spy
    with pytest.warns(UserWarning):
        vision_learner(dls, resnet18, loss_func=CrossEntropyLossFlat())
        vision_learner(dls, resnet18, loss_func=CrossEntropyLossFlat())
    assert isinstance(dls.valid.after_batch, Normalize)  # plain tensors: found by their shape
    assert [type(f).__name__ for f in dls.train.after_batch.fs] == ['ItemTransform', 'Normalize']
    xb, yb = dls.train.one_batch()
    assert 0.4 < seen[0] < 0.6  # the earlier transform saw raw pixels
    mean, std = (torch.tensor(s)[:, None, None] for s in imagenet_stats)
    raw = dls.train.dataset.tensors[0]
    assert xb.mean().item() == pytest.approx(((raw - mean) / std).mean().item(), abs=0.1)
    assert yb.dtype == torch.int64


def test_normalize_added_to_a_pipeline(torch_home, monkeypatch):
    monkeypatch.setenv('DLCODERS_OFFLINE', '1')
    dls = tiny_dls()
    for dl in dls: dl.after_batch = Pipeline()
    dls.valid.after_batch = Pipeline([Normalize.from_stats([0.5] * 3, [0.5] * 3)])
    with pytest.warns(UserWarning):
        vision_learner(dls, resnet18, loss_func=CrossEntropyLossFlat())
    assert [type(f).__name__ for f in dls.train.after_batch.fs] == ['Normalize']
    assert len(dls.valid.after_batch.fs) == 1 and dls.valid.after_batch.fs[0].mean.flatten().tolist() == [0.5] * 3


def test_freeze_trains_head_and_batchnorm_only(torch_home, monkeypatch):
    monkeypatch.setenv('DLCODERS_OFFLINE', '1')
    with pytest.warns(UserWarning):
        learn = vision_learner(tiny_dls(), resnet18, loss_func=CrossEntropyLossFlat())
    body, head = learn.model
    is_bn = {id(p) for m in body.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert is_bn and all(p.requires_grad == (id(p) in is_bn) for p in body.parameters())
    assert all(p.requires_grad for p in head.parameters())
    conv_w = body[0].weight.detach().clone()
    head_w = head[-1].weight.detach().clone()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=1e-2)
    assert torch.equal(body[0].weight, conv_w) and not torch.equal(head[-1].weight, head_w)
    learn.unfreeze()
    assert all(p.requires_grad for p in learn.model.parameters())


def test_freeze_without_train_bn(torch_home, monkeypatch):
    monkeypatch.setenv('DLCODERS_OFFLINE', '1')
    with pytest.warns(UserWarning):
        learn = vision_learner(tiny_dls(), resnet18, train_bn=False, loss_func=CrossEntropyLossFlat())
    assert not any(p.requires_grad for p in learn.model[0].parameters())
    assert len(default_split(learn.model)) == 2 and len(learn.opt.param_lists) == 3  # resnets: see `resnet_split`


def test_export_and_load(tmp_path):
    learn = cnn_learner(tiny_dls(), resnet18, pretrained=False, loss_func=CrossEntropyLossFlat(), path=tmp_path)
    learn.dls.train.after_batch = Normalize.from_stats(*imagenet_stats)
    learn.export('vision.pkl')
    learn2 = load_learner(tmp_path/'vision.pkl')
    x = torch.rand(2, 3, 32, 32)
    learn.model.eval()
    learn2.model.eval()
    with torch.no_grad(): torch.testing.assert_close(learn2.model(x), learn.model(x))
    assert isinstance(learn2.dls.train.after_batch, Normalize)


# --- other architectures ------------------------------------------------------------------------------------

def test_torchvision_names_and_other_families():
    m = create_vision_model('mobilenet_v3_small', 2, pretrained=False)
    assert m.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 2)
    with pytest.raises(ValueError, match='not a torchvision'):
        create_vision_model('no_such_net', 2, pretrained=False)


def test_any_callable_gets_pretrained_flag():
    got = []
    def net(pretrained=True):
        got.append(pretrained)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    m = create_vision_model(net, 3, pretrained=False, lin_ftrs=[16])
    assert got == [False] and m(torch.rand(2, 3, 16, 16)).shape == (2, 3)
    m = create_vision_model(lambda: net(), 3, pretrained=True, custom_head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)))
    assert m(torch.rand(2, 3, 16, 16)).shape == (2, 3)


def test_timm_models_by_name(monkeypatch, tmp_path):
    "A name only timm knows builds its `forward_features` body (MobileNetV3 pools *before* its last conv), trains, freezes."
    timm = pytest.importorskip('timm')
    from dlcoders.vision.learner import TimmBody
    monkeypatch.setenv('HF_HOME', str(tmp_path/'hf'))
    dls = tiny_dls()
    learn = vision_learner(dls, 'mobilenetv3_small_050', pretrained=False, loss_func=CrossEntropyLossFlat())
    body = learn.model[0]
    assert type(body) is TimmBody and isinstance(body.model, timm.models.MobileNetV3)
    assert body(torch.rand(2, 3, 32, 32)).shape[1] == body.model.num_features == 288
    learn.freeze()  # the head trains, and the body's batchnorm layers (train_bn), nothing else of the body
    bn = (nn.BatchNorm2d, timm.layers.BatchNormAct2d)
    frozen = [p.requires_grad for m in body.modules() if not isinstance(m, bn) for p in m.parameters(recurse=False)]
    assert frozen and not any(frozen) and all(p.requires_grad for p in learn.model[1].parameters())
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    grey = create_vision_model('resnet10t', 4, pretrained=False, n_in=1)
    assert grey.eval()(torch.rand(2, 1, 32, 32)).shape == (2, 4)


def test_timm_weights_offline(monkeypatch, tmp_path):
    "No network: DLCODERS_OFFLINE warns and starts from random weights; without it, an error naming source, cache and fix."
    timm = pytest.importorskip('timm')
    import huggingface_hub.constants as hfc
    monkeypatch.setattr(hfc, 'HF_HUB_OFFLINE', True)  # fail at once, as a machine without network does after retries
    monkeypatch.setattr(hfc, 'HF_HUB_CACHE', str(tmp_path/'hf'/'hub'))
    monkeypatch.setenv('DLCODERS_OFFLINE', '1')
    dls = tiny_dls()
    with pytest.warns(UserWarning, match='mobilenetv3_small_050'):
        vision_learner(dls, 'mobilenetv3_small_050', loss_func=CrossEntropyLossFlat())
    cfg = timm.models.get_pretrained_cfg('mobilenetv3_small_050')
    assert dls.train.after_batch.std.flatten().tolist() == pytest.approx(list(cfg.std))  # the weights' own stats
    monkeypatch.delenv('DLCODERS_OFFLINE')
    with pytest.raises(DownloadError) as exc:
        vision_learner(tiny_dls(), 'mobilenetv3_small_050', loss_func=CrossEntropyLossFlat())
    msg = str(exc.value)
    assert 'timm/mobilenetv3_small_050' in msg and str(tmp_path/'hf'/'hub') in msg and 'pretrained=False' in msg


def test_resnets_get_three_parameter_groups(torch_home):
    "ResNets split as fastai does (stem + stages 1-2 / stages 3-4 / head): a slice spreads over three groups."
    learn = vision_learner(tiny_dls(), resnet18, pretrained=False, loss_func=CrossEntropyLossFlat())
    learn.create_opt()
    assert len(learn.opt.hypers) == 3
    learn.opt.set_hyper('lr', slice(1e-5, 1e-3))
    assert [h['lr'] for h in learn.opt.hypers] == pytest.approx([1e-5, 1e-4, 1e-3])
    learn.freeze()
    body = learn.model[0]
    assert not any(p.requires_grad for p in body[6].parameters() if p.ndim > 1)  # a frozen stage (bn excepted)
    learn.unfreeze()
    assert all(p.requires_grad for p in learn.model.parameters())
    custom = vision_learner(tiny_dls(), resnet18, pretrained=False, cut=-3, loss_func=CrossEntropyLossFlat())
    custom.create_opt()
    assert len(custom.opt.hypers) == 2  # a custom cut falls back to body / head
