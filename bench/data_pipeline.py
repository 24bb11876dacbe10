"""Images per second from folders of real JPEGs: `DataBlock(...).dataloaders(...)` against a hand-written
`torch.utils.data.DataLoader` doing the same work (decode with `torchvision.io.decode_image`, resize to 224×224 with
`transforms.v2.Resize`, stack into batches of 64), at the same number of workers.

Also, on the pets images: `ImageDataLoaders.from_name_func(item_tfms=Resize(224))`, and the same with
`batch_tfms=aug_transforms()`, against the hand-written loader followed by the float conversion (and, for the
augmented one, by a per-batch `transforms.v2` flip + affine + colour jitter).

Run from the repository root:  python bench/data_pipeline.py [--reps 5] [--workers 0 2]
Target: the DataBlock pipeline reaches at least 0.95× the hand-written one's images per second. `ImageBlock` also
turns the uint8 batch into floats in [0, 1] (a batch transform, in the main process), which the hand-written loader
does not; the bench also times the hand-written loader followed by that conversion, to compare the same work.
The DataBlock side uses `ImageBlock` (`dlcoders.vision.core`) and `Resize(224, method='squish')`
(`dlcoders.vision.augment`) when they exist, else a `TransformBlock` built from a small decode function.
"""
import argparse, os, statistics, time
from pathlib import Path
os.environ.setdefault('DLCODERS_OFFLINE', '1')
import torch
import torch.utils.data as tud
from torchvision import tv_tensors
from torchvision.io import decode_image, ImageReadMode
from torchvision.transforms import v2
from dlcoders.data.external import untar_data, URLs, get_image_files
from dlcoders.data.block import DataBlock, TransformBlock, CategoryBlock, FuncSplitter, parent_label, RegexLabeller, using_attr
from dlcoders.data.core import Transform

BS, SIZE = 64, 224

try:
    from dlcoders.vision.core import ImageBlock
    from dlcoders.vision.augment import Resize
    IMAGE_PATH = 'dlcoders.vision ImageBlock + Resize(224, squish)'
    def image_block(): return ImageBlock()
    def resize(): return Resize(SIZE, method='squish')
except ImportError:
    IMAGE_PATH = 'TransformBlock(decode_image function) + v2 resize function'
    def open_image(fn) -> tv_tensors.Image: return tv_tensors.Image(decode_image(str(fn), mode=ImageReadMode.RGB))
    def resize_image(x: tv_tensors.Image): return v2.functional.resize(x, [SIZE, SIZE], antialias=True)
    def image_block(): return TransformBlock(type_tfms=open_image)
    def resize(): return Transform(resize_image)

class HandDataset(tud.Dataset):
    "What a user would write by hand: decode, resize, label index."
    def __init__(self, files, labels):
        self.files, self.labels = files, labels
        self.resize = v2.Resize((SIZE, SIZE))
    def __len__(self): return len(self.files)
    def __getitem__(self, i):
        return self.resize(decode_image(str(self.files[i]), mode=ImageReadMode.RGB)), self.labels[i]

def hand_loader(files, label_func, nw):
    names = [label_func(f) for f in files]
    vocab = sorted(set(names))
    ds = HandDataset(files, [vocab.index(n) for n in names])
    return tud.DataLoader(ds, batch_size=BS, shuffle=True, num_workers=nw, persistent_workers=nw > 0)

def datablock_loader(files, label_func, nw):
    db = DataBlock(blocks=(image_block(), CategoryBlock), get_items=lambda _: files, get_y=label_func,
                   splitter=FuncSplitter(lambda o: False), item_tfms=resize())
    dls = db.dataloaders(None, bs=BS, num_workers=nw, persistent_workers=nw > 0, device='cpu')
    return dls.train.new(shuffle=True, drop_last=False)  # every item, like the hand-written loader

def datablock_uint8_loader(files, label_func, nw):
    "The DataBlock doing exactly the hand-written loader's work: decode, resize, batch (no float conversion)."
    from dlcoders.vision.core import PILImage
    db = DataBlock(blocks=(TransformBlock(type_tfms=PILImage.create_tensor), CategoryBlock), get_items=lambda _: files,
                   get_y=label_func, splitter=FuncSplitter(lambda o: False), item_tfms=resize())
    dls = db.dataloaders(None, bs=BS, num_workers=nw, persistent_workers=nw > 0, device='cpu')
    return dls.train.new(shuffle=True, drop_last=False)

def factory_loader(files, nw, augment=False):
    "`ImageDataLoaders.from_name_func` with `Resize(224)` (and `aug_transforms()` on the batch when `augment`)."
    from dlcoders.vision.data import ImageDataLoaders
    from dlcoders.vision.augment import aug_transforms
    dls = ImageDataLoaders.from_name_func(files[0].parent, files, label_func=_breed, valid_pct=0.01, seed=0,
                                          item_tfms=Resize(SIZE, method='squish'),
                                          batch_tfms=aug_transforms() if augment else None,
                                          bs=BS, num_workers=nw, persistent_workers=nw > 0, device='cpu')
    return dls.train.new(shuffle=True, drop_last=False)

def _breed(name:str) -> str: return name.rsplit('_', 1)[0]

HAND_AUG = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=10, scale=(1.0, 1.1)),
                       v2.ColorJitter(brightness=0.2, contrast=0.2)])

def epoch_rate(dl, to_float:bool=False, augment:bool=False) -> float:
    "Images per second over one pass (`to_float`: convert each batch to floats in [0, 1], as a model needs)."
    start, n = time.perf_counter(), 0
    for xb, yb in dl:
        if to_float: xb = xb.float().div_(255)
        if augment: xb = HAND_AUG(xb)
        n += len(xb)
    return n / (time.perf_counter() - start)

def datasets():
    pets = get_image_files(untar_data(URLs.PETS)/'images')
    nette = get_image_files(untar_data(URLs.IMAGENETTE_160)/'train')
    return {'pets (150 files, ~500×375, ×2)': (pets * 2, using_attr(RegexLabeller(r'^(.+)_\d+\.jpg$'), 'name')),
            'imagenette2-160 train (200 files, 224×224, ×3)': (nette * 3, parent_label)}

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--workers', type=int, nargs='+', default=[0, 2])
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    print(f"DataBlock image path: {IMAGE_PATH}\n")
    for name, (files, label_func) in datasets().items():
        for nw in args.workers:
            hand = hand_loader(files, label_func, nw)
            # the hand-written loader, as specified (uint8 batches), and followed by the uint8 -> float conversion
            # that `ImageBlock`'s batch transform does (so that both deliver what a model needs)
            runs = {'hand-written': (hand, False, False), 'hand-written + float': (hand, True, False),
                    'DataBlock uint8': (datablock_uint8_loader(files, label_func, nw), False, False),
                    'DataBlock': (datablock_loader(files, label_func, nw), False, False)}
            if name.startswith('pets'):
                runs['from_name_func'] = (factory_loader(files, nw), False, False)
                runs['hand + float + v2 aug'] = (hand, True, True)
                runs['from_name_func + aug_transforms'] = (factory_loader(files, nw, augment=True), False, False)
            for dl, to_float, aug in runs.values(): epoch_rate(dl, to_float, aug)  # warm up (workers, caches)
            rates = {k: [] for k in runs}
            for _ in range(args.reps):  # interleaved, so that a change in the machine's load hits all of them
                for k, (dl, to_float, aug) in runs.items(): rates[k].append(epoch_rate(dl, to_float, aug))
            med = {k: statistics.median(v) for k, v in rates.items()}
            print(f"{name}, num_workers={nw}:\n    " + ', '.join(f"{k} {v:.0f}" for k, v in med.items()) + " img/s\n"
                  f"    same work: DataBlock uint8 / hand-written {med['DataBlock uint8'] / med['hand-written']:.3f}, "
                  f"DataBlock / (hand-written + float) {med['DataBlock'] / med['hand-written + float']:.3f}")
            if 'from_name_func' in med:
                print(f"    from_name_func / (hand-written + float) {med['from_name_func'] / med['hand-written + float']:.3f}, "
                      f"+ aug_transforms / (hand + float + v2 aug) "
                      f"{med['from_name_func + aug_transforms'] / med['hand + float + v2 aug']:.3f}")
            del runs, hand

if __name__ == '__main__': main()
