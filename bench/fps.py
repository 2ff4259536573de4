"""Latency, FPS, peak memory, file size and Dice of the segmenter on a laptop CPU.

    python bench/fps.py                         # full run (prints a time estimate first)
    python bench/fps.py --plan                  # only print the plan and the time estimate
    python bench/fps.py --quick --out /tmp/b    # smoke run: tiny-student, 3 configs, seconds
    python bench/fps.py --checkpoint runs/x/student.safetensors --pte my.pte

For every preset (default: tiny-student, tiny-teacher, student-mobile, student-isic2018, teacher-isic2018;
the tiny ones trained: the newest run's checkpoints, else those shipped in the package):

* eager PyTorch, the paper's protocol (ancestral DDPM, 250 steps x 9 samples): the network is
  timed on a few calls at batch 9 (the ensemble as a batch) and the per-image latency is
  **extrapolated** as 250 x the median call (rows say so: ``extrapolated: true``); its Dice is
  measured on ``--paper-dice-images`` images when a trained checkpoint exists;
* eager PyTorch, few-step DDIM at the default K and N (``edgeseg.defaults.SAMPLER_DEFAULTS``);
* the fp32 and the int8 ExecuTorch ``.pte`` (XNNPACK) at the default K and N, exported into
  ``--export-dir`` (reused when already there) or given with ``--pte``;
* untrained presets above ``LARGE_GFLOP`` per call (the paper's 128 px networks): eager only, and the
  few-step row is extrapolated like the paper's (``--measure-large`` measures them in full, with .pte);
* for student presets with a trained checkpoint, the sweep K in (1, 2, 4, 8, 16) x N in (1, 3, 9) in
  eager PyTorch (``--pte-sweep`` adds the int8 .pte): the accuracy-vs-latency curve;
* teachers: eager rows only (``--teacher-pte`` exports them too).

Every configuration runs in its own child process (``--measure-one``), which times one image
per run after warm-up (median and IQR over the runs), reads its own peak resident memory
(VmHWM, i.e. ru_maxrss; the Python interpreter and torch are included, ``model_rss_mb`` is the
peak above the process's memory after imports, and for a .pte ``program_rss_mb`` the peak above
the process with the ExecuTorch runtime loaded: what loading and running the program costs) and
then scores Dice on the first
``--dice-images`` images of the synthetic test split with the same K, N. Dice is null with the
reason "untrained" for presets without a trained checkpoint: numbers are never invented.

Writes ``<out>/mobile-cpu.json`` (schema in bench/common.py), ``mobile-cpu.md`` and ``mobile-cpu.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402

DEFAULT_PRESETS = ("tiny-student", "tiny-teacher", "student-mobile", "student-isic2018", "teacher-isic2018")
# Untrained presets above this many GFLOP per call (the paper's 128 px networks, ~54-56 GFLOP) are
# timed per network call and extrapolated (K x one call at batch N), without .pte exports, so the
# default run fits 30 minutes on 2 cores; --measure-large runs them in full.
LARGE_GFLOP = 20.0
SWEEP_K = (1, 2, 4, 8, 16)
SWEEP_N = (1, 3, 9)
PAPER_STEPS, PAPER_ENSEMBLE = 250, 9
FALLBACK_DEFAULTS = {"sample": (1, 3), "v_prediction": (1, 3), "epsilon": (10, 3)}
RESULT_TAG = "BENCH-RESULT "


# ========================================================================================
# child process: measure one configuration
# ========================================================================================
def _load_eager(spec: dict):
    import torch

    from edgeseg.models import build

    if spec.get("checkpoint"):
        from edgeseg.checkpoint import load_model

        return load_model(spec["checkpoint"]).eval()
    torch.manual_seed(0)
    return build(spec["preset"]).eval()


def _dataset(spec: dict):
    from edgeseg.data import load_dataset

    return load_dataset("synthetic", "test", size=spec["image_size"], augment=False, seed=spec.get("data_seed", 0))


def measure_one(spec: dict) -> dict:
    """Run in a fresh process: latency runs, peak memory, then Dice. Returns a partial row."""
    import torch

    threads = common.set_threads(int(spec["threads"]))
    base = common.rss_mb()
    ds = _dataset(spec)
    image = ds[0][0][None].contiguous()
    s = spec["image_size"]
    K, N = int(spec["steps"]), int(spec["ensemble"])
    warmup, repeats = int(spec["warmup"]), int(spec["repeats"])
    gen = torch.Generator().manual_seed(0)
    out: dict = {"threads": threads}
    times: list[float] = []

    if spec["backend"] == "eager":
        model = _load_eager(spec)
        if spec["sampler"] == "ddpm" or spec.get("extrapolate"):
            # the paper protocol (or a large untrained preset), extrapolated: K x one network call at batch N
            x = torch.randn(N, 1, s, s, generator=gen)
            g = image.repeat_interleave(N, 0)
            with torch.no_grad():
                for i in range(warmup + repeats):
                    t = torch.full((N,), 249 - 7 * i, dtype=torch.long)
                    t0 = time.perf_counter()
                    model(x, g, t)
                    dt = (time.perf_counter() - t0) * 1000
                    if i >= warmup:
                        times.append(dt * K)
            out["extrapolated"] = True
            out["extrapolation"] = (f"{K} x the median of {repeats} timed network calls at batch {N} (the ensemble as "
                                    f"a batch, after {warmup} warm-up); sampler step arithmetic not included")
        else:
            from edgeseg.evaluate import SamplerSettings, predict

            st = SamplerSettings("ddim", K, N)
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                predict(model, image, st, generator=gen)
                dt = (time.perf_counter() - t0) * 1000
                if i >= warmup:
                    times.append(dt)
    else:  # executorch .pte
        from executorch.runtime import Runtime

        from edgeseg.mobile.runtime import PteSegmenter

        # the runtime's Python bindings load torch's and ExecuTorch's libraries (~200 MB): a phone
        # app links the runtime, not these, so the program's own memory is counted from here
        Runtime.get()
        out["runtime_rss_mb"] = common.rss_mb()["rss_mb"]
        seg = PteSegmenter(spec["pte"])
        if seg.batch != 1:
            raise SystemExit(f"{spec['pte']}: batch {seg.batch} programs are not benchmarked (export with batch 1)")
        noise = torch.randn(seg.ensemble, 1, s, s, generator=gen)
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            seg.method.execute((image, noise))
            dt = (time.perf_counter() - t0) * 1000
            if i >= warmup:
                times.append(dt)
    peak = common.rss_mb()
    out["latency_runs_ms"] = times
    out["peak_rss_mb"] = peak["peak_mb"]
    out["baseline_rss_mb"] = base["rss_mb"]

    n_dice = int(spec.get("dice_images") or 0)
    if spec.get("dice_reason") is None and n_dice > 0:
        from edgeseg.metrics import MetricAccumulator

        n_dice = min(n_dice, len(ds))
        acc = MetricAccumulator()
        if spec["backend"] == "eager":
            from edgeseg.evaluate import SamplerSettings, evaluate

            st = SamplerSettings(spec["sampler"], K, N)
            r = evaluate(model, ds, st, batch_size=4 if spec["sampler"] == "ddpm" else 8, seed=0, max_images=n_dice,
                         keep=0, progress=False)
            m = r["metrics"]["dsc"]
        else:
            for i in range(n_dice):
                img, mask = ds[i][0][None], ds[i][1][None]
                mean, _ = seg(img, seed=i)
                acc.update_masks(mean > seg.threshold, mask > 0)
            m = acc.compute()["dsc"]
        out["dice"], out["dice_std"], out["dice_images"] = round(float(m["mean"]), 4), round(float(m["std"]), 4), n_dice
    return out


def _child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    res = measure_one(spec)
    print(RESULT_TAG + json.dumps(res), flush=True)
    return 0


# ========================================================================================
# parent: plan, exports, run children, write results
# ========================================================================================
def default_steps_ensemble(prediction_type: str) -> tuple[int, int]:
    try:
        from edgeseg.defaults import sampler_defaults as d

        return d(prediction_type)
    except Exception:  # noqa: BLE001 (mobile extras not installed)
        return FALLBACK_DEFAULTS[prediction_type]


def _gflop_per_call(name: str, cache: dict) -> float:
    if name not in cache:
        from bench.presets import measure

        cache[name] = measure(name, "meta")["gflop_per_call"]
    return cache[name]


def resolve_checkpoints(args) -> dict[str, str]:
    """{preset: checkpoint path}: every --checkpoint, else the newest run's student/teacher, else the
    checkpoints shipped in the package (tiny-teacher, tiny-student on the synthetic set)."""
    from edgeseg.checkpoint import load_preset

    found: dict[str, str] = {}
    paths = list(args.checkpoint or [])
    if not paths and not args.no_run_checkpoint:
        from edgeseg.runs import resolve_checkpoint

        for which in ("student", "teacher"):
            try:
                paths.append(str(resolve_checkpoint(None, which, root=args.runs_dir)))
            except Exception:  # noqa: BLE001 (no run yet)
                pass
    for p in paths:
        preset, _ = load_preset(p)
        found.setdefault(preset.name, str(Path(p).resolve()))
    if not args.checkpoint and not args.no_run_checkpoint:
        # a fresh clone has no runs: the package ships the trained tiny teacher and student
        from edgeseg.pipeline import shipped_checkpoint

        for name in args.presets:
            shipped = shipped_checkpoint(name, "synthetic")
            if name not in found and shipped is not None:
                found[name] = str(shipped)
    return found


def _data_seed(ckpt: str | None) -> int:
    if not ckpt:
        return 0
    from edgeseg.checkpoint import load_preset

    _, meta = load_preset(ckpt)
    cfg = meta.get("train_config") if isinstance(meta.get("train_config"), dict) else {}
    return int(cfg.get("seed", 0) or 0)


def build_plan(args, checkpoints: dict[str, str]) -> list[dict]:
    from edgeseg.models import preset as get_preset

    plan = []
    gcache: dict = {}
    for name in args.presets:
        p = get_preset(name)
        ck = checkpoints.get(name)
        # a checkpoint may carry another prediction type than its preset's default (ablation students)
        if ck:
            from edgeseg.checkpoint import load_preset

            p = load_preset(ck)[0]
        dk, dn = default_steps_ensemble(p.prediction_type)
        if args.steps:
            dk = args.steps
        if args.ensemble:
            dn = args.ensemble
        base = dict(preset=name, role=p.role, image_size=p.image_size, checkpoint=ck, data_seed=_data_seed(ck),
                    gflop=_gflop_per_call(name, gcache), prediction_type=p.prediction_type, threads=args.threads,
                    dice_reason=None if ck else "untrained")

        def job(**kw):
            j = dict(base, warmup=args.warmup, repeats=args.repeats, dice_images=args.dice_images, default=False,
                     sweep=False, pte=None)
            j.update(kw)
            plan.append(j)

        if not args.skip_paper:
            job(backend="eager", precision="fp32", sampler="ddpm", steps=PAPER_STEPS, ensemble=PAPER_ENSEMBLE,
                repeats=args.paper_calls, dice_images=args.paper_dice_images,
                dice_reason=base["dice_reason"] or (None if args.paper_dice_images > 0 else "skipped (--paper-dice-images 0)"))
        large = base["gflop"] > LARGE_GFLOP and ck is None and not args.measure_large
        job(backend="eager", precision="fp32", sampler="ddim", steps=dk, ensemble=dn, default=True,
            extrapolate=large, repeats=args.paper_calls if large else args.repeats)
        if not args.skip_pte and not args.quick and not large and (p.role == "student" or args.teacher_pte):
            for q in ("fp32", "int8"):
                job(backend="executorch", precision=q, sampler="ddim", steps=dk, ensemble=dn, default=True,
                    pte="export")
        do_sweep = (ck is not None or args.sweep_all) and not args.no_sweep and p.role == "student"
        if do_sweep:
            grid = [(k, n) for k in SWEEP_K for n in SWEEP_N] if not args.quick else [(1, 1)]
            for k, n in grid:
                if (k, n) == (dk, dn):
                    continue
                job(backend="eager", precision="fp32", sampler="ddim", steps=k, ensemble=n, sweep=True,
                    dice_images=args.sweep_dice_images)
                if args.pte_sweep and not args.quick:
                    job(backend="executorch", precision="int8", sampler="ddim", steps=k, ensemble=n, sweep=True,
                        pte="export")
    # .pte files given on the command line (sidecar says what they are)
    for path in args.pte or []:
        from edgeseg.mobile import sidecar as sc

        meta = sc.read_sidecar(path)
        name = meta["preset"]
        p = get_preset(name)
        ck = meta.get("checkpoint") or checkpoints.get(name)
        plan.append(dict(preset=name, role=p.role, image_size=p.image_size, checkpoint=ck, data_seed=_data_seed(ck),
                         gflop=_gflop_per_call(name, gcache), prediction_type=p.prediction_type, threads=args.threads,
                         dice_reason=None if ck else "untrained", backend="executorch",
                         precision="int8" if meta.get("quantize") == "int8" else "fp32", sampler="ddim",
                         steps=int(meta["steps"]), ensemble=int(meta["ensemble"]), warmup=args.warmup,
                         repeats=args.repeats, dice_images=args.dice_images, default=False, sweep=False,
                         pte=str(Path(path).resolve())))
    return plan


# --- time estimate ------------------------------------------------------------------------
CHILD_OVERHEAD_S = 6.0


def probe_gflops(threads: int) -> float:
    """Effective GFLOP/s of this CPU on the tiny-student network (eager, batch 3)."""
    import torch

    from edgeseg.models import build

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = build("tiny-student").eval()
    x, g, t = torch.randn(3, 1, 64, 64), torch.rand(3, 3, 64, 64), torch.tensor([10, 10, 10])
    with torch.no_grad():
        m(x, g, t)
        t0 = time.perf_counter()
        for _ in range(3):
            m(x, g, t)
        dt = (time.perf_counter() - t0) / 3
    return 3 * 0.857 / dt


def estimate_s(job: dict, gflops: float, exported: set) -> float:
    calls = job["steps"] * job["ensemble"]
    if job["sampler"] == "ddpm" or job.get("extrapolate"):
        timing = (job["warmup"] + job["repeats"]) * job["ensemble"] * job["gflop"] / gflops
        dice = job["dice_images"] * calls * job["gflop"] / gflops if job["dice_reason"] is None else 0
    else:
        speed = gflops * (1.5 if job["backend"] == "executorch" else 1.0)
        per_img = calls * job["gflop"] / speed
        timing = (job["warmup"] + job["repeats"]) * per_img
        dice = job["dice_images"] * per_img if job["dice_reason"] is None else 0
    export = 0.0
    if job.get("pte") == "export":
        key = (job["preset"], job["steps"], job["ensemble"], job["precision"])
        if key not in exported:
            exported.add(key)
            # lowering grows with the unrolled graph; parity + calibration run the program a few times
            imgs = (4 + (8 if job["precision"] == "int8" else 0)) if job["checkpoint"] else (1 + (2 if job["precision"] == "int8" else 0))
            # lowering time, fitted on this repo's first full run (2 cores): ~100 s fp32 and ~300-420 s
            # int8 for a 2-step tiny/mobile program; it grows with the unrolled graph, not the image
            export = 40 + 30 * job["steps"] + imgs * calls * job["gflop"] / gflops * 2
            if job["precision"] == "int8":
                export *= 3
    return CHILD_OVERHEAD_S + timing + dice + export


def fit_repeats(plan: list[dict], gflops: float, budget_s: float, min_repeats: int) -> None:
    """Lower repeats of the most expensive configurations until the estimate fits the budget."""
    for _ in range(50):
        total = sum(estimate_s(j, gflops, set()) for j in plan)
        if total <= budget_s:
            return
        worst = max((j for j in plan if j["repeats"] > min_repeats), default=None,
                    key=lambda j: (j["steps"] * j["ensemble"] * j["gflop"]))
        if worst is None:
            for j in plan:  # last resort: one warm-up run
                j["warmup"] = min(j["warmup"], 1)
            return
        for j in plan:
            if j["preset"] == worst["preset"] and j["repeats"] > min_repeats:
                j["repeats"] = max(min_repeats, j["repeats"] - 1)


# --- exports ------------------------------------------------------------------------------
def ensure_export(job: dict, export_dir: Path, n_parity: int, n_calib: int) -> dict:
    """The .pte for a job: reused from export_dir when its sidecar matches (bench.common.cached_export),
    else exported now."""
    import hashlib

    tag = "untrained"
    if job["checkpoint"]:
        h = hashlib.sha256(Path(job["checkpoint"]).read_bytes()).hexdigest()[:10]
        tag = f"ck{h}"
    out = export_dir / f"{job['preset']}-k{job['steps']}n{job['ensemble']}-{job['precision']}-{tag}.pte"
    return common.cached_export(out, lambda path: _export(job, path, n_parity, n_calib))


def _export(job: dict, out: Path, n_parity: int, n_calib: int) -> dict:
    import torch

    from edgeseg.mobile.executorch_export import export_executorch
    from edgeseg.models import build

    if job["checkpoint"]:
        model_or_ck, thr = job["checkpoint"], None
    else:  # untrained weights: the parity gate is recorded, not enforced (masks of random weights)
        torch.manual_seed(0)
        model_or_ck, thr = build(job["preset"]).eval(), 0.0
        n_parity, n_calib = 1, min(n_calib, 2)  # latency only: parity recorded on one image
    t0 = time.perf_counter()
    meta = export_executorch(model_or_ck, out, job["steps"], job["ensemble"],
                             "int8" if job["precision"] == "int8" else "none", n_parity_images=n_parity,
                             n_calibration_images=n_calib, parity_threshold=thr, dataset="synthetic",
                             progress=lambda m: print(f"    export: {m}", flush=True))
    meta["export_seconds"] = round(time.perf_counter() - t0, 1)
    return meta


def run_child(job: dict, timeout: float) -> dict:
    return common.run_child(Path(__file__).resolve(), "--measure-one", job, RESULT_TAG, timeout)


def config_name(j: dict) -> str:
    if j["backend"] == "eager":
        kind = "eager paper DDPM" if j["sampler"] == "ddpm" else "eager DDIM"
    else:
        kind = f".pte {j['precision']}"
    return f"{j['preset']} {kind} K{j['steps']} N{j['ensemble']}"


def to_row(job: dict, res: dict | None, error: str | None, params: dict, export: dict | None) -> dict:
    calls = job["steps"] * job["ensemble"]
    row = common.make_row(
        config=config_name(job), preset=job["preset"], role=job["role"], backend=job["backend"],
        precision=job["precision"], sampler=job["sampler"], steps=job["steps"], ensemble=job["ensemble"],
        default=job["default"], sweep=job["sweep"], params=params.get(job["preset"]),
        gflop_per_call=job["gflop"], calls_per_image=calls, gflop_per_image=round(calls * job["gflop"], 3),
        checkpoint=common.shown_path(job["checkpoint"]), dice_reason=job["dice_reason"], dice_images=0,
        latency_ms=common.latency_stats([]),
    )
    if export is not None:
        meta = export["meta"]
        row.update(file=common.shown_path(export["path"]), file_mb=round(meta["size_bytes"] / 1e6, 3), sha256=meta.get("sha256"),
                   export={"reused": export["reused"], "seconds": meta.get("export_seconds"),
                           "delegate_calls": meta.get("delegate_calls"), "parity": meta.get("parity")})
    elif job["backend"] == "eager" and job["checkpoint"]:
        ck = Path(job["checkpoint"])
        row.update(file=common.shown_path(ck), file_mb=round(ck.stat().st_size / 1e6, 3))
    elif job["backend"] == "eager":
        row.update(file_mb=round(params.get(job["preset"], 0) * 4 / 1e6, 3),
                   note="file MB: fp32 weights size (no checkpoint file)")
    if error is not None:
        row.update(status="failed", note=error[:400])
        return row
    lat = common.latency_stats(res["latency_runs_ms"])
    row.update(latency_ms=lat, fps=round(1000.0 / lat["median"], 3) if lat["median"] else None,
               extrapolated=bool(res.get("extrapolated")), extrapolation=res.get("extrapolation"),
               peak_rss_mb=res["peak_rss_mb"], baseline_rss_mb=res["baseline_rss_mb"],
               model_rss_mb=round(res["peak_rss_mb"] - res["baseline_rss_mb"], 1)
               if res.get("baseline_rss_mb") is not None else None,
               # .pte only: peak above the process with the ExecuTorch runtime loaded (load + run)
               program_rss_mb=round(res["peak_rss_mb"] - res["runtime_rss_mb"], 1)
               if res.get("runtime_rss_mb") is not None else None,
               threads=res.get("threads"))
    if "dice" in res:
        row.update(dice=res["dice"], dice_std=res["dice_std"], dice_images=res["dice_images"], dice_reason=None)
    elif row["dice_reason"] is None:
        row["dice_reason"] = "not measured (--dice-images 0)"
    return row


def add_speedups(rows: list[dict]) -> None:
    paper = {r["preset"]: r["latency_ms"]["median"] for r in rows
             if r["sampler"] == "ddpm" and r["status"] == "ok" and r["latency_ms"]["median"]}
    for r in rows:
        p, m = paper.get(r["preset"]), r["latency_ms"]["median"]
        r["speedup_vs_paper"] = round(p / m, 2) if p and m else None


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", type=lambda s: [x for x in s.split(",") if x], default=None,
                    help=f"comma-separated presets (default {','.join(DEFAULT_PRESETS)}; --quick: tiny-student)")
    ap.add_argument("--checkpoint", action="append", help="trained checkpoint (repeatable; its preset is read from "
                    "its JSON). Default: the newest run's student and teacher under --runs-dir")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--no-run-checkpoint", action="store_true",
                    help="do not look for a run's or the package's checkpoints (every preset untrained)")
    ap.add_argument("--pte", action="append", help="also benchmark this exported .pte (needs its .pte.json sidecar)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--export-dir", type=Path, default=REPO / ".cache" / "bench-exports")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny-student, eager paper + default + K1N1, "
                    "no exports (.pte only via --pte), 3 repeats, 4 Dice images")
    ap.add_argument("--plan", action="store_true", help="print the plan and the time estimate, run nothing")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable CPUs)")
    ap.add_argument("--steps", type=int, default=None, help="override the default K")
    ap.add_argument("--ensemble", type=int, default=None, help="override the default N")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per config (default 10, --quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 2, --quick 1)")
    ap.add_argument("--paper-calls", type=int, default=None, help="timed network calls for the paper protocol "
                    "extrapolation (default 5, --quick 2)")
    ap.add_argument("--dice-images", type=int, default=None, help="test images for Dice (default 32, --quick 4)")
    ap.add_argument("--paper-dice-images", type=int, default=None,
                    help="test images for the paper protocol's Dice (250 x 9 calls each; default 2, --quick 0)")
    ap.add_argument("--skip-paper", action="store_true", help="no paper-protocol rows")
    ap.add_argument("--skip-pte", action="store_true", help="no .pte exports")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-all", action="store_true", help="sweep untrained presets too (latency only)")
    ap.add_argument("--teacher-pte", action="store_true", help="export and time the teachers' .pte too")
    ap.add_argument("--sweep-dice-images", type=int, default=None, help="test images for the sweep's Dice "
                    "(default 16, --quick 4)")
    ap.add_argument("--measure-large", action="store_true",
                    help=f"measure untrained presets above {LARGE_GFLOP:g} GFLOP/call in full (.pte included; hours)")
    ap.add_argument("--pte-sweep", action="store_true", help="also export and time the int8 .pte over the sweep")
    ap.add_argument("--parity-images", type=int, default=4, help="held-out images for each export's parity check")
    ap.add_argument("--calibration-images", type=int, default=32,
                    help="training images for int8 calibration (default 32, as edgeseg export)")
    ap.add_argument("--budget-min", type=float, default=30.0, help="lower repeats (not below 3) to fit this estimate")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per configuration")
    ap.add_argument("--measure-one", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    dflt = lambda v, full, quick: v if v is not None else (quick if q else full)  # noqa: E731
    args.presets = args.presets or (["tiny-student"] if q else list(DEFAULT_PRESETS))
    args.repeats = dflt(args.repeats, 10, 3)
    args.warmup = dflt(args.warmup, 2, 1)
    args.paper_calls = dflt(args.paper_calls, 5, 2)
    args.dice_images = dflt(args.dice_images, 32, 4)
    args.paper_dice_images = dflt(args.paper_dice_images, 2, 0)
    args.sweep_dice_images = dflt(args.sweep_dice_images, 16, 4)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    args.threads = args.threads or usable
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure_one:
        return _child_main(args.measure_one)
    t_start = time.perf_counter()
    from edgeseg.models import build, count_params

    checkpoints = resolve_checkpoints(args)
    plan = build_plan(args, checkpoints)
    gflops = probe_gflops(args.threads)
    if not args.quick:
        fit_repeats(plan, gflops, args.budget_min * 60, min_repeats=3)
    est = [estimate_s(j, gflops, set()) for j in plan]
    exported: set = set()
    est_total = sum(estimate_s(j, gflops, exported) for j in plan)
    print(f"machine: {common.cpu_model()}, {args.threads} threads; probe {gflops:.1f} GFLOP/s (eager, tiny-student)")
    print(f"checkpoints: {checkpoints or 'none (every Dice is null: untrained)'}")
    print(f"plan: {len(plan)} configurations, estimated {est_total / 60:.1f} min "
          f"(exports included; a rough model from the probe)")
    for j, e in zip(plan, est):
        print(f"  {config_name(j):<48} repeats {j['repeats']:>2}  dice imgs "
              f"{j['dice_images'] if j['dice_reason'] is None else 0:>3}  ~{e:6.0f} s")
    if args.plan:
        return 0

    params: dict = {}
    for name in {j["preset"] for j in plan}:
        params[name] = count_params(build(name))
    rows = []
    for i, job in enumerate(plan, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(plan)}] {config_name(job)}", flush=True)
        export, error, res = None, None, None
        try:
            if job["pte"] == "export":
                args.export_dir.mkdir(parents=True, exist_ok=True)
                export = ensure_export(job, args.export_dir, args.parity_images, args.calibration_images)
                job["pte"] = export["path"]
            elif job["pte"]:
                from edgeseg.mobile import sidecar as sc

                export = {"path": job["pte"], "meta": sc.read_sidecar(job["pte"]), "reused": True}
            res = run_child(job, args.timeout)
        except Exception as e:  # noqa: BLE001 (one failed config must not lose the others)
            error = f"{type(e).__name__}: {e}"
            print(f"    FAILED: {error}", flush=True)
        row = to_row(job, res, error, params, export)
        rows.append(row)
        lat = row["latency_ms"]["median"]
        if lat is not None:
            print(f"    {lat:.1f} ms/image{' (extrapolated)' if row['extrapolated'] else ''}, "
                  f"peak {row['peak_rss_mb']} MB, Dice {row['dice'] if row['dice'] is not None else row['dice_reason']}"
                  f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    add_speedups(rows)

    settings = {
        "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "paper_calls": args.paper_calls,
        "dice_images": args.dice_images, "paper_dice_images": args.paper_dice_images,
        "sweep_dice_images": args.sweep_dice_images,
        "dice_dataset": "synthetic test split (first images, seed of the checkpoint's training config)",
        "sweep_k": list(SWEEP_K), "sweep_n": list(SWEEP_N), "presets": args.presets,
        "checkpoints": {k: common.shown_path(v) for k, v in checkpoints.items()}, "probe_gflops": round(gflops, 2), "estimated_s": round(est_total, 1),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "latency": "per image (batch 1), wall time of one full segmenter run, median and IQR over repeats",
        "peak_rss": "VmHWM of a fresh child process per configuration (Python + torch included)",
    }
    notes = [
        "Paper protocol rows (DDPM 250 x 9) are extrapolated: 250 x the median network call at batch 9.",
        "Dice is null with reason 'untrained' where no trained checkpoint exists for the preset.",
        ".pte exports of untrained presets record their parity but are not gated by it.",
        "peak MB includes the Python interpreter and torch; model_rss_mb in the JSON is the peak above "
        "the memory after imports, program_rss_mb (.pte) the peak above the process with the ExecuTorch "
        "runtime loaded: the program's own load and run. A phone app without Python uses less.",
    ]
    doc = common.result_doc("mobile-cpu", common.machine_info(args.threads), settings, rows, notes, quick=args.quick)
    out = args.out
    common.write_json(out / "mobile-cpu.json", doc)
    common.write_markdown(out / "mobile-cpu.md", "Segmenter latency, memory and Dice on a laptop CPU", doc)
    common.write_plot(out / "mobile-cpu.png", rows, title=common.machine_line(doc["machine"]))
    print(common.markdown_table(rows))
    print(f"wrote {out / 'mobile-cpu.json'}, mobile-cpu.md, mobile-cpu.png in {time.perf_counter() - t_start:.0f} s")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
