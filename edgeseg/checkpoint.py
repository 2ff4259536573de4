"""Model checkpoints: a safetensors file of weights plus a small JSON of the preset.

Loading never unpickles. Every write is atomic (temp file in the same folder, then rename, the
file mode following the umask as for any new file), so an interrupted save leaves the previous
file intact.

Nothing in a checkpoint is trusted before it is checked (as safetensors checks its own header):
the JSON's preset is validated field by field; the weights file's header must name the same
preset (and, for files written by this version, hold the same preset config); every tensor's
name and shape in the header must match the network the preset builds, compared before any
memory is allocated; and the JSON's ``weights_sha256`` (written by :func:`save_model`; a JSON
without it, such as an older checkpoint, is accepted as legacy) must be the weights file's.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgeseg import files
from edgeseg.diffusion import NoiseSchedule
from edgeseg.errors import CheckpointError
from edgeseg.models import PRESETS, DermoSegDiff, Preset, build

__all__ = ["atomic_write_bytes", "atomic_write_json", "save_tensors", "save_model", "load_model", "load_preset",
           "verify_checkpoint", "file_sha256", "new_file_mode", "check_regular_file"]

MAX_JSON_BYTES = 16 << 20  # a preset JSON is a few KB


def new_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (0666 minus the umask).

    ``tempfile.mkstemp`` creates 0600 files; renamed into place they would stay private."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def check_regular_file(path: Path, what: str, error=CheckpointError) -> None:
    """`error` unless `path` is a regular file (see :func:`edgeseg.files.check_regular_file`)."""
    files.check_regular_file(path, what, error)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), new_file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any, default=None) -> None:
    """The one JSON writer: `obj` indented, written under a temporary name and renamed into place
    (a reader never sees half a file). `default` as for json.dumps (e.g. str for paths)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=default) + "\n").encode())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors.save_file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_model(model: DermoSegDiff, path: str | Path, extra: dict | None = None) -> Path:
    """Write `<path>` (.safetensors, its header holding the preset) and `<path minus suffix>.json`
    holding the preset, the weights' sha256 and `extra`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    p = model.preset
    save_tensors(path, model.state_dict(), metadata={"preset": p.name, "preset_config": json.dumps(p.to_dict())})
    extra = {k: v for k, v in (extra or {}).items() if k not in ("preset", "weights_sha256", "noise_schedule")}
    schedule = getattr(model, "noise_schedule", None) or NoiseSchedule()
    atomic_write_json(_json_path(path), {"preset": p.to_dict(), "noise_schedule": schedule.to_dict(),
                                         "weights_sha256": file_sha256(path), **extra})
    return path


def load_preset(path: str | Path) -> tuple[Preset, dict]:
    """The preset (and the rest of the JSON) stored beside a weights file, validated."""
    path = Path(path)
    meta_path = _json_path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    check_regular_file(path, "checkpoint")
    if not meta_path.exists():
        raise CheckpointError(f"{path}: no preset file {meta_path.name} beside the weights")
    check_regular_file(meta_path, "preset file")
    if meta_path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{meta_path}: preset file is {meta_path.stat().st_size} bytes, not a preset JSON")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or "preset" not in meta:
            raise ValueError("no 'preset' entry")
        return Preset.from_dict(meta["preset"]), meta
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{meta_path}: not a valid edgeseg preset file ({msg})") from None


def _header(path: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(metadata, {tensor name: shape}) from the safetensors header, no tensor data read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({' '.join(str(e).split())})") from None


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _check_against_header(path: Path, p: Preset, meta: dict) -> None:
    header_meta, shapes = _header(path)
    saved_as = header_meta.get("preset")
    if saved_as is not None and saved_as != p.name:
        raise CheckpointError(f"{path}: weights do not match preset {p.name!r} of {_json_path(path).name}: they "
                              f"were saved as preset {saved_as!r}")
    if "preset_config" in header_meta:
        try:
            stored = Preset.from_dict(json.loads(header_meta["preset_config"]))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: the preset in the weights file's header is invalid ({e})") from None
        diff = _differences({**stored.to_dict(), "note": ""}, {**p.to_dict(), "note": ""})
        if diff:
            raise CheckpointError(f"{path}: weights do not match preset {p.name!r} of {_json_path(path).name}: "
                                  f"{', '.join(diff)} {'differs' if len(diff) == 1 else 'differ'} from the "
                                  "preset saved with the weights (was the JSON edited?)")
    elif p.name in PRESETS:
        # an older file without the preset in its header: a registered preset's architecture is known
        diff = _differences(PRESETS[p.name].architecture(), p.architecture())
        if diff:
            raise CheckpointError(f"{path}: weights do not match preset {p.name!r} of {_json_path(path).name}: "
                                  f"{', '.join(diff)} {'differs' if len(diff) == 1 else 'differ'} from that "
                                  "preset's (was the JSON edited?)")
    sha = meta.get("weights_sha256")
    if sha is None:  # an older file, or a JSON whose digest was removed: loaded, but said so
        import warnings

        from edgeseg.errors import UnverifiedWeightsWarning

        warnings.warn(f"{path}: {_json_path(path).name} records no weights_sha256, so the weights are not "
                      "verified (re-save the checkpoint to record one)", UnverifiedWeightsWarning, stacklevel=2)
    else:
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise CheckpointError(f"{_json_path(path)}: weights_sha256 is not a sha256 hex digest ({sha!r})")
        if file_sha256(path) != sha:
            raise CheckpointError(f"{path}: weights do not match the sha256 recorded in {_json_path(path).name} "
                                  "(file corrupted, truncated or changed after saving)")
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build(p).state_dict().items()}
    except Exception as e:  # noqa: BLE001 - a preset that validates but cannot be built
        raise CheckpointError(f"{_json_path(path)}: preset {p.name!r} cannot be built ({e})") from None
    missing, unexpected = set(expected) - set(shapes), set(shapes) - set(expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match preset {p.name!r} "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)"
        )
    wrong = sorted(k for k in expected if expected[k] != shapes[k])
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{path}: weights do not match preset {p.name!r}: {len(wrong)} tensors have other "
                              f"shapes (e.g. {k}: {list(shapes[k])} in the file, {list(expected[k])} for the preset)")


def verify_checkpoint(path: str | Path, expect_preset: str | None = None) -> tuple[Preset, dict]:
    """Every check of :func:`load_model` that needs no network built: the preset JSON, the
    expected preset, the header's preset, the sha256 and every tensor shape. Returns
    (preset, JSON); CheckpointError naming the file otherwise."""
    path = Path(path)
    p, meta = load_preset(path)
    if expect_preset is not None and p.name != expect_preset:
        raise CheckpointError(f"{path}: checkpoint is preset {p.name!r}, expected {expect_preset!r}")
    if expect_preset is not None and expect_preset in PRESETS:
        diff = _differences(PRESETS[expect_preset].architecture(), p.architecture())
        if diff:
            raise CheckpointError(f"{path}: checkpoint claims preset {p.name!r} but its {', '.join(diff)} "
                                  f"{'differs' if len(diff) == 1 else 'differ'} from that preset's")
    _check_against_header(path, p, meta)
    return p, meta


def load_model(path: str | Path, expect_preset: str | None = None, map_location: str = "cpu") -> DermoSegDiff:
    """Rebuild the network from its preset JSON and load the safetensors weights (no pickle).

    With `expect_preset`, the checkpoint must be that preset: same name and, for a registered
    preset, the same architecture (a renamed checkpoint of another preset is refused).
    """
    path = Path(path)
    p, meta = verify_checkpoint(path, expect_preset)
    model = build(p)
    if "noise_schedule" in meta:  # older checkpoints predate it: the default schedule, which they used
        try:
            model.noise_schedule = NoiseSchedule.from_dict(meta["noise_schedule"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{_json_path(path)}: bad noise_schedule ({e})") from None
    try:
        state = load_file(str(path), device=map_location)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({' '.join(str(e).split())})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path}: weights do not match preset {p.name!r}: {first}") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight tensors hold NaN or inf (e.g. {bad[0]}); the model "
                              "was saved from a diverged run")
    return model
