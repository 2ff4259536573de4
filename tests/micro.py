"""The micro training world the training tests share: two micro presets (32 px), fixed small
subsets of the synthetic set, a seeded micro teacher, the base training config and a trainer
factory. tests/conftest.py turns them into fixtures; tests/ddp_worker.py uses them in each rank.

Importing this module has no side effects.
"""
from __future__ import annotations

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
    from edgeseg.config import TrainConfig

    # fp32: one process and two must agree to 1e-5 (bf16 autocast, where the CPU has it, rounds apart)
    return TrainConfig(role="student", preset=MICRO_STUDENT, kd="efkd", batch_size=8, epochs=1, lr=1e-3,
                       num_workers=0, ema_start=2, ema_beta=0.9, seed=0, kernel_backend="torch", bf16=False)


def micro_config(**kw):
    """A micro student's training settings (one epoch is 4 steps of batch 8); `kw` overrides. fp32:
    the tests compare the trainer's arithmetic exactly (bf16 autocast has its own test)."""
    from edgeseg.config import TrainConfig

    base = dict(role="student", preset=MICRO_STUDENT, kd="efkd", batch_size=8, epochs=2, lr=1e-3, num_workers=0,
                save_every_steps=0, ema_start=2, ema_beta=0.9, seed=0, plateau_patience=0, bf16=False)
    return TrainConfig(**{**base, **kw})


def make_trainer(cfg, out: Path, data, teacher=None):
    """A quiet CPU Trainer of `cfg` writing to `out`, on the (train, val) datasets `data`."""
    from edgeseg.train import Trainer

    return Trainer(cfg, out, teacher=teacher, train_ds=data[0], val_ds=data[1], device=torch.device("cpu"),
                   quiet=True)
