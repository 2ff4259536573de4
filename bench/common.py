"""Shared helpers for the bench scripts: machine info, latency statistics, result files.

Every benchmark result file (``bench/results/mobile-*.json``) has the same schema
(``SCHEMA``/``SCHEMA_VERSION``)::

    {
      "schema": "edgeseg-bench-mobile", "schema_version": 1,
      "kind": "mobile-cpu" | "mobile-android" | "mobile-ios",
      "generated": ISO time, "command": [...], "quick": bool,
      "machine": {...machine_info()...},       # + device fields on phones
      "settings": {...},                        # repeats, warm-up, threads, images ...
      "results": [ROW, ...],
      "notes": [str, ...]
    }

and each ROW has the keys of ``ROW_KEYS`` (``None`` where not measured, with the reason in
``dice_reason`` / ``note``); see ``make_row``.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = "edgeseg-bench-mobile"
SCHEMA_VERSION = 1
REPO = Path(__file__).resolve().parents[1]

ROW_KEYS = (
    "config", "preset", "role", "backend", "precision", "sampler", "steps", "ensemble", "default", "sweep",
    "params", "gflop_per_call", "calls_per_image", "gflop_per_image",
    "latency_ms", "fps", "extrapolated", "extrapolation",
    "peak_rss_mb", "baseline_rss_mb", "model_rss_mb", "program_rss_mb",
    "file", "file_mb", "sha256",
    "dice", "dice_std", "dice_images", "dice_reason",
    "speedup_vs_paper", "checkpoint", "status", "note",
)


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def make_row(**kw) -> dict:
    """A result row with every key of ROW_KEYS (missing ones None); unknown keys are kept at the end."""
    row = {k: None for k in ROW_KEYS}
    row.update(status="ok", default=False, sweep=False, extrapolated=False)
    row.update(kw)
    return row


# ----------------------------------------------------------------------------------------
# machine
# ----------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip()
        except Exception:  # noqa: BLE001
            pass
    return platform.processor() or platform.machine()


def physical_cores() -> int | None:
    try:
        seen = set()
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
            elif not line.strip():
                if core is not None:
                    seen.add((phys, core))
                phys = core = None
        return len(seen) or None
    except OSError:
        return None


def mem_total_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def package_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def machine_info(threads: int | None = None) -> dict:
    """CPU model, cores, memory, OS, Python and package versions, threads, load at start."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        affinity = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "physical_cores": physical_cores(),
        "memory_mb": mem_total_mb(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "executorch": package_version("executorch"),
        "torchao": package_version("torchao"),
        "coremltools": package_version("coremltools"),
        "edgeseg": package_version("edgeseg"),
        "git_commit": git_commit(),
        "threads": threads,
        "load_average_at_start": load,
    }
    return info


# ----------------------------------------------------------------------------------------
# statistics and memory
# ----------------------------------------------------------------------------------------
def timed_ms(fn, warmup: int, runs: int) -> list[float]:
    """Wall time of `fn()` in ms for each of `runs` calls after `warmup` untimed ones (CPU timing)."""
    import time

    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts


def median_ms(fn, repeats: int = 3) -> float:
    """Median wall time of `fn()` in ms over `repeats` calls, after one warm-up call (CPU timing)."""
    return statistics.median(timed_ms(fn, 1, repeats))


def latency_stats(ms: list[float]) -> dict:
    """Median, quartiles, IQR, min, max (ms) of per-image latencies; the raw values are kept."""
    v = sorted(float(x) for x in ms)
    if not v:
        return {"median": None, "p25": None, "p75": None, "iqr": None, "min": None, "max": None, "n": 0, "runs": []}
    if len(v) >= 2:
        q = statistics.quantiles(v, n=4, method="inclusive")
        p25, p75 = q[0], q[2]
    else:
        p25 = p75 = v[0]
    r = lambda x: round(x, 3)  # noqa: E731
    return {"median": r(statistics.median(v)), "p25": r(p25), "p75": r(p75), "iqr": r(p75 - p25),
            "min": r(v[0]), "max": r(v[-1]), "n": len(v), "runs": [r(x) for x in ms]}


def rss_mb() -> dict:
    """This process's current and peak resident memory (MB), from /proc/self/status or getrusage."""
    cur = hwm = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    if hwm is None:
        import resource

        m = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hwm = m / (1024 * 1024) if sys.platform == "darwin" else m / 1024
    return {"rss_mb": round(cur, 1) if cur is not None else None, "peak_mb": round(hwm, 1)}


# ----------------------------------------------------------------------------------------
# output files
# ----------------------------------------------------------------------------------------
def recorded_command(argv: list[str] | None = None) -> list[str]:
    """The command line as committed result files record it: the dataset folder given with
    --data-dir is a machine's own path, so it is written as DATA_DIR; other absolute paths are
    written relative to the repository when inside it, else as their folder and name."""
    argv = list(sys.argv if argv is None else argv)
    out = []
    for i, a in enumerate(argv):
        if i > 0 and argv[i - 1] == "--data-dir":
            out.append("DATA_DIR")
        elif a.startswith("--data-dir="):
            out.append("--data-dir=DATA_DIR")
        elif os.path.isabs(a):  # the interpreter (a link into the venv: kept), --out, --work, checkpoints
            out.append(shown_path(a, resolve=False))
        else:
            out.append(a)
    return out


def result_doc(kind: str, machine: dict, settings: dict, results: list[dict], notes: list[str] | None = None,
               quick: bool = False, command: list[str] | None = None) -> dict:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "generated": now_iso(),
        "command": command if command is not None else recorded_command(),
        "quick": quick,
        "machine": machine,
        "settings": settings,
        "results": results,
        "notes": notes or [],
    }


def shown_path(path: str | Path | None, resolve: bool = True) -> str | None:
    """A path as results files record it: relative to the repository when inside it, else its folder and
    name (no machine's absolute paths in committed results). ``resolve=False`` keeps symbolic links
    (only '..' is folded)."""
    if path is None:
        return None
    p = Path(path).resolve() if resolve else Path(os.path.normpath(os.path.abspath(path)))
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else f"{p.parent.name}/{p.name}"


def results_name(name: str, size: int, split: str = "test") -> str:
    """A results folder's name for a model of input `size` scored on `split`: `name` for the 64-px
    models on test (the first records), else with the size and a non-test split appended."""
    return name + ("" if size == 64 else f"-{size}") + ("" if split == "test" else f"-{split}")


def write_json(path: str | Path, obj) -> Path:
    from edgeseg.checkpoint import atomic_write_json

    atomic_write_json(path, obj)
    return Path(path)


def write_results(out: Path, doc: dict, table: str, stem: str = "results", table_stem: str = "table") -> None:
    """``<stem>.json`` and ``<table_stem>.md`` under `out` (created), and the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", doc)
    (out / f"{table_stem}.md").write_text(table)
    print(table)


def _fmt(v, spec: str = ".1f", none: str = "-") -> str:
    if v is None:
        return none
    if isinstance(v, str):
        return v
    return format(v, spec)


def markdown_table(rows: list[dict]) -> str:
    """The README table: config, params, GFLOP per call, steps x ensemble, latency, FPS, memory, file, Dice, speed-up."""
    head = ("| config | params (M) | GFLOP / call | steps x ensemble | latency median (ms) [IQR] | FPS | "
            "peak MB | file MB | Dice | speed-up vs paper |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lat = r.get("latency_ms") or {}
        if lat.get("median") is None:
            lat_s = "-" if r.get("status") == "ok" else r.get("status", "-")
        else:
            lat_s = f"{lat['median']:.1f} [{lat['iqr']:.1f}]"
            if r.get("extrapolated"):
                lat_s += " (extrap.)"
        dice = r.get("dice")
        dice_s = f"{dice:.3f}" if dice is not None else f"- ({r.get('dice_reason') or 'n/a'})"
        su = r.get("speedup_vs_paper")
        su_s = f"{su:,.0f}x" if su is not None and su >= 10 else (f"{su:.2f}x" if su is not None else "-")
        params = r.get("params")
        sxe = f"{r.get('steps')} x {r.get('ensemble')}" if r.get("steps") is not None else "-"
        lines.append(
            f"| {r['config']} | {_fmt(params / 1e6 if params else None, '.2f')} | {_fmt(r.get('gflop_per_call'), '.2f')} | "
            f"{sxe} | {lat_s} | {_fmt(r.get('fps'), '.2f')} | {_fmt(r.get('peak_rss_mb'), '.0f')} | "
            f"{_fmt(r.get('file_mb'), '.2f')} | {dice_s} | {su_s} |"
        )
    return "\n".join(lines) + "\n"


def machine_line(m: dict) -> str:
    return (f"{m.get('cpu')} ({m.get('usable_cpus')} usable CPUs, {m.get('physical_cores')} physical cores), "
            f"{m.get('os')}, torch {m.get('torch')}, executorch {m.get('executorch')}, {m.get('threads')} threads")


def write_markdown(path: str | Path, title: str, doc: dict, extra: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = [f"# {title}", "", f"Measured on: {machine_line(doc['machine'])}.", f"Generated {doc['generated']}"
            + (" (quick smoke run: not meaningful numbers)" if doc.get("quick") else "") + ".", "",
            markdown_table(doc["results"])]
    if extra:
        body += [extra]
    if doc.get("notes"):
        body += ["Notes:", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    path.write_text("\n".join(body))
    return path


def write_plot(path: str | Path, rows: list[dict], title: str = "") -> Path:
    """Accuracy vs latency (rows with Dice) and latency vs network calls per image (all rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if (r.get("latency_ms") or {}).get("median") is None:
            continue
        groups.setdefault(f"{r['preset']} {r['backend']} {r['precision']}" + (" paper" if r["sampler"] == "ddpm" else ""),
                          []).append(r)
    any_dice = False
    for label, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["latency_ms"]["median"])
        marker = "*" if rs[0]["sampler"] == "ddpm" else "o"
        with_dice = [r for r in rs if r.get("dice") is not None]
        if with_dice:
            any_dice = True
            a1.plot([r["latency_ms"]["median"] for r in with_dice], [r["dice"] for r in with_dice], marker=marker,
                    ms=9 if marker == "*" else 5, ls="", label=label)
            for r in with_dice:
                a1.annotate(f"K{r['steps']}N{r['ensemble']}", (r["latency_ms"]["median"], r["dice"]), fontsize=6,
                            xytext=(2, 2), textcoords="offset points")
        calls = [(r["calls_per_image"], r["latency_ms"]["median"]) for r in rs if r.get("calls_per_image")]
        if calls:
            calls.sort()
            a2.plot(*zip(*calls), marker=marker, ms=9 if marker == "*" else 4, label=label)
    a1.set_xscale("log")
    a1.set_xlabel("latency per image (ms, log)")
    a1.set_ylabel("Dice (synthetic test split)")
    a1.set_title("accuracy vs latency" + ("" if any_dice else " (no trained checkpoint: no Dice)"))
    a1.grid(alpha=0.3)
    if any_dice:
        a1.legend(fontsize=7)
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_xlabel("network calls per image (steps x ensemble)")
    a2.set_ylabel("latency per image (ms)")
    a2.set_title("latency vs sampler cost")
    a2.grid(alpha=0.3, which="both")
    if groups:
        a2.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_json_child(script: str | Path, argv: list[str], tag: str, timeout: float, env: dict | None = None) -> dict:
    """Run ``python script *argv`` in a fresh process (this VM's speed differs between processes)
    and return the JSON it printed after `tag` on its last such line."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, str(script), *argv]
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(Path(script).resolve().parents[1]))
    for line in r.stdout.splitlines()[::-1]:
        if line.startswith(tag):
            return json.loads(line[len(tag):])
    tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"child exited {r.returncode}: " + " | ".join(tail))


def run_child(script: str | Path, flag: str, spec: dict, tag: str, timeout: float) -> dict:
    """The benchmarks' one child-process runner: ``python script flag <spec as JSON>`` with
    OMP_NUM_THREADS from ``spec["threads"]`` (when given); the JSON the child printed after `tag`."""
    import json

    env = {"OMP_NUM_THREADS": str(spec["threads"])} if spec.get("threads") else None
    return run_json_child(script, [flag, json.dumps(spec)], tag, timeout, env=env)


def set_threads(threads: int) -> dict:
    """The one thread setting of a measuring child: torch's intra-op pool and, when ExecuTorch is
    installed, its thread pool; returns what each now uses (None where not available)."""
    import torch

    torch.set_num_threads(threads)
    got = {"torch": torch.get_num_threads(), "executorch": None}
    try:
        from executorch.extension.pybindings import portable_lib as pl

        if hasattr(pl, "_unsafe_reset_threadpool"):
            pl._unsafe_reset_threadpool(threads)
        if hasattr(pl, "_threadpool_get_thread_count"):
            got["executorch"] = int(pl._threadpool_get_thread_count())
    except Exception:  # noqa: BLE001 (eager and ONNX rows do not need ExecuTorch)
        pass
    return got


def cached_export(out: Path, export) -> dict:
    """The one export cache: {"path", "meta", "reused"} for the program at `out`, reused while its
    sidecar says it exported fine with this export recipe and still matches the file, else
    ``export(out)`` (which writes it and returns the sidecar)."""
    from edgeseg.mobile import sidecar as sc

    try:
        meta = sc.read_sidecar(out)
        if (meta.get("status", "ok") == "ok" and meta.get("recipe") == sc.EXPORT_RECIPE
                and sc.file_digest(out)[0] == meta.get("sha256")):
            return {"path": str(out), "meta": meta, "reused": True}
    except Exception:  # noqa: BLE001 (not there or stale: export)
        pass
    return {"path": str(out), "meta": export(out), "reused": False}


def paired(a, b) -> dict:
    """Mean per-image difference a - b with a normal 95% interval, and images won / lost."""
    import numpy as np

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)],
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "n": int(len(d))}


def paired_text(p: dict, scale: float = 100.0) -> str:
    """A :func:`paired` difference as "+m [lo, hi]" (points when `scale` is 100)."""
    return f"{scale * p['mean']:+.2f} [{scale * p['ci95'][0]:+.2f}, {scale * p['ci95'][1]:+.2f}]"
