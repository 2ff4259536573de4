"""Validation quality at equal steps, fp32 against bf16 autocast, on a real dataset.

    python bench/bf16_quality.py --data-dir DIR [--preset tiny-teacher] [--steps 250] [--seeds 0,1]
        [--threads 1] [--out bench/results/bf16]

Each (seed, precision) pair is one `edgeseg train-teacher` run from scratch on ISIC 2017 for the
same number of steps, with the same settings but `bf16`; the run's own validation Dice (150 images,
DDIM 1 x 1) after the last step is read from its log. The report puts each seed's fp32 and bf16
Dice side by side with the fp32 spread over seeds. Writes ``quality.json`` and ``quality.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench.common import machine_info, write_results  # noqa: E402


def train(args, seed: int, bf16: bool) -> dict:
    """One training run; its last validation Dice, steps and training seconds."""
    name = f"{args.preset}-s{seed}-{'bf16' if bf16 else 'fp32'}"
    run = args.runs_dir / name
    cmd = [sys.executable, "-m", "edgeseg.cli.main", "train-teacher", "--dataset", "isic2017", "--data-dir",
           str(args.data_dir), "--preset", args.preset, "--epochs", "100000", "--max-steps", str(args.steps),
           "--lr", str(args.lr), "--seed", str(seed), "--runs-dir", str(args.runs_dir), "--run-name", name,
           "--set", f"bf16={str(bf16).lower()}", "--set", "num_workers=0", "--set", "lr_schedule=cosine"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if not (run / "teacher.json").exists():
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    log = [json.loads(line) for line in (run / "teacher-log.jsonl").read_text().splitlines() if line.strip()]
    vals = [r for r in log if "val_dsc" in r]
    meta = json.loads((run / "teacher.json").read_text())
    return {"seed": seed, "bf16": bool(meta.get("bf16_autocast")), "steps": meta["steps"],
            "train_seconds": meta["train_seconds"], "val_dsc_last": vals[-1]["val_dsc"],
            "val_dsc_curve": [r["val_dsc"] for r in vals]}


def markdown(doc: dict) -> str:
    rows = doc["runs"]
    lines = [f"`{doc['preset']}` trained from scratch on ISIC 2017 for {doc['steps']} steps of 16 "
             f"({doc['threads']} thread(s)); validation Dice (150 images, DDIM 1 x 1) after the last step:", "",
             "| seed | fp32 DSC | bf16 DSC | bf16 - fp32 | fp32 s | bf16 s |", "|---:|---:|---:|---:|---:|---:|"]
    by = {(r["seed"], r["bf16"]): r for r in rows}
    for s in doc["seeds"]:
        f, b = by[(s, False)], by[(s, True)]
        lines.append(f"| {s} | {100 * f['val_dsc_last']:.2f} | {100 * b['val_dsc_last']:.2f} | "
                     f"{100 * (b['val_dsc_last'] - f['val_dsc_last']):+.2f} | {f['train_seconds']:.0f} | "
                     f"{b['train_seconds']:.0f} |")
    s = doc["summary"]
    lines += ["", f"fp32 over seeds: {s['fp32_mean']:.2f} (range {s['fp32_min']:.2f}-{s['fp32_max']:.2f}); "
              f"bf16: {s['bf16_mean']:.2f} (range {s['bf16_min']:.2f}-{s['bf16_max']:.2f})."]
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> dict:
    out = {}
    for key, flag in (("fp32", False), ("bf16", True)):
        v = [100 * r["val_dsc_last"] for r in rows if r["bf16"] == flag]
        out.update({f"{key}_mean": statistics.mean(v), f"{key}_min": min(v), f"{key}_max": max(v)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--preset", default="tiny-teacher")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs-dir", type=Path, default=Path("runs") / "bf16-quality")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bf16")
    args = ap.parse_args(argv)
    import torch

    from edgeseg.devices import bf16_supported

    if not bf16_supported(torch.device("cpu")):
        raise SystemExit("bf16 autocast is not applied on this machine (no native bf16): nothing to compare")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        for bf16 in (False, True):
            rows.append(train(args, seed, bf16))
            r = rows[-1]
            print(f"seed {seed} {'bf16' if bf16 else 'fp32'}: val Dice {100 * r['val_dsc_last']:.2f} after "
                  f"{r['steps']} steps ({r['train_seconds']:.0f} s)", flush=True)
    doc = {"machine": machine_info(args.threads), "preset": args.preset, "steps": args.steps, "lr": args.lr,
           "threads": args.threads, "seeds": seeds, "runs": rows, "summary": summary(rows)}
    write_results(args.out, doc, markdown(doc), "quality", "quality")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
