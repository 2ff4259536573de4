"""The baseline U-Net (edgeseg.baselines.SmallUNet) as an ExecuTorch program through the student's
tooling (mobile/unet_export.py: export_unet_pte), and bench/pte_latency.py end to end.

An untrained tiny SmallUNet (8..48 channels, 64 px): its head bias is shifted so that half the
pixels are foreground on the parity images (an untrained net is otherwise foreground everywhere
and the mask Dice says nothing). ~50 s on one thread: two exports, two benchmark processes.
"""
from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch")

from edgeseg.baselines import SmallUNet  # noqa: E402
from edgeseg.errors import EdgesegError  # noqa: E402
from edgeseg.mobile.sidecar import file_digest, sidecar_path  # noqa: E402

warnings.filterwarnings("ignore")

REPO = Path(__file__).resolve().parents[1]
CHANNELS = (8, 16, 24, 32, 48)
SIZE = 64


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = SmallUNet(channels=CHANNELS)
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.eval()
        model.head.bias -= model(images).median()
    return model.train(), images  # left in train mode: the export must not depend on (or change) it


@pytest.fixture(scope="module")
def exports(unet, tmp_path_factory):
    from edgeseg.mobile.unet_export import export_unet_pte

    model, images = unet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = tmp_path_factory.mktemp("unet")
    fp32 = export_unet_pte(model, d / "unet-fp32.pte", "none", images=images, size=SIZE)
    calib = torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    # untrained logits sit close to the threshold: 0.9 is the sane bound here (trained: 0.97, the default)
    int8 = export_unet_pte(model, d / "unet-int8.pte", "int8", images=images, size=SIZE, calibration_images=calib,
                           parity_threshold=0.9)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return d, fp32, int8


def test_unet_fp32_and_int8_programs_with_parity(exports):
    d, fp32, int8 = exports
    for meta, q in ((fp32, "none"), (int8, "int8")):
        out = Path(meta["path"])
        assert out.is_file() and out.stat().st_size == meta["size_bytes"] > 0
        side = json.loads(sidecar_path(out).read_text())
        assert side["sha256"] == file_digest(out)[0] and side["status"] == "ok" and side["quantize"] == q
        assert side["target"] == "executorch-unet" and side["channels"] == list(CHANNELS)
        assert side["image_size"] == [SIZE, SIZE] and [o["name"] for o in side["outputs"]] == ["logits"]
        assert meta["delegate_calls"] == 1 and meta["non_delegated_ops"] == {}  # all of it in XNNPACK
        p = meta["parity"]
        assert p["n_images"] == 4 and 0.3 < p["eager_foreground_fraction"] < 0.7
    assert fp32["parity"]["mask_dsc_vs_eager"] >= 0.99 and fp32["parity"]["max_abs_diff_prob"] <= 1e-3
    assert int8["parity"]["mask_dsc_vs_eager"] >= 0.9 and int8["parity"]["max_abs_diff_prob"] < 0.1
    assert int8["calibration"]["n_images"] == 8
    assert int8["size_bytes"] < 0.5 * fp32["size_bytes"]  # int8 weights: the convs were quantized


def test_unet_program_runs_like_eager(exports, unet):
    from executorch.runtime import Runtime

    model, images = unet
    d, fp32, _ = exports
    method = Runtime.get().load_program(Path(fp32["path"])).load_method("forward")
    x = images[:1].contiguous()
    with torch.no_grad():
        ref = model.eval()(x)
    model.train()
    got = method.execute((x,))[0]
    assert got.shape == (1, 1, SIZE, SIZE) and torch.allclose(got, ref, atol=1e-4)


def test_unet_export_refuses_bad_arguments(unet, tmp_path):
    from edgeseg.mobile.unet_export import export_unet_pte

    model, images = unet
    with pytest.raises(EdgesegError, match="quantize"):
        export_unet_pte(model, tmp_path / "u.pte", "fp16", images=images, size=SIZE)
    with pytest.raises(EdgesegError, match="images must be"):
        export_unet_pte(model, tmp_path / "u.pte", "none", images=images[:, :1], size=SIZE)
    with pytest.raises(EdgesegError, match="end in .pte"):
        export_unet_pte(model, tmp_path / "u.onnx", "none", images=images, size=SIZE)
    assert list(tmp_path.iterdir()) == []


def test_pte_latency_quick_end_to_end(exports, tmp_path):
    """bench/pte_latency.py --quick: JSON and Markdown with a positive ratio.

    Exporting even a one-stage student takes 40-60 s on this machine (test_mobile and
    test_deploy cover that path), so the "student" here is the U-Net's int8 program under a
    student sidecar (a real one-stage tiny-student's contract and cost, the U-Net's inputs):
    the benchmark's processes, statistics, GFLOP and report are what is tested.
    """
    from edgeseg.mobile import sidecar as sc
    from edgeseg.models import build

    sys.path.insert(0, str(REPO))
    from bench import pte_latency as pl

    d, _, int8 = exports
    student = tmp_path / "student.pte"
    shutil.copy(int8["path"], student)
    tiny = build("tiny-student", dim_x_mults=(1,), dim_g_mults=(1,))
    meta = sc.student_sidecar(tiny, "executorch", student, 1, 1, 1, "int8", None, "synthetic")
    meta["inputs"] = int8["inputs"]
    sc.write_sidecar(student, meta)

    out = tmp_path / "bench"
    rc = pl.main(["--student", str(student), "--unet", int8["path"], "--quick", "--process-repeats", "1",
                  "--threads", "1", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "pte-latency.json").read_text())
    assert doc["quick"] and doc["settings"]["threads"] == 1 and doc["settings"]["process_repeats"] == 1
    s, u = doc["results"]
    assert (s["role"], u["role"]) == ("student", "unet") and s["quantize"] == u["quantize"] == "int8"
    assert s["latency_ms"]["median"] > 0 and u["latency_ms"]["median"] > 0 and len(u["process_runs"][0]) == 3
    assert s["gflop_per_image"] > u["gflop_per_image"] > 0 and u["channels"] == list(CHANNELS)
    c = doc["comparison"]
    assert c["ratio"] > 0 and c["ratio_per_gflop"] > 0 and c["target_met"] in (True, False)
    assert c["ratio"] == pytest.approx(s["latency_ms"]["median"] / u["latency_ms"]["median"], rel=1e-3)
    md = (out / "pte-latency.md").read_text()
    assert "Student / U-Net latency" in md and "U-Net [8, 16, 24, 32, 48]" in md


def test_pte_latency_exports_an_untrained_preset(tmp_path, monkeypatch):
    """--student-preset: an untrained network of the preset goes to the export (parity recorded,
    not enforced) and its row is marked untrained."""
    from edgeseg.mobile import executorch_export as ex

    sys.path.insert(0, str(REPO))
    from bench import pte_latency as pl

    seen = {}

    def fake_export(model, out, quantize, progress=None, **kw):
        seen.update(model=model, quantize=quantize, **kw)
        return {"target": "executorch", "path": str(out)}

    monkeypatch.setattr(ex, "export_executorch", fake_export)
    prog = pl.export_student(None, tmp_path, preset="tiny-student-mobile")
    assert seen["model"].preset.name == "tiny-student-mobile" and not seen["model"].training
    assert seen["quantize"] == "int8" and seen["parity_threshold"] == 0.0
    assert prog["trained"] is False
    args = pl.parse_args(["--student-preset", "tiny-student-mobile", "--unet", "8,16,24,32,48"])
    assert args.student_preset == "tiny-student-mobile" and args.student_ckpt is None
