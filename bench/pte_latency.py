"""Latency of the shipped student's int8 .pte against the baseline U-Net's int8 .pte (issue 15:
the student at most 1.5x the U-Net's latency at equal GFLOP per image).

    # two programs already exported (each with its <file>.json sidecar)
    python bench/pte_latency.py --student student-int8.pte --unet unet-int8.pte --out bench/results/pte-latency
    # or export both here, through the same tooling (edgeseg.mobile)
    python bench/pte_latency.py --student-ckpt runs/x/student.safetensors \\
        --unet-ckpt unet.pt --unet-channels 48,96,144,192,288 --out bench/results/pte-latency
    # an architecture before training it: untrained student preset vs untrained U-Net
    python bench/pte_latency.py --student-preset tiny-student-mobile --unet 48,96,144,192,288 --out DIR
    # smoke run (an untrained U-Net of the given channels, 2 processes x 3 runs)
    python bench/pte_latency.py --student s.pte --unet 8,16,24,32,48 --quick --out /tmp/pl

The student: ``--student`` an ExecuTorch program written by ``edgeseg export`` /
:func:`edgeseg.mobile.executorch_export.export_executorch`, or ``--student-ckpt`` an edgeseg checkpoint
exported here with ``export_executorch(ckpt, quantize="int8")`` at the defaults table's sampler
setting (K, N) for its prediction type (parity-gated as usual), or ``--student-preset`` an
untrained network of a preset (latency does not depend on the weights; parity not enforced). The U-Net: ``--unet`` a .pte
written by :func:`edgeseg.mobile.unet_export.export_unet_pte`, a checkpoint, or a channel list (an
untrained SmallUNet: its latency is what its weights would give; the gate's Dice is recorded,
not enforced); ``--unet-ckpt`` a SmallUNet state_dict (``.pt`` via torch.save, or
``.safetensors``), channels from ``--unet-channels`` or read from its weights. A U-Net is
exported int8 at the student's image size, calibrated and gated on ``--unet-dataset`` (default
synthetic; pass the U-Net's training set and ``--data-dir`` for a trained one).

Protocol (this VM's speed is bimodal from one process to the next): each program runs in
``--process-repeats`` (>= 5; --quick 2) fresh processes, interleaved (student, U-Net, student,
...), each timing batch-1 calls ``--runs`` times after ``--warmup`` in ExecuTorch's Python
runtime with ``--threads`` threads and reporting its median; a program's latency per image is
the median of its process medians with their IQR. The ratio student / U-Net is that of the
medians, and also the median (IQR) of the per-round ratios (each round: one student and one
U-Net process, back to back).

GFLOP per image (torch.utils.flop_counter.FlopCounterMode, 2 FLOPs per multiply-add, convs and
matmuls; on the meta device): the student's is K x N x the network's FLOPs per call (its
sidecar's preset config), the U-Net's one forward pass. As the two rarely match exactly, the
ratio per GFLOP ((student ms / GFLOP) / (U-Net ms / GFLOP)) is reported beside the plain ratio.

Writes ``<out>/pte-latency.json`` and ``<out>/pte-latency.md`` (and the exports, when made here).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402

RESULT_TAG = "PTE-LATENCY-RESULT "
TARGET_RATIO = 1.5
ROLES = ("student", "unet")


# ========================================================================================
# child process: time one program
# ========================================================================================
def measure(spec: dict) -> dict:
    """Load the program, time `runs` calls after `warmup` (random inputs of the sidecar's shapes)."""
    import torch

    from executorch.runtime import Runtime

    common.set_threads(spec["threads"])
    gen = torch.Generator().manual_seed(0)
    inputs = tuple((torch.rand if name == "image" else torch.randn)(tuple(shape), generator=gen)
                   for name, shape in spec["inputs"])
    method = Runtime.get().load_program(Path(spec["file"])).load_method("forward")
    times = common.timed_ms(lambda: method.execute(inputs), spec["warmup"], spec["runs"])
    return {"runs_ms": [round(t, 4) for t in times], "median_ms": statistics.median(times)}


def run_child(spec: dict, timeout: float) -> dict:
    return common.run_child(Path(__file__).resolve(), "--child", spec, RESULT_TAG, timeout)


# ========================================================================================
# the programs: given, or exported here
# ========================================================================================
def _channels(text: str) -> tuple[int, ...]:
    try:
        ch = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise SystemExit(f"error: channels must be comma-separated integers, got {text!r}") from None
    if len(ch) < 2 or min(ch) < 1:
        raise SystemExit(f"error: channels need at least two positive widths, got {text!r}")
    return ch


def read_program(path: str | Path) -> dict:
    """A .pte and its sidecar (its sha256 checked)."""
    from edgeseg.mobile import sidecar as sc

    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such .pte file")
    meta = sc.read_sidecar(path)
    if meta.get("status", "ok") != "ok":
        raise SystemExit(f"error: {path}: this export failed its parity check")
    if sc.file_digest(path)[0] != meta.get("sha256"):
        raise SystemExit(f"error: {path}: sha256 does not match its sidecar (file changed after export)")
    return {"path": str(path), "meta": meta}


def load_unet_weights(ckpt: str | Path, channels: tuple[int, ...] | None):
    """SmallUNet from a state_dict (.pt / .safetensors); channels from the weights when not given."""
    import torch

    from edgeseg.baselines import SmallUNet

    ckpt = Path(ckpt)
    if ckpt.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(ckpt))
    else:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if channels is None:
        channels = tuple(int(state[f"enc.{i}.0.weight"].shape[0]) for i in range(len(state))
                         if f"enc.{i}.0.weight" in state)
    model = SmallUNet(channels=tuple(channels))
    model.load_state_dict(state)
    return model.eval(), tuple(channels)


def export_student(ckpt: str | None, out_dir: Path, preset: str | None = None) -> dict:
    """Export a checkpoint, or an untrained network of `preset` (latency only: its parity is
    recorded, not enforced), int8 at the defaults table's K and N."""
    import torch

    from edgeseg.mobile.executorch_export import export_executorch
    from edgeseg.models import build

    out = out_dir / "student-int8.pte"
    print(f"exporting the student {ckpt or f'untrained {preset}'} (int8, default K and N) -> {out}", flush=True)
    source, kw = ckpt, {}
    if preset is not None:
        torch.manual_seed(0)
        source, kw = build(preset).eval(), {"parity_threshold": 0.0, "n_parity_images": 4}
    meta = export_executorch(source, out, quantize="int8", progress=lambda m: print(f"    export: {m}", flush=True), **kw)
    return {"path": str(out), "meta": meta, "trained": preset is None}


def export_unet(args, size: int, out_dir: Path) -> dict:
    import torch

    from edgeseg.baselines import SmallUNet
    from edgeseg.mobile.unet_export import export_unet_pte

    if args.unet_ckpt:
        model, channels = load_unet_weights(args.unet_ckpt, args.unet_channels)
        trained = True
    else:
        torch.manual_seed(0)
        channels = args.unet_channels or (8, 16, 24, 32, 48)
        model, trained = SmallUNet(channels=tuple(channels)), False
    out = out_dir / "unet-int8.pte"
    print(f"exporting the U-Net {list(channels)} ({'trained' if trained else 'untrained'}) at {size} px, int8 -> {out}",
          flush=True)
    kw = {} if trained else {"parity_threshold": 0.0, "n_parity_images": 4}
    if args.quick:
        kw.update(n_parity_images=4, n_calibration_images=4)
    meta = export_unet_pte(model, out, "int8", size=size, dataset=args.unet_dataset, data_dir=args.data_dir,
                           progress=lambda m: print(f"    export: {m}", flush=True), **kw)
    meta["trained"] = trained
    return {"path": str(out), "meta": meta}


# ========================================================================================
# cost: parameters and GFLOP per image
# ========================================================================================
def _count(model, *inputs) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*inputs)
    return fc.get_total_flops()


def student_cost(meta: dict) -> dict:
    import torch

    from edgeseg.models import Preset, build, count_params

    s = int(meta["image_size"][0])
    with torch.device("meta"):
        model = build(Preset.from_dict(meta["preset_config"])).eval()
        x, g, t = torch.randn(1, 1, s, s), torch.randn(1, 3, s, s), torch.tensor([10])
    per_call = _count(model, x, g, t) / 1e9
    calls = int(meta["steps"]) * int(meta["ensemble"])
    return {"params": count_params(model), "gflop_per_call": round(per_call, 4), "calls_per_image": calls,
            "gflop_per_image": round(per_call * calls, 4)}


def unet_cost(meta: dict) -> dict:
    import torch

    from edgeseg.baselines import SmallUNet, unet_gflop
    from edgeseg.models import count_params

    channels = meta.get("channels")
    if not channels:
        raise SystemExit("error: the U-Net program's sidecar does not record its channels")
    with torch.device("meta"):
        params = count_params(SmallUNet(channels=tuple(channels)))
    g = unet_gflop(channels, int(meta["image_size"][0]))
    return {"params": params, "gflop_per_call": round(g, 4), "calls_per_image": 1, "gflop_per_image": round(g, 4)}


# ========================================================================================
# the measurement and the report
# ========================================================================================
def measure_all(args, programs: dict) -> dict:
    """{role: [per-process results]}, the processes interleaved round-robin."""
    res = {role: [] for role in ROLES}
    for r in range(args.process_repeats):
        for role in ROLES:
            meta = programs[role]["meta"]
            spec = {"file": programs[role]["path"], "threads": args.threads, "runs": args.runs,
                    "warmup": args.warmup, "inputs": [[io["name"], io["shape"]] for io in meta["inputs"]]}
            got = run_child(spec, args.timeout)
            got["per_image_ms"] = got["median_ms"] / int(meta.get("batch", 1))
            res[role].append(got)
            print(f"  [{r + 1}/{args.process_repeats}] {role:<8} {got['per_image_ms']:9.2f} ms / image", flush=True)
    return res


def make_row(role: str, program: dict, runs: list[dict]) -> dict:
    meta = program["meta"]
    cost = student_cost(meta) if role == "student" else unet_cost(meta)
    lat = common.latency_stats([r["per_image_ms"] for r in runs])
    row = {"role": role, "file": program["path"], "file_mb": round(meta["size_bytes"] / 1e6, 4),
           "sha256": meta["sha256"], "quantize": meta.get("quantize"), "image_size": meta["image_size"],
           "batch": meta.get("batch", 1), **cost, "latency_ms": lat,
           "ms_per_gflop": round(lat["median"] / cost["gflop_per_image"], 4) if cost["gflop_per_image"] else None,
           "process_runs": [r["runs_ms"] for r in runs],
           "parity_dsc_vs_eager": (meta.get("parity") or {}).get("mask_dsc_vs_eager")}
    if role == "student":
        row.update(preset=meta.get("preset"), steps=meta.get("steps"), ensemble=meta.get("ensemble"),
                   checkpoint=meta.get("checkpoint"), trained=program.get("trained", True))
    else:
        row.update(channels=meta.get("channels"), trained=meta.get("trained"))
    return row


def compare(rows: dict, res: dict) -> dict:
    s, u = rows["student"], rows["unet"]
    ratio = s["latency_ms"]["median"] / u["latency_ms"]["median"]
    gflop_ratio = s["gflop_per_image"] / u["gflop_per_image"] if u["gflop_per_image"] else None
    rounds = [a["per_image_ms"] / b["per_image_ms"] for a, b in zip(res["student"], res["unet"])]
    per_round = common.latency_stats(rounds)
    per_round.pop("runs")
    out = {
        "ratio": round(ratio, 4),
        "ratio_per_round": {**per_round, "runs": [round(x, 4) for x in rounds]},
        "gflop_ratio": round(gflop_ratio, 4) if gflop_ratio else None,
        "ratio_per_gflop": round(ratio / gflop_ratio, 4) if gflop_ratio else None,
        "target": f"student latency <= {TARGET_RATIO} x U-Net latency at equal GFLOP per image (int8 .pte both)",
    }
    equal = gflop_ratio is not None and abs(gflop_ratio - 1) <= 0.1
    both_int8 = s["quantize"] == u["quantize"] == "int8"
    basis = out["ratio"] if equal else out["ratio_per_gflop"]
    out["target_met"] = bool(basis is not None and basis <= TARGET_RATIO) if both_int8 else None
    out["basis"] = ("plain ratio (GFLOP within 10%)" if equal else "ratio per GFLOP (GFLOP differ by more than 10%)")
    if not both_int8:
        out["basis"] += f"; not judged: quantize student={s['quantize']}, U-Net={u['quantize']}"
    return out


def markdown(doc: dict) -> str:
    c = doc["comparison"]
    lines = ["# Student vs U-Net: int8 .pte latency (ExecuTorch, XNNPACK)", "",
             f"Measured on: {common.machine_line(doc['machine'])}.",
             f"Generated {doc['generated']}" + (" (quick smoke run: not meaningful numbers)" if doc["quick"] else "")
             + ".", "",
             "| program | precision | image | GFLOP / image | params (M) | file MB | latency ms / image median [IQR] "
             "| ms / GFLOP | parity Dice |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["results"]:
        what = (f"student {r['preset']} K{r['steps']} N{r['ensemble']}" if r["role"] == "student"
                else f"U-Net {r['channels']}") + ("" if r.get("trained", True) is not False else " (untrained)")
        lat = r["latency_ms"]
        par = f"{r['parity_dsc_vs_eager']:.3f}" if r["parity_dsc_vs_eager"] is not None else "-"
        lines.append(f"| {what} | {r['quantize']} | {r['image_size'][0]} px | {r['gflop_per_image']:.3f} | "
                     f"{r['params'] / 1e6:.3f} | {r['file_mb']:.3f} | {lat['median']:.2f} [{lat['iqr']:.2f}] | "
                     f"{common._fmt(r['ms_per_gflop'], '.2f')} | {par} |")
    pr = c["ratio_per_round"]
    met = {True: "met", False: "NOT met", None: "not judged"}[c["target_met"]]
    lines += ["", f"Student / U-Net latency: **{c['ratio']:.2f}x** (median of the per-round ratios "
                  f"{pr['median']:.2f}, IQR {pr['iqr']:.2f}); GFLOP ratio {common._fmt(c['gflop_ratio'], '.2f')}; "
                  f"ratio per GFLOP {common._fmt(c['ratio_per_gflop'], '.2f')}.", "",
              f"Target ({c['target']}): {met}, on the {c['basis']}.", "", "Notes:", ""]
    lines += [f"- {n}" for n in doc["notes"]] + [""]
    return "\n".join(lines)


NOTES = [
    "Latency: batch-1 calls of the whole program in ExecuTorch's Python runtime (executorch.runtime), random "
    "inputs of the program's shapes; per process the median of the timed runs, per program the median of the "
    "process medians and their IQR; processes interleaved student, U-Net, student, ...",
    "The student program is the whole K-step, N-member sampler (the ensemble is one batch inside the program); "
    "its GFLOP per image is K x N x the network's FLOPs per call. The U-Net is one forward pass (logits).",
    "FLOPs: torch.utils.flop_counter.FlopCounterMode (2 per multiply-add; convs and matmuls only, so the "
    "student's GroupNorm, attention softmax and DDIM arithmetic and the U-Net's BatchNorm/ReLU are not counted).",
    "Both int8 programs come from the same tooling: torch.export, mobile/quantize.py's quantize_int8 (XNNPACK "
    "quantizer restricted to convs/linears, per-channel weights, per-tensor activations), lower_executorch with "
    "the same int8 partitioner, to_program.",
]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    st = ap.add_mutually_exclusive_group(required=True)
    st.add_argument("--student", type=Path, help="the student's .pte (with its sidecar)")
    st.add_argument("--student-ckpt", help="an edgeseg checkpoint or run folder: exported here, int8, default K, N")
    st.add_argument("--student-preset", help="an untrained network of this preset, exported here (latency only)")
    un = ap.add_mutually_exclusive_group(required=True)
    un.add_argument("--unet", help="the U-Net: a .pte from export_unet_pte, a state_dict, or channels "
                                   "(e.g. 8,16,24,32,48: untrained)")
    un.add_argument("--unet-ckpt", type=Path, help="a SmallUNet state_dict (.pt or .safetensors): exported here, int8")
    ap.add_argument("--unet-channels", type=_channels, default=None,
                    help="SmallUNet channels, e.g. 48,96,144,192,288 (default: read from --unet-ckpt's weights)")
    ap.add_argument("--unet-dataset", default="synthetic", help="calibration and parity images for the U-Net export")
    ap.add_argument("--data-dir", default=None, help="the U-Net dataset's folder (real datasets)")
    ap.add_argument("--process-repeats", type=int, default=None, help="fresh processes per program (default 5)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per process (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up runs per process")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per child process")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pte-latency")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 processes x 3 runs, 1 warm-up")
    ap.add_argument("--child", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    if argv is None:
        argv = sys.argv[1:]
    if "--child" in argv:  # the child needs none of the parent's options
        args = argparse.Namespace(child=argv[argv.index("--child") + 1])
        return args
    args = ap.parse_args(argv)
    args.child = None
    q = args.quick
    args.process_repeats = args.process_repeats or (2 if q else 5)
    args.runs = args.runs or (3 if q else 20)
    if q:
        args.warmup = min(args.warmup, 1)
    if not q and args.process_repeats < 5:
        ap.error("--process-repeats must be at least 5 (this VM is bimodal between processes); --quick for a smoke run")
    if args.threads < 1 or args.runs < 1 or args.warmup < 0:
        ap.error("--threads and --runs must be >= 1, --warmup >= 0")
    if args.unet is not None:  # a .pte, a checkpoint, or channels
        p = Path(args.unet)
        if p.suffix == ".pte":
            args.unet_pte = p
        elif p.is_file():
            args.unet_pte, args.unet_ckpt = None, p
        else:
            args.unet_pte, args.unet_channels = None, args.unet_channels or _channels(args.unet)
    else:
        args.unet_pte = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(RESULT_TAG + json.dumps(measure(json.loads(args.child))), flush=True)
        return 0
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    student = (read_program(args.student) if args.student
               else export_student(args.student_ckpt, args.out, preset=args.student_preset))
    if student["meta"].get("target") != "executorch":
        raise SystemExit(f"error: {student['path']}: not a student ExecuTorch program "
                         f"(sidecar target {student['meta'].get('target')!r})")
    size = int(student["meta"]["image_size"][0])
    unet = read_program(args.unet_pte) if args.unet_pte else export_unet(args, size, args.out)
    from edgeseg.mobile.unet_export import UNET_TARGET

    if unet["meta"].get("target") != UNET_TARGET:
        raise SystemExit(f"error: {unet['path']}: not a U-Net program from export_unet_pte")
    notes = list(NOTES)
    if list(unet["meta"]["image_size"]) != list(student["meta"]["image_size"]):
        notes.append(f"image sizes differ: student {student['meta']['image_size']}, U-Net {unet['meta']['image_size']}")
    programs = {"student": student, "unet": unet}
    res = measure_all(args, programs)
    rows = {role: make_row(role, programs[role], res[role]) for role in ROLES}
    settings = {k: getattr(args, k) for k in ("process_repeats", "runs", "warmup", "threads")}
    settings["wall_s"] = round(time.perf_counter() - t0, 1)
    doc = {"schema": "edgeseg-bench-pte-latency", "schema_version": 1, "generated": common.now_iso(),
           "command": common.recorded_command(), "quick": args.quick, "machine": common.machine_info(args.threads),
           "settings": settings, "results": [rows[r] for r in ROLES], "comparison": compare(rows, res),
           "notes": notes}
    common.write_json(args.out / "pte-latency.json", doc)
    md = markdown(doc)
    (args.out / "pte-latency.md").write_text(md)
    print(md)
    print(f"wrote {args.out}/pte-latency.json and pte-latency.md in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
