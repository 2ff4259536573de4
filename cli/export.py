"""`edgeseg export`: the whole few-step segmenter to ExecuTorch (.pte), CoreML (.mlpackage), ONNX (.onnx) or a
static web page (a folder: the ONNX model run by ONNX Runtime Web in the browser).

Registered in cli/main.py as ``app.command("export")(export_cmd)``. Heavy imports (torch,
executorch, coremltools, onnx) happen inside the command so ``edgeseg --help`` stays fast.
"""
from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from edgeseg.cli.common import SEED_MAX, user_errors


class Target(str, Enum):
    executorch = "executorch"
    coreml = "coreml"
    onnx = "onnx"
    web = "web"


class ComputeUnits(str, Enum):
    all = "all"
    cpu_only = "cpu_only"
    cpu_and_gpu = "cpu_and_gpu"
    cpu_and_ne = "cpu_and_ne"


class Quantize(str, Enum):
    none = "none"
    int8 = "int8"
    palettize = "palettize"


_STEPS_HELP = (
    "DDIM steps K baked into the program (default by prediction type, measured: x0 and v models 1, "
    "epsilon 10 (provisional); see bench/README.md)"
)
_ENSEMBLE_HELP = "ensemble size N, run as a batch dimension (default 3: the uncertainty map needs N > 1)"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


@user_errors
def export_cmd(
    target: Target = typer.Option(..., "--target", help="executorch (.pte, XNNPACK), coreml (.mlpackage), onnx "
                                  "(.onnx, ONNX Runtime) or web (a folder: page + .onnx + ONNX Runtime Web)"),
    checkpoint: Optional[Path] = typer.Option(
        None, help="student .safetensors or run folder; default: the newest run's student under ./runs/"),
    quantize: Quantize = typer.Option(
        Quantize.none, help="none, int8 (ExecuTorch: PT2E static int8; ONNX and web: ONNX Runtime static QDQ int8; CoreML: "
                            "int8 weights) or palettize (CoreML only: k-means LUT weights)"),
    steps: Optional[int] = typer.Option(None, "--steps", "-k", min=1, max=250, help=_STEPS_HELP),
    ensemble: Optional[int] = typer.Option(None, "--ensemble", "-n", min=1, max=64, help=_ENSEMBLE_HELP),
    out: Optional[Path] = typer.Option(None, help="output path (default <preset>-k<K>n<N>-<precision>.pte/.mlpackage/"
                                       ".onnx; web: a folder, required)"),
    n_parity_images: int = typer.Option(16, min=1, help="held-out (test split) images for the parity check"),
    n_calibration_images: int = typer.Option(32, min=1, help="training images for int8 calibration"),
    dataset: Optional[str] = typer.Option(None, help="dataset for calibration/parity (default: the checkpoint's)"),
    data_dir: Optional[Path] = typer.Option(None, help="dataset folder (not needed for synthetic)"),
    batch: int = typer.Option(1, min=1, help="images per program call (fixed in the program)"),
    nbits: int = typer.Option(6, min=1, max=8, help="bits per weight for --quantize palettize (CoreML)"),
    compute_units: Optional[ComputeUnits] = typer.Option(
        None, "--compute-units", help="CoreML only: the processors the model is converted and meant to be loaded "
                                      "for (default all)"),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="seed of the parity check's noise"),
    overwrite: bool = typer.Option(False, help="replace an existing output file and its sidecar (otherwise an "
                                   "existing one is an error, before any work)"),
    webgpu: bool = typer.Option(False, "--webgpu", help="web only: ship ONNX Runtime Web's WebGPU build (WebGPU where "
                                "the browser offers it, else WebAssembly; ~29 MB instead of ~15 MB)"),
):
    """Export the student with K DDIM steps and an N-member ensemble unrolled inside the program.

    Writes the model and a JSON sidecar next to it (<out>.json: preprocessing, K, timesteps, N, threshold, sha256, parity),
    each under a temporary name renamed into place; an existing <out> is kept unless --overwrite. ExecuTorch also writes
    <out>.etrecord (for `edgeseg profile`) and <out>.bpte (a bundled program: held-out images and their expected outputs).

    ExecuTorch and ONNX exports are checked against eager PyTorch on held-out images in their runtime (ExecuTorch's, ONNX Runtime); below 0.99 (fp32) / 0.97 (int8) mask Dice the export fails (exit 2) and the program is left as <out>.failed. CoreML models need macOS to run: on Linux their structure and metadata are checked.
    """
    from rich.console import Console

    from edgeseg.errors import EdgesegError

    if target != Target.coreml and quantize == Quantize.palettize:
        raise EdgesegError(f"--quantize palettize is CoreML only; use none or int8 for {target.value}")
    if target != Target.coreml and compute_units is not None:
        raise EdgesegError(f"--compute-units is CoreML only (the {target.value} program runs on the CPU)")
    if target == Target.web and out is None:
        raise EdgesegError("--target web writes a folder: pass --out DIR")
    if target != Target.web and webgpu:
        raise EdgesegError("--webgpu is for --target web only")
    from edgeseg.cli.common import check_writable_folder

    check_writable_folder(out.parent if out is not None else Path("."), "--out")  # before minutes of lowering
    console = Console(stderr=True)
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        console.log(f"[dim]{time.perf_counter() - t0:6.1f}s[/dim] {msg}")

    common = dict(batch=batch, dataset=dataset, data_dir=data_dir, n_parity_images=n_parity_images, seed=seed,
                  progress=progress, overwrite=overwrite)
    with console.status("exporting ...", spinner="dots"):
        if target == Target.web:
            from edgeseg.mobile.web import export_web

            meta = export_web(checkpoint, out, steps, ensemble, quantize.value, runtime="webgpu" if webgpu else "wasm",
                              n_calibration_images=n_calibration_images, **common)
        else:
            meta = _export(target, checkpoint, out, steps, ensemble, quantize.value, common, n_calibration_images,
                           nbits, compute_units.value if compute_units is not None else "all")
    Console().print(_summary(meta, steps is None or ensemble is None, time.perf_counter() - t0))


def _export(target: Target, checkpoint, out, steps, ensemble, quantize: str, common: dict, n_calibration_images: int,
            nbits: int, compute_units: str) -> dict:
    if target == Target.executorch:
        from edgeseg.mobile.executorch_export import export_executorch

        return export_executorch(checkpoint, out, steps, ensemble, quantize, n_calibration_images=n_calibration_images,
                                 **common)
    if target == Target.onnx:
        from edgeseg.mobile.onnx_export import export_onnx

        return export_onnx(checkpoint, out, steps, ensemble, quantize, n_calibration_images=n_calibration_images,
                           **common)
    from edgeseg.mobile.coreml_export import export_coreml

    return export_coreml(checkpoint, out, steps, ensemble, quantize, nbits=nbits, compute_units=compute_units,
                         **common)


def _summary(meta: dict, defaulted: bool, seconds: float):
    from rich.table import Table

    table = Table(title=f"edgeseg export: {meta['target']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    web = meta.get("web")
    if web:
        table.title = "edgeseg export: web"
        table.add_row("folder", f"{web['folder']} ({_size(web['size_bytes'])} in all; serve it with any static file "
                                f"server, e.g. python -m edgeseg.mobile.web {web['folder']}, which sends the headers threads need)")
        table.add_row("runtime", f"{web['runtime']['package']} {web['runtime']['version']} ({web['runtime']['build']})")
    table.add_row("file", str(Path(web["folder"]) / meta["file"]) if web else meta["path"])
    table.add_row("sidecar", (str(Path(web["folder"]) / meta["file"]) if web else meta["path"]) + ".json")
    for key, what in (("etrecord", "ETRecord"), ("bundled_program", "bundled program")):
        if meta.get(key):
            b = meta[key]
            extra = (f", {b['n_images']} held-out images, atol {b['atol']:.3g}, verified in the runtime"
                     if key == "bundled_program" else "")
            table.add_row(what, f"{b['file']} ({_size(b['size_bytes'])}{extra})")
    table.add_row("preset", f"{meta['preset']} ({meta['prediction_type']}), {meta['image_size'][0]}x{meta['image_size'][1]}")
    prov = " (provisional defaults)" if meta["defaults"]["provisional"] and defaulted else ""
    table.add_row("sampler", f"K={meta['steps']} DDIM steps {meta['timesteps']}, ensemble N={meta['ensemble']}{prov}")
    table.add_row("precision", {"none": "fp16" if meta["target"] == "coreml" else "fp32"}.get(meta["quantize"], meta["quantize"]))
    table.add_row("size", f"{_size(meta['size_bytes'])} ({meta['size_bytes']} bytes)")
    table.add_row("sha256", meta["sha256"])
    par = meta["parity"]
    if meta["target"] == "executorch":
        others = meta.get("non_delegated_ops") or {}
        extra = f"; outside: {', '.join(f'{k} x{v}' for k, v in others.items())}" if others else ""
        table.add_row("delegate calls", f"{meta['delegate_calls']} (XNNPACK){extra}")
    if meta["target"] in ("executorch", "onnx"):
        table.add_row("parity", f"mask Dice vs eager {par['mask_dsc_vs_eager']:.4f} on {par['n_images']} held-out "
                                f"images (gate {par['threshold']}; {par['runtime']})")
    else:
        st = meta["structure"]
        table.add_row("structure", f"{st['model_type']}, inputs {[i['name'] for i in st['inputs']]}, outputs "
                                   f"{[o['name'] for o in st['outputs']]}, {st.get('fp16_ops', 0)} fp16 ops, "
                                   f"{st.get('compressed_weight_ops', 0)} compressed weight tensors; compute units "
                                   f"{meta['compute_units']}")
        table.add_row("parity", f"{par['mask_dsc_vs_eager']:.4f} on {par['n_images']} images"
                      if par.get("mask_dsc_vs_eager") is not None else par.get("note", "not measured"))
    table.add_row("time", f"{seconds:.1f} s")
    return table
