"""Export the whole few-step segmenter to ExecuTorch (.pte, XNNPACK), CoreML (.mlpackage) and ONNX.

One module per job:

- :mod:`edgeseg.mobile.job`: what every export resolves first (model, K and N, output, images)
  and the one traced program (the Segmenter's core, constant-folded; int8 via PT2E);
- :mod:`edgeseg.mobile.executorch_export`: :func:`export_executorch` (.pte + ETRecord + bundled program);
- :mod:`edgeseg.mobile.coreml_export`: :func:`export_coreml` (.mlpackage);
- :mod:`edgeseg.mobile.onnx_export`: ``export_onnx`` (.onnx, gated in ONNX Runtime);
- :mod:`edgeseg.mobile.unet_export`: :func:`export_unet_pte`, the baseline U-Net through the same tooling;
- :mod:`edgeseg.mobile.gate`: the parity gate (program vs eager PyTorch; a failure is kept as
  ``<out>.failed`` and raises :class:`~edgeseg.errors.EdgesegError`, which the CLI turns into one
  line and exit code 2);
- :mod:`edgeseg.mobile.placement`: output checks, temporary names, the atomic move into place;
- :mod:`edgeseg.mobile.sidecar`: the ``<out>.json`` contract every export writes.

This module keeps the public names at their old import path.
"""
from __future__ import annotations

from edgeseg.defaults import SAMPLER_DEFAULTS as DEFAULTS
from edgeseg.defaults import sampler_defaults as default_steps_ensemble
from edgeseg.mobile.coreml_export import (COMPUTE_UNITS, COREML_METADATA_KEYS, coreml_metadata, export_coreml,
                                          inspect_mlpackage)
from edgeseg.mobile.executorch_export import (count_delegates, export_executorch, load_method, lower_executorch,
                                              parity_pte, to_program)
from edgeseg.mobile.gate import PARITY_THRESHOLDS, ParityReference, ProgramLoadError, run_parity
from edgeseg.mobile.job import (CALIBRATION_IMAGES, PARITY_IMAGES, Progress, export_program, exported_core,
                                load_for_export, load_images)
from edgeseg.mobile.placement import ARTEFACTS, artefact_path, check_output
from edgeseg.mobile.sidecar import EXPORT_RECIPE
from edgeseg.mobile.unet_export import UNET_RECIPE, UNET_TARGET, export_unet_pte, parity_unet_pte

__all__ = [
    "DEFAULTS", "PARITY_THRESHOLDS", "default_steps_ensemble", "load_for_export", "export_program",
    "lower_executorch", "to_program", "count_delegates", "export_executorch", "export_coreml", "inspect_mlpackage",
    "export_unet_pte", "EXPORT_RECIPE", "CALIBRATION_IMAGES", "PARITY_IMAGES", "Progress", "ProgramLoadError",
    "ParityReference", "run_parity", "parity_pte", "load_method", "exported_core", "load_images", "ARTEFACTS",
    "artefact_path", "check_output", "COMPUTE_UNITS", "COREML_METADATA_KEYS", "coreml_metadata", "UNET_TARGET",
    "UNET_RECIPE", "parity_unet_pte",
]
