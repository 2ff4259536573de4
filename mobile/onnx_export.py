"""ONNX export of the same traced segmenter, parity-gated in ONNX Runtime (``edgeseg export --target onnx``).

::

    network --prepare_for_export--> Segmenter(K, N).core --torch.export--> constant folding
      (export_program: the very program the .pte lowers)
      --torch.onnx.export(dynamo=True)--> fp32 .onnx (inputs image, noise; outputs mean, std)
      --[int8: ONNX Runtime static QDQ quantization, calibrated on the same training images and
        noise as the .pte's PT2E int8]--> .onnx

int8 follows the .pte's policy (:mod:`edgeseg.mobile.quantize`): the convolutions (and the
transposed ones) only, int8 per-channel symmetric weights, per-tensor activations (uint8,
asymmetric: the U8S8 kernels of ONNX Runtime's x86 CPU provider), MinMax ranges; the
GroupNorm statistics convs (:class:`~edgeseg.mobile.fold.ExportGroupNorm`) and the 1 -> C input
conv stay fp32. The exporter's per-node debug metadata (stack traces, FX nodes: 40% of the
file) is dropped; the model carries the sidecar's contract as ``metadata_props`` and its inputs
and outputs their descriptions.

The gate is the .pte's (:mod:`edgeseg.mobile.gate`): the model runs in ONNX
Runtime (CPUExecutionProvider) on the same held-out images with the same noise as eager
PyTorch; mask Dice 0.99 (fp32) / 0.97 (int8), else the model is kept as ``<out>.failed``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edgeseg.errors import EdgesegError
from edgeseg.mobile import sidecar as sc
from edgeseg.mobile.gate import (PARITY_THRESHOLDS, ParityReference, ProgramLoadError, checked_parity, dice_problem,
                                 gate_and_place, run_parity)
from edgeseg.mobile.job import (CALIBRATION_IMAGES, PARITY_IMAGES, ExportJob, Progress, calibration_info,
                                export_images, export_program, quiet, say)
from edgeseg.mobile.placement import write_temp
from edgeseg.mobile.fold import ExportGroupNorm, prepare_for_export

__all__ = ["export_onnx", "to_onnx", "quantize_onnx", "parity_onnx", "ort_session", "OPSET"]

OPSET = 18
_GROUP_NORM = f"{ExportGroupNorm.__module__}.{ExportGroupNorm.__qualname__}"


def _import_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise EdgesegError(f"ONNX export needs onnx and onnxruntime: pip install 'edgeseg[mobile]' ({e})") from None
    return onnx, onnxruntime


def _rename_values(graph, renames: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [renames.get(v, v) for v in node.input]
        node.output[:] = [renames.get(v, v) for v in node.output]
    for vi in list(graph.output) + list(graph.value_info) + list(graph.input):
        vi.name = renames.get(vi.name, vi.name)


def _name_outputs(model, names=("mean", "std")) -> None:
    """Graph outputs named as in the contract; values that already had those names get a suffix."""
    graph = model.graph
    taken = {v for node in graph.node for v in (*node.input, *node.output)} | {i.name for i in graph.initializer}
    clash = {n: f"{n}__internal" for n in names if n in taken and n not in [o.name for o in graph.output]}
    _rename_values(graph, clash)
    _rename_values(graph, {o.name: n for o, n in zip(graph.output, names) if o.name != n})


@contextlib.contextmanager
def _no_log_warnings():
    """The exporters log per op ("torchvision is not installed") and ORT's quantizer advises
    pre-processing on the root logger: neither is for the user's terminal."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with quiet():
            yield
    finally:
        logging.disable(previous)


def to_onnx(ep: torch.export.ExportedProgram, example: tuple[torch.Tensor, ...], opset: int = OPSET):
    """torch.onnx.export (dynamo) of an exported program -> onnx.ModelProto, outputs named mean/std."""
    with _no_log_warnings():
        prog = torch.onnx.export(ep, example, dynamo=True, optimize=True, opset_version=opset, verbose=False)
    model = prog.model_proto
    _name_outputs(model)
    return model


def _fp32_nodes(model) -> list[str]:
    """Convs kept fp32, as in the .pte's int8: GroupNorm statistics and the single-input-channel conv."""
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    keep = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose"):
            continue
        props = {p.key: p.value for p in n.metadata_props}
        w = inits.get(n.input[1]) if len(n.input) > 1 else None
        if _GROUP_NORM in props.get("pkg.torch.onnx.class_hierarchy", "") or (w and len(w) == 4 and w[1] == 1
                                                                             and w[0] > 1 and n.op_type == "Conv"
                                                                             and not _grouped(n)):
            keep.append(n.name)
    return keep


def _grouped(node) -> bool:
    return any(a.name == "group" and a.i > 1 for a in node.attribute)


def quantize_onnx(fp32_path: Path, out_path: Path, calibration: torch.Tensor, ensemble: int, batch: int,
                  keep_fp32: list[str]) -> dict:
    """ONNX Runtime static QDQ int8 of `fp32_path` into `out_path`; returns the sidecar's calibration extras."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    from edgeseg.mobile.quantize import calibration_batches

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration_batches(calibration, ensemble, batch))

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else {"image": b[0].numpy(), "noise": b[1].numpy()}

    with _no_log_warnings():
        quantize_static(str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv", "ConvTranspose"], per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=keep_fp32,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    return {"method": "ONNX Runtime quantize_static, QDQ, MinMax", "weights": "int8 per-channel symmetric",
            "activations": "uint8 per-tensor asymmetric", "quantized_ops": ["Conv", "ConvTranspose"],
            "kept_fp32": len(keep_fp32)}


def _finalise(model, meta: dict) -> None:
    """Drop per-node debug metadata; add the contract as metadata_props and the I/O descriptions."""
    for n in model.graph.node:
        del n.metadata_props[:]
    desc = {io["name"]: io["description"] for io in meta["inputs"] + meta["outputs"]}
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.doc_string = desc.get(vi.name, vi.doc_string)
    model.producer_name = "edgeseg"
    model.doc_string = (f"Skin-lesion segmentation ({meta['preset']}): {meta['steps']} DDIM step(s) x an ensemble of "
                        f"{meta['ensemble']}; 'mean' > {meta['threshold']} is the lesion, 'std' its uncertainty.")
    props = {k: meta[k] if isinstance(meta[k], str) else json.dumps(meta[k], sort_keys=True)
             for k in ("preset", "preprocessing", "steps", "timesteps", "ensemble", "batch", "threshold",
                       "output_range", "quantize", "sampler")}
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=f"edgeseg.{k}", value=v)


def ort_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session (ProgramLoadError if the model does not load)."""
    _, ort = _import_onnx()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph types
        msg = " ".join(str(e).split())[:160]
        raise ProgramLoadError(f"the exported model does not load in ONNX Runtime ({msg})") from None


def parity_onnx(path: str | Path, model: nn.Module, images: torch.Tensor, steps: int, ensemble: int,
                batch: int = 1, seed: int = 0) -> tuple[dict, ParityReference]:
    """:func:`edgeseg.mobile.gate.run_parity` for an .onnx in ONNX Runtime."""
    sess = ort_session(path)

    def run(img, nz):
        mean, std = sess.run(["mean", "std"], {"image": img.numpy(), "noise": nz.numpy()})
        return torch.from_numpy(mean), torch.from_numpy(std)

    return run_parity(run, model, images, steps, ensemble, batch, seed)


def _build(job, batch: int, quantize: str, calib, prepare, progress, work: Path) -> tuple[Path, dict | None]:
    """The (fp32 or int8) ONNX model, not yet finalised, in `work`; (path, calibration extras or None)."""
    onnx, _ = _import_onnx()
    s = job.model.preset.image_size
    ep, _ = export_program(job.model, job.steps, job.ensemble, batch, "none", prepare=prepare)
    say(progress, "torch.onnx.export (dynamo)")
    example = (torch.rand(batch, 3, s, s), torch.randn(batch * job.ensemble, 1, s, s))
    model = to_onnx(ep, example)
    fp32 = work / "fp32.onnx"
    onnx.save(model, str(fp32))
    if quantize != "int8":
        return fp32, None
    say(progress, f"int8: ONNX Runtime static QDQ, calibrated on {len(calib)} training images")
    int8 = work / "int8.onnx"
    extras = quantize_onnx(fp32, int8, calib, job.ensemble, batch, _fp32_nodes(model))
    return int8, extras


def export_onnx(
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
    """Export to ``out`` (.onnx) + ``out.json``; returns the sidecar dict (``meta["path"]`` = out).

    Same job, images, gate and placement as :func:`edgeseg.mobile.executorch_export.export_executorch`.
    """
    onnx, ort = _import_onnx()
    job = ExportJob.resolve(model_or_ckpt, out, steps, ensemble, quantize, dataset, data_dir, "ONNX", ".onnx",
                                {"none": "fp32", "int8": "int8"}, overwrite)
    threshold = PARITY_THRESHOLDS[quantize] if parity_threshold is None else parity_threshold
    images, calib = export_images(job, n_parity_images, n_calibration_images if quantize == "int8" else 0,
                                      progress)
    say(progress, f"exporting {job.model.preset.name}: {job.steps} DDIM steps x ensemble {job.ensemble} unrolled")
    meta = sc.student_sidecar(job.model, "onnx", job.out, job.steps, job.ensemble, batch, quantize, job.checkpoint,
                              job.dataset)
    with tempfile.TemporaryDirectory(prefix=".edgeseg-onnx-", dir=job.out.parent) as d:
        built, cal = _build(job, batch, quantize, calib, prepare, progress, Path(d))
        model = onnx.load(str(built))
        _finalise(model, meta)
        tmp = write_temp(job.out, lambda f: f.write(model.SerializeToString()))
    meta.update(opset=OPSET, execution_provider="CPUExecutionProvider", delegate_calls=None,
                calibration=calibration_info(job, calib, **(cal or {})))
    say(progress, f"parity: .onnx (ONNX Runtime) vs eager on {len(images)} held-out images")
    parity, _ = checked_parity(tmp, job.out, lambda: parity_onnx(tmp, job.model, images, job.steps,
                                                                      job.ensemble, batch, seed))
    parity.update(dataset=job.dataset, split="test", threshold=threshold,
                  runtime=f"onnxruntime {ort.__version__} (CPUExecutionProvider)")
    meta["parity"] = parity
    return gate_and_place(tmp, job.out, meta, dice_problem(parity, threshold, quantize), overwrite)
