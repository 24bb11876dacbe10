"Bad and odd image files, EXIF, modes, Resize sizes, and batch augmentation that keeps masks, points and boxes aligned."
import os
from functools import partial
from pathlib import Path
import numpy as np
import PIL.Image
import pytest
import torch
from torchvision import tv_tensors
from dlcoders.data.block import DataBlock, CategoryBlock, RandomSplitter
from dlcoders.data.core import Datasets, Categorize, TensorImage, TensorMask
from dlcoders.data.external import untar_data, URLs, get_image_files
from dlcoders.torch_core import set_seed
from dlcoders.vision.core import (PILImage, PILImageBW, PILMask, ImageBlock, MaskBlock, PointBlock, BBoxBlock,
                                  BBoxLblBlock, ImageReadError, verify_images, verify_image, typed_like, image2tensor)
from dlcoders.vision.augment import (Resize, RandomResizedCrop, CropPad, RandomCrop, aug_transforms, setup_aug_tfms,
                                     Rotate, Zoom, Flip, Normalize, IntToFloatTensor, imagenet_stats, AffineCoordTfm)

@pytest.fixture(scope='module')
def pets():
    os.environ.setdefault('DLCODERS_OFFLINE', '1')
    return untar_data(URLs.PETS)/'images'

def _magic(fn) -> bytes: return Path(fn).read_bytes()[:4]

def _photo(seed=0, h=48, w=64):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)

@pytest.fixture
def bad_files(tmp_path, pets):
    data = next(fn for fn in get_image_files(pets) if _magic(fn).startswith(b'\xff\xd8')).read_bytes()
    (tmp_path/'truncated.jpg').write_bytes(data[:len(data) // 2])
    (tmp_path/'text.jpg').write_text('not an image at all')
    PIL.Image.fromarray(_photo()).save(tmp_path/'good.jpg')
    return tmp_path

def test_disguised_files_load(pets):
    odd = [fn for fn in get_image_files(pets) if not _magic(fn).startswith(b'\xff\xd8')]
    assert len(odd) == 2 and {_magic(fn)[:3] for fn in odd} == {b'GIF', b'\x89PN'}
    for fn in odd:
        im = PILImage.create(fn)
        assert im.mode == 'RGB'
        t = PILImage.create_tensor(fn)
        assert type(t) is TensorImage and t.shape == (3, *im.shape)
        assert torch.equal(t, image2tensor(im))

def test_verify_images_reports_bad_files(bad_files, pets):
    fns = sorted(bad_files.iterdir()) + list(get_image_files(pets))
    bad = verify_images(fns)
    assert sorted(f.name for f in bad) == ['text.jpg', 'truncated.jpg']
    assert verify_image(bad_files/'good.jpg')

@pytest.mark.parametrize('name', ['truncated.jpg', 'text.jpg'])
def test_bad_file_during_training_names_it(bad_files, name):
    fns = [bad_files/'good.jpg'] * 4 + [bad_files/name]
    dblock = DataBlock(blocks=(ImageBlock, CategoryBlock), get_y=lambda fn: 'cat' if fn.name == 'good.jpg' else 'dog',
                       splitter=lambda items: (list(range(len(items))), [0]), item_tfms=Resize(32))
    with pytest.raises(Exception) as e:
        dls = dblock.dataloaders(fns, bs=5, num_workers=0, shuffle_train=False)
        for _ in dls.train: pass
    assert name in str(e.value)
    assert 'PIL' not in type(e.value).__module__
    # the error also names the file when it is met in a worker process
    ds = Datasets([bad_files/name], [[PILImage.create_tensor], [lambda fn: 'x', Categorize()]])
    dl = ds.dataloaders(bs=1, num_workers=1, shuffle_train=False, persistent_workers=False).train
    with pytest.raises(Exception, match=name.replace('.', r'\.')): next(iter(dl))
    with pytest.raises(ImageReadError, match='text'): PILImage.create(bad_files/'text.jpg')

def test_exif_orientation_applied(tmp_path):
    a = _photo(1, 30, 50)
    im = PIL.Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path/'rot.jpg', exif=exif, quality=95)
    assert PILImage.create(tmp_path/'rot.jpg').shape == (50, 30)
    assert PILImage.create_tensor(tmp_path/'rot.jpg').shape == (3, 50, 30)

@pytest.mark.parametrize('mode', ['L', 'P', 'RGBA', 'LA', 'CMYK'])
def test_modes_convert_to_rgb(tmp_path, mode):
    im = PIL.Image.fromarray(_photo(2)).convert(mode)
    fn = tmp_path/('x.jpg' if mode == 'CMYK' else 'x.png')
    im.save(fn)
    pil = PILImage.create(fn)
    assert pil.mode == 'RGB'
    t = PILImage.create_tensor(fn)
    assert t.shape == (3, 48, 64) and t.dtype == torch.uint8
    assert (t.int() - image2tensor(pil).int()).abs().max() <= 1
    assert PILImageBW.create_tensor(fn).shape == (1, 48, 64)

def test_mask_keeps_values(tmp_path):
    m = np.random.default_rng(0).integers(0, 5, (20, 30)).astype(np.uint8)
    im = PIL.Image.fromarray(m, mode='L').convert('P')
    im.save(tmp_path/'m.png')
    t = PILMask.create_tensor(tmp_path/'m.png')
    assert type(t) is TensorMask and t.shape == (20, 30)
    assert torch.equal(t, torch.from_numpy(np.asarray(PIL.Image.open(tmp_path/'m.png'))))

@pytest.mark.parametrize('method', ['crop', 'squish', 'pad'])
@pytest.mark.parametrize('size', [64, (48, 80)])
def test_resize_sizes(method, size):
    x = tv_tensors.Image(torch.from_numpy(_photo(3, 100, 150)).permute(2, 0, 1))
    msk = tv_tensors.Mask(torch.randint(0, 4, (100, 150), dtype=torch.uint8))
    hw = (size, size) if isinstance(size, int) else size
    for split in (0, 1):
        xr, mr = Resize(size, method=method)((x, msk), split_idx=split)
        assert xr.shape == (3, *hw) and mr.shape == hw
        assert type(xr) is tv_tensors.Image and type(mr) is tv_tensors.Mask
        assert set(mr.unique().tolist()) <= set(range(4))  # nearest neighbour: no new values
    pil = PILImage.create(_photo(3, 100, 150))
    out = Resize(size, method=method)(pil, split_idx=1)
    assert type(out) is PILImage and out.shape == hw
    for tfm in (RandomResizedCrop(size), CropPad(size), RandomCrop(size)):
        assert tfm(x, split_idx=0).shape == (3, *hw)

def test_resize_crop_random_on_train_only():
    x = tv_tensors.Image(torch.arange(100 * 200, dtype=torch.float32).reshape(1, 100, 200))
    tfm = Resize(50)
    valid = {tfm(x, split_idx=1).sum().item() for _ in range(5)}
    train = {tfm(x, split_idx=0).sum().item() for _ in range(10)}
    assert len(valid) == 1 and len(train) > 1

def test_mask_aligned_through_batch_augmentation():
    n, h, w = 6, 64, 80
    x = torch.zeros(n, 3, h, w)
    x[:, :, 20:40, 25:50] = 1.
    x = tv_tensors.Image(x)
    msk = tv_tensors.Mask((x[:, 0] > 0.5).long())
    pts = typed_like(torch.tensor([[25., 20.], [50., 40.]]).repeat(n, 1, 1), tv_tensors.KeyPoints, canvas_size=(h, w))
    box = typed_like(torch.tensor([[25., 20., 50., 40.]]).repeat(n, 1, 1), tv_tensors.BoundingBoxes,
                     format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(h, w))
    set_seed(0)
    tfm = setup_aug_tfms([Rotate(max_deg=30, p=1.), Zoom(min_zoom=1.1, max_zoom=1.3, p=1.), Flip(p=0.5)])
    assert len(tfm) == 1
    xa, ma, pa, ba = tfm[0]((x, msk, pts, box), split_idx=0)
    assert not torch.equal(xa, x)
    thresh = (xa[:, 0] > 0.5).long()
    # away from the square's blurred edges, the mask is the thresholded image
    edge = (xa[:, 0] > 0.05) & (xa[:, 0] < 0.95)
    near = torch.nn.functional.max_pool2d(edge[:, None].float(), 3, 1, 1)[:, 0] > 0
    assert torch.equal(thresh[~near], ma[~near])
    assert (thresh == ma).float().mean() > 0.99
    assert pa.canvas_size == (h, w) and ba.canvas_size == (h, w)
    for i in range(n):
        ys, xs = torch.where(xa[i, 0] > 0.5)
        # the moved box holds the moved square
        x0, y0, x1, y1 = ba[i, 0].tolist()
        assert x0 - 1 <= xs.min() and xs.max() + 1 <= x1 + 1 and y0 - 1 <= ys.min() and ys.max() + 1 <= y1 + 1
        # the moved corner points stay on the edge of the square
        for px, py in pa[i].tolist():
            r, c = int(round(py - 0.5)), int(round(px - 0.5))
            if 1 <= r < h - 1 and 1 <= c < w - 1: assert xa[i, 0, r - 1:r + 2, c - 1:c + 2].max() > 0.5

def test_aug_transforms_one_pass_device_seed():
    tfms = aug_transforms(size=32, min_scale=0.75)
    assert [type(t).__name__ for t in tfms] == ['AffineCoordTfm', 'LightingTfm']
    x = tv_tensors.Image(torch.rand(8, 3, 48, 48))
    calls = []
    orig = torch.nn.functional.grid_sample
    def counting(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)
    torch.nn.functional.grid_sample = counting
    try:
        set_seed(1)
        out1 = x
        for t in tfms: out1 = t(out1, split_idx=0)
    finally: torch.nn.functional.grid_sample = orig
    assert len(calls) == 1
    assert out1.shape == (8, 3, 32, 32) and out1.dtype == torch.float32 and out1.device == x.device
    assert type(out1) is tv_tensors.Image and 0 <= out1.min() and out1.max() <= 1
    set_seed(1)
    out2 = x
    for t in tfms: out2 = t(out2, split_idx=0)
    assert torch.equal(out1, out2)
    # validation: only the centre crop at `size`, the same every time
    v1, v2 = (tfms[1](tfms[0](x, split_idx=1), split_idx=1) for _ in range(2))
    assert v1.shape == (8, 3, 32, 32) and torch.equal(v1, v2)
    assert tfms[0](x, split_idx=1) is not x and aug_transforms()[0](x, split_idx=1) is x

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_aug_transforms_on_gpu():
    x = tv_tensors.Image(torch.rand(4, 3, 48, 48, device='cuda'))
    out = x
    for t in aug_transforms(size=32): out = t(out, split_idx=0)
    assert out.device.type == 'cuda' and out.shape == (4, 3, 32, 32)

def test_normalize_decodes():
    norm = Normalize.from_stats(*imagenet_stats)
    x = tv_tensors.Image(torch.rand(2, 3, 8, 8))
    y = norm(x)
    assert type(y) is tv_tensors.Image
    assert torch.allclose(y.mean((0, 2, 3)), (0.5 - torch.tensor(imagenet_stats[0])) / torch.tensor(imagenet_stats[1]), atol=0.3)
    assert torch.allclose(norm.decode(y), x, atol=1e-6)
    i2f = IntToFloatTensor()
    u = tv_tensors.Image(torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8))
    assert torch.equal(i2f.decode(norm.decode(norm(i2f(u)))), u)
    assert norm(torch.rand(2)).shape == (2,)  # plain tensors (labels) pass through

def test_segmentation_and_point_blocks(tmp_path):
    fns = []
    for i in range(4):
        PIL.Image.fromarray(_photo(i, 40, 60)).save(tmp_path/f'{i}.jpg')
        PIL.Image.fromarray((np.arange(40 * 60).reshape(40, 60) % 3).astype(np.uint8)).save(tmp_path/f'{i}_m.png')
        fns.append(tmp_path/f'{i}.jpg')
    seg = DataBlock(blocks=(ImageBlock, MaskBlock(codes=['a', 'b', 'c'])), get_y=lambda fn: fn.parent/f'{fn.stem}_m.png',
                    splitter=RandomSplitter(0.5, seed=0), item_tfms=Resize(32), batch_tfms=aug_transforms())
    dls = seg.dataloaders(fns, bs=2, num_workers=0)
    xb, yb = dls.one_batch()
    assert xb.shape == (2, 3, 32, 32) and yb.shape == (2, 32, 32) and yb.dtype == torch.long
    assert dls.c == 3 and list(dls.vocab) == ['a', 'b', 'c']
    pts = DataBlock(blocks=(ImageBlock, PointBlock), get_y=lambda fn: [[30., 20.]], splitter=RandomSplitter(0.5, seed=0),
                    item_tfms=Resize(32, method='squish'))
    xb, yb = pts.dataloaders(fns, bs=2, num_workers=0).valid.one_batch()
    assert yb.shape == (2, 1, 2) and torch.allclose(yb, torch.zeros(2, 1, 2), atol=1e-5)  # the centre is (0, 0)
    boxes = {fn: ([[0., 0., 30., 20.]] * (i + 1), ['x'] * (i + 1)) for i, fn in enumerate(fns)}
    bb = DataBlock(blocks=(ImageBlock, BBoxBlock, BBoxLblBlock), n_inp=1, get_y=[lambda fn: boxes[fn][0], lambda fn: boxes[fn][1]],
                   splitter=lambda items: (list(range(4)), [0]), item_tfms=Resize(32, method='squish'))
    dls = bb.dataloaders(fns, bs=4, num_workers=0, shuffle_train=False)
    xb, bxs, lbls = dls.train.one_batch()
    assert bxs.shape == (4, 4, 4) and lbls.shape == (4, 4)
    assert torch.allclose(bxs[0, 0], torch.tensor([-1., -1., 0., 0.]), atol=1e-5) and (bxs[0, 1:] == 0).all()
    assert (lbls[0, 1:] == 0).all() and (lbls[3] > 0).all()

def test_missing_and_empty_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere'): PILImage.create_tensor(tmp_path/'nowhere.jpg')
    (tmp_path/'empty.jpg').write_bytes(b'')
    with pytest.raises(ImageReadError, match=r'empty\.jpg'): PILImage.create_tensor(tmp_path/'empty.jpg')

def test_kept_batches_are_never_overwritten():
    "Batch transforms reuse freed CPU memory (`BatchBuffers`): batches kept by the caller must keep their values."
    from dlcoders.data.core import TfmdDL
    imgs = torch.randint(0, 256, (64, 3, 96, 96), dtype=torch.uint8)  # 16 per batch: 1.8 MB of floats, so pooled
    ds = Datasets(list(range(64)), [[lambda i: tv_tensors.Image(imgs[i])], [lambda i: i % 2]])
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    dl = TfmdDL(ds, bs=16, after_batch=[IntToFloatTensor(), Normalize.from_stats(mean, std)], device='cpu', num_workers=0)
    want = (imgs.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    for _ in range(2):
        kept = [xb for xb, _ in dl]  # every batch of the pass is still referenced
        assert len({xb.data_ptr() for xb in kept}) == len(kept) == 4
        assert torch.allclose(torch.cat(kept), want, atol=1e-6)
        del kept
    assert 0 < len(dl._buffers) <= dl._buffers.n
    ptrs = [xb.data_ptr() for xb, _ in dl]  # each batch dropped at once: the pool's memory comes round again
    assert len(set(ptrs)) < len(ptrs)
