"""`edgeseg evaluate`: score a checkpoint on a dataset split."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgeseg.cli.common import SEED_MAX, given_path, user_errors


def _settings(protocol: str, steps: Optional[int], ensemble: Optional[int], prediction_type: str):
    """The sampler: the paper's DDPM 250 x 9, or DDIM with the defaults table's K and N."""
    from edgeseg.defaults import sampler_defaults
    from edgeseg.errors import EdgesegError
    from edgeseg.evaluate import PAPER_PROTOCOL, SamplerSettings

    if protocol == "paper":
        return SamplerSettings("ddpm", 250, ensemble or PAPER_PROTOCOL.ensemble)
    if protocol == "ddim":
        dk, dn = sampler_defaults(prediction_type)
        return SamplerSettings("ddim", steps or dk, ensemble or dn)
    raise EdgesegError(f"--protocol must be 'paper' (DDPM 250 x 9) or 'ddim', got {protocol!r}")


@user_errors
def evaluate_cmd(
    checkpoint: Optional[Path] = typer.Option(None, help="weights file, run folder or shipped model name; default: "
                                              "the newest run, else the shipped real-lesion model"),
    which: str = typer.Option("student", help="student or teacher, when --checkpoint is a run folder"),
    runs_dir: Path = typer.Option(Path("runs"), help="where to look for the newest run"),
    dataset: Optional[str] = typer.Option(None, help="dataset to evaluate on (isic2017, ph2, isic2018, ham10000, "
                                          "folder, synthetic); default: the checkpoint's own, if its folder is here, "
                                          "else synthetic"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder"),
    split: str = typer.Option("test", help="train | val | test | all"),
    protocol: str = typer.Option("ddim", help="paper (DDPM 250 steps x 9, averaged) or ddim"),
    steps: Optional[int] = typer.Option(None, min=1, max=250, help="DDIM steps (default: the defaults table, 1 for x0 models)"),
    ensemble: Optional[int] = typer.Option(None, min=1, max=64, help="ensemble size (default 3 for ddim, 9 for paper)"),
    max_images: Optional[int] = typer.Option(None, min=1, help="only the first N images"),
    out: Optional[str] = typer.Option(None, help="folder for the JSON and overlays (default: the run folder; "
                                       "./evaluations for a shipped model)"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="sampling seed"),
):
    """Score a checkpoint (Table-I metrics + IoU, HD95, boundary F) and draw overlays."""
    from rich.console import Console

    from edgeseg.checkpoint import atomic_write_json, load_model, load_preset
    from edgeseg.data import load_dataset
    from edgeseg.evaluate import evaluate, format_table, metrics_summary, write_overlays
    from edgeseg.models import count_params
    from edgeseg.runlock import LOCK_NAME, claim_run_dir
    from edgeseg.runs import is_shipped, resolve_checkpoint, training_dataset

    out = given_path(out, "--out")
    path = resolve_checkpoint(checkpoint, which, runs_dir)
    out = out or (Path("evaluations") if is_shipped(path) else path.parent)
    if (out / LOCK_NAME).exists() or (not is_shipped(path) and out.resolve() == path.parent.resolve()):
        # a run folder belongs to one process: a training run still writing the student is
        # refused here, before its checkpoint is read (a stale lock is taken over with a warning)
        claim_run_dir(out, resume=True)
    model = load_model(path)
    dataset, data_dir, _ = training_dataset(load_preset(path)[1], dataset, data_dir)
    ds = load_dataset(dataset, split, data_dir=data_dir, size=model.preset.image_size)
    settings = _settings(protocol, steps, ensemble, model.preset.prediction_type)
    r = evaluate(model, ds, settings, max_images=max_images, seed=seed, label=model.preset.name)
    r["params"] = count_params(model)
    tag = f"{path.stem}-{split}-{settings.sampler}{settings.steps}x{settings.ensemble}"
    write_overlays(r["keep"], out / "overlays" / f"{tag}.png", title_prefix=f"{path.stem} ")
    atomic_write_json(out / f"eval-{tag}.json", {"checkpoint": str(path), "dataset": dataset, "split": split,
                                                 "params": r["params"], **metrics_summary(r)})
    Console(width=max(120, Console().width)).print(format_table({path.stem: r}, title=f"{dataset}/{split} ({r['n']} images)"))
    typer.echo(f"wrote {out / f'eval-{tag}.json'} and {out / 'overlays' / f'{tag}.png'}")
