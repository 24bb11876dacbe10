"Points and boxes follow their pixels: a drawn dot (or box outline) and its coordinates go through the same transforms."
import numpy as np
import PIL.Image
import pytest
import torch
from torchvision import tv_tensors
from dlcoders.data.block import DataBlock, RandomSplitter
from dlcoders.torch_core import set_seed
from dlcoders.vision.core import (ImageBlock, PointBlock, BBoxBlock, BBoxLblBlock, PointScaler, typed_like, bb_pad,
                                  create_bboxes)
from dlcoders.vision.augment import (Resize, RandomResizedCrop, Flip, Rotate, Zoom, Warp, AffineCoordTfm, aug_transforms,
                                     setup_aug_tfms, rotate_mat, zoom_mat, flip_mat, warp_mat)
from dlcoders.losses import BCEWithLogitsLossFlat, MSELossFlat
from dlcoders.metrics import accuracy_multi

N, H, W = 8, 64, 80

def _dots(n=N, h=H, w=W, seed=0):
    "Images with one bright 3x3 dot each, away from the edges, and the dots' centres in pixel coordinates."
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(h // 4, 3 * h // 4, (n,), generator=g)
    cols = torch.randint(w // 4, 3 * w // 4, (n,), generator=g)
    x = torch.zeros(n, 3, h, w)
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())): x[i, :, r - 1:r + 2, c - 1:c + 2] = 1.
    # a pixel (row r, column c) covers [c, c+1) x [r, r+1): its centre is (c + 0.5, r + 0.5)
    pts = torch.stack([cols + 0.5, rows + 0.5], -1)[:, None].float()
    return tv_tensors.Image(x), typed_like(pts, tv_tensors.KeyPoints, canvas_size=(h, w))

def _centroid(img:torch.Tensor) -> torch.Tensor:
    "Brightness-weighted centre (x, y) of an image [c, h, w], in pixel coordinates."
    m = img[0].clamp(min=0)
    ys, xs = torch.meshgrid(torch.arange(m.shape[0]) + 0.5, torch.arange(m.shape[1]) + 0.5, indexing='ij')
    return torch.stack([(m * xs).sum(), (m * ys).sum()]) / m.sum()

def _tfm(fs, size=None): return AffineCoordTfm(fs, size=size, pad_mode='zeros')

CASES = {'flip': [flip_mat], 'rotate': [rotate_mat], 'zoom': [zoom_mat], 'warp': [warp_mat],
         'all': [flip_mat, rotate_mat, zoom_mat, warp_mat]}
KW = {flip_mat: dict(p=1.), rotate_mat: dict(max_deg=40, p=1.), zoom_mat: dict(min_zoom=1.1, max_zoom=1.4, p=1.),
      warp_mat: dict(magnitude=0.3, p=1.)}

@pytest.mark.parametrize('name', list(CASES))
@pytest.mark.parametrize('size', [None, (48, 56)])
def test_point_lands_on_its_dot(name, size):
    from functools import partial
    x, pts = _dots()
    tfm = _tfm([partial(f, **KW[f]) for f in CASES[name]], size=size)
    set_seed(1)
    xa, pa = tfm((x, pts), split_idx=0)
    out_hw = size or (H, W)
    assert xa.shape[-2:] == out_hw and pa.canvas_size == out_hw
    moved = (pa - pts).abs().amax()
    assert moved > 1  # the transform really moved the points
    for i in range(N):
        assert xa[i].sum() > 1, "the dot left the picture"
        torch.testing.assert_close(pa[i, 0], _centroid(xa[i]), atol=0.6, rtol=0)

def _outline(n, h, w, boxes):
    "Images with the 1-pixel outline of one box each (`boxes` [n, 4] integer pixel edges x0, y0, x1, y1)."
    x = torch.zeros(n, 3, h, w)
    for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        x[i, :, y0, x0:x1] = x[i, :, y1 - 1, x0:x1] = 1.
        x[i, :, y0:y1, x0] = x[i, :, y0:y1, x1 - 1] = 1.
    return tv_tensors.Image(x)

@pytest.mark.parametrize('name', list(CASES))
def test_box_holds_its_outline(name):
    from functools import partial
    g = torch.Generator().manual_seed(2)
    x0, y0 = torch.randint(16, 28, (N,), generator=g), torch.randint(14, 22, (N,), generator=g)
    x1, y1 = x0 + torch.randint(12, 24, (N,), generator=g), y0 + torch.randint(10, 20, (N,), generator=g)
    b = torch.stack([x0, y0, x1, y1], -1).float()
    x = _outline(N, H, W, b)
    box = typed_like(b[:, None], tv_tensors.BoundingBoxes, format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(H, W))
    set_seed(3)
    xa, ba = _tfm([partial(f, **KW[f]) for f in CASES[name]])((x, box), split_idx=0)
    assert not torch.equal(ba, box)
    for i in range(N):
        ys, xs = torch.where(xa[i, 0] > 0.3)
        # the edges of the bright pixels are the box's edges (pixel columns xs cover [xs, xs + 1))
        seen = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        torch.testing.assert_close(ba[i, 0], seen, atol=1.5, rtol=0)

def test_points_through_a_data_block(tmp_path):
    "Item resizing, then flips, rotations, zooms and warps on the batch: the decoded point stays on the drawn dot."
    rng = np.random.default_rng(0)
    fns, where = [], {}
    for i in range(12):
        h, w = int(rng.integers(60, 90)), int(rng.integers(60, 90))
        r, c = int(rng.integers(h // 3, 2 * h // 3)), int(rng.integers(w // 3, 2 * w // 3))
        a = np.zeros((h, w, 3), np.uint8)
        a[r - 2:r + 3, c - 2:c + 3] = 255
        fn = tmp_path/f'{i}.png'
        PIL.Image.fromarray(a).save(fn)
        fns.append(fn)
        where[fn.name] = [c + 0.5, r + 0.5]
    for item_tfm in (Resize(64, method='squish'), Resize(64, method='pad', pad_mode='zeros'), Resize(64),
                     RandomResizedCrop(64, min_scale=0.8)):
        dblock = DataBlock(blocks=(ImageBlock, PointBlock), get_y=lambda fn: [where[fn.name]],
                           splitter=RandomSplitter(0.25, seed=0), item_tfms=item_tfm,
                           batch_tfms=aug_transforms(size=48, max_rotate=30, max_warp=0, pad_mode='zeros',
                                                     max_lighting=0))
        dls = dblock.dataloaders(fns, bs=9, num_workers=0)
        set_seed(4)
        xb, yb = dls.train.one_batch()
        assert xb.shape == (9, 3, 48, 48) and yb.shape == (9, 1, 2)
        assert yb.abs().max() <= 1.5  # scaled to [-1, 1] across the picture
        dx, px = dls.train.decode((xb, yb))  # back to uint8 pixels and points in pixels
        assert isinstance(px, tv_tensors.KeyPoints) and px.canvas_size == (48, 48)
        for i in range(len(xb)):
            if dx[i].sum() < 255: continue  # a random crop may cut the dot off
            torch.testing.assert_close(px[i, 0].as_subclass(torch.Tensor), _centroid(dx[i].float()), atol=0.5, rtol=0)

def test_boxes_padded_and_labelled():
    "Variable numbers of boxes per image become one padded batch; padding boxes are zeros labelled '#na#'."
    items = [(tv_tensors.Image(torch.zeros(3, 8, 8, dtype=torch.uint8)),
              create_bboxes([[0, 0, 4, 4]] * k), torch.arange(1, k + 1)) for k in (1, 3, 2)]
    out = bb_pad(items)
    assert [len(o[1]) for o in out] == [3, 3, 3]
    assert (out[0][1][1:] == 0).all() and out[0][2].tolist() == [1, 0, 0] and out[2][2].tolist() == [1, 2, 0]
    assert isinstance(out[0][1], tv_tensors.BoundingBoxes)

def test_multilabel_loss_and_metric():
    x = torch.randn(16, 5) * 3
    y = (torch.rand(16, 5) > 0.6).float()
    by_hand = -torch.where(y == 1, x.sigmoid(), 1 - x.sigmoid()).log().mean()
    torch.testing.assert_close(BCEWithLogitsLossFlat()(x, y), by_hand, atol=1e-5, rtol=1e-5)
    assert accuracy_multi(x, y, thresh=0.5) == ((x > 0) == y.bool()).float().mean()
    assert accuracy_multi(torch.full((4, 3), -10.), torch.zeros(4, 3)) == 1.
    with pytest.raises(Exception): accuracy_multi(x, y[:, :4])


def test_non_finite_point_or_box_is_a_clear_error_naming_the_item(tmp_path):
    "A NaN target (say, from a mask that marks nothing) fails when the item is read, naming the file and the value."
    files = []
    for i in range(4):
        f = tmp_path/f'img{i}.png'
        PIL.Image.fromarray(np.full((8, 10, 3), 40 * i, dtype=np.uint8)).save(f)
        files.append(f)
    centres = {f.name: (float('nan'), float('nan')) if f.name == 'img2.png' else (3., 4.) for f in files}
    dsets = DataBlock(blocks=(ImageBlock, PointBlock), get_y=lambda f: [centres[f.name]],
                      splitter=lambda items: (list(range(len(items))), [])).datasets(files)
    assert dsets.train[0][1].tolist() == [[3., 4.]]
    with pytest.raises(ValueError, match='finite') as ei:
        dsets.train[2]
    assert 'img2.png' in ' '.join(getattr(ei.value, '__notes__', [])) or not hasattr(ei.value, 'add_note')
    assert 'nan' in str(ei.value)
    boxes = DataBlock(blocks=(ImageBlock, BBoxBlock), get_y=lambda f: [[0., 0., float('inf'), 2.]],
                      splitter=lambda items: (list(range(len(items))), []))
    with pytest.raises(Exception, match=r'(?s)items\[0\].*img0\.png.*BBoxBlock.*finite'):
        boxes.datasets(files)  # the block's check of the first item already reports it, with the item
