"""Where a ``.pte``'s time goes: ETDump of real runs joined with the export's ETRecord (``edgeseg profile``).

>>> prof = profile_pte("student.pte", runs=10)         # needs student.pte.json and student.pte.etrecord
>>> prof["top"][0]                                    # {"operator": "Convolution (NHWC, F32) IGEMM", ...}

The program is loaded in ExecuTorch's Python runtime with ETDump enabled and run ``warmup +
runs`` times on one input of the sidecar's shapes (a seeded random image and noise: the time of
these programs does not depend on the pixels). The ETDump is read by ExecuTorch's
:class:`~executorch.devtools.Inspector` together with ``<model>.etrecord`` (written by every
``.pte`` export), which names the non-delegated operators. Then, per run (warm-up runs dropped)
and as the median over runs:

* ``method_ms``: one ``Method::execute``;
* ``delegates``: each ``DELEGATE_CALL`` (one XNNPACK call for these programs) and the share of
  its time that no XNNPACK operator accounts for (``overhead_ms``: the delegate's own copies and
  bookkeeping);
* ``operators``: the time of each operator type, summed over its instances (XNNPACK reports
  every operator of its runtime, ``Convolution (NHWC, F32) IGEMM #12``: ``#12`` is dropped to
  group them), with its share of ``Method::execute``; portable (non-delegated) kernels appear
  under their ATen name;
* ``categories``: the same time by kind (GEMM-like, layout, element-wise, reductions, ...);
* ``top``: the first ``top`` operators by time.

Written as ``<out_dir>/<model>.profile.json`` and ``.md`` (default: next to the model).
"""
from __future__ import annotations

import re
import statistics
import tempfile
from pathlib import Path

import torch

from edgeseg.errors import EdgesegError
from edgeseg.mobile import sidecar as sc

__all__ = ["profile_pte", "markdown_report", "write_report", "CATEGORIES"]

#: (category, substrings of an XNNPACK operator name or an ATen kernel name), first match wins.
CATEGORIES = (
    ("GEMM (conv, fully connected, batch matmul)", ("Convolution", "Deconvolution", "Fully Connected",
                                                    "Batch Matrix Multiply", "convolution", "mm")),
    ("layout (transpose, copy, reshape, concat, slice)", ("Transpose", "Copy", "Reshape", "Concatenate", "Slice",
                                                          "Split", "cat", "view", "permute", "copy")),
    ("reductions (mean, sum, max)", ("Mean", "Sum", "Max", "Reduce", "mean", "sum")),
    ("softmax", ("Softmax", "softmax")),
    ("element-wise", ("Add", "Subtract", "Multiply", "Divide", "Sigmoid", "Square Root", "Reciprocal", "Clamp",
                      "Negate", "Convert", "Tanh", "Abs", "Square", "add", "mul", "sub", "div")),
)
_INSTANCE = re.compile(r"\s+#\d+$")
_SKIP = {"Method::execute", "DELEGATE_CALL", "OPERATOR_CALL", "Method::init", "Program::load_method"}


def _category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other"


def _check_model(path: Path) -> tuple[dict, Path]:
    """(sidecar, ETRecord path) of a profilable .pte, or one EdgesegError line saying what is wrong."""
    if path.suffix != ".pte":
        raise EdgesegError(f"{path}: edgeseg profile takes an ExecuTorch program (.pte)")
    if not path.is_file():
        raise EdgesegError(f"{path}: no such .pte file" if not path.exists() else f"{path}: not a regular file")
    meta = sc.read_sidecar(path)
    if meta.get("target") != "executorch" or meta.get("status", "ok") != "ok":
        raise EdgesegError(f"{path}: the sidecar describes no working ExecuTorch export (target "
                           f"{meta.get('target')!r}, status {meta.get('status')!r})")
    sc.check_contract(meta, sc.sidecar_path(path))
    record = path.with_name(path.name + ".etrecord")
    if not record.is_file():
        raise EdgesegError(f"{path}: no ETRecord {record.name} next to it (exports before ETRecords existed: "
                           "re-export it with `edgeseg export --target executorch`)")
    want = (meta.get("etrecord") or {}).get("sha256")
    if want is not None and sc.file_digest(record)[0] != want:
        raise EdgesegError(f"{record}: does not match the sidecar's ETRecord (changed after export); re-export")
    if sc.file_digest(path)[0] != meta.get("sha256"):
        raise EdgesegError(f"{path}: sha256 does not match its sidecar (file changed after export)")
    return meta, record


def _run_with_etdump(path: Path, meta: dict, runs: int, warmup: int, seed: int, etdump: Path) -> None:
    from executorch.runtime import Runtime

    try:
        program = Runtime.get().load_program(path, enable_etdump=True)
        method = program.load_method("forward")
    except (RuntimeError, ValueError) as e:
        raise EdgesegError(f"{path}: not a loadable ExecuTorch program ({' '.join(str(e).split())[:160]})") from None
    b, n, (h, w) = int(meta["batch"]), int(meta["ensemble"]), meta["image_size"]
    gen = torch.Generator().manual_seed(seed)
    inputs = (torch.rand(b, 3, h, w, generator=gen), torch.randn(b * n, 1, h, w, generator=gen))
    for _ in range(warmup + runs):
        method.execute(inputs)
    program.write_etdump_result_to_file(str(etdump), str(etdump.with_suffix(".debug")))
    if not etdump.is_file() or etdump.stat().st_size == 0:
        raise EdgesegError("this ExecuTorch build writes no ETDump (it needs the event tracer); cannot profile")


def _inspect(etdump: Path, record: Path):
    """ExecuTorch's Inspector on the ETDump and the ETRecord -> its DataFrame (one row per event)."""
    import warnings

    from executorch.devtools import Inspector

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return Inspector(etdump_path=str(etdump), etrecord=str(record)).to_dataframe()
        except Exception as e:  # noqa: BLE001 - the Inspector raises many kinds on a mismatched record
            raise EdgesegError(f"{record}: ExecuTorch's Inspector cannot join it with the run's ETDump "
                               f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


def _per_run(raw, warmup: int, total: int) -> list[float]:
    vals = [float(v) for v in raw]
    return vals[warmup:] if len(vals) == total and total > warmup else vals


def _tables(df, warmup: int, total: int) -> dict:
    """Per-run times of Method::execute, each delegate call and each operator type (ms lists)."""
    method: list[float] = []
    delegates: dict[str, list[list[float]]] = {}
    ops: dict[tuple[str, str], list[list[float]]] = {}
    for row in df[df["event_block_name"] == "Execute"].itertuples(index=False):
        name, runs = str(row.event_name), _per_run(row.raw, warmup, total)
        if name == "Method::execute":
            method = runs
        elif name == "DELEGATE_CALL":
            delegates.setdefault(str(row.delegate_backend_name), []).append(runs)
        elif name not in _SKIP:
            if bool(row.is_delegated_op):
                key = (_INSTANCE.sub("", name), str(row.delegate_backend_name))
            else:
                types = list(row.op_types) if row.op_types is not None else []
                key = (", ".join(types) or name, "portable")
            ops.setdefault(key, []).append(runs)
    if not method:
        raise EdgesegError("the ETDump holds no Method::execute event; cannot profile")
    return {"method": method, "delegates": delegates, "ops": ops}


def _sum_runs(instances: list[list[float]]) -> float:
    """Median over runs of the summed time of all instances (instances share the run index)."""
    n = min(len(r) for r in instances)
    return statistics.median(sum(r[i] for r in instances) for i in range(n))


def _summarise(t: dict, top: int) -> dict:
    method = statistics.median(t["method"])
    share = lambda ms: round(ms / method, 4) if method else None  # noqa: E731
    operators = []
    for (name, where), inst in t["ops"].items():
        ms = _sum_runs(inst)
        operators.append({"operator": name, "runs_in": where, "instances": len(inst), "median_ms": round(ms, 4),
                          "share": share(ms), "category": _category(name)})
    operators.sort(key=lambda r: -r["median_ms"])
    delegates = []
    for backend, inst in t["delegates"].items():
        ms = _sum_runs(inst)
        inside = sum(o["median_ms"] for o in operators if o["runs_in"] == backend)
        delegates.append({"backend": backend, "calls": len(inst), "median_ms": round(ms, 4), "share": share(ms),
                          "operators_ms": round(inside, 4), "overhead_ms": round(max(ms - inside, 0.0), 4)})
    cats: dict[str, float] = {}
    for o in operators:
        cats[o["category"]] = cats.get(o["category"], 0.0) + o["median_ms"]
    categories = [{"category": c, "median_ms": round(ms, 4), "share": share(ms)}
                  for c, ms in sorted(cats.items(), key=lambda kv: -kv[1])]
    q = statistics.quantiles(t["method"], n=4, method="inclusive") if len(t["method"]) > 1 else [method] * 3
    return {"method_ms": {"median": round(method, 4), "p25": round(q[0], 4), "p75": round(q[2], 4),
                          "runs": [round(v, 4) for v in t["method"]]},
            "delegates": delegates, "categories": categories, "operators": operators, "top": operators[:top]}


def profile_pte(path: str | Path, runs: int = 10, warmup: int = 1, top: int = 10, seed: int = 0,
                threads: int | None = None) -> dict:
    """Profile an exported .pte (see the module docstring); returns the report dict."""
    path = Path(path)
    if not 1 <= int(runs) <= 10000:
        raise EdgesegError(f"--runs must be from 1 to 10000, got {runs}")
    if not 0 <= int(warmup) <= 1000:
        raise EdgesegError(f"--warmup must be from 0 to 1000, got {warmup}")
    meta, record = _check_model(path)
    if threads is not None:
        from executorch.extension.pybindings import portable_lib as pl

        pl._unsafe_reset_threadpool(int(threads))
    with tempfile.TemporaryDirectory(prefix="edgeseg-etdump-") as d:
        etdump = Path(d) / "run.etdp"
        _run_with_etdump(path, meta, runs, warmup, seed, etdump)
        df = _inspect(etdump, record)
    report = _summarise(_tables(df, warmup, warmup + runs), top)
    report.update(model=str(path), etrecord=record.name, runs=runs, warmup=warmup, threads=threads,
                  program={k: meta.get(k) for k in ("preset", "image_size", "steps", "ensemble", "batch", "quantize",
                                                    "size_bytes", "delegate_calls")},
                  method="ETDump (ExecuTorch Python runtime, enable_etdump) + ETRecord, joined by "
                         "executorch.devtools.Inspector; per-run sums over operator instances, median over runs")
    return report


def markdown_report(r: dict) -> str:
    """The report as Markdown: the run, the delegates, the categories and the top operators."""
    p = r["program"]
    m = r["method_ms"]
    lines = [f"# Profile of {Path(r['model']).name}", "",
             f"{p['preset']}, {p['image_size'][0]} px, K={p['steps']}, N={p['ensemble']}, {p['quantize']}; "
             f"{r['runs']} runs after {r['warmup']} warm-up; Method::execute median {m['median']:.2f} ms "
             f"[IQR {m['p75'] - m['p25']:.2f}].", "",
             "| delegate | calls | median ms | share | in operators ms | overhead ms |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {d['backend']} | {d['calls']} | {d['median_ms']:.2f} | {100 * d['share']:.1f}% | "
              f"{d['operators_ms']:.2f} | {d['overhead_ms']:.2f} |" for d in r["delegates"]]
    lines += ["", "| category | median ms | share |", "|---|---:|---:|"]
    lines += [f"| {c['category']} | {c['median_ms']:.2f} | {100 * c['share']:.1f}% |" for c in r["categories"]]
    lines += ["", f"Top {len(r['top'])} operators:", "", "| operator | runs in | instances | median ms | share |",
              "|---|---|---:|---:|---:|"]
    lines += [f"| {o['operator']} | {o['runs_in']} | {o['instances']} | {o['median_ms']:.2f} | "
              f"{100 * o['share']:.1f}% |" for o in r["top"]]
    return "\n".join(lines) + "\n"


def write_report(r: dict, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """``<out_dir>/<model>.profile.json`` and ``.md`` (default: next to the model)."""
    import json

    model = Path(r["model"])
    out_dir = Path(out_dir) if out_dir is not None else model.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgesegError(f"{out_dir}: cannot create the output folder ({e.strerror or e})") from None
    if not out_dir.is_dir():
        raise EdgesegError(f"{out_dir} is not a folder")
    js, md = out_dir / f"{model.name}.profile.json", out_dir / f"{model.name}.profile.md"
    from edgeseg.checkpoint import atomic_write_json

    atomic_write_json(js, r)
    md.write_text(markdown_report(r))
    return js, md
