"""Shared CLI plumbing: the one error policy, settings files, option checks.

The error policy (README: "one line on stderr and exit 2 for a user error"), applied in one
place, :func:`report`, to every command (through :func:`user_errors`) and to the command line
itself (``edgeseg.cli.main.main``: unknown options, bad values):

* an :class:`~edgeseg.errors.EdgesegError` (the library's user errors, each naming the file
  and what is wrong), a usage error, or an ``OSError`` about a file (permission denied, disk
  full) is one ``error: ...`` line on stderr and exit code 2, no traceback;
* Ctrl-C is one line and exit code 130 (training: the last checkpoint is kept, where one exists);
* anything else is a bug in edgeseg and keeps its traceback.

Warnings raised while a command fails (OpenCV, ExecuTorch, deprecations) are dropped, so the
error line is the only output on stderr.
"""
from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import typer

from edgeseg.errors import EdgesegError, SettingsError

SEED_MAX = 2**63 - 1  # every --seed: torch and numpy generators take 0 .. 2**63 - 1 alike
INTERRUPTED = "interrupted"
INTERRUPTED_TRAINING = "interrupted: the last checkpoint is kept; continue with --resume"
INTERRUPTED_NO_CHECKPOINT = "interrupted before the first checkpoint: nothing to resume"


def training_interrupted() -> str:
    """The Ctrl-C line of a training command: a checkpoint is promised only where one exists
    (state/<role>/state.json in a run folder this process holds)."""
    import sys

    runlock = sys.modules.get("edgeseg.runlock")
    for run in runlock.claims() if runlock else []:
        if any((run / "state").glob("*/state.json")):
            return INTERRUPTED_TRAINING
    return INTERRUPTED_NO_CHECKPOINT


def one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def error_message(e: BaseException) -> str | None:
    """The user-facing line for `e`, or None when `e` is a bug (it keeps its traceback)."""
    if isinstance(e, EdgesegError):
        return one_line(str(e))
    if isinstance(e, OSError) and getattr(e, "filename", None) is not None:
        return one_line(f"{e.filename}: {e.strerror or e}")
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        return one_line(f"cannot write or read a file: {e.strerror or e}")
    from typer._click.exceptions import UsageError

    if isinstance(e, UsageError):
        cmd = e.ctx.command_path if e.ctx is not None else "edgeseg"
        return one_line(f"{e.format_message()} (see '{cmd} --help')")
    return None


def report(msg: str) -> None:
    typer.echo(f"error: {one_line(msg)}", err=True)


def user_errors(fn: Callable | None = None, *, interrupted: str | Callable[[], str] = INTERRUPTED,
                hold_warnings: bool = True) -> Callable:
    """Run a command under the error policy (see the module docstring).

    With `hold_warnings` the command's Python warnings are shown when it ends, and dropped if it
    fails with a user error; training commands (hours long) pass False and show them at once.
    `interrupted` is the Ctrl-C line, or a function that says it when Ctrl-C comes.
    Run folders the command claimed (edgeseg.runlock) are released when it ends, so a command
    that fails before writing anything leaves no folder behind."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            import sys

            runlock = sys.modules.get("edgeseg.runlock")
            held = runlock.claims() if runlock else []
            try:
                if not hold_warnings:
                    return fn(*args, **kwargs)
                with warnings.catch_warnings(record=True) as caught:
                    try:
                        return fn(*args, **kwargs)
                    finally:
                        failing = sys.exc_info()[0] is not None
                        if not failing:  # success: show the warnings as usual
                            for w in caught:
                                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            except KeyboardInterrupt:
                typer.echo(interrupted() if callable(interrupted) else interrupted, err=True)
                raise typer.Exit(130) from None
            except Exception as e:  # noqa: BLE001 - sorted by error_message; bugs are re-raised
                msg = error_message(e)
                if msg is None:
                    raise
                report(msg)
                raise typer.Exit(2) from None
            finally:
                runlock = sys.modules.get("edgeseg.runlock")
                if runlock:
                    runlock.release_claims(keep=held)

        return wrapper

    return deco(fn) if fn is not None else deco


def check_range(option: str, value, low=None, high=None) -> None:
    """SettingsError unless low <= value <= high (None: unbounded); for options checked before any work."""
    if value is None:
        return
    if (low is not None and value < low) or (high is not None and value > high):
        rule = (f"from {low} to {high}" if low is not None and high is not None
                else f">= {low}" if low is not None else f"<= {high}")
        raise SettingsError(f"{option} must be {rule}, got {value}")


def given_path(value: str | None, option: str) -> Path | None:
    """An output option as a Path; an empty one is refused (Path("") would be the current folder)."""
    if value is None:
        return None
    if not value.strip():
        raise SettingsError(f"{option} is empty; give a path")
    return Path(value)


def check_writable_folder(folder: Path, option: str) -> None:
    """SettingsError (before any work) unless files can be created in `folder`, or, when it does
    not exist yet, in its nearest existing parent; a probe file that never gets a name is made."""
    import tempfile

    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise SettingsError(f"{probe}: {option} needs a folder here, but this is a file")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise SettingsError(f"{probe}: cannot write into this folder for {option} ({e.strerror or e})") from None


def read_settings(path: Path | None) -> dict[str, Any]:
    """A flat TOML / YAML / JSON file of training settings (same names as the options)."""
    if path is None:
        return {}
    from edgeseg.checkpoint import check_regular_file

    check_regular_file(path, "settings file", SettingsError)
    if path.stat().st_size > 1 << 20:
        raise SettingsError(f"{path}: settings file is over 1 MB, not a settings file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: settings file is not UTF-8 text") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise SettingsError(f"{path}: settings must be .toml, .yaml/.yml or .json")
    except EdgesegError:
        raise
    except Exception as e:
        raise SettingsError(f"{path}: cannot parse settings ({one_line(str(e))})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: settings must be a table of name = value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """`--set name=value` pairs; values parsed as JSON when possible (numbers, true/false, lists)."""
    out: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise SettingsError(f"--set expects name=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip().replace("-", "_")] = v
    return out

