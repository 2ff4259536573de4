"""bench/fps.py --quick (schema of the JSON, the Markdown table, the PNG) and the Android dry run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    import torch

    from edgeseg.checkpoint import save_model
    from edgeseg.models import build

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "student.safetensors"
    save_model(build("tiny-student"), path)
    return path


def test_fps_quick_writes_json_md_png(tmp_path, tiny_checkpoint):
    out = tmp_path / "res"
    cmd = [sys.executable, str(REPO / "bench" / "fps.py"), "--quick", "--out", str(out), "--threads", "1",
           "--checkpoint", str(tiny_checkpoint), "--no-sweep", "--dice-images", "2", "--repeats", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "estimated" in r.stdout
    doc = json.loads((out / "mobile-cpu.json").read_text())
    assert doc["schema"] == common.SCHEMA and doc["kind"] == "mobile-cpu" and doc["quick"] is True
    for k in ("cpu", "logical_cpus", "torch", "executorch", "threads"):
        assert k in doc["machine"]
    rows = doc["results"]
    assert {r["sampler"] for r in rows} == {"ddpm", "ddim"}
    for row in rows:
        assert set(common.ROW_KEYS) <= set(row)
        assert row["status"] == "ok"
        lat = row["latency_ms"]
        assert lat["median"] > 0 and lat["n"] == 2 and lat["iqr"] >= 0
        assert row["fps"] > 0 and row["peak_rss_mb"] > 0 and row["file_mb"] > 0
        assert row["params"] > 0 and row["gflop_per_call"] > 0
    paper = next(r for r in rows if r["sampler"] == "ddpm")
    assert paper["extrapolated"] and paper["steps"] == 250 and paper["ensemble"] == 9
    assert paper["speedup_vs_paper"] == 1.0
    few = next(r for r in rows if r["sampler"] == "ddim")
    assert few["dice"] is not None and 0 <= few["dice"] <= 1 and few["dice_images"] == 2
    assert few["speedup_vs_paper"] > 1
    md = (out / "mobile-cpu.md").read_text()
    assert "| config | params (M) | GFLOP / call |" in md and "tiny-student" in md
    assert (out / "mobile-cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fps_untrained_dice_is_null():
    rows = [common.make_row(config="x", preset="student-mobile", backend="eager", precision="fp32", sampler="ddim",
                            steps=2, ensemble=3, dice_reason="untrained", latency_ms=common.latency_stats([3.0, 5.0]))]
    md = common.markdown_table(rows)
    assert "untrained" in md and rows[0]["dice"] is None


def test_latency_stats():
    s = common.latency_stats([4.0, 1.0, 3.0, 2.0, 5.0])
    assert s["median"] == 3.0 and s["p25"] == 2.0 and s["p75"] == 4.0 and s["iqr"] == 2.0 and s["n"] == 5


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_android_dry_run(tmp_path):
    pte = tmp_path / "tiny-student-k2n3-int8.pte"
    pte.write_bytes(b"not a real program: the dry run only checks inputs")
    (tmp_path / (pte.name + ".json")).write_text(json.dumps(
        {"format": "edgeseg-mobile-export", "target": "executorch", "status": "ok", "preset": "tiny-student",
         "steps": 2, "ensemble": 3, "quantize": "int8"}))
    env = dict(os.environ, PATH="/usr/bin:/bin")  # no adb needed
    r = subprocess.run(["bash", str(REPO / "bench" / "phone" / "android.sh"), "--dry-run", str(pte)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert "adb push" in r.stdout and "adb shell" in r.stdout and "executor_runner" in r.stdout
    assert "--num_executions" in r.stdout and "--cpu_threads" in r.stdout

    (tmp_path / (pte.name + ".json")).unlink()
    r = subprocess.run(["bash", str(REPO / "bench" / "phone" / "android.sh"), "--dry-run", str(pte)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0 and "sidecar" in r.stderr
