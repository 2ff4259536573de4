"""Does edge-focused distillation help, and is the student worth shipping? Seed-replicated ablations.

Two suites (``--suite``, default by dataset):

* ``real`` (issue 15; the default on a real dataset, e.g. ``--dataset isic2017``): every trained
  variant gets the same training wall time (``Budget.train_seconds``): students with no KD, global
  KD, EFKD (tau 0.3 / 0.6 / 0.9), EFKD with the few-step ideas (sampler-timestep focus, a Dice +
  BCE loss on the predicted x0, both, and both on the mobile-block preset), the U-Net at its own size and
  at the student's GFLOP per image; the teacher scored as shipped. Scored on the test split at the
  shipped sampler setting with per-image scores kept, so variants are compared paired by seed
  (``paired_by_seed``). Writes ``ablation-<dataset>.{json,md}``, ``-tradeoff.png``, ``-tau.png``,
  ``-overlays.png``.
* ``kd`` (issue 8; the synthetic set): same teacher, same number of steps for every student, in
  three tables (``Variant.groups``):

  * ``kd``:   no KD / global KD (Eq. 2) / EFKD (Eq. 3-7, tau 0.6);
  * ``tau``:  EFKD with tau in 0.3, 0.45, 0.6, 0.75, 0.9;
  * ``pred``: EFKD students predicting ``epsilon`` (the paper), ``sample`` (x0) or ``v_prediction``,
    taught by the same x0 teacher through the exact re-parameterisation (``Trainer.loss_on``),
    evaluated with DDIM at K = 1, 2, 4 steps and at the paper's protocol (DDPM 250 steps x 9);
  * the teacher itself (its "seeds" are evaluation-noise seeds);
  * a discriminative single-pass U-Net (``edgeseg.baselines.SmallUNet``, 0.12 M params, Dice + BCE).

  Every student starts from the teacher's matching stages and trains the same number of steps
  with the tiny recipe (README "The main job"); only the objective (and prediction type) changes.

    python bench/ablation.py --dataset isic2017 --data-dir DIR --teacher edgeseg/assets/tiny-teacher-isic2017.safetensors
    python bench/ablation.py                 # the committed synthetic run (see bench/README.md for its time)
    python bench/ablation.py --quick --out /tmp/abl   # smoke run (tests)
    python bench/ablation.py --dataset isic2018 --data-dir DATA --teacher runs/x/teacher.safetensors

Writes ``<out>/ablation.json`` (every run + mean/std over seeds), ``ablation.md`` (the table),
``ablation-tau.png`` and ``ablation-overlays.png``; per-run results are kept in
``<work>/<variant>-s<seed>.json`` so an interrupted run continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.ablation_common import OVERLAY_COLUMNS, Budget, aggregate, plot_overlays, plot_tau, run_one  # noqa: E402
from bench.ablation_real import REAL, REAL_QUICK, markdown_real, measure_cost_real, paired_table  # noqa: E402
from bench.ablation_real import plot_tradeoff, real_variants  # noqa: E402
from bench.ablation_synthetic import QUICK, markdown, measure_cost, paper_subset_ddim, variants  # noqa: E402
from bench.common import machine_info, now_iso, recorded_command, shown_path, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, a few steps, a few images")
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--teacher", default=None, help="teacher checkpoint (default: the shipped synthetic teacher)")
    ap.add_argument("--suite", choices=("kd", "real"), default=None,
                    help="kd: the synthetic step-budget ablation; real: the equal-wall-time suite of issue 15 "
                         "(default: kd on the synthetic set, real on a real dataset)")
    ap.add_argument("--student-preset", default="tiny-student")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="student training steps")
    ap.add_argument("--eval-images", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: tables and pictures from the runs finished so far")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--work", default=None, help="per-run files (default: runs/ablation[-quick])")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from edgeseg.errors import EdgesegError

    console = Console()
    try:
        from edgeseg.checkpoint import load_preset
        from edgeseg.pipeline import shipped_teacher

        suite = args.suite or ("kd" if args.dataset == "synthetic" else "real")
        if suite == "real":
            budget = REAL_QUICK if args.quick else REAL
        else:
            budget = QUICK if args.quick else Budget()
        budget = replace(budget, **{k: v for k, v in (("seeds", args.seeds), ("steps", args.steps),
                                                      ("eval_images", args.eval_images)) if v is not None})
        teacher = args.teacher or shipped_teacher("tiny-teacher", args.dataset)
        if teacher is None:
            raise EdgesegError(f"no shipped teacher for {args.dataset}: pass --teacher PATH (edgeseg train-teacher)")
        tpreset, _ = load_preset(teacher)
        vs = real_variants() if suite == "real" else variants(tpreset.prediction_type)
        if args.only:
            keep = set(args.only.split(","))
            unknown = keep - {v.name for v in vs}
            if unknown:
                raise EdgesegError(f"--only: unknown variants {sorted(unknown)}; known: {[v.name for v in vs]}")
            vs = [v for v in vs if v.name in keep]
        for v in vs:
            if v.teacher and not (REPO / v.teacher).exists() and not args.report_only:
                raise EdgesegError(f"variant {v.name} needs the teacher {v.teacher}, which does not exist: train it "
                                   f"(bench/README.md: the longer-trained teacher) or leave the variant out "
                                   f"with --only")
    except EdgesegError as e:
        console.print(f"[red]error:[/] {e}")
        return 2

    out = Path(args.out)
    name = "ablation" if args.dataset == "synthetic" else f"ablation-{args.dataset}"
    work = Path(args.work) if args.work else REPO / "runs" / (f"{name}-quick" if args.quick else name)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    job = {"teacher": str(teacher), "dataset": args.dataset, "data_dir": args.data_dir, "work": str(work),
           "threads": args.threads, "student_preset": args.student_preset}
    # settings of the per-run files: a change invalidates them
    stamp = {"budget": asdict(budget), "job": {k: v for k, v in job.items() if k != "work"}}
    stamp_file = work / "settings.json"
    if not args.report_only:  # --report-only reads what is there, whatever settings made it
        if stamp_file.exists() and json.loads(stamp_file.read_text()) != json.loads(json.dumps(stamp)):
            for f in work.glob("*.json"):
                f.unlink()
        write_json(stamp_file, stamp)

    # data cache first (once, not in every worker)
    from edgeseg.data import load_dataset

    load_dataset(args.dataset, "test", data_dir=args.data_dir, size=tpreset.image_size)

    t0 = time.time()
    tasks = [(v, s) for s in range(budget.seeds) for v in vs if s < (v.seeds or budget.seeds)]
    runs, todo = [], []
    for v, s in tasks:
        f = work / f"{v.name}-s{s}.json"
        if f.exists():
            runs.append(json.loads(f.read_text()))
        elif not args.report_only:
            todo.append((v, s))
    console.print(f"ablation: {len(tasks)} runs ({len(runs)} already done in {work}), {args.jobs} in parallel "
                  f"x {args.threads} thread(s); students {budget.steps} steps, eval on {budget.eval_images} test images")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    prog = Progress(TextColumn("[bold]ablation[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[last]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console)
    import multiprocessing as mp

    with prog, ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        task = prog.add_task("runs", total=len(tasks), completed=len(runs), last="")
        futs = {pool.submit(run_one, v, s, budget, job): (v, s) for v, s in todo}
        for fut in as_completed(futs):
            v, s = futs[fut]
            r = fut.result()
            runs.append(r)
            prog.update(task, advance=1, last=f"{v.name} s{s}: DSC {100 * r['metrics']['dsc']:.2f} ({r['seconds']:.0f} s)")
    run_seconds = time.time() - t0
    wall_file = work / "wall.json"  # run-phase wall time, summed over invocations (resumed runs)
    wall = (json.loads(wall_file.read_text())["seconds"] if wall_file.exists() else 0.0) + (run_seconds if todo else 0.0)
    write_json(wall_file, {"seconds": round(wall, 1), "jobs": args.jobs, "threads": args.threads})
    if suite == "kd":
        paper_subset_ddim(runs, work, job, budget)
    console.print("measuring cost (params, GFLOP, latency per image)")
    repeats = 3 if args.quick else 10
    cost = (measure_cost_real(vs, runs, job, budget, args.threads, repeats) if suite == "real"
            else measure_cost(str(teacher), args.student_preset, budget, args.threads, repeats))
    # per-image scores stay in the per-run files; the document keeps what they give (paired differences)
    slim = [{**r, "metrics": {k: v for k, v in r["metrics"].items() if k != "per_image"}} for r in runs]
    doc = {
        "generated": now_iso(), "command": recorded_command([sys.executable, *sys.argv]), "quick": args.quick, "suite": suite,
        "machine": machine_info(args.threads), "threads": args.threads, "jobs": args.jobs,
        "dataset": args.dataset, "teacher": shown_path(teacher), "teacher_prediction_type": tpreset.prediction_type,
        "student_preset": args.student_preset, "budget": asdict(budget),
        "variants": [asdict(v) for v in vs], "cost": cost,
        "aggregate": aggregate(runs), "runs": sorted(slim, key=lambda r: (r["variant"], r["seed"])),
        "seconds": {"runs_wall": round(wall, 1), "runs_sum": round(sum(r["seconds"] for r in runs), 1),
                    "this_invocation": None},
    }
    if suite == "real":
        doc["paired"] = paired_table(runs)
    suffix = "" if args.dataset == "synthetic" else f"-{args.dataset}"
    if any(name.startswith("efkd-tau") for name in doc["aggregate"]):  # else nothing to sweep (--only)
        plot_tau(doc, out / f"ablation{suffix}-tau.png")
    plot_overlays(doc, work, str(teacher), out / f"ablation{suffix}-overlays.png", job, budget,
                  columns=OVERLAY_COLUMNS[suite])
    if suite == "real":
        plot_tradeoff(doc, out / f"ablation{suffix}-tradeoff.png")
    doc["seconds"]["this_invocation"] = round(time.time() - t0, 1)
    write_json(out / f"ablation{suffix}.json", doc)
    md = markdown_real(doc) if suite == "real" else markdown(doc)
    (out / f"ablation{suffix}.md").write_text(
        md + f"\nRun time: {wall / 60:.1f} min wall for the {len(tasks)} runs ({args.jobs} jobs x {args.threads} "
        f"thread(s); {doc['seconds']['runs_sum'] / 60:.1f} min summed over runs), then "
        f"{doc['seconds']['this_invocation'] - run_seconds:.0f} s for cost, pictures and tables.\n")
    console.print(md)
    console.print(f"wrote {out}/ablation{suffix}.{{json,md}} and the pictures {out}/ablation{suffix}-*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
