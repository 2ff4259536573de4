"""The JSON sidecar written next to every exported model (``<out>.json``) and its helpers.

The sidecar is the contract with the app: how to preprocess an image, what the inputs and
outputs are, which sampler settings are baked in, how to threshold, and which file it describes
(sha256 + size). Fields (all exports):

``format``, ``format_version``, ``recipe`` (export recipe version), ``target`` ("executorch" | "coreml"), ``file``, ``status``
("ok" or "failed"), ``preset`` (name), ``preset_config``, ``prediction_type``, ``checkpoint``,
``image_size`` [H, W], ``preprocessing`` (see :func:`preprocessing_for`), ``inputs``,
``outputs``, ``sampler``, ``steps``, ``timesteps``, ``ensemble``, ``batch``, ``threshold``,
``output_range``, ``sha256``, ``size_bytes``, ``parity`` ({"mask_dsc_vs_eager", "n_images", ...}),
``delegate_calls``, ``quantize``, ``calibration``, ``versions``, ``created``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

import torch

__all__ = [
    "FORMAT", "FORMAT_VERSION", "sidecar_path", "file_digest", "versions", "preprocessing_for",
    "io_spec", "dice_masks", "read_sidecar", "now_iso",
]

FORMAT = "edgeseg-mobile-export"
FORMAT_VERSION = 1


def sidecar_path(out: str | Path) -> Path:
    """``model.pte`` -> ``model.pte.json`` (the suffix is appended, never replaced)."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def file_digest(path: str | Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of a file, or of a directory such as a ``.mlpackage``.

    For a directory: the size is the sum of its files; the hash runs over its regular files in
    sorted order of their relative POSIX paths, feeding for each ``relpath``, a NUL byte, the
    file's length as 8 little-endian bytes, then its bytes (so renames and moves change it).
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest(), path.stat().st_size
    if not path.is_dir():
        raise FileNotFoundError(path)
    total = 0
    for p in sorted((q for q in path.rglob("*") if q.is_file()), key=lambda q: q.relative_to(path).as_posix()):
        size = p.stat().st_size
        h.update(p.relative_to(path).as_posix().encode() + b"\0" + size.to_bytes(8, "little"))
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        total += size
    return h.hexdigest(), total


def versions() -> dict[str, str | None]:
    """Versions of the packages that shaped the exported file."""
    from importlib import metadata

    out: dict[str, str | None] = {"torch": torch.__version__}
    for dist in ("edgeseg", "executorch", "torchao", "coremltools", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def preprocessing_for(image_size: int, dataset: str | None = None) -> dict:
    """How an RGB photo becomes the ``image`` input, exactly as edgeseg.data produces it.

    edgeseg.data decodes to 8-bit RGB, resizes once to size x size (OpenCV INTER_LINEAR,
    i.e. bilinear), and hands the model ``uint8 / 255`` as float32, channels first; there is no
    mean/std normalisation (mean 0, std 1 below, so ``(x/255 - mean) / std`` is the identity).
    """
    return {
        "channel_order": "RGB",
        "layout": "NCHW",
        "dtype": "float32",
        "resize": {"width": image_size, "height": image_size, "interpolation": "bilinear",
                   "implementation": "cv2.resize INTER_LINEAR", "keep_aspect_ratio": False},
        "scale": 1.0 / 255.0,
        "value_range": [0.0, 1.0],
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "formula": "x = (rgb_uint8 / 255 - mean) / std",
        "dataset": dataset,
    }


def io_spec(batch: int, ensemble: int, h: int, w: int) -> tuple[list[dict], list[dict]]:
    inputs = [
        {"name": "image", "shape": [batch, 3, h, w], "dtype": "float32",
         "description": "preprocessed RGB image(s), see preprocessing"},
        {"name": "noise", "shape": [batch * ensemble, 1, h, w], "dtype": "float32",
         "description": "initial x_T, i.i.d. standard normal; rows b*N..b*N+N-1 belong to image b"},
    ]
    outputs = [
        {"name": "mean", "shape": [batch, 1, h, w], "dtype": "float32", "range": [-1.0, 1.0],
         "description": "ensemble-averaged soft mask in [-1, 1]; lesion where mean > threshold "
                        "((mean + 1) / 2 is a [0, 1] soft mask, threshold 0.5)"},
        {"name": "std", "shape": [batch, 1, h, w], "dtype": "float32", "range": [0.0, 1.0],
         "description": "per-pixel population std of the ensemble (uncertainty map)"},
    ]
    return inputs, outputs


def dice_masks(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image Dice between boolean masks (B x ...); two empty masks agree perfectly (1.0)."""
    a = a.reshape(a.shape[0], -1).bool()
    b = b.reshape(b.shape[0], -1).bool()
    inter = (a & b).sum(1).double()
    tot = (a.sum(1) + b.sum(1)).double()
    return torch.where(tot == 0, torch.ones_like(tot), 2 * inter / tot.clamp(min=1))


def read_sidecar(model_path: str | Path) -> dict:
    from edgeseg.errors import EdgesegError

    p = sidecar_path(model_path)
    if not p.exists():
        raise EdgesegError(f"{model_path}: no sidecar {p.name} next to it (export it with `edgeseg export`)")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise EdgesegError(f"{p}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise EdgesegError(f"{p}: not an edgeseg export sidecar (format {meta.get('format')!r})")
    return meta


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
