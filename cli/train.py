"""`edgeseg distill`, `edgeseg train-teacher`."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from edgeseg.cli.common import SEED_MAX, parse_sets, read_settings, training_interrupted, user_errors
from edgeseg.config import same_folder

_KD_HELP = "knowledge distillation: efkd (edge-focused, paper Eq. 3-7), global (Eq. 2) or none"


def _overrides(config: Optional[Path], sets: List[str], **explicit) -> dict:
    """Settings file < --set < explicit options (only those given)."""
    out = read_settings(config)
    out.update(parse_sets(sets))
    out.update({k: v for k, v in explicit.items() if v is not None})
    return out


def _run_settings(role: str, overrides: dict, runs_dir: Path, run_name: Optional[str], resume: bool) -> dict | None:
    """The training settings a resumed run was started with (None when there is nothing to resume)."""
    from edgeseg.config import read_state_config

    if resume and not run_name:
        from edgeseg.errors import SettingsError

        raise SettingsError("--resume needs --run-name (the folder under --runs-dir to continue)")
    if not resume:
        return None
    from edgeseg.train import run_state_dir

    return read_state_config(run_state_dir(Path(runs_dir) / run_name, role))


def _checked(role: str, overrides: dict, saved: dict | None, job: dict, label: str | None = None) -> dict:
    """Validate `role`'s settings before any work; on --resume start from the run's own settings
    (`saved`) so only what is given now changes. The resume rule (edgeseg.config.check_resume)
    runs here, before anything loads, on what is given now; the trainer applies it again to the
    whole configuration when it loads the state."""
    from dataclasses import fields

    from edgeseg.config import TrainConfig, check_resume, validate_settings
    from edgeseg.errors import SettingsError

    try:
        validate_settings(role, overrides)
    except SettingsError as e:
        if label is None:
            raise
        raise SettingsError(f"{label}: {e}") from None
    if saved is None:
        return overrides
    given = {k: v for k, v in {**overrides, **job}.items() if k in saved}
    try:
        check_resume(saved, given)
    except SettingsError as e:
        raise SettingsError(f"--resume: the run's {role}: {e}") from None
    known = {f.name for f in fields(TrainConfig)} - {"role", "preset", "dataset", "data_dir"}
    return {**{k: v for k, v in saved.items() if k in known}, **overrides}


def _check_sampler(option: str, steps: int, ensemble: int, images: Optional[int]) -> None:
    from edgeseg.cli.common import check_range

    check_range(f"{option}-steps", steps, 1, 250)  # DDIM steps: at most the 250 training timesteps
    check_range(f"{option}-ensemble", ensemble, 1, 64)
    check_range(f"{option}-images", images, 1)


def _check_minutes(minutes: Optional[float]) -> None:
    import math

    from edgeseg.errors import SettingsError

    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise SettingsError(f"--minutes must be a number > 0, got {minutes}")


def _check_checkpoint_file(path) -> None:
    """A checkpoint given on the command line, checked (preset, header, sha256, shapes) before any work starts."""
    if path is not None:
        from edgeseg.checkpoint import verify_checkpoint

        verify_checkpoint(path)


@user_errors(interrupted=training_interrupted, hold_warnings=False)
def distill(
    dataset: Optional[str] = typer.Option(None, help="synthetic (built in, the default), isic2017, isic2018, "
                                          "ham10000, ph2 or folder; with --resume: the run's"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (not needed for synthetic)"),
    teacher: Optional[Path] = typer.Option(None, help="teacher checkpoint (.safetensors); default: the shipped "
                                           "teacher for synthetic and isic2017, fine-tuned for a folder without "
                                           "a GPU (see --from-shipped), else train one first"),
    teacher_preset: Optional[str] = typer.Option(None, help="teacher preset (default by dataset)"),
    student_preset: Optional[str] = typer.Option(None, "--student-preset", "--preset",
                                                 help="student preset (default by dataset)"),
    kd: Optional[str] = typer.Option(None, help=_KD_HELP),
    tau: Optional[float] = typer.Option(None, help="EFKD edge threshold on the attention map (paper 0.6)"),
    lambda_e: Optional[float] = typer.Option(None, help="EFKD edge weight (paper 5)"),
    lambda_b: Optional[float] = typer.Option(None, help="EFKD body weight (paper 2)"),
    epochs: Optional[int] = typer.Option(None, help="training epochs (paper 2000; tiny recipe 5)"),
    max_steps: Optional[int] = typer.Option(None, help="stop after this many optimizer steps"),
    batch_size: Optional[int] = typer.Option(None, help="global batch size (paper 16)"),
    lr: Optional[float] = typer.Option(None, help="learning rate (paper 2e-4 for students)"),
    seed: Optional[int] = typer.Option(None, min=0, max=SEED_MAX, help="seed for init, data order, noise and timesteps"),
    num_workers: Optional[int] = typer.Option(None, help="data-loader worker processes"),
    config: Optional[Path] = typer.Option(None, help="TOML/YAML/JSON file of training settings"),
    set_: List[str] = typer.Option([], "--set", help="any student training setting as name=value (repeatable)"),
    teacher_set: List[str] = typer.Option([], "--teacher-set", help="a teacher training setting as name=value, "
                                          "when the teacher is trained here (repeatable)"),
    run_name: Optional[str] = typer.Option(None, help="run folder name under --runs-dir"),
    runs_dir: Path = typer.Option(Path("runs"), help="where run folders go"),
    resume: bool = typer.Option(False, help="continue the run folder --run-name from its last checkpoint"),
    eval_steps: Optional[int] = typer.Option(None, help="DDIM steps for the final evaluation (default: the "
                                             "defaults table, 1 for x0/v students)"),
    eval_ensemble: Optional[int] = typer.Option(None, help="ensemble size for the final evaluation (default: "
                                                "the defaults table, 3)"),
    eval_images: Optional[int] = typer.Option(None, help="evaluate on the first N test images only"),
    minutes: Optional[float] = typer.Option(None, help="time budget of the whole job in minutes (training and "
                                            "evaluation); the best epoch within it ships. Default: 10 when "
                                            "fine-tuning the shipped models, else the recipe's epochs"),
    from_shipped: Optional[bool] = typer.Option(None, "--from-shipped/--from-scratch",
                                                help="start from the shipped real-lesion models (fine-tune) or "
                                                "train the presets from random weights; default: shipped for "
                                                "--dataset folder on a machine without a GPU, else scratch"),
):
    """Distil a student from a teacher with EFKD, evaluate both, and write a run folder.

    With no options: the built-in synthetic set, tiny presets, the shipped tiny teacher.
    """
    # every setting is checked before any model, dataset or run folder is touched
    _check_sampler("--eval", eval_steps, eval_ensemble, eval_images)
    _check_minutes(minutes)
    overrides = _overrides(config, set_, kd=kd, tau=tau, lambda_e=lambda_e, lambda_b=lambda_b, epochs=epochs,
                           max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed, num_workers=num_workers)
    teacher_overrides = parse_sets(teacher_set)
    saved_s = _run_settings("student", overrides, runs_dir, run_name, resume)
    saved_t = _run_settings("teacher", teacher_overrides, runs_dir, run_name, resume)
    saved_any = saved_s or saved_t or {}
    dataset = dataset or saved_any.get("dataset") or "synthetic"
    data_dir = (saved_any.get("data_dir") if data_dir is None or same_folder(data_dir, saved_any.get("data_dir"))
                else str(data_dir))
    student_preset = student_preset or (saved_s or {}).get("preset")
    teacher_preset = teacher_preset or (saved_t or {}).get("preset")
    job_s = {"dataset": dataset, "data_dir": data_dir, "preset": student_preset}
    overrides = _checked("student", overrides, saved_s, job_s)
    teacher_overrides = _checked("teacher", teacher_overrides, saved_t, {**job_s, "preset": teacher_preset},
                                 label="--teacher-set (the teacher trained here)")
    _check_checkpoint_file(teacher)
    _check_checkpoint_file(overrides.get("init_from"))
    _check_checkpoint_file(teacher_overrides.get("init_from"))

    from edgeseg.evaluate import SamplerSettings
    from edgeseg.pipeline import DistillJob, run_distill

    job = DistillJob(
        dataset=dataset, data_dir=data_dir, teacher=str(teacher) if teacher else None,
        teacher_preset=teacher_preset, student_preset=student_preset, run_name=run_name, runs_dir=str(runs_dir),
        resume=resume, overrides=overrides, teacher_overrides=teacher_overrides,
        eval=SamplerSettings("ddim", eval_steps, eval_ensemble),
        eval_images=eval_images, minutes=minutes, from_shipped=from_shipped,
    )
    run_distill(job)


@user_errors(interrupted=training_interrupted, hold_warnings=False)
def train_teacher(
    dataset: Optional[str] = typer.Option(None, help="synthetic (built in, the default), isic2017, isic2018, "
                                          "ham10000, ph2 or folder; with --resume: the run's"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (not needed for synthetic)"),
    preset: Optional[str] = typer.Option(None, help="teacher preset (default by dataset)"),
    epochs: Optional[int] = typer.Option(None, help="training epochs (paper 2000; tiny recipe 12)"),
    max_steps: Optional[int] = typer.Option(None, help="stop after this many optimizer steps"),
    batch_size: Optional[int] = typer.Option(None, help="global batch size (paper 16)"),
    lr: Optional[float] = typer.Option(None, help="learning rate (paper 1e-4 for the teacher)"),
    seed: Optional[int] = typer.Option(None, min=0, max=SEED_MAX, help="seed"),
    config: Optional[Path] = typer.Option(None, help="TOML/YAML/JSON file of training settings"),
    set_: List[str] = typer.Option([], "--set", help="any training setting as name=value (repeatable)"),
    run_name: Optional[str] = typer.Option(None, help="run folder name under --runs-dir"),
    runs_dir: Path = typer.Option(Path("runs"), help="where run folders go"),
    resume: bool = typer.Option(False, help="continue the run folder --run-name"),
    minutes: Optional[float] = typer.Option(None, help="time budget of the whole job in minutes (training and "
                                            "evaluation); the best epoch within it ships. Default: 10 when "
                                            "fine-tuning the shipped models, else the recipe's epochs"),
    from_shipped: Optional[bool] = typer.Option(None, "--from-shipped/--from-scratch",
                                                help="start from the shipped real-lesion models (fine-tune) or "
                                                "train the presets from random weights; default: shipped for "
                                                "--dataset folder on a machine without a GPU, else scratch"),
):
    """Train a teacher (DermoSegDiff) with the same engine; writes <run>/teacher.safetensors."""
    _check_minutes(minutes)
    overrides = _overrides(config, set_, epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed)
    saved = _run_settings("teacher", overrides, runs_dir, run_name, resume) or {}
    dataset = dataset or saved.get("dataset") or "synthetic"
    data_dir = (saved.get("data_dir") if data_dir is None or same_folder(data_dir, saved.get("data_dir"))
                else str(data_dir))
    preset = preset or saved.get("preset")
    overrides = _checked("teacher", overrides, saved or None, {"dataset": dataset, "data_dir": data_dir,
                                                                  "preset": preset})
    _check_checkpoint_file(overrides.get("init_from"))

    from edgeseg.pipeline import DistillJob, run_train_teacher

    job = DistillJob(dataset=dataset, data_dir=data_dir, teacher_preset=preset,
                     run_name=run_name, runs_dir=str(runs_dir), resume=resume, teacher_overrides=overrides,
                     minutes=minutes, from_shipped=from_shipped)
    run = run_train_teacher(job)
    typer.echo(f"teacher written to {run / 'teacher.safetensors'}")
