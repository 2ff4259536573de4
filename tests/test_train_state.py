"""What the trainer writes and reads back as its state: non-finite weights are never saved; a
resumed run applies and records the settings that may change and refuses the others
(edgeseg.config.check_resume); a corrupt state is one error."""
from __future__ import annotations

import json

import pytest
import torch

from edgeseg.errors import EdgesegError, SettingsError
from edgeseg.train import TrainConfig, Trainer, TrainingDiverged
from micro import make_trainer, micro_config

pytestmark = pytest.mark.usefixtures("micro_env")
CPU = torch.device("cpu")
trainer = make_trainer


def cfg(**kw) -> TrainConfig:
    """No KD (no teacher needed), a state written at the end of each epoch only."""
    return micro_config(**{"kd": "none", **kw})


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
