"""One model, one K and N, the same images, five runtimes: eager PyTorch, the .pte fp32 and int8
(ExecuTorch, XNNPACK) and ONNX Runtime fp32 and int8; against this CPU's measured GEMM ceiling.

    python bench/runtimes.py                          # student-mobile (128 px) + tiny-student (64 px)
    python bench/runtimes.py --quick --out /tmp/rt    # smoke run: tiny-student, 2 process repeats

Models (default ``student-mobile,tiny-student``, K = 1, N = 3 as in the README's export table):
the phone student ``student-mobile`` at 128 px has no trained checkpoint here, so it is
benchmarked untrained (speed and memory: weights do not change either) and its Dice is null
("untrained"); the shipped trained ``tiny-student`` (64 px, synthetic) gives the Dice column.
Its exports are the real ``edgeseg export`` code paths (parity-gated; the untrained model's
parity is recorded on 4 images, not enforced), cached in ``--export-dir`` by sidecar.

Protocol (this VM's speed is bimodal from one process to the next): every (model, runtime)
runs in ``--process-repeats`` fresh processes, interleaved round-robin; each times one image
``--runs`` times after ``--warmup`` runs and reports its median. Latency = the median of the
process medians, with their IQR. **Peak memory of the program**: in each process, after the
runtime library is loaded (torch + edgeseg for eager, ``executorch.runtime``, ``onnxruntime``)
the kernel's high-water mark is reset (``/proc/self/clear_refs``), then the model is loaded
and run; the row's MB is the new high-water mark minus the resident memory at the reset (the
program's own load + run cost, what it adds to an app that already links the runtime).
Dice: the first ``--dice-images`` images of the synthetic test split, image i with noise seeded
by i, identical for all runtimes.

Ceiling: fp32 GEMM GFLOP/s of torch (``torch.mm``, ``--gemm-size`` square) and the int8 GEMM
GOP/s of ONNX Runtime (``MatMulInteger``, uint8 x int8 -> int32), each the median over
processes, at the same thread count. Each program's GFLOP/s is K x N x the network's GFLOP
per call (torch's FlopCounterMode, bench/presets.py) over its latency; its share is of the fp32
ceiling for fp32 programs and of the int8 ceiling for int8 ones (whose non-GEMM ops stay fp32).

Writes ``<out>/runtimes.json``, ``runtimes.md`` and ``runtimes.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402

RUNTIMES = ("eager", "pte-fp32", "pte-int8", "onnx-fp32", "onnx-int8")
LABELS = {"eager": "eager PyTorch", "pte-fp32": ".pte fp32 (XNNPACK)", "pte-int8": ".pte int8 (XNNPACK)",
          "onnx-fp32": "ONNX Runtime fp32", "onnx-int8": "ONNX Runtime int8 (QDQ)"}
RESULT_TAG = "RUNTIMES-RESULT "
SHIPPED = {"tiny-student": "tiny-student-synthetic"}


# ========================================================================================
# child processes
# ========================================================================================
def _status_mb() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line[:5]] = int(line.split()[1]) / 1024
    return out


def _reset_peak() -> float:
    """Reset the kernel's resident high-water mark; returns the resident MB at the reset."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb()["VmRSS"]


def _load_runner(spec: dict):
    """A callable (image, noise) -> mean for the spec's runtime; loading it is part of the program's memory."""
    import torch

    rt = spec["runtime"]
    if rt == "eager":
        from edgeseg.segmenter import Segmenter

        model = _eager_model(spec)
        seg = Segmenter.from_model(model, steps=spec["steps"], ensemble=spec["ensemble"], backend="torch")

        def run(img, nz):
            with torch.inference_mode():
                return seg.predict(img, noise=nz)[0]
        return run
    if rt.startswith("pte"):
        from executorch.runtime import Runtime

        method = Runtime.get().load_program(Path(spec["file"])).load_method("forward")
        return lambda img, nz: method.execute((img, nz))[0]
    from edgeseg.mobile.onnx_export import ort_session

    sess = ort_session(spec["file"], threads=spec["threads"])
    return lambda img, nz: torch.from_numpy(sess.run(["mean"], {"image": img.numpy(), "noise": nz.numpy()})[0])


def _load_library(runtime: str) -> None:
    """Import what the runtime needs before the memory reset (an app links it anyway)."""
    if runtime.startswith("pte"):
        from executorch.runtime import Runtime

        Runtime.get()
    elif runtime.startswith("onnx"):
        import onnxruntime  # noqa: F401

        from edgeseg.mobile import onnx_export  # noqa: F401
    else:
        import edgeseg.segmenter  # noqa: F401


def _eager_model(spec: dict):
    import torch

    from edgeseg.models import build

    if spec.get("checkpoint"):
        from edgeseg.checkpoint import load_model

        return load_model(spec["checkpoint"]).eval()
    torch.manual_seed(0)
    return build(spec["preset"]).eval()


def _test_images(size: int, n: int):
    from edgeseg.data import load_dataset

    ds = load_dataset("synthetic", "test", size=size, augment=False, seed=0)
    return [ds[i] for i in range(min(n, len(ds)))]


def measure_latency(spec: dict) -> dict:
    """One process: reset the memory peak after the runtime is loaded, load the model, time `runs` runs."""
    import torch

    common.set_threads(spec["threads"])
    _load_library(spec["runtime"])
    img = _test_images(spec["image_size"], 1)[0][0][None].contiguous()
    noise = torch.randn(spec["ensemble"], 1, *img.shape[-2:], generator=torch.Generator().manual_seed(0))
    base = _reset_peak()
    run = _load_runner(spec)
    times = common.timed_ms(lambda: run(img, noise), spec["warmup"], spec["runs"])
    return {"runs_ms": times, "median_ms": statistics.median(times),
            "program_peak_mb": round(_status_mb()["VmHWM"] - base, 1), "rss_at_reset_mb": round(base, 1)}


def measure_dice(spec: dict) -> dict:
    import torch

    from edgeseg.metrics import mask_dice

    common.set_threads(spec["threads"])
    run = _load_runner(spec)
    dice = []
    for i, item in enumerate(_test_images(spec["image_size"], spec["dice_images"])):
        img, mask = item[0], item[1]
        nz = torch.randn(spec["ensemble"], 1, *img.shape[-2:], generator=torch.Generator().manual_seed(i))
        mean = run(img[None].contiguous(), nz)
        dice.append(float(mask_dice(mean > 0, mask[None] > 0)[0]))
    return {"dice": round(statistics.mean(dice), 4), "dice_std": round(statistics.pstdev(dice), 4),
            "dice_images": len(dice)}


def measure_gemm(spec: dict) -> dict:
    """fp32 GFLOP/s of torch.mm or int8 GOP/s of ONNX Runtime's MatMulInteger, n x n x n."""
    import numpy as np

    n, reps = spec["gemm_size"], spec["gemm_reps"]
    common.set_threads(spec["threads"])
    if spec["runtime"] == "gemm-fp32":
        import torch

        a, b = torch.randn(n, n), torch.randn(n, n)
        run = lambda: torch.mm(a, b)  # noqa: E731
    else:
        sess = _matmul_integer_session(n, spec["threads"])
        feeds = {"A": np.random.randint(0, 255, (n, n), dtype=np.uint8),
                 "B": np.random.randint(-128, 127, (n, n), dtype=np.int8)}
        run = lambda: sess.run(None, feeds)  # noqa: E731
    run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"gflops": round(2 * n ** 3 / statistics.median(times) / 1e9, 2)}


def _matmul_integer_session(n: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(k, t, [n, n]) for k, t in (("A", TensorProto.UINT8), ("B", TensorProto.INT8))]
    y = helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "gemm", io, [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    fn = {"latency": measure_latency, "dice": measure_dice, "gemm": measure_gemm}[spec["kind"]]
    print(RESULT_TAG + json.dumps(fn(spec)), flush=True)
    return 0


def run_child(spec: dict, timeout: float) -> dict:
    return common.run_child(Path(__file__).resolve(), "--child", spec, RESULT_TAG, timeout)


# ========================================================================================
# parent: models, exports, the measurement rounds, results
# ========================================================================================
def model_info(name: str) -> dict:
    from bench.presets import measure
    from edgeseg.models import preset

    ck = None
    if name in SHIPPED:
        from edgeseg.runs import shipped_path

        ck = str(shipped_path(SHIPPED[name]))
    p = preset(name)
    m = measure(name, "meta")
    return {"preset": name, "checkpoint": ck, "image_size": p.image_size, "gflop_per_call": m["gflop_per_call"],
            "params": m["params"], "trained": ck is not None}


def ensure_export(info: dict, runtime: str, steps: int, ensemble: int, export_dir: Path) -> dict:
    """The exported file for a (model, runtime): reused from export_dir when its sidecar still matches."""
    target, precision = runtime.split("-")
    tag = "trained" if info["trained"] else "untrained"
    out = export_dir / f"{info['preset']}-{tag}-k{steps}n{ensemble}-{precision}.{'pte' if target == 'pte' else 'onnx'}"
    return common.cached_export(out, lambda path: _export(info, target, precision, steps, ensemble, path))


def _export(info: dict, target: str, precision: str, steps: int, ensemble: int, out: Path) -> dict:
    import torch

    from edgeseg.models import build

    if info["checkpoint"]:
        model, kw = info["checkpoint"], {}
    else:  # untrained: latency and memory only, the gate's Dice is recorded, not enforced
        torch.manual_seed(0)
        model, kw = build(info["preset"]).eval(), {"parity_threshold": 0.0, "n_parity_images": 4}
    if target == "pte":
        from edgeseg.mobile.executorch_export import export_executorch as export
    else:
        from edgeseg.mobile.onnx_export import export_onnx as export
    t0 = time.perf_counter()
    meta = export(model, out, steps, ensemble, "int8" if precision == "int8" else "none", dataset="synthetic",
                  progress=lambda m: print(f"    export: {m}", flush=True), **kw)
    meta["export_seconds"] = round(time.perf_counter() - t0, 1)
    return meta


def ceilings(args) -> dict:
    out = {}
    for kind in ("gemm-fp32", "gemm-int8"):
        vals = [run_child({"kind": "gemm", "runtime": kind, "gemm_size": args.gemm_size, "gemm_reps": 5,
                           "threads": args.threads}, 600)["gflops"] for _ in range(args.process_repeats)]
        out[kind] = {"median": round(statistics.median(vals), 2), "runs": vals,
                     "what": (f"torch.mm fp32 {args.gemm_size}^3" if kind == "gemm-fp32" else
                              f"onnxruntime MatMulInteger uint8 x int8 -> int32 {args.gemm_size}^3") +
                             f", {args.threads} threads, median over {args.process_repeats} processes"}
        print(f"ceiling {kind}: {out[kind]['median']} G(FL)OP/s {vals}", flush=True)
    return out


def _spec(args, info: dict, runtime: str, kind: str, file: str | None) -> dict:
    return {"kind": kind, "runtime": runtime, "preset": info["preset"], "checkpoint": info["checkpoint"],
            "image_size": info["image_size"], "steps": args.steps, "ensemble": args.ensemble, "file": file,
            "threads": args.threads, "runs": args.runs, "warmup": args.warmup, "dice_images": args.dice_images}


def measure_all(args, infos: list[dict], files: dict) -> dict:
    """{(preset, runtime): {"latency": [per-process results], "dice": {...} | None, "error": str | None}}."""
    res = {(i["preset"], rt): {"latency": [], "dice": None, "error": None} for i in infos for rt in RUNTIMES}
    for r in range(args.process_repeats):  # round-robin: a slow phase of the VM hits every runtime
        for info in infos:
            for rt in RUNTIMES:
                cell = res[(info["preset"], rt)]
                if cell["error"] is not None:
                    continue
                try:
                    got = run_child(_spec(args, info, rt, "latency", files.get((info["preset"], rt))), args.timeout)
                    cell["latency"].append(got)
                    print(f"  [{r + 1}/{args.process_repeats}] {info['preset']:<14} {rt:<10} "
                          f"{got['median_ms']:8.1f} ms  program peak {got['program_peak_mb']:6.1f} MB", flush=True)
                except Exception as e:  # noqa: BLE001 (one broken runtime must not lose the others)
                    cell["error"] = f"{type(e).__name__}: {e}"[:400]
                    print(f"  {info['preset']} {rt} FAILED: {cell['error']}", flush=True)
    for info in infos:
        if not info["trained"] or args.dice_images == 0:
            continue
        for rt in RUNTIMES:
            cell = res[(info["preset"], rt)]
            if cell["error"] is None:
                cell["dice"] = run_child(_spec(args, info, rt, "dice", files.get((info["preset"], rt))), args.timeout)
    return res


def make_rows(args, infos: list[dict], files: dict, exports: dict, res: dict, ceil: dict) -> list[dict]:
    rows = []
    for info in infos:
        gflop_img = args.steps * args.ensemble * info["gflop_per_call"]
        for rt in RUNTIMES:
            cell, ex = res[(info["preset"], rt)], exports.get((info["preset"], rt))
            lat = common.latency_stats([c["median_ms"] for c in cell["latency"]])
            mem = [c["program_peak_mb"] for c in cell["latency"]]
            precision = "int8" if rt.endswith("int8") else "fp32"
            gfs = round(gflop_img / (lat["median"] / 1000), 2) if lat["median"] else None
            ceiling = ceil["gemm-int8" if precision == "int8" else "gemm-fp32"]["median"]
            size = (ex["meta"]["size_bytes"] if ex else Path(info["checkpoint"]).stat().st_size if info["checkpoint"]
                    else info["params"] * 4)
            rows.append({
                "model": info["preset"], "image_size": info["image_size"], "trained": info["trained"], "runtime": rt,
                "label": LABELS[rt], "precision": precision, "steps": args.steps, "ensemble": args.ensemble,
                "latency_ms": lat, "process_runs": [c["runs_ms"] for c in cell["latency"]],
                "program_peak_mb": round(statistics.median(mem), 1) if mem else None, "program_peak_mb_runs": mem,
                "file": common.shown_path(files.get((info["preset"], rt)) or info["checkpoint"]),
                "file_mb": round(size / 1e6, 3),
                "gflop_per_image": round(gflop_img, 3), "gflops": gfs,
                "ceiling_share": round(gfs / ceiling, 4) if gfs and ceiling else None,
                "dice": (cell["dice"] or {}).get("dice"), "dice_images": (cell["dice"] or {}).get("dice_images"),
                "dice_reason": None if cell["dice"] else ("untrained" if not info["trained"] else "not measured"),
                "parity": (ex["meta"].get("parity") or {}).get("mask_dsc_vs_eager") if ex else None,
                "status": "ok" if cell["error"] is None else "failed", "error": cell["error"]})
    return rows


def targets(rows: list[dict]) -> list[str]:
    """The issue's three targets, as measured (benchmarks, not tests)."""
    by = {(r["model"], r["runtime"]): r for r in rows}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for prec in ("fp32", "int8"):
            pte, ort = by.get((model, f"pte-{prec}")), by.get((model, f"onnx-{prec}"))
            if pte and ort and pte["latency_ms"]["median"] and ort["latency_ms"]["median"]:
                ratio = pte["latency_ms"]["median"] / ort["latency_ms"]["median"]
                out.append(f"{model} {prec}: .pte {pte['latency_ms']['median']:.1f} ms vs ONNX Runtime "
                           f"{ort['latency_ms']['median']:.1f} ms (.pte/ORT = {ratio:.2f}; target <= 1: "
                           f"{'met' if ratio <= 1 else 'NOT met'})")
    fp32 = by.get(("student-mobile", "pte-fp32"))
    if fp32 and fp32["ceiling_share"] is not None:
        out.append(f"student-mobile fp32 .pte: {fp32['gflops']} GFLOP/s = {100 * fp32['ceiling_share']:.0f}% of the "
                   f"fp32 GEMM ceiling (target >= 70%: {'met' if fp32['ceiling_share'] >= 0.7 else 'NOT met'})")
    for rt in ("pte-int8", "pte-fp32"):
        r = by.get(("student-mobile", rt))
        if r and r["program_peak_mb"] is not None:
            out.append(f"student-mobile {rt} program peak memory {r['program_peak_mb']} MB at 128 px "
                       f"(target < 50 MB: {'met' if r['program_peak_mb'] < 50 else 'NOT met'})")
    return out


def markdown(doc: dict) -> str:
    c = doc["ceilings"]
    lines = [f"Measured on: {common.machine_line(doc['machine'])}.", "",
             f"Ceilings: fp32 GEMM {c['gemm-fp32']['median']} GFLOP/s ({c['gemm-fp32']['what']}); "
             f"int8 GEMM {c['gemm-int8']['median']} GOP/s ({c['gemm-int8']['what']}).", "",
             "| model | runtime | latency ms median [IQR] | program peak MB | file MB | GFLOP/s | share of ceiling "
             "| Dice | parity vs eager |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["results"]:
        lat = r["latency_ms"]
        lat_s = f"{lat['median']:.1f} [{lat['iqr']:.1f}]" if lat["median"] is not None else r["status"]
        dice = f"{r['dice']:.3f}" if r["dice"] is not None else f"- ({r['dice_reason']})"
        share = f"{100 * r['ceiling_share']:.0f}% ({r['precision']})" if r["ceiling_share"] is not None else "-"
        par = f"{r['parity']:.3f}" if r["parity"] is not None else "-"
        lines.append(f"| {r['model']} {r['image_size']} px{'' if r['trained'] else ' (untrained)'} | {r['label']} | "
                     f"{lat_s} | {common._fmt(r['program_peak_mb'], '.1f')} | {r['file_mb']:.2f} | "
                     f"{common._fmt(r['gflops'], '.1f')} | {share} | {dice} | {par} |")
    lines += ["", "Targets:", ""] + [f"- {t}" for t in doc["targets"]] + [""]
    lines += ["Notes:", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    return "\n".join(lines)


def plot(path: Path, doc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in doc["results"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    width = 0.8 / len(RUNTIMES)
    for k, rt in enumerate(RUNTIMES):
        rs = [next((r for r in doc["results"] if r["model"] == m and r["runtime"] == rt), None) for m in models]
        xs = [i + (k - 2) * width for i in range(len(models))]
        med = [(r["latency_ms"]["median"] or 0) if r else 0 for r in rs]
        err = [[(r["latency_ms"]["median"] - r["latency_ms"]["p25"]) if r and r["latency_ms"]["median"] else 0
                for r in rs], [(r["latency_ms"]["p75"] - r["latency_ms"]["median"])
                               if r and r["latency_ms"]["median"] else 0 for r in rs]]
        axes[0].bar(xs, med, width, yerr=err, capsize=3, label=LABELS[rt])
        axes[1].bar(xs, [100 * (r["ceiling_share"] or 0) if r else 0 for r in rs], width, label=LABELS[rt])
    for ax, ylabel in zip(axes, ("latency per image, ms (median, IQR over processes)",
                                 "GFLOP/s as % of the GEMM ceiling (fp32 or int8)")):
        ax.set_xticks(range(len(models)), [f"{m}\nK{doc['settings']['steps']} N{doc['settings']['ensemble']}"
                                           for m in models])
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(common.machine_line(doc["machine"]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=lambda s: [x for x in s.split(",") if x], default=None,
                    help="comma-separated presets (default student-mobile,tiny-student; --quick: tiny-student)")
    ap.add_argument("--steps", type=int, default=1, help="DDIM steps K (default 1)")
    ap.add_argument("--ensemble", type=int, default=3, help="ensemble size N (default 3)")
    ap.add_argument("--process-repeats", type=int, default=None, help="fresh processes per runtime (default 5)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per process (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up runs per process")
    ap.add_argument("--dice-images", type=int, default=None, help="test images for Dice (default 32, --quick 4)")
    ap.add_argument("--gemm-size", type=int, default=2048, help="square GEMM size for the ceilings")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable CPUs)")
    ap.add_argument("--export-dir", type=Path, default=REPO / ".cache" / "bench-runtimes")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "runtimes")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny-student, 2 processes x 3 runs, 4 Dice images")
    ap.add_argument("--exports-only", action="store_true", help="make (or check) the exports, measure nothing")
    ap.add_argument("--child", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    args.models = args.models or (["tiny-student"] if q else ["student-mobile", "tiny-student"])
    args.process_repeats = args.process_repeats or (2 if q else 5)
    args.runs = args.runs or (3 if q else 10)
    args.dice_images = args.dice_images if args.dice_images is not None else (4 if q else 32)
    if args.threads is None:
        try:
            args.threads = len(os.sched_getaffinity(0))
        except AttributeError:
            args.threads = os.cpu_count() or 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return _child_main(args.child)
    t0 = time.perf_counter()
    infos = [model_info(m) for m in args.models]
    exports, files = {}, {}
    args.export_dir.mkdir(parents=True, exist_ok=True)
    for info in infos:
        for rt in RUNTIMES[1:]:
            print(f"export {info['preset']} {rt}", flush=True)
            ex = ensure_export(info, rt, args.steps, args.ensemble, args.export_dir)
            exports[(info["preset"], rt)], files[(info["preset"], rt)] = ex, ex["path"]
    if args.exports_only:
        return 0
    ceil = ceilings(args)
    res = measure_all(args, infos, files)
    rows = make_rows(args, infos, files, exports, res, ceil)
    settings = {k: getattr(args, k) for k in ("models", "steps", "ensemble", "process_repeats", "runs", "warmup",
                                              "dice_images", "gemm_size", "threads")}
    settings["wall_s"] = round(time.perf_counter() - t0, 1)
    doc = {"schema": "edgeseg-bench-runtimes", "schema_version": 1, "generated": common.now_iso(),
           "command": common.recorded_command(), "quick": args.quick, "machine": common.machine_info(args.threads),
           "settings": settings, "ceilings": ceil, "results": rows, "targets": targets(rows), "notes": NOTES}
    doc["machine"]["onnxruntime"] = common.package_version("onnxruntime")
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "runtimes.json", doc)
    (args.out / "runtimes.md").write_text("# Runtimes: same model, K, N and images\n\n" + markdown(doc))
    plot(args.out / "runtimes.png", doc)
    print(markdown(doc))
    print(f"wrote {args.out}/runtimes.json, runtimes.md, runtimes.png in {time.perf_counter() - t0:.0f} s")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


NOTES = [
    "Latency: one image (batch 1) through the whole segmenter (K steps, N-member ensemble as a batch); median of "
    "the per-process medians, IQR over processes (this VM's speed changes between processes).",
    "Program peak MB: the high-water mark above the process with the runtime library loaded (reset through "
    "/proc/self/clear_refs), i.e. loading the model and running it; Python and the library itself are excluded.",
    "student-mobile is untrained (no 128 px student is shipped): its Dice is null; tiny-student is the shipped "
    "trained synthetic student.",
    "GFLOP/s counts the network's FLOPs (K x N calls, FlopCounterMode); int8 programs keep their non-GEMM ops in "
    "fp32, so their share of the int8 GEMM ceiling is a loose upper reference.",
]


if __name__ == "__main__":
    raise SystemExit(main())
