"""How hard is the built-in synthetic dermoscopy set?

Builds the set from scratch (timed), then measures on its test split:
  * Otsu's threshold on CIELAB lightness (lesion = darker side), mean Dice;
  * a small discriminative U-Net (edgeseg.baselines.SmallUNet, ~0.12 M params) trained with
    Dice + BCE on 2 CPU threads for a fixed number of steps (default 1100 = about 4 minutes
    on an idle 2-core machine; use --minutes for a wall-clock budget instead).
Writes bench/results/synthetic-difficulty.json.

    python bench/synthetic_difficulty.py [--steps 1100 | --minutes 4] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1100)
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "synthetic-difficulty.json"))
    args = ap.parse_args()

    import torch

    from edgeseg.baselines import eval_dice, otsu_dice, train_unet
    from edgeseg.data import load_dataset
    from edgeseg.data.synthetic import SPLITS

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EDGESEG_CACHE"] = tmp  # fresh cache: time a full build
        t0 = time.perf_counter()
        ds = {s: load_dataset("synthetic", s, seed=args.seed) for s in SPLITS}
        build_s = time.perf_counter() - t0
        print(f"built {sum(len(d) for d in ds.values())} images in {build_s:.1f}s", flush=True)
        otsu = otsu_dice(ds["test"])
        print(f"Otsu (CIELAB L) test Dice: {otsu:.4f}", flush=True)
        model, info = train_unet(ds["train"], None, minutes=args.minutes,
                                 steps=None if args.minutes else args.steps, seed=args.seed,
                                 threads=args.threads,
                                 log=lambda s: print(s, flush=True))
        unet_test = eval_dice(model, ds["test"])
        unet_val = eval_dice(model, ds["val"])
    print(f"SmallUNet ({info['params']} params, {info['steps']} steps, "
          f"{info['train_seconds']:.0f}s): test Dice {unet_test:.4f}", flush=True)
    res = {
        "splits": dict(SPLITS), "seed": args.seed, "build_seconds": round(build_s, 2),
        "otsu_lightness_test_dice": round(otsu, 4),
        "small_unet": {"params": info["params"], "steps": info["steps"],
                       "batch_size": info["batch_size"], "threads": args.threads,
                       "train_seconds": round(info["train_seconds"], 1),
                       "test_dice": round(unet_test, 4), "val_dice": round(unet_val, 4)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
