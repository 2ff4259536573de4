"""Run folders under ./runs/: where `edgeseg distill` writes and later commands look.

Layout of one run folder:
    teacher.safetensors + teacher.json     the teacher used (EMA weights)
    student.safetensors + student.json     the distilled student (EMA weights)
    metrics.json                           {"teacher": {...}, "student": {...}, ...}
    log.jsonl, curves.png, overlays/       training log and pictures
    state/                                 resumable trainer state
"""
from __future__ import annotations

from pathlib import Path

from edgeseg.errors import CheckpointError

__all__ = ["RUNS_DIR", "latest_run", "resolve_checkpoint"]

RUNS_DIR = Path("runs")


def latest_run(root: str | Path = RUNS_DIR, require: str = "student.safetensors") -> Path:
    """The newest run folder under `root` (by modification time of `require`)."""
    root = Path(root)
    found = sorted(root.glob(f"*/{require}"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise CheckpointError(
            f"no checkpoint given and no run with {require} under {root.resolve()}/; "
            "run `edgeseg distill` first or pass --checkpoint"
        )
    return found[-1].parent


def resolve_checkpoint(checkpoint: str | Path | None, which: str = "student", root: str | Path = RUNS_DIR) -> Path:
    """A weights file: the one named, the `which` model of a run folder, or of the newest run."""
    if checkpoint is None:
        return latest_run(root, f"{which}.safetensors") / f"{which}.safetensors"
    path = Path(checkpoint)
    if path.is_dir():
        path = path / f"{which}.safetensors"
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path
