"""Does edge-focused distillation help, and is the student worth shipping? Seed-replicated ablations.

Two suites (``--suite``, default by dataset):

* ``real`` (issue 15; the default on a real dataset, e.g. ``--dataset isic2017``): every trained
  variant gets the same training wall time (``Budget.train_seconds``): students with no KD, global
  KD, EFKD (tau 0.3 / 0.6 / 0.9), EFKD with the few-step ideas (sampler-timestep focus, a Dice +
  BCE loss on the predicted x0, both, and both on the lean and the mobile-block presets), the U-Net at its own size and
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

from bench.common import machine_info, median_ms, now_iso, recorded_command, shown_path, write_json  # noqa: E402

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
    preset: str | None = None  # None: the run's student preset
    focus: float = 0.0  # TrainConfig.focus_timesteps
    w_seg: float = 0.0  # TrainConfig.w_seg
    w_sampler_kd: float = 0.0  # TrainConfig.w_sampler_kd
    teacher: str | None = None  # checkpoint (repository-relative); None: the run's --teacher
    unet: str = "own"  # U-Nets: "own" size or "flops" (same GFLOP per image as the student)
    seeds: int | None = None  # None: the budget's


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


#: the ideas of the real-data suite: sampler-timestep focus share, x0 Dice + BCE weight and
#: sampler-distillation weight
FOCUS, W_SEG, W_SKD = 0.5, 0.5, 0.5

#: the teacher trained longer on real data, its final weights (bench/README.md, "Sampler distillation and a
#: longer-trained teacher"): `edgeseg train-teacher --dataset isic2017 ... --run-name teacher-longer` keeps
#: them here when validation ships an earlier epoch as teacher.safetensors, as it did
LONGER_TEACHER = "runs/teacher-longer/teacher-final.safetensors"


def real_variants() -> list[Variant]:
    """The real-data suite (issue 15): every trained variant gets the same wall time."""
    both = dict(focus=FOCUS, w_seg=W_SEG)
    return [
        Variant("teacher", "teacher (shipped, not retrained)", kind="teacher", groups=("kd",)),
        Variant("no-kd", "student, no KD", kd="none", groups=("kd",)),
        Variant("global-kd", "student, global KD", kd="global", groups=("kd",)),
        Variant("efkd-tau0.6", "student, EFKD tau 0.6", groups=("kd", "tau", "ideas")),
        Variant("efkd-focus-seg", "student, EFKD + sampler timesteps + x0 Dice/BCE", groups=("kd", "ideas"), **both),
        Variant("unet", "U-Net, own size (Dice+BCE)", kind="unet", groups=("kd",)),
        Variant("unet-flops", "U-Net, same GFLOP/img as the student", kind="unet", unet="flops", groups=("kd",)),
        Variant("efkd-tau0.3", "student, EFKD tau 0.3", tau=0.3, groups=("tau",), seeds=1),
        Variant("efkd-tau0.9", "student, EFKD tau 0.9", tau=0.9, groups=("tau",), seeds=1),
        Variant("efkd-focus", "student, EFKD + sampler timesteps", focus=FOCUS, groups=("ideas",), seeds=1),
        Variant("efkd-seg", "student, EFKD + x0 Dice/BCE", w_seg=W_SEG, groups=("ideas",), seeds=1),
        Variant("lean-focus-seg", "lean student (from scratch), EFKD + both", preset="tiny-student-lean",
                groups=("ideas",), seeds=1, **both),
        Variant("mobile-focus-seg",
                "mobile-block student (BatchNorm, ReLU, linear attention in the bottleneck), EFKD + both",
                preset="tiny-student-mobile", groups=("ideas",), seeds=2, **both),
        Variant("efkd-focus-seg-skd", "student, EFKD + both + sampler distillation", w_sampler_kd=W_SKD,
                groups=("ideas",), **both),
        Variant("skd-focus-seg", "student, sampler distillation + both, no per-step KD", kd="none",
                w_sampler_kd=W_SKD, groups=("ideas",), **both),
        Variant("teacher-longer", "teacher trained longer on real data", kind="teacher", teacher=LONGER_TEACHER,
                groups=("ideas",)),
        Variant("efkd-focus-seg-longer", "student of the longer-trained teacher, EFKD + both", teacher=LONGER_TEACHER,
                groups=("ideas",), **both),
    ]


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
    train_seconds: float | None = None  # set: every trained variant gets this wall time (steps ignored)
    per_image: bool = False  # keep per-image scores (paired comparisons)


#: the real-data suite: 4 min of one thread per trained variant, the whole test split, the
#: shipped sampler (the defaults table's K x N for x0 students)
REAL = Budget(seeds=3, steps=10**6, batch_size=16, eval_images=600, eval_steps=1, eval_ensemble=3,
              pred_steps=(1,), paper_images=0, train_seconds=240.0, per_image=True)
REAL_QUICK = replace(REAL, seeds=1, train_seconds=4.0, eval_images=8, overlay_images=2)

QUICK = Budget(seeds=2, steps=2, batch_size=4, unet_steps=4, eval_images=4, pred_steps=(1, 2), paper_images=1,
               paper_sampler=("ddpm", 250, 1), overlay_images=2)


# ----------------------------------------------------------------------------------------
# one run (in a worker process)
# ----------------------------------------------------------------------------------------
def _evaluate(model, test_ds, sampler: tuple[str, int, int], n: int, seed: int, per_image: bool = False) -> dict:
    from edgeseg.evaluate import SamplerSettings, evaluate

    r = evaluate(model, test_ds, SamplerSettings(*sampler), batch_size=16, seed=seed, max_images=n, keep=0,
                 progress=False, per_image=per_image)
    out = {k: float(v["mean"]) for k, v in r["metrics"].items()}
    if per_image:
        out["per_image"] = {k: r["per_image"][k] for k in ("dsc", "bf", "hd95")}
    return out


def _unet_channels(v: Variant, job: dict, budget: Budget, size: int) -> tuple[int, ...]:
    from edgeseg.baselines import UNET_CHANNELS, unet_channels_like

    if v.unet == "own":
        return UNET_CHANNELS
    return unet_channels_like(job["student_preset"], size, budget.eval_steps, budget.eval_ensemble)


def _run_unet(v: Variant, seed: int, budget: Budget, job: dict, size: int, test_ds, res: dict) -> None:
    import numpy as np
    import torch

    from edgeseg.baselines import train_unet
    from edgeseg.data import load_dataset
    from edgeseg.metrics import MetricAccumulator

    train_ds = load_dataset(job["dataset"], "train", data_dir=job["data_dir"], size=size, augment=False)
    channels = _unet_channels(v, job, budget, size)
    minutes = None if budget.train_seconds is None else budget.train_seconds / 60
    steps = None if budget.train_seconds is not None else budget.unet_steps
    model, info = train_unet(train_ds, None, minutes=minutes, steps=steps, seed=seed, batch_size=16,
                             threads=job["threads"], channels=channels)
    model.eval()
    acc = MetricAccumulator()
    n = min(budget.eval_images, len(test_ds))
    with torch.no_grad():
        for i in range(0, n, 16):
            items = [test_ds[j] for j in range(i, min(i + 16, n))]
            img = torch.stack([it[0] for it in items])
            mask = torch.stack([it[1] for it in items])
            acc.update_masks(model(img) > 0, mask > 0)
    per = acc.per_sample()
    res["metrics"] = {k: float(np.mean(x)) for k, x in per.items()}
    if budget.per_image:
        res["metrics"]["per_image"] = {k: per[k].tolist() for k in ("dsc", "bf", "hd95")}
    res["train_seconds"], res["train_steps"] = round(info["train_seconds"], 1), info["steps"]
    res["channels"] = list(channels)
    torch.save(model.state_dict(), Path(job["work"]) / f"{v.name}-s{seed}.pt")


def _student_config(v: Variant, seed: int, budget: Budget, job: dict):
    from edgeseg.train import tiny_recipe

    cfg = replace(tiny_recipe("student"), preset=v.preset or job["student_preset"], dataset=job["dataset"],
                  data_dir=job["data_dir"], kd=v.kd, tau=v.tau, prediction_type=v.prediction_type, seed=seed,
                  batch_size=budget.batch_size, num_workers=0, focus_timesteps=v.focus, w_seg=v.w_seg,
                  w_sampler_kd=v.w_sampler_kd)
    if budget.train_seconds is not None:
        # wall-time budget: a few hundred steps, so a short EMA (starts at step 50, ~50-step horizon)
        return replace(cfg, max_seconds=budget.train_seconds, epochs=1000, ema_beta=0.98, ema_start=50,
                       init_from_teacher=v.preset is None)
    return replace(cfg, max_steps=budget.steps, ema_start=min(100, budget.steps // 2))


def _teacher_path(v: Variant, job: dict) -> str:
    """The variant's teacher checkpoint: its own (repository-relative) or the run's --teacher."""
    return str(REPO / v.teacher) if v.teacher else job["teacher"]


def run_one(v: Variant, seed: int, budget: Budget, job: dict) -> dict:
    """Train (students, U-Net) and evaluate one variant at one seed; returns its result dict."""
    import torch

    torch.set_num_threads(job["threads"])
    from edgeseg.checkpoint import load_model
    from edgeseg.data import load_dataset
    from edgeseg.train import Trainer

    t0 = time.time()
    teacher = load_model(_teacher_path(v, job))
    size = teacher.preset.image_size
    test_ds = load_dataset(job["dataset"], "test", data_dir=job["data_dir"], size=size)
    work = Path(job["work"])
    res: dict = {"variant": v.name, "seed": seed}
    main = ("ddim", budget.eval_steps, budget.eval_ensemble)
    if v.kind == "unet":
        _run_unet(v, seed, budget, job, size, test_ds, res)
    else:
        if v.kind == "teacher":
            model, res["train_seconds"] = teacher, 0.0
        else:
            out = work / f"{v.name}-s{seed}"
            # no KD: the teacher still initialises the student (same start for every variant), nothing else
            trainer = Trainer(_student_config(v, seed, budget, job), out, teacher=teacher, quiet=True)
            model = trainer.fit()  # the EMA model, also in <out>/student.safetensors
            res["train_seconds"], res["train_steps"] = round(trainer.train_seconds, 1), trainer.step
        model.eval()
        res["metrics"] = _evaluate(model, test_ds, main, budget.eval_images, seed, per_image=budget.per_image)
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
             "train_seconds": mean_std([r.get("train_seconds", 0.0) for r in rs]),
             "train_steps": mean_std([r["train_steps"] for r in rs if "train_steps" in r])}
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


def _from_doc(doc: dict) -> tuple[Budget, list[Variant]]:
    """The budget and variants a result document was made with."""
    budget = Budget(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc["budget"].items()})
    return budget, [Variant(**{**v, "groups": tuple(v["groups"])}) for v in doc["variants"]]


def markdown(doc: dict) -> str:
    budget, vs = _from_doc(doc)
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
    seeds = ", ".join(f"{tau:g}: {len(agg[f'efkd-tau{tau:g}']['seeds'])}" for tau in TAUS if f"efkd-tau{tau:g}" in agg)
    fig.suptitle(f"EFKD tau sweep on {doc['dataset']} (seeds per tau: {seeds})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


SHORT = {"teacher": "teacher", "no-kd": "no KD", "global-kd": "global", "efkd-tau0.6": "EFKD", "unet": "U-Net",
         "efkd-focus-seg": "EFKD+", "unet-flops": "U-Net L", "efkd-focus-seg-skd": "EFKD+SKD",
         "skd-focus-seg": "SKD", "efkd-focus-seg-longer": "EFKD+ lT"}
OVERLAY_COLUMNS = {"kd": ("no-kd", "global-kd", "efkd-tau0.6", "unet"),
                   "real": ("no-kd", "efkd-tau0.6", "efkd-focus-seg", "efkd-focus-seg-skd", "skd-focus-seg",
                            "efkd-focus-seg-longer", "unet", "unet-flops")}


def _load_unet(work: Path, name: str):
    """A trained U-Net of the ablation (seed 0) with its widths from the run's JSON."""
    import torch

    from edgeseg.baselines import UNET_CHANNELS, SmallUNet

    info = work / f"{name}-s0.json"
    channels = json.loads(info.read_text()).get("channels", UNET_CHANNELS) if info.exists() else UNET_CHANNELS
    m = SmallUNet(tuple(channels))
    m.load_state_dict(torch.load(work / f"{name}-s0.pt"))
    return m


def plot_overlays(doc: dict, work: Path, teacher_path: str, path: Path, job: dict, budget: Budget,
                  columns: tuple[str, ...] = OVERLAY_COLUMNS["kd"]) -> Path:
    """The same hard test images (lowest teacher boundary F-score) under each variant (seed 0).

    One row per image; labels are "variant DSC/BF" in %; true outline green, prediction magenta."""
    import torch

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
    for name in columns:
        is_unet = name.startswith("unet")
        f = work / (f"{name}-s0.pt" if is_unet else f"{name}-s0/student.safetensors")
        if f.exists():
            cols.append((name, (_load_unet(work, name) if is_unet else load_model(f)).eval()))
    tiles, labels = [], []
    for i in pick:
        for name, m in cols:
            with torch.no_grad():
                if name.startswith("unet"):
                    mean = torch.tanh(m(imgs[i : i + 1]))  # logit > 0 <=> mean > 0
                else:
                    mean, _ = predict(m, imgs[i : i + 1], st, torch.Generator().manual_seed(0))
            d = float(dice(mean > 0, masks[i : i + 1] > 0)[0])
            b = float(boundary_fscore(mean > 0, masks[i : i + 1] > 0)[0])
            tiles.append(draw_outlines(imgs[i], masks[i], mean[0]))
            labels.append(f"{SHORT.get(name, name)} {100 * d:.0f}/{100 * b:.0f}")
    return save_grid(tiles, path, cols=len(cols), labels=labels)


# ----------------------------------------------------------------------------------------
# the real-data suite: cost per variant, paired differences, tables, the trade-off picture
# ----------------------------------------------------------------------------------------
#: (A, B): A - B per image, paired by seed. What each answers is in bench/README.md.
PAIRS = (("efkd-tau0.6", "no-kd"), ("efkd-tau0.6", "global-kd"), ("global-kd", "no-kd"),
         ("efkd-focus", "efkd-tau0.6"), ("efkd-seg", "efkd-tau0.6"), ("efkd-focus-seg", "efkd-tau0.6"),
         ("efkd-focus-seg", "unet-flops"), ("efkd-focus-seg", "unet"), ("efkd-tau0.6", "unet-flops"),
         ("efkd-focus-seg", "teacher"), ("lean-focus-seg", "efkd-focus-seg"), ("mobile-focus-seg", "efkd-focus-seg"),
         ("mobile-focus-seg", "unet-flops"), ("efkd-focus-seg-skd", "efkd-focus-seg"),
         ("skd-focus-seg", "efkd-focus-seg"), ("efkd-focus-seg-skd", "skd-focus-seg"), ("teacher-longer", "teacher"),
         ("efkd-focus-seg-longer", "efkd-focus-seg"))


def measure_cost_real(vs: list[Variant], runs: list[dict], job: dict, budget: Budget, threads: int,
                      repeats: int) -> dict:
    """{variant: params, GFLOP per image at its shipped setting, median ms per image (batch 1)}."""
    import torch

    from edgeseg.baselines import UNET_CHANNELS, SmallUNet, unet_gflop
    from edgeseg.checkpoint import load_model
    from edgeseg.evaluate import SamplerSettings
    from edgeseg.models import build, count_params, flops_per_call

    torch.set_num_threads(threads)
    teacher = load_model(job["teacher"]).eval()
    size = teacher.preset.image_size
    img = torch.rand(1, 3, size, size)
    settings = SamplerSettings("ddim", budget.eval_steps, budget.eval_ensemble)
    channels = {r["variant"]: tuple(r["channels"]) for r in runs if "channels" in r}
    cost, seen = {}, {}
    for v in vs:
        if v.kind == "unet":
            ch = channels.get(v.name, UNET_CHANNELS)
            key = ("unet", ch)
            if key not in seen:
                m = SmallUNet(ch).eval()
                with torch.no_grad():
                    ms = median_ms(lambda: m(img), repeats * 4)
                seen[key] = {"params": count_params(m), "gflop": round(unet_gflop(ch, size), 3),
                             "latency_ms": round(ms, 2), "calls": "one pass", "channels": list(ch)}
        else:
            name = teacher.preset.name if v.kind == "teacher" else (v.preset or job["student_preset"])
            key = ("diffusion", name)
            if key not in seen:
                m = teacher if v.kind == "teacher" else build(name).eval()
                seg = settings.segmenter(m)
                with torch.no_grad():
                    ms = median_ms(lambda: seg.predict(img, generator=torch.Generator().manual_seed(0)), repeats)
                calls = budget.eval_steps * budget.eval_ensemble
                seen[key] = {"params": count_params(m), "gflop": round(flops_per_call(name)[0] / 1e9 * calls, 3),
                             "latency_ms": round(ms, 2), "calls": f"DDIM {budget.eval_steps} x {budget.eval_ensemble}"}
        cost[v.name] = seen[key]
    return cost


def _per_image(runs: list[dict], name: str, metric: str) -> dict[int, "np.ndarray"]:
    import numpy as np

    return {r["seed"]: np.asarray(r["metrics"]["per_image"][metric], dtype=float)
            for r in runs if r["variant"] == name and "per_image" in r["metrics"]}


def paired_by_seed(runs: list[dict], a: str, b: str, metric: str) -> dict | None:
    """A - B on `metric`: per image, averaged over the seeds both have (images as the unit of the
    95% interval), plus each seed's mean difference. None if they share no seed."""
    import numpy as np

    from bench.common import paired

    pa, pb = _per_image(runs, a, metric), _per_image(runs, b, metric)
    seeds = sorted(set(pa) & set(pb))
    if not seeds:
        return None
    da = np.mean([pa[s] for s in seeds], axis=0)
    db = np.mean([pb[s] for s in seeds], axis=0)
    ok = np.isfinite(da) & np.isfinite(db)
    out = paired(da[ok], db[ok])
    out["seeds"] = seeds
    out["per_seed"] = [float(np.nanmean(pa[s] - pb[s])) for s in seeds]
    return out


def paired_table(runs: list[dict]) -> dict:
    out = {}
    for a, b in PAIRS:
        row = {m: paired_by_seed(runs, a, b, m) for m in ("dsc", "bf", "hd95")}
        if row["dsc"] is not None:
            out[f"{a} - {b}"] = row
    return out


def _row_real(v: Variant, a: dict, c: dict) -> str:
    m = a["metrics"]
    steps = a.get("train_steps", {}).get("mean")
    return (f"| {v.label} | {len(a['seeds'])} | {c['params'] / 1e6:.2f}M | {c['gflop']:.2f} | {c['latency_ms']:.1f} | "
            f"{'-' if not steps else f'{steps:.0f}'} | {_pm(m['dsc'])} | {_pm(m['iou'])} | {_pm(m['hd95'], 1.0)} | "
            f"{_pm(m['bf'])} | {_pm(m['se'])} | {_pm(m['sp'])} | {_pm(m['acc'])} |")


def markdown_real(doc: dict) -> str:
    budget, vs = _from_doc(doc)
    agg, cost = doc["aggregate"], doc["cost"]
    head = ("| variant | seeds | params | GFLOP/img | ms/img | train steps | DSC | IoU | HD95 (px) | BF | SE | SP | ACC |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"Equal-wall-time ablation on `{doc['dataset']}`: every trained variant gets "
             f"{budget.train_seconds:.0f} s of training on one thread ({doc['jobs']} runs side by side on "
             f"{doc['machine'].get('cpu', 'this CPU')}); scored on the first {budget.eval_images} test images at "
             f"DDIM {budget.eval_steps} x {budget.eval_ensemble} (the shipped setting; U-Nets: one pass); mean ± std "
             f"over seeds (weight init, data order, noise, evaluation noise). Latency: batch 1, {doc['threads']} "
             f"thread(s), median of repeats.", ""]
    for group, title in (("kd", "Objective and baselines"), ("tau", "EFKD tau"),
                         ("ideas", "Ideas for few-step students (each against EFKD tau 0.6)")):
        rows = [_row_real(v, agg[v.name], cost[v.name]) for v in vs if group in v.groups and v.name in agg]
        if rows:  # a run of a few variants (--only) leaves some tables empty
            lines += [f"### {title}", "", head, *rows, ""]
    lines += ["### Paired differences (A - B, in points; per image, averaged over the seeds both have)", "",
              "| A - B | seeds | DSC [95% CI] | DSC per seed | images won / lost | BF [95% CI] | HD95 px [95% CI] |",
              "|---|---|---:|---|---:|---:|---:|"]
    for key, row in doc["paired"].items():
        d, bf, hd = row["dsc"], row["bf"], row["hd95"]
        lines.append(f"| {key} | {','.join(map(str, d['seeds']))} | {100 * d['mean']:+.2f} "
                     f"[{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}] | "
                     f"{' '.join(f'{100 * x:+.2f}' for x in d['per_seed'])} | {d['wins']} / {d['losses']} | "
                     f"{100 * bf['mean']:+.2f} [{100 * bf['ci95'][0]:+.2f}, {100 * bf['ci95'][1]:+.2f}] | "
                     f"{hd['mean']:+.2f} [{hd['ci95'][0]:+.2f}, {hd['ci95'][1]:+.2f}] |")
    lines.append("")
    return "\n".join(lines)


def plot_tradeoff(doc: dict, path: Path) -> Path:
    """DSC and boundary F against milliseconds per image (log scale), mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg, cost = doc["aggregate"], doc["cost"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "dsc", "DSC (%)"), (axes[1], "bf", "boundary F (%)")):
        for v in doc["variants"]:
            a = agg.get(v["name"])
            if not a or a["metrics"][metric]["mean"] is None:
                continue
            mk = "s" if v["kind"] == "unet" else ("^" if v["kind"] == "teacher" else "o")
            ax.errorbar(cost[v["name"]]["latency_ms"], 100 * a["metrics"][metric]["mean"],
                        yerr=100 * a["metrics"][metric]["std"], marker=mk, capsize=3, ls="none", label=v["name"])
        ax.set_xscale("log")
        ax.set_xlabel("ms per image (batch 1, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Equal-wall-time ablation on {doc['dataset']} test")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------
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
