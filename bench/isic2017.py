"""Table I on real lesions: teacher, EFKD student, Otsu and a discriminative U-Net on ISIC 2017 test.

    python bench/isic2017.py --data-dir DIR [--teacher T] [--student S] [--unet-seconds N]

DIR is the ISIC 2017 Part 1 release (official folder names). Teacher and student default to
the shipped real-lesion models. The U-Net (edgeseg.baselines.SmallUNet, Dice + BCE) is trained
here on the same train split at the same resolution for ``--unet-seconds`` of wall time (give
it the student's distillation time; ``--stage unet`` trains it alone, e.g. beside the student on
the same number of threads). Every model is scored with the same code (edgeseg.metrics, per image at
the models' input size, then averaged) on the whole test split (600 images). Cost per image:
parameters, GFLOP at the shipped sampler setting (K x N network calls) and median latency at
batch 1. Writes ``results.json``, ``table.md`` and ``overlays.png`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench.common import machine_info, median_ms, write_json  # noqa: E402

METRICS = ("dsc", "iou", "se", "sp", "acc", "hd95", "bf")


def _summary(acc) -> dict:
    per = acc.per_sample()
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in per.items()}


def score_diffusion(model, test_ds, settings, seed: int) -> tuple[dict, np.ndarray, list]:
    """Metrics, per-image Dice and the predictions (mean) of a DermoSegDiff at `settings`."""
    from edgeseg.evaluate import evaluate

    r = evaluate(model, test_ds, settings, seed=seed, keep=len(test_ds), progress=True, label=model.preset.name)
    means = [k[2] for k in r["keep"]]
    return r["metrics"], _per_image_dice(means, test_ds), means


def _per_image_dice(preds, test_ds) -> np.ndarray:
    from edgeseg.metrics import dice

    gt = torch.from_numpy(np.asarray(test_ds.masks) > 0)
    p = torch.stack([torch.as_tensor(x).reshape(gt.shape[1:]) > 0 for x in preds])
    return dice(p, gt).numpy()


def score_masks(masks: np.ndarray, test_ds) -> dict:
    from edgeseg.metrics import MetricAccumulator

    acc = MetricAccumulator()
    gt = np.asarray(test_ds.masks) > 0
    for i in range(0, len(gt), 64):
        acc.update_masks(torch.from_numpy(masks[i:i + 64]), torch.from_numpy(gt[i:i + 64]))
    return _summary(acc)


def otsu_masks(test_ds) -> np.ndarray:
    from edgeseg.baselines import otsu_predict

    return np.stack([otsu_predict(np.asarray(x)) > 0 for x in test_ds.images])


def train_unet_once(train_ds, seconds: float, threads: int, seed: int, out: Path):
    """Train the U-Net for `seconds` of wall time; weights and training info saved under `out`."""
    from safetensors.torch import save_file

    from edgeseg.baselines import train_unet

    model, info = train_unet(train_ds, None, minutes=seconds / 60.0, seed=seed, threads=threads,
                             log=lambda m: print(f"  unet {m}", flush=True))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "unet.safetensors"))
    write_json(out / "unet-train.json", {**info, "budget_seconds": seconds, "threads": threads, "seed": seed})
    return model, info


def load_unet(out: Path):
    from safetensors.torch import load_file

    from edgeseg.baselines import SmallUNet

    model = SmallUNet()
    model.load_state_dict(load_file(str(out / "unet.safetensors")))
    return model.eval(), json.loads((out / "unet-train.json").read_text())


def predict_unet(model, test_ds) -> np.ndarray:
    x = torch.from_numpy(np.array(test_ds.images)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 64]) for i in range(0, len(x), 64)])
    return (logits[:, 0] > 0).numpy()


def cost_diffusion(model, settings) -> dict:
    from edgeseg.evaluate import predict
    from edgeseg.models import count_params, flops_per_call

    s = model.preset.image_size
    img = torch.rand(1, 3, s, s)
    gf = flops_per_call(model.preset.name)[0] / 1e9
    ms = median_ms(lambda: predict(model, img, settings, torch.Generator().manual_seed(0)), 15)
    return {"params": count_params(model), "gflop": round(gf * settings.steps * settings.ensemble, 3),
            "ms": round(ms, 2)}


def cost_unet(model, size: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from edgeseg.models import count_params

    img = torch.rand(1, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(img)
    with torch.no_grad():
        ms = median_ms(lambda: model(img), 30)
    return {"params": count_params(model), "gflop": round(fc.get_total_flops() / 1e9, 3), "ms": round(ms, 2)}


def score_program(path: Path, test_ds, student_cost: dict) -> tuple[dict, np.ndarray]:
    """An exported .pte (what a phone runs), through edgeseg.Segmenter, scored like the rest."""
    from edgeseg.segmenter import Segmenter

    seg = Segmenter.from_pretrained(path)
    x = torch.from_numpy(np.array(test_ds.images)).permute(0, 3, 1, 2).float() / 255.0
    mean, _ = seg.predict(x)
    masks = (mean[:, 0] > 0).numpy()
    cost = {"params": student_cost["params"], "gflop": student_cost["gflop"],
            "ms": round(median_ms(lambda: seg.predict(x[:1]), 30), 2), "file_bytes": path.stat().st_size}
    row = {"metrics": score_masks(masks, test_ds), "sampler": f"DDIM {seg.steps} steps x {seg.ensemble} (.pte)",
           "cost": cost}
    return row, masks


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean per-image difference a - b with a normal 95% interval."""
    d = a - b
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    return {"mean": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)],
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}


def draw(test_ds, rows: dict, per_image: np.ndarray, path: Path) -> None:
    """Typical and hard test images: truth (green) and each model's outline (magenta)."""
    from edgeseg.viz import draw_outlines, save_grid

    order = np.argsort(per_image)
    picks = list(order[:3]) + list(order[len(order) // 2 - 1: len(order) // 2 + 2]) + list(order[-2:])
    tiles, labels = [], []
    for i in picks:
        img = torch.from_numpy(np.asarray(test_ds.images[i])).permute(2, 0, 1).float() / 255.0
        gt = torch.from_numpy(np.asarray(test_ds.masks[i]).astype(np.float32) * 2 - 1)
        for name, (pred, dices) in rows.items():
            tiles.append(draw_outlines(img, gt, torch.as_tensor(pred[i]).float() * 2 - 1 if pred[i].dtype == bool
                                       else torch.as_tensor(pred[i]), scale=3))
            labels.append(f"{test_ds.names[i]} {name} {dices[i]:.2f}")
    save_grid(tiles, path, cols=len(rows), labels=labels)


def markdown(doc: dict) -> str:
    lines = ["| model | params | sampler | GFLOP/img | ms/img | DSC | IoU | SE | SP | ACC | HD95 px | BF |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in doc["rows"].items():
        m, c = r["metrics"], r["cost"]
        pct = lambda k: f"{100 * m[k]['mean']:.2f}"  # noqa: E731
        params = f"{c['params'] / 1e6:.3f}M" if c.get("params") else "-"
        lines.append(f"| {name} | {params} | {r['sampler']} | {c.get('gflop', '-')} | {c.get('ms', '-')} | "
                     f"{pct('dsc')} | {pct('iou')} | {pct('se')} | {pct('sp')} | {pct('acc')} | "
                     f"{m['hd95']['mean']:.2f} | {pct('bf')} |")
    return "\n".join(lines) + "\n"


def _first(ds, n: int):
    from edgeseg.data import SegDataset

    return SegDataset(ds.images[:n], ds.masks[:n], ds.names[:n], ds.name, ds.split)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, type=Path, help="the ISIC 2017 Part 1 folder")
    ap.add_argument("--teacher", default="tiny-teacher-isic2017", help="checkpoint or shipped model name")
    ap.add_argument("--student", default="tiny-student-isic2017", help="checkpoint or shipped model name")
    ap.add_argument("--unet-seconds", type=float, default=None,
                    help="U-Net training wall time (give it the student's distillation time)")
    ap.add_argument("--size", type=int, default=64, help="input size of the models (the tiny presets: 64)")
    ap.add_argument("--pte", type=Path, default=None, help="also score this exported student program (.pte)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-images", type=int, default=None, help="first N test images only (smoke runs)")
    ap.add_argument("--stage", choices=("all", "unet", "eval"), default="all",
                    help="unet: only train the U-Net (e.g. beside the student's training, same threads); "
                         "eval: score with the U-Net already trained in --out; all: both")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "isic2017")
    args = ap.parse_args(argv)

    from edgeseg.checkpoint import load_model
    from edgeseg.data import load_dataset
    from edgeseg.defaults import sampler_defaults
    from edgeseg.evaluate import SamplerSettings
    from edgeseg.runs import resolve_checkpoint

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train_ds = load_dataset("isic2017", "train", data_dir=args.data_dir, size=args.size)  # no augmentation
    if args.stage in ("all", "unet"):
        if not args.unet_seconds:
            raise SystemExit("--unet-seconds is needed to train the U-Net (the student's distillation time)")
        print(f"training the U-Net for {args.unet_seconds:.0f} s ...", flush=True)
        train_unet_once(train_ds, args.unet_seconds, args.threads, args.seed, args.out)
        if args.stage == "unet":
            return 0
    t_path, s_path = resolve_checkpoint(args.teacher, "teacher"), resolve_checkpoint(args.student, "student")
    teacher, student = load_model(t_path).eval(), load_model(s_path).eval()
    if student.preset.image_size != args.size:
        raise SystemExit(f"the student works at {student.preset.image_size} px, not --size {args.size}")
    test_ds = load_dataset("isic2017", "test", data_dir=args.data_dir, size=args.size)
    if args.max_images:
        test_ds = _first(test_ds, args.max_images)
    unet, unet_info = load_unet(args.out)

    rows, preds = {}, {}
    for name, model in (("teacher", teacher), ("student (EFKD)", student)):
        k, n = sampler_defaults(model.preset.prediction_type)
        st = SamplerSettings("ddim", k, n)
        t0 = time.time()
        metrics, dices, means = score_diffusion(model, test_ds, st, args.seed)
        rows[name] = {"metrics": metrics, "sampler": st.describe(), "cost": cost_diffusion(model, st),
                      "eval_seconds": round(time.time() - t0, 1)}
        preds[name] = (torch.stack(means)[:, 0].numpy(), dices)
        print(f"{name}: DSC {metrics['dsc']['mean']:.4f}", flush=True)

    unet_masks = predict_unet(unet, test_ds)
    rows["U-Net (Dice+BCE)"] = {"metrics": score_masks(unet_masks, test_ds), "sampler": "single pass",
                                "cost": cost_unet(unet, args.size), "train": unet_info}
    preds["U-Net"] = (unet_masks, _per_image_dice(list(unet_masks), test_ds))
    if args.pte:
        rows[f"student {args.pte.name}"], _ = score_program(args.pte, test_ds, rows["student (EFKD)"]["cost"])
    otsu = otsu_masks(test_ds)
    rows["Otsu (CIELAB L)"] = {"metrics": score_masks(otsu, test_ds), "sampler": "-", "cost": {}}

    s_d, u_d, t_d = preds["student (EFKD)"][1], preds["U-Net"][1], preds["teacher"][1]
    doc = {
        "dataset": "isic2017", "split": "test", "n_images": len(test_ds), "image_size": args.size,
        "teacher": str(t_path), "student": str(s_path), "unet_train_seconds": round(unet_info["train_seconds"], 1),
        "machine": machine_info(args.threads), "rows": rows,
        "paired_dice": {"student - unet": paired(s_d, u_d), "student - teacher": paired(s_d, t_d)},
    }
    write_json(args.out / "results.json", doc)
    (args.out / "table.md").write_text(markdown(doc))
    draw(test_ds, {"student": preds["student (EFKD)"], "teacher": preds["teacher"], "U-Net": preds["U-Net"]},
         s_d, args.out / "overlays.png")
    print(markdown(doc))
    print(json.dumps(doc["paired_dice"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
