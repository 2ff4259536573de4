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

from edgeseg.defaults import SHIPPED_MODELS
from edgeseg.errors import CheckpointError

__all__ = ["RUNS_DIR", "SHIPPED_MODELS", "shipped_path", "shipped_model", "is_shipped", "latest_run",
           "resolve_checkpoint", "training_dataset"]

RUNS_DIR = Path("runs")



def shipped_path(name: str) -> Path:
    """The weights file of a shipped model."""
    from importlib import resources

    if name not in SHIPPED_MODELS:
        raise CheckpointError(f"unknown shipped model {name!r}; shipped: {', '.join(SHIPPED_MODELS)}")
    path = Path(str(resources.files("edgeseg") / "assets" / f"{name}.safetensors"))
    if not path.exists():
        raise CheckpointError(f"{path}: shipped model file is missing (broken install?)")
    return path


def shipped_model(preset_name: str, dataset: str) -> str | None:
    """The name of the model shipped for (preset, dataset), if any."""
    return next((name for name, key in SHIPPED_MODELS.items() if key == (preset_name, dataset)), None)


def is_shipped(path: str | Path) -> bool:
    """Whether a weights file is one of the models shipped in the package (read-only outputs)."""
    from importlib import resources

    return Path(path).resolve().parent == Path(str(resources.files("edgeseg") / "assets")).resolve()


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
    """A weights file: the one named (a path or a shipped model's name), the `which` model of a
    run folder, of the newest run under `root`, or with no run the shipped real-lesion model."""
    if checkpoint is None:
        try:
            return latest_run(root, f"{which}.safetensors") / f"{which}.safetensors"
        except CheckpointError:
            from edgeseg.defaults import DEFAULT_MODEL

            return shipped_path(DEFAULT_MODEL.replace("student", which))
    if str(checkpoint) in SHIPPED_MODELS and not Path(checkpoint).exists():
        return shipped_path(str(checkpoint))
    path = Path(checkpoint)
    if path.is_dir():
        path = path / f"{which}.safetensors"
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path


def training_dataset(meta: dict, dataset: str | None, data_dir) -> tuple[str, str | None, int]:
    """(dataset, data_dir, seed) for calibration/parity images: the arguments, else what the
    checkpoint was trained on (its JSON's ``train_config``) when that folder is here, else the
    built-in synthetic set (a shipped real-lesion model on a machine without its data: parity is
    still a fair eager-vs-program check; pass --dataset/--data-dir to calibrate int8 on real
    images). The seed matters for ``synthetic`` only (it seeds the generator)."""
    cfg = meta.get("train_config") if isinstance(meta.get("train_config"), dict) else {}
    seed = int(cfg.get("seed", 0) or 0)
    if dataset is None:
        dataset = cfg.get("dataset") or meta.get("dataset")
        if data_dir is None:
            data_dir = cfg.get("data_dir") or meta.get("data_dir")
        if dataset not in (None, "synthetic") and (data_dir is None or not Path(data_dir).is_dir()):
            dataset, data_dir = "synthetic", None
    elif dataset != cfg.get("dataset"):
        seed = 0
    if dataset in (None, "synthetic") and cfg.get("dataset") != "synthetic":
        seed = 0
    return (dataset or "synthetic"), (str(data_dir) if data_dir is not None else None), seed
