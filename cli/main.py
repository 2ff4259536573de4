"""The `edgeseg` command. Sub-commands live in their own modules; heavy imports stay inside them."""
from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="edgeseg",
    help="Distil a diffusion skin-lesion segmenter into a small student and put it on phones.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    from edgeseg.cli import data, evaluate, export, profile, segment, train

    app.command("distill")(train.distill)
    app.command("train-teacher")(train.train_teacher)
    app.command("evaluate")(evaluate.evaluate_cmd)
    app.command("segment")(segment.segment)
    app.command("export")(export.export_cmd)
    app.command("profile")(profile.profile_cmd)
    app.add_typer(data.app, name="data")


_register()


def main() -> None:
    """Entry point, under the one error policy of edgeseg.cli.common: a user error (including a
    bad option on the command line) is one line on stderr and exit code 2, never a traceback."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError

    from edgeseg.cli.common import INTERRUPTED, error_message, report

    try:
        rv = app(standalone_mode=False)
    except NoArgsIsHelpError as e:
        e.show()
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - sorted by error_message; bugs keep their traceback
        msg = error_message(e)
        if msg is None:
            if isinstance(e, ClickException):
                e.show()
                sys.exit(e.exit_code)
            raise
        report(msg)
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
