"""Micro presets/config shared by the training tests, and the torchrun worker of the DDP test.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT``:
every rank trains the micro student (global batch 8 -> 4 per rank, gloo on CPU) and rank 0 writes
``OUT/ddp_model.safetensors`` (online weights), ``OUT/ddp_ema.safetensors`` and ``OUT/ddp.json``.
``tests/test_train.py`` runs the same config in one process and compares.

Importing this module has no side effects (tests import the helpers below).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

MICRO_TEACHER = "micro-teacher"
MICRO_STUDENT = "micro-test"
DDP_SEED_TEACHER = 123


def micro_presets():
    """A 3-stage micro teacher and its 2-stage student: 32 px, x0 prediction, 1 x 8 attention."""
    from edgeseg.models import Preset

    teacher = Preset(MICRO_TEACHER, 8, 8, (1, 2, 2), (1, 2, 2), 4, role="teacher", image_size=32,
                     prediction_type="sample", heads=1, dim_head=8)
    student = Preset(MICRO_STUDENT, 8, 8, (1, 2), (1, 2), 4, role="student", image_size=32,
                     prediction_type="sample", heads=1, dim_head=8, teacher=MICRO_TEACHER)
    return [teacher, student]


def register_micro(mp=None) -> None:
    """Add the micro presets to edgeseg.models.PRESETS (through a pytest MonkeyPatch if given)."""
    from edgeseg.models import PRESETS

    for p in micro_presets():
        if mp is not None:
            mp.setitem(PRESETS, p.name, p)
        else:
            PRESETS[p.name] = p


def micro_environment(base_tmp: Path):
    """Generator behind the test modules' `micro_env` fixtures: micro presets registered, one
    synthetic cache under `base_tmp` shared by the session's test files, 1 thread, no curve plots."""
    import pytest

    mp = pytest.MonkeyPatch()
    register_micro(mp)
    mp.setenv("EDGESEG_CACHE", str(base_tmp / "edgeseg-cache"))
    mp.setattr("edgeseg.viz.plot_curves", lambda *a, **k: None)  # ~1.5 s per epoch; one test draws them
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


def micro_datasets(n_train: int = 32, n_val: int = 8, materialize: bool = True):
    """Small fixed subsets of the synthetic set at 32 px (cached under $EDGESEG_CACHE).

    With `materialize` every item is computed once and frozen in a TensorDataset: the distance
    maps that SegDataset computes per access jitter by ~1 ulp between calls (OpenCV's precise
    distanceTransform depends on the output buffer's alignment), and the bit-exactness tests
    check the trainer, not the data pipeline (test_train.py has a separate test for that).
    """
    from torch.utils.data import Subset, TensorDataset

    from edgeseg.data import load_dataset

    train = Subset(load_dataset("synthetic", "train", size=32), range(n_train))
    val = Subset(load_dataset("synthetic", "val", size=32), range(n_val))
    if materialize:
        train, val = (TensorDataset(*(torch.stack(col) for col in zip(*(ds[i] for i in range(len(ds))))))
                      for ds in (train, val))
    return train, val


def micro_teacher():
    """The micro teacher with deterministic (seeded) random weights."""
    from edgeseg.models import build

    torch.manual_seed(DDP_SEED_TEACHER)
    return build(MICRO_TEACHER)


def ddp_config():
    from edgeseg.train import TrainConfig

    return TrainConfig(role="student", preset=MICRO_STUDENT, kd="efkd", batch_size=8, epochs=1, lr=1e-3,
                       num_workers=0, ema_start=2, ema_beta=0.9, seed=0, kernel_backend="torch")


def main(out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file

    from edgeseg.train import Trainer

    import edgeseg.viz

    edgeseg.viz.plot_curves = lambda *a, **k: None  # not under test here; saves seconds
    register_micro()
    out_dir = Path(out)
    train, val = micro_datasets()
    trainer = Trainer(ddp_config(), out_dir / "train", teacher=micro_teacher(), train_ds=train, val_ds=val,
                      quiet=True)
    assert trainer.world == int(os.environ["WORLD_SIZE"]) == 2, (trainer.world, os.environ.get("WORLD_SIZE"))
    trainer.fit()
    if trainer.rank == 0:
        save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()},
                  str(out_dir / "ddp_model.safetensors"))
        save_file({k: v.contiguous() for k, v in trainer.ema.model.state_dict().items()},
                  str(out_dir / "ddp_ema.safetensors"))
        (out_dir / "ddp.json").write_text(json.dumps({"step": trainer.step, "history": trainer.history,
                                                      "world": trainer.world}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
