#!/usr/bin/env python
"""Build an offline mirror of the dataset host, like the one CI uses, from the public host.

    python tools/build_mirror.py DEST [--source-base URL]

Downloads each archive the tests and notebooks use into `DEST/<bucket>/<file>.tgz`: the small sample archives
as they are, and the three large ones (Oxford-IIIT Pet, Imagenette 160px, MNIST as PNGs) cut down to the same
sizes as CI's mirror. Then writes `DEST/SHA256SUMS`. Run it again to finish an interrupted build: archives that
are present and match `SHA256SUMS` are skipped. Point the library at the result with `DLCODERS_DATA_URL=DEST`.
"""
from __future__ import annotations
import argparse, gzip, os, re, sys, tarfile, tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: use the package beside us
from dlcoders.data.external import PUBLIC_BASE, URLs, DownloadError, download_url, file_sha256, parse_sha256sums


def rel_path(url:str) -> str:
    "Where `url` of the public host lives inside a mirror: `<bucket>/<file>`."
    return url[len(PUBLIC_BASE)+1:]


AS_IS = [rel_path(u) for u in (URLs.MNIST_SAMPLE, URLs.MNIST_TINY, URLs.ADULT_SAMPLE, URLs.IMDB_SAMPLE,
                               URLs.ML_SAMPLE, URLs.CAMVID_TINY, URLs.HUMAN_NUMBERS, URLs.COCO_TINY)]


# ---------------------------------------------------------------- choosing the subsets
# A `pick_*` function gets the paths of an archive's files below its top-level folder and returns those to keep;
# a `trim_*` function then cuts the kept text files (lists, csv) down to the rows about the kept data.

PET_BREEDS = ('Abyssinian', 'Bengal', 'american_bulldog')  # two cats and a dog
PET_LISTS = ('annotations/list.txt', 'annotations/trainval.txt', 'annotations/test.txt')


def file_number(path:str) -> int:
    "The number that ends a file's name: `images/Bengal_12.jpg` -> 12, `testing/3/42.png` -> 42."
    return int(re.search(r'(\d+)$', PurePosixPath(path).stem).group(1))


def pet_breed(name:str) -> str:
    "The breed in a pet image name: `american_bulldog_12` -> `american_bulldog`."
    return name.rsplit('_', 1)[0]


def pick_pets(paths:list, n_per_breed:int=50, breeds:tuple=PET_BREEDS) -> list:
    "The `n_per_breed` lowest-numbered images of each breed, their trimaps and xmls where they exist, the lists."
    present = set(paths)
    keep = [p for p in ('annotations/README', *PET_LISTS) if p in present]
    for breed in breeds:
        images = [p for p in paths if re.fullmatch(rf'images/{re.escape(breed)}_\d+\.jpg', p)]
        for image in sorted(images, key=file_number)[:n_per_breed]:
            stem = PurePosixPath(image).stem
            extras = (f'annotations/trimaps/{stem}.png', f'annotations/xmls/{stem}.xml')
            keep += [image] + [p for p in extras if p in present]
    return keep


def trim_pet_lists(folder:Path, kept:list, breeds:tuple=PET_BREEDS):
    "Keep the rows of the split lists that are about `breeds` (header comments go too), as CI's mirror does."
    for name in PET_LISTS:
        f = folder/name
        if not f.exists(): continue
        rows = f.read_text().splitlines(keepends=True)
        f.write_text(''.join(r for r in rows if r.split() and pet_breed(r.split()[0]) in breeds))


def pick_imagenette(paths:list, n_train:int=20, n_valid:int=10) -> list:
    "The first `n_train` train and `n_valid` val files of each class in sorted order, and the labels csv."
    keep = [p for p in paths if p == 'noisy_imagenette.csv']
    for split, n in (('train', n_train), ('val', n_valid)):
        by_class = defaultdict(list)
        for p in paths:
            parts = p.split('/')
            if len(parts) == 3 and parts[0] == split and not parts[2].startswith('.'): by_class[parts[1]].append(p)
        for cls in sorted(by_class): keep += sorted(by_class[cls])[:n]
    return keep


def trim_imagenette_csv(folder:Path, kept:list):
    "Keep the header and the rows of `noisy_imagenette.csv` about the kept images, in their original order."
    f = folder/'noisy_imagenette.csv'
    if not f.exists(): return
    header, *rows = f.read_text().splitlines(keepends=True)
    kept = set(kept)
    f.write_text(header + ''.join(r for r in rows if r.split(',', 1)[0] in kept))


def pick_mnist_png(paths:list, n_train:int=8000, n_test:int=2000) -> list:
    "The first `n_train` training and `n_test` testing images in sorted order of their number (MNIST's order)."
    keep = []
    for split, n in (('training', n_train), ('testing', n_test)):
        images = [p for p in paths if p.startswith(f'{split}/') and p.endswith('.png')]
        keep += sorted(images, key=file_number)[:n]
    return keep


@dataclass
class Recipe:
    "How to cut a large archive down: which files to keep, and how to trim the text files that list them."
    pick: Callable  # (paths below the top folder, **sizes) -> paths to keep
    trim: Callable|None = None  # (extracted top folder, kept paths) -> None


SUBSETS = {rel_path(URLs.PETS): Recipe(pick_pets, trim_pet_lists),
           rel_path(URLs.IMAGENETTE_160): Recipe(pick_imagenette, trim_imagenette_csv),
           rel_path(URLs.MNIST): Recipe(pick_mnist_png)}

ARCHIVES = sorted(AS_IS + list(SUBSETS))


# ---------------------------------------------------------------- cutting and packing

EPOCH = 1577836800  # 2020-01-01: fixed dates and owners make a rebuilt archive byte-for-byte the same


def split_top(name:str) -> tuple:
    "An archive member's name as (top-level folder, path below it)."
    parts = PurePosixPath(name).parts
    return parts[0], '/'.join(parts[1:])


def cut_down(src:Path, dest:Path, recipe:Recipe, **sizes) -> int:
    "Write to `dest` the part of the archive `src` that `recipe` keeps, under the same top folder; return its size."
    with tarfile.open(src) as t:
        files = [m for m in t.getmembers() if m.isfile()]
        tops = {split_top(m.name)[0] for m in files}
        if len(tops) != 1: raise ValueError(f'{src} has {len(tops)} top-level folders, expected one: {sorted(tops)}')
        top = tops.pop()
        kept = recipe.pick(sorted(split_top(m.name)[1] for m in files), **sizes)
        wanted = set(kept)
        with tempfile.TemporaryDirectory(prefix='.cut-', dir=dest.parent) as tmp:
            # in archive order: going back in a gzip stream means decompressing it again from the start
            t.extractall(tmp, members=[m for m in files if split_top(m.name)[1] in wanted], filter='data')
            if recipe.trim: recipe.trim(Path(tmp)/top, kept)
            pack(Path(tmp)/top, dest)
    return len(kept)


def _normalize(info:tarfile.TarInfo) -> tarfile.TarInfo:
    "Give an archive member a fixed date, owner and permissions."
    info.mtime, info.uid, info.gid, info.uname, info.gname = EPOCH, 0, 0, '', ''
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def pack(folder:Path, dest:Path):
    "Write `folder` (as the top-level folder) to the gzipped tar `dest`, reproducibly and atomically."
    part = dest.with_name(dest.name + '.part')
    with open(part, 'wb') as f, gzip.GzipFile(filename='', mode='wb', fileobj=f, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode='w', format=tarfile.PAX_FORMAT) as t:
            for p in [folder, *sorted(folder.rglob('*'))]:
                t.add(p, arcname=str(PurePosixPath(folder.name, *p.relative_to(folder).parts)),
                      recursive=False, filter=_normalize)
    os.replace(part, dest)


# ---------------------------------------------------------------- the mirror


def read_sums(dest:Path) -> dict:
    "The checksums `dest/SHA256SUMS` records, or none."
    f = dest/'SHA256SUMS'
    return parse_sha256sums(f.read_text()) if f.exists() else {}


def write_sums(dest:Path, sums:dict):
    "Write `dest/SHA256SUMS` (`<sha256>  <bucket>/<file>`, sorted by path) atomically."
    part = dest/'SHA256SUMS.part'
    part.write_text(''.join(f'{sums[rel]}  {rel}\n' for rel in sorted(sums)))
    os.replace(part, dest/'SHA256SUMS')


def is_done(dest:Path, rel:str, sums:dict) -> bool:
    "True when the archive `rel` is in the mirror and matches its recorded checksum."
    return (dest/rel).is_file() and sums.get(rel) == file_sha256(dest/rel)


def as_url(base:str) -> str:
    "A source base as a URL: a plain folder path becomes a `file://` URL."
    return (base if '://' in base else Path(base).expanduser().resolve().as_uri()).rstrip('/')


def fetch(rel:str, dest:Path, source_base:str, sizes:dict, show_progress:bool) -> str:
    "Put the archive `rel` into the mirror `dest`, as it is or cut down; return what was done."
    url, target = f'{source_base}/{rel}', dest/rel
    if rel not in SUBSETS:
        download_url(url, target, show_progress=show_progress)
        return f'copied {target.stat().st_size:,} bytes'
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='.download-', dir=dest) as tmp:
        full = download_url(url, Path(tmp)/target.name, show_progress=show_progress)
        n = cut_down(full, target, SUBSETS[rel], **sizes.get(rel, {}))
    return f'cut down to {n:,} files, {target.stat().st_size:,} bytes'


def build_mirror(dest:Path, # the mirror folder to create or complete
                 source_base:str=PUBLIC_BASE, # the host to copy from (URL or folder)
                 sizes:dict|None=None, # per archive, keyword arguments for its `pick_*` (default: CI's sizes)
                 show_progress:bool=True): # show download progress bars
    "Build the dataset mirror in `dest` (skipping archives already there and intact); return `dest`."
    dest, source_base = Path(dest), as_url(source_base)
    dest.mkdir(parents=True, exist_ok=True)
    sums = read_sums(dest)
    for rel in ARCHIVES:
        if is_done(dest, rel, sums):
            print(f'skipped {rel}: present and matching SHA256SUMS')
            continue
        print(f'{rel}: {fetch(rel, dest, source_base, sizes or {}, show_progress)}', flush=True)
        sums[rel] = file_sha256(dest/rel)
        write_sums(dest, sums)  # after each archive, so that an interrupted build keeps what it finished
    print(f'wrote {dest/"SHA256SUMS"}; use the mirror with DLCODERS_DATA_URL={dest.resolve()}')
    return dest


def main(argv:list|None=None):
    "Command line entry point."
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('dest', type=Path, help='folder to build the mirror in')
    parser.add_argument('--source-base', default=PUBLIC_BASE, help=f'host to copy from (default {PUBLIC_BASE})')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    args = parser.parse_args(argv)
    try:
        build_mirror(args.dest, args.source_base, show_progress=not args.quiet)
    except (DownloadError, tarfile.TarError, ValueError) as e:
        sys.exit(f'build_mirror: {e}')


if __name__ == '__main__': main()
