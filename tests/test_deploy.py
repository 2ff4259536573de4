"""Deployment artefacts: the .pte's ETRecord and bundled program, `edgeseg profile`, CoreML
metadata, the ONNX target (fp32 and int8, gated in ONNX Runtime), bad options.

Exports are slow on 2 cores: one .pte, two ONNX exports of the shipped tiny student (K=1, N=2)
and two of a one-stage tiny network (CoreML spec, the broken-model gate), shared through
module-scoped fixtures.
"""
from __future__ import annotations

import json
import platform
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch")

from edgeseg.errors import EdgesegError  # noqa: E402
from edgeseg.mobile.sidecar import file_digest, io_spec, sidecar_path  # noqa: E402
from edgeseg.models import build  # noqa: E402

warnings.filterwarnings("ignore")

K, N = 1, 2
SHIPPED_STUDENT = Path(__file__).resolve().parents[1] / "edgeseg" / "assets" / "tiny-student-synthetic.safetensors"


def _one_stage(seed: int = 0):
    torch.manual_seed(seed)
    return build("tiny-student", dim_x_mults=(1,), dim_g_mults=(1,)).eval()



def run_cli(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """The real entry point (edgeseg.cli.main:main) in this process: (exit code, stdout, stderr)."""
    from edgeseg.cli.main import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["edgeseg", *map(str, argv)])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        main()
    cap = capsys.readouterr()
    return int(e.value.code or 0), cap.out, cap.err


def one_error_line(rc: int, err: str, needle: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------------------- .pte
@pytest.fixture(scope="module")
def pte(tiny_pte_fp32):
    """The shipped tiny student's fp32 .pte at K, N (conftest: exported once, shared with test_mobile)."""
    out, meta = tiny_pte_fp32
    assert (meta["steps"], meta["ensemble"]) == (K, N)
    return out, meta


def test_pte_writes_etrecord_and_verified_bundle_named_in_the_sidecar(pte):
    out, meta = pte
    side = json.loads(sidecar_path(out).read_text())
    assert side["status"] == "ok" and side["file"] == "tiny.pte"
    for key, suffix in (("etrecord", ".etrecord"), ("bundled_program", ".bpte")):
        path = out.with_name(out.name + suffix)
        assert side[key]["file"] == path.name and path.is_file()
        digest, size = file_digest(path)
        assert side[key]["sha256"] == digest and side[key]["size_bytes"] == size
    b = side["bundled_program"]
    assert b["verified"] is True and b["n_images"] == 3 and b["rtol"] == 0.0
    # the tolerance is justified by the gate: 1.5 x the largest deviation it accepted, at least 1e-4
    worst = max(side["parity"]["max_abs_diff_mean"], side["parity"]["max_abs_diff_std"])
    assert b["atol"] >= 1e-4 and b["atol"] == pytest.approx(max(1e-4, 1.5 * worst), rel=0.05, abs=2e-6)


def test_bundle_verification_compares_outputs(pte):
    """The .bpte verifies in ExecuTorch's runtime at its tolerance and fails far below it."""
    from executorch.devtools import parse_etrecord

    from edgeseg.mobile.devtools import verify_bundled

    out, meta = pte
    data = out.with_name(out.name + ".bpte").read_bytes()
    b = meta["bundled_program"]
    assert verify_bundled(data, b["n_images"], b["atol"]).problem is None
    assert meta["parity"]["max_abs_diff_mean"] > 0  # fp32 XNNPACK is not bit-identical to eager
    bad = verify_bundled(data, b["n_images"], 1e-12)
    assert bad.problem is not None and "does not match" in bad.problem
    record = parse_etrecord(str(out.with_name(out.name + ".etrecord")))
    assert record.edge_dialect_program is not None and record._representative_inputs is not None


def test_profile_cli_prints_and_writes_the_table(pte, tmp_path, capsys, monkeypatch):
    out, _ = pte
    rc, stdout, err = run_cli(["profile", out, "--runs", "2", "--top", "5", "--out-dir", tmp_path], capsys,
                              monkeypatch)
    assert rc == 0, err
    assert "top 5 operators" in stdout and "XnnpackBackend" in stdout and "Convolution" in stdout
    report = json.loads((tmp_path / "tiny.pte.profile.json").read_text())
    md = (tmp_path / "tiny.pte.profile.md").read_text()
    assert report["runs"] == 2 and len(report["method_ms"]["runs"]) == 2 and len(report["top"]) == 5
    assert report["delegates"][0]["backend"] == "XnnpackBackend" and report["delegates"][0]["calls"] == 1
    ops = report["operators"]
    assert ops == sorted(ops, key=lambda o: -o["median_ms"])
    assert 0.5 < sum(o["share"] for o in ops) <= 1.05  # XNNPACK's operators account for most of the run
    assert any(o["category"].startswith("GEMM") for o in report["top"])
    assert "| operator | runs in |" in md and report["top"][0]["operator"] in md


def test_profile_bad_models_are_one_line(pte, tmp_path, capsys, monkeypatch):
    out, _ = pte
    bare = tmp_path / "bare.pte"  # an export without its ETRecord
    shutil.copy(out, bare)
    shutil.copy(sidecar_path(out), sidecar_path(bare))
    for argv, needle in ((["profile", bare], "no ETRecord"), (["profile", tmp_path / "none.pte"], "no such"),
                         (["profile", sidecar_path(out)], ".pte"), (["profile", out, "--runs", "0"], "--runs")):
        rc, _, err = run_cli(argv, capsys, monkeypatch)
        one_error_line(rc, err, needle)


# ---------------------------------------------------------------------------------------- CoreML
def test_coreml_spec_metadata_descriptions_compute_units(tmp_path):
    pytest.importorskip("coremltools")
    import coremltools as ct

    from edgeseg.mobile.coreml_export import COREML_METADATA_KEYS, coreml_metadata, export_coreml

    out = tmp_path / "one.mlpackage"
    meta = export_coreml(_one_stage(), out, K, N, "none", compute_units="cpu_and_ne")
    assert meta["compute_units"] == "cpu_and_ne" and meta["training_data"] is None
    spec_md = meta["structure"]["metadata"]
    user = spec_md["user_defined"]
    assert set(COREML_METADATA_KEYS) <= set(user)
    assert json.loads(user["preprocessing"]) == meta["preprocessing"]
    assert (user["threshold"], user["steps"], user["ensemble"], user["compute_units"]) == ("0.0", "1", "2", "cpu_and_ne")
    assert json.loads(user["sampler"])["timesteps"] == meta["timesteps"]
    assert json.loads(user["training_data"])["dataset"].startswith("not recorded")
    assert spec_md["author"] == "edgeseg" and spec_md["license"].startswith("Apache-2.0")
    assert "tiny-student" in spec_md["short_description"] and "+recipe" in spec_md["version"]
    # what an app sees (read back from the saved package, no prediction: that needs macOS)
    ml = ct.models.MLModel(str(out), skip_model_load=True)
    inputs, outputs = io_spec(1, N, 64, 64)
    for io in inputs:
        assert ml.input_description[io["name"]] == io["description"]
    for io in outputs:
        assert ml.output_description[io["name"]] == io["description"]
    assert ml.author == "edgeseg" and ml.user_defined_metadata["compute_units"] == "cpu_and_ne"
    if platform.system() != "Darwin":
        assert meta["parity"]["mask_dsc_vs_eager"] is None and "macOS" in meta["parity"]["note"]
    assert "terms of use" in coreml_metadata(meta, "isic2017", "all")["license"]


# ---------------------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def onnx_fp32(tiny, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from edgeseg.mobile.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return out, export_onnx(tiny, out, K, N, "none", n_parity_images=4)


def test_onnx_fp32_export_parity_in_onnxruntime(onnx_fp32):
    import onnx

    from edgeseg.mobile.onnx_export import ort_session

    out, meta = onnx_fp32
    side = json.loads(sidecar_path(out).read_text())
    assert side["target"] == "onnx" and side["status"] == "ok" and side["quantize"] == "none"
    assert side["parity"]["n_images"] == 4 and side["parity"]["mask_dsc_vs_eager"] >= 0.99
    assert "onnxruntime" in side["parity"]["runtime"] and 0.05 < side["parity"]["eager_foreground_fraction"] < 0.95
    assert side["sha256"] == file_digest(out)[0] and side["timesteps"] == [249]
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["image", "noise"]
    assert [o.name for o in model.graph.output] == ["mean", "std"]
    assert all(o.doc_string for o in model.graph.output)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["edgeseg.threshold"] == "0.0" and json.loads(props["edgeseg.ensemble"]) == N
    assert not any(n.metadata_props for n in model.graph.node)  # debug metadata dropped
    mean, std = ort_session(out).run(None, {"image": torch.rand(1, 3, 64, 64).numpy(),
                                            "noise": torch.randn(N, 1, 64, 64).numpy()})
    assert mean.shape == std.shape == (1, 1, 64, 64)


def test_onnx_int8_export_parity_and_size(tiny, onnx_fp32, tmp_path):
    import onnx

    from edgeseg.mobile.onnx_export import export_onnx

    out = tmp_path / "tiny-int8.onnx"
    meta = export_onnx(tiny, out, K, N, "int8")  # the .pte's defaults: 32 calibration, 16 parity images
    assert meta["status"] == "ok" and meta["parity"]["mask_dsc_vs_eager"] >= 0.97
    cal = meta["calibration"]
    assert cal["split"] == "train" and cal["n_images"] == 32 and "QDQ" in cal["method"] and cal["kept_fp32"] > 0
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert meta["size_bytes"] < 0.5 * onnx_fp32[1]["size_bytes"], (meta["size_bytes"], onnx_fp32[1]["size_bytes"])


def test_onnx_parity_gate_fails_on_broken_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from test_mobile import _skip_standardisation

    from edgeseg.mobile.onnx_export import export_onnx

    out = tmp_path / "broken.onnx"
    with pytest.raises(EdgesegError, match="parity check failed"):
        export_onnx(_one_stage(), out, K, N, "none", n_parity_images=4, prepare=_skip_standardisation)
    assert not out.exists() and not sidecar_path(out).exists()
    failed = tmp_path / "broken.onnx.failed"
    side = json.loads(sidecar_path(failed).read_text())
    assert failed.is_file() and side["status"] == "failed" and side["target"] == "onnx"
    assert side["parity"]["mask_dsc_vs_eager"] < 0.99


# ---------------------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("argv,needle", [
    (["--target", "onnx", "--quantize", "palettize"], "CoreML only"),
    (["--target", "executorch", "--compute-units", "cpu_only"], "--compute-units is CoreML only"),
    (["--target", "coreml", "--compute-units", "gpu"], "--compute-units"),
    (["--target", "onnx", "--out", "x.pte"], "must end in .onnx"),
    (["--target", "tflite"], "--target"),
])
def test_export_bad_options_are_one_line(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(["export", "--checkpoint", SHIPPED_STUDENT, *argv], capsys, monkeypatch)
    one_error_line(rc, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_export_keeps_an_existing_bundle(tmp_path, capsys, monkeypatch):
    """A .pte's artefacts are outputs too: an existing <out>.bpte stops the export before any work."""
    (tmp_path / "x.pte.bpte").write_bytes(b"an earlier bundle")
    rc, _, err = run_cli(["export", "--target", "executorch", "--checkpoint", SHIPPED_STUDENT, "--out",
                          tmp_path / "x.pte"], capsys, monkeypatch)
    one_error_line(rc, err, "x.pte.bpte exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pte.bpte"]


# ---------------------------------------------------------------------------------------- bench/runtimes.py
def test_runtimes_tables_targets_and_plot_from_measurements(tmp_path):
    """bench/runtimes.py's rows, targets, Markdown and PNG from given measurements (no exports, no timing)."""
    from argparse import Namespace

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import runtimes as rt

    args = Namespace(steps=1, ensemble=3)
    info = {"preset": "student-mobile", "checkpoint": None, "image_size": 128, "gflop_per_call": 4.0,
            "params": 630_000, "trained": False}
    ms = {"eager": 400.0, "pte-fp32": 150.0, "pte-int8": 100.0, "onnx-fp32": 200.0, "onnx-int8": 90.0}
    res = {("student-mobile", r): {"latency": [{"median_ms": ms[r] + d, "runs_ms": [ms[r] + d], "program_peak_mb": 60.0}
                                               for d in (-10, 0, 10)], "dice": None, "error": None} for r in rt.RUNTIMES}
    exports = {("student-mobile", r): {"meta": {"size_bytes": 2_000_000, "parity": {"mask_dsc_vs_eager": 1.0}}}
               for r in rt.RUNTIMES[1:]}
    ceil = {"gemm-fp32": {"median": 100.0, "what": "torch.mm"}, "gemm-int8": {"median": 400.0, "what": "ORT"}}
    rows = rt.make_rows(args, [info], {}, exports, res, ceil)
    fp32 = next(r for r in rows if r["runtime"] == "pte-fp32")
    assert fp32["latency_ms"]["median"] == 150.0 and fp32["gflops"] == 80.0 and fp32["ceiling_share"] == 0.8
    assert fp32["dice"] is None and fp32["dice_reason"] == "untrained" and fp32["file_mb"] == 2.0
    goals = rt.targets(rows)
    assert any("fp32: .pte 150.0 ms vs ONNX Runtime 200.0 ms" in t and ": met" in t for t in goals)
    assert any("int8" in t and "NOT met" in t for t in goals)  # 100 ms vs 90 ms
    assert any("80% of the fp32 GEMM ceiling" in t for t in goals)
    doc = {"machine": {"cpu": "x"}, "ceilings": ceil, "results": rows, "targets": goals, "notes": ["n"],
           "settings": {"steps": 1, "ensemble": 3}}
    md = rt.markdown(doc)
    assert "| student-mobile 128 px (untrained) | .pte fp32 (XNNPACK) | 150.0 [10.0] | 60.0 |" in md
    rt.plot(tmp_path / "r.png", doc)
    assert (tmp_path / "r.png").stat().st_size > 1000
