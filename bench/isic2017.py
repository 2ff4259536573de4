"""Table I on real lesions: teacher, EFKD student, Otsu and a discriminative U-Net on ISIC 2017 test.

    python bench/isic2017.py --data-dir DIR [--teacher T] [--student S] [--unet-seconds N]

DIR is the ISIC 2017 Part 1 release (official folder names). Teacher and student default to
the shipped real-lesion models. The U-Nets (edgeseg.baselines.SmallUNet, Dice + BCE; ``--unets``:
its own 0.12 M size and/or the width whose one pass costs the student's GFLOP per image) are
trained here on the same train split at the same resolution for ``--unet-seconds`` of wall time
(give them the student's distillation time; ``--stage unet`` trains them alone, e.g. beside the
student on the same number of threads; each keeps a resumable state, ``--resume`` continues it, and
``--unet-dirs`` adds U-Nets trained elsewhere, e.g. for longer, as extra rows). Every model is
scored with the same code (edgeseg.metrics, per image at the models' input size, then averaged)
on the whole test split (600 images). Cost per image:
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
from bench.common import (machine_info, median_ms, paired, paired_text, results_name, shown_path,  # noqa: E402
                          write_json)

METRICS = ("dsc", "iou", "se", "sp", "acc", "hd95", "bf")


def _summary(acc) -> dict:
    per = acc.per_sample()
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in per.items()}


def score_diffusion(model, test_ds, settings, seed: int) -> tuple[dict, np.ndarray, list]:
    """Metrics, per-image Dice and the predictions (mean) of a DermoSegDiff at `settings`."""
    from edgeseg.evaluate import evaluate

    r = evaluate(model, test_ds, settings, seed=seed, keep=len(test_ds), progress=True, label=model.preset.name)
    means = [k[2] for k in r["keep"]]
    return r["metrics"], _per_image_scores(means, test_ds), means


def _per_image_scores(preds, test_ds) -> dict[str, np.ndarray]:
    """Per-image Dice and boundary F of predictions (> 0 is lesion) against the test masks."""
    from edgeseg.metrics import boundary_fscore, dice

    gt = torch.from_numpy(np.asarray(test_ds.masks) > 0)
    p = torch.stack([torch.as_tensor(x).reshape(gt.shape[1:]) > 0 for x in preds])
    return {"dsc": dice(p, gt).numpy(), "bf": boundary_fscore(p, gt).numpy()}


def photo_masks(data_dir: Path, test_ds) -> list[np.ndarray]:
    """The split's ground truth at each photo's own size (the release's PNGs), in test_ds order."""
    from edgeseg.data.layouts import discover

    by_id = {p.id: p.mask for p in discover("isic2017", data_dir)}
    return [read_mask(by_id[name]) for name in test_ds.names]


def read_mask(path: Path) -> np.ndarray:
    """A released 0/255 mask PNG as bool."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


def score_at_photo_size(means, truth: list[np.ndarray], cleanup: str | None = None) -> tuple[dict, dict]:
    """Metrics of soft S x S means (> 0 is lesion) upsampled to each photo's size and cleaned as
    `edgeseg segment` does it (edgeseg.segmenter.postprocess), against the photos' own masks; and
    per-image Dice / boundary F for paired intervals."""
    from edgeseg.metrics import MetricAccumulator
    from edgeseg.segmenter import postprocess

    acc = MetricAccumulator()
    for mean, gt in zip(means, truth):
        pred = postprocess(np.asarray(mean, dtype=np.float32).reshape(np.shape(mean)[-2:]), gt.shape,
                           cleanup=cleanup).mask
        acc.update_masks(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
    per = acc.per_sample()
    return _summary(acc), {"dsc": per["dsc"], "bf": per["bf"]}


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


STUDENT = "student (EFKD)"  # the student's row label (tests and the docs' tables read it)

#: the U-Net baselines: file stem under --out and table label
UNETS = {"own": ("unet", "U-Net, own size (Dice+BCE)"),
         "same-gflop": ("unet-same-gflop", "U-Net, same GFLOP as the student (Dice+BCE)")}


def unet_channels(kind: str, student_preset: str, size: int, ensemble: int | None = None) -> tuple[int, ...]:
    """Own widths, or widths at the student's GFLOP per image at its sampler setting (default K, and N
    unless `ensemble` is given)."""
    from edgeseg.baselines import UNET_CHANNELS, unet_channels_like

    return UNET_CHANNELS if kind == "own" else unet_channels_like(student_preset, size, ensemble=ensemble)


def train_unet_once(train_ds, seconds: float, threads: int, seed: int, out: Path, kind: str, channels,
                    resume: bool = False):
    """Train a U-Net for `seconds` of wall time; weights and training info saved under `out`, its
    resumable state in `out/<stem>-state.pt` (continued with `resume`)."""
    from safetensors.torch import save_file

    from edgeseg.baselines import train_unet

    stem = UNETS[kind][0]
    state = out / f"{stem}-state.pt"
    if state.exists() and not resume:
        raise SystemExit(f"{state} holds a U-Net training in progress: pass --resume to continue it, "
                         "or delete it to train afresh")
    try:
        model, info = train_unet(train_ds, None, minutes=seconds / 60.0, seed=seed, threads=threads, channels=channels,
                                 log=lambda m: print(f"  {stem} {m}", flush=True), state_path=state)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{stem}.safetensors"))
    write_json(out / f"{stem}-train.json", {**info, "budget_seconds": seconds, "threads": threads, "seed": seed})
    return model, info


def load_unet(out: Path, kind: str):
    """A trained U-Net from `out` (None if that kind was not trained there) and its training info."""
    from safetensors.torch import load_file

    from edgeseg.baselines import UNET_CHANNELS, SmallUNet

    stem = UNETS[kind][0]
    if not (out / f"{stem}.safetensors").exists():
        return None, None
    info = json.loads((out / f"{stem}-train.json").read_text())
    model = SmallUNet(tuple(info.get("channels", UNET_CHANNELS)))
    model.load_state_dict(load_file(str(out / f"{stem}.safetensors")))
    return model.eval(), info


def predict_unet(model, test_ds) -> np.ndarray:
    """The U-Net's map on the sampler's scale: tanh(logit / 2) = 2 sigmoid(logit) - 1 in [-1, 1]
    (> 0 is lesion), so its margin map is defined exactly as the student's."""
    x = torch.from_numpy(np.array(test_ds.images)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 64]) for i in range(0, len(x), 64)])
    return torch.tanh(logits[:, 0] / 2).numpy()


def margin_quality(mean: np.ndarray, test_ds) -> dict:
    """How well the margin map (1 - |mean|, the shipped uncertainty map) flags wrong pixels (pixel
    AUROC against the error map) and images (correlation of its per-image mean with 1 - Dice), and
    the calibration of p = (mean + 1) / 2 (ECE): for the diffusion models and the U-Nets alike."""
    from bench.uncertainty import calibration, pixel_auroc
    from edgeseg.segmenter import uncertainty_map

    mean = np.asarray(mean, dtype=np.float32).reshape(len(test_ds), *np.asarray(test_ds.masks).shape[1:])
    truth = np.asarray(test_ds.masks) > 0
    u = uncertainty_map(mean, None, "margin")
    d = _per_image_scores(list(mean), test_ds)["dsc"]
    per_image = u.reshape(len(u), -1).mean(axis=1)
    return {"auroc": pixel_auroc(u, (mean > 0) != truth), "corr_1_minus_dice": float(np.corrcoef(per_image, 1 - d)[0, 1]),
            "ece": calibration(np.clip((mean + 1) / 2, 0, 1), truth)["ece"]}


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
    """An exported .pte (what a phone runs), through edgeseg.Segmenter, scored like the rest; returns
    the row and the program's soft means (B x S x S, > 0 is lesion)."""
    from edgeseg.segmenter import Segmenter

    seg = Segmenter.from_pretrained(path)
    x = torch.from_numpy(np.array(test_ds.images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.cat([seg.predict(x[i:i + 32])[0] for i in range(0, len(x), 32)])[:, 0].numpy()
    cost = {"params": student_cost["params"], "gflop": student_cost["gflop"],
            "ms": round(median_ms(lambda: seg.predict(x[:1]), 30), 2), "file_bytes": path.stat().st_size}
    row = {"metrics": score_masks(mean > 0, test_ds), "sampler": f"DDIM {seg.steps} steps x {seg.ensemble} (.pte)",
           "cost": cost}
    return row, mean


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


def _metric_rows(doc: dict, key: str) -> list[str]:
    lines = ["| model | params | sampler | GFLOP/img | ms/img | DSC | IoU | SE | SP | ACC | HD95 px | BF |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in doc["rows"].items():
        if key not in r:
            continue
        m, c = r[key], r["cost"]
        pct = lambda k: f"{100 * m[k]['mean']:.2f}"  # noqa: E731
        params = f"{c['params'] / 1e6:.3f}M" if c.get("params") else "-"
        lines.append(f"| {name} | {params} | {r['sampler']} | {c.get('gflop', '-')} | {c.get('ms', '-')} | "
                     f"{pct('dsc')} | {pct('iou')} | {pct('se')} | {pct('sp')} | {pct('acc')} | "
                     f"{m['hd95']['mean']:.2f} | {pct('bf')} |")
    return lines


def _paired_rows(paired: dict) -> list[str]:
    lines = ["| A - B | DSC [95% CI] | images won / lost | BF [95% CI] |", "|---|---:|---:|---:|"]
    for key, p in paired.items():
        d, bf = p["dsc"], p["bf"]
        lines.append(f"| {key} | {paired_text(d)} | {d['wins']} / {d['losses']} | {paired_text(bf)} |")
    return lines


def markdown(doc: dict) -> str:
    n, split = doc["n_images"], doc.get("split", "test")
    lines = [f"At each photo's own size ({n} {split} images; the mask upsampled and cleaned as `edgeseg segment` "
             "does it):", "", *_metric_rows(doc, "photo_metrics"), "",
             "At the models' input size (the thresholded mean, no cleanup):", "", *_metric_rows(doc, "metrics"), ""]
    lines += ["The margin map (1 - |mean|; for a U-Net mean = 2 sigmoid(logit) - 1) as an uncertainty map: pixel "
              "AUROC against the error map, correlation of its per-image mean with 1 - Dice, ECE of p = (mean + 1) / 2:",
              "", "| model | AUROC | r | ECE |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['uncertainty']['auroc']:.3f} | {r['uncertainty']['corr_1_minus_dice']:.2f} | "
              f"{r['uncertainty']['ece']:.3f} |" for name, r in doc["rows"].items() if "uncertainty" in r]
    if doc.get("paired_photo_size"):
        lines += ["", f"Paired differences at photo size on the {n} images (points; normal 95% interval over images):",
                  "", *_paired_rows(doc["paired_photo_size"])]
    lines += ["", f"Paired differences at input size on the {n} images:", "", *_paired_rows(doc.get("paired", {}))]
    if doc.get("by_lesion_size"):
        lines += ["", "Dice at photo size by the lesion's share of the photo (true mask; images per bin in brackets):",
                  "", *_size_rows(doc["by_lesion_size"])]
    return "\n".join(lines) + "\n"


def _first(ds, n: int):
    from edgeseg.data import SegDataset

    return SegDataset(ds.images[:n], ds.masks[:n], ds.names[:n], ds.name, ds.split)


def _args(argv):
    from edgeseg.defaults import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, type=Path, help="the ISIC 2017 Part 1 folder")
    ap.add_argument("--teacher", default=DEFAULT_MODEL.replace("student", "teacher"),
                    help="checkpoint or shipped model name (default: the default model's teacher)")
    ap.add_argument("--student", default=DEFAULT_MODEL, help="checkpoint or shipped model name (default: the default model)")
    ap.add_argument("--unet-seconds", type=float, default=None,
                    help="U-Net training wall time (give it the student's distillation time)")
    ap.add_argument("--resume", action="store_true",
                    help="continue each U-Net from its training state in --out (a finished one is kept as it is)")
    ap.add_argument("--unet-dirs", default="",
                    help="comma-separated folders with more trained U-Nets (e.g. longer budgets, --stage unet "
                         "--out DIR): scored as extra rows named with their training time")
    ap.add_argument("--unets", default="own,same-gflop",
                    help="U-Nets to train (--stage unet/all): own (0.12 M) and/or same-gflop (the width at which "
                         "one pass costs what the student's default sampler setting costs)")
    ap.add_argument("--student-preset", default=None,
                    help="preset that sizes the same-GFLOP U-Net (default: the --student checkpoint's)")
    ap.add_argument("--ensemble", type=int, default=None,
                    help="the student's ensemble size N (default: the defaults table's); it also sizes the "
                         "same-GFLOP U-Net, e.g. 1 for a phone program of one member")
    ap.add_argument("--size", type=int, default=None, help="input size of the models (default: the student's)")
    ap.add_argument("--split", choices=("test", "val"), default="test",
                    help="test (the table) or val (choices such as the mask cleanup are made here)")
    ap.add_argument("--pte", type=Path, default=None, help="also score this exported student program (.pte)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-images", type=int, default=None, help="first N test images only (smoke runs)")
    ap.add_argument("--stage", choices=("all", "unet", "eval"), default="all",
                    help="unet: only train the U-Net (e.g. beside the student's training, same threads); "
                         "eval: score with the U-Net already trained in --out; all: both")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default: bench/results/isic2017-<size>; isic2017 for 64 px)")
    args = ap.parse_args(argv)
    if args.ensemble is not None and args.ensemble < 1:
        raise SystemExit(f"--ensemble must be at least 1, got {args.ensemble}")
    return args


def _train_unets(args, student_preset: str) -> None:
    from edgeseg.data import load_dataset

    if not args.unet_seconds:
        raise SystemExit("--unet-seconds is needed to train the U-Net (the student's distillation time)")
    train_ds = load_dataset("isic2017", "train", data_dir=args.data_dir, size=args.size)  # no augmentation
    for kind in args.unets.split(","):
        if kind not in UNETS:
            raise SystemExit(f"--unets: unknown U-Net {kind!r}; known: {', '.join(UNETS)}")
        channels = unet_channels(kind, student_preset, args.size, args.ensemble)
        print(f"training the U-Net ({kind}, widths {channels}) for {args.unet_seconds:.0f} s ...", flush=True)
        train_unet_once(train_ds, args.unet_seconds, args.threads, args.seed, args.out, kind, channels, args.resume)


def _score_diffusion_rows(args, teacher, student, test_ds) -> tuple[dict, dict]:
    from edgeseg.defaults import sampler_defaults
    from edgeseg.evaluate import SamplerSettings

    rows, preds = {}, {}
    for name, model in (("teacher", teacher), (STUDENT, student)):
        k, n = sampler_defaults(model.preset.prediction_type)
        st = SamplerSettings("ddim", k, args.ensemble if args.ensemble and model is student else n)
        t0 = time.time()
        metrics, dices, means = score_diffusion(model, test_ds, st, args.seed)
        rows[name] = {"metrics": metrics, "sampler": st.describe(), "cost": cost_diffusion(model, st),
                      "eval_seconds": round(time.time() - t0, 1)}
        preds[name] = (torch.stack(means)[:, 0].numpy(), dices)
        print(f"{name}: DSC {metrics['dsc']['mean']:.4f}", flush=True)
    return rows, preds


def _unet_label(kind: str, info: dict, extra: bool) -> str:
    """The table label of a U-Net; one from --unet-dirs also names its training time."""
    label = UNETS[kind][1]
    return f"{label}, {info['budget_seconds']:.0f} s" if extra else label


def _is_extra_unet(label: str) -> bool:
    """A row from --unet-dirs (kept out of the overlay figure, which shows the main rows)."""
    return any(label.startswith(f"{lab}, ") for _, lab in UNETS.values())


def _score_unet_rows(args, test_ds, rows: dict, preds: dict) -> None:
    dirs = [args.out] + [Path(d) for d in args.unet_dirs.split(",") if d]
    for folder, kind in ((d, k) for d in dirs for k in UNETS):
        unet, unet_info = load_unet(folder, kind)
        if unet is None:
            continue
        label = _unet_label(kind, unet_info, folder != args.out)
        unet_mean = predict_unet(unet, test_ds)
        rows[label] = {"metrics": score_masks(unet_mean > 0, test_ds), "sampler": "single pass",
                       "cost": cost_unet(unet, args.size), "train": unet_info}
        preds[label] = (unet_mean, _per_image_scores(list(unet_mean), test_ds))


def _score_at_photo_size(rows: dict, preds: dict, truth) -> dict:
    """Every row at the photos' own size, upsampled and cleaned as `segment` does it ("photo_metrics"),
    and with each mask cleanup ("photo_metrics_by_cleanup", where the default is chosen); returns
    per-image photo-size scores (the default cleanup) for the paired intervals."""
    from edgeseg.defaults import MASK_CLEANUP, MASK_CLEANUPS

    per_image = {}
    for name, (mean, _) in preds.items():
        by_cleanup = {}
        for how in MASK_CLEANUPS:
            by_cleanup[how], scores = score_at_photo_size(mean, truth, cleanup=how)
            if how == MASK_CLEANUP:
                per_image[name] = scores
        rows[name]["photo_metrics"], rows[name]["photo_metrics_by_cleanup"] = by_cleanup[MASK_CLEANUP], by_cleanup
        print(f"{name}: DSC at photo size " + ", ".join(f"{how} {m['dsc']['mean']:.4f}" for how, m in by_cleanup.items()),
              flush=True)
    return per_image


#: Lesion size bins for the breakdown: the lesion's share of the photo (true mask), [low, high).
LESION_SIZE_BINS = (("small (< 10%)", 0.0, 0.1), ("medium (10-30%)", 0.1, 0.3), ("large (>= 30%)", 0.3, 1.01))


def by_lesion_size(per_image: dict, truth: list[np.ndarray]) -> dict:
    """Each row's mean photo-size Dice within each lesion size bin, with the bins' image counts."""
    frac = np.array([gt.mean() for gt in truth])
    bins = {name: (frac >= lo) & (frac < hi) for name, lo, hi in LESION_SIZE_BINS}
    return {"images": {name: int(m.sum()) for name, m in bins.items()},
            "dsc": {row: {name: float(np.mean(sc["dsc"][m])) if m.any() else None for name, m in bins.items()}
                    for row, sc in per_image.items()}}


def _size_rows(sizes: dict) -> list[str]:
    names = list(sizes["images"])
    lines = ["| model | " + " | ".join(f"{n} ({sizes['images'][n]})" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for row, d in sizes["dsc"].items():
        lines.append(f"| {row} | " + " | ".join("-" if d[n] is None else f"{100 * d[n]:.2f}" for n in names) + " |")
    return lines


def _short(label: str) -> str:
    """A row's short name in the paired tables: student, teacher, unet, unet-same-gflop, or the program's file."""
    names = {STUDENT: "student", **{lab: stem for stem, lab in UNETS.values()}}
    for stem, lab in UNETS.values():
        if label.startswith(f"{lab}, "):  # a --unet-dirs row: its training time
            return f"{stem}-{label.removeprefix(f'{lab}, ').removesuffix(' s')}s"
    return names.get(label, label.removeprefix("student ").strip())


def _paired_table(scores: dict, baseline: str) -> dict:
    return {f"{_short(baseline)} - {_short(other)}": {m: paired(scores[baseline][m], scores[other][m])
                                                      for m in ("dsc", "bf")}
            for other in scores if other != baseline}


def main(argv=None) -> int:
    args = _args(argv)
    from edgeseg.checkpoint import load_model, load_preset
    from edgeseg.data import load_dataset
    from edgeseg.runs import resolve_checkpoint

    torch.set_num_threads(args.threads)
    t_path, s_path = resolve_checkpoint(args.teacher, "teacher"), resolve_checkpoint(args.student, "student")
    s_preset = load_preset(s_path)[0]
    args.size = args.size or s_preset.image_size
    args.out = args.out or REPO / "bench" / "results" / results_name("isic2017", args.size)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "unet"):
        _train_unets(args, args.student_preset or s_preset.name)
        if args.stage == "unet":
            return 0
    teacher, student = load_model(t_path).eval(), load_model(s_path).eval()
    if student.preset.image_size != args.size:
        raise SystemExit(f"the student works at {student.preset.image_size} px, not --size {args.size}")
    test_ds = load_dataset("isic2017", args.split, data_dir=args.data_dir, size=args.size)
    if args.max_images:
        test_ds = _first(test_ds, args.max_images)

    rows, preds = _score_diffusion_rows(args, teacher, student, test_ds)
    _score_unet_rows(args, test_ds, rows, preds)
    for name, (mean, _) in preds.items():
        rows[name]["uncertainty"] = margin_quality(mean, test_ds)
    if args.pte:
        label = f"student {args.pte.name}"
        rows[label], pte_mean = score_program(args.pte, test_ds, rows[STUDENT]["cost"])
        preds[label] = (pte_mean, _per_image_scores(list(pte_mean), test_ds))
    truth = photo_masks(args.data_dir, test_ds)
    photo = _score_at_photo_size(rows, preds, truth)
    otsu = otsu_masks(test_ds)
    rows["Otsu (CIELAB L)"] = {"metrics": score_masks(otsu, test_ds), "sampler": "-", "cost": {}}

    doc = {
        "dataset": "isic2017", "split": args.split, "n_images": len(test_ds), "image_size": args.size,
        "teacher": shown_path(t_path), "student": shown_path(s_path), "machine": machine_info(args.threads),
        "rows": rows,
        "paired": _paired_table({k: v[1] for k, v in preds.items()}, STUDENT),
        "paired_photo_size": _paired_table(photo, STUDENT),
        "by_lesion_size": by_lesion_size(photo, truth),
    }
    doc["paired_photo_size"].update(_paired_table({k: photo[k] for k in ("teacher", STUDENT)}, "teacher"))
    write_json(args.out / "results.json", doc)
    (args.out / "table.md").write_text(markdown(doc))
    student_scores = preds[STUDENT][1]
    short = {STUDENT: "student", UNETS["own"][1]: "U-Net", UNETS["same-gflop"][1]: "U-Net L"}
    draw(test_ds, {short.get(k, k): (p, sc["dsc"]) for k, (p, sc) in preds.items() if not _is_extra_unet(k)},
         student_scores["dsc"], args.out / "overlays.png")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
