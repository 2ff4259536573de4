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


def test_fps_plan_extrapolates_large_untrained_presets_and_uses_shipped_checkpoints(capsys):
    from bench import fps

    args = fps.parse_args(["--plan"])
    checkpoints = fps.resolve_checkpoints(args)
    plan = fps.build_plan(args, checkpoints)
    # a fresh clone: the shipped tiny teacher and student are trained checkpoints
    assert {"tiny-student", "tiny-teacher"} <= set(checkpoints)
    large = [j for j in plan if j["preset"] in ("student-isic2018", "teacher-isic2018")]
    assert large and all(j["backend"] == "eager" for j in large)
    assert all(j["sampler"] == "ddpm" or j["extrapolate"] for j in large)
    small_pte = {(j["preset"], j["precision"]) for j in plan if j["backend"] == "executorch"}
    assert {("tiny-student", "fp32"), ("tiny-student", "int8"), ("student-mobile", "int8")} <= small_pte
    measured = fps.build_plan(fps.parse_args(["--plan", "--measure-large"]), checkpoints)
    assert any(j["preset"] == "student-isic2018" and j["backend"] == "executorch" for j in measured)


def test_ablation_quick_writes_table_curve_overlays(tmp_path):
    out, work = tmp_path / "res", tmp_path / "work"
    cmd = [sys.executable, str(REPO / "bench" / "ablation.py"), "--quick", "--out", str(out), "--work", str(work),
           "--only", "teacher,no-kd,global-kd,efkd-tau0.6,efkd-tau0.9,efkd-epsilon,unet", "--jobs", "2"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "ablation.json").read_text())
    assert doc["quick"] is True and doc["budget"]["seeds"] == 2
    agg = doc["aggregate"]
    assert set(agg) == {"teacher", "no-kd", "global-kd", "efkd-tau0.6", "efkd-tau0.9", "efkd-epsilon", "unet"}
    for name, a in agg.items():
        assert a["seeds"] == [0, 1], name
        for m in ("dsc", "iou", "hd95", "bf", "se", "sp", "acc"):
            assert a["metrics"][m]["n"] == 2 and a["metrics"][m]["std"] >= 0, (name, m)
        assert 0 <= a["metrics"]["dsc"]["mean"] <= 1
    # the seeds really differ (different init/data order/noise), the teacher's only in eval noise
    runs = {(r["variant"], r["seed"]): r for r in doc["runs"]}
    assert runs[("efkd-tau0.6", 0)]["metrics"] != runs[("efkd-tau0.6", 1)]["metrics"]
    # prediction-type variants: K sweep and the paper protocol (seed 0 only)
    for name in ("efkd-tau0.6", "efkd-epsilon"):
        assert set(agg[name]["by_steps"]) == {"1", "2"} and agg[name]["paper_protocol"]["dsc"]["n"] == 1
    assert doc["cost"]["unet"]["params"] < 200_000
    assert doc["cost"]["student"]["params"] < doc["cost"]["teacher"]["params"]
    md = (out / "ablation.md").read_text()
    for text in ("Objective (Table I style)", "EFKD tau sweep", "Prediction type", "U-Net", "±"):
        assert text in md, text
    for png in ("ablation-tau.png", "ablation-overlays.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run reuses every finished run (resumable) and reproduces the table
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r2.returncode == 0 and "14 already done" in r2.stdout.replace("\n", " ")
    assert json.loads((out / "ablation.json").read_text())["aggregate"] == agg


def test_ablation_unknown_variant_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "bench" / "ablation.py"), "--quick", "--only", "efkd-tau7",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown variants" in r.stdout and "Traceback" not in r.stderr
