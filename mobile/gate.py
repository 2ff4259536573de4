"""The parity gate every export passes: the exported program against eager PyTorch on held-out
images with the same K, N and noise; a program that fails (or does not load) is kept as
``<out>.failed`` with a ``"status": "failed"`` sidecar, and nothing is written at ``<out>``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edgeseg.errors import EdgesegError
from edgeseg.mobile import sidecar as sc
from edgeseg.mobile.placement import artefact_path, failed_path, incomplete_set, place

__all__ = ["PARITY_THRESHOLDS", "ProgramLoadError", "ParityReference", "RunProgram", "run_parity", "checked_parity",
           "dice_problem", "gate_and_place"]

PARITY_THRESHOLDS = {"none": 0.99, "int8": 0.97}


class ProgramLoadError(EdgesegError):
    """The written .pte does not initialise in the ExecuTorch runtime (e.g. XNNPACK rejects a node)."""


def _noise_for(n_images: int, batch: int, ensemble: int, size: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((batch * ensemble, 1, size, size), generator=gen) for _ in range(n_images // batch)]


def _eager_outputs(model: nn.Module, images: torch.Tensor, noises: list[torch.Tensor], steps: int, ensemble: int,
                   batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What `edgeseg segment` computes for these images and noises (the parity reference):
    (mean, std) per program call."""
    from edgeseg.segmenter import Segmenter

    seg = Segmenter.from_model(model, steps=steps, ensemble=ensemble, backend="torch")
    return [seg.predict(images[i * batch : (i + 1) * batch], noise=noise) for i, noise in enumerate(noises)]


@dataclass
class ParityReference:
    """The gate's inputs and eager outputs, per program call, and how far the program was from them."""

    images: list[torch.Tensor]
    noises: list[torch.Tensor]
    eager: list[tuple[torch.Tensor, torch.Tensor]]
    deviation: list[float]  # max |program - eager| over both outputs, per call


RunProgram = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def run_parity(run: RunProgram, model: nn.Module, images: torch.Tensor, steps: int, ensemble: int,
               batch: int = 1, seed: int = 0) -> tuple[dict, ParityReference]:
    """Mask Dice between an exported program (`run`: image batch, noise -> mean, std) and eager
    PyTorch with the same K, N and noise (seeded by `seed`), on `images`."""
    s = images.shape[-1]
    n = images.shape[0] - images.shape[0] % batch
    if n == 0:
        raise EdgesegError("parity check needs at least one held-out image")
    noises = _noise_for(n, batch, ensemble, s, seed)
    chunks = [images[i * batch : (i + 1) * batch].contiguous() for i in range(n // batch)]
    got = [tuple(t.float() for t in run(img, nz)[:2]) for img, nz in zip(chunks, noises)]
    eager = _eager_outputs(model, images[:n], noises, steps, ensemble, batch)
    dev = [max(float((g[0] - e[0]).abs().max()), float((g[1] - e[1]).abs().max())) for g, e in zip(got, eager)]
    prog_mean, eager_mean = torch.cat([g[0] for g in got]), torch.cat([e[0] for e in eager])
    dsc = sc.dice_masks(prog_mean > 0, eager_mean > 0)
    parity = {
        "mask_dsc_vs_eager": round(float(dsc.mean()), 6),
        "n_images": int(n),
        "min_dsc": round(float(dsc.min()), 6),
        "max_abs_diff_mean": round(float((prog_mean - eager_mean).abs().max()), 6),
        "max_abs_diff_std": round(max(float((g[1] - e[1]).abs().max()) for g, e in zip(got, eager)), 6),
        "eager_foreground_fraction": round(float((eager_mean > 0).float().mean()), 4),
        "noise_seed": seed,
    }
    return parity, ParityReference(chunks, noises, eager, dev)


def checked_parity(tmp: Path, out: Path, measure: Callable[[], tuple[dict, ParityReference]]
                    ) -> tuple[dict, ParityReference]:
    """`measure()`, the gate's parity run on the written program `tmp`; a program that does not load
    is kept as ``<out>.failed`` and is an EdgesegError."""
    try:
        return measure()
    except ProgramLoadError as e:
        failed = failed_path(out)
        os.replace(tmp, failed)
        raise EdgesegError(f"{e}; kept as {failed} for inspection, {out} was not written") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def dice_problem(parity: dict, threshold: float, quantize: str) -> str | None:
    if parity["mask_dsc_vs_eager"] >= threshold:
        return None
    return (f"parity check failed: mask Dice of the exported program vs eager PyTorch is "
            f"{parity['mask_dsc_vs_eager']:.4f} < {threshold} on {parity['n_images']} held-out images "
            f"({'int8' if quantize == 'int8' else 'fp32'})")


def gate_and_place(tmp: Path, out: Path, meta: dict, problem: str | None, overwrite: bool,
                    extras: dict[str, Path] | None = None) -> dict:
    """The end of every file export. With a `problem` the program goes to ``<out>.failed`` (its
    artefacts to ``<out>.failed<suffix>``, sidecar ``"status": "failed"``) and EdgesegError is
    raised; else the sidecar is written, then the artefacts and last the program are placed
    (:func:`place`): the program commits the set, so a reader (``segment --model``, ``profile``)
    never finds a program without its sidecar, and an export killed before its program landed
    leaves an incomplete set that the next export replaces (:func:`incomplete_set`).
    `extras` maps an artefact suffix (``.bpte``) to its temporary file."""
    extras = extras or {}
    try:
        final = failed_path(out) if problem else out
        for sfx in extras:
            meta.setdefault(_ARTEFACT_KEYS[sfx], {})["file"] = artefact_path(final, sfx).name
        if problem:
            for sfx, t in extras.items():
                os.replace(t, artefact_path(final, sfx))
            os.replace(tmp, final)
            meta.update(status="failed", file=final.name)
            sc.write_sidecar(final, meta)
            raise EdgesegError(f"{problem}; the program was kept as {final} for inspection and {out} was not written")
        incomplete = incomplete_set(out)
        meta = sc.write_sidecar(out, meta, program=tmp)
        for sfx, t in extras.items():
            place(t, artefact_path(out, sfx), overwrite or incomplete)
        place(tmp, out, overwrite)
    finally:
        for t in (tmp, *extras.values()):
            t.unlink(missing_ok=True)
    meta["path"] = str(out)
    return meta


_ARTEFACT_KEYS = {".etrecord": "etrecord", ".bpte": "bundled_program"}
