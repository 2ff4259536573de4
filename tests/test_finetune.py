"""Fine-tuning the shipped models on a user's folder (edgeseg.finetune): the defaults, the small-split
batch rule, the plan line, and a tiny run end to end through the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from data_fixtures import write_pair
from micro import micro_environment
from edgeseg.cli.main import app
from edgeseg.errors import SettingsError

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def micro_env(tmp_path_factory):
    yield from micro_environment(tmp_path_factory.getbasetemp())


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_a_folder_without_a_gpu_starts_from_the_default_model_and_its_teacher(monkeypatch):
    from edgeseg import defaults
    from edgeseg.finetune import FINETUNE_LR_SCALE, finetune_recipe, start_models, use_shipped_start

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert use_shipped_start("folder", None, None, None, None)
    start = start_models()
    named = (start["teacher"].preset, start["student"].preset)
    assert use_shipped_start("folder", None, None, *named)  # a resumed run names them
    assert not use_shipped_start("folder", None, None, "teacher-isic2018", None)  # scratch: one choice away
    assert not use_shipped_start("folder", None, "t.safetensors", None, None)
    assert not use_shipped_start("folder", False, None, None, None)
    assert not use_shipped_start("isic2018", None, None, None, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not use_shipped_start("folder", None, None, None, None)  # paper scale is feasible on a GPU
    assert use_shipped_start("folder", True, None, None, None)

    start = start_models()
    assert start["student"].name == defaults.DEFAULT_MODEL
    assert start["teacher"].name == defaults.DEFAULT_MODEL.replace("student", "teacher")
    monkeypatch.setattr(defaults, "DEFAULT_MODEL", "tiny-student-synthetic")  # switching the default ...
    start = start_models()
    assert (start["teacher"].name, start["teacher"].preset) == ("tiny-teacher-synthetic", "tiny-teacher")
    cfg = finetune_recipe(start["student"], "folder", "/data")  # ... switches the start and its recipe
    assert Path(cfg.init_from).name == "tiny-student-synthetic.safetensors" and not cfg.init_from_teacher
    assert cfg.lr == pytest.approx(start["student"].train_config["lr"] * FINETUNE_LR_SCALE)
    assert cfg.kd == start["student"].train_config["kd"] and (cfg.dataset, cfg.data_dir) == ("folder", "/data")


def test_a_split_smaller_than_a_batch_adapts_the_batch_or_names_what_to_pass():
    from edgeseg.finetune import fit_batch
    from edgeseg.train import TrainConfig

    cfg = TrainConfig(role="teacher", batch_size=16)
    small, note = fit_batch(cfg, {}, 14, "folder")
    assert small.batch_size == 14 and "batch 14" in note and "16" in note
    same, note = fit_batch(cfg, {}, 40, "folder")
    assert same.batch_size == 16 and note is None
    with pytest.raises(SettingsError, match="14 images, fewer than one batch of 16; pass --batch-size 14 or less"):
        fit_batch(cfg, {"batch_size": 16}, 14, "folder")


def _own_folder(root: Path) -> Path:
    """Ten photos of mixed sizes and formats, masks named each way the layout allows, split files."""
    names = []
    for i in range(10):
        name = f"photo{i}"
        ext = ".jpg" if i % 2 else ".png"
        suffix = ("", "_mask", "_segmentation")[i % 3]
        write_pair(root / "images" / f"{name}{ext}", root / "masks" / f"{name}{suffix}.png", i, w=40 + 7 * i, h=30 + 5 * i)
        names.append(name)
    (root / "train.txt").write_text("\n".join(names[:6]) + "\n")
    (root / "val.txt").write_text("\n".join(names[6:8]) + "\n")
    (root / "test.txt").write_text("\n".join(names[8:]) + "\n")
    return root


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    folder = _own_folder(root / "folder")
    r = invoke("distill", "--dataset", "folder", "--data-dir", folder, "--from-shipped", "--minutes", 1,
               "--max-steps", 1, "--teacher-set", "max_steps=1", "--runs-dir", root / "runs", "--run-name", "ft")
    return r, root / "runs" / "ft", folder


def test_folder_run_plans_first_and_reports_shipped_and_fine_tuned_side_by_side(finetune_run):
    from edgeseg.finetune import start_models

    r, run, _ = finetune_run
    assert r.exit_code == 0, (r.output, r.exception)
    out = " ".join(r.output.split())  # rich folds long lines
    start = start_models()
    assert out.startswith("plan: start from the shipped"), out[:200]
    for needle in (start["teacher"].name, start["student"].name, "images train 6 / val 2 / test 2",
                   f"teacher {start['teacher'].preset}: ~", f"student {start['student'].preset}: ~", "steps of batch 6",
                   "evaluation of 3 models on 2 test images", "of a 1-min budget", "teacher batch 6 (the train split"):
        assert needle in out, (needle, out[:800])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["plan"].startswith("plan: start from the shipped")
    shipped, tuned = metrics["shipped_student"], metrics["student"]
    assert shipped["n_images"] == tuned["n_images"] == 2 and shipped["preset"] == tuned["preset"] == start["student"].preset
    ft = metrics["finetune"]
    assert ft["test_dsc_gain"] == pytest.approx(tuned["dsc"] - shipped["dsc"])
    for role in ("teacher", "student"):
        assert ft[role]["start"] == start[role].name and ft[role]["kept"] in ("fine-tuned", "shipped")
        trained = run / (f"{role}-finetuned.json" if ft[role]["kept"] == "shipped" else f"{role}.json")
        cfg = json.loads(trained.read_text())["train_config"]
        assert cfg["batch_size"] == 6 and Path(cfg["init_from"]) == start[role].path and cfg["max_seconds"] > 0
        if ft[role]["kept"] == "shipped":
            assert ft[role]["val_dsc_shipped"] >= ft[role]["val_dsc_finetuned"]
            assert json.loads((run / f"{role}.json").read_text())["source"] == start[role].name


def test_the_folder_run_evaluates_and_segments_like_any_run(finetune_run):
    r, run, folder = finetune_run
    assert r.exit_code == 0
    e = invoke("evaluate", "--checkpoint", run, "--max-images", 2, "--ensemble", 1)
    assert e.exit_code == 0, (e.output, e.exception)
    assert list(run.glob("eval-student-test-*.json"))
    s = invoke("segment", folder / "images" / "photo1.jpg", "--checkpoint", run, "--out", run / "seg")
    assert s.exit_code == 0, (s.output, s.exception)
    from edgeseg.checkpoint import load_preset
    from edgeseg.runs import training_dataset

    _, meta = load_preset(run / "student.safetensors")  # export calibrates on the user's folder
    dataset, data_dir, _ = training_dataset(meta, None, None)
    assert dataset == "folder" and Path(data_dir).resolve() == folder.resolve()


def test_an_explicit_batch_too_large_for_the_folder_is_one_line_and_writes_nothing(tmp_path):
    folder = _own_folder(tmp_path / "folder")
    r = invoke("distill", "--dataset", "folder", "--data-dir", folder, "--from-shipped", "--batch-size", 16,
               "--runs-dir", tmp_path / "runs")
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.stderr.strip() == ("error: the folder train split has 6 images, fewer than one batch of 16; pass "
                                "--batch-size 6 or less (or leave it out: the batch then adapts to the split)")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    r = invoke("distill", "--dataset", "folder", "--data-dir", folder, "--minutes", 0, "--runs-dir", tmp_path / "runs")
    assert r.exit_code == 2 and r.stderr.strip() == "error: --minutes must be a number > 0, got 0.0"


def test_plan_steps_follow_max_seconds_and_a_resumed_run():
    """The plan's step count: max_seconds (counted over resumes, as the trainer does) caps the epochs,
    and a resumed run's steps and seconds are already behind it."""
    from edgeseg.config import TrainConfig
    from edgeseg.finetune import _steps

    cfg = TrainConfig(preset="tiny-student", epochs=100, batch_size=16)
    assert _steps(cfg, 2000, 2.0, None, (0, 0.0)) == 12500
    assert _steps(cfg, 2000, 2.0, 7200.0, (0, 0.0)) == 3600
    assert _steps(cfg, 2000, 2.0, 7200.0, (375, 2000.0)) == 2600
    assert _steps(cfg, 2000, 2.0, None, (12400, 0.0)) == 100
    assert _steps(cfg, 2000, 2.0, 1800.0, (375, 2000.0)) == 0
