"""The student as a CoreML ML program (.mlpackage).

``coremltools.convert`` on the same exported program (decomposed to ATen), mlprogram, fp16 compute
precision, optional int8 (linear symmetric, per channel) or palettised (k-means LUT) weights via
``coremltools.optimize.coreml``, with the model's metadata and I/O descriptions. CoreML cannot
execute on Linux: parity is measured only on macOS, elsewhere the sidecar says so and what is
checked is the structure (mlprogram, inputs/outputs and their descriptions, metadata, fp16 ops,
compressed weights).
"""
from __future__ import annotations

import os
import platform
import shutil
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from edgeseg.errors import EdgesegError, ExportError
from edgeseg.mobile import sidecar as sc
from edgeseg.mobile.gate import run_parity
from edgeseg.mobile.job import PARITY_IMAGES, ExportJob, Progress, export_program, load_images, quiet, quiet_import, say
from edgeseg.mobile.placement import place

__all__ = ["COMPUTE_UNITS", "COREML_METADATA_KEYS", "compress_coreml", "inspect_mlpackage", "coreml_metadata",
           "export_coreml"]

def compress_coreml(mlmodel, quantize: str, nbits: int):
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
        "version": f"{version}+recipe{sc.EXPORT_RECIPE}",
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

    with quiet():
        ep = ep.run_decompositions({})
        say(progress, "converting to a CoreML ML program (fp16)")
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
            say(progress, f"compressing weights ({quantize})")
            mlmodel = compress_coreml(mlmodel, quantize, nbits)
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
    job = ExportJob.resolve(model_or_ckpt, out, steps, ensemble, quantize, dataset, data_dir, "CoreML", ".mlpackage",
                             {"none": "fp16", "int8": "int8", "palettize": f"pal{nbits}"}, overwrite)
    parity_images = None
    if platform.system() == "Darwin":  # parity runs on macOS only; its images are checked before any work
        parity_images = load_images(job.dataset, "test", n_parity_images, job.model.preset.image_size, job.data_dir,
                                    job.data_seed)
    with quiet_import():  # checked first: a user error is not buried under coremltools' import chatter
        import coremltools  # noqa: F401

    say(progress, f"exporting {job.model.preset.name}: {job.steps} DDIM steps x ensemble {job.ensemble} unrolled")
    ep, _ = export_program(job.model, job.steps, job.ensemble, batch, "none", fold_constants=False)
    mlmodel = _convert_coreml(ep, quantize, nbits, minimum_deployment_target, compute_units, progress)
    meta = sc.student_sidecar(job.model, "coreml", job.out, job.steps, job.ensemble, batch, quantize, job.checkpoint,
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


def _finish_coreml(tmp, job: ExportJob, overwrite, mlmodel, meta, parity_images, batch, seed) -> dict:
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
    meta = sc.write_sidecar(job.out, meta, program=tmp)  # the sidecar first: the package commits the set
    place(tmp, job.out, overwrite)
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
