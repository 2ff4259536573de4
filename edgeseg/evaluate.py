"""Evaluation: sample masks with the paper's protocol or few-step DDIM, score them, draw overlays.

Protocols:
  paper   ancestral DDPM, all 250 steps, 9 samples averaged, threshold 0 (the paper's Table I)
  ddim    deterministic DDIM over K trailing timesteps, an ensemble of N as a batch dimension
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from edgeseg.metrics import MetricAccumulator
from edgeseg.models import DermoSegDiff

__all__ = ["SamplerSettings", "PAPER_PROTOCOL", "predict", "evaluate", "eval_batch_size", "write_overlays",
           "format_table"]


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample: "ddim" (K steps, N members, eta) or "ddpm" (the paper's ancestral sampler).
    steps / ensemble None: the model's defaults from the one table, :mod:`edgeseg.defaults`."""

    sampler: str = "ddim"  # "ddim" or "ddpm"
    steps: int | None = None
    ensemble: int | None = None
    eta: float = 0.0  # DDIM only

    def describe(self) -> str:
        eta = f" eta {self.eta:g}" if self.eta else ""
        k = "default" if self.steps is None else self.steps
        n = "default" if self.ensemble is None else self.ensemble
        return f"{self.sampler.upper()} {k} steps x {n}{eta}"

    def resolved(self, prediction_type: str) -> "SamplerSettings":
        """These settings with the table's defaults filled in for a model of this prediction type."""
        from dataclasses import replace

        from edgeseg.defaults import sampler_defaults

        dk, dn = sampler_defaults(prediction_type)
        steps = self.steps if self.steps is not None else (250 if self.sampler == "ddpm" else dk)
        return replace(self, steps=steps, ensemble=self.ensemble if self.ensemble is not None else dn)

    def segmenter(self, model: DermoSegDiff, seed: int = 0):
        """The :class:`edgeseg.Segmenter` that runs these settings on `model`."""
        from edgeseg.segmenter import Segmenter

        steps = None if self.sampler == "ddpm" else self.steps
        return Segmenter.from_model(model, sampler=self.sampler, steps=steps, ensemble=self.ensemble, eta=self.eta,
                                    seed=seed)


PAPER_PROTOCOL = SamplerSettings("ddpm", 250, 9)

#: Ensemble members x pixels per sampler call on a CPU: calls that stay cache-sized run several
#: times faster per image than large ones (bench/results/eval-batch/).
CPU_PIXELS_PER_CALL = 6 * 128 * 128


def eval_batch_size(device: torch.device, image_size: int, ensemble: int) -> int:
    """Images per sampler call in :func:`evaluate`: 32 on a GPU; on a CPU as many as keep a call
    (images x ensemble members x pixels) within :data:`CPU_PIXELS_PER_CALL`, at least one."""
    if device.type != "cpu":
        return 32
    return max(1, CPU_PIXELS_PER_CALL // (ensemble * image_size * image_size))


@torch.no_grad()
def predict(model: DermoSegDiff, images: torch.Tensor, settings: SamplerSettings,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) over the ensemble for a batch of images; mean in [-1, 1], mask = mean > 0.
    One call of :meth:`edgeseg.Segmenter.predict` (build the Segmenter once for many batches)."""
    return settings.segmenter(model).predict(images, generator=generator)


@torch.no_grad()
def evaluate(model: DermoSegDiff, dataset, settings: SamplerSettings, batch_size: int | None = None, seed: int = 0,
             max_images: int | None = None, keep: int = 8, progress: bool = True, label: str = "",
             per_image: bool = False) -> dict:
    """Score `model` on `dataset`; returns {"metrics": {name: {"mean","std"}}, "n", "keep": [...]}.

    `keep` predictions (image, true mask, predicted mean, std) are returned for overlays;
    `per_image` adds {"per_image": {name: [value per image]}} (for paired comparisons).
    `batch_size` None: :func:`eval_batch_size`. With DDIM at eta 0 only the initial noise is drawn,
    batch after batch from one generator, so the batch size does not change an image's noise.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    settings = settings.resolved(model.preset.prediction_type)
    if batch_size is None:
        batch_size = eval_batch_size(next(model.parameters()).device, model.preset.image_size, settings.ensemble)
    subset = torch.utils.data.Subset(dataset, range(n))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False)
    gen = torch.Generator().manual_seed(seed)
    segmenter = settings.segmenter(model, seed)
    acc = MetricAccumulator()
    kept: list[tuple] = []
    prog = Progress(TextColumn(f"[bold]evaluate {label}[/] {settings.describe()}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), disable=not progress)
    with prog:
        task = prog.add_task("eval", total=n)
        for image, mask, _ in loader:
            mean, std = segmenter.predict(image, generator=gen)
            mean, std = mean.cpu(), std.cpu()
            acc.update_masks(mean > 0, mask > 0)
            for i in range(min(len(image), keep - len(kept))):
                kept.append((image[i], mask[i], mean[i], std[i]))
            prog.advance(task, len(image))
    out = {"metrics": acc.compute(), "n": n, "settings": settings.describe(), "keep": kept}
    if per_image:
        out["per_image"] = {k: v.tolist() for k, v in acc.per_sample().items()}
    return out


def write_overlays(kept, path: str | Path, title_prefix: str = "") -> Path:
    """A grid: each image with true (green) and predicted (magenta) outlines, and its uncertainty."""
    from edgeseg.metrics import dice
    from edgeseg.viz import draw_outlines, heatmap, save_grid

    tiles, labels = [], []
    for image, mask, mean, std in kept:
        d = float(dice((mean > 0)[None], (mask > 0)[None])[0])
        tiles += [draw_outlines(image, mask, mean), heatmap(std, vmax=1.0)]
        labels += [f"{title_prefix}Dice {d:.3f}", "ensemble spread"]
    return save_grid(tiles, path, cols=4, labels=labels)


def format_table(rows: dict[str, dict], title: str = "") -> "object":
    """A rich Table in the paper's Table I layout (+ IoU, HD95, BF) from {name: result dict}."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("model", "params", "protocol", "DSC", "IoU", "SE", "SP", "ACC", "HD95", "BF"):
        table.add_column(col, justify="left" if col in ("model", "protocol") else "right")
    for name, r in rows.items():
        m = r["metrics"]
        pct = lambda k: f"{100 * m[k]['mean']:.2f}"  # noqa: E731
        table.add_row(name, f"{r.get('params', float('nan')) / 1e6:.2f}M", r["settings"], pct("dsc"), pct("iou"),
                      pct("se"), pct("sp"), pct("acc"), f"{m['hd95']['mean']:.2f}", pct("bf"))
    return table


def metrics_summary(result: dict) -> dict:
    """Flatten an evaluate() result for metrics.json: {"dsc": mean, "dsc_std": std, ...}."""
    out = {}
    for k, v in result["metrics"].items():
        out[k] = float(v["mean"])
        out[f"{k}_std"] = float(v["std"])
    out["n_images"] = result["n"]
    out["protocol"] = result["settings"]
    return out

