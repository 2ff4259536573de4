"""The web page's mask cleanup (mobile/web_static/edgeseg-web.js, cleanMask) equals
edgeseg.segmenter.clean_mask pixel for pixel, run in Node.js on random masks."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
from scipy import ndimage

from edgeseg.segmenter import clean_mask

JS = Path(__file__).resolve().parents[1] / "mobile" / "web_static" / "edgeseg-web.js"


def _run_clean_mask_in_node(masks: list[np.ndarray], how: str) -> list[np.ndarray]:
    node = shutil.which("node")
    assert node, "Node.js is needed for this test (Debian/Ubuntu: apt-get install nodejs)"
    src = JS.read_text()
    code = src[src.index("// Flood fill"):src.index("function draw(")]
    payload = [{"w": int(m.shape[1]), "h": int(m.shape[0]), "m": m.astype(int).ravel().tolist()} for m in masks]
    script = code + (
        "\nconst cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));\n"
        f"console.log(JSON.stringify(cases.map(c => Array.from(cleanMask(Uint8Array.from(c.m), c.w, c.h, {how!r})))));\n"
    )
    r = subprocess.run([node, "-e", script], input=json.dumps(payload), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [np.asarray(o, dtype=bool).reshape(m.shape) for o, m in zip(json.loads(r.stdout), masks)]


def test_the_pages_mask_cleanup_equals_clean_mask():
    rng = np.random.default_rng(0)
    masks = []
    for k in range(12):
        h, w = rng.integers(5, 60, size=2)
        noise = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=1 + k % 3)
        masks.append(noise > rng.uniform(-0.3, 0.3))  # several blobs, holes, border-touching regions
    masks.append(np.zeros((7, 9), dtype=bool))
    masks.append(np.ones((7, 9), dtype=bool))
    page = _run_clean_mask_in_node(masks, "largest-filled")
    changed = 0
    for m, got in zip(masks, page):
        want = clean_mask(m, "largest-filled")
        np.testing.assert_array_equal(got, want)
        changed += int((want != m).any())
    assert changed >= 6  # the cases exercise the cleanup, not only masks it leaves alone
    for m, got in zip(masks, _run_clean_mask_in_node(masks, "none")):
        np.testing.assert_array_equal(got, m)
