"""One image reader for every path that opens a photo: dataset validation and `segment`.

The rule: a regular file that Pillow decodes completely (a truncated JPEG is refused), at most
``MAX_PIXELS`` pixels (Pillow's decompression-bomb guard, reported as one line), turned as it is
displayed (its EXIF Orientation applied, so a phone photo stored rotated gives a mask of the
displayed size and orientation), 16-bit images scaled to 8 bits (not clipped), 32-bit integer
or float samples refused (they have no fixed white level), anything else converted to RGB.
PIL images given to the API go through the same conversion (:func:`pil_to_rgb`). Errors are
:class:`edgeseg.errors.ImageReadError` naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgeseg.errors import ImageReadError
from edgeseg.files import check_regular_file

__all__ = ["MAX_PIXELS", "check_image", "pil_to_rgb", "read_rgb", "resize_rgb", "write_image"]

MAX_PIXELS = 100_000_000  # a 4288 x 2848 dermatoscope photo is 12 MP


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:120] if str(e) else type(e).__name__


_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def orientation(im) -> int:
    """The EXIF Orientation of an open image (1: stored as displayed)."""
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: shown as stored, as viewers do
        return 1


def _declared_bits(im) -> int | None:
    """Bits per sample of a mode-"I" image where the file says so (PNG: 16; TIFF: its tag)."""
    if im.format == "PNG":
        return 16
    if im.format == "TIFF":
        bits = getattr(im, "tag_v2", {}).get(258)
        return int(bits[0] if isinstance(bits, tuple) else bits) if bits else None
    return None


def _to_rgb8(im, label: str, bits: int | None) -> np.ndarray:
    """`bits`: :func:`_declared_bits` of the file (a transposed copy no longer knows its format)."""
    if im.mode == "F" or (im.mode == "I" and bits != 16):
        raise ImageReadError(f"{label}: 32-bit {'float' if im.mode == 'F' else 'integer'} samples have no fixed "
                             "white level; save the photo with 8 or 16 bits per sample")
    if im.mode.startswith("I"):  # 16-bit grey: scale, do not clip
        a = np.asarray(im, dtype=np.float64)
        g = np.clip(a * (255.0 / 65535.0) + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def pil_to_rgb(im, label: str = "image") -> np.ndarray:
    """H x W x 3 uint8 RGB of a PIL image as it is displayed (EXIF orientation, 16-bit scaled)."""
    from PIL import ImageOps

    bits = _declared_bits(im)
    if orientation(im) != 1:
        im = ImageOps.exif_transpose(im)
    return _to_rgb8(im, label, bits)


def _check_header(im, label: str) -> tuple[int, int]:
    """(W, H) as displayed; ImageReadError for too many pixels or samples that cannot be shown."""
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise ImageReadError(f"{label}: image is {w}x{h} = {w * h / 1e6:.0f} megapixels, more than "
                             f"the {MAX_PIXELS / 1e6:.0f} allowed")
    if w < 1 or h < 1:
        raise ImageReadError(f"{label}: image is {w}x{h}, it has no pixels")
    if im.mode == "F" or (im.mode == "I" and _declared_bits(im) != 16):
        _to_rgb8(im, label, None)  # raises the one line
    return (h, w) if orientation(im) in _ROTATED else (w, h)


def _opened(path: Path, label: str, fn):
    """fn(open image) with every decoding failure as one ImageReadError line naming the file."""
    from PIL import Image, UnidentifiedImageError

    check_regular_file(path, "image", ImageReadError, label)
    try:
        with Image.open(path) as im:
            return fn(im)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"{label}: unreadable image (not a format Pillow can decode)") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{label}: image too large ({_short(e)})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{label}: truncated or unreadable image ({_short(e)})") from None


def check_image(path: str | os.PathLike, label: str | None = None) -> tuple[int, int]:
    """Header-only check that `path` is an image this reader can show; its displayed (W, H)."""
    path = Path(path)
    return _opened(path, label or str(path), lambda im: _check_header(im, label or str(path)))


def read_rgb(path: str | os.PathLike, draft_size: int | None = None, label: str | None = None) -> np.ndarray:
    """H x W x 3 uint8 RGB of an image file, as displayed.

    ``draft_size``: JPEGs may be decoded at a reduced scale (DCT domain) that stays at least
    this many pixels on each side, which bounds memory and time for huge photos (dataset
    caches, which resize to the model's input anyway; ``segment`` decodes at full size).
    ``label`` names the file in errors (default: the path).
    """
    path = Path(path)
    label = label or str(path)

    def decode(im) -> np.ndarray:
        _check_header(im, label)
        if draft_size and im.format == "JPEG":
            im.draft("RGB", (draft_size, draft_size))
        im.load()
        return pil_to_rgb(im, label)

    return _opened(path, label, decode)


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
