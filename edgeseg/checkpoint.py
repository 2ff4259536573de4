"""Model checkpoints: a safetensors file of weights plus a small JSON of the preset.

Loading never unpickles. Every write is atomic (temp file in the same folder, then rename),
so an interrupted save leaves the previous file intact.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgeseg.errors import CheckpointError
from edgeseg.models import DermoSegDiff, Preset, build

__all__ = ["atomic_write_bytes", "atomic_write_json", "save_tensors", "save_model", "load_model", "load_preset"]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors.save_file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_model(model: DermoSegDiff, path: str | Path, extra: dict | None = None) -> Path:
    """Write `<path>` (.safetensors) and `<path minus suffix>.json` holding the preset (+ extra)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    save_tensors(path, model.state_dict(), metadata={"preset": model.preset.name})
    atomic_write_json(_json_path(path), {"preset": model.preset.to_dict(), **(extra or {})})
    return path


def load_preset(path: str | Path) -> tuple[Preset, dict]:
    """The preset (and the rest of the JSON) stored beside a weights file."""
    path = Path(path)
    meta_path = _json_path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not meta_path.exists():
        raise CheckpointError(f"{path}: no preset file {meta_path.name} beside the weights")
    try:
        meta = json.loads(meta_path.read_text())
        return Preset.from_dict(meta["preset"]), meta
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: not a valid edgeseg preset file ({e})") from None


def load_model(path: str | Path, expect_preset: str | None = None, map_location: str = "cpu") -> DermoSegDiff:
    """Rebuild the network from its preset JSON and load the safetensors weights (no pickle)."""
    path = Path(path)
    p, _ = load_preset(path)
    if expect_preset is not None and p.name != expect_preset:
        raise CheckpointError(f"{path}: checkpoint is preset {p.name!r}, expected {expect_preset!r}")
    model = build(p)
    try:
        state = load_file(str(path), device=map_location)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match preset {p.name!r} "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path}: weights do not match preset {p.name!r}: {first}") from None
    return model
