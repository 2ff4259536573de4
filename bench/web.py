"""The web target measured in headless Chromium: a student's page (default: the default model),
fp32 and int8, on ONNX Runtime Web's WebAssembly backend with 1 and 2 threads, beside native ONNX
Runtime (same model file, same thread count, same run).

    python bench/web.py --data-dir DIR/isic2017 [--model M] [--repeats 10] [--photos 4] [--out bench/results/web]

Per row: the page's load time (navigation to a ready session: scripts, WebAssembly, model),
the median ms of ``--repeats`` model runs inside the page (``window.edgeseg.bench``, after the
photos' own runs as warm-up), the same for native ONNX Runtime (CPUExecutionProvider), their
ratio, the model's and the whole folder's bytes, and the mask Dice of the page against eager
PyTorch (``Segmenter``, same K, N and seed) over the first ``--photos`` ISIC 2017 test photos.
The page is served with the cross-origin-isolation headers (threads need them).
Writes ``<out>/web.json`` and ``web.md``.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import shown_path  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _mask_of(page) -> np.ndarray:
    from PIL import Image

    src = page.get_attribute("img#mask", "src")
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
        return np.asarray(im.convert("L")) > 127


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def page_row(ctx, url: str, photos: list[Path], eager: list[np.ndarray], repeats: int) -> dict:
    page = ctx.new_page()
    page.goto(url)
    page.wait_for_function("['ready', 'error'].includes(document.body.dataset.state)", timeout=120_000)
    if page.evaluate("document.body.dataset.state") != "ready":
        raise SystemExit(f"{url}: {page.text_content('#error')}")
    load_ms = float(page.evaluate("document.body.dataset.loadMs"))
    dices = []
    for photo, ref in zip(photos, eager):
        page.set_input_files("input#photo", str(photo))
        page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=120_000)
        dices.append(_dice(_mask_of(page), ref))
    times = page.evaluate(f"window.edgeseg.bench({repeats})")
    page.close()
    return {"load_ms": round(load_ms, 1), "page_ms": round(statistics.median(times), 2),
            "page_ms_all": [round(t, 2) for t in times], "dice_vs_eager": round(float(np.mean(dices)), 4),
            "dice_vs_eager_min": round(float(np.min(dices)), 4)}


def native_ms(model: Path, feeds: dict, threads: int, repeats: int) -> float:
    from edgeseg.mobile.onnx_export import ort_session

    sess = ort_session(model, threads=threads)
    for _ in range(2):
        sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(1000 * (time.perf_counter() - t0))
    return round(statistics.median(times), 2)


def export_sites(model: str, root: Path, data_dir: Path, steps: int, ensemble: int) -> dict[str, dict]:
    from edgeseg.mobile.web import export_web

    metas = {}
    for q in ("none", "int8"):
        out = root / q
        metas[q] = export_web(model, out, steps, ensemble, q, dataset="isic2017", data_dir=data_dir, overwrite=True)
    return metas


def markdown(rows: list[dict]) -> str:
    head = ("| model | precision | threads | page load (ms) | page ms / photo | native ORT ms | page / native "
            "| model bytes | folder bytes | Dice vs eager |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {r['model']} | {r['precision']} | {r['threads']} | {r['load_ms']:.0f} | {r['page_ms']:.2f} | "
        f"{r['native_ms']:.2f} | {r['ratio']:.2f}x | {r['model_bytes']:,} | {r['folder_bytes']:,} | "
        f"{r['dice_vs_eager']:.4f} |\n" for r in rows)


def main(argv=None) -> None:
    from edgeseg.defaults import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="shipped model or checkpoint (default: %(default)s)")
    ap.add_argument("--data-dir", type=Path, required=True, help="the ISIC 2017 folder (test photos, calibration)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "web")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--photos", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--ensemble", type=int, default=None)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    a = ap.parse_args(argv)

    import tempfile

    from playwright.sync_api import sync_playwright

    from edgeseg.mobile.web import folder_bytes, noise_for_page, serve
    from edgeseg.segmenter import Segmenter

    photos = sorted((a.data_dir / "ISIC-2017_Test_v2_Data").glob("*.jpg"))[: a.photos]
    seg = Segmenter.from_pretrained(a.model, steps=a.steps, ensemble=a.ensemble)
    eager = [seg.segment(p).mask for p in photos]
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeseg-web-bench-") as d:
        root = Path(d) / "sites"
        metas = export_sites(a.model, root, a.data_dir, seg.steps, seg.ensemble)
        x = seg.preprocess(photos[-1])[0].numpy()
        feeds = {"image": x, "noise": noise_for_page(seg.ensemble, seg.image_size, seg.seed).numpy()}
        with serve(root) as base, sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(str(Path(d) / "profile"), executable_path=a.chromium,
                                                        args=CHROMIUM_ARGS, headless=True)
            for q, meta in metas.items():
                for threads in (1, 2):
                    r = page_row(ctx, f"{base}/{q}/index.html?threads={threads}", photos, eager, a.repeats)
                    r.update(model=f"{a.model} (K={seg.steps}, N={seg.ensemble})",
                             precision="int8" if q == "int8" else "fp32", threads=threads,
                             native_ms=native_ms(root / q / "model.onnx", feeds, threads, a.repeats),
                             model_bytes=meta["size_bytes"], folder_bytes=folder_bytes(root / q),
                             runtime=f"onnxruntime-web {meta['web']['runtime']['version']} (wasm)")
                    r["ratio"] = round(r["page_ms"] / r["native_ms"], 2)
                    rows.append(r)
                    print(markdown([r]).splitlines()[-1], flush=True)
            version = ctx.browser.version if ctx.browser else None
            ctx.close()
    a.out.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    result = {"rows": rows, "photos": [p.name for p in photos], "repeats": a.repeats, "chromium": version,
              "onnxruntime": onnxruntime.__version__, "data_dir": shown_path(a.data_dir),
              "command": f"python bench/web.py --data-dir {shown_path(a.data_dir)} --model {a.model} "
                         f"--repeats {a.repeats} --photos {a.photos}"}
    (a.out / "web.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out / "web.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
