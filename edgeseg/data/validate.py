"""Full validation pass: every image and mask decoded and checked before training starts.

Loading a real dataset runs it while building the cache (a cached folder has been validated
already: the cache key changes with any file), so a bad file never surfaces hours into a run.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from edgeseg.errors import DatasetError
from edgeseg.files import check_regular_file
from edgeseg.imageio import check_image, read_rgb, resize_rgb

__all__ = ["read_pair", "read_all", "validate_dataset"]


def _open(path: Path, root: Path, what: str):
    """Open a mask: a regular file (a named pipe would block), at most MAX_PIXELS pixels."""
    from PIL import Image, UnidentifiedImageError

    from edgeseg.imageio import MAX_PIXELS, orientation

    label = _rel(path, root)
    check_regular_file(path, what, DatasetError, label)
    try:
        im = Image.open(path)
        orig = im.size
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{label}: {what} too large ({_short(e)})") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(f"{label}: unreadable {what} ({_short(e)})") from None
    if orig[0] * orig[1] > MAX_PIXELS:
        im.close()
        raise DatasetError(f"{label}: {what} is {orig[0]}x{orig[1]} = {orig[0] * orig[1] / 1e6:.0f} megapixels, "
                           f"more than the {MAX_PIXELS / 1e6:.0f} allowed")
    if orientation(im) != 1:  # masks are read as displayed, like their photos
        from PIL import ImageOps

        try:
            with im:
                im.load()
                im = ImageOps.exif_transpose(im)
        except (OSError, ValueError, SyntaxError) as e:
            raise DatasetError(f"{label}: truncated or unreadable {what} ({_short(e)})") from None
        orig = im.size
    return im, orig


def _rel(p: Path, root: Path) -> str:
    try:
        return str(Path(p).relative_to(root))
    except ValueError:
        return str(p)


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:120] if str(e) else type(e).__name__


def read_pair(image: Path, mask: Path, size: int, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode, check and resize one pair: (size x size x 3 uint8 RGB, size x size uint8 {0,1})."""
    rgb = read_rgb(image, draft_size=2 * size, label=_rel(image, root))
    isz = check_image(image, _rel(image, root))  # the displayed size, before any draft decoding
    mk, msz = _open(mask, root, "mask")
    try:
        m = np.asarray(mk.convert("L") if mk.mode not in ("L", "1", "P", "I", "I;16") else mk)
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{_rel(mask, root)}: truncated or unreadable mask ({_short(e)})") from None
    if m.ndim == 3:
        m = m[..., 0]
    if msz != isz:
        raise DatasetError(f"{_rel(mask, root)}: mask is {msz[0]}x{msz[1]} but its image "
                           f"{_rel(image, root)} is {isz[0]}x{isz[1]}")
    vals = np.unique(m)
    if vals.size > 2:
        raise DatasetError(f"{_rel(mask, root)}: mask is not binary, it has {vals.size} distinct "
                           f"values (expected 2, e.g. 0 and 255)")
    m01 = (m > vals.min()).astype(np.uint8) if vals.size == 2 else (
        np.full(m.shape, 1 if vals[0] > 0 else 0, np.uint8))
    rgb = resize_rgb(rgb, size)
    m01 = cv2.resize(m01, (size, size), interpolation=cv2.INTER_NEAREST)
    return rgb, m01


def read_all(pairs, size: int, root: Path, workers: int | None = None):
    """Decode every pair (threads: Pillow releases the GIL while decoding)."""
    n = len(pairs)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)

    def job(i):
        images[i], masks[i] = read_pair(pairs[i].image, pairs[i].mask, size, root)

    workers = workers or min(8, os.cpu_count() or 1)
    if workers > 1 and n > 8:
        with ThreadPoolExecutor(workers) as ex:
            for _ in ex.map(job, range(n)):
                pass
    else:
        for i in range(n):
            job(i)
    return images, masks


def validate_dataset(name: str, data_dir=None, size: int = 128) -> dict:
    """Validate a whole dataset (building its cache); returns {split: count}.

    Raises DatasetError on the first problem, naming the file.
    """
    from edgeseg.data import load_dataset

    return {s: len(load_dataset(name, s, data_dir=data_dir, size=size)) for s in
            ("train", "val", "test")}
