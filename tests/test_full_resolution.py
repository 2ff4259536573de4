"""bench/full_resolution.py: photos larger than the model's input through segment's path, end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _pair(folder: Path, name: str, w: int, h: int, cx: float) -> None:
    yy, xx = np.mgrid[0:h, 0:w]
    lesion = ((xx - cx * w) / (0.2 * w)) ** 2 + ((yy - 0.5 * h) / (0.25 * h)) ** 2 < 1
    rgb = np.full((h, w, 3), (214, 170, 150), np.uint8)
    rgb[lesion] = (110, 70, 55)
    Image.fromarray(rgb).save(folder / f"{name}.jpg", quality=95)
    Image.fromarray(lesion.astype(np.uint8) * 255).save(folder / f"{name}_segmentation.png")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "full_resolution.py"), *args], capture_output=True,
                          text=True, timeout=600, cwd=REPO)


def test_photos_are_scored_at_their_own_size(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    _pair(photos, "a", 900, 600, 0.4)
    _pair(photos, "b", 640, 480, 0.6)
    (photos / "c.jpg").write_bytes((photos / "a.jpg").read_bytes())  # no mask beside it: not a test photo
    out = tmp_path / "out"
    r = _run("--photos", str(photos), "--model", "tiny-student-isic2017", "--threads", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((out / "results.json").read_text())
    assert [p["photo"] for p in doc["photos"]] == ["a.jpg", "b.jpg"]
    assert doc["photos"][0]["size"] == [900, 600]
    assert abs(doc["photos"][1]["lesion_fraction"] - np.pi * 0.2 * 0.25) < 0.01
    assert set(doc["summary"]) == {"segment", "area resize"}  # no --data-dir: no small copies
    assert doc["summary"]["segment"]["dsc"] > 0.5  # a dark ellipse on skin is found
    assert "| segment |" in (out / "table.md").read_text()


def test_a_mask_of_another_size_is_refused_by_name(tmp_path):
    _pair(tmp_path, "a", 300, 200, 0.5)
    Image.fromarray(np.zeros((100, 150), np.uint8)).save(tmp_path / "a_segmentation.png")
    r = _run("--photos", str(tmp_path), "--model", "tiny-student-isic2017", "--threads", "1",
             "--out", str(tmp_path / "out"))
    assert r.returncode != 0 and "a.jpg: mask (150, 100) is not the photo's size (300, 200)" in r.stderr
