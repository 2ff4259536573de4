"""File checks shared by every reader (checkpoints, settings, sidecars, images, masks)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from edgeseg.errors import EdgesegError

__all__ = ["check_regular_file"]


def check_regular_file(path: str | os.PathLike, what: str, error: type[EdgesegError] = EdgesegError,
                       label: str | None = None) -> None:
    """`error` unless `path` is a regular file (a named pipe or a device would block or never
    end); ``label`` names the file in the message (default: the path)."""
    label = label or str(Path(path))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{label}: {what} not found") from None
    except OSError as e:
        raise error(f"{label}: cannot open the {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{label}: the {what} is not a regular file")
