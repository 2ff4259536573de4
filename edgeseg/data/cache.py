"""Resized-once array cache.

Folder: ``$EDGESEG_CACHE`` if set, else ``~/.cache/edgeseg``. Each dataset version lives in
``<cache>/<name>-<size>px-<key>/`` with, per split, ``<split>_images.npy`` (N x H x W x 3 uint8
RGB), ``<split>_masks.npy`` (N x H x W uint8 in {0, 1}) and ``<split>_names.json`` (a JSON list:
a file name may hold a newline; older caches have ``<split>_names.txt``, one name per line). The key is a
hash of the relative file names, sizes and modification times of every image/mask (or of the
generator version and seed for ``synthetic``), so a changed folder is re-read. Arrays are
opened memory-mapped. A folder is written under a temporary name and renamed when complete,
so an interrupted build is never reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgeseg.errors import DatasetError

__all__ = ["cache_root", "cache_key", "file_key", "load_or_build"]

SPLIT_NAMES = ("train", "val", "test")


def cache_root() -> Path:
    env = os.environ.get("EDGESEG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgeseg"


def cache_key(parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_key(paths, root: Path) -> list:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(Path(p).relative_to(root)), st.st_size, st.st_mtime_ns])
    return out


def _read_names(d: Path, split: str) -> list[str]:
    js = d / f"{split}_names.json"
    if js.is_file():
        return [str(n) for n in json.loads(js.read_text())]
    # caches written before names were JSON: one name per line
    return [n for n in (d / f"{split}_names.txt").read_text().splitlines() if n]


def _complete(d: Path) -> bool:
    return (d / "meta.json").is_file()


def load_or_build(name: str, size: int, key: str, build):
    """Return {split: (images, masks, names)} from the cache, calling ``build()`` on a miss.

    ``build()`` returns {split: (images uint8 NxHxWx3, masks uint8 NxHxW, names list)}.
    """
    root = cache_root()
    d = root / f"{name}-{size}px-{key}"
    if not _complete(d):
        data = build()
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            for split, (im, m, names) in data.items():
                np.save(tmp / f"{split}_images.npy", np.ascontiguousarray(im, np.uint8))
                np.save(tmp / f"{split}_masks.npy", np.ascontiguousarray(m, np.uint8))
                # JSON, not one name per line: a file name may hold a newline
                (tmp / f"{split}_names.json").write_text(json.dumps(list(names)))
            (tmp / "meta.json").write_text(json.dumps(
                {"name": name, "size": size, "key": key,
                 "counts": {k: len(v[2]) for k, v in data.items()}}))
            try:
                os.replace(tmp, d)
            except OSError:  # another process won the race, or a stale dir is in the way
                if not _complete(d):
                    shutil.rmtree(d, ignore_errors=True)
                    os.replace(tmp, d)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    out = {}
    for split in SPLIT_NAMES:
        f = d / f"{split}_images.npy"
        if f.is_file():
            names = _read_names(d, split)
            if len(names) != len(out_images := np.load(f, mmap_mode="r")):
                raise DatasetError(f"{d}: cached {split} split has {len(out_images)} images but {len(names)} names; "
                                   "delete this cache folder to rebuild it")
            out[split] = (out_images, np.load(d / f"{split}_masks.npy", mmap_mode="r"), names)
    return out, d
