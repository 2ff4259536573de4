"""The student as an ExecuTorch program (.pte, XNNPACK)::

    network --prepare_for_export--> Segmenter(K, N).core --torch.export--> constant folding
      (the time embeddings and per-block scale/shift of the K fixed timesteps become constants)
      --[int8: PT2E, XNNPACK quantizer, calibrated on training images]-->
      to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()]) --> .pte
      (+ <out>.etrecord, <out>.bpte: see edgeseg.mobile.devtools)

then the parity gate (:mod:`edgeseg.mobile.gate`): the .pte runs in ExecuTorch's Python runtime
on held-out images with the same K, N and noise as eager PyTorch; the mean Dice between the
thresholded masks must reach 0.99 (fp32) or 0.97 (int8), and the bundled program must verify.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edgeseg.mobile import sidecar as sc
from edgeseg.mobile.fold import prepare_for_export
from edgeseg.mobile.gate import (PARITY_THRESHOLDS, ParityReference, ProgramLoadError, checked_parity, dice_problem,
                                 gate_and_place, run_parity)
from edgeseg.mobile.job import (CALIBRATION_IMAGES, PARITY_IMAGES, ExportJob, Progress, calibration_info,
                                export_images, export_program, quiet, say)
from edgeseg.mobile.placement import temp_path, write_temp

__all__ = ["count_delegates", "lower_executorch", "to_program", "load_method", "parity_pte", "export_executorch"]


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
    with quiet(), compact_constant_keys(), transient_conv_indirection():
        lowered = to_edge_transform_and_lower(ep, partitioner=[partitioner], generate_etrecord=etrecord)
    calls, others = count_delegates(lowered)
    return lowered, calls, others


def to_program(lowered):
    """The ExecuTorch program of a lowered model, its data segments aligned to 16 bytes.

    The default 128-byte alignment pads each of the ~500 constants (XNNPACK copies and packs
    them at load, so 16 is enough): ~30 KB of zeros in a 0.8 MB program.
    """
    from executorch.exir import ExecutorchBackendConfig

    with quiet():
        return lowered.to_executorch(ExecutorchBackendConfig(segment_alignment=16))


def parity_pte(path: str | Path, model: nn.Module, images: torch.Tensor, steps: int, ensemble: int,
               batch: int = 1, seed: int = 0) -> tuple[dict, ParityReference]:
    """:func:`run_parity` for a .pte in ExecuTorch's Python runtime (ProgramLoadError if it does not load)."""
    method = load_method(path)
    return run_parity(lambda img, nz: method.execute((img, nz)), model, images, steps, ensemble, batch, seed)


def load_method(path: str | Path):
    """The ``forward`` method of a .pte in ExecuTorch's Python runtime (ProgramLoadError if it does not load)."""
    from executorch.runtime import Runtime

    try:
        return Runtime.get().load_program(Path(path)).load_method("forward")
    except RuntimeError as e:
        raise ProgramLoadError(f"the exported program does not load in the ExecuTorch runtime ({e})") from None


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
    job = ExportJob.resolve(model_or_ckpt, out, steps, ensemble, quantize, dataset, data_dir, "ExecuTorch", ".pte",
                             {"none": "fp32", "int8": "int8"}, overwrite)
    model, out, p = job.model, job.out, job.model.preset
    threshold = PARITY_THRESHOLDS[quantize] if parity_threshold is None else parity_threshold
    images, calib = export_images(job, n_parity_images, n_calibration_images if quantize == "int8" else 0, progress)

    say(progress, f"exporting {p.name}: {job.steps} DDIM steps x ensemble {job.ensemble} unrolled")
    ep, _ = export_program(model, job.steps, job.ensemble, batch, quantize, calib, progress, prepare)
    say(progress, "lowering to XNNPACK (the slow part)")
    lowered, calls, others = lower_executorch(ep, quantize, etrecord=True)
    program = to_program(lowered)
    tmp = write_temp(out, program.write_to_file)
    meta = sc.student_sidecar(model, "executorch", out, job.steps, job.ensemble, batch, quantize, job.checkpoint,
                           job.dataset)
    meta.update(delegate_calls=calls, non_delegated_ops=others, calibration=calibration_info(job, calib))

    say(progress, f"parity: .pte (ExecuTorch runtime) vs eager on {len(images)} held-out images")
    parity, ref = checked_parity(tmp, out, lambda: parity_pte(tmp, model, images, job.steps, job.ensemble, batch,
                                                                seed))
    parity.update(dataset=job.dataset, split="test", threshold=threshold, runtime="executorch.runtime (Python)")
    meta["parity"] = parity
    say(progress, "writing the ETRecord and the bundled program; verifying the bundle in the runtime")
    extras, meta["etrecord"], meta["bundled_program"], bundle_problem = _debug_artefacts(program, ref, out, tmp)
    problem = dice_problem(parity, threshold, quantize) or (
        f"parity check failed: {bundle_problem}" if bundle_problem else None)
    return gate_and_place(tmp, out, meta, problem, overwrite, extras)


def _debug_artefacts(program, ref: ParityReference, out: Path, tmp: Path):
    """:func:`edgeseg.mobile.devtools.write_debug_artefacts`, its temporary files removed with `tmp` on error."""
    from edgeseg.mobile.devtools import write_debug_artefacts

    made: list[Path] = []

    def tmp_for(suffix: str) -> Path:
        made.append(temp_path(out, suffix))
        return made[-1]

    try:
        with quiet():
            return write_debug_artefacts(program, ref, tmp_for)
    except BaseException:
        for t in (tmp, *made):
            t.unlink(missing_ok=True)
        raise
