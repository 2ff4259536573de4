"""edgeseg.checkpoint: safetensors + preset JSON, bit-exact round trips, no unpickling,
clear errors naming the file, atomic writes."""
from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch

import edgeseg.checkpoint as ckpt
from edgeseg.checkpoint import load_model, load_preset, save_model
from edgeseg.errors import CheckpointError, EdgesegError
from edgeseg.models import build


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build("tiny-student")
    with torch.no_grad():  # non-default values everywhere (norm affine params included)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return m


@pytest.fixture
def saved(model, tmp_path):
    return save_model(model, tmp_path / "ckpt" / "student.safetensors", extra={"step": 12})


def test_round_trip_bit_exact(model, saved):
    assert saved.name == "student.safetensors" and saved.with_suffix(".json").is_file()
    loaded = load_model(saved)
    assert loaded.preset == model.preset
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    s = model.preset.image_size
    x, g, t = torch.randn(1, 1, s, s), torch.rand(1, 3, s, s), torch.tensor([5])
    with torch.no_grad():
        assert torch.equal(model.eval()(x, g, t), loaded.eval()(x, g, t))
    p, meta = load_preset(saved)
    assert p == model.preset and meta["step"] == 12
    assert load_model(saved, expect_preset="tiny-student").preset.name == "tiny-student"


def test_save_adds_suffix_and_leaves_no_temp_files(model, tmp_path):
    out = save_model(model, tmp_path / "m")
    assert out == tmp_path / "m.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]
    save_model(model, out)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def test_weights_not_matching_preset_keys(saved):
    meta_path = saved.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["preset"] = build("tiny-teacher").preset.to_dict()  # 4 stages vs the 3 saved
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as ei:
        load_model(saved)
    assert str(saved) in str(ei.value) and "tiny-teacher" in str(ei.value)


def test_weights_not_matching_preset_shapes(saved):
    meta_path = saved.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["preset"]["dim_x"] = 24  # same tensor names, different shapes
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as ei:
        load_model(saved)
    assert str(saved) in str(ei.value)


def test_expect_preset_mismatch(saved):
    with pytest.raises(CheckpointError) as ei:
        load_model(saved, expect_preset="student-mobile")
    assert str(saved) in str(ei.value) and "student-mobile" in str(ei.value)


def test_missing_json_or_weights(saved, tmp_path):
    saved.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError) as ei:
        load_model(saved)
    assert str(saved) in str(ei.value)
    with pytest.raises(CheckpointError):
        load_preset(saved)
    with pytest.raises(CheckpointError) as ei:
        load_model(tmp_path / "nothing.safetensors")
    assert "nothing.safetensors" in str(ei.value)
    assert issubclass(CheckpointError, EdgesegError)


def test_corrupt_files(saved):
    saved.with_suffix(".json").write_text("{not json")
    with pytest.raises(CheckpointError):
        load_model(saved)
    saved.with_suffix(".json").write_text(json.dumps({"preset": {"name": "x"}}))
    with pytest.raises(CheckpointError):
        load_model(saved)


def test_truncated_weights(model, tmp_path):
    p = save_model(model, tmp_path / "w.safetensors")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as ei:
        load_model(p)
    assert str(p) in str(ei.value)


def test_file_is_safetensors_not_pickle(saved, monkeypatch):
    raw = saved.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"]["preset"] == "tiny-student"
    assert not raw.startswith(b"PK") and not raw.startswith(b"\x80")  # not torch.save's zip / a pickle

    def refuse(*a, **k):
        raise AssertionError("checkpoint loading must never unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = load_model(saved)
    assert loaded.preset.name == "tiny-student"


def test_interrupted_save_keeps_previous_file(model, tmp_path, monkeypatch):
    p = save_model(model, tmp_path / "a.safetensors")
    before = p.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, p)
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json", "a.safetensors"]


# ---------------------------------------------------------------------------------------- hashes, modes, legacy files
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
