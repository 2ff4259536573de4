"""ISIC 2017 Part 1 and PH2: official layouts on small fixtures, the shared ISIC 2017 copy, bad input."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from data_fixtures import ISIC17, PH2_IMAGES, make_isic2017, make_ph2  # noqa: E402

from edgeseg.data import DATASETS, load_dataset  # noqa: E402
from edgeseg.errors import DatasetError  # noqa: E402

SHARED_ISIC2017 = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic2017"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESEG_CACHE", str(tmp_path / "cache"))


def test_isic2017_official_splits_ignore_superpixels_and_csv(tmp_path):
    root = make_isic2017(tmp_path / "isic2017", sizes=(5, 2, 3))
    ds = {k: load_dataset("isic2017", k, data_dir=root, size=32) for k in ("train", "val", "test", "all")}
    assert [len(ds[k]) for k in ("train", "val", "test", "all")] == [5, 2, 3, 10]
    # the split comes from the folder, not from a proportion of sorted ids
    assert ds["val"].names == ["ISIC_0000005", "ISIC_0000006"]
    assert ds["test"].names == ["ISIC_0000007", "ISIC_0000008", "ISIC_0000009"]
    assert ds["all"].names == [f"ISIC_{i:07d}" for i in range(10)]
    assert not any("superpixels" in n for n in ds["all"].names)
    image, mask, _ = ds["test"][0]
    assert image.shape == (3, 32, 32) and set(mask.unique().tolist()) == {-1.0, 1.0}
    assert image.mean(0)[mask[0] > 0].mean() < image.mean(0)[mask[0] < 0].mean()


@pytest.mark.parametrize("point_at", ["PH2Dataset", "images folder"])
def test_ph2_layout_bmp_1bit_and_8bit_masks(tmp_path, point_at):
    root = make_ph2(tmp_path / "PH2Dataset", n=10)
    data_dir = root if point_at == "PH2Dataset" else root / PH2_IMAGES
    ds = {k: load_dataset("ph2", k, data_dir=data_dir, size=32) for k in ("train", "val", "test", "all")}
    # DermoSegDiff's 80/20/100 of 200, proportionally on 10 cases; sorted ids
    assert [len(ds[k]) for k in ("train", "val", "test")] == [4, 1, 5]
    assert ds["all"].names == sorted(ds["all"].names) and len(ds["all"]) == 10
    assert ds["train"].names[0] == "IMD002"
    masks = np.asarray(ds["all"].masks)
    # 1-bit (even cases) and 8-bit (odd cases) masks read alike: the same rectangle
    assert set(np.unique(masks).tolist()) == {0, 1}
    np.testing.assert_array_equal(masks[0], masks[1])
    image, mask, _ = ds["all"][1]
    assert image.mean(0)[mask[0] > 0].mean() < image.mean(0)[mask[0] < 0].mean()


def test_ph2_official_split_sizes():
    from edgeseg.data.layouts import split_ids

    s = split_ids([f"IMD{i:03d}" for i in range(200)], "ph2")
    assert [len(s[k]) for k in ("train", "val", "test")] == [80, 20, 100]


def test_shared_isic2017_copy_split_sizes():
    """The ISIC 2017 copy beside the repository (CI has it): the official 2000 / 150 / 600."""
    assert SHARED_ISIC2017.is_dir(), f"expected the ISIC 2017 copy at {SHARED_ISIC2017}"
    sizes = {k: len(load_dataset("isic2017", k, data_dir=SHARED_ISIC2017, size=32))
             for k in ("train", "val", "test")}
    assert sizes == {"train": 2000, "val": 150, "test": 600}
    test = load_dataset("isic2017", "test", data_dir=SHARED_ISIC2017, size=32)
    frac = np.asarray(test.masks).mean(axis=(1, 2))
    assert frac.min() > 0 and 0.1 < frac.mean() < 0.4  # every mask has a lesion, none is all lesion


# ---------------- bad input: one line naming the file or folder ----------------
def test_ph2_case_without_lesion_mask(tmp_path):
    root = make_ph2(tmp_path / "PH2Dataset", n=4)
    shutil.rmtree(root / PH2_IMAGES / "IMD005" / "IMD005_lesion")
    with pytest.raises(DatasetError) as e:
        load_dataset("ph2", "all", data_dir=root, size=32)
    msg = str(e.value)
    assert "IMD005" in msg and "lesion mask" in msg and "\n" not in msg


def test_isic2017_image_without_mask(tmp_path):
    root = make_isic2017(tmp_path / "isic2017")
    (root / ISIC17["val"][1] / "ISIC_0000006_segmentation.png").unlink()
    with pytest.raises(DatasetError) as e:
        load_dataset("isic2017", "train", data_dir=root, size=32)
    msg = str(e.value)
    assert "ISIC_0000006.jpg" in msg and "no mask" in msg and "ISIC_0000006_segmentation.png" in msg


def test_isic2017_missing_split_folder(tmp_path):
    root = make_isic2017(tmp_path / "isic2017")
    shutil.rmtree(root / ISIC17["test"][0])
    with pytest.raises(DatasetError, match="ISIC-2017_Test_v2_Data"):
        load_dataset("isic2017", "train", data_dir=root, size=32)


def test_unknown_split_and_dataset_list_the_known_ones(tmp_path):
    root = make_ph2(tmp_path / "PH2Dataset", n=4)
    with pytest.raises(DatasetError, match="unknown split 'testing'.*train, val, test, all"):
        load_dataset("ph2", "testing", data_dir=root, size=32)
    with pytest.raises(DatasetError) as e:
        load_dataset("isic2016", "train", data_dir=root, size=32)
    assert all(name in str(e.value) for name in DATASETS)


def test_ph2_cli_info_and_bad_folder(tmp_path):
    root = make_ph2(tmp_path / "PH2Dataset", n=4)
    env = {"EDGESEG_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "edgeseg.cli.main", "data", "info", "--dataset", "ph2"]
    r = subprocess.run(cmd + ["--data-dir", str(root)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "test" in r.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run(cmd + ["--data-dir", str(empty)], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "IMDxxx" in r.stderr and str(empty) in r.stderr


def test_evaluate_scores_a_checkpoint_on_ph2_all(tmp_path):
    """`edgeseg evaluate --dataset ph2 --data-dir DIR --split all` writes the metrics JSON and overlays."""
    import json

    root = make_ph2(tmp_path / "PH2Dataset", n=6)
    env = {"EDGESEG_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "edgeseg.cli.main", "evaluate", "--checkpoint", "tiny-student-synthetic",
                        "--dataset", "ph2", "--data-dir", str(root), "--split", "all", "--out", str(tmp_path / "ev")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "ev" / "eval-tiny-student-synthetic-all-ddim1x3.json").read_text())
    assert report["dataset"] == "ph2" and report["split"] == "all" and report["n_images"] == 6
    assert 0.0 <= report["dsc"] <= 1.0 and (tmp_path / "ev" / "overlays" / "tiny-student-synthetic-all-ddim1x3.png").is_file()
