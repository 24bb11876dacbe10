"""`ImageDataLoaders` / `SegmentationDataLoaders` factories on the mirror data, and `Learner.predict` on the three
kinds of input a user has at hand: a file path, a PIL image (what an upload widget delivers) and a uint8 tensor."""
import numpy as np
import pandas as pd
import pytest
import torch
import PIL.Image
from torchvision.io import decode_image, ImageReadMode

from dlcoders.data.block import MissingColumnError, parent_label
from dlcoders.data.external import URLs, get_image_files, untar_data
from dlcoders.vision.augment import Resize
from dlcoders.vision.core import PILImage
from dlcoders.vision.data import ImageDataLoaders, SegmentationDataLoaders


@pytest.fixture(scope='module')
def data(mirror, request):
    "The mirror's MNIST tiny, pets and CamVid tiny folders."
    mp = pytest.MonkeyPatch()
    mp.setenv('DLCODERS_DATA_URL', mirror.as_uri())
    request.addfinalizer(mp.undo)
    return dict(mnist=untar_data(URLs.MNIST_TINY), pets=untar_data(URLs.PETS)/'images', camvid=untar_data(URLs.CAMVID_TINY))


def is_cat(name): return name[0].isupper()
def sizes(dls): return len(dls.train_ds), len(dls.valid_ds)


@pytest.fixture(scope='module')
def learn(data):
    from torchvision.models import resnet18
    from dlcoders.vision.learner import vision_learner
    torch.manual_seed(0)
    dls = ImageDataLoaders.from_name_func(data['pets'], get_image_files(data['pets']), is_cat, seed=42,
                                          item_tfms=Resize(64), bs=16, num_workers=0)
    return vision_learner(dls, resnet18, pretrained=False)


def test_predict_path_pil_tensor_agree(learn, data):
    fn = sorted(get_image_files(data['pets']))[0]
    inputs = {'path': fn, 'str': str(fn), 'uploaded bytes as PILImage': PILImage.create(fn.read_bytes()),
              'PIL.Image.open': PIL.Image.open(fn), 'uint8 CHW tensor': decode_image(str(fn), mode=ImageReadMode.RGB)}
    res = {k: learn.predict(v) for k, v in inputs.items()}
    lbl, idx, probs = res['path']
    assert str(lbl) in ('False', 'True') and probs.shape == (2,) and int(idx) == int(probs.argmax())
    for k, (l, i, p) in res.items():
        assert (str(l), int(i)) == (str(lbl), int(idx)), k
        torch.testing.assert_close(p, probs, atol=1e-5, rtol=0, msg=k)


def test_from_folder(data):
    path = data['mnist']
    dls = ImageDataLoaders.from_folder(path, num_workers=0)
    assert isinstance(dls, ImageDataLoaders)
    assert list(dls.vocab) == ['3', '7']
    assert sizes(dls) == (len(get_image_files(path/'train')), len(get_image_files(path/'valid'))) == (709, 699)
    xb, yb = dls.one_batch()
    assert xb.shape == (64, 3, 28, 28) and yb.dtype == torch.long
    rnd = ImageDataLoaders.from_folder(path/'train', valid_pct=0.2, seed=3, num_workers=0)
    assert sizes(rnd) == (709 - 141, 141)
    assert rnd.valid_ds.items == ImageDataLoaders.from_folder(path/'train', valid_pct=0.2, seed=3).valid_ds.items


def test_label_function_factories(data):
    pets = data['pets']
    fns = get_image_files(pets)
    dls = ImageDataLoaders.from_name_func(pets, fns, is_cat, valid_pct=0.2, seed=42, item_tfms=Resize(32), num_workers=0)
    assert list(dls.vocab) == [False, True] and sizes(dls) == (120, 30)
    breeds = ['Abyssinian', 'Bengal', 'american_bulldog']
    for f, pat in ((ImageDataLoaders.from_name_re, r'^(.+)_\d+\.'), (ImageDataLoaders.from_path_re, r'/([^/]+)_\d+\.\w+$'),
                   (ImageDataLoaders.from_re, r'/([^/]+)_\d+\.\w+$')):
        d = f(pets, fns, pat, seed=42, item_tfms=Resize(32), num_workers=0)
        assert list(d.vocab) == breeds and sizes(d) == (120, 30), f.__name__
        assert d.valid_ds.items == dls.valid_ds.items  # the same seed gives the same split
    mnist = get_image_files(data['mnist']/'train')
    d = ImageDataLoaders.from_path_func(data['mnist'], mnist, parent_label, valid_pct=0.1, seed=0, num_workers=0)
    assert list(d.vocab) == ['3', '7'] and sizes(d) == (709 - 70, 70)


def test_from_df_csv_lists(data):
    path = data['mnist']
    df = pd.read_csv(path/'labels.csv')
    dls = ImageDataLoaders.from_csv(path, seed=0, num_workers=0)
    assert list(dls.vocab) == [3, 7] and sizes(dls) == (len(df) - int(0.2 * len(df)), int(0.2 * len(df)))
    df['is_valid'] = df['name'].str.startswith('valid')
    dls = ImageDataLoaders.from_df(df, path, fn_col='name', label_col='label', valid_col='is_valid', num_workers=0)
    assert sizes(dls) == (709, 699)
    x, y = dls.valid_ds[0]
    assert x.shape == (3, 28, 28) and dls.vocab[y] == int(df[df.is_valid].iloc[0]['label'])
    new = df[df.is_valid].head(5)  # test_dl takes DataFrame rows as items, like the DataFrame the loaders came from
    tdl = dls.test_dl(new, with_labels=True, num_workers=0)
    xb, yb = tdl.one_batch()
    assert xb.shape == (5, 3, 28, 28) and [dls.vocab[i] for i in yb.tolist()] == new['label'].tolist()
    assert torch.equal(xb, dls.test_dl([row for _, row in new.iterrows()], num_workers=0).one_batch()[0])
    fns = get_image_files(path/'valid')
    labels = [f'digit {f.parent.name}' for f in fns]
    dls = ImageDataLoaders.from_lists(path, fns, labels, valid_pct=0.5, seed=0, num_workers=0)
    assert list(dls.vocab) == ['digit 3', 'digit 7'] and sizes(dls) == (699 - 349, 349)
    with pytest.raises(ValueError, match='one label per file'): ImageDataLoaders.from_lists(path, fns, labels[1:])


def test_wrong_column_is_named(data):
    path = data['mnist']
    df = pd.read_csv(path/'labels.csv')
    for kw, col in (('fn_col', 'fname'), ('label_col', 'labels'), ('valid_col', 'is_valid')):
        with pytest.raises(MissingColumnError) as e: ImageDataLoaders.from_df(df, path, **{kw: col})
        assert f"{kw}={col!r}" in str(e.value) and "['name', 'label']" in str(e.value)
    with pytest.raises(KeyError, match="label_col='digit'.*the columns are \\['name', 'label'\\]"):
        ImageDataLoaders.from_csv(path, label_col='digit')
    with pytest.raises(MissingColumnError, match='fn_col=2'): ImageDataLoaders.from_df(df, path, fn_col=2)


def test_segmentation_from_label_func(data):
    path = data['camvid']
    codes = np.loadtxt(path/'codes.txt', dtype=str)
    fns = get_image_files(path/'images')
    def label_func(fn): return path/'labels'/f'{fn.stem}_P{fn.suffix}'
    dls = SegmentationDataLoaders.from_label_func(path, fns, label_func, codes=codes, seed=0, bs=4,
                                                  item_tfms=Resize((48, 64)), num_workers=0)
    assert isinstance(dls, SegmentationDataLoaders)
    assert list(dls.vocab) == list(codes) and dls.c == 32 and sizes(dls) == (80, 20)
    xb, yb = dls.one_batch()
    assert xb.shape == (4, 3, 48, 64) and yb.shape == (4, 48, 64) and yb.dtype == torch.long
    assert 0 <= yb.min() and yb.max() < len(codes)
