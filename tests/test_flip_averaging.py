"""bench/flip_averaging.py: the views, the paired members, and one small end-to-end run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_fixtures import make_isic2017

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import bench.flip_averaging as fa  # noqa: E402


def test_each_view_is_its_own_inverse_and_the_four_differ():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    for j in range(len(fa.VIEWS)):
        assert torch.equal(fa.view(fa.view(x, j), j), x)
    assert len({fa.view(x, j)[0, 0].flatten().tolist().__repr__() for j in range(4)}) == 4
    assert torch.equal(fa.view(x, 3), x.flip(-1).flip(-2))


def test_flipped_members_map_back_to_the_photo_frame():
    """Member 0 (the photo as it is) is the same in both runs; the flipped members differ (the
    network is not exactly flip-equivariant) but, mapped back, agree with the plain ones on most
    pixels: a member flipped and not flipped back would not."""
    from edgeseg.checkpoint import load_model
    from edgeseg.runs import shipped_path

    model = load_model(shipped_path("tiny-student-isic2017")).eval()
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    lesion = (((yy - 20) ** 2 + (xx - 40) ** 2) < 150).float()  # off-centre, so a flip moves it
    images = (0.8 - 0.5 * lesion).expand(2, 3, 64, 64).contiguous()
    with torch.no_grad():
        plain, flips = fa.members(model, images, seed=0, batch=2)
    assert plain.shape == flips.shape == (2, 4, 64, 64)
    assert torch.equal(plain[:, 0], flips[:, 0])
    assert not torch.equal(plain[:, 1:], flips[:, 1:])
    agree = ((plain > 0) == (flips > 0)).float().mean().item()
    unflipped = ((plain[:, 1] > 0) == (fa.view(flips[:, 1], 1) > 0)).float().mean().item()
    assert agree > 0.9 and unflipped < agree


@pytest.fixture(scope="module")
def isic(tmp_path_factory) -> Path:
    return make_isic2017(tmp_path_factory.mktemp("isic") / "isic2017", sizes=(4, 3, 2))


def test_end_to_end_small(tmp_path, isic):
    cmd = [sys.executable, str(REPO / "bench" / "flip_averaging.py"), "--data-dir", str(isic), "--split", "val",
           "--models", "tiny-student-isic2017", "--threads", "1", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["n_images"] == 3 and [m["model"] for m in doc["models"]] == ["tiny-student-isic2017"]
    rows = doc["models"][0]["rows"]
    assert rows["plain N=1"] == rows["flips N=1"]  # view 0 is the photo as it is, same noise
    assert set(doc["models"][0]["flips_minus_plain_dsc"]) == {"N=1", "N=2", "N=3", "N=4"}
    assert "| tiny-student-isic2017 | 4 |" in (tmp_path / "table.md").read_text()
