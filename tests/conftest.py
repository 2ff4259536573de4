"""Shared pytest fixtures for the edgeseg test-suite."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_NAME = "efkd_reference.npz"


# the longest test file starts first, so the other worker is not left waiting at the end
FIRST = "test_mobile.py"


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (--dist loadfile: each test file on one worker, its module fixtures built
    once) the longest file is scheduled first; the file order is kept otherwise."""
    items.sort(key=lambda item: item.path.name != FIRST)


def pytest_configure(config):
    """Each xdist worker uses its share of the cores, so two workers on two cores do not fight."""
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if count:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(count)))


def _golden_candidates() -> list[Path]:
    out = []
    env = os.environ.get("EDGESEG_GOLDEN")
    if env:
        p = Path(env).expanduser()
        out.append(p if p.suffix == ".npz" else p / GOLDEN_NAME)
    # a copy lives in the repository (tests/golden/, with its README), so a clean clone checks it
    out.append(REPO_ROOT / "tests" / "golden" / GOLDEN_NAME)
    return out


def golden_path() -> Path | None:
    for p in _golden_candidates():
        if p.is_file():
            return p
    return None


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    """The paper authors' EFKD reference vectors (tests/golden/efkd_reference.npz)."""
    p = golden_path()
    if p is None:
        tried = ", ".join(str(c) for c in _golden_candidates())
        pytest.skip(f"golden file {GOLDEN_NAME} not found (tried {tried}); set EDGESEG_GOLDEN to its path")
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def tiny_pte_fp32(tmp_path_factory):
    """(path, sidecar) of the shipped tiny student's fp32 .pte at K = 1, N = 2 (4 parity images),
    exported once for test_mobile and test_deploy (with its ETRecord and bundled program).
    Read-only: a test that changes a file works on a copy."""
    import json

    from filelock import FileLock

    from edgeseg.checkpoint import load_model
    from edgeseg.mobile.executorch_export import export_executorch
    from edgeseg.mobile.sidecar import sidecar_path

    # under pytest-xdist the workers share one export: the first makes it, the others read it
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    out = root / "shared-pte" / "tiny.pte"
    out.parent.mkdir(exist_ok=True)
    with FileLock(str(out.parent / "export.lock")):
        if sidecar_path(out).is_file():
            return out, json.loads(sidecar_path(out).read_text())
        tiny = load_model(REPO_ROOT / "edgeseg" / "assets" / "tiny-student-synthetic.safetensors").eval()
        return out, export_executorch(tiny, out, 1, 2, "none", n_parity_images=4)


@pytest.fixture(scope="session")
def tiny():
    """The shipped tiny student (trained on the synthetic set, x0 prediction), in eval mode."""
    from edgeseg.checkpoint import load_model

    return load_model(REPO_ROOT / "edgeseg" / "assets" / "tiny-student-synthetic.safetensors").eval()


@pytest.fixture(scope="module")
def micro_env(tmp_path_factory):
    """The micro presets registered, one synthetic cache shared by the session's test files,
    1 thread, no curve plots (tests/micro.py); a test module opts in with
    ``pytestmark = pytest.mark.usefixtures("micro_env")``."""
    from micro import micro_environment

    yield from micro_environment(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def data(micro_env):
    """(train, val): 32 and 8 micro synthetic images, materialised (tests/micro.py)."""
    from micro import micro_datasets

    return micro_datasets(32, 8)
