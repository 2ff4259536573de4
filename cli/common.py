"""Shared CLI plumbing: user errors as one line + exit 2, settings files, device setup."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import typer

from edgeseg.errors import EdgesegError


def user_errors(fn: Callable) -> Callable:
    """Run a command; an EdgesegError becomes `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgesegError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: the last checkpoint is kept; continue with --resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


def read_settings(path: Path | None) -> dict[str, Any]:
    """A flat TOML / YAML / JSON file of training settings (same names as the options)."""
    if path is None:
        return {}
    if not path.exists():
        raise EdgesegError(f"{path}: settings file not found")
    text = path.read_text()
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
            raise EdgesegError(f"{path}: settings must be .toml, .yaml/.yml or .json")
    except EdgesegError:
        raise
    except Exception as e:
        raise EdgesegError(f"{path}: cannot parse settings ({e})") from None
    if not isinstance(data, dict):
        raise EdgesegError(f"{path}: settings must be a table of name = value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """`--set name=value` pairs; values parsed as JSON when possible (numbers, true/false, lists)."""
    out: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise EdgesegError(f"--set expects name=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip().replace("-", "_")] = v
    return out

