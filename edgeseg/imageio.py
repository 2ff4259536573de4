"""One image reader for every path that opens a photo: dataset validation and `segment`.

The rule: a regular file that Pillow decodes completely (a truncated JPEG is refused), at most
``MAX_PIXELS`` pixels (Pillow's decompression-bomb guard, reported as one line), 16-bit images
scaled to 8 bits (not clipped), anything else converted to RGB. Errors are
:class:`edgeseg.errors.ImageReadError` naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgeseg.errors import ImageReadError
from edgeseg.files import check_regular_file

__all__ = ["MAX_PIXELS", "read_rgb", "resize_rgb"]

MAX_PIXELS = 100_000_000  # a 4288 x 2848 dermatoscope photo is 12 MP


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:120] if str(e) else type(e).__name__


def _to_rgb8(im) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale, do not clip
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        g = np.clip(a * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def read_rgb(path: str | os.PathLike, draft_size: int | None = None, label: str | None = None) -> np.ndarray:
    """H x W x 3 uint8 RGB of an image file.

    ``draft_size``: JPEGs may be decoded at a reduced scale (DCT domain) that stays at least
    this many pixels on each side, which bounds memory and time for huge photos.
    ``label`` names the file in errors (default: the path).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    label = label or str(path)
    check_regular_file(path, "image", ImageReadError, label)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageReadError(f"{label}: image is {w}x{h} = {w * h / 1e6:.0f} megapixels, more than "
                                     f"the {MAX_PIXELS / 1e6:.0f} allowed")
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            im.load()
            return _to_rgb8(im)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"{label}: unreadable image (not a format Pillow can decode)") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{label}: image too large ({_short(e)})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{label}: truncated or unreadable image ({_short(e)})") from None


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """The model's input resize (bilinear to size x size, aspect ratio ignored, as in training)."""
    import cv2

    if rgb.shape[:2] == (size, size):
        return np.ascontiguousarray(rgb)
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)


def write_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an H x W (grey) or H x W x 3 (RGB) uint8 image atomically; the format follows the
    suffix. Any failure is one :class:`edgeseg.errors.EdgesegError` line naming the file."""
    import cv2

    from edgeseg.checkpoint import atomic_write_bytes
    from edgeseg.errors import EdgesegError

    path = Path(path)
    arr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    try:
        ok, buf = cv2.imencode(path.suffix or ".png", arr)
    except cv2.error:
        ok = False
    if not ok:
        raise EdgesegError(f"{path}: cannot encode an image with suffix {path.suffix!r} (use .png or .jpg)")
    try:
        atomic_write_bytes(path, buf.tobytes())
    except OSError as e:
        raise EdgesegError(f"{path}: cannot write ({e.strerror or e})") from None
    return path
