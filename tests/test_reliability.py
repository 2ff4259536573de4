"""Issue 18, the library halves: run-folder locks, NaN after an update, resume settings, export
placement, the sidecar contract, checkpoint file modes. The CLI halves (one line, exit 2,
nothing written) are in tests/test_bad_input.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ddp_worker import MICRO_STUDENT, micro_datasets, micro_environment
from edgeseg.errors import CheckpointError, EdgesegError, ExportError, RunFolderError, SettingsError
from edgeseg.train import TrainConfig, Trainer, TrainingDiverged

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def micro_env(tmp_path_factory):
    yield from micro_environment(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def data():
    return micro_datasets(32, 8)


def cfg(**kw) -> TrainConfig:
    base = dict(role="student", preset=MICRO_STUDENT, kd="none", batch_size=8, epochs=2, lr=1e-3, num_workers=0,
                save_every_steps=0, ema_start=2, ema_beta=0.9, seed=0, plateau_patience=0)
    return TrainConfig(**{**base, **kw})


def trainer(c: TrainConfig, out: Path, data) -> Trainer:
    return Trainer(c, out, train_ds=data[0], val_ds=data[1], device=CPU, quiet=True)


# ---------------------------------------------------------------------------------------- item 1: run folder lock
def _python(code: str, cwd: Path, wait: bool = True):
    cmd = [sys.executable, "-c", code]
    if wait:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_claiming_one_new_run_folder_one_wins(tmp_path):
    code = ("import sys, time; from edgeseg.runlock import claim_run_dir\n"
            "t = float(sys.argv[1]) if len(sys.argv) > 1 else 0\n"
            "try:\n    claim_run_dir('runs/r', resume=False); print('won', flush=True); time.sleep(3)\n"
            "except Exception as e:\n    print('lost:', e, flush=True)\n")
    procs = [_python(code, tmp_path, wait=False) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(o.split(":")[0] for o in outs) == ["lost", "won"], outs
    assert "exists" in [o for o in outs if o.startswith("lost")][0]


def test_stale_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path, capsys):
    from edgeseg.runlock import LOCK_NAME, claim_run_dir, release_claims

    # a run killed with SIGKILL: its lock stays behind (no exit handlers ran)
    p = _python("import os; from edgeseg.runlock import claim_run_dir; claim_run_dir('runs/r', resume=False); "
                "print(os.getpid()); os._exit(0)", tmp_path)
    dead = int(p.stdout.strip())
    lock = tmp_path / "runs" / "r" / LOCK_NAME
    assert json.loads(lock.read_text())["pid"] == dead
    run = claim_run_dir(tmp_path / "runs" / "r", resume=True)
    err = capsys.readouterr().err
    assert "stale lock" in err and str(dead) in err
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release_claims()
    assert not lock.exists() and run.is_dir()  # the folder was not created by this claim: kept


def test_a_live_lock_is_refused_and_left_alone(tmp_path):
    from edgeseg.runlock import LOCK_NAME, claim_run_dir

    holder = _python("import time; from edgeseg.runlock import claim_run_dir; claim_run_dir('runs/r', resume=False); "
                     "print('ready', flush=True); time.sleep(60)", tmp_path, wait=False)
    try:
        assert holder.stdout.readline().strip() == "ready"
        lock = tmp_path / "runs" / "r" / LOCK_NAME
        before = lock.read_bytes()
        with pytest.raises(RunFolderError, match=f"in use by process {holder.pid}"):
            claim_run_dir(tmp_path / "runs" / "r", resume=True)
        assert lock.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


def test_release_removes_what_the_claim_created_if_still_empty(tmp_path):
    from edgeseg.runlock import claim_run_dir, claims, release_claims

    a = claim_run_dir(tmp_path / "new" / "runs" / "a", resume=False)
    b = claim_run_dir(tmp_path / "runs" / "b", resume=False)
    (b / "log.txt").write_text("written")
    assert set(claims()) >= {a, b}
    release_claims()
    assert not (tmp_path / "new").exists()  # nothing written: the folder and its new parents go
    assert (b / "log.txt").is_file() and not (b / "run.lock").exists()


def test_automatic_run_names_do_not_collide(tmp_path):
    from edgeseg.runlock import claim_run_dir, release_claims

    a = claim_run_dir(tmp_path / "synthetic-x", resume=False, unique=True)
    b = claim_run_dir(tmp_path / "synthetic-x", resume=False, unique=True)
    assert a != b and b.name == "synthetic-x-2"
    release_claims()


# ---------------------------------------------------------------------------------------- item 4: NaN after the update
def test_an_update_to_non_finite_weights_is_never_saved(tmp_path, data):
    t = trainer(cfg(), tmp_path, data)
    t.fit(stop_after_steps=2)
    state = t.state_dir / "state.json"
    assert json.loads(state.read_text())["step"] == 2
    saved = (t.state_dir / "state.safetensors").read_bytes()
    final = (tmp_path / "student.safetensors").read_bytes()  # fit() ends with the EMA weights
    for g in t.opt.param_groups:  # what --lr inf did: the loss is finite, the update is not
        g["lr"] = float("inf")
    with pytest.raises(TrainingDiverged, match="made the weights NaN or inf") as ei:
        t.fit(stop_after_steps=1)
    assert str(t.state_dir) in str(ei.value) and "\n" not in str(ei.value)
    assert json.loads(state.read_text())["step"] == 2
    assert (t.state_dir / "state.safetensors").read_bytes() == saved
    assert (tmp_path / "student.safetensors").read_bytes() == final
    again = trainer(cfg(), tmp_path, data)
    again.load_state()  # the last good checkpoint resumes
    assert again.step == 2 and not again._non_finite()


def test_save_state_refuses_non_finite_weights(tmp_path, data):
    t = trainer(cfg(), tmp_path, data)
    t.fit(stop_after_steps=1)
    before = (t.state_dir / "state.json").read_bytes()
    with torch.no_grad():
        next(t.model.parameters())[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="not saved"):
        t.save_state()
    assert (t.state_dir / "state.json").read_bytes() == before


# ---------------------------------------------------------------------------------------- item 5: resume settings
def test_resume_applies_and_records_changed_settings(tmp_path, data):
    t = trainer(cfg(), tmp_path, data)
    t.fit(stop_after_steps=4)  # one epoch
    assert t.lr == 1e-3
    t2 = trainer(cfg(lr=5e-4, epochs=3, max_steps=6), tmp_path, data)
    t2.load_state()
    assert t2.step == 4 and t2.lr == 5e-4
    assert t2.resumes[-1]["changed"] == {"lr": [1e-3, 5e-4], "epochs": [2, 3], "max_steps": [None, 6]}
    t2.fit()
    assert t2.step == 6
    state = json.loads((t2.state_dir / "state.json").read_text())
    assert state["config"]["lr"] == 5e-4 and state["resumes"][0]["step"] == 4
    final = json.loads((tmp_path / "student.json").read_text())
    assert final["train_config"]["lr"] == 5e-4 and final["resumes"][0]["changed"]["lr"] == [1e-3, 5e-4]
    log = [json.loads(line) for line in (tmp_path / "student-log.jsonl").read_text().splitlines()]
    assert [r for r in log if r.get("event") == "resume"][0]["changed"]["max_steps"] == [None, 6]


@pytest.mark.parametrize("change", [{"batch_size": 4}, {"seed": 1}, {"kd": "global"}, {"prediction_type": "v_prediction"},
                                    {"augment": False}])
def test_resume_refuses_settings_that_cannot_change(tmp_path, data, change):
    from edgeseg.models import build

    t = trainer(cfg(), tmp_path, data)
    t.fit(stop_after_steps=1)
    before = (t.state_dir / "state.json").read_bytes()
    teacher = build("micro-teacher") if change.get("kd") == "global" else None
    t2 = Trainer(cfg(**change), tmp_path, teacher=teacher, train_ds=data[0], val_ds=data[1], device=CPU, quiet=True)
    key = next(iter(change))
    with pytest.raises(SettingsError, match=f"cannot resume with changed settings \\({key} "):
        t2.load_state()
    assert (t2.state_dir / "state.json").read_bytes() == before


def test_corrupt_resume_tensors_are_one_error(tmp_path, data):
    t = trainer(cfg(), tmp_path, data)
    t.fit(stop_after_steps=1)
    st = t.state_dir / "state.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(EdgesegError, match="corrupt resume state"):
        trainer(cfg(), tmp_path, data).load_state()


# ---------------------------------------------------------------------------------------- item 8: checkpoints
def test_saved_checkpoint_carries_its_hash_and_preset_and_normal_file_modes(tmp_path):
    from safetensors import safe_open

    from edgeseg.checkpoint import atomic_write_json, file_sha256, load_model, save_model
    from edgeseg.models import build

    old = os.umask(0o022)
    try:
        w = save_model(build("tiny-student"), tmp_path / "m.safetensors")
        atomic_write_json(tmp_path / "x.json", {})
    finally:
        os.umask(old)
    for f in (w, w.with_suffix(".json"), tmp_path / "x.json"):
        assert f.stat().st_mode & 0o777 == 0o644, (f, oct(f.stat().st_mode))
    meta = json.loads(w.with_suffix(".json").read_text())
    assert meta["weights_sha256"] == file_sha256(w)
    with safe_open(str(w), "pt") as f:
        assert json.loads(f.metadata()["preset_config"]) == meta["preset"]
    load_model(w)


def test_shipped_checkpoints_load_and_a_missing_hash_is_legacy(tmp_path):
    import shutil

    from edgeseg.checkpoint import load_model
    from edgeseg.pipeline import shipped_checkpoint

    for name in ("tiny-teacher", "tiny-student"):
        path = shipped_checkpoint(name, "synthetic")
        assert load_model(path, expect_preset=name).preset.name == name
        shutil.copy(path, tmp_path / "legacy.safetensors")
        meta = json.loads(path.with_suffix(".json").read_text())
        meta.pop("weights_sha256")
        (tmp_path / "legacy.json").write_text(json.dumps(meta))
        load_model(tmp_path / "legacy.safetensors")


def test_a_renamed_checkpoint_of_another_architecture_is_not_the_expected_preset(tmp_path):
    from edgeseg.checkpoint import load_model, save_model
    from edgeseg.models import Preset, build

    p = Preset.from_dict({**build("tiny-teacher").preset.to_dict(), "heads": 4, "dim_head": 8})
    w = save_model(build(p), tmp_path / "t.safetensors")
    with pytest.raises(CheckpointError, match="dim_head, heads differ"):
        load_model(w, expect_preset="tiny-teacher")


# ---------------------------------------------------------------------------------------- item 12: export placement
def test_export_placement_never_clobbers_without_overwrite(tmp_path):
    from edgeseg.mobile.placement import place

    out = tmp_path / "x.pte"
    tmp = tmp_path / ".x.pte.1.partial"
    tmp.write_bytes(b"new")
    place(tmp, out, overwrite=False)
    assert out.read_bytes() == b"new" and not tmp.exists()
    tmp.write_bytes(b"newer")
    with pytest.raises(ExportError, match="appeared during the export"):  # someone wrote x.pte meanwhile
        place(tmp, out, overwrite=False)
    assert out.read_bytes() == b"new"
    place(tmp, out, overwrite=True)
    assert out.read_bytes() == b"newer" and not tmp.exists()


def test_export_output_checks(tmp_path):
    from edgeseg.mobile.placement import check_output

    check_output(tmp_path / "a.pte", ".pte", overwrite=False)
    with pytest.raises(ExportError, match="must end in .pte"):
        check_output(tmp_path / "a.bin", ".pte", overwrite=True)
    (tmp_path / "dir.mlpackage").mkdir()
    check_output(tmp_path / "dir.mlpackage", ".mlpackage", overwrite=True)  # a package is a folder
    with pytest.raises(ExportError, match="exists"):
        check_output(tmp_path / "dir.mlpackage", ".mlpackage", overwrite=False)
    os.mkfifo(tmp_path / "p.pte")
    with pytest.raises(ExportError, match="not a regular file"):
        check_output(tmp_path / "p.pte", ".pte", overwrite=True)


# ---------------------------------------------------------------------------------------- the sidecar contract
@pytest.fixture
def fake_export(tmp_path):
    from edgeseg.mobile.sidecar import student_sidecar, write_sidecar
    from edgeseg.models import PRESETS

    out = tmp_path / "m.pte"
    out.write_bytes(b"not really a program")
    meta = student_sidecar(SimpleNamespace(preset=PRESETS["tiny-student"]), "executorch", out, 1, 3, 1, "none",
                           None, "synthetic")
    write_sidecar(out, meta)
    return out


def test_sidecar_contract_fields_are_hashed(fake_export):
    from edgeseg.mobile import sidecar as sc

    meta = sc.read_sidecar(fake_export)
    assert meta["contract_sha256"] == sc.contract_digest(meta)
    sc.check_contract(meta, fake_export)


@pytest.mark.parametrize("edit", [{"threshold": 0.5}, {"image_size": [128, 128]}, {"ensemble": 9},
                                  {"preprocessing": {"scale": 1.0, "mean": [0, 0, 0], "std": [1, 1, 1]}}])
def test_an_edited_sidecar_is_refused(fake_export, edit):
    from edgeseg.mobile import sidecar as sc
    from edgeseg.mobile.runtime import PteSegmenter

    side = sc.sidecar_path(fake_export)
    meta = json.loads(side.read_text())
    meta.update(edit)
    side.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="contract"):
        PteSegmenter(fake_export)


def test_unverified_sidecar_is_still_type_checked_and_a_bad_program_is_one_error(fake_export):
    from edgeseg.mobile import sidecar as sc
    from edgeseg.mobile.runtime import PteSegmenter

    with pytest.raises(EdgesegError, match="not a loadable ExecuTorch program"):
        PteSegmenter(fake_export)
    side = sc.sidecar_path(fake_export)
    meta = json.loads(side.read_text())
    meta["image_size"] = "64x64"
    side.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="image_size"):
        PteSegmenter(fake_export, verify=False)
