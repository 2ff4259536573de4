"""What both ablation suites share: a variant, a budget, one run in a worker process,
aggregation over seeds, the tau and overlay pictures (bench/ablation.py runs the suites)."""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_json  # noqa: E402

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
    teacher: str | None = None  # checkpoint (repository-relative); None: the run's --teacher
    unet: str = "own"  # U-Nets: "own" size or "flops" (same GFLOP per image as the student)
    seeds: int | None = None  # None: the budget's


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

# ----------------------------------------------------------------------------------------
# one run (in a worker process)
# ----------------------------------------------------------------------------------------
def evaluate_run(model, test_ds, sampler: tuple[str, int, int], n: int, seed: int, per_image: bool = False) -> dict:
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
                  batch_size=budget.batch_size, num_workers=0, focus_timesteps=v.focus, w_seg=v.w_seg)
    if budget.train_seconds is not None:
        # wall-time budget: a few hundred steps, so a short EMA (starts at step 50, ~50-step horizon)
        return replace(cfg, max_seconds=budget.train_seconds, epochs=1000, ema_beta=0.98, ema_start=50,
                       init_from_teacher=v.preset is None)
    return replace(cfg, max_steps=budget.steps, ema_start=min(100, budget.steps // 2))


def teacher_path(v: Variant, job: dict) -> str:
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
    teacher = load_model(teacher_path(v, job))
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
        res["metrics"] = evaluate_run(model, test_ds, main, budget.eval_images, seed, per_image=budget.per_image)
        if "pred" in v.groups:
            res["by_steps"] = {str(k): evaluate_run(model, test_ds, ("ddim", k, budget.eval_ensemble),
                                                 budget.eval_images, seed)
                               for k in budget.pred_steps if k != budget.eval_steps}
            res["by_steps"][str(budget.eval_steps)] = res["metrics"]
            if seed < budget.paper_seeds:
                res["paper_protocol"] = evaluate_run(model, test_ds, budget.paper_sampler, budget.paper_images, seed)
    res["seconds"] = round(time.time() - t0, 1)
    write_json(work / f"{v.name}-s{seed}.json", res)
    return res

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


def pm(ms: dict, scale: float = 100.0, digits: int = 2) -> str:
    if ms["mean"] is None:
        return "-"
    return f"{ms['mean'] * scale:.{digits}f} ± {ms['std'] * scale:.{digits}f}"


def cost_of(v: Variant, cost: dict, budget: Budget) -> tuple[int, float, float]:
    if v.kind == "unet":
        c = cost["unet"]
        return c["params"], c["settings"]["single"]["gflop"], c["settings"]["single"]["latency_ms"]
    c = cost["teacher" if v.kind == "teacher" else "student"]
    st = c["settings"][f"ddim{budget.eval_steps}x{budget.eval_ensemble}"]
    return c["params"], st["gflop"], st["latency_ms"]


def from_doc(doc: dict) -> tuple[Budget, list[Variant]]:
    """The budget and variants a result document was made with."""
    budget = Budget(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc["budget"].items()})
    return budget, [Variant(**{**v, "groups": tuple(v["groups"])}) for v in doc["variants"]]

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
         "efkd-focus-seg": "EFKD+", "unet-flops": "U-Net L", "efkd-focus-seg-longer": "EFKD+ lT"}
OVERLAY_COLUMNS = {"kd": ("no-kd", "global-kd", "efkd-tau0.6", "unet"),
                   "real": ("no-kd", "efkd-tau0.6", "efkd-focus-seg", "efkd-focus-seg-longer", "unet", "unet-flops")}


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
