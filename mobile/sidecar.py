"""The JSON sidecar written next to every exported model (``<out>.json``) and its helpers.

The sidecar is the contract with the app: how to preprocess an image, what the inputs and
outputs are, which sampler settings are baked in, how to threshold, and which file it describes
(sha256 + size). Fields (all exports):

``format``, ``format_version``, ``recipe`` (export recipe version), ``target`` ("executorch" | "coreml" | "onnx"), ``file``, ``status``
("ok" or "failed"), ``preset`` (name), ``preset_config``, ``prediction_type``, ``checkpoint``,
``image_size`` [H, W], ``preprocessing`` (see :func:`preprocessing_for`), ``inputs``,
``outputs``, ``sampler``, ``steps``, ``timesteps``, ``ensemble``, ``batch``, ``threshold``,
``output_range``, ``sha256``, ``size_bytes``, ``parity`` ({"mask_dsc_vs_eager", "n_images", ...}),
``delegate_calls``, ``quantize``, ``calibration``, ``versions``, ``created``, ``contract_sha256``.

Per target: ExecuTorch names its two other files, ``etrecord`` ({"file", "sha256", "size_bytes"}:
``<out>.etrecord``, for ``edgeseg profile``) and ``bundled_program`` ({"file", "sha256",
"size_bytes", "n_images", "atol", "rtol", "basis", "verified", ...}: ``<out>.bpte``, see
:mod:`edgeseg.mobile.devtools`); CoreML adds ``compute_units``, ``training_data``,
``compute_precision``, ``structure`` (with the model's metadata); ONNX adds ``opset`` and
``execution_provider``.

``contract_sha256`` is the sha256 of the fields an app acts on (:data:`CONTRACT_FIELDS`:
preprocessing, shapes, sampler, threshold, the file's own sha256 ...), serialised as canonical
JSON (sorted keys, no spaces); a sidecar edited after export (a threshold, an image size) no
longer matches it and is refused by :class:`edgeseg.mobile.runtime.PteSegmenter`. Sidecars
written before this field existed are read without the check.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

import torch

__all__ = [
    "FORMAT", "FORMAT_VERSION", "sidecar_path", "file_digest", "versions", "preprocessing_for",
    "io_spec", "dice_masks", "read_sidecar", "now_iso", "CONTRACT_FIELDS", "contract_digest", "check_contract",
    "EXPORT_RECIPE", "student_sidecar", "write_sidecar",
]

FORMAT = "edgeseg-mobile-export"
FORMAT_VERSION = 1
# Bumped whenever the exported program changes for the same model, K and N (caches compare it).
# 2: conv-only int8 with per-step weight copies, reshape-free GroupNorm, short constant keys.
# 3: linear attention with separate q/k/v convs (k/v context first): less program memory.
# 4: XNNPACK convolutions with transient indirection buffers (workarounds.transient_conv_indirection).
# 5: int8 joins: adds, multiplies and like-range concatenations of int8 tensors stay int8.
EXPORT_RECIPE = 5


#: The sidecar fields that make up the contract with the app (hashed into ``contract_sha256``).
CONTRACT_FIELDS = (
    "format", "format_version", "recipe", "target", "file", "status", "preset", "preset_config", "prediction_type",
    "image_size", "preprocessing", "inputs", "outputs", "sampler", "steps", "timesteps", "ensemble", "batch",
    "threshold", "output_range", "quantize", "sha256", "size_bytes",
)
MAX_SIDECAR_BYTES = 4 << 20


#: Contract fields that sidecars written before them lack: hashed when present.
LATER_CONTRACT_FIELDS = ("postprocessing",)


def contract_digest(meta: dict) -> str:
    """sha256 hex of the contract fields of a sidecar, as canonical JSON."""
    body = {k: meta.get(k) for k in CONTRACT_FIELDS}
    body.update({k: meta[k] for k in LATER_CONTRACT_FIELDS if k in meta})
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_contract(meta: dict, where: str | Path) -> None:
    """EdgesegError naming `where` unless the sidecar's contract fields are unedited (when it has a
    ``contract_sha256``) and well-formed (types and ranges an app relies on)."""
    import math

    from edgeseg.errors import ExportError

    want = meta.get("contract_sha256")
    if want is not None and want != contract_digest(meta):
        raise ExportError(f"{where}: the sidecar's contract fields were changed after export (contract_sha256 "
                          "does not match); re-export the model")
    size = meta.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(_pos_int(v) for v in size)):
        raise ExportError(f"{where}: image_size must be [height, width] in pixels, got {size!r}")
    for k in ("batch", "ensemble", "steps"):
        if not _pos_int(meta.get(k)):
            raise ExportError(f"{where}: {k} must be a positive integer, got {meta.get(k)!r}")
    thr = meta.get("threshold")
    if not (isinstance(thr, (int, float)) and not isinstance(thr, bool) and math.isfinite(thr)):
        raise ExportError(f"{where}: threshold must be a finite number, got {thr!r}")
    _check_postprocessing(meta.get("postprocessing", {"mask_cleanup": "none"}), where)
    pp = meta.get("preprocessing")
    ok = isinstance(pp, dict) and isinstance(pp.get("scale"), (int, float)) and all(
        isinstance(pp.get(k), list) and len(pp[k]) == 3 and all(isinstance(x, (int, float)) for x in pp[k])
        for k in ("mean", "std"))
    if not ok or any(x == 0 for x in pp["std"]):
        raise ExportError(f"{where}: preprocessing must give a numeric scale and 3-value mean and non-zero std")


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
    for dist in ("edgeseg", "executorch", "torchao", "coremltools", "onnx", "onnxruntime", "onnxscript", "numpy"):
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
    """Per-image Dice between boolean masks (B x ...); two empty masks agree perfectly (1.0).
    An alias of :func:`edgeseg.metrics.mask_dice`."""
    from edgeseg.metrics import mask_dice

    return mask_dice(a, b)


def read_sidecar(model_path: str | Path) -> dict:
    from edgeseg.errors import EdgesegError

    p = sidecar_path(model_path)
    if not p.exists():
        raise EdgesegError(f"{model_path}: no sidecar {p.name} next to it (export it with `edgeseg export`)")
    from edgeseg.checkpoint import check_regular_file

    check_regular_file(p, "sidecar", EdgesegError)
    if p.stat().st_size > MAX_SIDECAR_BYTES:
        raise EdgesegError(f"{p}: sidecar is {p.stat().st_size} bytes, not an edgeseg export sidecar")
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgesegError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise EdgesegError(f"{p}: not an edgeseg export sidecar (not a JSON object)")
    if meta.get("format") != FORMAT:
        raise EdgesegError(f"{p}: not an edgeseg export sidecar (format {meta.get('format')!r})")
    return meta


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def student_sidecar(model, target: str, out: Path, steps: int, ensemble: int, batch: int, quantize: str,
                    checkpoint: str | None, dataset: str | None) -> dict:
    """The fields every export of the student shares (all but the file's digest, parity and versions)."""
    from edgeseg.defaults import SAMPLER_DEFAULTS
    from edgeseg.sampling import make_scheduler

    p = model.preset
    scheduler = make_scheduler("ddim", steps, p.prediction_type, "torch", getattr(model, "noise_schedule", None))
    schedule = scheduler.schedule
    s = p.image_size
    inputs, outputs = io_spec(batch, ensemble, s, s)
    dflt = SAMPLER_DEFAULTS[p.prediction_type]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "recipe": EXPORT_RECIPE,
        "target": target,
        "file": out.name,
        "status": "ok",
        "preset": p.name,
        "preset_config": p.to_dict(),
        "prediction_type": p.prediction_type,
        "checkpoint": checkpoint,
        "image_size": [s, s],
        "preprocessing": preprocessing_for(s, dataset),
        "inputs": inputs,
        "outputs": outputs,
        "sampler": {"name": "ddim", "eta": 0.0, "timestep_spacing": "trailing",
                    "num_train_timesteps": schedule.num_train_timesteps, "clip_x0": [-1.0, 1.0]},
        "noise_schedule": schedule.to_dict(),
        "steps": steps,
        "timesteps": scheduler.timesteps.tolist(),
        "ensemble": ensemble,
        "batch": batch,
        "defaults": {"steps": dflt["steps"], "ensemble": dflt["ensemble"], "provisional": dflt["provisional"]},
        "threshold": 0.0,
        "output_range": [-1.0, 1.0],
        "postprocessing": postprocessing_contract(),
        "quantize": quantize,
    }


def _check_postprocessing(post, where) -> None:
    from edgeseg.defaults import MASK_CLEANUPS
    from edgeseg.errors import ExportError

    if not (isinstance(post, dict) and post.get("mask_cleanup") in MASK_CLEANUPS):
        raise ExportError(f"{where}: postprocessing.mask_cleanup must be one of {', '.join(MASK_CLEANUPS)}, "
                          f"got {post!r}")


def postprocessing_contract() -> dict:
    """How an app turns `mean` into the photo's mask, as edgeseg.segmenter.postprocess does it."""
    from edgeseg.defaults import MASK_CLEANUP

    return {"upsample": "bilinear, the S x S mean to the photo's H x W, before thresholding",
            "mask_cleanup": MASK_CLEANUP,
            "mask_cleanup_means": {"none": "the thresholded mask as is",
                                   "largest-filled": "keep the largest 8-connected lesion, fill its holes"}[MASK_CLEANUP]}


def write_sidecar(out: Path, meta: dict, program: Path | None = None) -> dict:
    """Complete `meta` with the digest, size and versions of the finished `program` (default: the
    file at `out`), and the contract's hash; write it atomically to ``<out>.json`` and return it."""
    from edgeseg.checkpoint import atomic_write_json

    digest, size = file_digest(program or out)
    meta["sha256"], meta["size_bytes"] = digest, size
    meta["versions"] = versions()
    meta["created"] = now_iso()
    meta["contract_sha256"] = contract_digest(meta)
    atomic_write_json(sidecar_path(out), meta)
    return meta
