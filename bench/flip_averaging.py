"""Flip averaging measured: do ensemble members that see flipped photos beat plain members?

    python bench/flip_averaging.py --data-dir DIR/isic2017 [--split val] [--models A,B] [--max-images N]

For each model (default: the default model and its teacher), every image of the split is sampled
with DDIM at the model's K and four members, each from its own initial noise: once on the photo
as it is (plain) and once with member j on view j of the photo (as is, left-right, up-down, both
flips) and its x0 flipped back (flips). Both runs use the same noise, so each difference is paired.
An ensemble of N is the first N members. Scored at each photo's own size, as
`edgeseg segment` makes the mask (``bench/isic2017.py``'s photo-size scoring): Dice, boundary F,
HD95, and per N the paired Dice difference flips - plain with a 95% interval. The flips cost two
tensor flips per member, nothing beside the network calls, so a flips row costs its plain row.
Writes ``results.json`` and ``table.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench.common import machine_info, paired, paired_text, write_results  # noqa: E402
from bench.isic2017 import photo_masks, score_at_photo_size  # noqa: E402

VIEWS = ("none", "left-right", "up-down", "both")
ENSEMBLES = (1, 2, 3, 4)


def view(x: torch.Tensor, j: int) -> torch.Tensor:
    """View j of a batch (its own inverse): as is, left-right, up-down, both flips."""
    dims = {0: (), 1: (-1,), 2: (-2,), 3: (-2, -1)}[j]
    return x.flip(dims) if dims else x


def members(model, images: torch.Tensor, seed: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain, flips): B x 4 x S x S final x0 of four members per image, the same noise in both."""
    from edgeseg.defaults import sampler_defaults
    from edgeseg.segmenter import Segmenter

    k, _ = sampler_defaults(model.preset.prediction_type)
    seg = Segmenter.from_model(model, steps=k, ensemble=1, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(VIEWS)
    plain, flips = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        noise = torch.randn((x.shape[0], n, 1, *x.shape[-2:]), generator=gen)
        plain.append(torch.stack([seg.predict(x, noise=noise[:, j])[0][:, 0] for j in range(n)], 1))
        flips.append(torch.stack([view(seg.predict(view(x, j), noise=view(noise[:, j], j))[0], j)[:, 0]
                                  for j in range(n)], 1))
    return torch.cat(plain), torch.cat(flips)


def score(name: str, plain: torch.Tensor, flips: torch.Tensor, truth: list[np.ndarray]) -> dict:
    rows, per = {}, {}
    for kind, x0 in (("plain", plain), ("flips", flips)):
        for n in ENSEMBLES:
            summary, per[kind, n] = score_at_photo_size(list(x0[:, :n].mean(1).numpy()), truth)
            rows[f"{kind} N={n}"] = {m: summary[m]["mean"] for m in ("dsc", "bf", "hd95")}
    diffs = {f"N={n}": paired(per["flips", n]["dsc"], per["plain", n]["dsc"]) for n in ENSEMBLES}
    return {"model": name, "rows": rows, "flips_minus_plain_dsc": diffs}


def markdown(doc: dict) -> str:
    out = [f"# Flip averaging: ISIC 2017 {doc['split']} ({doc['n_images']} images), at photo size", "",
           "Members from the same noise; plain: the photo as it is; flips: member j on view j (as is, "
           "left-right, up-down, both) and flipped back. Dice and boundary F in %, HD95 in photo pixels.", "",
           "| model | N | plain DSC | flips DSC | flips - plain DSC [95% CI] | won / lost | plain BF | flips BF "
           "| plain HD95 | flips HD95 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in doc["models"]:
        for n in ENSEMBLES:
            p, f, d = m["rows"][f"plain N={n}"], m["rows"][f"flips N={n}"], m["flips_minus_plain_dsc"][f"N={n}"]
            diff = f"{paired_text(d)} | {d['wins']} / {d['losses']}" if n > 1 else "- (one member, no flip) | -"
            out.append(f"| {m['model']} | {n} | {100 * p['dsc']:.2f} | {100 * f['dsc']:.2f} | {diff} | "
                       f"{100 * p['bf']:.2f} | {100 * f['bf']:.2f} | {p['hd95']:.2f} | {f['hd95']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    from edgeseg.checkpoint import load_model
    from edgeseg.data import load_dataset
    from edgeseg.defaults import DEFAULT_MODEL
    from edgeseg.runs import resolve_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, type=Path, help="the ISIC 2017 Part 1 folder")
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--models", default=f"{DEFAULT_MODEL},{DEFAULT_MODEL.replace('student', 'teacher')}",
                    help="comma-separated .safetensors files, run folders (their student) or shipped model names "
                         "(default: %(default)s)")
    ap.add_argument("--max-images", type=int, default=None, help="the first N images only (smoke runs)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "flip-averaging")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    doc = {"dataset": "isic2017", "split": args.split, "seed": args.seed, "machine": machine_info(args.threads),
           "models": []}
    for name in args.models.split(","):
        model = load_model(resolve_checkpoint(name, "student")).eval()
        ds = load_dataset("isic2017", args.split, data_dir=args.data_dir, size=model.preset.image_size)
        n = min(args.max_images or len(ds), len(ds))
        images = torch.from_numpy(np.asarray(ds.images[:n])).permute(0, 3, 1, 2).float() / 255.0
        truth = photo_masks(args.data_dir, ds)[:n]
        print(f"{name}: {n} images x 2 x {len(VIEWS)} members ...", flush=True)
        with torch.no_grad():
            plain, flips = members(model, images, args.seed, args.batch)
        doc["models"].append(score(name, plain, flips, truth))
        doc["n_images"] = n
    write_results(args.out, doc, markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
