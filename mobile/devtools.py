"""ExecuTorch's developer tools for an exported ``.pte``: the ETRecord and the bundled program.

Every ``.pte`` export (:func:`edgeseg.mobile.executorch_export.export_executorch`) writes beside ``<out>``
and its sidecar:

* ``<out>.etrecord``: ExecuTorch's ETRecord of this export (the exported, edge and final
  programs, the debug-handle map, the bundled inputs and expected outputs). ``edgeseg profile``
  joins it with an ETDump of a run through ExecuTorch's Inspector (:mod:`edgeseg.mobile.profile`).
* ``<out>.bpte``: a BundledProgram: the same program plus the parity gate's first
  :data:`BUNDLED_IMAGES` held-out images with their noise as inputs and eager PyTorch's
  ``(mean, std)`` for them as expected values, to verify the program on a device with
  ExecuTorch's bundled-program runner. The tolerance is what the parity gate justifies: the
  gate accepted the program at the largest deviation it measured from eager PyTorch on its
  held-out images (``max |program - eager|`` over both outputs, all images), so the bundle
  allows :data:`BUNDLE_MARGIN` times that (never below :data:`BUNDLE_ATOL_FLOOR`, fp32
  rounding between CPUs), as an absolute tolerance, ``rtol`` 0. The gate itself then runs the
  ``.bpte`` through ExecuTorch's verification in the Python runtime (a mismatch fails the
  export like a low Dice).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["BUNDLED_IMAGES", "BUNDLE_MARGIN", "BUNDLE_ATOL_FLOOR", "BundleCheck", "bundle_tolerance",
           "make_bundle", "verify_bundled", "write_debug_artefacts"]

BUNDLED_IMAGES = 3
BUNDLE_MARGIN = 1.5
BUNDLE_ATOL_FLOOR = 1e-4


@dataclass
class BundleCheck:
    """What the gate learnt from running the .bpte: how many cases, and the first mismatch (None if none)."""

    n_cases: int
    problem: str | None


def bundle_tolerance(deviation: list[float]) -> dict:
    """{"atol", "rtol", "basis"} for a bundle whose program deviated from eager by `deviation` (per call)."""
    worst = max(deviation) if deviation else 0.0
    return {"atol": float(max(BUNDLE_ATOL_FLOOR, BUNDLE_MARGIN * worst)), "rtol": 0.0,
            "basis": f"{BUNDLE_MARGIN} x the largest |program - eager| (mean and std outputs) that the parity gate "
                     f"accepted on its held-out images ({worst:.3g}), at least {BUNDLE_ATOL_FLOOR:g}"}


def make_bundle(program, ref, n: int = BUNDLED_IMAGES):
    """The BundledProgram of `program` (an ExecutorchProgramManager) with the first `n` calls of
    `ref` (:class:`edgeseg.mobile.gate.ParityReference`): inputs (image, noise), expected (mean, std)."""
    from executorch.devtools import BundledProgram
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite

    cases = [MethodTestCase(inputs=[img, nz], expected_outputs=[mean.contiguous(), std.contiguous()])
             for img, nz, (mean, std) in list(zip(ref.images, ref.noises, ref.eager))[:n]]
    return BundledProgram(program, [MethodTestSuite(method_name="forward", test_cases=cases)])


def verify_bundled(data: bytes, n_cases: int, atol: float, rtol: float = 0.0) -> BundleCheck:
    """Run every case of a serialized bundled program in ExecuTorch's Python runtime and compare
    with its expected outputs (ExecuTorch's own check: ``|out - expected| <= atol + rtol |expected|``)."""
    from executorch.extension.pybindings.portable_lib import _load_bundled_program_from_buffer

    try:
        bundle = _load_bundled_program_from_buffer(data)
    except RuntimeError as e:
        return BundleCheck(n_cases, f"the bundled program does not load ({' '.join(str(e).split())[:160]})")
    for i in range(n_cases):
        try:
            bundle.verify_result_with_bundled_expected_output("forward", i, rtol, atol)
        except RuntimeError as e:
            return BundleCheck(n_cases, f"bundled case {i} does not match its expected outputs within atol "
                                        f"{atol:.3g} ({' '.join(str(e).split())[:120]})")
    return BundleCheck(n_cases, None)


def write_debug_artefacts(program, ref, tmp_for) -> tuple[dict[str, Path], dict, dict, str | None]:
    """Write the ETRecord and the bundled program of `program` to temporary files and verify the bundle.

    `tmp_for(suffix)` gives a fresh temporary path. Returns ({".etrecord": tmp, ".bpte": tmp},
    the sidecar's ``etrecord`` entry, its ``bundled_program`` entry, the verification problem or None).
    """
    from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer

    from edgeseg.mobile import sidecar as sc

    tol = bundle_tolerance(ref.deviation)
    bundle = make_bundle(program, ref)
    data = serialize_from_bundled_program_to_flatbuffer(bundle)
    temps = {".bpte": tmp_for(".bpte.partial"), ".etrecord": tmp_for(".etrecord.partial")}
    temps[".bpte"].write_bytes(data)
    record = program.get_etrecord()
    record.update_representative_inputs(bundle)
    record.update_reference_outputs(bundle)
    record.save(temps[".etrecord"])
    n_cases = len(bundle.method_test_suites[0].test_cases)
    check = verify_bundled(data, n_cases, tol["atol"], tol["rtol"])
    digest, size = sc.file_digest(temps[".etrecord"])
    etrecord = {"sha256": digest, "size_bytes": size}
    bundled = {"n_images": n_cases, "images": "the parity gate's first held-out images, with its noise",
               "expected": "eager PyTorch (Segmenter.predict on the original network): mean, std",
               **tol, "verified": check.problem is None,
               "verification": "ExecuTorch bundled-program verification (Python runtime)",
               "sha256": sc.file_digest(temps[".bpte"])[0], "size_bytes": len(data)}
    return temps, etrecord, bundled, check.problem
