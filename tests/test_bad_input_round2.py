"""Issue 30 (reliability, round two): the second probe's cases, continuing tests/test_bad_input.py.

The command-line cases run through the real entry point in one forked process per case
(tests/cli_driver.py), as in test_bad_input.py: a user error is exit 2, one ``error:`` line and
the case's folder unchanged. The library halves (the one image reader, Segmenter, export
placement) are checked in this process. Photos are small synthetic ones; the model is the
shipped tiny real-lesion student.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

TESTS = Path(__file__).resolve().parent
ASSETS = TESTS.parent / "edgeseg" / "assets"
BIG = str(2**63 + 5)


def photo(w: int = 80, h: int = 48, seed: int = 0) -> np.ndarray:
    """Skin with a dark lesion in the upper-left quarter: any rotation moves the lesion."""
    rng = np.random.default_rng(seed)
    img = rng.integers(170, 230, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    lesion = ((yy - h * 0.3) / (h * 0.22)) ** 2 + ((xx - w * 0.28) / (w * 0.2)) ** 2 < 1
    img[lesion] = (img[lesion] * 0.3).astype(np.uint8)
    return img


def save(arr: np.ndarray, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


# ---------------------------------------------------------------------------------------- the CLI cases
@dataclass
class Case:
    id: str
    argv: list[str]
    needles: tuple[str, ...] = ()
    rc: int = 2
    timeout: int = 60
    env: dict = field(default_factory=dict)


CASES: dict[str, Case] = {}
SETUPS = []
HOLDERS: list[subprocess.Popen] = []


def case(id: str, *argv: str, needles=(), rc: int = 2):
    def deco(setup):
        CASES[id] = Case(id, [str(a) for a in argv], tuple(needles), rc)
        SETUPS.append((id, setup))
        return setup

    return deco


def two_photos(d: Path, c: Case) -> None:
    save(photo(seed=1), d / "a.png")
    save(photo(seed=2), d / "b.png")


def hold(d: Path, code: str) -> None:
    """Another process that holds something (a run folder's lock, an output folder) and keeps running."""
    p = subprocess.Popen([sys.executable, "-c", code + "; print('ready', flush=True); time.sleep(600)"], cwd=d,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    HOLDERS.append(p)


# item 2: no output replaces an input, nor (without --overwrite) any file
@case("segment-overwrites-its-input", "segment", "a.png", "a_mask.png", "--out", ".",
      needles=("a_mask.png", "input"))
def _(d, c):
    two_photos(d, c)
    save(photo(seed=3), d / "a_mask.png")


@case("segment-output-exists", "segment", "a.png", "--out", "o", needles=("o/a_overlay.png", "--overwrite"))
def _(d, c):
    two_photos(d, c)
    (d / "o").mkdir()
    (d / "o" / "a_overlay.png").write_bytes(b"an earlier result")


# item 3: a batch fails whole or not at all
@case("segment-unreadable-in-batch", "segment", "a.png", "text.jpg", "b.png", "--out", "o",
      needles=("text.jpg", "unreadable"))
def _(d, c):
    two_photos(d, c)
    (d / "text.jpg").write_text("not a photo\n")


@case("segment-skip-unreadable", "segment", "a.png", "text.jpg", "b.png", "--out", "o", "--skip-unreadable", rc=3)
def _(d, c):
    two_photos(d, c)
    (d / "text.jpg").write_text("not a photo\n")


# item 4: output names
@case("segment-one-photo-300-times", "segment", *(["a.png"] * 150 + ["./a.png"] * 150), "--out", "o", rc=0)
def _(d, c):
    two_photos(d, c)


LONG = "L" * 245


@case("segment-long-names-and-shared-stems", "segment", f"{LONG}.png", *(f"d{i}/x.png" for i in range(4)),
      "--out", "o", rc=0)
def _(d, c):
    save(photo(seed=4), d / f"{LONG}.png")
    for i in range(4):
        save(photo(seed=10 + i), d / f"d{i}" / "x.png")


# item 5: seeds out of range, before any work
for cid, argv in [("segment-seed-past-2-63", ("segment", "a.png", "--seed", BIG)),
                  ("evaluate-seed-past-2-63", ("evaluate", "--seed", BIG)),
                  ("export-seed-past-2-63", ("export", "--seed", BIG)),
                  ("distill-seed-negative", ("distill", "--seed", "-1", "--runs-dir", "runs")),
                  ("data-info-seed-negative", ("data", "info", "--dataset", "synthetic", "--seed", "-1")),
                  ("data-preview-seed-negative", ("data", "preview", "--dataset", "synthetic", "--out", "g.png",
                                                  "--seed", "-3"))]:
    case(cid, *argv, needles=("--seed",))(two_photos)


# item 6
@case("segment-out-empty", "segment", "a.png", "--out", "", needles=("--out",))
def _(d, c):
    two_photos(d, c)


@case("evaluate-out-empty", "evaluate", "--out", "", "--max-images", "1", needles=("--out",))
def _(d, c):
    pass


@case("evaluate-into-a-run-in-use", "evaluate", "--checkpoint", "runs/r", "--max-images", "1",
      needles=("runs/r", "in use"))
def _(d, c):
    import shutil

    (d / "runs" / "r").mkdir(parents=True)
    for ext in (".safetensors", ".json"):
        shutil.copy(ASSETS / f"tiny-student-synthetic{ext}", d / "runs" / "r" / f"student{ext}")
    hold(d, "import time; from edgeseg.runlock import claim_run_dir; claim_run_dir('runs/r', resume=True)")


# item 7: checked before any work, nothing written
for cid, setting, needle in [("distill-batch-1e12", "batch_size=1e12", "--batch-size"),
                             ("distill-batch-20-digits", "batch_size=99999999999999999999", "--batch-size"),
                             ("distill-dataset-bogus", "dataset=bogus", "bogus"),
                             ("distill-preset-bogus", "preset=bogus", "bogus")]:
    case(cid, "distill", "--set", setting, "--runs-dir", "runs", needles=(needle,))(lambda d, c: None)


@case("export-into-a-folder-that-cannot-be-written", "export", "--target", "executorch", "--out",
      "/proc/edgeseg-probe.pte", needles=("/proc", "--out"))
def _(d, c):
    pass


def fake_pte(d: Path, steps: int = 1) -> Path:
    """A .pte with a well-formed sidecar (the program itself is not loadable)."""
    from types import SimpleNamespace

    from edgeseg.mobile.sidecar import student_sidecar, write_sidecar
    from edgeseg.models import PRESETS

    out = d / "m.pte"
    out.write_bytes(b"not really a program")
    meta = student_sidecar(SimpleNamespace(preset=PRESETS["tiny-student"]), "executorch", out, steps, 2, 1, "none",
                           None, "synthetic")
    write_sidecar(out, meta)
    return out


@case("segment-pte-steps-mismatch", "segment", "a.png", "--model", "m.pte", "--steps", "2",
      needles=("m.pte", "steps=1"))
def _(d, c):
    two_photos(d, c)
    fake_pte(d)


@case("profile-out-dir-is-a-file", "profile", "m.pte", "--out-dir", "FILE", needles=("FILE", "--out-dir"))
def _(d, c):
    fake_pte(d)
    (d / "FILE").write_text("mine")


@case("profile-out-dir-empty", "profile", "m.pte", "--out-dir", "", needles=("--out-dir",))
def _(d, c):
    fake_pte(d)


# item 9: two runs into one --out
@case("segment-out-held-by-another-run", "segment", "a.png", "--out", "o", needles=("o", "in use"))
def _(d, c):
    two_photos(d, c)
    (d / "o").mkdir()
    hold(d, "import fcntl, os, time; fd = os.open('o', os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)")


@case("data-preview-help", "data", "preview", "--help", rc=0)
def _(d, c):
    pass


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.is_dir(), p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(d.rglob("*"))}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input-2")
    sys.path.insert(0, str(TESTS))
    dirs, before = {}, {}
    try:
        for cid, setup in SETUPS:
            dirs[cid] = root / cid
            dirs[cid].mkdir()
            setup(dirs[cid], CASES[cid])
            before[cid] = snapshot(dirs[cid])
        spec = {"preimport": ["edgeseg.cli.main", "edgeseg.cli.segment", "edgeseg.cli.train", "edgeseg.pipeline",
                              "edgeseg.segmenter", "edgeseg.mobile.export", "edgeseg.mobile.sidecar"],
                "out": str(root),
                "cases": [{"id": c.id, "argv": c.argv, "cwd": str(dirs[c.id]), "timeout": c.timeout, "env": c.env}
                          for c in CASES.values()]}
        env = dict(os.environ, OMP_NUM_THREADS="1", EDGESEG_CACHE=str(root / "cache"), COLUMNS="120")
        env.pop("PYTHONWARNINGS", None)
        p = subprocess.run([sys.executable, str(TESTS / "cli_driver.py")], input=json.dumps(spec),
                           capture_output=True, text=True, timeout=600, env=env, cwd=root)
        assert p.returncode == 0, p.stderr[-5000:]
        res = json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        for h in HOLDERS:
            h.kill()
            h.wait()
            h.stdout.close()
    return {"res": res, "dirs": dirs, "before": before, "after": {cid: snapshot(d) for cid, d in dirs.items()}}


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
    assert results["after"][cid] == results["before"][cid], "the case's folder changed"
    assert r["seconds"] < 20, r["seconds"]  # refused before any lowering, profiling or training


def test_an_unreadable_photo_can_be_skipped_and_the_exit_code_says_so(results):
    r, d = results["res"]["segment-skip-unreadable"], results["dirs"]["segment-skip-unreadable"]
    assert r["rc"] == 3, r["stderr"]
    assert "skipped: text.jpg" in r["stderr"] and "1 of 3" in r["stderr"]
    assert sorted(p.name for p in (d / "o").iterdir()) == sorted(
        f"{s}_{k}.png" for s in "ab" for k in ("mask", "overlay", "uncertainty"))


def test_one_photo_given_300_times_is_one_result(results):
    r, d = results["res"]["segment-one-photo-300-times"], results["dirs"]["segment-one-photo-300-times"]
    assert r["rc"] == 0, r["stderr"][-2000:]
    assert sorted(p.name for p in (d / "o").iterdir()) == ["a_mask.png", "a_overlay.png", "a_uncertainty.png"]


def test_long_and_shared_names_stay_bounded_and_unique(results):
    key = "segment-long-names-and-shared-stems"
    r, d = results["res"][key], results["dirs"][key]
    assert r["rc"] == 0, r["stderr"][-2000:]
    names = [p.name for p in (d / "o").iterdir()]
    masks = [n for n in names if n.endswith("_mask.png")]
    assert len(names) == 15 and len(masks) == 5 and all(len(os.fsencode(n)) <= 255 for n in names)
    assert {n for n in masks if n.startswith("d")} == {f"d{i}_x_png_mask.png" for i in range(4)}
    long = [n for n in masks if n.startswith("LLL")]
    assert len(long) == 1 and len(long[0]) < 245 + len("_mask.png")


def test_data_preview_help_names_every_dataset(results):
    r = results["res"]["data-preview-help"]
    assert r["rc"] == 0 and "isic2017" in r["stdout"] and "ph2" in r["stdout"], r["stdout"]


def test_bad_training_settings_leave_no_run_folder(results):
    for cid in CASES:
        if cid.startswith("distill-"):
            assert not (results["dirs"][cid] / "runs").exists(), cid


# ---------------------------------------------------------------------------------------- the library halves
@pytest.fixture(scope="module")
def seg():
    from edgeseg.segmenter import Segmenter

    return Segmenter.from_pretrained("tiny-student-isic2017", ensemble=1)  # one member: fast, same code path


# EXIF orientation o is undone by applying this to the displayed photo (PIL's exif_transpose inverse)
STORE = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def exif_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def stored_rotated(displayed: np.ndarray, orientation: int, path: Path) -> Path:
    """`displayed` saved as a phone does: pixels stored turned, EXIF Orientation to show them upright."""
    Image.fromarray(displayed).transpose(STORE[orientation]).save(path, exif=exif_orientation(orientation))
    with Image.open(path) as check:  # the file really displays as `displayed`
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(check).convert("RGB")), displayed)
    return path


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_photos_are_segmented_as_displayed(seg, tmp_path, orientation):
    shown = photo()
    path = stored_rotated(shown, orientation, tmp_path / "phone.png")
    want = seg.segment(shown)
    for given in (path, str(path), Image.open(path)):
        got = seg.segment(given)
        assert got.mask.shape == shown.shape[:2]
        assert np.array_equal(got.mask, want.mask) and np.allclose(got.probability, want.probability)


def test_datasets_read_photos_and_masks_as_displayed(tmp_path, monkeypatch):
    from edgeseg.data import load_arrays

    monkeypatch.setenv("EDGESEG_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "ds"
    lesion = (photo()[..., 0] < 120).astype(np.uint8) * 255
    for i in range(10):
        save(photo(seed=i), root / "images" / f"c{i}.png")
        save(lesion, root / "masks" / f"c{i}_mask.png")
    stored_rotated(photo(seed=0), 6, root / "images" / "c0.png")  # its mask is stored upright
    stored_rotated(photo(seed=1), 8, root / "images" / "c1.png")
    Image.fromarray(lesion).transpose(STORE[8]).save(root / "masks" / "c1_mask.png",
                                                     exif=exif_orientation(8))
    arrays, _ = load_arrays("folder", root, size=32)
    got = {n: (im, m) for split in arrays.values() for im, m, n in zip(*split)}
    ref_im, ref_m = got["c2"]
    for n in ("c0", "c1"):
        assert np.array_equal(got[n][1], ref_m), n  # masks line up with the displayed photos
        assert np.abs(got[n][0].astype(int) - ref_im.astype(int)).mean() < 30, n


def test_path_array_and_pil_of_one_jpeg_agree(seg, tmp_path):
    from edgeseg.viz import outline_overlay, uncertainty_heatmap

    big = np.asarray(Image.fromarray(photo(w=765, h=572, seed=5)))
    path = save(big, tmp_path / "big.jpg", quality=90)
    decoded = np.asarray(Image.open(path).convert("RGB"))
    a, b, c = seg.segment(path), seg.segment(decoded), seg.segment(Image.open(path))
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.mask, c.mask)
    result, rgb = seg.segment_photo(path)
    assert rgb.shape[:2] == result.mask.shape == (572, 765)
    assert outline_overlay(rgb, result.probability).shape == uncertainty_heatmap(result.uncertainty).shape


def test_16_bit_pil_images_are_scaled_like_16_bit_files(seg, tmp_path):
    grey = (photo()[..., 0].astype(np.uint16) * 257)
    path = save(grey, tmp_path / "g16.png")
    from_file, from_pil = seg.segment(path), seg.segment(Image.fromarray(grey))
    assert np.array_equal(from_file.mask, from_pil.mask)
    assert np.array_equal(from_pil.mask, seg.segment(np.repeat(photo()[..., :1], 3, axis=2)).mask)


def test_a_rotated_16_bit_photo_is_read_as_displayed(tmp_path):
    from edgeseg.imageio import read_rgb

    grey = photo()[..., 0].astype(np.uint16) * 257
    Image.fromarray(grey).transpose(STORE[6]).save(tmp_path / "g.png", exif=exif_orientation(6))
    with Image.open(tmp_path / "g.png") as check:
        assert check.mode.startswith("I")
    assert np.array_equal(read_rgb(tmp_path / "g.png")[..., 0], photo()[..., 0])


def test_32_bit_samples_are_refused_not_darkened(tmp_path):
    from edgeseg.errors import ImageReadError
    from edgeseg.imageio import check_image, read_rgb

    for arr in (photo()[..., 0].astype(np.int32) * 16, photo()[..., 0].astype(np.float32) / 255):
        path = save(arr, tmp_path / "x.tif")
        for fn in (read_rgb, check_image):
            with pytest.raises(ImageReadError, match="32-bit"):
                fn(path)


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 10, 3), (10, 0, 3)])
def test_empty_arrays_are_one_error(seg, shape):
    from edgeseg.errors import EdgesegError

    with pytest.raises(EdgesegError, match="no pixels"):
        seg.segment(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("hw", [(1, 1), (1, 10), (10, 1)])
def test_one_pixel_wide_photos_get_all_three_pictures(seg, hw):
    from edgeseg.viz import outline_overlay, uncertainty_heatmap

    result, rgb = seg.segment_photo(np.full((*hw, 3), 128, np.uint8))
    assert result.mask.shape == hw
    assert outline_overlay(rgb, result.probability).shape == uncertainty_heatmap(result.uncertainty).shape


@pytest.mark.parametrize("hw", [(20000, 20), (20, 20000)])
def test_heat_maps_of_extreme_aspect_ratios(hw):
    from edgeseg.viz import outline_overlay, uncertainty_heatmap

    u = np.random.default_rng(0).random(hw, dtype=np.float32)
    assert uncertainty_heatmap(u).shape == outline_overlay(np.zeros((*hw, 3), np.uint8), u).shape


def test_segmenter_limits_and_names_match_the_cli():
    from edgeseg.errors import EdgesegError
    from edgeseg.segmenter import Segmenter

    with pytest.raises(EdgesegError, match="ensemble"):
        Segmenter.from_pretrained(ensemble=10**6)
    with pytest.raises(EdgesegError, match="steps"):
        Segmenter.from_pretrained(steps=10**6)
    assert Segmenter.from_pretrained(Path("tiny-student-isic2017")).source == "tiny-student-isic2017"


def test_weights_without_a_recorded_hash_load_with_a_warning(tmp_path):
    import shutil

    from edgeseg.checkpoint import load_model
    from edgeseg.errors import UnverifiedWeightsWarning

    shutil.copy(ASSETS / "tiny-student-synthetic.safetensors", tmp_path / "s.safetensors")
    meta = json.loads((ASSETS / "tiny-student-synthetic.json").read_text())
    meta.pop("weights_sha256")
    (tmp_path / "s.json").write_text(json.dumps(meta))
    with pytest.warns(UnverifiedWeightsWarning, match="not verified"):
        load_model(tmp_path / "s.safetensors")


def test_ctrl_c_promises_a_checkpoint_only_where_one_exists(tmp_path, capsys):
    import typer

    from edgeseg.cli.common import training_interrupted, user_errors
    from edgeseg.runlock import claim_run_dir

    @user_errors(interrupted=training_interrupted)
    def train(state: bool):
        run = claim_run_dir(tmp_path / ("with" if state else "without"), resume=False)
        if state:
            (run / "state" / "student").mkdir(parents=True)
            (run / "state" / "student" / "state.json").write_text("{}")
        raise KeyboardInterrupt

    for state in (False, True):
        with pytest.raises(typer.Exit):
            train(state)
        line = capsys.readouterr().err.strip()
        assert ("last checkpoint is kept" in line) == state, line


# ---------------------------------------------------------------------------------------- item 8: the export set
def _set(tmp_path: Path, name: str, killed_at: str | None, monkeypatch, overwrite: bool = False):
    """Place a fake program, .bpte and sidecar through the real commit, optionally 'killed' as
    `killed_at` (the program or the .bpte) lands."""
    from types import SimpleNamespace

    from edgeseg.mobile import gate
    from edgeseg.mobile.sidecar import student_sidecar
    from edgeseg.models import PRESETS

    out = tmp_path / name
    tmp, bpte = tmp_path / f".{name}.1.tmp", tmp_path / f".{name}.2.tmp"
    tmp.write_bytes(b"program " + name.encode())
    bpte.write_bytes(b"bundled")
    meta = student_sidecar(SimpleNamespace(preset=PRESETS["tiny-student"]), "executorch", out, 1, 2, 1, "none",
                           None, "synthetic")
    real = gate.place

    def place(t, target, ow):
        if killed_at and target.name.endswith(killed_at):
            raise KeyboardInterrupt  # the process dies before this file lands
        real(t, target, ow)

    monkeypatch.setattr(gate, "place", place)
    try:
        return gate.gate_and_place(tmp, out, meta, None, overwrite, {".bpte": bpte})
    finally:
        monkeypatch.setattr(gate, "place", real)


@pytest.mark.parametrize("killed_at", [".pte", ".bpte"])
def test_a_killed_export_never_leaves_a_program_without_its_sidecar(tmp_path, monkeypatch, killed_at):
    from edgeseg.mobile import sidecar as sc
    from edgeseg.mobile.placement import check_output

    with pytest.raises(KeyboardInterrupt):
        _set(tmp_path, "k.pte", killed_at, monkeypatch)
    out = tmp_path / "k.pte"
    assert not out.exists() or sc.sidecar_path(out).exists()
    check_output(out, ".pte", overwrite=False)  # an incomplete set is replaced without --overwrite
    meta = _set(tmp_path, "k.pte", None, monkeypatch)
    assert sc.read_sidecar(out)["sha256"] == meta["sha256"] == sc.file_digest(out)[0]
    assert (tmp_path / "k.pte.bpte").read_bytes() == b"bundled"


def test_a_complete_set_still_needs_overwrite(tmp_path, monkeypatch):
    from edgeseg.errors import ExportError
    from edgeseg.mobile.placement import check_output

    _set(tmp_path, "k.pte", None, monkeypatch)
    with pytest.raises(ExportError, match="--overwrite"):
        check_output(tmp_path / "k.pte", ".pte", overwrite=False)
