"""Benchmark the fused distillation loss: fused Triton vs eager torch vs torch.compile.

    python bench/kernels.py                 # on a CUDA machine: B in {16, 64, 256} at 128x128
    python bench/kernels.py --cpu-smoke     # tiny sizes on CPU under the Triton interpreter

Forward and forward+backward (d total / d eps_s), float32 maps by default (`--dtype bf16`).
Writes bench/results/kernels.json, kernels.md (a Markdown table) and kernels.png.

Bandwidth: the bytes the fused algorithm must move at least (forward: read student, teacher,
target and distance map once; backward: read them once more and write the gradient), divided
by the measured time, as a fraction of the device's peak memory bandwidth from a small table
of known GPUs ('unknown' otherwise). The same byte count is used for every method, so for
eager / compiled torch it is an "effective" bandwidth. Times are medians of
`triton.testing.do_bench` (L2 flushed between repetitions).

Without CUDA the script says so and exits 0 without writing anything, unless --cpu-smoke is
given: then it runs tiny sizes on CPU under TRITON_INTERPRET=1 to check that the script works
and writes kernels_smoke.* files marked as a smoke test (those timings are not measurements).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

if "--cpu-smoke" in sys.argv:  # the interpreter must be chosen before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench import common  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results"

# Peak memory bandwidth in bytes/s, matched against torch.cuda.get_device_name() (first match
# wins, so the specific names come before the generic ones).
PEAK_BANDWIDTH = [
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("H200", 4.8e12),
    ("GH200", 4.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100-PCIE-40GB", 1.555e12),
    ("A100-SXM4-40GB", 1.555e12),
    ("A10G", 0.6e12),
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("RTX 4090", 1.008e12),
    ("RTX 3090", 0.936e12),
]

METHODS = ("fused", "eager", "compile")
MODES = ("fwd", "fwd+bwd")


def peak_bandwidth(name: str) -> float | None:
    for key, bw in PEAK_BANDWIDTH:
        if key.lower() in name.lower():
            return bw
    return None


def make_inputs(B: int, H: int, W: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = torch.randn((B, 1, H, W), generator=g).to(device, dtype)
    te = torch.randn((B, 1, H, W), generator=g).to(device, dtype)
    y = torch.randn((B, 1, H, W), generator=g).to(device, dtype)
    # a distance-map-like field in [0, 1] (1 on a ring, falling off), and a few all-ones samples
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    r = torch.sqrt(yy**2 + xx**2)
    base = 1.0 - (r - 0.5).abs() / (r - 0.5).abs().max()
    d = base.expand(B, 1, H, W).clone()
    d[::7] = 1.0
    d = d.to(device, torch.float32)
    t = torch.randint(0, 250, (B,), generator=g).to(device)
    return s, te, y, d, t


def min_bytes(B: int, H: int, W: int, dtype: torch.dtype, mode: str) -> int:
    n = B * H * W
    es = torch.tensor([], dtype=dtype).element_size()
    fwd = n * (3 * es + 4)  # student, teacher, target in `dtype`, distance map fp32
    if mode == "fwd":
        return fwd
    return 2 * fwd + n * es  # the backward re-reads the four maps and writes the gradient


def build_fns(compile_ok: bool):
    from edgeseg.kernels.fused_distill_loss import fused_distill_loss_torch, fused_distill_loss_triton

    fns = {
        "fused": fused_distill_loss_triton,
        "eager": fused_distill_loss_torch,
    }
    if compile_ok:
        fns["compile"] = torch.compile(fused_distill_loss_torch, dynamic=False)
    return fns


def bench_cuda(fn, reps_ms: int = 100) -> float:
    from triton.testing import do_bench

    for _ in range(3):  # compile / autotune / allocator warm-up outside do_bench's estimate
        fn()
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=25, rep=reps_ms, return_mode="median"))


def run(args) -> dict:
    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    sizes = [(b, args.size, args.size) for b in args.batch_sizes]
    fns = build_fns(not args.no_compile)
    T = 250
    rows = []
    for B, H, W in sizes:
        s, te, y, d, t = make_inputs(B, H, W, dtype, device)
        # correctness first: the fused result against the reference on these inputs
        ref_total, _ = fns["eager"](s, te, y, d, t, T)
        fused_total, _ = fns["fused"](s, te, y, d, t, T)
        if not torch.allclose(fused_total, ref_total, rtol=1e-4, atol=1e-6):
            raise SystemExit(f"fused loss disagrees with the reference at B={B}: {fused_total} vs {ref_total}")
        for mode in MODES:
            for name, fn in fns.items():
                if mode == "fwd":
                    def call(fn=fn):
                        with torch.no_grad():
                            fn(s, te, y, d, t, T)
                else:
                    sg = s.detach().clone().requires_grad_(True)

                    def call(fn=fn, sg=sg):
                        sg.grad = None
                        total, _ = fn(sg, te, y, d, t, T)
                        total.backward()
                try:
                    ms = common.median_ms(call) if smoke else bench_cuda(call)
                    err = None
                except Exception as e:  # e.g. torch.compile unavailable: record, don't invent
                    ms, err = None, f"{type(e).__name__}: {e}"[:300]
                nbytes = min_bytes(B, H, W, dtype, mode)
                row = dict(B=B, H=H, W=W, dtype=args.dtype, mode=mode, method=name, ms=ms, bytes=nbytes,
                           gbps=(nbytes / (ms * 1e-3) / 1e9) if ms else None, error=err)
                rows.append(row)
                print(f"B={B:4d} {mode:8s} {name:8s} " + (f"{ms:9.4f} ms  {row['gbps']:8.1f} GB/s" if ms else f"failed: {err}"),
                      flush=True)
    return dict(rows=rows)


def finish(args, result: dict) -> dict:
    smoke = args.cpu_smoke
    if smoke:
        dev_name, peak = f"CPU ({platform.processor() or platform.machine()}), Triton interpreter", None
    else:
        dev_name = torch.cuda.get_device_name(0)
        peak = peak_bandwidth(dev_name)
    rows = result["rows"]
    eager = {(r["B"], r["mode"]): r["ms"] for r in rows if r["method"] == "eager"}
    for r in rows:
        e = eager.get((r["B"], r["mode"]))
        r["speedup_vs_eager"] = (e / r["ms"]) if (e and r["ms"]) else None
        r["frac_peak_bw"] = (r["gbps"] * 1e9 / peak) if (peak and r["gbps"]) else None
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return dict(
        kind="SMOKE TEST (CPU, Triton interpreter): not a measurement" if smoke else "measurement",
        smoke_test=smoke,
        device=dev_name,
        peak_bandwidth_bytes_per_s=peak if peak else "unknown",
        dtype=args.dtype,
        torch=torch.__version__,
        triton=triton_version,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        rows=rows,
    )


def write_markdown(report: dict, path: Path) -> None:
    smoke = report["smoke_test"]
    peak = report["peak_bandwidth_bytes_per_s"]
    lines = ["# Fused distillation loss: benchmark", ""]
    if smoke:
        lines += ["**SMOKE TEST on CPU under the Triton interpreter: these timings are NOT measurements.** "
                  "They only show that the benchmark script runs.", ""]
    lines += [
        f"Device: {report['device']}; peak memory bandwidth: "
        + (f"{peak / 1e12:.2f} TB/s" if isinstance(peak, float) else "unknown")
        + f"; torch {report['torch']}, triton {report['triton']}; inputs {report['dtype']} "
        f"(distance map fp32); {report['created']}.",
        "",
        "Time: median over repetitions (ms). Bandwidth: the fused algorithm's minimum bytes "
        "(forward reads 4 maps; backward reads them again and writes the gradient) / time.",
        "",
        "| B | H x W | pass | method | time (ms) | vs eager | GB/s | % of peak |",
        "|---:|:---:|:---|:---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        ms = f"{r['ms']:.4f}" if r["ms"] else "failed"
        sp = f"{r['speedup_vs_eager']:.2f}x" if r.get("speedup_vs_eager") else "-"
        gb = f"{r['gbps']:.1f}" if r["gbps"] else "-"
        fr = f"{100 * r['frac_peak_bw']:.1f}%" if r.get("frac_peak_bw") else ("unknown" if not smoke else "-")
        lines.append(f"| {r['B']} | {r['H']}x{r['W']} | {r['mode']} | {r['method']} | {ms} | {sp} | {gb} | {fr} |")
    if not smoke:
        lines += ["", "Targets (issue 5): fused >= 3x eager at B = 16-64; >= 60% of peak bandwidth at B = 256.", ""]
        for r in report["rows"]:
            if r["method"] != "fused" or not r["ms"]:
                continue
            if r["B"] in (16, 64) and r.get("speedup_vs_eager"):
                ok = r["speedup_vs_eager"] >= 3
                lines.append(f"- B={r['B']} {r['mode']}: {r['speedup_vs_eager']:.2f}x eager ({'met' if ok else 'NOT met'})")
            if r["B"] == 256:
                if r.get("frac_peak_bw"):
                    ok = r["frac_peak_bw"] >= 0.6
                    lines.append(f"- B=256 {r['mode']}: {100 * r['frac_peak_bw']:.1f}% of peak ({'met' if ok else 'NOT met'})")
                else:
                    lines.append(f"- B=256 {r['mode']}: peak bandwidth of this device unknown")
    path.write_text("\n".join(lines) + "\n")


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["ms"]]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, MODES):
        bs = sorted({r["B"] for r in rows if r["mode"] == mode})
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            vals = [next((r["ms"] for r in rows if r["B"] == b and r["mode"] == mode and r["method"] == m), 0)
                    for b in bs]
            ax.bar([j + i * width for j in range(len(bs))], vals, width, label=m)
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(bs))])
        ax.set_xticklabels([f"B={b}" for b in bs])
        ax.set_ylabel("time (ms, median)")
        ax.set_yscale("log")
        ax.set_title(mode)
        ax.legend()
    title = f"fused distillation loss, {report['device']}"
    if report["smoke_test"]:
        title = "SMOKE TEST, not a measurement: " + title
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--size", type=int, default=None, help="H = W (default 128; 24 with --cpu-smoke)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny sizes on CPU under the Triton interpreter (checks the script; not a measurement)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    if args.cpu_smoke:
        args.batch_sizes = args.batch_sizes or [2, 3]
        args.size = args.size or 24
        prefix = "kernels_smoke"
    else:
        if not torch.cuda.is_available():
            print("No CUDA device here: the kernel benchmark needs a GPU. Nothing was measured and no "
                  "results were written (use --cpu-smoke to check that the script runs).")
            return 0
        args.batch_sizes = args.batch_sizes or [16, 64, 256]
        args.size = args.size or 128
        prefix = "kernels"
    from edgeseg.kernels import triton_available

    if not triton_available():
        print("Triton is not installed: nothing to benchmark (pip install triton).")
        return 0

    result = run(args)
    report = finish(args, result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{prefix}.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out / f"{prefix}.md")
    write_plot(report, args.out / f"{prefix}.png")
    print(f"wrote {args.out / (prefix + '.json')}, .md, .png" + ("  [SMOKE TEST, not a measurement]" if args.cpu_smoke else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
