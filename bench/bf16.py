"""Training steps per second, fp32 against bf16 autocast, on this CPU.

    python bench/bf16.py [--presets tiny-student,tiny-student-128,...] [--threads 1,2] [--repeats 3]

One training step as `Trainer.train_step` takes it (the student objective with EFKD against its
teacher for students, the teacher objective for teachers; forward, backward, gradient clipping,
Adam) at batch 16 on random inputs. Every (preset, threads, dtype) is timed in its own fresh process,
and the processes are interleaved fp32 / bf16, so the speed-up is a ratio measured side by side;
the median over ``--repeats`` processes is reported with its range. Writes ``bf16.json`` and
``bf16.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench.common import machine_info, run_json_child, write_results  # noqa: E402

TAG = "BF16STEP "
PRESETS = "tiny-teacher,tiny-student,tiny-teacher-128,tiny-student-128,student-mobile"


def child(preset_name: str, bf16: bool, threads: int, steps: int, batch: int) -> dict:
    """Median seconds per training step of `preset_name` in this process."""
    import time

    import torch

    from edgeseg.models import build, preset
    from edgeseg.train import TrainConfig, Trainer

    torch.set_num_threads(threads)
    p = preset(preset_name)
    s = p.image_size
    data = [(torch.rand(batch, 3, s, s), torch.where(torch.rand(batch, 1, s, s) > 0.5, 1.0, -1.0),
             torch.rand(batch, 1, s, s)) for _ in range(2)]
    teacher = build(p.teacher) if p.role == "student" and p.teacher else None
    cfg = TrainConfig(role=p.role, preset=preset_name, batch_size=batch, bf16=bf16, num_workers=0,
                      kd="efkd" if teacher is not None else "none", kernel_backend="torch")
    tr = Trainer(cfg, "/nonexistent", teacher=teacher, train_ds=[], val_ds=[], device=torch.device("cpu"), quiet=True)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        tr.train_step(data[i % 2])
        times.append(time.perf_counter() - t0)
    return {"preset": preset_name, "bf16": bool(tr.bf16), "threads": threads, "batch": batch,
            "s_per_step": statistics.median(times[2:])}


def measure(presets: list[str], threads: list[int], repeats: int, steps: int, batch: int) -> list[dict]:
    rows = []
    for name in presets:
        for th in threads:
            runs = {False: [], True: []}
            for _ in range(repeats):
                for bf16 in (False, True):  # interleaved: the ratio is measured side by side
                    argv = ["--child", name, "--bf16", str(int(bf16)), "--threads", str(th), "--steps", str(steps),
                            "--batch", str(batch)]
                    runs[bf16].append(run_json_child(__file__, argv, TAG, timeout=1800)["s_per_step"])
            fp32, bf = statistics.median(runs[False]), statistics.median(runs[True])
            rows.append({"preset": name, "threads": th, "fp32_s": runs[False], "bf16_s": runs[True],
                         "fp32_steps_per_s": 1 / fp32, "bf16_steps_per_s": 1 / bf,
                         "speedup": [f / b for f, b in zip(runs[False], runs[True])]})
            r = rows[-1]
            print(f"{name} x{th}: fp32 {fp32:.3f} s, bf16 {bf:.3f} s per step, speed-up "
                  f"{statistics.median(r['speedup']):.2f}x", flush=True)
    return rows


def merged(path: Path, rows: list[dict], args) -> list[dict]:
    """`rows` plus the rows of an earlier run in `path` measured alike (batch, steps) for other
    (preset, threads) pairs, so a table can be completed one measurement at a time."""
    if not path.exists():
        return rows
    old = json.loads(path.read_text())
    if (old.get("batch"), old.get("steps")) != (args.batch, args.steps):
        return rows
    new = {(r["preset"], r["threads"]) for r in rows}
    return [r for r in old["rows"] if (r["preset"], r["threads"]) not in new] + rows


def markdown(doc: dict) -> str:
    lines = [f"Training steps per second at batch {doc['batch']} (median of {doc['repeats']} processes, "
             "[min, max] of the per-pair speed-up):", "",
             "| preset | image | threads | fp32 steps/s | bf16 steps/s | speed-up |", "|---|---:|---:|---:|---:|---:|"]
    from edgeseg.models import preset

    for r in doc["rows"]:
        sp = r["speedup"]
        lines.append(f"| {r['preset']} | {preset(r['preset']).image_size} | {r['threads']} | "
                     f"{r['fp32_steps_per_s']:.2f} | {r['bf16_steps_per_s']:.2f} | "
                     f"{statistics.median(sp):.2f}x [{min(sp):.2f}, {max(sp):.2f}] |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default=PRESETS)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per process (after two warm-up steps)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bf16")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bf16", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(TAG + json.dumps(child(args.child, bool(args.bf16), int(args.threads), args.steps, args.batch)))
        return 0
    threads = [int(t) for t in args.threads.split(",")]
    rows = measure(args.presets.split(","), threads, args.repeats, args.steps, args.batch)
    doc = {"machine": machine_info(max(threads)), "batch": args.batch, "repeats": args.repeats, "steps": args.steps,
           "rows": merged(args.out / "bf16.json", rows, args)}
    write_results(args.out, doc, markdown(doc), "bf16", "bf16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
