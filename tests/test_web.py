"""The web target in a real browser: `edgeseg export --target web` folders (fp32 and int8 of the
shipped real-lesion student, K = 1, N = 2) served from 127.0.0.1 and driven in Debian's headless
Chromium through Playwright. The page's mask must be `edgeseg segment`'s mask for the same photo and
model, no request may leave 127.0.0.1, and a non-image gives state "error".

No skip: a missing Chromium or Playwright fails these tests (.ci/run installs both).
Set EDGESEG_WEB_SCREENSHOT=path to keep the screenshot of the fp32 page (docs/web-page.png).
"""
from __future__ import annotations

import base64
import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from test_deploy import run_cli  # the real entry point in this process

REPO = Path(__file__).resolve().parents[1]
STUDENT = REPO / "edgeseg" / "assets" / "tiny-student-isic2017.safetensors"
# ../shared beside the repository (a worktree under wt/ looks one level further up)
ISIC_TESTS = [r / "shared" / "data" / "isic2017" / "ISIC-2017_Test_v2_Data" for r in (REPO.parent, REPO.parents[1])]
PHOTO = "ISIC_0012086.jpg"
K, N = 1, 2
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _photo() -> Path:
    for root in ISIC_TESTS:
        if (root / PHOTO).is_file():
            return (root / PHOTO).resolve()
    raise AssertionError(f"the ISIC 2017 test photo {PHOTO} is not in {ISIC_TESTS[0]}")


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """{precision: site folder} under one root, exported through the CLI's library call."""
    from edgeseg.mobile.web import export_web

    root = tmp_path_factory.mktemp("web")
    real = dict(dataset="isic2017", data_dir=_photo().parents[1])  # calibrated and gated on real lesions
    export_web(STUDENT, root / "fp32", K, N, "none", n_parity_images=4, **real)
    export_web(STUDENT, root / "int8", K, N, "int8", n_parity_images=8, n_calibration_images=16, **real)
    return root


@pytest.fixture(scope="module")
def browser(sites):
    """(base URL, Playwright browser) serving `sites` from 127.0.0.1."""
    from playwright.sync_api import sync_playwright

    from edgeseg.mobile.web import serve

    profile = sites.parent / "chromium-profile"
    with serve(sites) as base, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                    headless=True)
        try:
            yield base, ctx
        finally:
            ctx.close()


def open_page(browser, path: str):
    """(page, requested URLs) once the page's model has loaded (state ready) or failed."""
    base, ctx = browser
    page = ctx.new_page()
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.goto(f"{base}/{path}")
    page.wait_for_function("['ready', 'error'].includes(document.body.dataset.state)", timeout=60_000)
    return page, urls


def segment_in_page(page, file: Path) -> str:
    page.set_input_files("input#photo", str(file))
    page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=60_000)
    return page.evaluate("document.body.dataset.state")


def page_mask(page) -> np.ndarray:
    from PIL import Image

    src = page.get_attribute("img#mask", "src")
    assert src.startswith("data:image/png;base64,"), src[:40]
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
        return np.asarray(im.convert("L")) > 127


@pytest.fixture(scope="module")
def segment_mask(tmp_path_factory) -> np.ndarray:
    """`edgeseg segment`'s mask of the photo, same model, K and N (run through the real entry point)."""
    from PIL import Image

    from edgeseg.cli.main import main

    out = tmp_path_factory.mktemp("segment")
    argv = ["edgeseg", "segment", str(_photo()), "--checkpoint", str(STUDENT), "--steps", str(K), "--ensemble",
            str(N), "--out", str(out)]
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", argv)
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        mp.undo()
    assert not e.value.code
    with Image.open(out / f"{Path(PHOTO).stem}_mask.png") as im:
        return np.asarray(im.convert("L")) > 127


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@pytest.mark.parametrize("precision, gate", [("fp32", 0.99), ("int8", 0.97)])
def test_page_mask_matches_segment(browser, segment_mask, precision, gate):
    page, urls = open_page(browser, f"{precision}/index.html?threads=2")
    assert page.evaluate("document.body.dataset.state") == "ready", page.text_content("#error")
    assert page.evaluate("self.crossOriginIsolated") is True  # served with COOP/COEP: threads on
    assert segment_in_page(page, _photo()) == "done", page.text_content("#error")
    mask = page_mask(page)
    assert mask.shape == segment_mask.shape == (192, 256)
    d = dice(mask, segment_mask)
    assert d >= gate, (precision, d)
    assert 0.02 < mask.mean() < 0.98  # a lesion was found, not an empty or full mask
    ms = float(page.text_content("#latency-ms"))
    assert 0 < ms < 60_000
    assert int(page.text_content("#area-px")) == int(mask.sum())
    outside = [u for u in urls if not u.startswith(browser[0] + "/") and not u.startswith(("data:", "blob:"))]
    assert not outside, outside
    assert any(u.endswith(".wasm") for u in urls) and any(u.endswith("model.onnx") for u in urls)
    if precision == "fp32":
        page.set_viewport_size({"width": 1100, "height": 560})
        png = page.screenshot(full_page=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("EDGESEG_WEB_SCREENSHOT"):
            Path(os.environ["EDGESEG_WEB_SCREENSHOT"]).write_bytes(png)
    page.close()


def _large_jpeg(folder: Path) -> Path:
    """The test photo at 5x its size (1280 x 960) as a JPEG: many times the model's input, where a
    reduced-scale decode would change the input."""
    from PIL import Image

    path = folder / "large.jpg"
    with Image.open(_photo()) as im:
        im.convert("RGB").resize((im.width * 5, im.height * 5), Image.BICUBIC).save(path, quality=95)
    return path


@pytest.mark.parametrize("which", ["dataset photo", "large JPEG"])
def test_page_input_is_segmenters_preprocessing(browser, which, tmp_path):
    """The tensor the page feeds the model is Segmenter.preprocess's, to one 8-bit level, for the
    dataset's 256 x 192 photo and a photo many times the model's input (both decode at full size)."""
    from edgeseg.segmenter import Segmenter

    photo = _photo() if which == "dataset photo" else _large_jpeg(tmp_path)
    page, _ = open_page(browser, "fp32/index.html")
    assert segment_in_page(page, photo) == "done"
    x = np.asarray(page.evaluate("Array.from(window.edgeseg.input)"), dtype=np.float32)
    ref = Segmenter.from_pretrained(STUDENT, steps=K, ensemble=N).preprocess(photo)[0].numpy().ravel()
    assert x.shape == ref.shape
    assert np.abs(x - ref).max() <= 1.5 / 255, np.abs(x - ref).max()
    page.close()


def test_page_reports_non_image(browser, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    page, _ = open_page(browser, "fp32/index.html")
    assert segment_in_page(page, bad) == "error"
    assert "not an image" in page.text_content("#error")
    page.close()


def test_page_reports_model_that_does_not_load(browser, sites):
    broken = sites / "broken"
    shutil.copytree(sites / "fp32", broken)
    (broken / "model.onnx").write_bytes(b"\x08\x07garbage")
    page, _ = open_page(browser, "broken/index.html")
    assert page.evaluate("document.body.dataset.state") == "error"
    assert "did not load" in page.text_content("#error")
    page.close()


def test_site_contents(sites):
    import json

    cfg = json.loads((sites / "int8" / "site.json").read_text())
    side = json.loads((sites / "int8" / "model.onnx.json").read_text())
    assert side["quantize"] == "int8" and side["status"] == "ok" and side["parity"]["mask_dsc_vs_eager"] >= 0.97
    for f in [cfg["model"], cfg["noise"]["file"], cfg["runtime"]["script"], *cfg["runtime"]["files"]]:
        assert (sites / "int8" / f).is_file(), f
    noise = np.fromfile(sites / "int8" / "noise.bin", dtype="<f4").reshape(cfg["noise"]["shape"])
    import torch

    assert np.array_equal(noise, torch.randn((N, 1, 64, 64), generator=torch.Generator().manual_seed(0)).numpy())


def test_web_export_refuses_existing_folder_and_missing_runtime(sites, tmp_path, capsys, monkeypatch):
    rc, _, err = run_cli(["export", "--target", "web", "--checkpoint", STUDENT, "--out", sites / "fp32"], capsys,
                         monkeypatch)
    assert rc == 2 and "exists; pass --overwrite" in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv("EDGESEG_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-npm"))
    rc, _, err = run_cli(["export", "--target", "web", "--checkpoint", STUDENT, "--out", tmp_path / "site"], capsys,
                         monkeypatch)
    assert rc == 2 and "npm" in err and "onnxruntime-web@" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "site").exists() and not (tmp_path / "empty-cache").exists()
