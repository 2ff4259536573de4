"""Run many `edgeseg` command lines, each in its own process, for tests/test_bad_input.py.

``python tests/cli_driver.py < spec.json`` imports the CLI and the heavy modules once, then
forks one child per case: the child changes to the case's folder, sets its environment,
redirects stdout/stderr to files and calls the real entry point ``edgeseg.cli.main:main``
with the case's argv, exactly as the installed ``edgeseg`` script does (exit handlers
included). A case that runs past its timeout is killed by SIGALRM (a hang shows as -14).
This costs one interpreter start-up for the whole file instead of one per case.

spec: {"preimport": [module, ...], "cases": [{"id", "argv", "cwd", "env", "timeout", "deny"}], "out": folder}
``deny``: paths whose listing fails with EACCES, as for a folder without read permission
(used when the tests run as root, whom the kernel lets read anything).
Prints one JSON line: {id: {"rc", "stdout", "stderr", "seconds", "maxrss_mb"}} (maxrss: the
child's peak resident memory, including what it shares with the parent's imports).
"""
from __future__ import annotations

import atexit
import importlib
import json
import os
import signal
import sys
import time
import traceback


def _deny(paths: list[str]) -> None:
    import errno

    denied = {os.path.realpath(p) for p in paths}

    def guard(fn):
        def wrapped(path=".", *a, **k):
            if os.path.realpath(os.fspath(path)) in denied:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return fn(path, *a, **k)

        return wrapped

    os.listdir = guard(os.listdir)
    os.scandir = guard(os.scandir)


def _child(case: dict, out_dir: str) -> None:
    fo = os.open(os.path.join(out_dir, f"{case['id']}.out"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    fe = os.open(os.path.join(out_dir, f"{case['id']}.err"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fo, 1)
    os.dup2(fe, 2)
    code = 1
    try:
        os.chdir(case["cwd"])
        os.environ.update(case.get("env") or {})
        if case.get("deny"):
            _deny(case["deny"])
        signal.alarm(int(case.get("timeout", 60)))
        sys.argv = ["edgeseg", *case["argv"]]
        from edgeseg.cli.main import main

        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - reported through stderr and the exit code
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    spec = json.load(sys.stdin)
    for m in spec.get("preimport", []):
        importlib.import_module(m)
    results = {}
    for case in spec["cases"]:
        t0 = time.time()
        pid = os.fork()
        if pid == 0:
            _child(case, spec["out"])
        _, status, usage = os.wait4(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        def read(ext: str) -> str:
            with open(os.path.join(spec["out"], f"{case['id']}.{ext}"), errors="replace") as f:
                return f.read()

        results[case["id"]] = {"rc": rc, "stdout": read("out"), "stderr": read("err"),
                               "seconds": round(time.time() - t0, 2), "maxrss_mb": round(usage.ru_maxrss / 1024)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
