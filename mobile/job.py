"""What every export of the student resolves first (the model, K and N, the output path, the
images' dataset) and the one program they all trace: the Segmenter's core, torch.export-ed and
constant-folded (int8: PT2E-quantized)."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edgeseg.defaults import sampler_defaults
from edgeseg.diffusion import SamplerCore
from edgeseg.errors import EdgesegError, ExportError
from edgeseg.mobile.fold import prepare_for_export
from edgeseg.mobile.placement import check_output
from edgeseg.runs import training_dataset

__all__ = ["CALIBRATION_IMAGES", "PARITY_IMAGES", "Progress", "say", "quiet", "quiet_import", "load_for_export",
           "ExportJob", "load_images", "export_images", "calibration_info", "export_program", "exported_core"]

CALIBRATION_IMAGES = 32
PARITY_IMAGES = 16

Progress = Callable[[str], None]

def say(progress: Progress | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


@contextlib.contextmanager
def quiet_import():
    """Import coremltools / torchao without their log lines about optional native parts
    (scikit-learn versions, proxies that exist on macOS only) on the user's terminal."""
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def quiet():
    """The export stack warns per graph node (deprecations); keep the user's terminal readable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------------------
# inputs: model, data
# ----------------------------------------------------------------------------------------
def load_for_export(model_or_ckpt: nn.Module | str | Path | None) -> tuple[nn.Module, str | None, dict]:
    """(eval model, checkpoint path or None, checkpoint JSON) from a model, a file/run folder, or None."""
    if isinstance(model_or_ckpt, nn.Module):
        if not hasattr(model_or_ckpt, "preset"):
            raise EdgesegError("export needs an edgeseg DermoSegDiff model (with a preset)")
        return model_or_ckpt.eval(), None, {}
    from edgeseg.checkpoint import load_model, load_preset
    from edgeseg.runs import resolve_checkpoint

    path = resolve_checkpoint(model_or_ckpt, which="student")
    model = load_model(path).eval()
    _, meta = load_preset(path)
    return model, str(path), meta


@dataclass
class ExportJob:
    """What both exports resolve first: the model, K and N, the output path, the images' dataset."""

    model: nn.Module
    checkpoint: str | None
    steps: int
    ensemble: int
    out: Path
    dataset: str
    data_dir: str | None
    data_seed: int
    training_data: str | None = None  # the checkpoint's training dataset (None: not recorded)

    @classmethod
    def resolve(cls, model_or_ckpt, out, steps, ensemble, quantize: str, dataset, data_dir, target: str, ext: str,
                tags: dict[str, str], overwrite: bool = True) -> "ExportJob":
        if quantize not in tags:
            raise EdgesegError(f"--quantize must be one of {', '.join(tags)} for {target}, got {quantize!r}")
        for name, v, hi in (("--steps", steps, 250), ("--ensemble", ensemble, 64)):
            if v is not None and not 1 <= int(v) <= hi:
                raise ExportError(f"{name} must be from 1 to {hi}, got {v}")
        if out is not None:  # an explicit output path is checked before the model loads
            check_output(Path(out), ext, overwrite)
        model, checkpoint, ck_meta = load_for_export(model_or_ckpt)
        p = model.preset
        dk, dn = sampler_defaults(p.prediction_type)
        steps, ensemble = int(steps or dk), int(ensemble or dn)
        if out is None:
            # the preset name is a validated identifier (edgeseg.models.NAME_RE): a plain file name
            # in the working folder, never a path taken from the checkpoint's JSON
            name = f"{p.name}-k{steps}n{ensemble}-{tags[quantize]}{ext}"
            if Path(name).name != name or name.startswith("."):
                raise ExportError(f"preset name {p.name!r} cannot name an output file; pass --out")
            out = Path(name)
        out = Path(out)
        check_output(out, ext, overwrite)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExportError(f"{out.parent}: cannot create the output folder ({e.strerror or e})") from None
        dataset, data_dir, data_seed = training_dataset(ck_meta, dataset, data_dir)
        cfg = ck_meta.get("train_config") if isinstance(ck_meta.get("train_config"), dict) else {}
        trained_on = cfg.get("dataset") or ck_meta.get("dataset")
        return cls(model, checkpoint, steps, ensemble, out, dataset, data_dir, data_seed,
                   str(trained_on) if trained_on else None)


def load_images(dataset: str, split: str, n: int, size: int, data_dir=None, seed: int = 0) -> torch.Tensor:
    """`n` images (n x 3 x size x size, float32 [0, 1]) spread evenly over a split, as the dataset gives them."""
    from edgeseg.data import load_dataset

    ds = load_dataset(dataset, split, data_dir=data_dir, size=size, augment=False, seed=seed)
    total = len(ds)
    n = min(n, total)
    idx = torch.linspace(0, total - 1, n).round().long().unique().tolist()
    return torch.stack([ds[i][0] for i in idx])


def export_images(job: ExportJob, n_parity: int, n_calibration: int, progress: Progress | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(held-out parity images, calibration images or None when `n_calibration` is 0), loaded before
    any progress line: a bad dataset is the only line the user sees."""
    s = job.model.preset.image_size
    parity_images = load_images(job.dataset, "test", n_parity, s, job.data_dir, job.data_seed)
    calib = load_images(job.dataset, "train", n_calibration, s, job.data_dir, job.data_seed) if n_calibration else None
    say(progress, f"loaded {len(parity_images)} held-out images ({job.dataset}, test split)"
         + (f" and {len(calib)} calibration images" if calib is not None else ""))
    return parity_images, calib


def calibration_info(job: ExportJob, calib: torch.Tensor | None, **extra) -> dict | None:
    if calib is None:
        return None
    return {"dataset": job.dataset, "split": "train", "n_images": int(len(calib)), "noise": "standard normal, seed 1234",
            "timesteps": "the program's own K timesteps, on the sampler's trajectory", **extra}


def export_program(
    model: nn.Module, steps: int, ensemble: int, batch: int = 1, quantize: str = "none",
    calibration_images: torch.Tensor | None = None, progress: Progress | None = None,
    prepare: Callable[[nn.Module], nn.Module] = prepare_for_export, fold_constants: bool = True,
) -> tuple[torch.export.ExportedProgram, SamplerCore]:
    """torch.export of the Segmenter's core on the prepared network (int8 q/dq graph when
    quantize == "int8"): the exported program is ``Segmenter.from_model(...).core``."""
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    if quantize not in ("none", "int8"):
        raise EdgesegError(f"--quantize must be none or int8 for ExecuTorch, got {quantize!r}")
    s = model.preset.image_size
    seg = exported_core(prepare(model), steps, ensemble, untie=quantize == "int8")
    example = (torch.rand(batch, 3, s, s), torch.randn(batch * ensemble, 1, s, s))
    with quiet(), torch.no_grad():
        ep = torch.export.export(seg, example, strict=False)
        if fold_constants:
            # the K timesteps are fixed: their time embeddings and every block's scale/shift become
            # constants. Folded BEFORE quantizing (after, it would un-quantize the int8 weights).
            ep = constant_prop_pass(ep)
        if quantize == "int8":
            from edgeseg.mobile.quantize import calibration_batches, quantize_int8

            if calibration_images is None or len(calibration_images) < batch:
                raise EdgesegError("int8 quantization needs calibration images")
            say(progress, f"calibrating int8 on {len(calibration_images)} training images")
            ep = quantize_int8(ep, example, calibration_batches(calibration_images, ensemble, batch))
    return ep, seg


def exported_core(net: nn.Module, steps: int, ensemble: int, untie: bool = False) -> SamplerCore:
    """The module every export traces: :class:`edgeseg.Segmenter`'s core (plain torch DDIM step,
    eta = 0), with per-step copies of the network when `untie` (int8, see SamplerCore.untie_steps)."""
    from edgeseg.segmenter import Segmenter

    core = Segmenter.from_model(net, steps=steps, ensemble=ensemble, backend="torch").core
    return (core.untie_steps() if untie else core).eval()
