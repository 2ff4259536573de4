"""Full-resolution photos through `edgeseg segment`'s path, against the same photos' 256 x 192 copies.

    python bench/full_resolution.py --photos DIR [--data-dir ISIC2017_DIR] [--model M] [--out DIR]

DIR holds full-resolution dermoscopy photos ``<id>.jpg`` with their masks ``<id>_segmentation.png``
at the same size (e.g. ISIC 2017 test photos as released). Each photo is segmented as
`edgeseg segment` does it (decoded at full size, EXIF orientation applied, bilinear resize to the
model's input, the soft mean upsampled to the photo's size and thresholded) and scored against
its own mask (Dice, boundary F, HD95 in photo pixels). Two more rows isolate the resize: the model
input made with an area (anti-aliased) downscale instead of the bilinear one, and (with
``--data-dir``, the ISIC 2017 256 x 192 copy) the same photo's small copy, segmented and scored
against its small mask. Writes ``results.json`` and ``table.md`` under ``--out``.
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
from bench.common import machine_info, paired, paired_text, shown_path, write_results  # noqa: E402
from bench.isic2017 import read_mask  # noqa: E402

def area_input(rgb: np.ndarray, size: int) -> torch.Tensor:
    """The model input with OpenCV's area downscale (anti-aliased) instead of the bilinear one."""
    import cv2

    small = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(small).permute(2, 0, 1)[None].float() / 255.0


def scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    from edgeseg.metrics import MetricAccumulator

    acc = MetricAccumulator()
    acc.update_masks(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None])
    return {k: float(v[0]) for k, v in acc.per_sample().items() if k in ("dsc", "bf", "hd95")}


def photo_row(seg, photo: Path, copy=None) -> dict:
    """One photo's scores; `copy`: its 256 x 192 pair (an `edgeseg.data.layouts.Pair`), if any."""
    from edgeseg.segmenter import postprocess

    truth = read_mask(photo.with_name(f"{photo.stem}_segmentation.png"))
    out, rgb = seg.segment_photo(photo)
    if out.mask.shape != truth.shape:
        raise SystemExit(f"{photo}: mask {truth.shape[::-1]} is not the photo's size {out.mask.shape[::-1]}")
    mean, std = seg.predict(area_input(rgb, seg.image_size))
    row = {"photo": photo.name, "size": [int(rgb.shape[1]), int(rgb.shape[0])],
           "lesion_fraction": float(truth.mean()),
           "segment": scores(out.mask, truth),
           "area resize": scores(postprocess(mean[0, 0].numpy(), truth.shape, std[0, 0].numpy()).mask, truth)}
    if copy is not None:
        row["256 x 192 copy"] = scores(seg.segment(copy.image).mask, read_mask(copy.mask))
    return row


def summary(rows: list[dict]) -> dict:
    kinds = [k for k in ("segment", "area resize", "256 x 192 copy") if all(k in r for r in rows)]
    out = {k: {m: float(np.mean([r[k][m] for r in rows])) for m in ("dsc", "bf", "hd95")} for k in kinds}
    for k in kinds[1:]:
        out[k]["dsc_minus_segment"] = paired([r[k]["dsc"] for r in rows], [r["segment"]["dsc"] for r in rows])
    return out


def markdown(doc: dict) -> str:
    s = doc["summary"]
    lines = [f"# Full-resolution photos: {doc['model']}, {len(doc['photos'])} photos", "",
             "| path | DSC | BF | HD95 (photo px) | DSC - segment [95% CI] |", "|---|---:|---:|---:|---:|"]
    for k, m in s.items():
        d = m.get("dsc_minus_segment")
        diff = paired_text(d) if d else "-"
        lines.append(f"| {k} | {100 * m['dsc']:.2f} | {100 * m['bf']:.2f} | {m['hd95']:.1f} | {diff} |")
    lines += ["", "| photo | size | lesion share | " + " | ".join(f"DSC {k}" for k in s) + " |",
              "|---|---|---:|" + "---:|" * len(s)]
    for r in doc["photos"]:
        lines.append(f"| {r['photo']} | {r['size'][0]} x {r['size'][1]} | {r['lesion_fraction']:.2f} | "
                     + " | ".join(f"{100 * r[k]['dsc']:.2f}" for k in s) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from edgeseg.data.layouts import discover
    from edgeseg.defaults import DEFAULT_MODEL
    from edgeseg.errors import EdgesegError
    from edgeseg.segmenter import Segmenter

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=Path, required=True, help="folder of <id>.jpg and <id>_segmentation.png")
    ap.add_argument("--data-dir", type=Path, default=None, help="the ISIC 2017 256 x 192 copy (optional)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "full-resolution")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    photos = sorted(p for p in args.photos.glob("*.jpg") if p.with_name(f"{p.stem}_segmentation.png").is_file())
    if not photos:
        raise SystemExit(f"{args.photos}: no <id>.jpg with an <id>_segmentation.png beside it")
    try:
        copies = {c.id: c for c in discover("isic2017", args.data_dir)} if args.data_dir else {}
    except EdgesegError as e:
        raise SystemExit(f"--data-dir: {e}") from None
    seg = Segmenter.from_pretrained(args.model)
    rows = []
    for p in photos:
        rows.append(photo_row(seg, p, copies.get(p.stem)))
        print(f"{p.name}: " + ", ".join(f"{k} {100 * v['dsc']:.2f}" for k, v in rows[-1].items()
                                         if isinstance(v, dict)), flush=True)
    doc = {"model": args.model, "photos_dir": shown_path(args.photos), "machine": machine_info(args.threads),
           "photos": rows, "summary": summary(rows)}
    write_results(args.out, doc, markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
