"""edgeseg.runlock: one process per run folder, stale locks of dead processes taken over, automatic
run names that do not collide."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeseg.errors import RunFolderError


def _python(code: str, cwd: Path, wait: bool = True):
    cmd = [sys.executable, "-c", code]
    if wait:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_claiming_one_new_run_folder_one_wins(tmp_path):
    code = ("import sys, time; from edgeseg.runlock import claim_run_dir\n"
            "t = float(sys.argv[1]) if len(sys.argv) > 1 else 0\n"
            "try:\n    claim_run_dir('runs/r', resume=False); print('won', flush=True); time.sleep(3)\n"
            "except Exception as e:\n    print('lost:', e, flush=True)\n")
    procs = [_python(code, tmp_path, wait=False) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(o.split(":")[0] for o in outs) == ["lost", "won"], outs
    assert "exists" in [o for o in outs if o.startswith("lost")][0]


def test_stale_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path, capsys):
    from edgeseg.runlock import LOCK_NAME, claim_run_dir, release_claims

    # a run killed with SIGKILL: its lock stays behind (no exit handlers ran)
    p = _python("import os; from edgeseg.runlock import claim_run_dir; claim_run_dir('runs/r', resume=False); "
                "print(os.getpid()); os._exit(0)", tmp_path)
    dead = int(p.stdout.strip())
    lock = tmp_path / "runs" / "r" / LOCK_NAME
    assert json.loads(lock.read_text())["pid"] == dead
    run = claim_run_dir(tmp_path / "runs" / "r", resume=True)
    err = capsys.readouterr().err
    assert "stale lock" in err and str(dead) in err
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release_claims()
    assert not lock.exists() and run.is_dir()  # the folder was not created by this claim: kept


def test_a_live_lock_is_refused_and_left_alone(tmp_path):
    from edgeseg.runlock import LOCK_NAME, claim_run_dir

    holder = _python("import time; from edgeseg.runlock import claim_run_dir; claim_run_dir('runs/r', resume=False); "
                     "print('ready', flush=True); time.sleep(60)", tmp_path, wait=False)
    try:
        assert holder.stdout.readline().strip() == "ready"
        lock = tmp_path / "runs" / "r" / LOCK_NAME
        before = lock.read_bytes()
        with pytest.raises(RunFolderError, match=f"in use by process {holder.pid}"):
            claim_run_dir(tmp_path / "runs" / "r", resume=True)
        assert lock.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


def test_release_removes_what_the_claim_created_if_still_empty(tmp_path):
    from edgeseg.runlock import claim_run_dir, claims, release_claims

    a = claim_run_dir(tmp_path / "new" / "runs" / "a", resume=False)
    b = claim_run_dir(tmp_path / "runs" / "b", resume=False)
    (b / "log.txt").write_text("written")
    assert set(claims()) >= {a, b}
    release_claims()
    assert not (tmp_path / "new").exists()  # nothing written: the folder and its new parents go
    assert (b / "log.txt").is_file() and not (b / "run.lock").exists()


def test_automatic_run_names_do_not_collide(tmp_path):
    from edgeseg.runlock import claim_run_dir, release_claims

    a = claim_run_dir(tmp_path / "synthetic-x", resume=False, unique=True)
    b = claim_run_dir(tmp_path / "synthetic-x", resume=False, unique=True)
    assert a != b and b.name == "synthetic-x-2"
    release_claims()
