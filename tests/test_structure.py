"""The code's shape stays as the maintainers agreed: small modules and functions in the product
folders, no module reaching into another's private names, one place for the default model's
name, and no build output tracked by git."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("edgeseg", "mobile", "cli", "kernels")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
BUILD_OUTPUT = (".pte", ".bpte", ".etrecord", ".onnx", ".mlpackage", ".safetensors")
# where built files belong in git: the shipped models and the tests' own fixtures
BUILD_OUTPUT_HOMES = ("edgeseg/assets/", "tests/golden/", "tests/fixtures/")


def _modules() -> list[Path]:
    return sorted(p for d in PRODUCT for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(REPO)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_over_80_lines():
    long = {}
    for p in _modules():
        for node in ast.walk(_tree(p)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(REPO)}:{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _private_uses(tree: ast.Module, own: set[str]) -> list[str]:
    """`from m import _x` of another module, and `alias._x` where alias is an imported module."""
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__") and node.module not in own:
                    found.append(f"from {node.module} import {a.name}")
                aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                aliases.add((a.asname or a.name).split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in aliases):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def _module_name(p: Path) -> str:
    rel = p.relative_to(REPO).with_suffix("")
    pkg = {"edgeseg": "edgeseg", "mobile": "edgeseg.mobile", "cli": "edgeseg.cli", "kernels": "edgeseg.kernels"}
    return ".".join([pkg[rel.parts[0]], *rel.parts[1:]]).removesuffix(".__init__")


# private names of third-party libraries the code relies on knowingly (a version-pinned workaround)
THIRD_PARTY = ("torch", "executorch", "coremltools", "onnx", "onnxruntime", "torchao", "triton", "tl", "np", "ct",
               "pl", "dist", "F", "nn", "sys", "os")


def test_no_module_reaches_into_another_modules_private_names():
    bad = {}
    for p in _modules():
        uses = [u for u in _private_uses(_tree(p), {_module_name(p)}) if not u.split(".")[0] in THIRD_PARTY
                and not any(u.startswith(f"from {t}") for t in THIRD_PARTY)]
        # a package's own private helpers (kernels/_launch.py) are its internals, not another module's
        uses = [u for u in uses if not u.startswith(("from ._", "from .", "from edgeseg.kernels._"))
                or _module_name(p).split(".")[1] != "kernels"]
        if uses:
            bad[str(p.relative_to(REPO))] = uses
    assert not bad, f"cross-module private access: {bad}"


def test_the_default_models_name_is_written_in_one_module():
    from edgeseg.defaults import DEFAULT_MODEL, SHIPPED_MODELS

    assert DEFAULT_MODEL in SHIPPED_MODELS
    for name in SHIPPED_MODELS:  # every shipped model's name, the default's included
        holders = [str(p.relative_to(REPO)) for p in _modules() if f'"{name}"' in p.read_text()]
        assert holders == ["edgeseg/defaults.py"], (name, holders)


def test_no_build_output_is_tracked():
    try:
        files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.fail("git ls-files failed: the check needs the repository's git metadata")
    tracked = [f for f in files.splitlines() if any(part.endswith(BUILD_OUTPUT) for part in f.split("/"))
               and not f.startswith(BUILD_OUTPUT_HOMES)]
    assert not tracked, f"build output tracked outside {BUILD_OUTPUT_HOMES}: {tracked[:20]}"
