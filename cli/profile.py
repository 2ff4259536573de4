"""`edgeseg profile MODEL.pte`: per-operator / per-delegate time of an exported program.

Registered in cli/main.py as ``app.command("profile")(profile_cmd)``; the work is in
:mod:`edgeseg.mobile.profile` (ETDump + ETRecord through ExecuTorch's Inspector).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edgeseg.cli.common import user_errors


@user_errors
def profile_cmd(
    model: Path = typer.Argument(..., help="an exported .pte (with its .pte.json sidecar and .pte.etrecord)"),
    runs: int = typer.Option(10, "--runs", min=1, max=10000, help="timed runs (after the warm-up)"),
    warmup: int = typer.Option(1, "--warmup", min=0, max=1000, help="runs before the timed ones (dropped)"),
    top: int = typer.Option(10, "--top", min=1, max=1000, help="operators in the top table"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=256,
                                          help="ExecuTorch threads (default: the runtime's own choice)"),
    out_dir: Optional[str] = typer.Option(None, "--out-dir", help="where <model>.profile.json/.md go "
                                           "(default: next to the model)"),
):
    """Run MODEL.pte with ETDump, join it with its ETRecord through ExecuTorch's Inspector and print
    where the time goes: per delegate, per operator type (summed over instances) and by kind, with
    each one's share of Method::execute. Writes <model>.profile.json and <model>.profile.md.
    """
    from rich.console import Console
    from rich.table import Table

    from edgeseg.mobile.profile import profile_pte, write_report

    from edgeseg.cli.common import check_writable_folder, given_path

    out_dir = given_path(out_dir, "--out-dir")
    check_writable_folder(out_dir if out_dir is not None else model.parent, "--out-dir")  # before minutes of runs
    console = Console(stderr=True)
    with console.status(f"profiling {model.name} ({warmup} + {runs} runs) ...", spinner="dots"):
        r = profile_pte(model, runs=runs, warmup=warmup, top=top, threads=threads)
    js, md = write_report(r, out_dir)

    p, m = r["program"], r["method_ms"]
    out = Console()
    out.print(f"{model}: {p['preset']}, {p['image_size'][0]} px, K={p['steps']} N={p['ensemble']}, {p['quantize']}; "
              f"Method::execute median {m['median']:.2f} ms [IQR {m['p75'] - m['p25']:.2f}] over {r['runs']} runs")
    for title, rows, cols in (
        ("delegates", r["delegates"], ("backend", "calls", "median_ms", "share", "overhead_ms")),
        ("by kind", r["categories"], ("category", "median_ms", "share")),
        (f"top {len(r['top'])} operators", r["top"], ("operator", "runs_in", "instances", "median_ms", "share")),
    ):
        table = Table(title=title)
        for c in cols:
            table.add_column(c.replace("_", " "), justify="left" if c in ("backend", "category", "operator",
                                                                           "runs_in") else "right")
        for row in rows:
            table.add_row(*(_cell(c, row[c]) for c in cols))
        out.print(table)
    out.print(f"wrote {js} and {md}")


def _cell(col: str, v) -> str:
    if col == "share":
        return f"{100 * v:.1f}%" if v is not None else "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)
