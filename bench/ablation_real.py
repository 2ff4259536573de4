"""The real-lesion (``real``) suite of bench/ablation.py: every trained variant gets the same
wall time; paired differences by seed, the cost and the trade-off picture."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.ablation_common import Budget, Variant, from_doc, pm  # noqa: E402
from bench.common import median_ms, paired_text  # noqa: E402

#: the ideas of the real-data suite: sampler-timestep focus share and x0 Dice + BCE weight
FOCUS, W_SEG = 0.5, 0.5

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
        Variant("mobile-focus-seg",
                "mobile-block student (BatchNorm, ReLU, linear attention in the bottleneck), EFKD + both",
                preset="tiny-student-mobile", groups=("ideas",), seeds=2, **both),
        Variant("teacher-longer", "teacher trained longer on real data", kind="teacher", teacher=LONGER_TEACHER,
                groups=("ideas",)),
        Variant("efkd-focus-seg-longer", "student of the longer-trained teacher, EFKD + both", teacher=LONGER_TEACHER,
                groups=("ideas",), **both),
    ]

#: the real-data suite: 4 min of one thread per trained variant, the whole test split, the
#: shipped sampler (the defaults table's K x N for x0 students)
REAL = Budget(seeds=3, steps=10**6, batch_size=16, eval_images=600, eval_steps=1, eval_ensemble=3,
              pred_steps=(1,), paper_images=0, train_seconds=240.0, per_image=True)
REAL_QUICK = replace(REAL, seeds=1, train_seconds=4.0, eval_images=8, overlay_images=2)

# ----------------------------------------------------------------------------------------
# the real-data suite: cost per variant, paired differences, tables, the trade-off picture
# ----------------------------------------------------------------------------------------
#: (A, B): A - B per image, paired by seed. What each answers is in bench/README.md.
PAIRS = (("efkd-tau0.6", "no-kd"), ("efkd-tau0.6", "global-kd"), ("global-kd", "no-kd"),
         ("efkd-focus", "efkd-tau0.6"), ("efkd-seg", "efkd-tau0.6"), ("efkd-focus-seg", "efkd-tau0.6"),
         ("efkd-focus-seg", "unet-flops"), ("efkd-focus-seg", "unet"), ("efkd-tau0.6", "unet-flops"),
         ("efkd-focus-seg", "teacher"), ("mobile-focus-seg", "efkd-focus-seg"), ("mobile-focus-seg", "unet-flops"),
         ("teacher-longer", "teacher"), ("efkd-focus-seg-longer", "efkd-focus-seg"))


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
            f"{'-' if not steps else f'{steps:.0f}'} | {pm(m['dsc'])} | {pm(m['iou'])} | {pm(m['hd95'], 1.0)} | "
            f"{pm(m['bf'])} | {pm(m['se'])} | {pm(m['sp'])} | {pm(m['acc'])} |")


def markdown_real(doc: dict) -> str:
    budget, vs = from_doc(doc)
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
        lines.append(f"| {key} | {','.join(map(str, d['seeds']))} | {paired_text(d)} | "
                     f"{' '.join(f'{100 * x:+.2f}' for x in d['per_seed'])} | {d['wins']} / {d['losses']} | "
                     f"{paired_text(bf)} | {paired_text(hd, scale=1.0)} |")
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
