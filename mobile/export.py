"""Export the whole few-step segmenter to ExecuTorch (.pte, XNNPACK), CoreML (.mlpackage) and ONNX.

ExecuTorch (:func:`export_executorch`)::

    network --prepare_for_export--> Segmenter(K, N).core --torch.export--> constant folding
      (the time embeddings and per-block scale/shift of the K fixed timesteps become constants)
      --[int8: PT2E, XNNPACK quantizer, calibrated on training images]-->
      to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()]) --> .pte
      (+ <out>.etrecord, <out>.bpte: see edgeseg.mobile.devtools)

then the parity gate: the .pte runs in ExecuTorch's Python runtime on held-out images with
the same K, N and noise as eager PyTorch (:meth:`edgeseg.Segmenter.predict` on the original,
unfolded network); the mean Dice between the thresholded masks must reach 0.99 (fp32) or 0.97
(int8), and the bundled program (the first held-out images, eager outputs, the tolerance the
gate justifies) must verify in the runtime. **On failure** the program is moved to
``<out>.failed`` (with ``<out>.failed.json``, ``"status": "failed"``, and its artefacts as
``<out>.failed.etrecord`` / ``.bpte``), ``<out>`` itself is not written (an earlier file there is
left as it was) and :class:`~edgeseg.errors.EdgesegError` is raised, which the CLI turns into
one line and exit code 2.

CoreML (:func:`export_coreml`): ``coremltools.convert`` on the same exported program
(decomposed to ATen), mlprogram, fp16 compute precision, optional int8 (linear symmetric,
per channel) or palettised (k-means LUT) weights via ``coremltools.optimize.coreml``, with the
model's metadata and I/O descriptions. CoreML cannot execute on Linux: parity is measured only
on macOS, elsewhere the sidecar says so and what is checked is the structure (mlprogram,
inputs/outputs and their descriptions, metadata, fp16 ops, compressed weights).

ONNX: :mod:`edgeseg.mobile.onnx_export` (the same traced program, gated in ONNX Runtime).

All write ``<out>.json`` (see :mod:`edgeseg.mobile.sidecar`).
"""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edgeseg.defaults import SAMPLER_DEFAULTS, sampler_defaults
from edgeseg.errors import EdgesegError, ExportError
from edgeseg.mobile import sidecar as sc
from edgeseg.runs import training_dataset
from edgeseg.mobile.fold import prepare_for_export
from edgeseg.diffusion import SamplerCore

__all__ = [
    "DEFAULTS", "PARITY_THRESHOLDS", "default_steps_ensemble", "load_for_export", "export_program",
    "lower_executorch", "to_program", "count_delegates", "export_executorch", "export_coreml", "inspect_mlpackage",
    "export_unet_pte",
]

# Default (K, N) per prediction type: the one table in edgeseg.defaults.
DEFAULTS = SAMPLER_DEFAULTS
PARITY_THRESHOLDS = {"none": 0.99, "int8": 0.97}
# Bumped whenever the exported program changes for the same model, K and N (caches compare it).
# 2: conv-only int8 with per-step weight copies, reshape-free GroupNorm, short constant keys.
# 3: linear attention with separate q/k/v convs (k/v context first): less program memory.
# 4: XNNPACK convolutions with transient indirection buffers (workarounds.transient_conv_indirection).
# 5: int8 joins: adds, multiplies and like-range concatenations of int8 tensors stay int8.
EXPORT_RECIPE = 5
CALIBRATION_IMAGES = 32
PARITY_IMAGES = 16

Progress = Callable[[str], None]


class ProgramLoadError(EdgesegError):
    """The written .pte does not initialise in the ExecuTorch runtime (e.g. XNNPACK rejects a node)."""


default_steps_ensemble = sampler_defaults


def _say(progress: Progress | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


@contextlib.contextmanager
def _quiet_import():
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
def _quiet():
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
class _ExportJob:
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
                tags: dict[str, str], overwrite: bool = True) -> "_ExportJob":
        if quantize not in tags:
            raise EdgesegError(f"--quantize must be one of {', '.join(tags)} for {target}, got {quantize!r}")
        for name, v, hi in (("--steps", steps, 250), ("--ensemble", ensemble, 64)):
            if v is not None and not 1 <= int(v) <= hi:
                raise ExportError(f"{name} must be from 1 to {hi}, got {v}")
        if out is not None:  # an explicit output path is checked before the model loads
            check_output(Path(out), ext, overwrite)
        model, checkpoint, ck_meta = load_for_export(model_or_ckpt)
        p = model.preset
        dk, dn = default_steps_ensemble(p.prediction_type)
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


_KINDS = {".pte": "an ExecuTorch program", ".mlpackage": "a CoreML ML program", ".onnx": "an ONNX model"}
#: Files written beside the model, named by appending the suffix (``m.pte`` -> ``m.pte.bpte``).
ARTEFACTS = {".pte": {".etrecord": "an ETRecord", ".bpte": "a bundled program"}}


def artefact_path(out: str | Path, suffix: str) -> Path:
    """``model.pte`` + ``.bpte`` -> ``model.pte.bpte`` (appended, like the sidecar's ``.json``)."""
    out = Path(out)
    return out.with_name(out.name + suffix)


def check_output(out: Path, ext: str, overwrite: bool) -> None:
    """ExportError unless `out`, its sidecar ``<out>.json`` and its other artefacts (a .pte's
    ``.etrecord`` and ``.bpte``) may be written: the right suffix, not taken (unless `overwrite`;
    the leftovers of an incomplete set, one without its program, are replaced), and of a kind
    that can be replaced (a .pte or .onnx is a file, a .mlpackage a folder)."""
    kind = _KINDS.get(ext, "a model")
    if out.suffix != ext:
        raise ExportError(f"{out}: {kind} must end in {ext}")
    paths = {out: kind, sc.sidecar_path(out): "a sidecar"}
    paths.update({artefact_path(out, sfx): what for sfx, what in ARTEFACTS.get(ext, {}).items()})
    incomplete = _incomplete_set(out)
    for path, what_for in paths.items():
        if not (path.exists() or path.is_symlink()):
            continue
        if not overwrite and not incomplete:
            raise ExportError(f"{path} exists; pass --overwrite to replace it (or choose another --out)")
        want_dir = path == out and ext == ".mlpackage"
        if path.is_symlink() or (path.is_dir() != want_dir) or not (path.is_dir() or path.is_file()):
            what = "a folder" if path.is_dir() else "not a regular file"
            raise ExportError(f"{path} is {what}; it cannot be replaced by {what_for}")
    if out.parent.exists() and not out.parent.is_dir():
        raise ExportError(f"{out.parent} is not a folder")


def _incomplete_set(out: Path) -> bool:
    """True for what an export killed before its program landed leaves: no program, and a
    sidecar that an edgeseg export wrote for this very file (any other file there is kept)."""
    if out.exists() or out.is_symlink():
        return False
    side = sc.sidecar_path(out)
    try:
        meta = sc.read_sidecar(out) if side.is_file() else None
    except EdgesegError:
        return False
    return isinstance(meta, dict) and meta.get("file") == out.name and "contract_sha256" in meta


def _place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished `tmp` to `out` in one step. Without `overwrite` a file that appeared at
    `out` meanwhile is never replaced (a hard link cannot clobber; rsync's temp-and-rename,
    git's no-clobber)."""
    if overwrite:
        if out.is_dir() and not out.is_symlink() and tmp.is_dir():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return
    if tmp.is_dir():
        if out.exists() or out.is_symlink():
            raise ExportError(f"{out} appeared during the export; not replaced (pass --overwrite)")
        os.rename(tmp, out)
        return
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise ExportError(f"{out} appeared during the export; not replaced (pass --overwrite)") from None
    except OSError:  # no hard links here (some network/FUSE file systems): check, then rename
        if out.exists() or out.is_symlink():
            raise ExportError(f"{out} appeared during the export; not replaced (pass --overwrite)") from None
        os.replace(tmp, out)
        return
    tmp.unlink()


def _temp_path(out: Path, suffix: str) -> Path:
    """A fresh private name beside `out` (two exports to one path never share a temp file)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=suffix)
    os.close(fd)
    from edgeseg.checkpoint import new_file_mode

    os.chmod(tmp, new_file_mode())
    return Path(tmp)


def load_images(dataset: str, split: str, n: int, size: int, data_dir=None, seed: int = 0) -> torch.Tensor:
    """`n` images (n x 3 x size x size, float32 [0, 1]) spread evenly over a split, as the dataset gives them."""
    from edgeseg.data import load_dataset

    ds = load_dataset(dataset, split, data_dir=data_dir, size=size, augment=False, seed=seed)
    total = len(ds)
    n = min(n, total)
    idx = torch.linspace(0, total - 1, n).round().long().unique().tolist()
    return torch.stack([ds[i][0] for i in idx])


# ----------------------------------------------------------------------------------------
# the program
# ----------------------------------------------------------------------------------------
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
    with _quiet(), torch.no_grad():
        ep = torch.export.export(seg, example, strict=False)
        if fold_constants:
            # the K timesteps are fixed: their time embeddings and every block's scale/shift become
            # constants. Folded BEFORE quantizing (after, it would un-quantize the int8 weights).
            ep = constant_prop_pass(ep)
        if quantize == "int8":
            from edgeseg.mobile.quantize import calibration_batches, quantize_int8

            if calibration_images is None or len(calibration_images) < batch:
                raise EdgesegError("int8 quantization needs calibration images")
            _say(progress, f"calibrating int8 on {len(calibration_images)} training images")
            ep = quantize_int8(ep, example, calibration_batches(calibration_images, ensemble, batch))
    return ep, seg


def exported_core(net: nn.Module, steps: int, ensemble: int, untie: bool = False) -> SamplerCore:
    """The module every export traces: :class:`edgeseg.Segmenter`'s core (plain torch DDIM step,
    eta = 0), with per-step copies of the network when `untie` (int8, see SamplerCore.untie_steps)."""
    from edgeseg.segmenter import Segmenter

    core = Segmenter.from_model(net, steps=steps, ensemble=ensemble, backend="torch").core
    return (core.untie_steps() if untie else core).eval()


def count_delegates(lowered) -> tuple[int, dict[str, int]]:
    """(number of executorch_call_delegate nodes, {op: count} of ops left outside delegates)."""
    gm = lowered.exported_program().graph_module
    calls, other = 0, Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(getattr(node.target, "__name__", node.target))
        if "executorch_call_delegate" in name:
            calls += 1
        elif "getitem" not in name:
            other[name.split(":")[0].replace("<EdgeOpOverload", "").strip(" >")] += 1
    return calls, dict(other)


def lower_executorch(ep: torch.export.ExportedProgram, quantize: str = "none", etrecord: bool = False):
    """to_edge_transform_and_lower with the XNNPACK partitioner -> (EdgeProgramManager, calls, others).

    `quantize` is how `ep` was made: "int8" programs need the partitioner that matches the quantizer.
    With `etrecord` the managers record an ETRecord (``to_program(lowered).get_etrecord()``).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from edgeseg.mobile.workarounds import compact_constant_keys, int8_partitioner, transient_conv_indirection

    partitioner = int8_partitioner() if quantize == "int8" else XnnpackPartitioner()
    with _quiet(), compact_constant_keys(), transient_conv_indirection():
        lowered = to_edge_transform_and_lower(ep, partitioner=[partitioner], generate_etrecord=etrecord)
    calls, others = count_delegates(lowered)
    return lowered, calls, others


def to_program(lowered):
    """The ExecuTorch program of a lowered model, its data segments aligned to 16 bytes.

    The default 128-byte alignment pads each of the ~500 constants (XNNPACK copies and packs
    them at load, so 16 is enough): ~30 KB of zeros in a 0.8 MB program.
    """
    from executorch.exir import ExecutorchBackendConfig

    with _quiet():
        return lowered.to_executorch(ExecutorchBackendConfig(segment_alignment=16))


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


def parity_pte(path: str | Path, model: nn.Module, images: torch.Tensor, steps: int, ensemble: int,
               batch: int = 1, seed: int = 0) -> tuple[dict, ParityReference]:
    """:func:`run_parity` for a .pte in ExecuTorch's Python runtime (ProgramLoadError if it does not load)."""
    method = _load_method(path)
    return run_parity(lambda img, nz: method.execute((img, nz)), model, images, steps, ensemble, batch, seed)


def _load_method(path: str | Path):
    """The ``forward`` method of a .pte in ExecuTorch's Python runtime (ProgramLoadError if it does not load)."""
    from executorch.runtime import Runtime

    try:
        return Runtime.get().load_program(Path(path)).load_method("forward")
    except RuntimeError as e:
        raise ProgramLoadError(f"the exported program does not load in the ExecuTorch runtime ({e})") from None


def _common_sidecar(model, target, out: Path, steps, ensemble, batch, quantize, checkpoint, dataset):
    from edgeseg.sampling import make_scheduler

    p = model.preset
    scheduler = make_scheduler("ddim", steps, p.prediction_type, "torch", getattr(model, "noise_schedule", None))
    schedule = scheduler.schedule
    s = p.image_size
    inputs, outputs = sc.io_spec(batch, ensemble, s, s)
    dflt = DEFAULTS[p.prediction_type]
    return {
        "format": sc.FORMAT,
        "format_version": sc.FORMAT_VERSION,
        "recipe": EXPORT_RECIPE,
        "target": target,
        "file": out.name,
        "status": "ok",
        "preset": p.name,
        "preset_config": p.to_dict(),
        "prediction_type": p.prediction_type,
        "checkpoint": checkpoint,
        "image_size": [s, s],
        "preprocessing": sc.preprocessing_for(s, dataset),
        "inputs": inputs,
        "outputs": outputs,
        "sampler": {"name": "ddim", "eta": 0.0, "timestep_spacing": "trailing",
                    "num_train_timesteps": schedule.num_train_timesteps, "clip_x0": [-1.0, 1.0]},
        "noise_schedule": schedule.to_dict(),
        "steps": steps,
        "timesteps": scheduler.timesteps.tolist(),
        "ensemble": ensemble,
        "batch": batch,
        "defaults": {"steps": dflt["steps"], "ensemble": dflt["ensemble"], "provisional": dflt["provisional"]},
        "threshold": 0.0,
        "output_range": [-1.0, 1.0],
        "quantize": quantize,
    }


def _finish(out: Path, meta: dict, program: Path | None = None) -> dict:
    """Complete `meta` from the finished `program` (default: `out`) and write ``<out>.json``."""
    digest, size = sc.file_digest(program or out)
    meta["sha256"], meta["size_bytes"] = digest, size
    meta["versions"] = sc.versions()
    meta["created"] = sc.now_iso()
    meta["contract_sha256"] = sc.contract_digest(meta)
    from edgeseg.checkpoint import atomic_write_json

    atomic_write_json(sc.sidecar_path(out), meta)
    return meta


def _export_images(job: _ExportJob, n_parity: int, n_calibration: int, progress: Progress | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(held-out parity images, calibration images or None when `n_calibration` is 0), loaded before
    any progress line: a bad dataset is the only line the user sees."""
    s = job.model.preset.image_size
    parity_images = load_images(job.dataset, "test", n_parity, s, job.data_dir, job.data_seed)
    calib = load_images(job.dataset, "train", n_calibration, s, job.data_dir, job.data_seed) if n_calibration else None
    _say(progress, f"loaded {len(parity_images)} held-out images ({job.dataset}, test split)"
         + (f" and {len(calib)} calibration images" if calib is not None else ""))
    return parity_images, calib


def _calibration_info(job: _ExportJob, calib: torch.Tensor | None, **extra) -> dict | None:
    if calib is None:
        return None
    return {"dataset": job.dataset, "split": "train", "n_images": int(len(calib)), "noise": "standard normal, seed 1234",
            "timesteps": "the program's own K timesteps, on the sampler's trajectory", **extra}


def _write_temp(out: Path, write: Callable) -> Path:
    """`write(binary file)` into a fresh temporary file beside `out` (removed if writing fails)."""
    tmp = _temp_path(out, ".partial")
    try:
        with open(tmp, "wb") as f:
            write(f)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _failed_path(out: Path) -> Path:
    return out.with_name(out.name + ".failed")


def _checked_parity(tmp: Path, out: Path, measure: Callable[[], tuple[dict, ParityReference]]
                    ) -> tuple[dict, ParityReference]:
    """`measure()`, the gate's parity run on the written program `tmp`; a program that does not load
    is kept as ``<out>.failed`` and is an EdgesegError."""
    try:
        return measure()
    except ProgramLoadError as e:
        failed = _failed_path(out)
        os.replace(tmp, failed)
        raise EdgesegError(f"{e}; kept as {failed} for inspection, {out} was not written") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _dice_problem(parity: dict, threshold: float, quantize: str) -> str | None:
    if parity["mask_dsc_vs_eager"] >= threshold:
        return None
    return (f"parity check failed: mask Dice of the exported program vs eager PyTorch is "
            f"{parity['mask_dsc_vs_eager']:.4f} < {threshold} on {parity['n_images']} held-out images "
            f"({'int8' if quantize == 'int8' else 'fp32'})")


def _gate_and_place(tmp: Path, out: Path, meta: dict, problem: str | None, overwrite: bool,
                    extras: dict[str, Path] | None = None) -> dict:
    """The end of every file export. With a `problem` the program goes to ``<out>.failed`` (its
    artefacts to ``<out>.failed<suffix>``, sidecar ``"status": "failed"``) and EdgesegError is
    raised; else the sidecar is written, then the artefacts and last the program are placed
    (:func:`_place`): the program is the set's commit, so a reader (``segment --model``, ``profile``)
    never finds a program without its sidecar, and an export killed before the program landed
    leaves an incomplete set that the next export replaces (:func:`check_output`).
    `extras` maps an artefact suffix (``.bpte``) to its temporary file."""
    extras = extras or {}
    try:
        final = _failed_path(out) if problem else out
        for sfx in extras:
            meta.setdefault(_ARTEFACT_KEYS[sfx], {})["file"] = artefact_path(final, sfx).name
        if problem:
            for sfx, t in extras.items():
                os.replace(t, artefact_path(final, sfx))
            os.replace(tmp, final)
            meta.update(status="failed", file=final.name)
            _finish(final, meta)
            raise EdgesegError(f"{problem}; the program was kept as {final} for inspection and {out} was not written")
        incomplete = _incomplete_set(out)
        meta = _finish(out, meta, program=tmp)
        for sfx, t in extras.items():
            _place(t, artefact_path(out, sfx), overwrite or incomplete)
        _place(tmp, out, overwrite)
    finally:
        for t in (tmp, *extras.values()):
            t.unlink(missing_ok=True)
    meta["path"] = str(out)
    return meta


_ARTEFACT_KEYS = {".etrecord": "etrecord", ".bpte": "bundled_program"}


def export_executorch(
    model_or_ckpt: nn.Module | str | Path | None,
    out: str | Path | None = None,
    steps: int | None = None,
    ensemble: int | None = None,
    quantize: str = "none",
    *,
    batch: int = 1,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    n_parity_images: int = PARITY_IMAGES,
    n_calibration_images: int = CALIBRATION_IMAGES,
    parity_threshold: float | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    prepare: Callable[[nn.Module], nn.Module] = prepare_for_export,
    overwrite: bool = True,
) -> dict:
    """Export to ``out`` (.pte) + ``out.json`` + ``out.etrecord`` + ``out.bpte`` (see
    :mod:`edgeseg.mobile.devtools`); returns the sidecar dict (``meta["path"]`` = out).

    Raises EdgesegError when the parity gate fails (see the module docstring): a mask Dice
    below the threshold, or a bundled program that does not verify. `prepare` is the network
    rewrite (tests pass a broken one to check the gate). Every file is written under a temporary
    name and renamed into place; with ``overwrite=False`` (the CLI's default) an existing `out`,
    sidecar or artefact is an ExportError before any work.
    """
    job = _ExportJob.resolve(model_or_ckpt, out, steps, ensemble, quantize, dataset, data_dir, "ExecuTorch", ".pte",
                             {"none": "fp32", "int8": "int8"}, overwrite)
    model, out, p = job.model, job.out, job.model.preset
    threshold = PARITY_THRESHOLDS[quantize] if parity_threshold is None else parity_threshold
    images, calib = _export_images(job, n_parity_images, n_calibration_images if quantize == "int8" else 0, progress)

    _say(progress, f"exporting {p.name}: {job.steps} DDIM steps x ensemble {job.ensemble} unrolled")
    ep, _ = export_program(model, job.steps, job.ensemble, batch, quantize, calib, progress, prepare)
    _say(progress, "lowering to XNNPACK (the slow part)")
    lowered, calls, others = lower_executorch(ep, quantize, etrecord=True)
    program = to_program(lowered)
    tmp = _write_temp(out, program.write_to_file)
    meta = _common_sidecar(model, "executorch", out, job.steps, job.ensemble, batch, quantize, job.checkpoint,
                           job.dataset)
    meta.update(delegate_calls=calls, non_delegated_ops=others, calibration=_calibration_info(job, calib))

    _say(progress, f"parity: .pte (ExecuTorch runtime) vs eager on {len(images)} held-out images")
    parity, ref = _checked_parity(tmp, out, lambda: parity_pte(tmp, model, images, job.steps, job.ensemble, batch,
                                                                seed))
    parity.update(dataset=job.dataset, split="test", threshold=threshold, runtime="executorch.runtime (Python)")
    meta["parity"] = parity
    _say(progress, "writing the ETRecord and the bundled program; verifying the bundle in the runtime")
    extras, meta["etrecord"], meta["bundled_program"], bundle_problem = _debug_artefacts(program, ref, out, tmp)
    problem = _dice_problem(parity, threshold, quantize) or (
        f"parity check failed: {bundle_problem}" if bundle_problem else None)
    return _gate_and_place(tmp, out, meta, problem, overwrite, extras)


def _debug_artefacts(program, ref: ParityReference, out: Path, tmp: Path):
    """:func:`edgeseg.mobile.devtools.write_debug_artefacts`, its temporary files removed with `tmp` on error."""
    from edgeseg.mobile.devtools import write_debug_artefacts

    made: list[Path] = []

    def tmp_for(suffix: str) -> Path:
        made.append(_temp_path(out, suffix))
        return made[-1]

    try:
        with _quiet():
            return write_debug_artefacts(program, ref, tmp_for)
    except BaseException:
        for t in (tmp, *made):
            t.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------
# the discriminative baseline (edgeseg.baselines.SmallUNet) through the same tooling
# ----------------------------------------------------------------------------------------
#: Sidecar ``target`` of a baseline U-Net program (PteSegmenter, which runs students, refuses it).
UNET_TARGET = "executorch-unet"
#: Bumped whenever the exported U-Net program changes for the same weights.
UNET_RECIPE = 1
#: fp32 gate: the largest |sigmoid(program) - sigmoid(eager)| accepted (besides mask Dice >= 0.99).
UNET_FP32_PROB_ATOL = 1e-3


def _unet_channels(model: nn.Module) -> list[int] | None:
    """SmallUNet's ``channels`` (the output width of each encoder block), None for another network."""
    try:
        return [int(next(m for m in blk if isinstance(m, nn.Conv2d)).out_channels) for blk in model.enc]
    except (AttributeError, StopIteration, TypeError):
        return None


def parity_unet_pte(path: str | Path, model: nn.Module, images: torch.Tensor) -> dict:
    """A U-Net .pte (image -> logits) vs eager `model` on `images`, one image per call: mask Dice
    of logits > 0 and the largest logit and probability deviations."""
    method = _load_method(path)
    got, ref = [], []
    with torch.no_grad():
        for img in images:
            x = img[None].contiguous()
            got.append(method.execute((x,))[0].float())
            ref.append(model(x).float())
    got, ref = torch.cat(got), torch.cat(ref)
    dsc = sc.dice_masks(got > 0, ref > 0)
    return {
        "mask_dsc_vs_eager": round(float(dsc.mean()), 6),
        "n_images": int(len(images)),
        "min_dsc": round(float(dsc.min()), 6),
        "max_abs_diff_logits": round(float((got - ref).abs().max()), 6),
        "max_abs_diff_prob": round(float((got.sigmoid() - ref.sigmoid()).abs().max()), 6),
        "eager_foreground_fraction": round(float((ref > 0).float().mean()), 4),
    }


def export_unet_pte(
    model: nn.Module,
    out: str | Path,
    quantize: str = "none",
    images: torch.Tensor | None = None,
    size: int = 64,
    *,
    calibration_images: torch.Tensor | None = None,
    dataset: str = "synthetic",
    data_dir: str | Path | None = None,
    n_parity_images: int = PARITY_IMAGES,
    n_calibration_images: int = CALIBRATION_IMAGES,
    parity_threshold: float | None = None,
    progress: Progress | None = None,
    overwrite: bool = True,
) -> dict:
    """The baseline U-Net (:class:`edgeseg.baselines.SmallUNet`) as an ExecuTorch program, made
    with the student's tooling: torch.export -> [int8: :func:`~edgeseg.mobile.quantize.quantize_int8`,
    the same XNNPACK conv quantizer, calibrated through ``calibration_batches``] ->
    :func:`lower_executorch` -> :func:`to_program`, written under a temporary name and placed atomically.

    The program is the network itself, unwrapped: input ``image`` 1 x 3 x `size` x `size` in
    [0, 1] (as edgeseg.data gives it, the U-Net's training input), output ``logits``
    1 x 1 x `size` x `size`; lesion where logits > 0 (sigmoid > 0.5), as in
    :func:`edgeseg.baselines.eval_dice`. `model` is not changed (a copy is put in eval mode,
    contiguous memory format: ``train_unet`` trains channels-last). BatchNorm is folded into
    the convs (by XNNPACK's lowering for fp32, by ``prepare_pt2e`` for int8).

    Parity gate: the program in ExecuTorch's Python runtime vs eager on `images` (default the
    first `n_parity_images` of `dataset`'s test split): mask Dice >= 0.99 for fp32 (and
    |sigmoid difference| <= :data:`UNET_FP32_PROB_ATOL`) or >= 0.97 for int8 (`parity_threshold`
    overrides the Dice bound; 0 records it without enforcing, for untrained networks). On failure
    the program is kept as ``<out>.failed`` and EdgesegError is raised, as for the student.
    int8 calibrates on `calibration_images` (default `n_calibration_images` of the train split).

    Writes ``out`` and the sidecar ``out.json`` (``target`` :data:`UNET_TARGET`); returns the
    sidecar dict: ``path``, ``size_bytes``, ``sha256``, ``parity``, ``channels``, ...
    """
    import copy

    from edgeseg.mobile.quantize import calibration_batches, quantize_int8

    if quantize not in PARITY_THRESHOLDS:
        raise EdgesegError(f"quantize must be none or int8 for ExecuTorch, got {quantize!r}")
    out = Path(out)
    check_output(out, ".pte", overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    threshold = PARITY_THRESHOLDS[quantize] if parity_threshold is None else float(parity_threshold)
    net = copy.deepcopy(model).float().eval().to(memory_format=torch.contiguous_format)
    parity_source = "given" if images is not None else f"{dataset} test split"
    if images is None:
        images = load_images(dataset, "test", n_parity_images, size, data_dir)
    calib = None
    if quantize == "int8":
        calib = calibration_images if calibration_images is not None else load_images(
            dataset, "train", n_calibration_images, size, data_dir)
    for what, t in (("images", images), ("calibration_images", calib)):
        if t is not None and (t.ndim != 4 or tuple(t.shape[1:]) != (3, size, size) or len(t) == 0):
            raise EdgesegError(f"{what} must be N x 3 x {size} x {size} (N >= 1), got {tuple(t.shape)}")
    images = images.float().contiguous()
    example = (torch.rand(1, 3, size, size),)
    with torch.no_grad():
        shape = tuple(net(example[0]).shape)
    if shape != (1, 1, size, size):
        raise EdgesegError(f"the U-Net must map 1 x 3 x {size} x {size} to 1 x 1 x {size} x {size}, got {shape}")

    _say(progress, f"exporting the U-Net at {size} px ({'int8' if quantize == 'int8' else 'fp32'})")
    with _quiet(), torch.no_grad():
        ep = torch.export.export(net, example, strict=False)
        if quantize == "int8":
            _say(progress, f"calibrating int8 on {len(calib)} images")
            ep = quantize_int8(ep, example, ((img,) for img, _ in calibration_batches(calib.float(), 1)))
    _say(progress, "lowering to XNNPACK")
    lowered, calls, others = lower_executorch(ep, quantize)
    tmp = _write_temp(out, to_program(lowered).write_to_file)

    _say(progress, f"parity: .pte (ExecuTorch runtime) vs eager on {len(images)} images")
    parity, _ = _checked_parity(tmp, out, lambda: (parity_unet_pte(tmp, net, images), None))
    parity.update(images=parity_source, threshold=threshold, runtime="executorch.runtime (Python)",
                  **({"prob_atol": UNET_FP32_PROB_ATOL} if quantize == "none" else {}))
    problem = _dice_problem(parity, threshold, quantize)
    if problem is None and quantize == "none" and parity["max_abs_diff_prob"] > UNET_FP32_PROB_ATOL:
        problem = (f"parity check failed: fp32 probabilities differ from eager by {parity['max_abs_diff_prob']:.2e} "
                   f"> {UNET_FP32_PROB_ATOL}")
    meta = {
        "format": sc.FORMAT, "format_version": sc.FORMAT_VERSION, "recipe": UNET_RECIPE, "target": UNET_TARGET,
        "file": out.name, "status": "ok", "model": type(model).__name__.lstrip("_"), "channels": _unet_channels(net),
        "params": int(sum(p.numel() for p in net.parameters())), "image_size": [size, size],
        "preprocessing": sc.preprocessing_for(size), "batch": 1,
        "inputs": [{"name": "image", "shape": [1, 3, size, size], "dtype": "float32",
                    "description": "preprocessed RGB image, see preprocessing"}],
        "outputs": [{"name": "logits", "shape": [1, 1, size, size], "dtype": "float32",
                     "description": "lesion logits; lesion where logits > threshold (sigmoid > 0.5)"}],
        "threshold": 0.0, "quantize": quantize, "delegate_calls": calls, "non_delegated_ops": others,
        "calibration": None if calib is None else {
            "n_images": int(len(calib)),
            "source": "given" if calibration_images is not None else f"{dataset} train split"},
        "parity": parity,
    }
    return _gate_and_place(tmp, out, meta, problem, overwrite)


# ----------------------------------------------------------------------------------------
# CoreML
# ----------------------------------------------------------------------------------------


def _compress_coreml(mlmodel, quantize: str, nbits: int):
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    if quantize == "int8":
        cfg = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=512))
        return cto.linear_quantize_weights(mlmodel, config=cfg)
    if quantize == "palettize":
        cfg = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
            mode="kmeans", nbits=nbits, granularity="per_tensor", weight_threshold=512))
        return cto.palettize_weights(mlmodel, config=cfg)
    del ct
    return mlmodel


#: ``--compute-units`` -> coremltools.ComputeUnit member (what the app should load the model with).
COMPUTE_UNITS = {"all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE"}
#: The user-defined metadata keys every .mlpackage carries (JSON-encoded where not a plain string).
COREML_METADATA_KEYS = ("preprocessing", "threshold", "sampler", "steps", "ensemble", "training_data",
                        "compute_units", "preset", "quantize", "output_range")


def inspect_mlpackage(path: str | Path) -> dict:
    """Structure of a saved .mlpackage, readable on Linux: type, I/O with descriptions, metadata,
    op and dtype counts."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    kind = spec.WhichOneof("Type")
    desc = spec.description

    def feature(f):
        return {"name": f.name, "shape": [int(d) for d in f.type.multiArrayType.shape],
                "description": f.shortDescription}

    md = desc.metadata
    info = {
        "model_type": kind,
        "spec_version": int(spec.specificationVersion),
        "inputs": [feature(f) for f in desc.input],
        "outputs": [feature(f) for f in desc.output],
        "metadata": {"author": md.author, "license": md.license, "short_description": md.shortDescription,
                     "version": md.versionString, "user_defined": dict(md.userDefined)},
    }
    if kind == "mlProgram":
        info.update(_mlprogram_ops(spec))
    return info


def _mlprogram_ops(spec) -> dict:
    from coremltools.proto import MIL_pb2

    ops, dtypes = Counter(), Counter()
    names = {v: k for k, v in MIL_pb2.DataType.items()}
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                ops[op.type] += 1
                for o in op.outputs:
                    if o.type.WhichOneof("type") == "tensorType":
                        dt = o.type.tensorType.dataType
                        dtypes[names.get(dt, str(dt))] += 1
    return {"op_counts": dict(ops), "output_dtypes": dict(dtypes), "fp16_ops": int(dtypes.get("FLOAT16", 0)),
            "fp32_ops": int(dtypes.get("FLOAT32", 0)),
            "compressed_weight_ops": int(sum(v for k, v in ops.items() if k.startswith("constexpr_")))}


def coreml_metadata(meta: dict, training_data: str | None, compute_units: str) -> dict:
    """(author, license, short_description, version, user_defined) for the .mlpackage, from its sidecar `meta`."""
    import json

    version = sc.versions().get("edgeseg") or "unknown"
    trained = training_data or "not recorded (a model object, no checkpoint)"
    licence = "Apache-2.0 (edgeseg)" + (
        "" if training_data in (None, "synthetic") else f"; trained on {training_data}, whose terms of use apply")
    s = meta["image_size"][0]
    user = {"preprocessing": meta["preprocessing"], "threshold": meta["threshold"],
            "sampler": {**meta["sampler"], "timesteps": meta["timesteps"]}, "steps": meta["steps"],
            "ensemble": meta["ensemble"], "training_data": {"dataset": trained, "split": "train"},
            "compute_units": compute_units, "preset": meta["preset"], "quantize": meta["quantize"],
            "output_range": meta["output_range"]}
    return {
        "author": "edgeseg",
        "license": licence,
        "short_description": (f"Skin-lesion segmentation ({meta['preset']}, a DermoSegDiff student): "
                              f"{meta['steps']} DDIM step(s) x an ensemble of {meta['ensemble']} on a {s}x{s} RGB "
                              "image; 'mean' > 0 is the lesion, 'std' its uncertainty."),
        "version": f"{version}+recipe{EXPORT_RECIPE}",
        "user_defined": {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in user.items()},
    }


def _describe_coreml(mlmodel, meta: dict, md: dict):
    """Write the metadata `md` (:func:`coreml_metadata`) and the sidecar's I/O descriptions into `mlmodel`."""
    mlmodel.author = md["author"]
    mlmodel.license = md["license"]
    mlmodel.short_description = md["short_description"]
    mlmodel.version = md["version"]
    for k, v in md["user_defined"].items():
        mlmodel.user_defined_metadata[k] = v
    for io in meta["inputs"]:
        mlmodel.input_description[io["name"]] = io["description"]
    for io in meta["outputs"]:
        mlmodel.output_description[io["name"]] = io["description"]
    return mlmodel


def _convert_coreml(ep, quantize: str, nbits: int, target: str, compute_units: str, progress):
    """coremltools.convert of the exported program -> MLModel (fp16, outputs named mean/std, compressed)."""
    import coremltools as ct

    with _quiet():
        ep = ep.run_decompositions({})
        _say(progress, "converting to a CoreML ML program (fp16)")
        mlmodel = ct.convert(ep, convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                             minimum_deployment_target=getattr(ct.target, target),
                             compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units]))
        # name the outputs as in the contract (the converter names them after graph nodes)
        spec = mlmodel.get_spec()
        for o, new in zip([o.name for o in spec.description.output], ("mean", "std")):
            if o != new:
                ct.utils.rename_feature(spec, o, new)
        mlmodel = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir)
        if quantize != "none":
            _say(progress, f"compressing weights ({quantize})")
            mlmodel = _compress_coreml(mlmodel, quantize, nbits)
    return mlmodel


def export_coreml(
    model_or_ckpt: nn.Module | str | Path | None,
    out: str | Path | None = None,
    steps: int | None = None,
    ensemble: int | None = None,
    quantize: str = "none",
    *,
    batch: int = 1,
    nbits: int = 6,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    n_parity_images: int = PARITY_IMAGES,
    seed: int = 0,
    minimum_deployment_target: str = "iOS17",
    compute_units: str = "all",
    progress: Progress | None = None,
    overwrite: bool = True,
) -> dict:
    """Export to ``out`` (.mlpackage) + ``out.json``; returns the sidecar dict.

    `quantize`: "none" (fp16 weights), "int8" (linear symmetric per-channel weights) or
    "palettize" (`nbits`-bit k-means look-up table per tensor). Inputs ``image`` and ``noise``,
    outputs ``mean`` and ``std`` (same contract as the .pte), each with its description; the
    model's metadata (author, licence, description, version and ``user_defined_metadata``:
    :data:`COREML_METADATA_KEYS`) come from the sidecar. `compute_units` (:data:`COMPUTE_UNITS`)
    is what the model is converted for and what the app should load it with (Core ML keeps it
    outside the model: it is recorded in the metadata and the sidecar).
    """
    if compute_units not in COMPUTE_UNITS:
        raise ExportError(f"--compute-units must be one of {', '.join(COMPUTE_UNITS)}, got {compute_units!r}")
    job = _ExportJob.resolve(model_or_ckpt, out, steps, ensemble, quantize, dataset, data_dir, "CoreML", ".mlpackage",
                             {"none": "fp16", "int8": "int8", "palettize": f"pal{nbits}"}, overwrite)
    parity_images = None
    if platform.system() == "Darwin":  # parity runs on macOS only; its images are checked before any work
        parity_images = load_images(job.dataset, "test", n_parity_images, job.model.preset.image_size, job.data_dir,
                                    job.data_seed)
    with _quiet_import():  # checked first: a user error is not buried under coremltools' import chatter
        import coremltools  # noqa: F401

    _say(progress, f"exporting {job.model.preset.name}: {job.steps} DDIM steps x ensemble {job.ensemble} unrolled")
    ep, _ = export_program(job.model, job.steps, job.ensemble, batch, "none", fold_constants=False)
    mlmodel = _convert_coreml(ep, quantize, nbits, minimum_deployment_target, compute_units, progress)
    meta = _common_sidecar(job.model, "coreml", job.out, job.steps, job.ensemble, batch, quantize, job.checkpoint,
                           job.dataset)
    meta.update(compute_precision="float16", minimum_deployment_target=minimum_deployment_target,
                compute_units=compute_units, training_data=job.training_data,
                weight_compression={"none": None, "int8": "linear_symmetric int8 per-channel",
                                    "palettize": f"kmeans LUT {nbits}-bit per-tensor"}[quantize],
                delegate_calls=None,  # not applicable: CoreML runs the whole ML program
                calibration=None)  # weight-only compression needs no calibration
    _describe_coreml(mlmodel, meta, coreml_metadata(meta, job.training_data, compute_units))

    tmp = job.out.with_name(f".partial-{os.getpid()}-{job.out.name}")  # coremltools insists on the .mlpackage suffix
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        return _finish_coreml(tmp, job, overwrite, mlmodel, meta, parity_images, batch, seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _coreml_problems(structure: dict, quantize: str) -> list[str]:
    problems = []
    if structure["model_type"] != "mlProgram":
        problems.append(f"model type {structure['model_type']}, expected mlProgram")
    if [i["name"] for i in structure["inputs"]] != ["image", "noise"]:
        problems.append(f"inputs {structure['inputs']}")
    if [o["name"] for o in structure["outputs"]] != ["mean", "std"]:
        problems.append(f"outputs {structure['outputs']}")
    if not all(f["description"] for f in structure["inputs"] + structure["outputs"]):
        problems.append("an input or output has no description")
    missing = [k for k in COREML_METADATA_KEYS if k not in structure["metadata"]["user_defined"]]
    if missing:
        problems.append(f"user-defined metadata lacks {missing}")
    if structure.get("fp16_ops", 0) == 0:
        problems.append("no fp16 ops: compute precision was not applied")
    if quantize != "none" and structure.get("compressed_weight_ops", 0) == 0:
        problems.append("no compressed weights found")
    return problems


def _finish_coreml(tmp, job: _ExportJob, overwrite, mlmodel, meta, parity_images, batch, seed) -> dict:
    mlmodel.save(str(tmp))
    structure = inspect_mlpackage(tmp)
    problems = _coreml_problems(structure, meta["quantize"])
    if problems:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EdgesegError(f"CoreML export of {job.model.preset.name} is malformed: " + "; ".join(problems))
    meta["structure"] = structure
    if parity_images is not None:
        meta["parity"] = _parity_coreml(tmp, job.model, parity_images, job.steps, job.ensemble, batch, seed)
    else:
        meta["parity"] = {"mask_dsc_vs_eager": None, "n_images": 0,
                          "note": "not measured: running a CoreML model requires macOS; on Linux the "
                                  "conversion, the program structure, its metadata and the weight compression "
                                  "are checked"}
    meta = _finish(job.out, meta, program=tmp)  # the sidecar first: the model folder commits the set
    _place(tmp, job.out, overwrite)
    meta["path"] = str(job.out)
    return meta


def _parity_coreml(path, model, images, steps, ensemble, batch, seed) -> dict:  # pragma: no cover (macOS)
    import coremltools as ct
    import numpy as np

    ml = ct.models.MLModel(str(path))

    def run(img, nz):
        res = ml.predict({"image": img.numpy(), "noise": nz.numpy()})
        return tuple(torch.from_numpy(np.asarray(res[k], np.float32)) for k in ("mean", "std"))

    parity, _ = run_parity(run, model, images, steps, ensemble, batch, seed)
    parity["runtime"] = "coremltools (macOS)"
    return parity
