"""Inference speed: `Learner.predict` and `test_dl` + `get_preds` against hand-written PyTorch doing the same work.

One process, same model (`vision_learner(dls, resnet18, pretrained=False)`, 2 classes, not trained: the weights don't
change the time), same preprocessing on both sides: decode the file (`torchvision.io.decode_image`, RGB), squish to
224x224 (`transforms.v2.Resize`, antialiased), uint8 -> float / 255, normalize with ImageNet's stats, model, softmax.

  (1) latency of one item: `learn.predict(fname)` vs the hand-written path on the same file, interleaved (which one
      runs first alternates), median of --n calls (default 40) over the 150 pets photos; prints both, the ratio
      (target <= 1.05) and the difference in ms. The two must agree on the probabilities.
  (2) throughput: `learn.get_preds(dl=dls.test_dl(files, bs=64))` vs a hand-written loop over the same files in
      batches of 64 (decode + resize per item, stack, then float/normalize/model/softmax per batch), images per
      second, median of --reps (default 3), num_workers=0 on both sides.

Run from the repository root (when the machine is quiet):  python bench/predict.py [--n 40] [--reps 3] [--threads 2]
"""
import argparse, os, statistics, time
os.environ.setdefault('DLCODERS_OFFLINE', '1')
import torch
import torch.nn.functional as F
from torchvision.io import decode_image, ImageReadMode
from torchvision.transforms import v2
from dlcoders.data.external import untar_data, URLs, get_image_files
from dlcoders.vision.augment import Resize, Normalize
from dlcoders.vision.core import imagenet_stats
from dlcoders.vision.data import ImageDataLoaders
from dlcoders.vision.learner import vision_learner
from torchvision.models import resnet18

SIZE = 224

def is_cat(name): return name[0].isupper()

class Hand:
    "The hand-written inference path, with the same preprocessing as the learner's data."
    def __init__(self, model, vocab):
        self.model, self.vocab = model.eval(), vocab
        self.resize = v2.Resize((SIZE, SIZE), antialias=True)
        self.mean = torch.tensor(imagenet_stats[0]).view(1, 3, 1, 1)
        self.std = torch.tensor(imagenet_stats[1]).view(1, 3, 1, 1)

    def load(self, fn): return self.resize(decode_image(str(fn), mode=ImageReadMode.RGB, apply_exif_orientation=True))

    def batch_probs(self, xb):
        xb = (xb.float() / 255 - self.mean) / self.std
        with torch.inference_mode(): return F.softmax(self.model(xb), dim=1)

    def predict(self, fn):
        probs = self.batch_probs(self.load(fn)[None])[0]
        i = int(probs.argmax())
        return self.vocab[i], i, probs

    def batches(self, fns, bs:int=64):
        return torch.cat([self.batch_probs(torch.stack([self.load(f) for f in fns[i:i+bs]]))
                          for i in range(0, len(fns), bs)])

def timed(f, *args):
    t0 = time.perf_counter()
    res = f(*args)
    return time.perf_counter() - t0, res

def main():
    p = argparse.ArgumentParser()
    p.add_argument('--n', type=int, default=40)
    p.add_argument('--reps', type=int, default=3)
    p.add_argument('--threads', type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    path = untar_data(URLs.PETS)/'images'
    files = get_image_files(path)
    # the pets mirror has a GIF and a PNG named .jpg: torchvision's decoder reads neither, the library falls back to
    # Pillow for them; keep the JPEGs so that both sides do the same work
    files = [f for f in files if f.read_bytes()[:3] == b'\xff\xd8\xff']
    dls = ImageDataLoaders.from_name_func(path, files, is_cat, seed=42, item_tfms=Resize(SIZE, method='squish'),
                                          batch_tfms=Normalize.from_stats(*imagenet_stats), num_workers=0)
    learn = vision_learner(dls, resnet18, pretrained=False)
    hand = Hand(learn.model, dls.vocab)
    # warm up both, and check that they compute the same thing
    for f in files[:3]:
        lab, _, probs = learn.predict(f)
        hlab, _, hprobs = hand.predict(f)
        assert str(lab) == str(hlab) and torch.allclose(probs, hprobs, atol=1e-4), (probs, hprobs)

    lib_t, hand_t = [], []
    for i in range(a.n):
        f = files[i % len(files)]
        if i % 2:
            hand_t.append(timed(hand.predict, f)[0])
            lib_t.append(timed(learn.predict, f)[0])
        else:
            lib_t.append(timed(learn.predict, f)[0])
            hand_t.append(timed(hand.predict, f)[0])
    ml, mh = statistics.median(lib_t), statistics.median(hand_t)
    print(f"torch {torch.__version__}, {a.threads} threads, resnet18 (vision_learner head), {SIZE}x{SIZE}, "
          f"{len(files)} pets JPEGs")
    print(f"predict latency, median of {a.n}: learn.predict {ml*1e3:.2f} ms | hand-written {mh*1e3:.2f} ms | "
          f"ratio {ml/mh:.3f} | +{(ml-mh)*1e3:.2f} ms (target ratio <= 1.05)")

    lib_r, hand_r = [], []
    for r in range(a.reps):
        tl, (preds, _) = timed(lambda: learn.get_preds(dl=dls.test_dl(files, bs=64, num_workers=0)))
        th, hprobs = timed(hand.batches, files)
        lib_r.append(len(files) / tl)
        hand_r.append(len(files) / th)
        assert torch.allclose(preds, hprobs, atol=1e-4)
    il, ih = statistics.median(lib_r), statistics.median(hand_r)
    print(f"batch inference (bs 64, num_workers 0), median of {a.reps}: test_dl + get_preds {il:.1f} img/s | "
          f"hand-written {ih:.1f} img/s | ratio {il/ih:.3f}")

if __name__ == '__main__': main()
