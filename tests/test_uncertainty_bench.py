"""bench/uncertainty.py: its scores on constructed cases, the default rule, and one small end-to-end run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import uncertainty as ub  # noqa: E402


def test_calibration_ece_and_auroc_on_known_cases():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=200_000)
    y = rng.uniform(size=p.size) < p  # calibrated by construction
    assert ub.calibration(p, y)["ece"] < 0.01
    assert ub.calibration(np.full(1000, 0.9), np.zeros(1000, bool))["ece"] == pytest.approx(0.9)
    err = np.zeros(100, bool)
    err[:10] = True
    assert ub.pixel_auroc(err.astype(float) + 0.1, err) == 1.0
    assert ub.pixel_auroc(1.0 - err, err) == 0.0
    assert np.isnan(ub.pixel_auroc(np.ones(5), np.zeros(5, bool)))


def test_score_setting_uses_the_first_n_members():
    truth = torch.zeros(2, 8, 8, dtype=torch.bool)
    truth[:, 2:6, 2:6] = True
    x0 = torch.where(truth[:, None], 1.0, -1.0).repeat(1, 9, 1, 1)
    x0[:, 3:] = -1.0  # members 4..9 miss the lesion entirely
    r1, r3, r9 = (ub.score_setting(x0, truth, n) for n in (1, 3, 9))
    assert r1["dice"] == r3["dice"] == 1.0 and r9["dice"] == 0.0
    assert set(r1["maps"]) == {"margin"} and set(r9["maps"]) == {"margin", "spread", "combined"}
    assert r9["maps"]["spread"]["auroc"] == 1.0  # the members disagree exactly on the missed lesion


def test_default_rule_takes_the_cheapest_near_best():
    rows = [{"dice": 0.80, "auroc": 0.90, "ms": 100}, {"dice": 0.798, "auroc": 0.895, "ms": 30},
            {"dice": 0.70, "auroc": 0.905, "ms": 10}]
    assert ub.choose_default(rows)["ms"] == 30
    assert ub.settings() == [(1, 0.0), (2, 0.0), (4, 0.0), (2, 1.0), (4, 1.0)]
    assert ub.settings((1, 2)) == [(1, 0.0), (2, 0.0), (2, 1.0)]  # --steps 1,2


def test_end_to_end_small(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "uncertainty.py"), "--dataset", "synthetic", "--max-images", "2",
           "--threads", "1", "--timing-repeats", "1", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["settings"]) == 15 and res["n_images"] == 2
    assert {"steps", "ensemble", "eta", "map"} <= set(res["default"])
    assert (tmp_path / "reliability.png").stat().st_size > 0 and (tmp_path / "tradeoff.png").stat().st_size > 0
    assert "| K | N | eta | map |" in (tmp_path / "table.md").read_text()
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 5


def test_default_results_folders_keep_the_64px_test_records_and_name_the_rest():
    from bench.common import results_name

    assert results_name("isic2017", 64) == "isic2017" and results_name("synthetic", 64) == "synthetic"
    assert results_name("isic2017", 128) == "isic2017-128"
    assert results_name("isic2017", 128, "val") == "isic2017-128-val"
