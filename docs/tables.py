"""Write every table in README.md and docs/ that copies numbers from code or bench/results.

    python docs/tables.py           # rewrite the tables in place
    python docs/tables.py --check   # exit 1, naming each file, if a committed table differs

A table lives between `<!-- table:NAME -->` and `<!-- /table -->` in a Markdown file; this
script owns the text between the markers. The numbers' sources are the tables just below: a new
result (another shipped model, a web-target row) is one more line there.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# ---- sources ----------------------------------------------------------------------------------
# A source is "FILE#KEY": FILE relative to the repository root, KEY a row of its "rows" (bench/isic2017.py
# results), a top-level entry (a run's metrics.json) or the "role" of an entry in its "results" list
# (bench/pte_latency.py). Headline columns: quality from the first source, int8 program size and
# latency from the second (None: not measured).
RUNTIMES = "bench/results/runtimes/runtimes.json"
REAL_LESIONS = "bench/results/isic2017/results.json"
REAL_LESIONS_128 = "bench/results/isic2017-128/results.json"
PTE_LATENCY_128 = "bench/results/pte-latency-128/pte-latency.json"
# the default pair and its int8 program, scored at each photo's own size
TEACHER_128 = f"{REAL_LESIONS_128}#teacher@photo"
STUDENT_128 = f"{REAL_LESIONS_128}#student (EFKD)@photo"
STUDENT_128_PTE = f"{REAL_LESIONS_128}#student tiny-student-128-k1n3-int8.pte@photo"

HEADLINE: list[tuple[str, str, str | None]] = [
    ("teacher `tiny-teacher-128-isic2017`", TEACHER_128, None),
    ("student `tiny-student-128-isic2017` (default)", STUDENT_128, None),
    ("student, int8 `.pte`", STUDENT_128_PTE, f"{PTE_LATENCY_128}#student"),
    # the U-Nets with the student's training time (7200 s); the program's size and latency do not
    # depend on how long its weights were trained
    ("U-Net, same GFLOP as the student",
     f"{REAL_LESIONS_128}#U-Net, same GFLOP as the student (Dice+BCE), 7200 s@photo", f"{PTE_LATENCY_128}#unet"),
    ("U-Net, 0.12 M", f"{REAL_LESIONS_128}#U-Net, own size (Dice+BCE), 7200 s@photo", None),
]

# Model cards: the rows of each card's metrics table (label, quality source).
CARD_METRICS: dict[str, list[tuple[str, str]]] = {
    "tiny-teacher-128-isic2017": [("ISIC 2017 test, 600 images, at photo size", TEACHER_128)],
    "tiny-student-128-isic2017": [
        ("ISIC 2017 test, 600 images, at photo size", STUDENT_128),
        ("the same, int8 `.pte`", STUDENT_128_PTE),
    ],
    "tiny-teacher-isic2017": [("ISIC 2017 test, 600 images", f"{REAL_LESIONS}#teacher")],
    "tiny-student-isic2017": [
        ("ISIC 2017 test, 600 images", f"{REAL_LESIONS}#student (EFKD)"),
        ("the same, int8 `.pte`", f"{REAL_LESIONS}#student tiny-student-k1n3-int8.pte"),
    ],
    "tiny-teacher-synthetic": [("synthetic test, 500 images", "docs/main-job/metrics.json#teacher")],
    "tiny-student-synthetic": [
        ("synthetic test, 32 images (eager)", f"{RUNTIMES}#tiny-student/eager"),
        ("the same, int8 `.pte`", f"{RUNTIMES}#tiny-student/pte-int8"),
    ],
}

MARKDOWN = ["README.md", "docs"]  # files and folders whose tables are generated

METRICS = ("dsc", "iou", "se", "sp", "acc", "hd95", "bf")
MARKER = re.compile(r"(<!-- table:(?P<name>[\w:.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


# ---- reading results --------------------------------------------------------------------------
def _load(path: str) -> dict:
    return json.loads((REPO / path).read_text())


def source(spec: str) -> dict:
    """The JSON object that "FILE#KEY" names (see the comment on HEADLINE); "FILE#KEY@photo" is a
    bench/isic2017.py row scored at each photo's own size (its "photo_metrics")."""
    if spec.endswith("@photo"):
        row = source(spec.removesuffix("@photo"))
        return {**row, "metrics": row["photo_metrics"]}
    path, _, key = spec.partition("#")
    data = _load(path)
    if key in data.get("rows", {}):
        return data["rows"][key]
    if key in data:
        return data[key]
    model, _, runtime = key.partition("/")
    for entry in data.get("results", []):
        if entry.get("role") == key or (entry.get("model") == model and entry.get("runtime") == runtime):
            return entry
    raise KeyError(f"{spec}: no such row")


def metric(row: dict, name: str) -> float | None:
    """A metric's mean from either result format (bench/isic2017.py's or a run's metrics.json)."""
    if "metrics" in row:
        m = row["metrics"].get(name)
        return None if m is None else m["mean"]
    return row.get(name)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _params(n) -> str:
    return "-" if not n else f"{n / 1e6:.2f} M"


def _table(head: list[str], align: str, rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---- tables -----------------------------------------------------------------------------------
def presets_table() -> str:
    """Every preset in edgeseg.models: parameters and GFLOP per call counted on the meta device."""
    import torch

    from edgeseg.models import PRESETS, build, count_params, flops_per_call

    rows = []
    for name, p in PRESETS.items():
        with torch.device("meta"):
            params = count_params(build(name))
        flops, _ = flops_per_call(name)
        rows.append([f"`{name}`", p.role, f"{params / 1e6:.2f}", f"{flops / 1e9:.2f}",
                     f"{p.image_size}", f"{p.stages}", p.blocks, p.prediction_type, p.teacher or "-"])
    head = ["preset", "role", "params (M)", "GFLOP / call", "image px", "stages", "blocks", "prediction", "teacher"]
    return _table(head, "llrrrrlll", rows)


def headline_table() -> str:
    """Real lesions: quality on the ISIC 2017 test split, cost, and the int8 program where measured."""
    rows = []
    for label, quality, program in HEADLINE:
        q = source(quality)
        cost = q.get("cost", {})
        prog = source(program) if program else {}
        size = f"{prog['file_mb'] * 1000:.0f}" if prog else "-"
        ms = f"{prog['latency_ms']['median']:.1f}" if prog else "-"
        rows.append([label, _params(cost.get("params")), _num(cost.get("gflop"), ".2f"), _pct(metric(q, "dsc")),
                     _pct(metric(q, "iou")), _num(metric(q, "hd95"), ".2f"), _pct(metric(q, "bf")), size, ms])
    head = ["model", "params", "GFLOP / image", "DSC", "IoU", "HD95 px", "boundary F", "int8 program KB",
            "int8 ms / image"]
    return _table(head, "lrrrrrrrr", rows)


def real_lesions_table(path: str = REAL_LESIONS, key: str = "metrics") -> str:
    """Every row of an ISIC 2017 test evaluation (bench/isic2017.py) with all seven metrics (`key`:
    at the models' input size, or "photo_metrics" at each photo's own size) and its eager cost."""
    rows = []
    for label, q in _load(path)["rows"].items():
        if key not in q:
            continue
        q = {**q, "metrics": q[key]}
        cost = q.get("cost", {})
        rows.append([label, _params(cost.get("params")), q.get("sampler", "-"), _num(cost.get("gflop"), ".2f"),
                     _num(cost.get("ms"), ".1f"), *[_pct(metric(q, m)) if m != "hd95" else
                                                    _num(metric(q, m), ".2f") for m in METRICS]])
    head = ["model", "params", "sampler", "GFLOP / image", "ms / image", "DSC", "IoU", "SE", "SP", "ACC",
            "HD95 px", "BF"]
    return _table(head, "lrlrrrrrrrrr", rows)


def real_lesions_uncertainty_table(path: str = REAL_LESIONS) -> str:
    """The margin map as an error detector, per model of the ISIC 2017 evaluation."""
    rows = [[label, f"{u['auroc']:.3f}", f"{u['corr_1_minus_dice']:.2f}", f"{u['ece']:.3f}"]
            for label, q in _load(path)["rows"].items() if (u := q.get("uncertainty"))]
    return _table(["model", "pixel AUROC vs errors", "r with 1 - Dice", "ECE"], "lrrr", rows)


def real_lesions_paired_table(path: str = REAL_LESIONS, key: str = "paired") -> str:
    """Paired per-image differences of the ISIC 2017 evaluation, in points, with 95% intervals."""
    def cell(d: dict) -> str:
        lo, hi = d["ci95"]
        return f"{100 * d['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"

    rows = [[pair, cell(p["dsc"]), f"{p['dsc']['wins']} / {p['dsc']['losses']}", cell(p["bf"])]
            for pair, p in _load(path)[key].items()]
    return _table(["A - B", "DSC [95% CI]", "images won / lost", "BF [95% CI]"], "lrrr", rows)


def real_lesions_by_size_table(path: str = REAL_LESIONS_128) -> str:
    """Photo-size Dice of each row by the lesion's share of the photo (bench/isic2017.py's by_lesion_size)."""
    sizes = _load(path)["by_lesion_size"]
    bins = list(sizes["images"])
    rows = [[row, *(_pct(d[b]) for b in bins)] for row, d in sizes["dsc"].items()]
    return _table(["model", *(f"{b}, {sizes['images'][b]} images" for b in bins)], "l" + "r" * len(bins), rows)


def runtimes_table() -> str:
    """bench/runtimes.py: one model, K = 1, N = 3, the same images, in every runtime."""
    rows = []
    for r in _load(RUNTIMES)["results"]:
        lat = r["latency_ms"]
        trained = "" if r["trained"] else " (untrained)"
        share = f"{100 * r['ceiling_share']:.0f}% ({r['precision']})"
        rows.append([f"{r['model']} {r['image_size']} px{trained}", r["label"],
                     f"{lat['median']:.1f} [{lat['iqr']:.1f}]", f"{r['program_peak_mb']:.1f}", f"{r['file_mb']:.2f}",
                     f"{r['gflops']:.1f}", share, _num(r["dice"], ".3f"), _num(r["parity"], ".3f")])
    head = ["model", "runtime", "latency ms [IQR]", "program peak MB", "file MB", "GFLOP/s", "share of ceiling",
            "Dice", "parity"]
    return _table(head, "llrrrrrrr", rows)


def card_table(name: str) -> str:
    """A model card's metrics: one row per measurement named in CARD_METRICS."""
    rows = []
    for label, spec in CARD_METRICS[name]:
        q = source(spec)
        sampler = q.get("sampler") or q.get("protocol") or f"DDIM {q.get('steps')} steps x {q.get('ensemble')}"
        if "dice" in q:  # bench/runtimes.py records Dice only
            rows.append([label, sampler, _pct(q["dice"]), "-", "-", "-"])
            continue
        rows.append([label, sampler, _pct(metric(q, "dsc")), _pct(metric(q, "iou")),
                     _num(metric(q, "hd95"), ".2f"), _pct(metric(q, "bf"))])
    return _table(["measured on", "sampler", "DSC", "IoU", "HD95 px", "boundary F"], "llrrrr", rows)


#: validation runs (bench/isic2017.py --split val) behind the default model and the mask cleanup
VALIDATION = {"64 px": "bench/results/isic2017/val/results.json",
              "128 px": "bench/results/isic2017-128/val/results.json"}


def validation_choice_table() -> str:
    """Validation Dice of each real-lesion pair at input size and at photo size, with and without the
    mask cleanup: the rows behind DEFAULT_MODEL and MASK_CLEANUP."""
    rows = []
    for size, path in VALIDATION.items():
        doc = _load(path)
        for label, q in doc["rows"].items():
            if "photo_metrics" not in q:
                continue
            name = doc["teacher" if label == "teacher" else "student"]
            raw, photo = q["photo_metrics_by_cleanup"]["none"], q["photo_metrics_by_cleanup"]["largest-filled"]
            rows.append([f"{label.split()[0]} {size} (`{name}`)", _pct(q["metrics"]["dsc"]["mean"]), _pct(raw["dsc"]["mean"]),
                         _pct(photo["dsc"]["mean"]), _num(raw["hd95"]["mean"], ".2f"), _num(photo["hd95"]["mean"], ".2f")])
    head = ["model", "DSC at input size", "DSC at photo size", "DSC, largest-filled", "HD95 px", "HD95, largest-filled"]
    return _table(head, "lrrrrr", rows)


def bf16_table() -> str:
    """bench/bf16.py: training steps per second, fp32 against bf16 autocast, per preset and threads."""
    import statistics

    rows = []
    for r in _load("bench/results/bf16/bf16.json")["rows"]:
        sp = r["speedup"]
        rows.append([f"`{r['preset']}`", str(r["threads"]), f"{r['fp32_steps_per_s']:.2f}", f"{r['bf16_steps_per_s']:.2f}",
                     f"{statistics.median(sp):.2f}x [{min(sp):.2f}, {max(sp):.2f}]"])
    return _table(["preset", "threads", "fp32 steps/s", "bf16 steps/s", "speed-up [range]"], "lrrrr", rows)


def bf16_quality_table() -> str:
    """bench/bf16_quality.py: validation Dice at equal steps, fp32 against bf16 autocast, per seed."""
    doc = _load("bench/results/bf16/quality.json")
    by = {(r["seed"], r["bf16"]): r for r in doc["runs"]}
    rows = []
    for seed in doc["seeds"]:
        f, b = by[(seed, False)], by[(seed, True)]
        rows.append([str(seed), _pct(f["val_dsc_last"]), _pct(b["val_dsc_last"]),
                     f"{100 * (b['val_dsc_last'] - f['val_dsc_last']):+.2f}", f"{f['train_seconds']:.0f}",
                     f"{b['train_seconds']:.0f}"])
    head = ["seed", "fp32 DSC", "bf16 DSC", "bf16 - fp32", "fp32 s", "bf16 s"]
    return _table(head, "rrrrrr", rows)


TABLES = {
    "bf16": bf16_table,
    "bf16-quality": bf16_quality_table,
    "validation-choice": validation_choice_table,
    "presets": presets_table,
    "headline": headline_table,
    "real-lesions": real_lesions_table,
    "real-lesions-uncertainty": real_lesions_uncertainty_table,
    "real-lesions-paired": real_lesions_paired_table,
    "runtimes": runtimes_table,
    "real-lesions-128": functools.partial(real_lesions_table, REAL_LESIONS_128, "photo_metrics"),
    "real-lesions-128-paired": functools.partial(real_lesions_paired_table, REAL_LESIONS_128, "paired_photo_size"),
    "real-lesions-128-uncertainty": functools.partial(real_lesions_uncertainty_table, REAL_LESIONS_128),
    "real-lesions-128-by-size": real_lesions_by_size_table,
}


@functools.cache  # the presets table counts FLOPs: render each table once per process
def render(name: str) -> str:
    if name.startswith("card:"):
        return card_table(name.removeprefix("card:"))
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}")
    return TABLES[name]()


# ---- files ------------------------------------------------------------------------------------
def markdown_files() -> list[Path]:
    out = []
    for entry in MARKDOWN:
        p = REPO / entry
        out += sorted(p.rglob("*.md")) if p.is_dir() else [p]
    return out


def regenerate(text: str, cache: dict[str, str]) -> str:
    """The text with every marked table replaced by what its generator writes now."""
    def fill(m: re.Match) -> str:
        name = m["name"]
        if name not in cache:
            cache[name] = render(name)
        return m.group(1) + cache[name] + m.group(4)

    return MARKER.sub(fill, text)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def drifted(write: bool) -> list[Path]:
    """Files whose tables differ from the generators' output (rewritten when `write`)."""
    cache: dict[str, str] = {}
    out = []
    for path in markdown_files():
        text = path.read_text()
        new = regenerate(text, cache)
        if new != text:
            out.append(path)
            if write:
                _write_atomic(path, new)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    args = ap.parse_args(argv)
    files = drifted(write=not args.check)
    for path in files:
        verb = "out of date" if args.check else "rewrote"
        print(f"{verb}: {path.relative_to(REPO)}", file=sys.stderr if args.check else sys.stdout)
    if args.check and files:
        print("run: python docs/tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
