"""Evaluation throughput by batch size: ms per image of `Segmenter.predict` (the sampler at the
defaults' K and N), the call `edgeseg.evaluate` makes once per batch.

    python bench/eval_batch.py [--models A,B] [--threads 1,2] [--batches 1,2,4,8,16,32] [--images 32]

Per model and thread count, ``--images`` random images are segmented in batches of each size;
the sizes are timed round-robin over ``--rounds`` rounds after a warm-up call each, and the
median per image is reported. Writes ``results.json`` and ``table.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench.common import machine_info, write_results  # noqa: E402


def ms_per_image(seg, images: torch.Tensor, batch: int) -> float:
    tic = time.perf_counter()
    for i in range(0, len(images), batch):
        seg.predict(images[i:i + batch])
    return 1000 * (time.perf_counter() - tic) / len(images)


def measure(model: str, threads: int, batches: list[int], n_images: int, rounds: int) -> dict:
    from edgeseg.segmenter import Segmenter

    torch.set_num_threads(threads)
    seg = Segmenter.from_pretrained(model)
    images = torch.rand(n_images, 3, seg.image_size, seg.image_size, generator=torch.Generator().manual_seed(0))
    for b in batches:
        seg.predict(images[:b])  # warm-up
    times: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(rounds):
        for b in batches:
            times[b].append(ms_per_image(seg, images, b))
    return {"model": model, "image_size": seg.image_size, "sampler": f"DDIM {seg.steps} x {seg.ensemble}",
            "threads": threads, "ms_per_image": {str(b): statistics.median(t) for b, t in times.items()},
            "all_ms": {str(b): t for b, t in times.items()}}


def markdown(doc: dict) -> str:
    batches = list(doc["rows"][0]["ms_per_image"])
    lines = ["# Evaluation throughput by batch size (ms per image, median of rounds)", "",
             "| model | px | sampler | threads | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|---:|---|---:|" + "---:|" * len(batches)]
    for r in doc["rows"]:
        lines.append(f"| {r['model']} | {r['image_size']} | {r['sampler']} | {r['threads']} | "
                     + " | ".join(f"{r['ms_per_image'][b]:.1f}" for b in batches) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from edgeseg.defaults import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=f"{DEFAULT_MODEL},tiny-student-isic2017")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "eval-batch")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for model in args.models.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            rows.append(measure(model, threads, batches, args.images, args.rounds))
            print(markdown({"rows": rows[-1:]}).splitlines()[-1], flush=True)
    doc = {"machine": machine_info(), "images": args.images, "rounds": args.rounds, "rows": rows}
    write_results(args.out, doc, markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
