"""Fine-tuning the shipped real-lesion models on a user's own folder, and the time budget of a job.

`edgeseg distill --dataset folder` (and `train-teacher`) on a machine without a GPU starts from
the shipped models named by :func:`edgeseg.defaults.finetune_start` instead of training the
paper's presets from scratch: the teacher is the shipped teacher fine-tuned on the folder, the
student the shipped student distilled from it with the shipped student's own recipe. Each
fine-tuned model ships only if it beats the shipped one on the folder's validation split. With a
GPU the paper-scale presets stay the default; either choice is one option away
(``--from-shipped`` / ``--from-scratch``, or naming other presets).

The budget (``--minutes``) covers the whole job: evaluation is estimated from the number of test
images and a timed forward pass, the rest goes to training (teacher first, the student gets what
is left when the teacher ends).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from edgeseg.errors import SettingsError

__all__ = ["StartModel", "start_models", "use_shipped_start", "finetune_recipe", "fit_batch", "Plan", "plan_job",
           "keep_better", "FINETUNE_MINUTES", "FINETUNE_LR_SCALE", "TEACHER_SHARE"]

#: Budget of a fine-tuning job when no --minutes is given: "minutes on a laptop".
FINETUNE_MINUTES = 10.0
#: Fine-tuning learning rate as a fraction of the shipped model's own (a converged start, few photos).
FINETUNE_LR_SCALE = 0.2
#: Share of the training time the teacher gets when it is trained here (the student ships).
TEACHER_SHARE = 1 / 3


@dataclass(frozen=True)
class StartModel:
    """A shipped model fine-tuning starts from."""

    name: str
    path: Path
    preset: str
    train_config: dict


def start_models() -> dict[str, StartModel]:
    """{"teacher", "student"}: the shipped models of the defaults table and their presets."""
    from edgeseg.checkpoint import load_preset
    from edgeseg.defaults import finetune_start
    from edgeseg.runs import shipped_path

    out = {}
    for role, name in finetune_start().items():
        path = shipped_path(name)
        p, meta = load_preset(path)
        out[role] = StartModel(name, path, p.name, dict(meta.get("train_config") or {}))
    return out


def use_shipped_start(dataset: str, choice: bool | None, teacher: str | None, teacher_preset: str | None,
                      student_preset: str | None) -> bool:
    """Whether a job starts from the shipped models: `choice` when given (--from-shipped /
    --from-scratch), else for a user's folder on a machine without a GPU (paper-scale training
    from scratch takes days there) unless a teacher checkpoint or other presets were named."""
    if choice is not None:
        return choice
    if dataset != "folder" or teacher is not None or torch.cuda.is_available():
        return False
    start = start_models()
    return teacher_preset in (None, start["teacher"].preset) and student_preset in (None, start["student"].preset)


def finetune_recipe(start: StartModel, dataset: str, data_dir: str | None):
    """The shipped model's own training recipe, continued from its weights on the folder: a lower
    learning rate annealed over the time budget, no worker processes (epochs of a few steps)."""
    from edgeseg.config import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    cfg = {k: v for k, v in start.train_config.items() if k in known}
    cfg.update(preset=start.preset, dataset=dataset, data_dir=data_dir, init_from=str(start.path),
               init_from_teacher=False, lr=cfg.get("lr", TrainConfig.lr) * FINETUNE_LR_SCALE,
               lr_schedule="cosine", epochs=100_000, max_steps=None, max_seconds=None, num_workers=0)
    return TrainConfig.from_dict(cfg)


def fit_batch(cfg, overrides: dict, n_train: int, dataset: str):
    """(cfg, note): a train split smaller than the recipe's batch gets a batch of the whole split;
    a --batch-size given explicitly is kept and refused here, naming what to pass instead."""
    from dataclasses import replace

    if n_train >= cfg.batch_size:
        return cfg, None
    if "batch_size" in overrides:
        raise SettingsError(f"the {dataset} train split has {n_train} images, fewer than one batch of "
                            f"{cfg.batch_size}; pass --batch-size {n_train} or less (or leave it out: the batch "
                            "then adapts to the split)")
    return replace(cfg, batch_size=n_train), f"{cfg.role} batch {n_train} (the train split is smaller than {cfg.batch_size})"


# ----------------------------------------------------------------------------------------
# cost estimates and the plan line
# ----------------------------------------------------------------------------------------
def _inputs(b: int, size: int):
    return torch.randn(b, 1, size, size), torch.rand(b, 3, size, size), torch.randint(0, 250, (b,))


@torch.no_grad()
def _forward_seconds(model, size: int, b: int = 4) -> float:
    """Seconds of one forward pass per image (timed after a warm-up pass)."""
    x, g, t = _inputs(b, size)
    model(x, g, t)
    tic = time.perf_counter()
    model(x, g, t)
    return (time.perf_counter() - tic) / b


def _step_seconds(model, teacher, size: int, batch: int) -> float:
    """Seconds of one training step at `batch`: forward and backward (and the teacher's forward
    when it teaches), timed on a batch of up to 4 and scaled."""
    b = min(batch, 4)
    x, g, t = _inputs(b, size)

    def once() -> None:
        model(x, g, t).float().pow(2).mean().backward()
        if teacher is not None:
            with torch.no_grad():
                teacher(x, g, t)

    once()
    tic = time.perf_counter()
    once()
    model.zero_grad(set_to_none=True)
    return (time.perf_counter() - tic) * batch / b


@dataclass
class Plan:
    line: str
    total_seconds: float | None  # the budget; None: no budget
    eval_seconds: float
    teacher_seconds: float | None  # max_seconds given to the teacher (None: no limit or not trained)
    student_seconds: float | None

    def student_left(self, started: float) -> float | None:
        """The student's training time: what the budget has left once the teacher is ready."""
        if self.student_seconds is None:
            return None
        return max(self.total_seconds - (time.time() - started) - self.eval_seconds - _reserve(self.total_seconds), 1.0)


def _reserve(total: float) -> float:
    """Budget kept for what is not timed: checkpoints, scoring the start models, overlays."""
    return 10.0 + 0.08 * total


def _steps(cfg, n_train: int, step_cost: float, seconds: float | None, done: tuple[int, float]) -> int:
    """Steps a run has left: its epochs and max_steps, or what `seconds` (its max_seconds, counted over
    resumes like the trainer does) allows at `step_cost`; `done`: (steps, training seconds) already
    behind a resumed run."""
    per_epoch = max(n_train // cfg.batch_size, 1)
    steps = per_epoch * cfg.epochs if cfg.max_steps is None else min(per_epoch * cfg.epochs, cfg.max_steps)
    steps -= done[0]
    if seconds is not None:
        steps = min(steps, int(max(seconds - done[1], 0.0) / step_cost))
    return max(steps, 0)


def _eval_seconds(eval_models: list, n_test: int, size: int, forwards: int) -> float:
    """Evaluation of every model on the test split: `forwards` passes (K steps x N members) per image."""
    return 1.2 * n_test * forwards * sum(_forward_seconds(m, size) for m in eval_models) + 2.0 * len(eval_models)


def _budget(minutes: float | None, started: float, eval_s: float, trains_teacher: bool, trains_student: bool):
    """(total, teacher max_seconds, student max_seconds) of a --minutes budget: what is left after
    the set-up so far, the evaluation estimate and a reserve (checkpoints, validation of the start
    models) is training time; the teacher gets TEACHER_SHARE of it when both train."""
    if minutes is None:
        return None, None, None
    total = 60.0 * minutes
    left = max(total - (time.time() - started) - eval_s - _reserve(total), 1.0)
    teacher = (left * TEACHER_SHARE if trains_student else left) if trains_teacher else None
    student = left - (teacher or 0.0) if trains_student else None
    return total, teacher, student


def _fmt_s(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def plan_job(*, start_text: str, t_name: str, cfg_t, cfg_s, sizes: dict, minutes: float | None, started: float,
             eval_forwards: int, eval_models: int, notes: list[str], done: dict | None = None) -> Plan:
    """The plan of a job and its one-line summary. `cfg_t` None: the teacher is not trained here;
    `cfg_s` None: no student (train-teacher); `sizes`: images per split; `eval_models`: how many
    student-sized models the test split evaluates besides the teacher; `done`: role -> (steps,
    training seconds) of a resumed run."""
    from edgeseg.models import build, preset

    torch.manual_seed(0)  # timing nets only; the trainers seed their own
    t_net = build(preset(t_name))
    s_net = build(preset(cfg_s.preset)) if cfg_s is not None else None
    size = preset(t_name).image_size
    eval_s = (_eval_seconds([t_net] + [s_net] * eval_models, sizes["test"], size, eval_forwards)
              if cfg_s is not None else 0.0)
    total, t_sec, s_sec = _budget(minutes, started, eval_s, cfg_t is not None, cfg_s is not None)
    val_s = _forward_seconds(t_net, size)
    parts, est = [start_text, f"images train {sizes['train']} / val {sizes['val']}"
                  + (f" / test {sizes['test']}" if cfg_s is not None else "")], eval_s
    for role, cfg, net, teacher, sec in (("teacher", cfg_t, t_net, None, t_sec), ("student", cfg_s, s_net, t_net, s_sec)):
        if cfg is None:
            continue
        # a step's cost includes its share of each epoch's validation (loss and Dice)
        cost = (_step_seconds(net, teacher, size, cfg.batch_size)
                + 2 * sizes["val"] * val_s / max(sizes["train"] // cfg.batch_size, 1))
        did = (done or {}).get(role, (0, 0.0))
        steps = _steps(cfg, sizes["train"], cost, sec if sec is not None else cfg.max_seconds, did)
        run_s = steps * cost if sec is None else sec
        est += run_s
        resumed = f", resumed at step {did[0]}" if did[0] else ""
        parts.append(f"{role} {cfg.preset}: ~{steps} steps of batch {cfg.batch_size}, lr {cfg.lr:g} "
                     f"({_fmt_s(run_s)}{resumed})")
    if cfg_s is not None:
        parts.append(f"evaluation of {1 + eval_models} models on {sizes['test']} test images ~{_fmt_s(eval_s)}")
    budget = f" of a {minutes:g}-min budget (--minutes)" if total is not None else ""
    parts.append(f"estimated {_fmt_s(total if total is not None else est)}{budget}")
    line = "plan: " + "; ".join(parts + notes)
    return Plan(line, total, eval_s, t_sec, s_sec)


def keep_better(role: str, tuned, start: StartModel, run: Path, score, dataset: str, data_dir: str | None):
    """The fine-tuned model, or the shipped one when fine-tuning did not raise the validation score
    (`score(model)`: validation Dice on the folder, edgeseg.defaults.VAL_SELECT). Then
    ``<run>/<role>.safetensors`` is the shipped weights and the fine-tuned ones stay beside it as
    ``<role>-finetuned.safetensors``. Returns (model, record for metrics.json)."""
    import json
    import os

    from edgeseg.checkpoint import load_model, save_model
    from edgeseg.defaults import VAL_SELECT

    dst = run / f"{role}.safetensors"
    meta = json.loads(dst.with_suffix(".json").read_text()) if dst.with_suffix(".json").exists() else {}
    shipped = load_model(start.path)
    if meta.get("finetune_kept") == "shipped":  # a resumed run that already chose
        return shipped, {"kept": "shipped", "start": start.name, **meta.get("finetune_val_dsc", {})}
    scores = {"val_dsc_shipped": score(shipped), "val_dsc_finetuned": score(tuned)}
    rec = {"start": start.name, "val_protocol": VAL_SELECT.describe(), **scores}
    if scores["val_dsc_finetuned"] > scores["val_dsc_shipped"]:
        return tuned, {"kept": "fine-tuned", **rec}
    for suffix in (".safetensors", ".json"):  # the fine-tuned weights stay inspectable
        if dst.with_suffix(suffix).exists():
            os.replace(dst.with_suffix(suffix), run / f"{role}-finetuned{suffix}")
    # dataset/data_dir: where `edgeseg export` finds calibration images (edgeseg.runs.training_dataset)
    save_model(shipped, dst, extra={"source": start.name, "dataset": dataset, "data_dir": data_dir,
                                    "finetune_kept": "shipped", "finetune_val_dsc": scores,
                                    "note": f"the shipped {start.name}: fine-tuning on {dataset} did not raise "
                                            f"validation Dice ({role}-finetuned.safetensors)"})
    return shipped, {"kept": "shipped", **rec}
