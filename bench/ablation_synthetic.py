"""The synthetic (``kd``) suite of bench/ablation.py: the same teacher, the same number of
steps for every student; KD type, tau and prediction type tables."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.ablation_common import TAUS, Budget, Variant, cost_of, evaluate_run, from_doc, pm  # noqa: E402
from bench.common import median_ms, write_json  # noqa: E402

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

QUICK = Budget(seeds=2, steps=2, batch_size=4, unet_steps=4, eval_images=4, pred_steps=(1, 2), paper_images=1,
               paper_sampler=("ddpm", 250, 1), overlay_images=2)


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
        r["paper_subset"] = {str(k): evaluate_run(model, test_ds, ("ddim", k, budget.eval_ensemble), budget.paper_images,
                                               r["seed"]) for k in budget.pred_steps}
        write_json(work / f"{r['variant']}-s{r['seed']}.json", r)

def markdown(doc: dict) -> str:
    budget, vs = from_doc(doc)
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
            p, gf, ms = cost_of(v, cost, budget)
            lines.append(f"| {v.label} | {p / 1e6:.2f}M | {gf:.2f} | {ms:.0f} | {pm(m['dsc'])} | {pm(m['iou'])} | "
                         f"{pm(m['hd95'], 1.0)} | {pm(m['bf'])} | {pm(m['se'])} | {pm(m['sp'])} | {pm(m['acc'])} |")
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
        cells = [f"{pm(a['by_steps'][k]['dsc'])} / {pm(a['by_steps'][k]['bf'])}" if k in a["by_steps"] else "-" for k in ks]
        pp = a.get("paper_protocol")
        cells.append(f"{pm(pp['dsc'])} / {pm(pp['bf'])} (n={pp['dsc']['n']})" if pp else "-")
        lines.append(f"| {v.prediction_type or doc['teacher_prediction_type']} | " + " | ".join(cells) + " |")
    for v in vs:
        a = agg.get(v.name, {})
        if "pred" not in v.groups or "paper_subset" not in a:
            continue
        sub = a["paper_subset"]
        cells = [f"{pm(sub[k]['dsc'])} / {pm(sub[k]['bf'])}" if k in sub else "-" for k in ks]
        lines.append(f"| {v.prediction_type or doc['teacher_prediction_type']}, same {budget.paper_images} images as "
                     f"the paper protocol | " + " | ".join(cells) + " | (as above) |")
    lines.append("| student latency (ms/img) | " + " | ".join(
        f"{scost[f'ddim{k}x{budget.eval_ensemble}']['latency_ms']:.0f}" for k in ks)
        + f" | {scost['paper']['latency_ms']:.0f} (extrapolated) |")
    lines.append("")
    return "\n".join(lines)
