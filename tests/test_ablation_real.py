"""The equal-wall-time real-data ablation (bench/ablation.py --suite real) and the real-lesion
Table I (bench/isic2017.py) with both U-Net baselines, end to end on a small ISIC 2017 layout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import make_isic2017

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "edgeseg" / "assets" / "tiny-teacher-isic2017.safetensors"
ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def isic(tmp_path_factory) -> Path:
    return make_isic2017(tmp_path_factory.mktemp("isic") / "isic2017", sizes=(20, 4, 6))


def _run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_real_suite_quick_trains_for_equal_time_and_pairs_by_seed(tmp_path, isic):
    out, work = tmp_path / "res", tmp_path / "work"
    names = "teacher,efkd-tau0.6,efkd-focus-seg,unet,unet-flops"
    _run([str(REPO / "bench" / "ablation.py"), "--quick", "--dataset", "isic2017", "--data-dir", str(isic),
          "--teacher", str(TEACHER), "--only", names, "--out", str(out), "--work", str(work), "--jobs", "2"], tmp_path)
    doc = json.loads((out / "ablation-isic2017.json").read_text())
    assert doc["suite"] == "real" and doc["budget"]["train_seconds"] > 0
    assert "DATA_DIR" in doc["command"] and str(isic) not in doc["command"]  # no machine's own data path
    runs = {r["variant"]: r for r in doc["runs"]}
    assert set(runs) == set(names.split(","))
    for name in ("efkd-tau0.6", "efkd-focus-seg", "unet", "unet-flops"):  # same wall time, not same steps
        assert runs[name]["train_seconds"] >= doc["budget"]["train_seconds"], name
        assert runs[name]["train_steps"] >= 1, name
    # the same-GFLOP U-Net really costs what the student costs per image (within 10%)
    c = doc["cost"]
    assert abs(c["unet-flops"]["gflop"] / c["efkd-focus-seg"]["gflop"] - 1) < 0.1
    assert c["unet"]["gflop"] < 0.2 * c["unet-flops"]["gflop"]
    assert runs["unet-flops"]["channels"][0] > runs["unet"]["channels"][0]
    # paired differences, seed by seed, per image
    p = doc["paired"]["efkd-focus-seg - unet-flops"]
    assert p["dsc"]["seeds"] == [0] and p["dsc"]["n"] == 6  # the layout's 6 test images
    assert p["dsc"]["wins"] + p["dsc"]["losses"] <= p["dsc"]["n"]
    md = (out / "ablation-isic2017.md").read_text()
    for text in ("Objective and baselines", "Ideas for few-step students", "Paired differences", "train steps"):
        assert text in md, text
    for png in ("tau", "overlays", "tradeoff"):
        assert (out / f"ablation-isic2017-{png}.png").read_bytes()[:4] == b"\x89PNG"
    # --report-only trains nothing and reproduces the aggregate
    r = _run([str(REPO / "bench" / "ablation.py"), "--quick", "--dataset", "isic2017", "--data-dir", str(isic),
              "--teacher", str(TEACHER), "--only", names, "--out", str(out), "--work", str(work), "--report-only"],
             tmp_path)
    assert "5 already done" in r.stdout.replace("\n", " ")
    assert json.loads((out / "ablation-isic2017.json").read_text())["aggregate"] == doc["aggregate"]


# the 64-px shipped pair keeps these end-to-end runs fast; the table code is the same at any size
SHIPPED_64 = ["--teacher", "tiny-teacher-isic2017", "--student", "tiny-student-isic2017"]


def test_isic2017_table_trains_both_unets_and_pairs_them(tmp_path, isic):
    out, longer = tmp_path / "t1", tmp_path / "t1-longer"
    unet_only = [str(REPO / "bench" / "isic2017.py"), "--data-dir", str(isic), "--threads", "1", *SHIPPED_64,
                 "--stage", "unet", "--unets", "own", "--unet-seconds", "3", "--out", str(longer)]
    _run(unet_only, tmp_path)
    # a second start would overwrite the run's state: refused by name; --resume keeps the finished run
    r = subprocess.run([sys.executable, *unet_only], capture_output=True, text=True, cwd=tmp_path, env=ENV)
    assert r.returncode != 0 and "unet-state.pt" in r.stderr and "--resume" in r.stderr and "Traceback" not in r.stderr
    weights = (longer / "unet.safetensors").read_bytes()
    assert "resumed at step" in _run([*unet_only, "--resume"], tmp_path).stdout
    assert (longer / "unet.safetensors").read_bytes() == weights
    _run([str(REPO / "bench" / "isic2017.py"), "--data-dir", str(isic), "--unet-seconds", "2", "--threads", "1",
          *SHIPPED_64, "--unet-dirs", str(longer),
          "--out", str(out)], tmp_path)
    doc = json.loads((out / "results.json").read_text())
    assert "U-Net, own size (Dice+BCE), 3 s" in doc["rows"]  # the --unet-dirs row, named with its time
    assert set(doc["paired"]) == {"student - teacher", "student - unet", "student - unet-same-gflop",
                                  "student - unet-3s"}
    del doc["paired"]["student - unet-3s"], doc["paired_photo_size"]["student - unet-3s"]
    own = json.loads((out / "unet-train.json").read_text())
    same = json.loads((out / "unet-same-gflop-train.json").read_text())
    assert own["channels"] == [8, 16, 24, 32, 48] and same["channels"][0] > 8
    rows = doc["rows"]
    student_gflop = rows["student (EFKD)"]["cost"]["gflop"]
    same_row = rows["U-Net, same GFLOP as the student (Dice+BCE)"]
    assert abs(same_row["cost"]["gflop"] / student_gflop - 1) < 0.1
    assert set(doc["paired"]) == {"student - teacher", "student - unet", "student - unet-same-gflop"}
    assert all(set(p) == {"dsc", "bf"} for p in doc["paired"].values())
    # the same rows at each photo's own size (upsampled and cleaned as `segment` does it), paired too
    assert set(doc["paired_photo_size"]) == set(doc["paired"]) | {"teacher - student"}
    for name in ("teacher", "student (EFKD)", "U-Net, own size (Dice+BCE)"):
        from edgeseg.defaults import MASK_CLEANUP, MASK_CLEANUPS

        by_cleanup = rows[name]["photo_metrics_by_cleanup"]
        assert set(by_cleanup) == set(MASK_CLEANUPS) and rows[name]["photo_metrics"] == by_cleanup[MASK_CLEANUP]
        assert all(0 <= m["dsc"]["mean"] <= 1 for m in by_cleanup.values())
        photo = rows[name]["photo_metrics"]
        assert abs(photo["dsc"]["mean"] - rows[name]["metrics"]["dsc"]["mean"]) < 0.2
    for name in ("teacher", "student (EFKD)", "U-Net, own size (Dice+BCE)"):  # the same uncertainty measure for all
        u = rows[name]["uncertainty"]
        assert 0 <= u["ece"] <= 1 and (u["auroc"] != u["auroc"] or 0 <= u["auroc"] <= 1), name
    sizes = doc["by_lesion_size"]  # the bins partition the images; their weighted means give the photo-size Dice
    assert sum(sizes["images"].values()) == doc["n_images"] and set(sizes["dsc"]) == set(rows) - {"Otsu (CIELAB L)"}
    for name, per_bin in sizes["dsc"].items():
        weighted = sum(sizes["images"][b] * d for b, d in per_bin.items() if d is not None) / doc["n_images"]
        assert abs(weighted - rows[name]["photo_metrics"]["dsc"]["mean"]) < 1e-9, name
    md = (out / "table.md").read_text()
    assert "Paired differences" in md and "AUROC" in md and "by the lesion's share of the photo" in md
    assert (out / "overlays.png").read_bytes()[:4] == b"\x89PNG"


def test_lesion_size_bins_split_the_images_by_true_lesion_share():
    sys.path.insert(0, str(REPO))
    from bench.isic2017 import LESION_SIZE_BINS, by_lesion_size

    truth = [np.zeros((10, 10), bool) for _ in range(4)]
    truth[1][:2] = True  # 20%
    truth[2][:5] = True  # 50%
    truth[3][:] = True   # 100%
    sizes = by_lesion_size({"m": {"dsc": np.array([0.1, 0.2, 0.3, 0.5])}}, truth)
    small, medium, large = (name for name, _, _ in LESION_SIZE_BINS)
    assert sizes["images"] == {small: 1, medium: 1, large: 2}
    assert sizes["dsc"]["m"] == {small: 0.1, medium: 0.2, large: 0.4}


def test_isic2017_table_sizes_the_unet_and_samples_the_student_at_the_given_ensemble(tmp_path, isic):
    from edgeseg.baselines import unet_channels_like

    out = tmp_path / "n1"
    _run([str(REPO / "bench" / "isic2017.py"), "--data-dir", str(isic), "--unet-seconds", "2", "--threads", "1",
          *SHIPPED_64,
          "--unets", "same-gflop", "--ensemble", "1", "--out", str(out)], tmp_path)
    same = json.loads((out / "unet-same-gflop-train.json").read_text())
    assert same["channels"] == list(unet_channels_like("tiny-student", 64, ensemble=1))
    assert same["channels"] != list(unet_channels_like("tiny-student", 64))  # N = 3 would be three times the cost
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows["student (EFKD)"]["sampler"].endswith("x 1") and rows["teacher"]["sampler"].endswith("x 3")
    r = subprocess.run([sys.executable, str(REPO / "bench" / "isic2017.py"), "--data-dir", str(isic),
                        "--ensemble", "0", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "--ensemble must be at least 1, got 0" in r.stderr


def test_a_variant_with_its_own_teacher_is_taught_and_scored_by_it(tmp_path, isic, monkeypatch, capsys):
    sys.path.insert(0, str(REPO))
    import bench.ablation as ab
    import bench.ablation_common as abc
    import bench.ablation_real as abr

    other = REPO / "edgeseg" / "assets" / "tiny-teacher-synthetic.safetensors"
    job = {"teacher": str(TEACHER), "dataset": "isic2017", "data_dir": str(isic), "work": str(tmp_path),
           "threads": 1, "student_preset": "tiny-student"}
    monkeypatch.setattr(abr, "LONGER_TEACHER", str(other))
    vs = {v.name: v for v in abr.real_variants()}
    assert abc.teacher_path(vs["teacher-longer"], job) == str(other)
    assert abc.teacher_path(vs["teacher"], job) == str(TEACHER)
    budget = abc.replace(abr.REAL_QUICK, eval_images=6, per_image=True)
    own, shipped = (abc.run_one(vs[n], 0, budget, job)["metrics"]["per_image"]["dsc"] for n in ("teacher-longer", "teacher"))
    assert own != shipped  # another network scored the same images
    # a variant whose teacher is missing stops before any work, naming the file
    monkeypatch.setattr(abr, "LONGER_TEACHER", str(tmp_path / "missing.safetensors"))
    rc = ab.main(["--dataset", "isic2017", "--data-dir", str(isic), "--teacher", str(TEACHER),
                  "--only", "teacher-longer", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")])
    out = "".join(capsys.readouterr().out.split())  # rich folds long paths at the console's width
    assert rc == 2 and "teacher-longer" in out and "missing.safetensors" in out
