"""The fine-tuning benchmark (docs/finetune.md): a user's folder made from ISIC 2017 photos the
shipped models never saw, and the result of `edgeseg distill --dataset folder` on it.

    python bench/finetune_folder.py make ISIC2017_DIR OUT        # OUT/images, OUT/masks, train/val/test.txt
    edgeseg distill --dataset folder --data-dir OUT --minutes 10 --run-name finetune-isic2017-test
    python bench/finetune_folder.py record runs/finetune-isic2017-test bench/results/finetune/isic2017-test-10min.json

`make` draws (seed 0) from the official ISIC 2017 *test* split (the shipped models were trained
on its training split and selected on its validation split) 100 photos for train/val (80/20) and
200 others for test; nothing of the data is committed. `record` writes the run's metrics.json
with the machine and the command beside it.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, now_iso, shown_path  # noqa: E402

TEST_IMAGES, TEST_MASKS = "ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth"
SPLITS = {"train": 80, "val": 20, "test": 200}


def make_folder(isic_dir: Path, out: Path, seed: int = 0) -> dict[str, int]:
    """Copy the drawn photos and masks into the folder layout; returns images per split."""
    src_img, src_gt = isic_dir / TEST_IMAGES, isic_dir / TEST_MASKS
    ids = sorted(p.stem for p in src_img.glob("ISIC_*.jpg") if not p.stem.endswith("_superpixels"))
    need = sum(SPLITS.values())
    if len(ids) < need:
        sys.exit(f"error: {src_img}: {len(ids)} photos, the benchmark needs {need}")
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: {out}: exists and is not empty")
    drawn = random.Random(seed).sample(ids, need)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    start = 0
    for split, n in SPLITS.items():
        chosen = sorted(drawn[start:start + n])
        start += n
        for i in chosen:
            shutil.copy2(src_img / f"{i}.jpg", out / "images" / f"{i}.jpg")
            shutil.copy2(src_gt / f"{i}_segmentation.png", out / "masks" / f"{i}_segmentation.png")
        (out / f"{split}.txt").write_text("".join(f"{i}\n" for i in chosen))
    return dict(SPLITS)


def record(run: Path, out: Path, command: str) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    student = json.loads((run / "student.json").read_text())
    config = dict(student.get("train_config") or {})
    for key in ("data_dir", "init_from"):  # no machine's absolute paths in a committed result
        if config.get(key):
            config[key] = shown_path(config[key])
    result = {"generated": now_iso(), "run": run.name, "machine": machine_info(), "command": command,
              "student_train_config": config,
              "folder": "bench/finetune_folder.py make ISIC2017_DIR FOLDER (seed 0): 80 train / 20 val / "
                        "200 test photos of the ISIC 2017 test split",
              **metrics}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="make the folder from an ISIC 2017 Part 1 download")
    mk.add_argument("isic2017_dir", type=Path)
    mk.add_argument("out", type=Path)
    mk.add_argument("--seed", type=int, default=0)
    rec = sub.add_parser("record", help="write a run's metrics with the machine beside them")
    rec.add_argument("run", type=Path)
    rec.add_argument("out", type=Path)
    rec.add_argument("--command", required=True, help="the command line the run was made with")
    a = ap.parse_args()
    if a.cmd == "make":
        print(json.dumps(make_folder(a.isic2017_dir, a.out, a.seed)))
    else:
        record(a.run, a.out, a.command)


if __name__ == "__main__":
    main()
