"""The one table of defaults: the shipped models, the default model, the sampler's K and N, the
uncertainty map, the presets per dataset and the main job's evaluation. `segment`, `evaluate`,
`export`, `distill` and `bench/` all read it.

Default (K DDIM steps, N ensemble members) per prediction type and the uncertainty map, chosen
by measurement on real lesions (`bench/uncertainty.py`, results and the rule in
bench/results/uncertainty/isic2017/ and the README): for x0 and v students K = 1, N = 3, eta = 0
and the margin map. Epsilon models do not segment in one step; their K = 10 is provisional (no
converged epsilon student has been trained here).
"""
from __future__ import annotations

from edgeseg.evaluate import SamplerSettings

__all__ = ["SAMPLER_DEFAULTS", "sampler_defaults", "DEFAULT_MODEL", "UNCERTAINTY_MAP", "SHIPPED_MODELS",
           "DATASET_PRESETS", "DEFAULT_EVAL", "VAL_SELECT", "MASK_CLEANUP", "MASK_CLEANUPS", "finetune_start"]

SAMPLER_DEFAULTS: dict[str, dict] = {
    "sample": {"steps": 1, "ensemble": 3, "provisional": False},
    "v_prediction": {"steps": 1, "ensemble": 3, "provisional": False},
    "epsilon": {"steps": 10, "ensemble": 3, "provisional": True},
}

#: The uncertainty map `Segmentation.uncertainty` holds (edgeseg.segmenter.uncertainty_map).
UNCERTAINTY_MAP = "margin"

#: What `edgeseg.segmenter.postprocess` does to the thresholded mask at the photo's size, chosen on the
#: ISIC 2017 validation split (`bench/isic2017.py --split val`, docs/results.md): "largest-filled" keeps
#: the largest connected lesion and fills its holes; "none" keeps the threshold as it is, which scored
#: the higher Dice for every shipped real-lesion model.
MASK_CLEANUPS = ("none", "largest-filled")
MASK_CLEANUP = "none"

#: The models shipped in the package, edgeseg/assets/<name>.safetensors + .json: name -> (preset,
#: dataset it was trained on). Adding a shipped model is one line here (and its files in assets/).
SHIPPED_MODELS: dict[str, tuple[str, str]] = {
    "tiny-student-128-isic2017": ("tiny-student-128", "isic2017"),
    "tiny-teacher-128-isic2017": ("tiny-teacher-128", "isic2017"),
    "tiny-student-isic2017": ("tiny-student", "isic2017"),
    "tiny-teacher-isic2017": ("tiny-teacher", "isic2017"),
    "tiny-student-synthetic": ("tiny-student", "synthetic"),
    "tiny-teacher-synthetic": ("tiny-teacher", "synthetic"),
}

#: The shipped model used when no checkpoint is given and no run exists under ./runs.
DEFAULT_MODEL = "tiny-student-128-isic2017"

#: (teacher preset, student preset) the main job trains per dataset; isic2017 uses the tiny 128-px
#: CPU presets of the default model, ph2 the 64-px ones.
DATASET_PRESETS: dict[str, tuple[str, str]] = {
    "isic2017": ("tiny-teacher-128", "tiny-student-128"),
    "ph2": ("tiny-teacher", "tiny-student"),
    "isic2018": ("teacher-isic2018", "student-isic2018"),
    "ham10000": ("teacher-ham10000", "student-ham10000"),
    "folder": ("teacher-isic2018", "student-isic2018"),
    "synthetic": ("tiny-teacher", "tiny-student"),
}

#: The main job's final evaluation: few-step DDIM at the model's K and N from SAMPLER_DEFAULTS.
DEFAULT_EVAL = SamplerSettings("ddim")
#: Per-epoch validation Dice for model selection: one deterministic step, cheap enough for every epoch.
VAL_SELECT = SamplerSettings("ddim", steps=1, ensemble=1)


def sampler_defaults(prediction_type: str) -> tuple[int, int]:
    """(steps, ensemble) for a model of this prediction type."""
    d = SAMPLER_DEFAULTS[prediction_type]
    return d["steps"], d["ensemble"]


def finetune_start() -> dict[str, str]:
    """The shipped models that fine-tuning on a user's folder starts from, by role: the default
    model and its teacher (named as `edgeseg.runs.resolve_checkpoint` names it), so switching
    DEFAULT_MODEL switches the fine-tuning start too."""
    return {"teacher": DEFAULT_MODEL.replace("student", "teacher"), "student": DEFAULT_MODEL}
