"""Every bad input through the real `edgeseg` entry point.

Each case runs in its own process (tests/cli_driver.py forks one per case after importing the
CLI once) and must end with exit code 2, exactly one ``error: ...`` line on stderr naming the
file or setting, no traceback, and its folder exactly as it was (nothing written, nothing lost).
A few cases must instead work (16-bit images, a newline in a file name). The library-level
halves (NaN after an update, resume settings, stale locks, export placement, sidecar contract)
are in tests/test_train_state.py, tests/test_runlock.py and tests/test_export_files.py.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
ASSETS = REPO / "edgeseg" / "assets"
SHIPPED_STUDENT = ASSETS / "tiny-student-synthetic.safetensors"


@dataclass
class Case:
    id: str
    argv: list[str]
    needles: tuple[str, ...] = ()
    rc: int = 2
    timeout: int = 60
    deny: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)


CASES: dict[str, Case] = {}
SETUPS = []


def case(id: str, *argv: str, needles=(), rc: int = 2, timeout: int = 60):
    """Register a case; the decorated function prepares its folder (cwd) and may edit the Case."""

    def deco(setup):
        CASES[id] = Case(id, [str(a) for a in argv], tuple(needles), rc, timeout)
        SETUPS.append((id, setup))
        return setup

    return deco


def nothing(d: Path, c: Case) -> None:
    pass


# ---------------------------------------------------------------------------------------- helpers
def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels (8-bit grey) with almost no data: decoders read the size first."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def folder_dataset(root: Path, n: int = 10, size=(24, 20)) -> Path:
    from data_fixtures import write_pair

    for i in range(n):
        write_pair(root / "images" / f"case{i:03d}.png", root / "masks" / f"case{i:03d}_mask.png", i, *size)
    return root


def new_checkpoint(folder: Path, name: str = "student") -> Path:
    """The shipped tiny student re-saved by this version (preset in the header, weights_sha256)."""
    from edgeseg.checkpoint import load_model, save_model

    return save_model(load_model(SHIPPED_STUDENT), folder / f"{name}.safetensors")


def legacy_checkpoint(folder: Path, name: str = "student") -> Path:
    """A copy of the shipped file, which predates both (its JSON without weights_sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    w = folder / f"{name}.safetensors"
    shutil.copy(SHIPPED_STUDENT, w)
    meta = json.loads(SHIPPED_STUDENT.with_suffix(".json").read_text())
    meta.pop("weights_sha256", None)
    w.with_suffix(".json").write_text(json.dumps(meta))
    return w


def edit_json(weights: Path, **preset_fields) -> Path:
    js = weights.with_suffix(".json")
    meta = json.loads(js.read_text())
    meta["preset"].update(preset_fields)
    js.write_text(json.dumps(meta))
    return weights


def state_json(run: Path, role: str, **config) -> Path:
    from edgeseg.train import tiny_recipe

    cfg = {**tiny_recipe(role).to_dict(), **config}
    d = run / "state" / role
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"step": 4, "epoch": 1, "config": cfg, "param_groups": [],
                                              "plateau": {}, "history": [], "epoch_sums": {}}))
    return d / "state.json"


EXPORT = ("export", "--target", "executorch")

# ---------------------------------------------------------------------------------------- settings out of range
for cid, argv, needle in [
    ("epochs-0", ("distill", "--epochs", "0"), "--epochs"),
    ("max-steps-negative", ("distill", "--max-steps", "-5"), "--max-steps"),
    ("max-steps-0", ("distill", "--max-steps", "0"), "--max-steps"),
    ("batch-size-negative", ("distill", "--batch-size", "-4"), "--batch-size"),
    ("batch-size-0", ("train-teacher", "--batch-size", "0"), "--batch-size"),
    ("lr-negative", ("distill", "--lr", "-0.001"), "--lr"),
    ("lr-nan", ("distill", "--lr", "nan"), "--lr"),
    ("lr-inf", ("train-teacher", "--lr", "inf"), "--lr"),
    ("set-tau-abc", ("distill", "--set", "tau=abc"), "tau"),
    ("set-grad-clip-0", ("distill", "--set", "grad_clip=0"), "grad_clip"),
    ("teacher-set-epochs-0", ("distill", "--teacher-set", "epochs=0"), "--teacher-set"),
    ("set-bool-as-number", ("distill", "--set", "augment=3"), "augment"),
    ("eval-steps-0", ("distill", "--eval-steps", "0"), "--eval-steps"),
    ("eval-ensemble-negative", ("distill", "--eval-ensemble", "-1"), "--eval-ensemble"),
    ("eval-images-0", ("distill", "--eval-images", "0"), "--eval-images"),
    ("unknown-option", ("distill", "--epoch", "3"), "--epoch"),
    ("typer-range", (*EXPORT, "-k", "0"), "--steps"),
]:
    case(cid, *argv, *(("--runs-dir", "runs") if argv[0] != "export" else ()), needles=(needle,))(nothing)


@case("config-bad-value", "distill", "--config", "s.yaml", needles=("--lr",))
def _(d, c):
    (d / "s.yaml").write_text("lr: -1\nepochs: 3\n")


@case("config-not-a-table", "distill", "--config", "s.json", needles=("s.json",))
def _(d, c):
    (d / "s.json").write_text("[1, 2]")


# ---------------------------------------------------------------------------------------- run folders in use
HOLDERS: list[subprocess.Popen] = []


def hold_run_folder(d: Path) -> int:
    """Another process that claimed runs/r and keeps running (as a training run would)."""
    code = ("import sys, time; from edgeseg.runlock import claim_run_dir; claim_run_dir('runs/r', resume=False); "
            "print('ready', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=d, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    HOLDERS.append(p)
    return p.pid


@case("run-in-use-resume", "distill", "--run-name", "r", "--resume", "--runs-dir", "runs", needles=("in use",))
def _(d, c):
    c.needles += (f"process {hold_run_folder(d)}", "run.lock")


@case("run-in-use-new", "train-teacher", "--run-name", "r", "--runs-dir", "runs", needles=("exists", "--resume"))
def _(d, c):
    hold_run_folder(d)


@case("run-name-escapes", "train-teacher", "--run-name", "../outside", "--runs-dir", "runs",
      needles=("--run-name",))
def _(d, c):
    pass


# ---------------------------------------------------------------------------------------- resume
@case("resume-without-run-name", "train-teacher", "--resume", "--runs-dir", "runs", needles=("--run-name",))
def _(d, c):
    pass


@case("resume-batch-size", "distill", "--run-name", "r", "--resume", "--runs-dir", "runs", "--batch-size", "8",
      needles=("batch_size", "cannot change"))
def _(d, c):
    state_json(d / "runs" / "r", "student", batch_size=4)


@case("resume-kd-and-seed", "distill", "--run-name", "r", "--resume", "--runs-dir", "runs", "--kd", "none",
      "--seed", "3", needles=("kd", "seed"))
def _(d, c):
    state_json(d / "runs" / "r", "student")


@case("resume-other-dataset", "train-teacher", "--run-name", "r", "--resume", "--runs-dir", "runs",
      "--dataset", "folder", "--data-dir", "elsewhere", needles=("dataset",))
def _(d, c):
    state_json(d / "runs" / "r", "teacher")


@case("resume-uses-the-runs-settings", "distill", "--run-name", "r", "--resume", "--runs-dir", "runs",
      "--teacher", "missing.safetensors", needles=("missing.safetensors", "not found"))
def _(d, c):
    # batch 4 in the run, none given now: the run's own value is used, not refused as a change
    state_json(d / "runs" / "r", "student", batch_size=4, kd="global")


@case("resume-corrupt-state", "distill", "--run-name", "r", "--resume", "--runs-dir", "runs",
      needles=("state.json", "corrupt resume state"))
def _(d, c):
    js = state_json(d / "runs" / "r", "student")
    js.write_text(js.read_text()[:40])


@case("resume-state-missing-keys", "train-teacher", "--run-name", "r", "--resume", "--runs-dir", "runs",
      needles=("state.json", "corrupt resume state"))
def _(d, c):
    js = state_json(d / "runs" / "r", "teacher")
    js.write_text(json.dumps({"step": "four"}))


# ---------------------------------------------------------------------------------------- checkpoints and their JSON
@case("export-preset-name-escapes", *EXPORT, "--checkpoint", "ck/student.safetensors", needles=("name",))
def _(d, c):
    edit_json(new_checkpoint(d / "ck"), name="../../../escaped/evil")


for cid, fields_, needle in [
    ("json-groups", {"groups": 3}, "groups"),
    ("json-heads", {"heads": 4, "dim_head": 8}, "heads"),  # same tensor shapes: only the header tells
    ("json-dim-x-mults", {"dim_x_mults": [1, 2]}, "dim_x_mults"),
    ("json-dim-x-mults-both", {"dim_x_mults": [1, 2], "dim_g_mults": [1, 2]}, "dim_x_mults"),
    ("json-image-size", {"image_size": 128}, "image_size"),
    ("json-image-size-odd", {"image_size": 66}, "image_size"),
    ("json-prediction-type", {"prediction_type": "epsilon"}, "prediction_type"),
    ("json-prediction-type-bad", {"prediction_type": "noise"}, "prediction_type"),
    ("json-width-as-string", {"dim_x": "16"}, "dim_x"),
    ("json-huge-width", {"dim_x": 2048, "dim_g": 2048}, "dim_x"),
    ("json-width-too-large", {"dim_x": 10 ** 7}, "dim_x"),
    ("json-heads-zero", {"heads": 0}, "heads"),
]:
    def _setup(d, c, fields_=fields_):
        edit_json(new_checkpoint(d / "ck"), **fields_)

    case(cid, *EXPORT, "--checkpoint", "ck/student.safetensors", "--out", "x.pte",
         needles=(needle, "ck/student"))(_setup)


@case("json-huge-width-unknown-preset", *EXPORT, "--checkpoint", "ck/custom.safetensors", "--out", "x.pte",
      needles=("custom.safetensors", "shapes"))
def _(d, c):
    """A preset no registry knows, in a file whose header names it only (as older files do): the
    tensor shapes in the header are all there is to compare, before any memory is allocated."""
    import torch
    from safetensors.torch import save_file

    from edgeseg.models import DermoSegDiff, PRESETS, Preset

    p = Preset.from_dict({**PRESETS["tiny-student"].to_dict(), "name": "custom-net"})
    torch.manual_seed(0)
    (d / "ck").mkdir()
    save_file(DermoSegDiff(p).state_dict(), d / "ck" / "custom.safetensors", metadata={"preset": "custom-net"})
    (d / "ck" / "custom.json").write_text(json.dumps({"preset": {**p.to_dict(), "dim_x": 2048, "dim_g": 2048}}))


@case("json-heads-legacy-file", *EXPORT, "--checkpoint", "ck/student.safetensors", "--out", "x.pte",
      needles=("heads",))
def _(d, c):
    edit_json(legacy_checkpoint(d / "ck"), heads=4, dim_head=8)


@case("weights-flipped-byte", *EXPORT, "--checkpoint", "ck/student.safetensors", "--out", "x.pte",
      needles=("sha256", "student.safetensors"))
def _(d, c):
    w = new_checkpoint(d / "ck")
    data = bytearray(w.read_bytes())
    data[-100] ^= 0x10
    w.write_bytes(bytes(data))


@case("student-renamed-as-teacher", "distill", "--teacher", "ck/teacher.safetensors", "--runs-dir", "runs",
      needles=("teacher.safetensors", "tiny-student"))
def _(d, c):
    from edgeseg.models import PRESETS

    w = new_checkpoint(d / "ck", "teacher")
    edit_json(w, name="tiny-teacher", role="teacher", teacher=None)
    assert PRESETS["tiny-teacher"].name == "tiny-teacher"


@case("legacy-student-renamed-as-teacher", "distill", "--teacher", "ck/teacher.safetensors", "--runs-dir", "runs",
      needles=("teacher.safetensors", "tiny-student"))
def _(d, c):
    edit_json(legacy_checkpoint(d / "ck", "teacher"), name="tiny-teacher", role="teacher", teacher=None)


# ---------------------------------------------------------------------------------------- export outputs
@case("export-out-exists", *EXPORT, "--checkpoint", "ck/student.safetensors", "--out", "x.pte",
      needles=("x.pte", "exists", "--overwrite"))
def _(d, c):
    new_checkpoint(d / "ck")
    (d / "x.pte").write_bytes(b"an earlier export")


@case("export-sidecar-exists", *EXPORT, "--checkpoint", "ck/student.safetensors", "--out", "x.pte",
      needles=("x.pte.json", "exists"))
def _(d, c):
    new_checkpoint(d / "ck")
    (d / "x.pte.json").write_text("{}")


@case("export-out-is-a-folder", *EXPORT, "--checkpoint", "ck/student.safetensors", "--out", "x.pte",
      "--overwrite", needles=("x.pte", "folder"))
def _(d, c):
    new_checkpoint(d / "ck")
    (d / "x.pte").mkdir()
    (d / "x.pte" / "keep.txt").write_text("mine")


@case("export-out-is-a-folder-no-overwrite", *EXPORT, "--checkpoint", "ck/student.safetensors", "--out", "x.pte",
      needles=("x.pte", "exists"))
def _(d, c):
    new_checkpoint(d / "ck")
    (d / "x.pte").mkdir()


@case("export-dataset-missing", *EXPORT, "--checkpoint", "ck/student.safetensors", "--out", "x.pte",
      "--dataset", "folder", "--data-dir", "nowhere", needles=("nowhere", "does not exist"))
def _(d, c):
    new_checkpoint(d / "ck")  # the only line: no progress line before the data error


# ---------------------------------------------------------------------------------------- lower
def _data_info(*extra):
    return ("data", "info", "--dataset", "folder", "--data-dir", "ds", *extra)


@case("image-200-megapixels", *_data_info(), needles=("case003.png", "too large"))
def _(d, c):
    folder_dataset(d / "ds")
    (d / "ds" / "images" / "case003.png").write_bytes(png_header_only(20000, 10000))


@case("mask-200-megapixels", *_data_info(), needles=("case004_mask.png", "too large"))
def _(d, c):
    folder_dataset(d / "ds")
    (d / "ds" / "masks" / "case004_mask.png").write_bytes(png_header_only(20000, 10000))


@case("masks-folder-unreadable", *_data_info(), needles=("masks", "Permission denied"))
def _(d, c):
    folder_dataset(d / "ds")
    masks = d / "ds" / "masks"
    if os.geteuid() == 0:  # root reads any folder: make the listing fail as the kernel would
        c.deny.append(str(masks))
    else:
        masks.chmod(0)


@case("config-is-a-named-pipe", "distill", "--config", "s.yaml", "--runs-dir", "runs",
      needles=("s.yaml", "not a regular file"), timeout=20)
def _(d, c):
    os.mkfifo(d / "s.yaml")


@case("teacher-is-a-named-pipe", "distill", "--teacher", "t.safetensors", "--runs-dir", "runs",
      needles=("t.safetensors", "not a regular file"), timeout=20)
def _(d, c):
    os.mkfifo(d / "t.safetensors")
    (d / "t.json").write_text("{}")


@case("checkpoint-json-is-a-named-pipe", *EXPORT, "--checkpoint", "ck/student.safetensors", "--out", "x.pte",
      needles=("student.json", "not a regular file"), timeout=20)
def _(d, c):
    w = new_checkpoint(d / "ck")
    w.with_suffix(".json").unlink()
    os.mkfifo(w.with_suffix(".json"))


@case("preview-out-without-extension", "data", "preview", "--dataset", "synthetic", "--out", "grid",
      needles=("grid", "--out"))
def _(d, c):
    pass


@case("preview-n-0", "data", "preview", "--dataset", "synthetic", "--out", "g.png", "--n", "0", needles=("--n",))
def _(d, c):
    pass


@case("preview-out-is-a-folder", "data", "preview", "--dataset", "synthetic", "--out", "g.png",
      needles=("g.png", "folder"))
def _(d, c):
    (d / "g.png").mkdir()


# the cases that must work
@case("newline-in-a-file-name", *_data_info(), rc=0)
def _(d, c):
    from data_fixtures import write_pair

    folder_dataset(d / "ds", 9)
    write_pair(d / "ds" / "images" / "two\nlines.png", d / "ds" / "masks" / "two\nlines_mask.png", 42)


@case("image-16-bit-grey", *_data_info(), rc=0)
def _(d, c):
    folder_dataset(d / "ds", 9, size=(24, 20))
    grey = np.full((20, 24), 20000, np.uint16)
    grey[5:15, 6:18] = 40000
    Image.fromarray(grey).save(d / "ds" / "images" / "case009.png")
    mask = np.zeros((20, 24), np.uint8)
    mask[5:15, 6:18] = 255
    Image.fromarray(mask).save(d / "ds" / "masks" / "case009_mask.png")


# ---------------------------------------------------------------------------------------- the run
def snapshot(d: Path) -> dict:
    out = {}
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        kind = "dir" if p.is_dir() else "fifo" if p.is_fifo() else "file"
        out[str(p.relative_to(d))] = (kind, st.st_size, st.st_mtime_ns, st.st_mode)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    cache = root / "cache"
    sys.path.insert(0, str(TESTS))
    before, dirs = {}, {}
    try:
        for cid, setup in SETUPS:
            d = root / cid
            d.mkdir()
            setup(d, CASES[cid])
            dirs[cid] = d
        for cid, d in dirs.items():
            before[cid] = snapshot(d) if "unreadable" not in cid else None
        spec = {
            "preimport": ["edgeseg.cli.main", "edgeseg.cli.train", "edgeseg.cli.evaluate", "edgeseg.cli.segment",
                          "edgeseg.cli.export", "edgeseg.cli.data",
                          "edgeseg.pipeline", "edgeseg.mobile.export", "edgeseg.data.validate"],
            "out": str(root),
            "cases": [{"id": c.id, "argv": c.argv, "cwd": str(dirs[c.id]), "timeout": c.timeout, "deny": c.deny,
                       "env": c.env} for c in CASES.values()],
        }
        env = dict(os.environ, OMP_NUM_THREADS="1", EDGESEG_CACHE=str(cache), COLUMNS="120")
        env.pop("PYTHONWARNINGS", None)  # as a user runs it
        p = subprocess.run([sys.executable, str(TESTS / "cli_driver.py")], input=json.dumps(spec),
                           capture_output=True, text=True, timeout=600, env=env, cwd=root)
        assert p.returncode == 0, p.stderr[-5000:]
        # the imports themselves print nothing (no warning noise before any error line)
        assert p.stderr == "", p.stderr[-3000:]
        res = json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        for h in HOLDERS:
            h.kill()
            h.wait()
        for cid, d in dirs.items():
            if "unreadable" in cid:
                (d / "ds" / "masks").chmod(0o755)
    after = {cid: snapshot(d) if before[cid] is not None else None for cid, d in dirs.items()}
    return {"res": res, "before": before, "after": after, "dirs": dirs, "cache": cache}


@pytest.mark.parametrize("cid", [c for c in CASES if CASES[c].rc == 2])
def test_bad_input_is_one_line_exit_2_and_nothing_changes(results, cid):
    c, r = CASES[cid], results["res"][cid]
    out = r["stdout"] + r["stderr"]
    assert r["rc"] == 2, (r["rc"], out[-3000:])
    assert "Traceback" not in out, out[-3000:]
    lines = r["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r["stderr"]
    for n in c.needles:
        assert n in lines[0], (n, lines[0])
    if results["before"][cid] is not None:
        assert results["after"][cid] == results["before"][cid], "the case's folder changed"


def test_runs_with_bad_settings_write_no_run_folder(results):
    for cid, c in CASES.items():
        if c.argv[0] in ("distill", "train-teacher") and not cid.startswith(("run-in-use", "resume")):
            assert not (results["dirs"][cid] / "runs").exists(), cid


def test_preset_name_cannot_write_outside_the_working_folder(results):
    d = results["dirs"]["export-preset-name-escapes"]
    assert not list(d.parent.parent.glob("escaped")) and not list(d.parent.glob("escaped"))


def test_newline_in_a_file_name_keeps_names_and_images_aligned(results):
    r = results["res"]["newline-in-a-file-name"]
    assert r["rc"] == 0, r["stderr"]
    os.environ["EDGESEG_CACHE"], old = str(results["cache"]), os.environ.get("EDGESEG_CACHE")
    try:
        from edgeseg.data import load_arrays

        arrays, _ = load_arrays("folder", results["dirs"]["newline-in-a-file-name"] / "ds", size=128)
    finally:
        if old is None:
            del os.environ["EDGESEG_CACHE"]
        else:
            os.environ["EDGESEG_CACHE"] = old
    names = [n for split in arrays.values() for n in split[2]]
    assert "two\nlines" in names and len(names) == 10
    for split, (im, m, nm) in arrays.items():
        assert len(im) == len(m) == len(nm), split


def test_16_bit_grey_image_is_scaled_not_clipped(results):
    r = results["res"]["image-16-bit-grey"]
    assert r["rc"] == 0, r["stderr"]
    os.environ["EDGESEG_CACHE"], old = str(results["cache"]), os.environ.get("EDGESEG_CACHE")
    try:
        from edgeseg.data import load_arrays

        arrays, _ = load_arrays("folder", results["dirs"]["image-16-bit-grey"] / "ds", size=128)
    finally:
        if old is None:
            del os.environ["EDGESEG_CACHE"]
        else:
            os.environ["EDGESEG_CACHE"] = old
    found = [im[i] for im, _, names in arrays.values() for i, n in enumerate(names) if n == "case009"]
    assert len(found) == 1
    img = np.asarray(found[0], np.float64)
    # 20000/65535 and 40000/65535 of full scale: about 78 and 156, not 255 everywhere
    assert 60 < img.min() < 100 and 140 < img.max() < 170, (img.min(), img.max())


def test_the_lock_of_the_running_process_is_left_alone(results):
    for cid in ("run-in-use-resume", "run-in-use-new"):
        lock = results["dirs"][cid] / "runs" / "r" / "run.lock"
        assert lock.is_file(), cid  # still there (snapshot equality checks its content too)


def test_all_cases_ran_quickly_and_small(results):
    """No case trains, loads data it does not need, or allocates a network before checking it."""
    slow = {cid: r["seconds"] for cid, r in results["res"].items() if r["seconds"] > 20}
    assert not slow, slow
    base = results["res"]["epochs-0"]["maxrss_mb"]
    big = {cid: r["maxrss_mb"] for cid, r in results["res"].items() if r["maxrss_mb"] > base + 400}
    assert not big, (base, big)
