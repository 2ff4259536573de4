"""The main job: get a teacher, distil the student with EFKD, evaluate both, write a run folder.

`edgeseg distill` is a thin wrapper over `run_distill`; `edgeseg train-teacher` over
`run_train_teacher`. With no arguments the job runs on the built-in synthetic set with the tiny
presets and the teacher checkpoint shipped in the package.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgeseg.checkpoint import atomic_write_json, load_model, load_preset, save_model
from edgeseg.config import TrainConfig, recipe
from edgeseg.defaults import DATASET_PRESETS, DEFAULT_EVAL, VAL_SELECT
from edgeseg.devices import init_distributed
from edgeseg.errors import EdgesegError
from edgeseg.evaluate import SamplerSettings, evaluate, format_table, metrics_summary, write_overlays
from edgeseg.models import count_params, preset
from edgeseg.runs import RUNS_DIR, shipped_model, shipped_path
from edgeseg.train import Trainer

__all__ = ["DistillJob", "run_distill", "run_train_teacher", "default_presets", "shipped_teacher", "shipped_checkpoint",
           "DEFAULT_EVAL"]


def default_presets(dataset: str) -> tuple[str, str]:
    """(teacher preset, student preset) the main job uses for `dataset` (edgeseg.defaults.DATASET_PRESETS)."""
    if dataset not in DATASET_PRESETS:
        from edgeseg.data import DATASETS

        raise EdgesegError(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}")
    return DATASET_PRESETS[dataset]


def shipped_checkpoint(preset_name: str, dataset: str) -> Path | None:
    """The checkpoint shipped inside the package for (preset, dataset), if any (README, "The
    main job" and "Real lesions")."""
    stem = shipped_model(preset_name, dataset)
    return None if stem is None else shipped_path(stem)


def shipped_teacher(preset_name: str, dataset: str) -> Path | None:
    """The shipped teacher for (preset, dataset), if any."""
    return shipped_checkpoint(preset_name, dataset) if preset_name.endswith("teacher") else None


@dataclass
class DistillJob:
    dataset: str = "synthetic"
    data_dir: str | None = None
    teacher: str | None = None  # checkpoint path; None: shipped one, else train one
    teacher_preset: str | None = None
    student_preset: str | None = None
    run_name: str | None = None
    runs_dir: str = str(RUNS_DIR)
    resume: bool = False
    overrides: dict = field(default_factory=dict)  # TrainConfig fields for the student
    teacher_overrides: dict = field(default_factory=dict)
    eval: SamplerSettings = DEFAULT_EVAL
    eval_images: int | None = None  # None: the whole test split
    val_dsc_images: int = 150  # per-epoch validation Dice (EMA model): curves and model selection
    quiet: bool = False
    minutes: float | None = None  # budget of the whole job (edgeseg.finetune); None: the recipes' epochs
    from_shipped: bool | None = None  # start from the shipped models; None: edgeseg.finetune.use_shipped_start


def _run_dir(job: DistillJob, student_preset: str) -> Path:
    """The run folder, claimed for this process (edgeseg.runlock: created for a new run, its
    run.lock taken either way); torchrun ranks other than 0 use the folder rank 0 claims."""
    import os

    from edgeseg.runlock import claim_run_dir

    if job.run_name is not None and (job.run_name in ("", ".", "..") or any(
            c in job.run_name for c in "/\\") or not job.run_name.isprintable()):
        raise EdgesegError(f"--run-name must be a folder name (no '/', '..' or control characters), "
                           f"got {job.run_name!r}")
    name = job.run_name or f"{job.dataset}-{student_preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = Path(job.runs_dir) / name
    if int(os.environ.get("RANK", "0")) != 0:
        return run
    return claim_run_dir(run, resume=job.resume, unique=job.run_name is None)


def _apply(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    return TrainConfig.from_dict({**cfg.to_dict(), **overrides})


def _val_dsc(model, val_ds, n: int, settings: SamplerSettings = VAL_SELECT) -> float:
    """Mean Dice on the first n validation images: the model-selection score."""
    return evaluate(model, val_ds, settings, max_images=n, keep=0, progress=False)["metrics"]["dsc"]["mean"]


def _val_dsc_hook(val_ds, n: int, settings: SamplerSettings, best_path: Path):
    """Per-epoch validation Dice of the EMA model on the first n validation images (curves and
    model selection): the best epoch's EMA weights are kept in ``best_path``."""

    def hook(trainer: Trainer, rec: dict) -> None:
        if trainer.rank != 0 or n <= 0:
            return
        rec["val_dsc"] = _val_dsc(trainer.ema.model, val_ds, n, settings)
        best = max((h.get("val_dsc", -1.0) for h in trainer.history), default=-1.0)
        if rec["val_dsc"] > best:
            save_model(trainer.ema.model, best_path, extra={
                "epoch": trainer.epoch, "step": trainer.step, "val_dsc": rec["val_dsc"],
                "selected_on": f"validation Dice, {min(n, len(val_ds))} images, {settings.describe()}"})

    return hook


def _say(job: DistillJob, msg: str) -> None:
    if not job.quiet:
        from rich.console import Console

        Console().print(msg)


def _final_val_dsc(trainer: Trainer, model, job: DistillJob) -> float:
    """Validation Dice of the final weights: the last epoch's record when training ended with an
    epoch, else (a time budget stopped it mid-epoch) scored now, like every epoch."""
    last = trainer.history[-1] if trainer.history else {}
    if last.get("step") == trainer.step and "val_dsc" in last:
        return last["val_dsc"]
    return _val_dsc(model, trainer.val_ds, job.val_dsc_images)


def _train(cfg: TrainConfig, run: Path, teacher, job: DistillJob):
    """Train (or resume) one model; returns the EMA weights of the epoch with the best validation
    Dice, which are also what ``<run>/<role>.safetensors`` holds."""
    trainer = Trainer(cfg, run, teacher=teacher, quiet=job.quiet)
    final = run / f"{cfg.role}.safetensors"
    if job.resume and (trainer.state_dir / "state.json").exists():
        trainer.load_state()
        _say(job, f"resuming {cfg.role} at step {trainer.step} (epoch {trainer.epoch})")
    if trainer.step >= trainer.total_steps() and final.exists():
        return load_model(final)
    best_path = run / f"{cfg.role}-best.safetensors"
    model = trainer.fit(on_epoch_end=_val_dsc_hook(trainer.val_ds, job.val_dsc_images, VAL_SELECT, best_path))
    if trainer.rank != 0 or not best_path.exists():
        return model
    _, best = load_preset(best_path)
    if best["val_dsc"] > _final_val_dsc(trainer, model, job):  # an earlier epoch validated better: ship that one
        _, final_meta = load_preset(final)  # what save_final recorded (config, steps, resumes)
        # the last weights stay beside it (e.g. to study longer training)
        save_model(model, run / f"{cfg.role}-final.safetensors",
                   extra={**final_meta, "note": f"final weights; an earlier epoch validated better and is {final.name}"})
        model = load_model(best_path)
        save_model(model, final, extra={**final_meta, "selected": {k: best[k] for k in
                                                                   ("epoch", "step", "val_dsc", "selected_on")}})
        _say(job, f"{cfg.role}: kept epoch {best['epoch']} (validation Dice {best['val_dsc']:.4f})")
    return model


def _check_trainable(cfg: TrainConfig, overrides: dict) -> None:
    """What the settings can only be checked against (dataset and preset names, the train split's
    size for the small-split batch rule, edgeseg.finetune.fit_batch), checked before the run folder
    is made: a bad value must leave nothing behind."""
    from edgeseg.data import DATASETS, split_sizes
    from edgeseg.errors import SettingsError
    from edgeseg.finetune import fit_batch

    if cfg.dataset not in DATASETS:
        raise SettingsError(f"training setting dataset must be one of {', '.join(DATASETS)}, got {cfg.dataset!r}")
    preset(cfg.preset)
    fit_batch(cfg, overrides, split_sizes(cfg.dataset, cfg.data_dir).get("train", 0), cfg.dataset)


def run_train_teacher(job: DistillJob) -> Path:
    """Train a teacher with the same engine (or fine-tune the shipped one, edgeseg.finetune);
    returns the run folder holding teacher.safetensors."""
    t0 = time.time()
    start = _start(job)
    t_name = job.teacher_preset or (start["teacher"].preset if start else default_presets(job.dataset)[0])
    preset(t_name)
    cfg = _apply(_recipe("teacher", t_name, job, start), job.teacher_overrides)
    _check_trainable(cfg, job.teacher_overrides)
    run = _run_dir(job, t_name)
    init_distributed()
    ds = _splits(job, preset(t_name).image_size)
    sizes, val_ds = {k: len(v) for k, v in ds.items()}, ds["val"]
    cfg, notes = _fit_batches(job, sizes["train"], cfg=cfg)
    plan = _plan(job, start, t_name, cfg, None, sizes, t0, notes, run)
    cfg = _with_budget(cfg, plan.teacher_seconds, job.teacher_overrides)
    teacher = _train(cfg, run, None, job)
    if start and int(os.environ.get("RANK", "0")) == 0:
        from edgeseg.finetune import keep_better

        _, kept = keep_better("teacher", teacher, start["teacher"], run, _val_score(job, val_ds), job.dataset,
                              job.data_dir)
        _say(job, f"teacher: kept the {kept['kept']} model (validation Dice shipped {kept['val_dsc_shipped']:.4f}, "
                  f"fine-tuned {kept['val_dsc_finetuned']:.4f})")
    return run


def _val_score(job: DistillJob, val_ds):
    """The model-selection score on the folder's validation split, as a function of the model."""
    return lambda model: _val_dsc(model, val_ds, job.val_dsc_images)


def _start(job: DistillJob) -> dict | None:
    """The shipped models this job starts from (edgeseg.finetune), or None."""
    from edgeseg.finetune import start_models, use_shipped_start

    use = use_shipped_start(job.dataset, job.from_shipped, job.teacher, job.teacher_preset, job.student_preset)
    return start_models() if use else None


def _recipe(role: str, name: str, job: DistillJob, start: dict | None) -> TrainConfig:
    """The shipped model's recipe continued from its weights when starting from it, else the preset's."""
    from edgeseg.finetune import finetune_recipe

    if start and start[role].preset == name:
        return finetune_recipe(start[role], job.dataset, job.data_dir)
    return recipe(role, name, job.dataset, job.data_dir)


def _splits(job: DistillJob, size: int) -> dict:
    """{split: dataset}, read before any training: a bad file must surface now, not hours into a run."""
    from edgeseg.data import load_dataset

    return {s: load_dataset(job.dataset, s, data_dir=job.data_dir, size=size) for s in ("train", "val", "test")}


def _fit_batches(job: DistillJob, n_train: int, **cfgs) -> tuple:
    """The configs with the small-split batch rule applied (edgeseg.finetune.fit_batch), and its notes."""
    from edgeseg.finetune import fit_batch

    out, notes = [], []
    for name, cfg in cfgs.items():
        overrides = job.teacher_overrides if cfg.role == "teacher" else job.overrides
        cfg, note = fit_batch(cfg, overrides, n_train, job.dataset)
        out.append(cfg)
        notes += [note] if note else []
    return (*out, notes)


#: the limits a cosine schedule's progress is measured against (Trainer.run_fraction)
RUN_LIMITS = ("epochs", "max_steps", "max_seconds")


def _resumed(job: DistillJob, run: Path, cfgs: dict, notes: list) -> dict:
    """role -> (steps, training seconds) already behind a run that --resume continues. A resume
    that moves a cosine schedule's limits is said in `notes`: the schedule is stretched to them, so
    the learning rate rises again from where it ended."""
    from edgeseg.config import changed_settings, read_state_json
    from edgeseg.train import run_state_dir

    out = {}
    for role in ("teacher", "student"):
        js = run_state_dir(run, role) / "state.json"
        if job.resume and js.exists():
            meta = read_state_json(js)
            out[role] = (meta["step"], float(meta.get("train_seconds", 0.0)))
            new = cfgs.get(role)
            if new is None or new.lr_schedule != "cosine":
                continue
            changed = changed_settings(meta["config"], {k: getattr(new, k) for k in RUN_LIMITS})
            moved = [f"{k} {was} -> {now}" for k, (was, now) in changed.items()]
            if moved:
                notes.append(f"the {role}'s cosine schedule is stretched to its new limits ({', '.join(moved)}): "
                             "its learning rate rises again")
    return out


def _plan(job: DistillJob, start: dict | None, t_name: str, cfg_t, cfg_s, sizes: dict, t0: float, notes: list,
          run: Path, given: Path | None = None):
    """The job's plan (edgeseg.finetune.plan_job), said in one line before any training."""
    from edgeseg.finetune import FINETUNE_MINUTES, plan_job

    if start:
        why = "--from-shipped" if job.from_shipped else "the default for a folder on a machine without a GPU"
        text = (f"start from the shipped {start['teacher'].name} and {start['student'].name} ({why}; "
                "--from-scratch trains the presets from random weights)")
    else:
        why = ("GPU present" if torch.cuda.is_available() else "chosen") if job.dataset == "folder" else job.dataset
        text = f"train from the presets ({why})"
    if cfg_t is None:
        text += f"; teacher {given} as it is"
    minutes = job.minutes if job.minutes is not None else (FINETUNE_MINUTES if start else None)
    settings = job.eval.resolved(preset(cfg_s.preset).prediction_type) if cfg_s is not None else job.eval
    plan = plan_job(start_text=text, t_name=t_name, cfg_t=cfg_t, cfg_s=cfg_s, sizes=sizes, minutes=minutes,
                    started=t0, eval_forwards=(settings.steps or 1) * (settings.ensemble or 1),
                    eval_models=2 if start else 1, notes=notes,
                    done=_resumed(job, run, {"teacher": cfg_t, "student": cfg_s}, notes))
    _say(job, plan.line)
    return plan


def _with_budget(cfg: TrainConfig, seconds: float | None, overrides: dict) -> TrainConfig:
    """`cfg` stopped after its share of the budget (a max_seconds given explicitly wins)."""
    if seconds is None or "max_seconds" in overrides:
        return cfg
    return _apply(cfg, {"max_seconds": round(seconds, 1)})


def _presets(job: DistillJob, start: dict | None = None):
    """(teacher preset name, student preset name, student preset), checked to exist."""
    t_default, s_default = ((start["teacher"].preset, start["student"].preset) if start
                            else default_presets(job.dataset))
    s_name = job.student_preset or s_default
    s_preset = preset(s_name)
    t_name = job.teacher_preset or (t_default if start else s_preset.teacher or t_default)
    preset(t_name)
    return t_name, s_name, s_preset


def _given_teacher(job: DistillJob, t_name: str, run: Path) -> Path | None:
    """The teacher used as it is: on --resume the run's copy of the teacher it was given (unless the
    run is training its own), else --teacher, else the shipped one; None: the teacher trains here."""
    from edgeseg.train import run_state_dir

    own = run / "teacher.safetensors"
    if job.resume and job.teacher is None and own.exists() and not run_state_dir(run, "teacher").exists():
        return own
    src = job.teacher or shipped_teacher(t_name, job.dataset)
    return None if src is None else Path(src)


def _get_teacher(job: DistillJob, cfg_t: TrainConfig, t_name: str, run: Path, rank: int, teacher_src: Path | None):
    """The teacher: `teacher_src` (_given_teacher, copied into the run folder), else trained now.
    Returns (model, training seconds or None)."""
    if teacher_src is None:
        _say(job, f"teacher: training {t_name} on {job.dataset} (no --teacher given)")
        tt = time.time()
        teacher = _train(cfg_t, run, None, job)
        return teacher, time.time() - tt
    teacher = load_model(teacher_src, expect_preset=t_name)
    _say(job, f"teacher: {t_name} from {teacher_src}")
    if rank == 0 and teacher_src != run / "teacher.safetensors":
        run.mkdir(parents=True, exist_ok=True)
        save_model(teacher, run / "teacher.safetensors", extra={"source": str(teacher_src)})
    return teacher, None


def _evaluate_both(job: DistillJob, run: Path, models: dict, test_ds) -> dict:
    """Evaluate each role's model on the test split; overlays go to <run>/overlays/<role>.png."""
    results = {}
    for role, model in models.items():
        r = evaluate(model, test_ds, job.eval, max_images=job.eval_images, progress=not job.quiet, label=role)
        write_overlays(r["keep"], run / "overlays" / f"{role}.png", title_prefix=f"{role} ")
        r["params"] = count_params(model)
        results[role] = r
    return results


def _metrics(job: DistillJob, cfg_s: TrainConfig, models: dict, results: dict, seconds: dict) -> dict:
    """The content of <run>/metrics.json."""
    metrics = {
        role: {"preset": model.preset.name, "params": count_params(model), **metrics_summary(results[role])}
        for role, model in models.items()
    }
    metrics["dataset"] = job.dataset
    metrics["kd"] = {"type": cfg_s.kd, "tau": cfg_s.tau, "lambda_e": cfg_s.lambda_e, "lambda_b": cfg_s.lambda_b}
    metrics["seconds"] = {k: None if v is None else round(v, 1) for k, v in seconds.items()}
    return metrics


def _print_summary(job: DistillJob, results: dict, metrics: dict, run: Path) -> None:
    if job.quiet:
        return
    from rich.console import Console

    Console(width=max(120, Console().width)).print(format_table(results, title=f"{job.dataset} test split ({results['student']['n']} images)"))
    Console().print(f"run folder: {run}   ({metrics['seconds']['total']:.0f} s)")


def _finetuned(job: DistillJob, role: str, model, start: dict | None, run: Path, val_ds, kept: dict, rank: int):
    """The fine-tuned `role` model, or the shipped start when it validates at least as well."""
    if not start or rank != 0:
        return model
    from edgeseg.finetune import keep_better

    model, kept[role] = keep_better(role, model, start[role], run, _val_score(job, val_ds), job.dataset,
                                    job.data_dir)
    kept[role]["val_images"] = min(job.val_dsc_images, len(val_ds))
    _say(job, f"{role}: kept the {kept[role]['kept']} model (validation Dice: shipped "
              f"{kept[role]['val_dsc_shipped']:.4f}, fine-tuned {kept[role]['val_dsc_finetuned']:.4f})")
    return model


def run_distill(job: DistillJob) -> dict:
    """The main job. Returns the metrics written to `<run>/metrics.json`."""
    t0 = time.time()
    start = _start(job)
    t_name, s_name, s_preset = _presets(job, start)
    # settings first: a typo must fail now, not after the teacher has trained
    cfg_t = _apply(_recipe("teacher", t_name, job, start), job.teacher_overrides)
    cfg_s = _apply(_recipe("student", s_name, job, start), job.overrides)
    _check_trainable(cfg_s, job.overrides)
    if job.teacher is None and (start is not None or shipped_teacher(t_name, job.dataset) is None):
        _check_trainable(cfg_t, job.teacher_overrides)  # the teacher trains (or fine-tunes) here
    run = _run_dir(job, s_name)
    device = init_distributed()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    size = s_preset.image_size
    ds = _splits(job, size)
    sizes, val_ds, test_ds = {k: len(v) for k, v in ds.items()}, ds["val"], ds["test"]
    cfg_t, cfg_s, notes = _fit_batches(job, sizes["train"], cfg_t=cfg_t, cfg_s=cfg_s)
    given = None if start is not None else _given_teacher(job, t_name, run)
    plan = _plan(job, start, t_name, cfg_t if start is not None or given is None else None, cfg_s, sizes, t0,
                 notes, run, given)
    kept: dict = {}
    if start:
        cfg_t = _with_budget(cfg_t, plan.teacher_seconds, job.teacher_overrides)
        tt = time.time()
        teacher = _finetuned(job, "teacher", _train(cfg_t, run, None, job), start, run, val_ds, kept, rank)
        teacher_seconds = time.time() - tt
    else:
        teacher, teacher_seconds = _get_teacher(job, _with_budget(cfg_t, plan.teacher_seconds, job.teacher_overrides),
                                                t_name, run, rank, given)
    if teacher.preset.image_size != size:
        raise EdgesegError(f"teacher {t_name} works at {teacher.preset.image_size}px, student {s_name} at {size}px")

    _say(job, f"student: distilling {s_name} with KD={cfg_s.kd} (tau {cfg_s.tau}) into {run}")
    ts = time.time()
    cfg_s = _with_budget(cfg_s, plan.student_left(t0), job.overrides)
    student = _finetuned(job, "student", _train(cfg_s, run, teacher, job), start, run, val_ds, kept, rank)
    student_seconds = time.time() - ts
    if rank != 0:
        return {}

    models = {"teacher": teacher.to(device).eval(), "student": student.to(device).eval()}
    if start:  # the shipped student beside the fine-tuned one, on the same test images
        models["shipped_student"] = load_model(start["student"].path).to(device).eval()
    results = _evaluate_both(job, run, models, test_ds)
    metrics = _metrics(job, cfg_s, models, results, {
        "total": time.time() - t0, "student_training": student_seconds, "teacher_training": teacher_seconds})
    metrics["plan"] = plan.line
    if start:
        metrics["finetune"] = {**kept, "test_dsc_gain": metrics["student"]["dsc"] - metrics["shipped_student"]["dsc"]}
    atomic_write_json(run / "metrics.json", metrics)
    _print_summary(job, results, metrics, run)
    return metrics
