"""bench/gpu.sh --dry-run: the GPU run's code paths on CPU (Triton interpreter, tiny sizes), and
the packed ISIC array the device run can carry (bench/gpu_bench.py pack)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import gpu_bench  # noqa: E402

ISIC2017 = REPO.parent / "shared" / "data" / "isic2017"


def test_dry_run_every_part_ok(tmp_path):
    out = tmp_path / "gpu"
    env = {k: v for k, v in os.environ.items()
           if k not in ("ISIC2017_DIR", "TRITON_INTERPRET", "EDGESEG_TEST_DEVICE", "OMP_NUM_THREADS")}
    # an absent packed array: the synthetic fallback, whatever bench/cache/ holds on this machine
    env.update(OUT=str(out), PYTHON=sys.executable, ISIC2017_CACHE=str(tmp_path / "absent.npz"))
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "synthetic set: no ISIC 2017 data given" in r.stdout
    assert "## Targets (issue 17)" in r.stdout  # the summary is printed at the end

    summary = json.loads((out / "summary.json").read_text())
    keys = {"kind", "dry_run", "device", "torch", "triton", "total_wall_s", "parts", "targets", "headline"}
    assert keys <= set(summary)
    assert summary["dry_run"] is True and summary["total_wall_s"] > 0
    assert [p["part"] for p in summary["parts"]] == list(gpu_bench.PARTS)
    assert all(p["status"] == "ok" for p in summary["parts"]), summary["parts"]
    assert len(summary["targets"]) == 5 and all(t["met"] is None for t in summary["targets"])  # not a measurement
    md = (out / "summary.md").read_text()
    assert "DRY RUN" in md and "## Summary" in md and "| part | status |" in md

    docs = {p: json.loads((out / f"{p}.json").read_text()) for p in gpu_bench.PARTS}
    for name, doc in docs.items():
        assert doc["status"] == "ok" and doc["dry_run"] is True and doc["error"] is None, (name, doc.get("error"))
        assert doc["rows"] and all(row["status"] == "ok" for row in doc["rows"]), name
        assert doc["rc"] == 0 and doc["wall_s"] > 0 and doc["limit_s"] > 0
        assert (out / f"{name}.md").read_text().startswith(f"## {name}: ok")
        assert (out / "logs" / f"{name}.log").is_file()

    assert docs["env"]["env"]["edgeseg.kernels"] == "imports"
    counts = docs["kernel_tests"]["counts"]
    assert counts["failed"] == 0 and counts["passed"] >= 30
    kernels = docs["kernels"]["rows"]
    assert {(k["dtype"], k["method"], k["mode"]) for k in kernels} == {
        (d, m, p) for d in ("fp32", "bf16") for m in ("fused", "eager") for p in ("fwd", "fwd+bwd")}
    assert (out / "kernels-fp32-smoke.json").is_file() and (out / "kernels-bf16-smoke.md").is_file()

    train = docs["train"]["rows"]
    assert {(t["precision"], t["config"]) for t in train} == {
        (p, c) for p in ("bf16", "fp32") for c in ("project", "authors", "eager-loss")}
    for t in train:
        assert t["steps"] == 2 and t["batch"] == 4 and t["steps_per_s"] > 0
        assert (t["maps_ms"] is not None) == (t["config"] == "authors")
        assert t["speedup_vs_authors"] > 0
    sample = docs["sample"]["rows"]
    settings = {s["setting"] for s in sample}
    assert {"paper: DDPM 250 steps x 9", "shipped: DDIM 1 steps x 3"} <= settings  # shipped = the defaults table
    assert all(s["images"] == 4 and s["images_per_s"] > 0 for s in sample)
    paper = next(s for s in sample if s["setting"].startswith("paper"))
    assert paper["extrapolated"] and paper["steps_run"].startswith("2 of 250")


def test_pack_and_read_back(tmp_path, monkeypatch):
    npz = tmp_path / "pack.npz"
    assert gpu_bench.main(["pack", "--dataset", "synthetic", "--size", "32", "-n", "6", "--out", str(npz)]) == 0
    monkeypatch.delenv("ISIC2017_DIR", raising=False)
    monkeypatch.setenv("ISIC2017_CACHE", str(npz))
    args = argparse.Namespace(data_dir=None, cache=None)
    assert gpu_bench.data_source(args) == ("cache", str(npz))
    ds = gpu_bench.load_images(args, 16, augment=False)  # resized on load
    image, mask, dist = ds[0]
    assert len(ds) == 6 and image.shape == (3, 16, 16) and mask.shape == dist.shape == (1, 16, 16)
    assert set(mask.unique().tolist()) <= {-1.0, 1.0}

    from edgeseg.data import DATASETS

    if ISIC2017.is_dir() and "isic2017" in DATASETS:  # the real copy beside the checkout, when present
        real = tmp_path / "isic.npz"
        assert gpu_bench.main(["pack", "--data-dir", str(ISIC2017), "--size", "64", "-n", "4", "--out", str(real)]) == 0
        monkeypatch.setenv("ISIC2017_CACHE", str(real))
        ds = gpu_bench.load_images(args, 64, augment=False)
        assert len(ds) == 4 and ds.names[0].startswith("ISIC_")
