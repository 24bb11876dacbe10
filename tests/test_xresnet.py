"xresnet beyond the chapter: published sizes, shapes, zero-initialised last norms, kaiming init, vision_learner groups."
import pickle

import pytest
import torch
from torch import nn
import torchvision

from dlcoders.data.load import DataLoaders
from dlcoders.layers import ConvLayer
from dlcoders.vision.learner import vision_learner, model_meta
from dlcoders.vision.models.xresnet import (ResBlock, XResNet, init_cnn, xresnet18, xresnet34, xresnet50, xresnet101,
                                            xresnet152, xresnet_split)

ARCHS = [xresnet18, xresnet34, xresnet50, xresnet101, xresnet152]


def n_params(m): return sum(p.numel() for p in m.parameters())


def stem_difference():
    "Parameters of the xresnet stem (three 3x3 ConvLayers 3-32-32-64) minus torchvision's (7x7 conv 3-64 + its batchnorm)."
    ours = sum(n_params(ConvLayer(ni, nf)) for ni, nf in ((3, 32), (32, 32), (32, 64)))
    tv = torchvision.models.resnet50(weights=None)
    return ours - n_params(tv.conv1) - n_params(tv.bn1)


def test_xresnet50_has_the_published_size():
    # ResNet-50 has 25.6M parameters (He et al. 2015; torchvision's resnet50: 25,557,032). The xresnet50 only changes
    # the stem (the pooled 1x1 shortcut has the same weights as torchvision's strided one), so the count must be
    # torchvision's plus the stem difference, which is still 25.6M.
    n = n_params(xresnet50())
    assert n == n_params(torchvision.models.resnet50(weights=None)) + stem_difference()
    assert n == 25_576_264
    assert round(n / 1e6, 1) == 25.6


@pytest.mark.parametrize('ours,theirs', [(xresnet18, 'resnet18'), (xresnet34, 'resnet34'), (xresnet101, 'resnet101')])
def test_other_depths_match_torchvision_but_for_the_stem(ours, theirs):
    tv = getattr(torchvision.models, theirs)(weights=None)
    assert n_params(ours()) == n_params(tv) + stem_difference()


def test_n_out_and_c_in_change_only_the_ends():
    m = xresnet50(n_out=10, c_in=1)
    assert n_params(m) == n_params(xresnet50()) - 2048 * 990 - 990 - 32 * 2 * 9
    assert m(torch.randn(2, 1, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize('arch', [xresnet18, xresnet50])
@pytest.mark.parametrize('size', [32, 64, 97])
def test_output_shapes(arch, size):
    m = arch(n_out=7).eval()
    assert m(torch.randn(2, 3, size, size)).shape == (2, 7)
    # the body (all but pooling, flatten, dropout, linear) divides the grid by 32, rounding up
    expansion = 4 if arch is xresnet50 else 1
    assert m[:-4](torch.randn(1, 3, size, size)).shape == (1, 512 * expansion, -(-size // 32), -(-size // 32))


def test_1d_and_3d():
    m = XResNet(ResBlock, 1, [1, 1, 1, 1], c_in=2, n_out=5, ndim=1)
    assert m(torch.randn(3, 2, 50)).shape == (3, 5)
    m = XResNet(ResBlock, 4, [1, 1], c_in=1, n_out=3, ndim=3)
    assert m(torch.randn(2, 1, 16, 16, 16)).shape == (2, 3)


def test_last_norm_of_every_block_starts_at_zero():
    m = xresnet50()
    blocks = [b for b in m.modules() if isinstance(b, ResBlock)]
    assert len(blocks) == 16
    for b in blocks:
        last_bn = b.convs[-1][1]
        assert isinstance(last_bn, nn.BatchNorm2d) and (last_bn.weight == 0).all() and (last_bn.bias == 0).all()
        others = [l for c in b.convs[:-1] for l in c if isinstance(l, nn.BatchNorm2d)] + \
                 [l for l in b.shortcut.modules() if isinstance(l, nn.BatchNorm2d)]
        assert others and all((l.weight == 1).all() for l in others)


def test_a_new_block_is_its_shortcut():
    for block, x in ((ResBlock(1, 32, 32), torch.randn(2, 32, 8, 8)),
                     (ResBlock(1, 32, 64, stride=2), torch.randn(2, 32, 9, 9)),
                     (ResBlock(4, 16, 64, stride=2), torch.randn(2, 64, 8, 8))):
        block.eval()
        torch.testing.assert_close(block(x), torch.relu(block.shortcut(x)))
    # once trained (here: its last norm's scale set to 1), the convolutions do contribute
    block, x = ResBlock(1, 32, 32).eval(), torch.randn(2, 32, 8, 8)
    nn.init.ones_(block.convs[-1][1].weight)
    assert not torch.allclose(block(x), torch.relu(x))


def test_kaiming_init():
    m = xresnet50()
    big = m[6][0].convs[1][0]  # a 3x3 conv of stage 3: 256 in, 256 out
    fan_in = big.weight[0].numel()
    assert abs(big.weight.std().item() / (2 / fan_in) ** 0.5 - 1) < 0.02
    lin = m[-1]
    assert (lin.bias == 0).all() and abs(lin.weight.std().item() / (2 / 2048) ** 0.5 - 1) < 0.02
    # init_cnn leaves the norms alone
    bn = nn.BatchNorm2d(4)
    nn.init.constant_(bn.weight, 0.)
    init_cnn(nn.Sequential(nn.Conv2d(3, 4, 3), bn))
    assert (bn.weight == 0).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match='expansion must be 1'): ResBlock(2, 8, 8)
    with pytest.raises(ValueError, match='ks must be odd'): xresnet18(ks=4)
    with pytest.raises(ValueError, match='pretrained=False'): xresnet34(pretrained=True)


def test_pickles():
    m = xresnet18(n_out=3).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(pickle.loads(pickle.dumps(m))(x), m(x))


def tiny_dls(n=16, size=32, c=3):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, size, size, generator=g), torch.randint(0, c, (n,), generator=g)
    dls = DataLoaders.from_dsets((x[:n//2], y[:n//2]), (x[n//2:], y[n//2:]), bs=4, device='cpu')
    dls.c = c
    return dls


def test_every_xresnet_is_registered():
    for arch in ARCHS:
        assert model_meta[arch]['cut'] == -4 and model_meta[arch]['split'] is xresnet_split


def test_vision_learner_freezes_and_unfreezes_by_groups():
    learn = vision_learner(tiny_dls(), xresnet18, pretrained=False, loss_func=nn.CrossEntropyLoss())
    body, head = learn.model
    assert len(body) == 8 and isinstance(body[-1][-1], ResBlock)  # 3 stem convs, max pool, 4 stages
    assert head[0].__class__.__name__ == 'AdaptiveConcatPool2d'
    learn.create_opt()
    groups = learn.opt.param_lists
    assert [len(g) for g in groups] == [len(list(body[:6].parameters())), len(list(body[6:].parameters())),
                                         len(list(head.parameters()))]
    norm_ids = {id(p) for l in learn.model.modules() if isinstance(l, (nn.BatchNorm1d, nn.BatchNorm2d))
                for p in l.parameters()}
    def trains(g): return {p.requires_grad for p in g if id(p) not in norm_ids}
    assert [trains(g) for g in groups] == [{True}] * 3  # from scratch: nothing frozen
    learn.freeze()
    assert [trains(g) for g in groups] == [{False}, {False}, {True}]
    frozen = body[0][0].weight.detach().clone()
    bn = body[0][1].weight.detach().clone()
    head_w = head[-1].weight.detach().clone()
    learn.fit(1, 1e-2)
    assert torch.equal(body[0][0].weight, frozen)  # frozen conv untouched
    assert not torch.equal(body[0][1].weight, bn)  # batchnorm keeps training (train_bn)
    assert not torch.equal(head[-1].weight, head_w)
    learn.freeze_to(1)
    assert [trains(g) for g in groups] == [{False}, {True}, {True}]
    learn.unfreeze()
    assert all(p.requires_grad for p in learn.model.parameters())


def test_vision_learner_pretrained_xresnet_says_what_to_do():
    with pytest.raises(ValueError, match='pretrained=False'): vision_learner(tiny_dls(), xresnet18, loss_func=nn.CrossEntropyLoss())
