"""`edgeseg distill`, `edgeseg train-teacher`, `edgeseg evaluate`, `edgeseg segment`."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from edgeseg.cli.common import parse_sets, read_settings, user_errors

_KD_HELP = "knowledge distillation: efkd (edge-focused, paper Eq. 3-7), global (Eq. 2) or none"


def _overrides(config: Optional[Path], sets: List[str], **explicit) -> dict:
    """Settings file < --set < explicit options (only those given)."""
    out = read_settings(config)
    out.update(parse_sets(sets))
    out.update({k: v for k, v in explicit.items() if v is not None})
    return out


@user_errors
def distill(
    dataset: str = typer.Option("synthetic", help="synthetic (built in), isic2018, ham10000 or folder"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (not needed for synthetic)"),
    teacher: Optional[Path] = typer.Option(None, help="teacher checkpoint (.safetensors); default: the shipped "
                                           "tiny teacher for synthetic, else train one first"),
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
    seed: Optional[int] = typer.Option(None, help="seed for init, data order, noise and timesteps"),
    num_workers: Optional[int] = typer.Option(None, help="data-loader worker processes"),
    config: Optional[Path] = typer.Option(None, help="TOML/YAML/JSON file of training settings"),
    set_: List[str] = typer.Option([], "--set", help="any student training setting as name=value (repeatable)"),
    teacher_set: List[str] = typer.Option([], "--teacher-set", help="a teacher training setting as name=value, "
                                          "when the teacher is trained here (repeatable)"),
    run_name: Optional[str] = typer.Option(None, help="run folder name under --runs-dir"),
    runs_dir: Path = typer.Option(Path("runs"), help="where run folders go"),
    resume: bool = typer.Option(False, help="continue the run folder --run-name from its last checkpoint"),
    eval_steps: int = typer.Option(2, help="DDIM steps for the final evaluation"),
    eval_ensemble: int = typer.Option(3, help="ensemble size for the final evaluation"),
    eval_images: Optional[int] = typer.Option(None, help="evaluate on the first N test images only"),
):
    """Distil a student from a teacher with EFKD, evaluate both, and write a run folder.

    With no options: the built-in synthetic set, tiny presets, the shipped tiny teacher.
    """
    from edgeseg.evaluate import SamplerSettings
    from edgeseg.pipeline import DistillJob, run_distill

    overrides = _overrides(config, set_, kd=kd, tau=tau, lambda_e=lambda_e, lambda_b=lambda_b, epochs=epochs,
                           max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed, num_workers=num_workers)
    job = DistillJob(
        dataset=dataset, data_dir=str(data_dir) if data_dir else None, teacher=str(teacher) if teacher else None,
        teacher_preset=teacher_preset, student_preset=student_preset, run_name=run_name, runs_dir=str(runs_dir),
        resume=resume, overrides=overrides, teacher_overrides=parse_sets(teacher_set),
        eval=SamplerSettings("ddim", eval_steps, eval_ensemble),
        eval_images=eval_images,
    )
    run_distill(job)


@user_errors
def train_teacher(
    dataset: str = typer.Option("synthetic", help="synthetic (built in), isic2018, ham10000 or folder"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (not needed for synthetic)"),
    preset: Optional[str] = typer.Option(None, help="teacher preset (default by dataset)"),
    epochs: Optional[int] = typer.Option(None, help="training epochs (paper 2000; tiny recipe 12)"),
    max_steps: Optional[int] = typer.Option(None, help="stop after this many optimizer steps"),
    batch_size: Optional[int] = typer.Option(None, help="global batch size (paper 16)"),
    lr: Optional[float] = typer.Option(None, help="learning rate (paper 1e-4 for the teacher)"),
    seed: Optional[int] = typer.Option(None, help="seed"),
    config: Optional[Path] = typer.Option(None, help="TOML/YAML/JSON file of training settings"),
    set_: List[str] = typer.Option([], "--set", help="any training setting as name=value (repeatable)"),
    run_name: Optional[str] = typer.Option(None, help="run folder name under --runs-dir"),
    runs_dir: Path = typer.Option(Path("runs"), help="where run folders go"),
    resume: bool = typer.Option(False, help="continue the run folder --run-name"),
):
    """Train a teacher (DermoSegDiff) with the same engine; writes <run>/teacher.safetensors."""
    from edgeseg.pipeline import DistillJob, run_train_teacher

    overrides = _overrides(config, set_, epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed)
    job = DistillJob(dataset=dataset, data_dir=str(data_dir) if data_dir else None, teacher_preset=preset,
                     run_name=run_name, runs_dir=str(runs_dir), resume=resume, teacher_overrides=overrides)
    run = run_train_teacher(job)
    typer.echo(f"teacher written to {run / 'teacher.safetensors'}")


def _settings(protocol: str, steps: Optional[int], ensemble: Optional[int]):
    from edgeseg.errors import EdgesegError
    from edgeseg.evaluate import PAPER_PROTOCOL, SamplerSettings
    from edgeseg.pipeline import DEFAULT_EVAL

    if protocol == "paper":
        return SamplerSettings("ddpm", 250, ensemble or PAPER_PROTOCOL.ensemble)
    if protocol == "ddim":
        return SamplerSettings("ddim", steps or DEFAULT_EVAL.steps, ensemble or DEFAULT_EVAL.ensemble)
    raise EdgesegError(f"--protocol must be 'paper' (DDPM 250 x 9) or 'ddim', got {protocol!r}")


@user_errors
def evaluate_cmd(
    checkpoint: Optional[Path] = typer.Option(None, help="weights file or run folder; default: newest run"),
    which: str = typer.Option("student", help="student or teacher, when --checkpoint is a run folder"),
    runs_dir: Path = typer.Option(Path("runs"), help="where to look for the newest run"),
    dataset: str = typer.Option("synthetic", help="dataset to evaluate on"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder"),
    split: str = typer.Option("test", help="train | val | test"),
    protocol: str = typer.Option("ddim", help="paper (DDPM 250 steps x 9, averaged) or ddim"),
    steps: Optional[int] = typer.Option(None, help="DDIM steps (default 2)"),
    ensemble: Optional[int] = typer.Option(None, help="ensemble size (default 3 for ddim, 9 for paper)"),
    max_images: Optional[int] = typer.Option(None, help="only the first N images"),
    out: Optional[Path] = typer.Option(None, help="folder for report.json and overlays (default: the run folder)"),
    seed: int = typer.Option(0, help="sampling seed"),
):
    """Score a checkpoint (Table-I metrics + IoU, HD95, boundary F) and draw overlays."""
    from rich.console import Console

    from edgeseg.checkpoint import atomic_write_json, load_model
    from edgeseg.data import load_dataset
    from edgeseg.evaluate import evaluate, format_table, metrics_summary, write_overlays
    from edgeseg.models import count_params
    from edgeseg.runs import resolve_checkpoint

    path = resolve_checkpoint(checkpoint, which, runs_dir)
    model = load_model(path)
    ds = load_dataset(dataset, split, data_dir=str(data_dir) if data_dir else None, size=model.preset.image_size)
    settings = _settings(protocol, steps, ensemble)
    r = evaluate(model, ds, settings, max_images=max_images, seed=seed, label=model.preset.name)
    r["params"] = count_params(model)
    out = out or path.parent
    tag = f"{path.stem}-{split}-{settings.sampler}{settings.steps}x{settings.ensemble}"
    write_overlays(r["keep"], out / "overlays" / f"{tag}.png", title_prefix=f"{path.stem} ")
    atomic_write_json(out / f"eval-{tag}.json", {"checkpoint": str(path), "dataset": dataset, "split": split,
                                                 "params": r["params"], **metrics_summary(r)})
    Console(width=max(120, Console().width)).print(format_table({path.stem: r}, title=f"{dataset}/{split} ({r['n']} images)"))
    typer.echo(f"wrote {out / f'eval-{tag}.json'} and {out / 'overlays' / f'{tag}.png'}")


@user_errors
def segment(
    images: List[Path] = typer.Argument(..., help="image files (jpg/png)"),
    checkpoint: Optional[Path] = typer.Option(None, help="weights file or run folder; default: newest run's student"),
    model: Optional[Path] = typer.Option(None, "--model", help="an exported .pte to run with the ExecuTorch runtime"),
    runs_dir: Path = typer.Option(Path("runs"), help="where to look for the newest run"),
    steps: Optional[int] = typer.Option(None, help="DDIM steps (eager checkpoints; default 2)"),
    ensemble: Optional[int] = typer.Option(None, help="ensemble size (eager checkpoints; default 3)"),
    out: Path = typer.Option(Path("segmentations"), help="output folder"),
    seed: int = typer.Option(0, help="sampling seed"),
):
    """Segment images: writes <name>_mask.png, <name>_overlay.png and <name>_uncertainty.png."""
    import cv2
    import numpy as np
    import torch

    from edgeseg.errors import EdgesegError
    from edgeseg.viz import draw_outlines, heatmap

    if model is not None:
        from edgeseg.mobile.runtime import PteSegmenter

        seg = PteSegmenter(model)
        size, threshold = seg.image_size[0], seg.threshold
        run = lambda x: seg(x, seed=seed)  # noqa: E731
    else:
        from edgeseg.checkpoint import load_model
        from edgeseg.evaluate import predict
        from edgeseg.runs import resolve_checkpoint

        net = load_model(resolve_checkpoint(checkpoint, "student", runs_dir))
        size, threshold = net.preset.image_size, 0.0
        settings = _settings("ddim", steps, ensemble)
        run = lambda x: predict(net, x, settings, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)
    for path in images:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise EdgesegError(f"{path}: not a readable image")
        h, w = bgr.shape[:2]
        rgb = cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
        mean, std = run(x)
        mask = (mean[0, 0] > threshold).numpy().astype(np.uint8)
        full = cv2.resize(mask * 255, (w, h), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(out / f"{path.stem}_mask.png"), full)
        overlay = draw_outlines(x[0], None, mean[0], scale=max(1, 256 // size))
        cv2.imwrite(str(out / f"{path.stem}_overlay.png"), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(out / f"{path.stem}_uncertainty.png"),
                    cv2.cvtColor(heatmap(std[0], scale=max(1, 256 // size), vmax=1.0), cv2.COLOR_RGB2BGR))
        typer.echo(f"{path}: lesion {100 * mask.mean():.1f}% of the image, mean ensemble spread "
                   f"{float(std.mean()):.3f} -> {out / (path.stem + '_mask.png')}")
