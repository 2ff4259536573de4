"""The `edgeseg` command. Sub-commands live in their own modules; heavy imports stay inside them."""
from __future__ import annotations

import sys

import typer

from edgeseg.errors import EdgesegError

app = typer.Typer(
    name="edgeseg",
    help="Distil a diffusion skin-lesion segmenter into a small student and put it on phones.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    from edgeseg.cli import data, export, train

    app.command("distill")(train.distill)
    app.command("train-teacher")(train.train_teacher)
    app.command("evaluate")(train.evaluate_cmd)
    app.command("segment")(train.segment)
    app.command("export")(export.export_cmd)
    app.add_typer(data.app, name="data")


_register()


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app(standalone_mode=True)
    except EdgesegError as e:  # raised outside typer's own handling
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
