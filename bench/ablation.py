"""Does edge-focused distillation help? A small-scale, seed-replicated ablation (issue 8).

Same teacher, same budget for every student, several seeds each:

* ``kd``:   no KD / global KD (Eq. 2) / EFKD (Eq. 3-7, tau 0.6);
* ``tau``:  EFKD with tau in 0.3, 0.45, 0.6, 0.75, 0.9;
* ``pred``: EFKD students predicting ``epsilon`` (the paper), ``sample`` (x0) or ``v_prediction``,
  taught by the same x0 teacher through the exact re-parameterisation (``Trainer.loss_on``),
  evaluated with DDIM at K = 1, 2, 4 steps and at the paper's protocol (DDPM 250 steps x 9);
* the teacher itself (its "seeds" are evaluation-noise seeds);
* a discriminative single-pass U-Net (``edgeseg.baselines.SmallUNet``, 0.12 M params, Dice + BCE).

Every student starts from the teacher's matching stages and trains the same number of steps with
the tiny recipe (README "The main job"); only the objective (and prediction type) changes.

    python bench/ablation.py                 # the committed run (see bench/README.md for its time)
    python bench/ablation.py --quick --out /tmp/abl   # smoke run (tests)
    python bench/ablation.py --dataset isic2018 --data-dir DATA --teacher runs/x/teacher.safetensors

Writes ``<out>/ablation.json`` (every run + mean/std over seeds), ``ablation.md`` (the table),
``ablation-tau.png`` and ``ablation-overlays.png``; per-run results are kept in
``<work>/<variant>-s<seed>.json`` so an interrupted run continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine_info, median_ms, now_iso, write_json  # noqa: E402

METRICS = ("dsc", "iou", "hd95", "bf", "se", "sp", "acc")
TAUS = (0.3, 0.45, 0.6, 0.75, 0.9)


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    kind: str = "student"  # "student", "teacher" or "unet"
    kd: str = "efkd"
    tau: float = 0.6
    prediction_type: str | None = None  # None: the teacher's
    groups: tuple[str, ...] = ()


def variants(teacher_type: str) -> list[Variant]:
    """Every variant once; `groups` says which tables it appears in (EFKD tau 0.6 is shared)."""
    out = [
        Variant("teacher", "teacher", kind="teacher", groups=("kd",)),
        Variant("no-kd", "student, no KD", kd="none", groups=("kd",)),
        Variant("global-kd", "student, global KD", kd="global", groups=("kd",)),
    ]
    for tau in TAUS:
        g = ("kd", "tau", "pred") if tau == 0.6 else ("tau",)
        out.append(Variant(f"efkd-tau{tau:g}", f"student, EFKD tau {tau:g}" + (f" ({teacher_type})" if tau == 0.6 else ""),
                           tau=tau, groups=g))
    for ptype in ("epsilon", "sample", "v_prediction"):
        if ptype != teacher_type:
            out.append(Variant(f"efkd-{ptype}", f"student, EFKD tau 0.6 ({ptype})", prediction_type=ptype, groups=("pred",)))
    out.append(Variant("unet", "U-Net (single pass, Dice+BCE)", kind="unet", groups=("kd",)))
    return out


@dataclass(frozen=True)
class Budget:
    seeds: int = 3
    steps: int = 150  # student optimizer steps
    batch_size: int = 8
    unet_steps: int = 800
    eval_images: int = 150  # test images for the main metrics
    eval_steps: int = 2  # DDIM K x N of the main table (the main job's evaluation setting)
    eval_ensemble: int = 3
    pred_steps: tuple[int, ...] = (1, 2, 4)  # DDIM K for the prediction-type table
    paper_images: int = 4  # the paper's protocol costs 375x the default: a subset
    paper_sampler: tuple[str, int, int] = ("ddpm", 250, 9)
    paper_seeds: int = 1
    overlay_images: int = 4


QUICK = Budget(seeds=2, steps=2, batch_size=4, unet_steps=4, eval_images=4, pred_steps=(1, 2), paper_images=1,
               paper_sampler=("ddpm", 250, 1), overlay_images=2)


# ----------------------------------------------------------------------------------------
# one run (in a worker process)
# ----------------------------------------------------------------------------------------
def _evaluate(model, test_ds, sampler: tuple[str, int, int], n: int, seed: int) -> dict:
    from edgeseg.evaluate import SamplerSettings, evaluate

    r = evaluate(model, test_ds, SamplerSettings(*sampler), batch_size=16, seed=seed, max_images=n, keep=0,
                 progress=False)
    return {k: float(v["mean"]) for k, v in r["metrics"].items()}


def run_one(v: Variant, seed: int, budget: Budget, job: dict) -> dict:
    """Train (students, U-Net) and evaluate one variant at one seed; returns its result dict."""
    import torch

    torch.set_num_threads(job["threads"])
    from edgeseg.checkpoint import load_model
    from edgeseg.data import load_dataset
    from edgeseg.train import Trainer, tiny_recipe

    t0 = time.time()
    teacher = load_model(job["teacher"])
    size = teacher.preset.image_size
    test_ds = load_dataset(job["dataset"], "test", data_dir=job["data_dir"], size=size)
    work = Path(job["work"])
    res: dict = {"variant": v.name, "seed": seed}
    main = ("ddim", budget.eval_steps, budget.eval_ensemble)
    if v.kind == "unet":
        import numpy as np

        from edgeseg.baselines import train_unet
        from edgeseg.metrics import MetricAccumulator

        train_ds = load_dataset(job["dataset"], "train", data_dir=job["data_dir"], size=size, augment=False)
        model, info = train_unet(train_ds, None, minutes=None, steps=budget.unet_steps, seed=seed,
                                 batch_size=16, threads=job["threads"])
        model.eval()
        acc = MetricAccumulator()
        with torch.no_grad():
            for i in range(0, min(budget.eval_images, len(test_ds)), 16):
                items = [test_ds[j] for j in range(i, min(i + 16, budget.eval_images, len(test_ds)))]
                img = torch.stack([it[0] for it in items])
                mask = torch.stack([it[1] for it in items])
                acc.update_masks(model(img) > 0, mask > 0)
        res["metrics"] = {k: float(np.mean(x)) for k, x in acc.per_sample().items()}
        res["train_seconds"] = round(info["train_seconds"], 1)
        torch.save(model.state_dict(), work / f"{v.name}-s{seed}.pt")
    else:
        if v.kind == "teacher":
            model, res["train_seconds"] = teacher, 0.0
        else:
            cfg = replace(tiny_recipe("student"), preset=job["student_preset"], dataset=job["dataset"],
                          data_dir=job["data_dir"], kd=v.kd, tau=v.tau, prediction_type=v.prediction_type,
                          seed=seed, max_steps=budget.steps, batch_size=budget.batch_size, num_workers=0,
                          ema_start=min(100, budget.steps // 2))
            out = work / f"{v.name}-s{seed}"
            # no KD: the teacher still initialises the student (same start for every variant), nothing else
            trainer = Trainer(cfg, out, teacher=teacher, quiet=True)
            tt = time.time()
            model = trainer.fit()
            res["train_seconds"] = round(time.time() - tt, 1)  # the EMA model is in <out>/student.safetensors
        model.eval()
        res["metrics"] = _evaluate(model, test_ds, main, budget.eval_images, seed)
        if "pred" in v.groups:
            res["by_steps"] = {str(k): _evaluate(model, test_ds, ("ddim", k, budget.eval_ensemble),
                                                 budget.eval_images, seed)
                               for k in budget.pred_steps if k != budget.eval_steps}
            res["by_steps"][str(budget.eval_steps)] = res["metrics"]
            if seed < budget.paper_seeds:
                res["paper_protocol"] = _evaluate(model, test_ds, budget.paper_sampler, budget.paper_images, seed)
    res["seconds"] = round(time.time() - t0, 1)
    write_json(work / f"{v.name}-s{seed}.json", res)
    return res


# ----------------------------------------------------------------------------------------
# cost: params, GFLOP and latency per image (main process, after the runs, one setting each)
# ----------------------------------------------------------------------------------------
def measure_cost(teacher_path: str, student_preset: str, budget: Budget, threads: int, repeats: int) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from edgeseg.baselines import SmallUNet
    from edgeseg.checkpoint import load_model
    from edgeseg.evaluate import SamplerSettings, predict
    from edgeseg.models import build, count_params, flops_per_call

    torch.set_num_threads(threads)
    teacher = load_model(teacher_path).eval()
    student = build(student_preset).eval()
    s = teacher.preset.image_size
    img = torch.rand(1, 3, s, s)
    cost = {}
    settings = {f"ddim{k}x{budget.eval_ensemble}": SamplerSettings("ddim", k, budget.eval_ensemble)
                for k in sorted(set(budget.pred_steps) | {budget.eval_steps})}
    for name, model in (("teacher", teacher), ("student", student)):
        gf = flops_per_call(model.preset.name if name == "student" else teacher.preset.name)[0] / 1e9
        row = {"params": count_params(model), "gflop_per_call": round(gf, 3), "settings": {}}
        for key, st in settings.items():
            ms = median_ms(lambda: predict(model, img, st, torch.Generator().manual_seed(0)), repeats)
            row["settings"][key] = {"gflop": round(gf * st.steps * st.ensemble, 2), "latency_ms": round(ms, 2)}
        sampler, k, n = budget.paper_sampler
        x, g, t = torch.randn(n, 1, s, s), img.expand(n, -1, -1, -1), torch.full((n,), 100)
        with torch.no_grad():  # one network call at the paper's ensemble, x K steps
            ms = median_ms(lambda: model(x, g, t), repeats)
        row["settings"]["paper"] = {"gflop": round(gf * k * n, 1), "latency_ms": round(ms * k, 1),
                                    "extrapolated": f"{k} x one network call at ensemble {n}"}
        cost[name] = row
    unet = SmallUNet().eval()
    with FlopCounterMode(display=False) as fc:
        unet(img)
    with torch.no_grad():
        ms = median_ms(lambda: unet(img), repeats * 4)
    cost["unet"] = {"params": count_params(unet), "gflop_per_call": round(fc.get_total_flops() / 1e9, 3),
                    "settings": {"single": {"gflop": round(fc.get_total_flops() / 1e9, 3), "latency_ms": round(ms, 2)}}}
    return cost


def paper_subset_ddim(runs: list[dict], work: Path, job: dict, budget: Budget) -> None:
    """For runs with a paper-protocol score, the DDIM K-step scores on the SAME few images (the
    paper subset), so the comparison is like for like. Cheap; added in place as ``paper_subset``."""
    import torch

    from edgeseg.checkpoint import load_model
    from edgeseg.data import load_dataset

    torch.set_num_threads(job["threads"])
    test_ds = None
    for r in runs:
        if "paper_protocol" not in r or "paper_subset" in r:
            continue
        f = work / f"{r['variant']}-s{r['seed']}" / "student.safetensors"
        model = load_model(f if f.exists() else job["teacher"]).eval()
        if test_ds is None:
            test_ds = load_dataset(job["dataset"], "test", data_dir=job["data_dir"], size=model.preset.image_size)
        r["paper_subset"] = {str(k): _evaluate(model, test_ds, ("ddim", k, budget.eval_ensemble), budget.paper_images,
                                               r["seed"]) for k in budget.pred_steps}
        write_json(work / f"{r['variant']}-s{r['seed']}.json", r)


# ----------------------------------------------------------------------------------------
# aggregation, table, pictures
# ----------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict:
    vals = [x for x in values if x is not None and math.isfinite(x)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def aggregate(runs: list[dict]) -> dict:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    out = {}
    for name, rs in by.items():
        a = {"seeds": sorted(r["seed"] for r in rs),
             "metrics": {m: mean_std([r["metrics"][m] for r in rs]) for m in METRICS},
             "train_seconds": mean_std([r.get("train_seconds", 0.0) for r in rs])}
        if any("by_steps" in r for r in rs):
            ks = sorted({k for r in rs for k in r.get("by_steps", {})}, key=int)
            a["by_steps"] = {k: {m: mean_std([r["by_steps"][k][m] for r in rs if k in r.get("by_steps", {})])
                                 for m in METRICS} for k in ks}
        pp = [r["paper_protocol"] for r in rs if "paper_protocol" in r]
        if pp:
            a["paper_protocol"] = {m: mean_std([p[m] for p in pp]) for m in METRICS}
        ps = [r["paper_subset"] for r in rs if "paper_subset" in r]
        if ps:
            a["paper_subset"] = {k: {m: mean_std([p[k][m] for p in ps]) for m in METRICS} for k in ps[0]}
        out[name] = a
    return out


def _pm(ms: dict, scale: float = 100.0, digits: int = 2) -> str:
    if ms["mean"] is None:
        return "-"
    return f"{ms['mean'] * scale:.{digits}f} ± {ms['std'] * scale:.{digits}f}"


def _cost_of(v: Variant, cost: dict, budget: Budget) -> tuple[int, float, float]:
    if v.kind == "unet":
        c = cost["unet"]
        return c["params"], c["settings"]["single"]["gflop"], c["settings"]["single"]["latency_ms"]
    c = cost["teacher" if v.kind == "teacher" else "student"]
    st = c["settings"][f"ddim{budget.eval_steps}x{budget.eval_ensemble}"]
    return c["params"], st["gflop"], st["latency_ms"]


def markdown(doc: dict) -> str:
    budget = Budget(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc["budget"].items()})
    vs = [Variant(**{**v, "groups": tuple(v["groups"])}) for v in doc["variants"]]
    agg, cost = doc["aggregate"], doc["cost"]
    head = ("| variant | params | GFLOP/img | ms/img | DSC | IoU | HD95 (px) | BF | SE | SP | ACC |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"Synthetic ablation on `{doc['dataset']}`: test images 1-{budget.eval_images}, "
             f"DDIM {budget.eval_steps} steps x ensemble {budget.eval_ensemble} (the U-Net: one pass); "
             f"mean ± std over {budget.seeds} seeds; students {budget.steps} steps x batch {budget.batch_size} "
             f"from the teacher's stages. Latency: 1 image, {doc['threads']} thread(s), {doc['machine']['cpu']}.", ""]

    def table(group: str, title: str) -> None:
        lines.extend([f"### {title}", "", head])
        for v in vs:
            if group not in v.groups or v.name not in agg:
                continue
            m = agg[v.name]["metrics"]
            p, gf, ms = _cost_of(v, cost, budget)
            lines.append(f"| {v.label} | {p / 1e6:.2f}M | {gf:.2f} | {ms:.0f} | {_pm(m['dsc'])} | {_pm(m['iou'])} | "
                         f"{_pm(m['hd95'], 1.0)} | {_pm(m['bf'])} | {_pm(m['se'])} | {_pm(m['sp'])} | {_pm(m['acc'])} |")
        lines.append("")

    table("kd", "Objective (Table I style)")
    table("tau", "EFKD tau sweep")
    # prediction type x sampling steps
    ks = [str(k) for k in budget.pred_steps]
    scost = cost["student"]["settings"]
    lines += ["### Prediction type (EFKD tau 0.6): DSC / BF by sampler", "",
              "| prediction type | " + " | ".join(f"DDIM {k}x{budget.eval_ensemble} DSC / BF" for k in ks)
              + f" | paper protocol ({budget.paper_sampler[0].upper()} {budget.paper_sampler[1]}x{budget.paper_sampler[2]}, "
              f"{budget.paper_images} images) DSC / BF |",
              "|---|" + "---:|" * (len(ks) + 1)]
    for v in vs:
        if "pred" not in v.groups or v.name not in agg or "by_steps" not in agg[v.name]:
            continue
        a = agg[v.name]
        cells = [f"{_pm(a['by_steps'][k]['dsc'])} / {_pm(a['by_steps'][k]['bf'])}" if k in a["by_steps"] else "-" for k in ks]
        pp = a.get("paper_protocol")
        cells.append(f"{_pm(pp['dsc'])} / {_pm(pp['bf'])} (n={pp['dsc']['n']})" if pp else "-")
        lines.append(f"| {v.prediction_type or doc['teacher_prediction_type']} | " + " | ".join(cells) + " |")
    for v in vs:
        a = agg.get(v.name, {})
        if "pred" not in v.groups or "paper_subset" not in a:
            continue
        sub = a["paper_subset"]
        cells = [f"{_pm(sub[k]['dsc'])} / {_pm(sub[k]['bf'])}" if k in sub else "-" for k in ks]
        lines.append(f"| {v.prediction_type or doc['teacher_prediction_type']}, same {budget.paper_images} images as "
                     f"the paper protocol | " + " | ".join(cells) + " | (as above) |")
    lines.append("| student latency (ms/img) | " + " | ".join(
        f"{scost[f'ddim{k}x{budget.eval_ensemble}']['latency_ms']:.0f}" for k in ks)
        + f" | {scost['paper']['latency_ms']:.0f} (extrapolated) |")
    lines.append("")
    return "\n".join(lines)


def plot_tau(doc: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = doc["aggregate"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, name in ((axes[0], "dsc", "DSC (%)"), (axes[1], "bf", "boundary F-score (%)")):
        xs, ys, es = [], [], []
        for tau in TAUS:
            a = agg.get(f"efkd-tau{tau:g}")
            if a and a["metrics"][metric]["mean"] is not None:
                xs.append(tau)
                ys.append(100 * a["metrics"][metric]["mean"])
                es.append(100 * a["metrics"][metric]["std"])
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4, label="EFKD (mean ± std over seeds)")
        for ref, style in (("no-kd", ":"), ("global-kd", "--"), ("teacher", "-")):
            a = agg.get(ref)
            if a and a["metrics"][metric]["mean"] is not None:
                m, s = 100 * a["metrics"][metric]["mean"], 100 * a["metrics"][metric]["std"]
                line = ax.axhline(m, ls=style, color="gray" if ref != "teacher" else "black", label=ref)
                ax.axhspan(m - s, m + s, color=line.get_color(), alpha=0.08)
        ax.set_xlabel("tau (edge threshold)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"EFKD tau sweep on {doc['dataset']} ({doc['budget']['seeds']} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


SHORT = {"teacher": "teacher", "no-kd": "no KD", "global-kd": "global", "efkd-tau0.6": "EFKD", "unet": "U-Net"}


def plot_overlays(doc: dict, work: Path, teacher_path: str, path: Path, job: dict, budget: Budget) -> Path:
    """The same hard test images (lowest teacher boundary F-score) under each variant (seed 0).

    One row per image; labels are "variant DSC/BF" in %; true outline green, prediction magenta."""
    import torch

    from edgeseg.baselines import SmallUNet
    from edgeseg.checkpoint import load_model
    from edgeseg.data import load_dataset
    from edgeseg.evaluate import SamplerSettings, predict
    from edgeseg.metrics import boundary_fscore, dice
    from edgeseg.viz import draw_outlines, save_grid

    teacher = load_model(teacher_path).eval()
    s = teacher.preset.image_size
    ds = load_dataset(job["dataset"], "test", data_dir=job["data_dir"], size=s)
    n = min(budget.eval_images, len(ds))
    imgs = torch.stack([ds[i][0] for i in range(n)])
    masks = torch.stack([ds[i][1] for i in range(n)])
    st = SamplerSettings("ddim", budget.eval_steps, budget.eval_ensemble)
    with torch.no_grad():
        tmean, _ = predict(teacher, imgs, st, torch.Generator().manual_seed(0))
    bf = boundary_fscore(tmean > 0, masks > 0)
    has_fg = (masks > 0).flatten(1).any(1)
    bf = torch.where(has_fg, bf, torch.full_like(bf, 2.0))
    pick = torch.argsort(bf)[: budget.overlay_images].tolist()
    cols = [("teacher", teacher)]
    for name in ("no-kd", "global-kd", "efkd-tau0.6", "unet"):
        f = work / (f"{name}-s0.pt" if name == "unet" else f"{name}-s0/student.safetensors")
        if not f.exists():
            continue
        if name == "unet":
            m = SmallUNet()
            m.load_state_dict(torch.load(f))
        else:
            m = load_model(f)
        cols.append((name, m.eval()))
    tiles, labels = [], []
    for i in pick:
        for name, m in cols:
            with torch.no_grad():
                if name == "unet":
                    mean = torch.tanh(m(imgs[i : i + 1]))  # logit > 0 <=> mean > 0
                else:
                    mean, _ = predict(m, imgs[i : i + 1], st, torch.Generator().manual_seed(0))
            d = float(dice(mean > 0, masks[i : i + 1] > 0)[0])
            b = float(boundary_fscore(mean > 0, masks[i : i + 1] > 0)[0])
            tiles.append(draw_outlines(imgs[i], masks[i], mean[0]))
            labels.append(f"{SHORT.get(name, name)} {100 * d:.0f}/{100 * b:.0f}")
    return save_grid(tiles, path, cols=len(cols), labels=labels)


# ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, a few steps, a few images")
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--teacher", default=None, help="teacher checkpoint (default: the shipped synthetic teacher)")
    ap.add_argument("--student-preset", default="tiny-student")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="student training steps")
    ap.add_argument("--eval-images", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
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

        budget = QUICK if args.quick else Budget()
        budget = replace(budget, **{k: v for k, v in (("seeds", args.seeds), ("steps", args.steps),
                                                      ("eval_images", args.eval_images)) if v is not None})
        teacher = args.teacher or shipped_teacher("tiny-teacher", args.dataset)
        if teacher is None:
            raise EdgesegError(f"no shipped teacher for {args.dataset}: pass --teacher PATH (edgeseg train-teacher)")
        tpreset, _ = load_preset(teacher)
        vs = variants(tpreset.prediction_type)
        if args.only:
            keep = set(args.only.split(","))
            unknown = keep - {v.name for v in vs}
            if unknown:
                raise EdgesegError(f"--only: unknown variants {sorted(unknown)}; known: {[v.name for v in vs]}")
            vs = [v for v in vs if v.name in keep]
    except EdgesegError as e:
        console.print(f"[red]error:[/] {e}")
        return 2

    out = Path(args.out)
    work = Path(args.work) if args.work else REPO / "runs" / ("ablation-quick" if args.quick else "ablation")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    job = {"teacher": str(teacher), "dataset": args.dataset, "data_dir": args.data_dir, "work": str(work),
           "threads": args.threads, "student_preset": args.student_preset}
    # settings of the per-run files: a change invalidates them
    stamp = {"budget": asdict(budget), "job": {k: v for k, v in job.items() if k != "work"}}
    stamp_file = work / "settings.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) != json.loads(json.dumps(stamp)):
        for f in work.glob("*.json"):
            f.unlink()
    write_json(stamp_file, stamp)

    # data cache first (once, not in every worker)
    from edgeseg.data import load_dataset

    load_dataset(args.dataset, "test", data_dir=args.data_dir, size=tpreset.image_size)

    t0 = time.time()
    tasks = [(v, s) for s in range(budget.seeds) for v in vs]
    runs, todo = [], []
    for v, s in tasks:
        f = work / f"{v.name}-s{s}.json"
        if f.exists():
            runs.append(json.loads(f.read_text()))
        else:
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
    paper_subset_ddim(runs, work, job, budget)

    console.print("measuring cost (params, GFLOP, latency per image)")
    cost = measure_cost(str(teacher), args.student_preset, budget, args.threads, repeats=3 if args.quick else 10)
    doc = {
        "generated": now_iso(), "command": [sys.executable, *sys.argv], "quick": args.quick,
        "machine": machine_info(args.threads), "threads": args.threads, "jobs": args.jobs,
        "dataset": args.dataset, "teacher": str(teacher), "teacher_prediction_type": tpreset.prediction_type,
        "student_preset": args.student_preset, "budget": asdict(budget),
        "variants": [asdict(v) for v in vs], "cost": cost,
        "aggregate": aggregate(runs), "runs": sorted(runs, key=lambda r: (r["variant"], r["seed"])),
        "seconds": {"runs_wall": round(wall, 1), "runs_sum": round(sum(r["seconds"] for r in runs), 1),
                    "this_invocation": None},
    }
    suffix = "" if args.dataset == "synthetic" else f"-{args.dataset}"
    plot_tau(doc, out / f"ablation{suffix}-tau.png")
    plot_overlays(doc, work, str(teacher), out / f"ablation{suffix}-overlays.png", job, budget)
    doc["seconds"]["this_invocation"] = round(time.time() - t0, 1)
    write_json(out / f"ablation{suffix}.json", doc)
    md = markdown(doc)
    (out / f"ablation{suffix}.md").write_text(
        md + f"\nRun time: {wall / 60:.1f} min wall for the {len(tasks)} runs ({args.jobs} jobs x {args.threads} "
        f"thread(s); {doc['seconds']['runs_sum'] / 60:.1f} min summed over runs), then "
        f"{doc['seconds']['this_invocation'] - run_seconds:.0f} s for cost, pictures and tables.\n")
    console.print(md)
    console.print(f"wrote {out}/ablation{suffix}.{{json,md}}, -tau.png, -overlays.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
