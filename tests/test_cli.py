"""The `edgeseg` CLI: user errors (one line, exit 2), --help, and a tiny end-to-end main job."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgeseg.checkpoint import save_model
from edgeseg.cli.main import app
from edgeseg.models import DermoSegDiff, Preset
from micro import MICRO_STUDENT, MICRO_TEACHER, micro_presets

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("micro_env")


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(r, *needles: str) -> str:
    """Exit code 2, one `error: ...` line on stderr, no traceback; returns the line."""
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in r.output
    for n in needles:
        assert n in err, (n, err)
    return err


# ----------------------------------------------------------------------------------------
# user errors
# ----------------------------------------------------------------------------------------
def test_help_lists_the_commands():
    r = invoke("--help")
    assert r.exit_code == 0, r.output
    for cmd in ("distill", "train-teacher", "evaluate", "segment", "data"):
        assert cmd in r.output, cmd
    r = invoke("distill", "--help")
    assert r.exit_code == 0 and "--kd" in r.output and "--resume" in r.output


def test_unknown_preset(tmp_path):
    err = assert_user_error(invoke("distill", "--student-preset", "nope", "--runs-dir", tmp_path / "runs"),
                            "unknown preset 'nope'", "tiny-student", "student-isic2018")
    assert "known presets" in err
    assert_user_error(invoke("distill", "--teacher-preset", "nope", "--runs-dir", tmp_path / "runs"), "'nope'")
    assert_user_error(invoke("train-teacher", "--preset", "nope", "--runs-dir", tmp_path / "runs"), "'nope'")
    assert not (tmp_path / "runs").exists()


def test_unknown_preset_real_process(tmp_path):
    """The installed entry point: exit 2 and exactly one stderr line, no traceback."""
    exe = Path(sys.executable).parent / "edgeseg"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgeseg.cli.main"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([*cmd, "distill", "--student-preset", "nope", "--runs-dir", str(tmp_path / "runs")],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown preset 'nope'"), p.stderr
    assert "Traceback" not in p.stderr + p.stdout


def _save_as(preset: Preset, path: Path) -> Path:
    torch.manual_seed(0)
    return save_model(DermoSegDiff(preset), path)


def test_teacher_checkpoint_of_another_preset(tmp_path):
    teacher_p = micro_presets()[0]
    other = Preset.from_dict({**teacher_p.to_dict(), "name": "micro-other"})
    ckpt = _save_as(other, tmp_path / "other.safetensors")
    assert_user_error(invoke("distill", "--student-preset", MICRO_STUDENT, "--teacher", ckpt,
                             "--runs-dir", tmp_path / "runs"),
                      str(ckpt), "'micro-other'", f"'{MICRO_TEACHER}'")


def test_teacher_checkpoint_weights_do_not_match_its_preset(tmp_path):
    """Weights of the (smaller) student under a JSON that claims the teacher preset."""
    teacher_p, student_p = micro_presets()
    ckpt = _save_as(student_p, tmp_path / "fake.safetensors")
    (tmp_path / "fake.json").write_text(json.dumps({"preset": teacher_p.to_dict()}))
    assert_user_error(invoke("distill", "--student-preset", MICRO_STUDENT, "--teacher", ckpt,
                             "--runs-dir", tmp_path / "runs"),
                      "do not match", f"'{MICRO_TEACHER}'")


def test_teacher_checkpoint_missing(tmp_path):
    assert_user_error(invoke("distill", "--student-preset", MICRO_STUDENT, "--teacher", tmp_path / "none.safetensors",
                             "--runs-dir", tmp_path / "runs"), "not found")


@pytest.mark.parametrize("dataset,layout", [("isic2018", "ISIC2018_Task1-2_Training_Input"),
                                            ("ham10000", "HAM10000_images_part_1"),
                                            ("folder", "images/")])
def test_missing_dataset_folder(tmp_path, dataset, layout):
    err = assert_user_error(invoke("distill", "--dataset", dataset, "--data-dir", "/nonexistent",
                                   "--runs-dir", tmp_path / "runs"), "/nonexistent", layout)
    assert "does not exist" in err
    assert not (tmp_path / "runs").exists(), "no run folder is left behind"


def test_dataset_needs_data_dir(tmp_path):
    assert_user_error(invoke("distill", "--dataset", "isic2018", "--runs-dir", tmp_path / "runs"), "--data-dir")
    assert_user_error(invoke("distill", "--dataset", "nope", "--runs-dir", tmp_path / "runs"), "unknown dataset")


def test_existing_run_folder_needs_resume(tmp_path):
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    assert_user_error(invoke("distill", "--run-name", "r1", "--runs-dir", tmp_path / "runs"), "exists", "--resume")
    assert_user_error(invoke("train-teacher", "--run-name", "r1", "--runs-dir", tmp_path / "runs"), "--resume")
    assert_user_error(invoke("distill", "--run-name", "r2", "--resume", "--runs-dir", tmp_path / "runs"),
                      "does not exist")


def test_unknown_setting_is_reported_before_any_training(tmp_path, monkeypatch):
    import edgeseg.pipeline

    def no_training(*a, **k):
        raise AssertionError("training started before the settings were validated")

    monkeypatch.setattr(edgeseg.pipeline, "_train", no_training)
    assert_user_error(invoke("distill", "--set", "learning_rate=1", "--student-preset", MICRO_STUDENT,
                             "--teacher-preset", MICRO_TEACHER, "--runs-dir", tmp_path / "runs"),
                      "unknown training settings")


def test_bad_settings(tmp_path):
    assert_user_error(invoke("distill", "--set", "oops", "--runs-dir", tmp_path / "runs"), "name=value")
    assert_user_error(invoke("distill", "--config", tmp_path / "missing.toml", "--runs-dir", tmp_path / "runs"),
                      "not found")


def test_without_runs_the_shipped_real_lesion_student_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(invoke("evaluate", "--checkpoint", tmp_path / "x.safetensors"), "not found")
    assert_user_error(invoke("segment", tmp_path / "img.png"), "img.png", "no such image file")
    r = invoke("evaluate", "--dataset", "synthetic", "--max-images", "2")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "evaluations" / "eval-tiny-student-128-isic2017-test-ddim1x3.json").read_text())
    assert report["checkpoint"].endswith("tiny-student-128-isic2017.safetensors") and report["n_images"] == 2


# ----------------------------------------------------------------------------------------
# a tiny main job end to end, then `edgeseg evaluate` on the newest run
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    from edgeseg.pipeline import DistillJob, run_distill

    root = tmp_path_factory.mktemp("main-job")
    small = dict(max_steps=2, num_workers=0, val_max_batches=1, batch_size=8)
    job = DistillJob(dataset="synthetic", teacher_preset=MICRO_TEACHER, student_preset=MICRO_STUDENT,
                     runs_dir=str(root / "runs"), run_name="micro", overrides=small, teacher_overrides=small,
                     eval_images=8, val_dsc_images=4, quiet=True)
    metrics = run_distill(job)
    return root, root / "runs" / "micro", metrics


def test_synthetic_at_32px_loads():
    from edgeseg.data import load_dataset

    for split in ("train", "val", "test"):
        ds = load_dataset("synthetic", split, size=32)
        image, mask, d = ds[0]
        assert image.shape == (3, 32, 32) and mask.shape == d.shape == (1, 32, 32)
        assert set(mask.unique().tolist()) <= {-1.0, 1.0} and 0 <= float(d.min()) <= float(d.max()) <= 1


def test_run_distill_writes_the_run_folder(distill_run):
    _, run, metrics = distill_run
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for role, name in (("teacher", MICRO_TEACHER), ("student", MICRO_STUDENT)):
        m = on_disk[role]
        assert m["preset"] == name and m["params"] > 0 and 0.0 <= m["dsc"] <= 1.0 and m["n_images"] == 8
        assert (run / f"{role}.safetensors").is_file() and (run / f"{role}.json").is_file()
        assert (run / "overlays" / f"{role}.png").stat().st_size > 0
        assert (run / "state" / role / "state.json").is_file()
    assert on_disk["teacher"]["params"] > on_disk["student"]["params"]
    assert on_disk["kd"]["type"] == "efkd" and on_disk["dataset"] == "synthetic"
    assert on_disk["seconds"]["teacher_training"] is not None
    from edgeseg.checkpoint import load_model

    assert load_model(run / "student.safetensors").preset.name == MICRO_STUDENT
    student_meta = json.loads((run / "student.json").read_text())
    assert student_meta["steps"] == 2 and student_meta["train_config"]["kd"] == "efkd"


def test_evaluate_defaults_to_the_newest_run(distill_run, monkeypatch):
    root, run, _ = distill_run
    monkeypatch.chdir(root)  # evaluate looks under ./runs
    from edgeseg.checkpoint import load_model
    from edgeseg.defaults import sampler_defaults

    r = invoke("evaluate", "--max-images", "4", "--ensemble", "2")
    assert r.exit_code == 0, (r.output, r.exception)
    k, _ = sampler_defaults(load_model(run / "student.safetensors").preset.prediction_type)  # the defaults table
    report = run / f"eval-student-test-ddim{k}x2.json"
    assert report.is_file(), sorted(p.name for p in run.iterdir())
    rep = json.loads(report.read_text())
    assert rep["n_images"] == 4 and 0.0 <= rep["dsc"] <= 1.0 and Path(rep["checkpoint"]).name == "student.safetensors"
    assert (run / "overlays" / f"student-test-ddim{k}x2.png").is_file()
    r = invoke("evaluate", "--checkpoint", run, "--which", "teacher", "--max-images", "2", "--ensemble", "1",
               "--steps", "1")
    assert r.exit_code == 0, (r.output, r.exception)
    assert (run / "eval-teacher-test-ddim1x1.json").is_file()


def test_distill_resume_of_a_finished_run_reuses_it(distill_run):
    """resume=True on a finished run loads both trained models instead of training again."""
    from dataclasses import replace

    from edgeseg.pipeline import DistillJob, run_distill

    root, run, _ = distill_run
    before = {role: (run / f"{role}.safetensors").read_bytes() for role in ("teacher", "student")}
    small = dict(max_steps=2, num_workers=0, val_max_batches=1, batch_size=8)
    job = DistillJob(dataset="synthetic", teacher_preset=MICRO_TEACHER, student_preset=MICRO_STUDENT,
                     runs_dir=str(root / "runs"), run_name="micro", overrides=small, teacher_overrides=small,
                     eval_images=2, val_dsc_images=0, quiet=True, resume=True)
    metrics = run_distill(job)
    assert metrics["student"]["n_images"] == 2
    for role, data in before.items():
        assert (run / f"{role}.safetensors").read_bytes() == data, role
    assert metrics["seconds"]["student_training"] < 5
    with pytest.raises(Exception, match="exists"):
        run_distill(replace(job, resume=False))


def test_distill_resume_keeps_the_given_teacher(distill_run, tmp_path):
    """A run distilled from --teacher resumes from the run's copy of it: it does not train a new teacher."""
    from dataclasses import replace

    from edgeseg.pipeline import DistillJob, run_distill

    _, micro, _ = distill_run
    small = dict(max_steps=2, num_workers=0, val_max_batches=1, batch_size=8, lr_schedule="cosine")
    job = DistillJob(dataset="synthetic", teacher=str(micro / "teacher.safetensors"), teacher_preset=MICRO_TEACHER,
                     student_preset=MICRO_STUDENT, runs_dir=str(tmp_path / "runs"), run_name="given", overrides=small,
                     eval_images=2, val_dsc_images=0, quiet=True)
    run_distill(job)
    run = tmp_path / "runs" / "given"
    copied = (run / "teacher.safetensors").read_bytes()
    metrics = run_distill(replace(job, teacher=None, resume=True, overrides={**small, "max_steps": 4}))
    assert (run / "teacher.safetensors").read_bytes() == copied and not (run / "state" / "teacher").exists()
    assert metrics["seconds"]["teacher_training"] is None
    assert json.loads((run / "student.json").read_text())["steps"] == 4
    assert "~2 steps" in metrics["plan"] and "resumed at step 2" in metrics["plan"], metrics["plan"]
    assert "student's cosine schedule is stretched to its new limits (max_steps 2 -> 4)" in metrics["plan"]


def test_train_teacher_ships_the_best_epoch_and_keeps_the_final_weights(tmp_path, monkeypatch):
    """When an earlier epoch validated better than the final weights, <role>.safetensors is that
    epoch's and <role>-final.safetensors keeps the final ones (a longer run stays inspectable)."""
    import edgeseg.pipeline as pipeline
    from edgeseg.checkpoint import load_model

    scores = iter([0.9, 0.1, 0.1])  # epoch 1 validates best, epoch 2 (the final weights) worse
    monkeypatch.setattr(pipeline, "_val_dsc", lambda *a, **k: next(scores))
    small = dict(epochs=2, num_workers=0, val_max_batches=1, batch_size=64)
    job = pipeline.DistillJob(dataset="synthetic", teacher_preset=MICRO_TEACHER, runs_dir=str(tmp_path),
                              run_name="t", teacher_overrides=small, val_dsc_images=4, quiet=True)
    run = pipeline.run_train_teacher(job)
    shipped, final, best = (load_model(run / f"teacher{s}.safetensors").state_dict() for s in ("", "-final", "-best"))
    assert all(torch.equal(shipped[k], best[k]) for k in best)
    assert any(not torch.equal(shipped[k], final[k]) for k in final)
    meta = json.loads((run / "teacher.json").read_text())
    assert meta["selected"]["epoch"] == 1 and meta["selected"]["val_dsc"] == 0.9
    assert "earlier epoch" in json.loads((run / "teacher-final.json").read_text())["note"]
