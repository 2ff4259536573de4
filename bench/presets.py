"""Parameters and compute per call of every model preset.

    python bench/presets.py                 # FLOPs counted on the meta device (exact, seconds)
    python bench/presets.py --device cpu    # the same count from real CPU forward passes (~1 min)

For each preset: parameters (millions), GFLOP of one forward call at the preset's image size
with batch 1, measured with torch.utils.flop_counter.FlopCounterMode (it counts 2 FLOPs per
multiply-add; convolutions, matmuls and attention, not elementwise ops), image size, stages,
prediction type, role and teacher. The meta device runs the same operators on the same shapes
without computing values, so its count equals a real run's (tests/test_core_models.py checks
this for student-mobile).

Writes bench/results/presets.json and presets.md (a Markdown table) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from edgeseg.models import build, count_params, flops_per_call, list_presets, preset

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"

# Paper Table II, millions of parameters
PAPER_PARAMS = {
    "teacher-isic2018": 81.6, "student5-isic2018": 39.9, "student4-isic2018": 19.9, "student-isic2018": 9.3,
    "teacher-ham10000": 40.3, "student5-ham10000": 20.3, "student4-ham10000": 12.6, "student-ham10000": 8.5,
}


def measure(name: str, device: str) -> dict:
    p = preset(name)
    s = p.image_size
    flops, shape = flops_per_call(name, device)
    assert tuple(shape) == (1, 1, s, s)
    with torch.device("meta"):  # counting needs shapes only
        params = count_params(build(name))
    return {
        "preset": name,
        "role": p.role,
        "teacher": p.teacher,
        "params": params,
        "params_m": round(params / 1e6, 3),
        "paper_params_m": PAPER_PARAMS.get(name),
        "gflop_per_call": round(flops / 1e9, 3),
        "image_size": s,
        "stages": p.stages,
        "prediction_type": p.prediction_type,
        "dim_x": p.dim_x,
        "dim_g": p.dim_g,
        "dim_x_mults": list(p.dim_x_mults),
        "dim_g_mults": list(p.dim_g_mults),
        "groups": p.groups,
        "attention": f"{p.heads}x{p.dim_head}",
        "blocks": p.blocks,
    }


def markdown(rows: list[dict]) -> str:
    head = "| preset | params (M) | paper (M) | GFLOP / call | image | stages | blocks | prediction | teacher |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        paper = f"{r['paper_params_m']}" if r["paper_params_m"] is not None else "-"
        lines.append(
            f"| {r['preset']} | {r['params_m']:.2f} | {paper} | {r['gflop_per_call']:.2f} | "
            f"{r['image_size']}x{r['image_size']} | {r['stages']} | {r['blocks']} | {r['prediction_type']} | "
            f"{r['teacher'] or '-'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="meta", choices=["meta", "cpu", "cuda"],
                    help="where to run the counted forward pass (counts are identical)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    rows = [measure(n, args.device) for n in list_presets()]
    md = markdown(rows)
    note = (
        "GFLOP per forward call, batch 1, at the preset's image size, from "
        "torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add). "
        "A sampler run costs K calls (DDIM) or 250 (DDPM) times the ensemble size.\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "presets.md").write_text("# Model presets: parameters and compute\n\n" + md + "\n" + note)
    (args.out / "presets.json").write_text(json.dumps({
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "flop_counter": "torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add)",
        "device": args.device,
        "batch": 1,
        "presets": rows,
    }, indent=2) + "\n")
    print(md)
    print(note)
    print(f"wrote {args.out / 'presets.json'} and {args.out / 'presets.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
