"""The one table of inference defaults: `segment`, `evaluate`, `export` and `bench/` all read it.

Default (K DDIM steps, N ensemble members) per prediction type and the uncertainty map, chosen
by measurement on real lesions (`bench/uncertainty.py`, results and the rule in
bench/results/uncertainty/isic2017/ and the README): for x0 and v students K = 1, N = 3, eta = 0
and the margin map. Epsilon models do not segment in one step; their K = 10 is provisional (no
converged epsilon student has been trained here).
"""
from __future__ import annotations

__all__ = ["SAMPLER_DEFAULTS", "sampler_defaults", "DEFAULT_MODEL", "UNCERTAINTY_MAP", "finetune_start"]

SAMPLER_DEFAULTS: dict[str, dict] = {
    "sample": {"steps": 1, "ensemble": 3, "provisional": False},
    "v_prediction": {"steps": 1, "ensemble": 3, "provisional": False},
    "epsilon": {"steps": 10, "ensemble": 3, "provisional": True},
}

#: The uncertainty map `Segmentation.uncertainty` holds (edgeseg.segmenter.uncertainty_map).
UNCERTAINTY_MAP = "margin"

#: The shipped model used when no checkpoint is given and no run exists under ./runs.
DEFAULT_MODEL = "tiny-student-isic2017"


def sampler_defaults(prediction_type: str) -> tuple[int, int]:
    """(steps, ensemble) for a model of this prediction type."""
    d = SAMPLER_DEFAULTS[prediction_type]
    return d["steps"], d["ensemble"]


def finetune_start() -> dict[str, str]:
    """The shipped models that fine-tuning on a user's folder starts from, by role: the default
    model and its teacher (named as `edgeseg.runs.resolve_checkpoint` names it), so switching
    DEFAULT_MODEL switches the fine-tuning start too."""
    return {"teacher": DEFAULT_MODEL.replace("student", "teacher"), "student": DEFAULT_MODEL}
