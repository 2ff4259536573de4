"""The parts of the one prepared GPU run (issue 17); `bench/gpu.sh` runs them one process each.

    bash bench/gpu.sh                 # CUDA: all parts in <= 8 min; results under $OUT (bench/results/gpu/)
    bash bench/gpu.sh --dry-run       # the same code paths on CPU at tiny sizes (Triton interpreter)
    python bench/gpu_bench.py pack --data-dir DIR [--out bench/cache/isic2017-128.npz]

Parts (subcommands; each writes <out>/<part>.json and <part>.md, one table):
  env           device, driver, torch / triton versions, where the training data comes from
  kernel_tests  tests/test_kernels.py compiled on CUDA (EDGESEG_TEST_DEVICE=cuda): fp32, bf16, golden
  kernels       bench/kernels.py: fused vs eager vs torch.compile, fwd and fwd+bwd, GB/s, % of peak
  train         EFKD distillation steps/s and peak memory: the project's step (maps made in the data
                workers, fused loss) vs eager loss vs the authors' style (maps on the CPU in the step),
                fp32 and bf16 autocast
  sample        images/s of the paper protocol (DDPM 250 x 9) vs the shipped few-step setting
  mark          (gpu.sh) records a part's exit status, wall time and log tail into its JSON
  summary       summary.json / summary.md: every part's status and the issue's targets

Every part is guarded: its rows are written after each measurement, an exception is recorded
(status "failed", error text) and the run goes on; a row that would overrun the part's time
budget is skipped ("skipped: time budget"). Data for train / sample: --data-dir or
$ISIC2017_DIR (the official ISIC 2017 layout), else a packed array (--cache, $ISIC2017_CACHE or
bench/cache/isic2017-128.npz, made by `pack`), else the built-in synthetic set.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PARTS = ("env", "kernel_tests", "kernels", "train", "sample")
DEFAULT_CACHE = REPO / "bench" / "cache" / "isic2017-128.npz"
TARGET_SPEEDUP_EAGER = 3.0  # fused loss fwd+bwd vs eager, B = 16-64
TARGET_PEAK_BW = 0.6  # fused loss fwd+bwd at B = 256, share of peak memory bandwidth
TARGET_STEP_SPEEDUP = 1.5  # project's distillation step vs the authors' style, batch 16


@dataclass(frozen=True)
class Sizes:
    """What one run measures: the issue's sizes on the device, tiny ones for the dry run."""

    teacher: str
    student: str
    size: int  # image side (px)
    batch: int
    workers: int  # DataLoader workers (the maps are made there)
    warmup: int  # training steps before timing
    min_steps: int
    max_steps: int
    train_target_s: float  # timed training seconds per configuration (steps from the warm-up pace)
    kernel_batches: tuple[int, ...]
    kernel_size: int
    sample_images: int  # images per sampler run (x the ensemble per network call), as evaluate() batches 32
    sample_target_s: float  # timed sampling seconds per configuration


DEVICE_SIZES = Sizes("teacher-isic2018", "student-isic2018", 128, 16, 8, 5, 10, 60, 4.0,
                     (16, 64, 256), 128, 32, 3.0)
DRY_SIZES = Sizes("tiny-teacher", "tiny-student", 32, 4, 1, 1, 2, 2, 0.0, (2, 3, 4), 16, 4, 0.0)


def sizes_for(args) -> Sizes:
    return DRY_SIZES if args.dry_run else DEVICE_SIZES


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


# ----------------------------------------------------------------------------------------
# result files
# ----------------------------------------------------------------------------------------
# Markdown columns per part: (row key, header, format). A format is a format spec or None (str).
TABLES: dict[str, list[tuple[str, str, str | None]]] = {
    "env": [("key", "what", None), ("value", "value", None)],
    "kernel_tests": [("test", "test", None), ("passed", "passed", "d"), ("failed", "failed", "d"),
                     ("skipped", "skipped", "d"), ("seconds", "time (s)", ".2f"), ("status", "status", None)],
    "kernels": [("dtype", "dtype", None), ("B", "B", "d"), ("mode", "pass", None), ("method", "method", None),
                ("ms", "time (ms)", ".4f"), ("speedup_vs_eager", "vs eager", ".2f"), ("gbps", "GB/s", ".1f"),
                ("pct_peak_bw", "% of peak", ".1f"), ("status", "status", None)],
    "train": [("precision", "precision", None), ("autocast", "autocast", None), ("config", "step", None),
              ("loss", "loss", None),
              ("maps", "boundary maps", None), ("batch", "batch", "d"), ("steps", "timed steps", "d"),
              ("steps_per_s", "steps/s", ".2f"), ("ms_per_step", "ms/step", ".1f"),
              ("data_wait_ms", "data wait (ms)", ".2f"), ("maps_ms", "maps in step (ms)", ".2f"),
              ("peak_mem_mb", "peak GPU mem (MB)", ".0f"), ("speedup_vs_authors", "vs authors", ".2f"),
              ("status", "status", None)],
    "sample": [("model", "model", None), ("setting", "setting", None), ("precision", "precision", None),
               ("autocast", "autocast", None), ("step", "sampler step", None), ("images", "images", "d"),
               ("steps_run", "steps run", None),
               ("seconds_per_image", "s/image", ".4f"), ("images_per_s", "images/s", ".3f"),
               ("peak_mem_mb", "peak GPU mem (MB)", ".0f"), ("status", "status", None)],
}


def _cell(v, fmt: str | None) -> str:
    if v is None:
        return "-"
    if fmt and isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, fmt) if fmt != "d" else str(int(v))
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---:" if f else "---" for _, _, f in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k), f) for k, _, f in columns) + " |")
    return "\n".join(lines)


def write_json(path: Path, obj) -> None:
    from edgeseg.checkpoint import atomic_write_json

    atomic_write_json(path, obj, default=str)


def part_markdown(doc: dict) -> str:
    name = doc["part"]
    head = f"## {name}: {doc['status']}"
    bits = []
    if doc.get("wall_s") is not None:
        bits.append(f"{doc['wall_s']:.0f} s")
    if doc.get("limit_s") or doc.get("budget_s"):
        bits.append(f"limit {doc.get('limit_s') or doc.get('budget_s'):.0f} s")
    if doc.get("dry_run"):
        bits.append("DRY RUN on CPU: not a measurement")
    lines = [head + (f" ({', '.join(bits)})" if bits else ""), ""]
    if doc.get("error"):
        lines += ["Error: `" + str(doc["error"]).strip().splitlines()[0][:300] + "` (full text in the JSON)", ""]
    for n in doc.get("notes", []):
        lines.append(f"- {n}")
    if doc.get("notes"):
        lines.append("")
    if doc.get("rows"):
        lines += [markdown_table(doc["rows"], TABLES[name]), ""]
    return "\n".join(lines)


class Part:
    """One part's result: rows, notes, status and timing, rewritten after every row so that a
    part killed at its time limit keeps what it measured."""

    def __init__(self, name: str, out: Path, budget_s: float, dry_run: bool):
        self.name, self.out, self.budget_s = name, out, float(budget_s)
        self.t0 = time.monotonic()
        self.doc = dict(part=name, status="running", dry_run=dry_run, budget_s=self.budget_s, wall_s=None,
                        error=None, started=now_iso(), settings={}, notes=[], rows=[])
        out.mkdir(parents=True, exist_ok=True)
        self.save()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def note(self, text: str) -> None:
        print(text, flush=True)
        self.doc["notes"].append(text)
        self.save()

    def add(self, row: dict) -> dict:
        row.setdefault("status", "ok")
        self.doc["rows"].append(row)
        self.save()
        return row

    def skip(self, row: dict, needed_s: float) -> None:
        row.update(status="skipped: time budget", note=f"needed ~{needed_s:.0f} s, {self.left():.0f} s left")
        print(f"[{self.name}] skipped {row}: time budget", flush=True)
        self.add(row)

    def save(self) -> None:
        self.doc["wall_s"] = round(time.monotonic() - self.t0, 2)
        write_json(self.out / f"{self.name}.json", self.doc)
        (self.out / f"{self.name}.md").write_text(part_markdown(self.doc))

    def finish(self, status: str, error: str | None = None) -> None:
        self.doc["status"], self.doc["error"] = status, error
        self.doc["finished"] = now_iso()
        self.save()


class PartTimeout(BaseException):
    """SIGTERM from gpu.sh's `timeout`: the part ran past its hard limit. A BaseException, so
    that the per-row `except Exception` guards let it through to `run_part`."""


def _on_sigterm(signum, frame):
    raise PartTimeout("stopped at the part's time limit (SIGTERM)")


def run_part(name: str, args, body) -> int:
    """Run `body(part, args)`; status "ok" when every row is ok, "partial" when some row was
    skipped or failed, "failed" (error text kept) when the body raised."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    part = Part(name, args.out, args.budget, args.dry_run)
    try:
        body(part, args)
    except (Exception, SystemExit, PartTimeout) as e:  # SystemExit: bench/kernels.py's disagreement exit
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)
        part.finish("failed", f"{type(e).__name__}: {e}\n{text[-4000:]}")
        return 1
    rows = part.doc["rows"]
    part.finish("ok" if all(r.get("status") == "ok" for r in rows) else "partial")
    return 0


# ----------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------
def pick_device(args):
    import torch

    if args.dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: the GPU run needs one (use --dry-run to check the script on CPU)")
    return torch.device("cuda")


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mem_mb(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def free_memory(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# The fused loss and sampler step, named explicitly: Triton on CUDA, and in the dry run Triton's
# interpreter (TRITON_INTERPRET=1; "auto" would pick torch for CPU tensors and skip the kernels).
FUSED = "triton"


# ----------------------------------------------------------------------------------------
# data: ISIC 2017 folder, packed array, or synthetic
# ----------------------------------------------------------------------------------------
def data_source(args) -> tuple[str, str | None]:
    """("folder", dir) | ("cache", npz) | ("synthetic", None): where train / sample read images."""
    data_dir = getattr(args, "data_dir", None) or os.environ.get("ISIC2017_DIR")
    if data_dir:
        return "folder", str(data_dir)
    cache = getattr(args, "cache", None) or os.environ.get("ISIC2017_CACHE") or str(DEFAULT_CACHE)
    if Path(cache).is_file():
        return "cache", str(cache)
    return "synthetic", None


def describe_source(kind: str, where: str | None) -> str:
    if kind == "folder":
        return f"ISIC 2017 train split from {where}"
    if kind == "cache":
        return f"ISIC 2017 train images packed in {where}"
    return ("synthetic set: no ISIC 2017 data given (--data-dir, $ISIC2017_DIR, --cache, $ISIC2017_CACHE or "
            f"{DEFAULT_CACHE.relative_to(REPO)}); the timings do not depend on the pixels")


def _resize_arrays(images, masks, size: int):
    import cv2
    import numpy as np

    if images.shape[1] == size and images.shape[2] == size:
        return images, masks
    im = np.stack([cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA) for x in images])
    m = np.stack([cv2.resize(x, (size, size), interpolation=cv2.INTER_NEAREST) for x in masks])
    return im, m


def load_images(args, size: int, augment: bool):
    """The training images as an edgeseg SegDataset (item: image, mask, distance map)."""
    from edgeseg.data import SegDataset, load_dataset

    kind, where = data_source(args)
    if kind == "folder":
        return load_dataset("isic2017", "train", data_dir=where, size=size, augment=augment)
    if kind == "cache":
        import numpy as np

        with np.load(where, allow_pickle=False) as z:
            images, masks, names = z["images"], z["masks"], [str(n) for n in z["names"]]
        images, masks = _resize_arrays(images, masks, size)
        return SegDataset(images, masks, names, "isic2017", "train", augment=augment)
    return load_dataset("synthetic", "train", size=size, augment=augment)


def albumentations_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("albumentations") is not None


# ----------------------------------------------------------------------------------------
# part: env
# ----------------------------------------------------------------------------------------
def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - record what is missing, whatever the reason
        return f"missing ({type(e).__name__})"


def _nvidia_smi() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return r.stdout.strip() or None
    except Exception:  # noqa: BLE001 - no nvidia-smi (CPU machine)
        return None


def env_info(args) -> dict:
    import torch

    from bench.kernels import peak_bandwidth

    info = {
        "mode": "DRY RUN on CPU (Triton interpreter, tiny sizes): not a measurement" if args.dry_run else "measurement",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda (torch build)": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpus": os.cpu_count(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    if torch.cuda.is_available() and not args.dry_run:
        p = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name(0)
        bw = peak_bandwidth(name)
        info.update({
            "device": name,
            "compute capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count,
            "memory (GiB)": round(p.total_memory / 2**30, 1),
            "peak memory bandwidth (TB/s, table)": bw / 1e12 if bw else "unknown",
            "nvidia-smi": _nvidia_smi(),
            "tf32 matmul / cudnn": f"{torch.backends.cuda.matmul.allow_tf32} / {torch.backends.cudnn.allow_tf32}",
            "cudnn.benchmark": torch.backends.cudnn.benchmark,
        })
    else:
        info["device"] = f"CPU ({platform.machine()})"
    try:
        import edgeseg.kernels  # noqa: F401

        info["edgeseg.kernels"] = "imports"
    except Exception as e:  # noqa: BLE001
        info["edgeseg.kernels"] = f"does not import: {type(e).__name__}: {e}"
    info["albumentations (training augmentation)"] = "yes" if albumentations_available() else "missing: train without"
    info["training data"] = describe_source(*data_source(args))
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        info["git commit"] = r.stdout.strip() or None
    except Exception:  # noqa: BLE001 - the device copy may have no git
        info["git commit"] = None
    return info


def part_env(part: Part, args) -> None:
    info = env_info(args)
    part.doc["env"] = info
    for k, v in info.items():
        print(f"{k:40s} {v}", flush=True)
        part.add(dict(key=k, value=v))


# ----------------------------------------------------------------------------------------
# part: kernel_tests
# ----------------------------------------------------------------------------------------
def parse_junit(path: Path) -> list[dict]:
    """One row per test function (parametrisations grouped): passed / failed / skipped / seconds."""
    import xml.etree.ElementTree as ET

    by_fn: dict[str, dict] = {}
    failures: list[str] = []
    for case in ET.parse(path).getroot().iter("testcase"):
        full = case.get("name", "?")
        fn = full.split("[", 1)[0]
        r = by_fn.setdefault(fn, dict(test=fn, passed=0, failed=0, skipped=0, seconds=0.0, failures=[]))
        r["seconds"] += float(case.get("time") or 0)
        if case.find("failure") is not None or case.find("error") is not None:
            r["failed"] += 1
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            r["failures"].append(f"{full}: {(bad.get('message') or '')[:300]}")
            failures.append(full)
        elif case.find("skipped") is not None:
            r["skipped"] += 1
        else:
            r["passed"] += 1
    for r in by_fn.values():
        r["seconds"] = round(r["seconds"], 3)
        r["status"] = "ok" if r["failed"] == 0 else "failed"
    return list(by_fn.values())


def part_kernel_tests(part: Part, args) -> None:
    xml = args.out / "kernel_tests.xml"
    env = dict(os.environ)
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
        env.pop("EDGESEG_TEST_DEVICE", None)
        where = "CPU, Triton interpreter"
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
        env["EDGESEG_TEST_DEVICE"] = "cuda"
        where = "CUDA, compiled"
    # one process (no xdist workers: `-o addopts=` drops pyproject's `-n auto`), so the report is this run's
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=",
           str(REPO / "tests" / "test_kernels.py"), f"--junitxml={xml}", "-o", "junit_family=xunit1"]
    if args.dry_run:  # the sm_90 compile check costs ~8 s of CPU here; the test suite runs it
        cmd += ["-k", "not compile_for_sm90"]
    part.doc["settings"] = dict(command=" ".join(cmd), where=where)
    print(f"[kernel_tests] {where}: {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(10.0, part.left() - 5))
    print(r.stdout[-6000:], r.stderr[-3000:], sep="\n", flush=True)
    part.doc["pytest_rc"] = r.returncode
    part.doc["pytest_seconds"] = round(time.monotonic() - t0, 2)
    part.doc["pytest_tail"] = (r.stdout + r.stderr)[-3000:]
    for line in r.stdout.splitlines():  # the test module's closing note: largest errors seen
        if line.startswith("max relative errors:"):
            part.note(line)
    if not xml.is_file():
        raise RuntimeError(f"pytest wrote no report (exit {r.returncode}): {(r.stdout + r.stderr)[-1500:]}")
    rows = parse_junit(xml)
    for row in rows:
        part.add(row)
    counts = {k: sum(x[k] for x in rows) for k in ("passed", "failed", "skipped")}
    part.doc["counts"] = counts
    part.note(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped ({where})")
    if r.returncode != 0 or counts["failed"]:
        failed = [f for x in rows for f in x["failures"]]
        raise RuntimeError(f"kernel tests: pytest exit {r.returncode}, {counts['failed']} failed: "
                           + "; ".join(failed)[:2000])
    if counts["passed"] == 0:
        raise RuntimeError("kernel tests: nothing ran")


# ----------------------------------------------------------------------------------------
# part: kernels (bench/kernels.py)
# ----------------------------------------------------------------------------------------
def part_kernels(part: Part, args) -> None:
    from bench import kernels as kb
    from edgeseg.kernels import triton_available

    device = pick_device(args)  # a clear error without CUDA
    if not triton_available():
        raise RuntimeError("Triton does not import: nothing to benchmark")
    s = sizes_for(args)
    # Fused vs eager for both dtypes first (seconds), then the torch.compile column, fp32 only (the
    # training loss runs in fp32: Trainer.loss_on casts to float). Compiles cost the most and may
    # not fit the limit: last, a kill there loses nothing else. No compile in the dry run (a C++
    # toolchain and minutes of CPU).
    passes = [("fp32", False), ("bf16", False)] + ([] if args.dry_run else [("fp32", True)])
    part.doc["settings"] = dict(batches=list(s.kernel_batches), size=s.kernel_size, passes=passes,
                                timing="CPU median of 3 (dry run)" if args.dry_run
                                else "triton.testing.do_bench median")
    by_dtype: dict[str, list[dict]] = {}
    for dtype, use_compile in passes:
        estimate = 40.0 if use_compile else 5.0
        for B in s.kernel_batches:
            if part.left() < estimate:
                part.skip(dict(dtype=dtype, B=B, method="compile" if use_compile else "fused, eager"), estimate)
                continue
            t0 = time.monotonic()
            ns = argparse.Namespace(cpu_smoke=args.dry_run, dtype=dtype, size=s.kernel_size, batch_sizes=[B],
                                    no_compile=not use_compile)
            rows = kb.finish(ns, kb.run(ns))["rows"]
            if use_compile:  # fused and eager were measured in the first pass
                rows = [r for r in rows if r["method"] == "compile"]
            by_dtype.setdefault(dtype, []).extend(rows)
            for r in rows:
                part.add(dict(r, pct_peak_bw=100 * r["frac_peak_bw"] if r.get("frac_peak_bw") else None,
                              status="ok" if r["ms"] else f"failed: {r.get('error')}"))
            estimate = 1.2 * (time.monotonic() - t0)  # the next batch size costs about as much
            free_memory(device)
        if by_dtype.get(dtype):
            write_kernel_report(part, args, kb, dtype, by_dtype[dtype], s)


def write_kernel_report(part: Part, args, kb, dtype: str, rows: list[dict], s: Sizes) -> None:
    """bench/kernels.py's own files (JSON, Markdown with its target lines, PNG) for one dtype."""
    ns = argparse.Namespace(cpu_smoke=args.dry_run, dtype=dtype, size=s.kernel_size,
                            batch_sizes=list(s.kernel_batches), no_compile=False)
    report = kb.finish(ns, dict(rows=sorted(rows, key=lambda r: (r["B"], r["mode"]))))
    prefix = f"kernels-{dtype}" + ("-smoke" if args.dry_run else "")
    write_json(args.out / f"{prefix}.json", report)
    kb.write_markdown(report, args.out / f"{prefix}.md")
    try:
        kb.write_plot(report, args.out / f"{prefix}.png")
    except Exception as e:  # noqa: BLE001 - a plot is a nicety: matplotlib may be missing
        part.note(f"no plot for {dtype}: {type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------
# part: train
# ----------------------------------------------------------------------------------------
# (name, loss backend, where the boundary maps are made, what it is)
TRAIN_STEPS = [
    ("project", FUSED, "workers", "this project: maps made in the data workers, fused Triton loss"),
    ("authors", "torch", "step", "the authors' style: maps recomputed on the CPU in every step, eager loss"),
    ("eager-loss", "torch", "workers", "maps in the data workers, eager (torch) loss"),
]
PRECISIONS = ("bf16", "fp32")  # bf16 autocast first: the project's default (TrainConfig.bf16)


class ImagesAndMasks:
    """A SegDataset seen without its distance maps: (image, mask), as the authors' loader gives."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        import numpy as np
        import torch

        img, m = self.ds.raw(i)
        image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), np.float32) / 255.0)
        mask = torch.from_numpy((m > 0).astype(np.float32) * 2 - 1)[None]
        return image, mask


def maps_on_cpu(mask):
    """The authors' per-step boundary maps: distance_map of every mask of the batch, on the CPU."""
    import numpy as np
    import torch

    from edgeseg.boundary import distance_map

    m = (mask[:, 0] > 0).cpu().numpy().astype(np.float32)
    return torch.from_numpy(np.stack([distance_map(x) for x in m]))[:, None]


def make_loader(ds, s: Sizes, n_batches: int, device, seed: int = 0):
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from edgeseg.data import worker_init_fn

    rng = np.random.default_rng(seed)
    need = s.batch * n_batches
    order = np.concatenate([rng.permutation(len(ds)) for _ in range(math.ceil(need / len(ds)))])[:need]
    return DataLoader(ds, batch_size=s.batch, sampler=order.tolist(), drop_last=True, num_workers=s.workers,
                      worker_init_fn=worker_init_fn, pin_memory=device.type == "cuda",
                      prefetch_factor=4 if s.workers else None, generator=torch.Generator().manual_seed(seed))


def timed_train(trainer, loader, s: Sizes, maps_in_step: bool, device) -> dict:
    """Warm-up steps, then steps timed between two synchronisations (Trainer.train_step)."""
    it = iter(loader)
    data_s: list[float] = []
    maps_s: list[float] = []

    def step():
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        if maps_in_step:
            image, mask = batch
            batch = (image, mask, maps_on_cpu(mask))
        t2 = time.perf_counter()
        trainer.train_step(batch)  # ends with a host sync (float(loss)), as in training
        data_s.append(t1 - t0)
        maps_s.append(t2 - t1)

    for _ in range(s.warmup):
        t0 = time.perf_counter()
        step()
        last = time.perf_counter() - t0
    steps = s.min_steps if s.train_target_s <= 0 else int(min(s.max_steps, max(s.min_steps, s.train_target_s / last)))
    data_s.clear()
    maps_s.clear()
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = time.perf_counter() - t0
    return dict(steps=steps, seconds=round(dt, 3), steps_per_s=steps / dt, ms_per_step=1e3 * dt / steps,
                images_per_s=steps * s.batch / dt, data_wait_ms=1e3 * sum(data_s) / steps,
                maps_ms=1e3 * sum(maps_s) / steps if maps_in_step else None, peak_mem_mb=peak_mem_mb(device))


def part_train(part: Part, args) -> None:
    import tempfile

    import torch

    from edgeseg.models import build
    from edgeseg.train import TrainConfig, Trainer

    s = sizes_for(args)
    device = pick_device(args)
    augment = albumentations_available()
    kind, where = data_source(args)
    part.note(f"data: {describe_source(kind, where)}")
    if not augment:
        part.note("albumentations is not installed: training without augmentation (the same for every step kind)")
    ds = load_images(args, s.size, augment)
    part.doc["settings"] = dict(asdict(s), device=str(device), augment=augment, data=kind, data_where=where,
                                images=len(ds), backend_fused=FUSED)
    torch.manual_seed(0)
    teacher = build(s.teacher).to(device).eval().requires_grad_(False)
    estimate = 20.0 if not args.dry_run else 1.0
    n_batches = s.warmup + s.max_steps
    with tempfile.TemporaryDirectory() as tmp:
        for precision in PRECISIONS:
            for name, backend, maps, what in TRAIN_STEPS:
                row = dict(precision=precision, config=name,
                           loss="fused (Triton)" if backend == FUSED else "eager (torch)",
                           maps="data workers" if maps == "workers" else "CPU, in the step", batch=s.batch,
                           autocast=precision == "bf16" and device.type == "cuda", what=what)
                if part.left() < estimate:
                    part.skip(row, estimate)
                    continue
                t0 = time.monotonic()
                trainer = None
                try:
                    cfg = TrainConfig(role="student", preset=s.student, batch_size=s.batch,
                                      kernel_backend=backend,
                                      bf16=precision == "bf16", num_workers=s.workers, augment=augment)
                    trainer = Trainer(cfg, tmp, teacher=teacher, train_ds=ds, val_ds=None, device=device, quiet=True)
                    data = ImagesAndMasks(ds) if maps == "step" else ds
                    row.update(timed_train(trainer, make_loader(data, s, n_batches, device), s, maps == "step", device))
                except Exception as e:  # noqa: BLE001 - record, go on with the next configuration
                    row.update(status=f"failed: {type(e).__name__}: {e}"[:500],
                               traceback=traceback.format_exc()[-3000:])
                finally:
                    del trainer
                    free_memory(device)
                part.add(row)
                print(f"[train] {precision} {name:10s} " + (f"{row['steps_per_s']:.2f} steps/s" + _peak(row)
                                                             if row["status"] == "ok" else row["status"]), flush=True)
                estimate = 1.3 * (time.monotonic() - t0)  # the next configuration costs about as much
    add_speedups(part.doc["rows"])
    part.save()


def add_speedups(rows: list[dict]) -> None:
    """steps/s of each row over the authors' style (and over the eager loss) at the same precision."""
    for r in rows:
        same = {x["config"]: x.get("steps_per_s") for x in rows if x["precision"] == r["precision"]}
        v = r.get("steps_per_s")
        r["speedup_vs_authors"] = v / same["authors"] if v and same.get("authors") else None
        r["speedup_vs_eager_loss"] = v / same["eager-loss"] if v and same.get("eager-loss") else None


# ----------------------------------------------------------------------------------------
# part: sample
# ----------------------------------------------------------------------------------------
# (model role, setting, precision, sampler-step backend): the paper protocol and the shipped
# few-step setting for the student; the teacher's paper protocol (what DermoSegDiff costs); the
# eager sampler step last (what the fused step buys end to end)
SAMPLE_RUNS = [
    ("student", "paper", "fp32", FUSED),
    ("student", "shipped", "fp32", FUSED),
    ("student", "paper", "bf16", FUSED),
    ("student", "shipped", "bf16", FUSED),
    ("teacher", "paper", "fp32", FUSED),
    ("student", "paper", "fp32", "torch"),
]


def sampler_settings(setting: str, preset_name: str):
    """The paper's protocol, or the shipped defaults (edgeseg.defaults) for this preset's prediction type."""
    from edgeseg.evaluate import PAPER_PROTOCOL
    from edgeseg.models import preset
    from edgeseg.pipeline import DEFAULT_EVAL

    return PAPER_PROTOCOL if setting == "paper" else DEFAULT_EVAL.resolved(preset(preset_name).prediction_type)


def run_sampler(model, images, settings, backend: str, bf16: bool, steps_run: int | None, device, seed: int = 0):
    """One sample_masks call (the first `steps_run` steps of the chain when given); seconds."""
    import torch

    from edgeseg.diffusion import sample_masks
    from edgeseg.sampling import make_scheduler

    sch = make_scheduler(settings.sampler, settings.steps, model.preset.prediction_type, backend=backend)
    if steps_run is not None and steps_run < len(sch.timesteps):
        sch.timesteps = sch.timesteps[:steps_run]  # DDPM steps cost the same: time a prefix, scale up

    def net(x, g, t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(x, g, t).float()

    B, _, H, W = images.shape
    noise = torch.randn((B * settings.ensemble, 1, H, W), generator=torch.Generator().manual_seed(seed)).to(device)
    sync(device)
    t0 = time.perf_counter()
    sample_masks(net, images, sch, settings.ensemble, noise=noise)
    sync(device)
    return time.perf_counter() - t0


def time_paper(model, images, settings, backend, bf16, s: Sizes, device) -> dict:
    """DDPM 250 x 9: time the first k steps (k from a 2-step probe and the time target), scale to 250."""
    full = settings.steps
    run_sampler(model, images, settings, backend, bf16, 2, device)  # warm-up: kernels, cuDNN, allocator
    k = 2
    if s.sample_target_s > 0:  # steps to fill the time target, from a warm 2-step probe
        probe = run_sampler(model, images, settings, backend, bf16, 2, device) / 2
        k = int(min(full, max(2, s.sample_target_s / probe)))
    reset_peak(device)
    dt = run_sampler(model, images, settings, backend, bf16, k, device)
    total = dt * full / k
    n = images.shape[0]
    return dict(steps_run=f"{k} of {full}" + (" (scaled up)" if k < full else ""), extrapolated=k < full,
                seconds=round(dt, 3), seconds_per_image=total / n, images_per_s=n / total,
                peak_mem_mb=peak_mem_mb(device))


def time_few_step(model, images, settings, backend, bf16, s: Sizes, device) -> dict:
    """The shipped DDIM setting: whole runs, repeated to fill the time target."""
    first = run_sampler(model, images, settings, backend, bf16, None, device)  # warm-up
    reps = 1 if s.sample_target_s <= 0 else int(min(50, max(2, s.sample_target_s / max(first, 1e-4))))
    reset_peak(device)
    dt = sum(run_sampler(model, images, settings, backend, bf16, None, device, seed=i) for i in range(reps))
    n = images.shape[0] * reps
    return dict(steps_run=f"{settings.steps} x {reps} runs", extrapolated=False, seconds=round(dt, 3),
                seconds_per_image=dt / n, images_per_s=n / dt, peak_mem_mb=peak_mem_mb(device))


def part_sample(part: Part, args) -> None:
    import torch

    from edgeseg.models import build

    s = sizes_for(args)
    device = pick_device(args)
    kind, where = data_source(args)
    part.note(f"data: {describe_source(kind, where)}")
    ds = load_images(args, s.size, augment=False)
    images = torch.stack([ds[i % len(ds)][0] for i in range(s.sample_images)]).to(device)
    part.doc["settings"] = dict(asdict(s), device=str(device), data=kind)
    models = {}
    estimate = 15.0 if not args.dry_run else 1.0
    for role, setting, precision, backend in SAMPLE_RUNS:
        settings = sampler_settings(setting, s.teacher if role == "teacher" else s.student)
        n = s.sample_images
        row = dict(model=s.teacher if role == "teacher" else s.student,
                   setting=("paper: " if setting == "paper" else "shipped: ") + settings.describe(),
                   precision=precision, step="fused (Triton)" if backend == FUSED else "eager (torch)", images=n,
                   autocast=precision == "bf16" and device.type == "cuda")
        if part.left() < estimate:
            part.skip(row, estimate)
            continue
        t0 = time.monotonic()
        try:
            if role not in models:
                torch.manual_seed(0)
                models[role] = build(s.teacher if role == "teacher" else s.student).to(device).eval()
            timer = time_paper if setting == "paper" else time_few_step
            row.update(timer(models[role], images[:n], settings, backend, row["autocast"], s, device))
        except Exception as e:  # noqa: BLE001 - record, go on
            row.update(status=f"failed: {type(e).__name__}: {e}"[:500], traceback=traceback.format_exc()[-3000:])
        free_memory(device)
        part.add(row)
        print(f"[sample] {row['model']} {row['setting']} {precision} {row['step']}: "
              + (f"{row['images_per_s']:.3f} images/s" if row["status"] == "ok" else row["status"]), flush=True)
        estimate = 1.3 * (time.monotonic() - t0)


# ----------------------------------------------------------------------------------------
# mark (gpu.sh, after each part) and summary
# ----------------------------------------------------------------------------------------
def mark(args) -> int:
    """Record a part's exit: a non-zero exit or a kill at the limit becomes status "failed"."""
    path = args.out / f"{args.part}.json"
    doc = json.loads(path.read_text()) if path.is_file() else dict(
        part=args.part, status="running", dry_run=args.dry_run, error=None, notes=[], rows=[])
    doc.update(rc=args.rc, wall_s=float(args.seconds), limit_s=float(args.limit))
    log_tail = ""
    if args.log and Path(args.log).is_file():
        log_tail = Path(args.log).read_text(errors="replace")[-2000:]
    if args.rc in (124, 137):  # timeout's exit codes: stopped (SIGTERM) or killed (SIGKILL)
        doc["status"] = "failed"
        doc["error"] = (f"timed out at the part's limit of {args.limit:.0f} s (exit {args.rc})\n"
                        + (doc.get("error") or log_tail))
    elif args.rc != 0 and doc["status"] != "failed":
        doc["status"] = "failed"
        doc["error"] = f"exit status {args.rc}\n{log_tail}"
    elif doc["status"] == "running":
        doc["status"] = "failed"
        doc["error"] = f"the part ended without recording a result (exit {args.rc})\n{log_tail}"
    write_json(path, doc)
    (args.out / f"{args.part}.md").write_text(part_markdown(doc))
    return 0


def not_run(args) -> int:
    """gpu.sh: no time left for this part."""
    doc = dict(part=args.part, status="failed", dry_run=args.dry_run,
               error="not run: the run's 8-minute budget was spent",
               notes=[], rows=[], wall_s=0.0)
    write_json(args.out / f"{args.part}.json", doc)
    (args.out / f"{args.part}.md").write_text(part_markdown(doc))
    return 0


def _rows(docs: dict, part: str) -> list[dict]:
    return docs.get(part, {}).get("rows", [])


def targets(docs: dict, dry_run: bool) -> list[dict]:
    """The issue's targets from the measured rows (met = None in a dry run: not a measurement)."""
    out = []

    def add(name, value, ok, unit=""):
        out.append(dict(target=name, measured=(f"{value:.2f}{unit}" if isinstance(value, float) else value),
                        met=None if dry_run or value is None else bool(ok)))

    k = [r for r in _rows(docs, "kernels") if r.get("dtype") == "fp32" and r.get("method") == "fused"
         and r.get("mode") == "fwd+bwd" and r.get("status") == "ok"]
    small = sorted(k, key=lambda r: r["B"])[:2]
    for r in small:
        v = r.get("speedup_vs_eager")
        add(f"fused loss fwd+bwd >= {TARGET_SPEEDUP_EAGER:.0f}x eager, fp32, B={r['B']}", v,
            v is not None and v >= TARGET_SPEEDUP_EAGER, "x")
    if not small:
        add(f"fused loss fwd+bwd >= {TARGET_SPEEDUP_EAGER:.0f}x eager, fp32, B=16-64", None, False)
    big = sorted(k, key=lambda r: r["B"])[-1:] if len(k) > 2 else []
    for r in big:
        v = r.get("frac_peak_bw")
        add(f"fused loss fwd+bwd >= {100 * TARGET_PEAK_BW:.0f}% of peak bandwidth, fp32, B={r['B']}",
            100 * v if v else None, v is not None and v >= TARGET_PEAK_BW, "%")
    if not big:
        add(f"fused loss fwd+bwd >= {100 * TARGET_PEAK_BW:.0f}% of peak bandwidth, fp32, B=256", None, False)
    train = _rows(docs, "train")
    for prec in PRECISIONS:
        r = next((x for x in train if x.get("precision") == prec and x.get("config") == "project"), None)
        v = r.get("speedup_vs_authors") if r else None
        batch = r["batch"] if r else (DRY_SIZES if dry_run else DEVICE_SIZES).batch
        add(f"distillation step >= {TARGET_STEP_SPEEDUP}x the authors' style, {prec}, batch {batch}",
            v, v is not None and v >= TARGET_STEP_SPEEDUP, "x")
    return out


def _peak(row: dict) -> str:
    return f", peak {row['peak_mem_mb']:.0f} MB" if row.get("peak_mem_mb") is not None else ""


def headline(docs: dict) -> list[dict]:
    """The numbers a reader wants first: kernel-test counts, steps/s, images/s."""
    out = []
    kt = docs.get("kernel_tests", {}).get("counts")
    if kt:
        out.append(dict(what="kernel tests",
                        value=f"{kt['passed']} passed, {kt['failed']} failed, {kt['skipped']} skipped"))
    for r in _rows(docs, "train"):
        if r.get("status") == "ok":
            out.append(dict(what=f"train {r['precision']} {r['config']} (batch {r['batch']})",
                            value=f"{r['steps_per_s']:.2f} steps/s" + _peak(r)))
    for r in _rows(docs, "sample"):
        if r.get("status") == "ok":
            out.append(dict(what=f"sample {r['model']} {r['setting']} {r['precision']} {r['step']}",
                            value=f"{r['images_per_s']:.3f} images/s" + _peak(r)))
    return out


def summary(args) -> int:
    docs = {}
    for p in PARTS:
        f = args.out / f"{p}.json"
        docs[p] = json.loads(f.read_text()) if f.is_file() else dict(part=p, status="missing", rows=[])
    env = docs["env"].get("env", {})
    parts = [dict(part=p, status=d.get("status"), wall_s=d.get("wall_s"), limit_s=d.get("limit_s") or d.get("budget_s"),
                  error=(str(d.get("error")).strip().splitlines()[0][:200] if d.get("error") else None))
             for p, d in docs.items()]
    tg = targets(docs, args.dry_run)
    hl = headline(docs)
    doc = dict(kind="DRY RUN on CPU: not a measurement" if args.dry_run else "measurement", dry_run=args.dry_run,
               created=now_iso(), device=env.get("device"), torch=env.get("torch"), triton=env.get("triton"),
               total_wall_s=args.total_s, parts=parts, targets=tg, headline=hl)
    write_json(args.out / "summary.json", doc)
    title = "# GPU run" + (": DRY RUN on CPU (Triton interpreter, tiny sizes), not a measurement"
                           if args.dry_run else "")
    part_cols = [("part", "part", None), ("status", "status", None), ("wall_s", "wall (s)", ".1f"),
                 ("limit_s", "limit (s)", ".0f"), ("error", "error", None)]
    target_cols = [("target", "target", None), ("measured", "measured", None), ("met", "met", None)]
    when = (f"Device: {doc['device']}; torch {doc['torch']}, triton {doc['triton']}; {doc['created']}"
            + (f"; total {args.total_s:.0f} s." if args.total_s is not None else "."))
    head = [title, "", when, "",
            "## Summary", "", markdown_table(parts, part_cols), "",
            "## Targets (issue 17)", "", markdown_table(tg, target_cols), "",
            "## Headline", "", markdown_table(hl, [("what", "what", None), ("value", "value", None)]), ""]
    body = [part_markdown(docs[p]) if docs[p].get("status") != "missing" else f"## {p}: missing\n" for p in PARTS]
    (args.out / "summary.md").write_text("\n".join(head + body) + "\n")
    print("\n".join(head), flush=True)
    print(f"wrote {args.out / 'summary.json'} and summary.md (with every part's table)", flush=True)
    return 0 if all(p["status"] in ("ok", "partial") for p in parts) else 1


# ----------------------------------------------------------------------------------------
# pack: a small cached array of ISIC images that travels with the repository
# ----------------------------------------------------------------------------------------
def pack(args) -> int:
    import numpy as np

    from edgeseg.data import load_dataset

    data_dir = args.data_dir or os.environ.get("ISIC2017_DIR")
    if args.dataset != "synthetic" and not data_dir:
        print("pack: give --data-dir (or $ISIC2017_DIR), the ISIC 2017 folder in its official layout", file=sys.stderr)
        return 2
    ds = load_dataset(args.dataset, "train", data_dir=data_dir if args.dataset != "synthetic" else None, size=args.size)
    n = min(args.n, len(ds))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=np.asarray(ds.images[:n]), masks=np.asarray(ds.masks[:n]),
                        names=np.array(ds.names[:n]),
                        meta=np.array(json.dumps(dict(dataset=args.dataset, split="train", size=args.size, n=n))))
    print(f"packed {n} train images of {args.dataset} at {args.size} px into {args.out} "
          f"({args.out.stat().st_size / 2**20:.1f} MiB)")
    return 0


# ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in PARTS:
        q = sub.add_parser(name)
        q.add_argument("--out", type=Path, required=True)
        q.add_argument("--budget", type=float, default=120.0, help="seconds this part may use")
        q.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton interpreter")
        q.add_argument("--data-dir", default=None, help="ISIC 2017 folder (official layout); or $ISIC2017_DIR")
        q.add_argument("--cache", default=None, help="packed array (pack); or $ISIC2017_CACHE")
    q = sub.add_parser("mark")
    q.add_argument("part", choices=PARTS)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--rc", type=int, required=True)
    q.add_argument("--seconds", type=float, required=True)
    q.add_argument("--limit", type=float, required=True)
    q.add_argument("--log", default=None)
    q.add_argument("--dry-run", action="store_true")
    q = sub.add_parser("not-run")
    q.add_argument("part", choices=PARTS)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--dry-run", action="store_true")
    q = sub.add_parser("summary")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--dry-run", action="store_true")
    q.add_argument("--total-s", type=float, default=None)
    q = sub.add_parser("pack", help="pack ISIC 2017 train images into a small .npz for the device run")
    q.add_argument("--data-dir", default=None)
    q.add_argument("--dataset", default="isic2017")
    q.add_argument("--size", type=int, default=128)
    q.add_argument("-n", type=int, default=256, help="images (256 at 128 px: about 10 MiB)")
    q.add_argument("--out", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args(argv)

    bodies = dict(env=part_env, kernel_tests=part_kernel_tests, kernels=part_kernels, train=part_train,
                  sample=part_sample)
    if args.cmd in bodies:
        return run_part(args.cmd, args, bodies[args.cmd])
    return {"mark": mark, "not-run": not_run, "summary": summary, "pack": pack}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
