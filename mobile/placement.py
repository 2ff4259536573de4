"""Where an export's files land: the output checks, fresh temporary names beside the output,
and the one-step move into place that never clobbers a file it was not allowed to replace."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from edgeseg.errors import ExportError
from edgeseg.mobile import sidecar as sc

__all__ = ["ARTEFACTS", "artefact_path", "check_output", "incomplete_set", "place", "temp_path", "write_temp", "failed_path"]

_KINDS = {".pte": "an ExecuTorch program", ".mlpackage": "a CoreML ML program", ".onnx": "an ONNX model"}
#: Files written beside the model, named by appending the suffix (``m.pte`` -> ``m.pte.bpte``).
ARTEFACTS = {".pte": {".etrecord": "an ETRecord", ".bpte": "a bundled program"}}


def artefact_path(out: str | Path, suffix: str) -> Path:
    """``model.pte`` + ``.bpte`` -> ``model.pte.bpte`` (appended, like the sidecar's ``.json``)."""
    out = Path(out)
    return out.with_name(out.name + suffix)


def check_output(out: Path, ext: str, overwrite: bool) -> None:
    """ExportError unless `out`, its sidecar ``<out>.json`` and its other artefacts (a .pte's
    ``.etrecord`` and ``.bpte``) may be written: the right suffix, not taken (unless `overwrite`;
    the leftovers of an incomplete set, :func:`incomplete_set`, are replaced), and of a kind that
    can be replaced (a .pte or .onnx is a file, a .mlpackage a folder)."""
    kind = _KINDS.get(ext, "a model")
    if out.suffix != ext:
        raise ExportError(f"{out}: {kind} must end in {ext}")
    paths = {out: kind, sc.sidecar_path(out): "a sidecar"}
    paths.update({artefact_path(out, sfx): what for sfx, what in ARTEFACTS.get(ext, {}).items()})
    incomplete = incomplete_set(out)
    for path, what_for in paths.items():
        if not (path.exists() or path.is_symlink()):
            continue
        if not overwrite and not incomplete:
            raise ExportError(f"{path} exists; pass --overwrite to replace it (or choose another --out)")
        want_dir = path == out and ext == ".mlpackage"
        if path.is_symlink() or (path.is_dir() != want_dir) or not (path.is_dir() or path.is_file()):
            what = "a folder" if path.is_dir() else "not a regular file"
            raise ExportError(f"{path} is {what}; it cannot be replaced by {what_for}")
    if out.parent.exists() and not out.parent.is_dir():
        raise ExportError(f"{out.parent} is not a folder")


def incomplete_set(out: Path) -> bool:
    """True for what an export killed before its program landed leaves (the program is placed
    last): no program, and a sidecar that an edgeseg export wrote for this very file. Any other
    file in the way is kept unless --overwrite."""
    from edgeseg.errors import EdgesegError

    if out.exists() or out.is_symlink() or not sc.sidecar_path(out).is_file():
        return False
    try:
        meta = sc.read_sidecar(out)
    except EdgesegError:
        return False
    return meta.get("file") == out.name and "contract_sha256" in meta


def place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished `tmp` to `out` in one step. Without `overwrite` a file that appeared at
    `out` meanwhile is never replaced (a hard link cannot clobber; rsync's temp-and-rename,
    git's no-clobber)."""
    if overwrite:
        if out.is_dir() and not out.is_symlink() and tmp.is_dir():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return
    if tmp.is_dir():
        if out.exists() or out.is_symlink():
            raise ExportError(f"{out} appeared during the export; not replaced (pass --overwrite)")
        os.rename(tmp, out)
        return
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise ExportError(f"{out} appeared during the export; not replaced (pass --overwrite)") from None
    except OSError:  # no hard links here (some network/FUSE file systems): check, then rename
        if out.exists() or out.is_symlink():
            raise ExportError(f"{out} appeared during the export; not replaced (pass --overwrite)") from None
        os.replace(tmp, out)
        return
    tmp.unlink()


def temp_path(out: Path, suffix: str) -> Path:
    """A fresh private name beside `out` (two exports to one path never share a temp file)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=suffix)
    os.close(fd)
    from edgeseg.checkpoint import new_file_mode

    os.chmod(tmp, new_file_mode())
    return Path(tmp)


def write_temp(out: Path, write: Callable) -> Path:
    """`write(binary file)` into a fresh temporary file beside `out` (removed if writing fails)."""
    tmp = temp_path(out, ".partial")
    try:
        with open(tmp, "wb") as f:
            write(f)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def failed_path(out: Path) -> Path:
    return out.with_name(out.name + ".failed")
