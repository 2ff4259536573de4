"""The browser as an edge target (``edgeseg export --target web``): a static folder whose page
segments a photo on the device with ONNX Runtime Web.

::

    DIR/index.html, DIR/edgeseg-web.js     the page (package data: edgeseg/mobile/web_static/)
    DIR/model.onnx, DIR/model.onnx.json    the ONNX target's model and sidecar (export_onnx: same traced
                                           core, fp32 or int8 QDQ, parity-gated in ONNX Runtime)
    DIR/noise.bin                          the sampler's initial noise, float32 N x 1 x S x S: torch.randn
                                           from a Generator seeded with `seed`, exactly what
                                           Segmenter.predict draws, so the page's mask is `edgeseg segment`'s
    DIR/site.json                          what the page reads: model, noise, runtime files, seed
    DIR/ort/                               ONNX Runtime Web's JavaScript + WebAssembly (no CDN)

The runtime comes from the npm package ``onnxruntime-web`` (:data:`ORT_WEB_VERSION`), fetched once
with ``npm pack`` (the registry's client; the tarball is checked against a pinned sha512) and
cached under :func:`cache_dir`. The folder is built beside DIR and moved into place in one step
(:func:`edgeseg.mobile.placement.place`).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from edgeseg.errors import EdgesegError
from edgeseg.mobile.onnx_export import export_onnx
from edgeseg.mobile.placement import place

__all__ = ["export_web", "ort_web_files", "cache_dir", "noise_for_page", "ORT_WEB_VERSION", "RUNTIMES",
           "PAGE_FILES", "folder_bytes", "ISOLATION_HEADERS", "serve"]

ORT_WEB_VERSION = "1.31.1"
#: The registry's dist.integrity of onnxruntime-web@ORT_WEB_VERSION (npm view onnxruntime-web@1.31.1 dist.integrity).
ORT_WEB_INTEGRITY = "sha512-5GeH+bWQ+HxM10z7erGlsWqryrwMbSvm/1tkIsKTT48g0fI19VXVVC435t4t7VsPdSQeS7NmuZPXrQ73k82URw=="
#: The files each runtime build needs from the package's dist/: its script (which imports the .mjs
#: by name) and the WebAssembly it loads. "wasm" is the CPU build (SIMD, threads);
#: "webgpu" adds the WebGPU execution provider (a larger, asyncify WebAssembly) with CPU fallback.
RUNTIMES = {
    "wasm": ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"),
    "webgpu": ("ort.webgpu.min.js", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm"),
}
PAGE_FILES = ("index.html", "edgeseg-web.js")


def cache_dir() -> Path:
    """``$EDGESEG_CACHE``, else ``$XDG_CACHE_HOME/edgeseg``, else ``~/.cache/edgeseg``."""
    if os.environ.get("EDGESEG_CACHE"):
        return Path(os.environ["EDGESEG_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "edgeseg"


def _runtime_dir() -> Path:
    return cache_dir() / f"onnxruntime-web-{ORT_WEB_VERSION}"


def _how_to_get() -> str:
    return (f"edgeseg fetches it with npm (install Node.js's npm, e.g. apt-get install npm, and re-run), or put "
            f"the dist/ files of onnxruntime-web@{ORT_WEB_VERSION} ({', '.join(sum(RUNTIMES.values(), ()))}) "
            f"in {_runtime_dir()}")


def _npm_pack(npm: str, work: Path) -> Path:
    """``npm pack onnxruntime-web@VERSION`` into `work`; the tarball, checked against the pinned sha512."""
    try:
        done = subprocess.run([npm, "pack", f"onnxruntime-web@{ORT_WEB_VERSION}", "--pack-destination", str(work),
                               "--silent"], cwd=work, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise EdgesegError(f"npm pack onnxruntime-web@{ORT_WEB_VERSION} timed out: {_how_to_get()}") from None
    tgz = work / f"onnxruntime-web-{ORT_WEB_VERSION}.tgz"
    if done.returncode != 0 or not tgz.is_file():
        why = " ".join((done.stderr or done.stdout).split())[-200:]
        raise EdgesegError(f"npm could not fetch onnxruntime-web@{ORT_WEB_VERSION} ({why}): {_how_to_get()}")
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
    if digest != ORT_WEB_INTEGRITY:
        raise EdgesegError(f"onnxruntime-web@{ORT_WEB_VERSION} from npm has sha512 {digest}, not the pinned "
                           f"{ORT_WEB_INTEGRITY}; not used")
    return tgz


def _fetch_runtime(target: Path, progress: Callable[[str], None] | None) -> None:
    """Fill the cache folder `target` from the npm tarball (extracted beside it, renamed into place)."""
    npm = shutil.which("npm")
    if npm is None:
        raise EdgesegError(f"ONNX Runtime Web is not in the cache and npm is not installed: {_how_to_get()}")
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(f"fetching onnxruntime-web@{ORT_WEB_VERSION} with npm (once; cached in {target})")
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as d:
        tgz = _npm_pack(npm, Path(d))
        out = Path(d) / "files"
        out.mkdir()
        with tarfile.open(tgz) as tar:
            for name in sum(RUNTIMES.values(), ()):
                member = tar.getmember(f"package/dist/{name}")
                with tar.extractfile(member) as src, open(out / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            with tar.extractfile("package/package.json") as src:
                (out / "package.json").write_bytes(src.read())
        os.chmod(out, 0o755)
        try:
            os.rename(out, target)
        except OSError:  # another export filled it meanwhile
            if not target.is_dir():
                raise


def ort_web_files(runtime: str = "wasm", fetch: bool = True,
                  progress: Callable[[str], None] | None = None) -> dict[str, Path]:
    """The cached runtime files of `runtime` (name -> path), fetched with npm when missing and `fetch`."""
    if runtime not in RUNTIMES:
        raise EdgesegError(f"unknown web runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    folder = _runtime_dir()
    files = {name: folder / name for name in RUNTIMES[runtime]}
    if not all(p.is_file() for p in files.values()):
        if not fetch:
            raise EdgesegError(f"ONNX Runtime Web {ORT_WEB_VERSION} is not in {folder}: {_how_to_get()}")
        _fetch_runtime(folder, progress)
    missing = [n for n, p in files.items() if not p.is_file()]
    if missing:
        raise EdgesegError(f"{folder} lacks {', '.join(missing)}: {_how_to_get()}")
    return files


def noise_for_page(ensemble: int, size: int, seed: int) -> torch.Tensor:
    """The initial noise Segmenter.predict draws for one photo (B = 1): N x 1 x S x S."""
    return torch.randn((ensemble, 1, size, size), generator=torch.Generator().manual_seed(seed))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise EdgesegError(f"{out} exists and is not a folder; the web target writes a folder")
    if out.exists() and not overwrite:
        raise EdgesegError(f"{out} exists; pass --overwrite to replace it (or choose another --out)")
    if out.parent.exists() and not out.parent.is_dir():
        raise EdgesegError(f"{out.parent} is not a folder")


def _write_site(site: Path, meta: dict, runtime: str, files: dict[str, Path], seed: int) -> dict:
    """Page, runtime and noise files into `site` (the model and its sidecar are already there)."""
    static = resources.files("edgeseg.mobile").joinpath("web_static")
    for name in PAGE_FILES:
        (site / name).write_bytes(static.joinpath(name).read_bytes())
    (site / "ort").mkdir()
    for name, src in files.items():
        shutil.copyfile(src, site / "ort" / name)
    s = meta["image_size"][0]
    noise = noise_for_page(meta["ensemble"], s, seed)
    (site / "noise.bin").write_bytes(noise.numpy().astype("<f4").tobytes())
    config = {
        "model": "model.onnx",
        "sidecar": "model.onnx.json",
        "noise": {"file": "noise.bin", "shape": list(noise.shape), "dtype": "float32", "seed": seed,
                  "drawn_as": "torch.randn(N, 1, S, S, generator=torch.Generator().manual_seed(seed))"},
        "runtime": {"package": "onnxruntime-web", "version": ORT_WEB_VERSION, "build": runtime,
                    "script": f"ort/{RUNTIMES[runtime][0]}", "files": [f"ort/{n}" for n in files]},
        "uncertainty": "margin",
    }
    (site / "site.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def _keep_failed(tmp: Path, out: Path, error: EdgesegError) -> None:
    """A model that failed its gate stays for inspection in ``<out>.failed/`` (the error names it);
    any other failure leaves nothing."""
    if not any(tmp.glob("*.failed")):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    failed = out.with_name(out.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    os.replace(tmp, failed)
    msg = str(error).replace(f"{tmp / 'model.onnx'} was not written", f"{out} was not written")
    error.args = (msg.replace(str(tmp), str(failed)),)


def export_web(model_or_ckpt, out: str | Path, steps: int | None = None, ensemble: int | None = None,
               quantize: str = "none", *, runtime: str = "wasm", seed: int = 0, overwrite: bool = False,
               progress: Callable[[str], None] | None = None, **onnx_options) -> dict:
    """Write the static site `out`; returns the model's sidecar dict plus ``web`` (the folder's
    files and size) and ``path`` = the folder. `onnx_options` go to :func:`export_onnx`
    (dataset, data_dir, n_parity_images, n_calibration_images, batch must stay 1 ...)."""
    out = Path(out)
    if onnx_options.get("batch", 1) != 1:
        raise EdgesegError("the web page segments one photo per call: --batch must be 1 for the web target")
    _check_out_dir(out, overwrite)
    files = ort_web_files(runtime, progress=progress)  # a missing runtime fails before the export's minute
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgesegError(f"{out.parent}: cannot create the output folder ({e.strerror or e})") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        meta = export_onnx(model_or_ckpt, tmp / "model.onnx", steps, ensemble, quantize, progress=progress,
                           seed=seed, overwrite=False, **onnx_options)
        config = _write_site(tmp, meta, runtime, files, seed)
        from edgeseg.checkpoint import new_file_mode

        os.chmod(tmp, new_file_mode() | 0o111)
        size = folder_bytes(tmp)
        place(tmp, out, overwrite)
    except EdgesegError as e:
        _keep_failed(tmp, out, e)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta.update(path=str(out), web={"folder": str(out), "size_bytes": size, **config})
    return meta


#: The headers that make a page cross-origin isolated, so that WebAssembly threads (SharedArrayBuffer) work.
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}


@contextlib.contextmanager
def serve(folder: str | Path, host: str = "127.0.0.1", port: int = 0):
    """Serve `folder` with :data:`ISOLATION_HEADERS` on a background thread; yields the base URL."""
    import functools
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                          ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm"}

        def end_headers(self):
            for k, v in ISOLATION_HEADERS.items():
                self.send_header(k, v)
            super().end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((host, port), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":  # python -m edgeseg.mobile.web DIR [PORT]: serve an exported site, isolated
    import sys
    import time

    with serve(sys.argv[1], port=int(sys.argv[2]) if len(sys.argv) > 2 else 8000) as url:
        print(f"serving {sys.argv[1]} at {url}/ (Ctrl-C stops)")
        while True:
            time.sleep(3600)
