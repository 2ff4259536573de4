"""Exclusive claim of a run folder: one process trains in a folder at a time.

Like git's ``index.lock``, the claim is a file created with ``O_CREAT | O_EXCL`` (so exactly one
of two simultaneous starts gets it): ``<run>/run.lock`` holds the owner's pid, host, process
start time and command line. A new run also creates its folder with a plain ``mkdir`` (which
fails if the folder exists), so two new runs with one name cannot both start.

A lock whose process is gone (killed with SIGKILL, a crashed machine) is stale: on the same
host it is detected (the pid is not running, or now belongs to a process started later) and
taken over with a warning on stderr; a lock from another host is reported and left alone.

The claim ends when the process exits (or when :func:`release_claims` is called, as the CLI
does when a command ends): the lock file is removed, and a folder this process created that
is still empty is removed too, so a run that failed before writing anything leaves nothing.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from edgeseg.errors import RunFolderError

__all__ = ["LOCK_NAME", "claim_run_dir", "release_claims", "claims"]

LOCK_NAME = "run.lock"

_lock = threading.Lock()
_claims: dict[Path, dict] = {}  # run folder -> {"created": [folders we made, deepest first]}


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _mine() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}


def _read(lock: Path) -> dict | None:
    try:
        d = json.loads(lock.read_text())
        return d if isinstance(d, dict) and isinstance(d.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _owner_state(info: dict | None) -> str:
    """'mine', 'alive', 'dead' or 'unknown' (another host, unreadable lock)."""
    if info is None:
        return "unknown"
    if info.get("host") != socket.gethostname():
        return "unknown"
    pid = info["pid"]
    if pid == os.getpid() and info.get("proc_start") == _proc_start(pid):
        return "mine"
    if not _alive(pid):
        return "dead"
    start = _proc_start(pid)
    if start is not None and info.get("proc_start") is not None and start != info["proc_start"]:
        return "dead"  # the pid was reused by a later process
    return "alive"


def _create(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(_mine()) + "\n")
    return True


def _describe(info: dict | None) -> str:
    if info is None:
        return "an unreadable lock"
    return f"process {info['pid']} on {info.get('host')} since {info.get('started', '?')}"


def _take_lock(run: Path) -> None:
    lock = run / LOCK_NAME
    for _ in range(5):
        if _create(lock):
            return
        info = _read(lock)
        state = _owner_state(info)
        if state == "mine":
            return
        if state == "alive":
            raise RunFolderError(f"{run}: run folder is in use by {_describe(info)} (lock file {lock}); wait for "
                                 "it to finish or choose another --run-name")
        if state == "unknown":
            raise RunFolderError(f"{lock}: run folder is locked by {_describe(info)}, which cannot be checked from "
                                 "here; if no run is using the folder, delete the lock file")
        # stale: move it aside atomically (only one of several racing processes succeeds), retry
        aside = lock.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.replace(lock, aside)
        except FileNotFoundError:
            continue
        if _owner_state(_read(aside)) != "dead":  # someone else's fresh lock was moved: put it back
            os.replace(aside, lock)
            continue
        aside.unlink(missing_ok=True)
        print(f"warning: {lock}: removed the stale lock of {_describe(info)}, which is no longer running",
              file=sys.stderr)
    raise RunFolderError(f"{lock}: could not claim the run folder (the lock keeps changing hands)")


def claim_run_dir(run: str | Path, resume: bool, unique: bool = False) -> Path:
    """Claim ``run`` for this process and return it (possibly renamed, see `unique`).

    A new run (``resume=False``) creates the folder and fails if it exists; with `unique` (an
    automatic name) ``-2``, ``-3``, ... are tried instead. ``resume=True`` needs the folder.
    Either way ``run/run.lock`` is taken, or RunFolderError names the process that holds it.
    Claiming a folder this process already holds is a no-op.
    """
    run = Path(run)
    with _lock:
        if resume and run in _claims:
            return run
        created: list[Path] = []
        if resume:
            if not run.is_dir():
                raise RunFolderError(f"--resume: run folder {run} does not exist")
        else:
            missing = [p for p in (run.parent, *run.parent.parents) if not p.exists()]
            try:
                run.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RunFolderError(f"{run.parent}: cannot create the runs folder ({e.strerror or e})") from None
            base, n = run, 1
            while True:
                try:
                    run.mkdir()
                    break
                except FileExistsError:
                    if not unique:
                        _remove_empty(missing)
                        raise RunFolderError(f"run folder {run} exists; pass --resume to continue it or --run-name "
                                             "for a new one") from None
                    n += 1
                    run = base.with_name(f"{base.name}-{n}")
                except OSError as e:
                    _remove_empty(missing)
                    raise RunFolderError(f"{run}: cannot create the run folder ({e.strerror or e})") from None
            created = [run, *missing]
        try:
            _take_lock(run)
        except BaseException:
            _remove_empty(created)
            raise
        _claims[run] = {"created": created}
        return run


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:  # deepest first
        try:
            d.rmdir()
        except OSError:
            return


def claims() -> list[Path]:
    """The run folders this process holds."""
    with _lock:
        return list(_claims)


def release_claims(keep: list[Path] | tuple = ()) -> None:
    """Give up this process's run folders (except those in `keep`): remove their lock files, and
    the folders created by the claim if nothing was written into them."""
    with _lock:
        for run in [r for r in _claims if r not in keep]:
            info = _claims.pop(run)
            lock = run / LOCK_NAME
            if _owner_state(_read(lock)) == "mine":
                lock.unlink(missing_ok=True)
            _remove_empty(info["created"])


atexit.register(release_claims)
