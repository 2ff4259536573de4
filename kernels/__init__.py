"""Fused Triton kernels for edgeseg (installed as `edgeseg.kernels`).

Public API:
  fused_distill_loss(eps_s, eps_t, noise, d, t, T, ..., backend="auto") -> (total, terms)
  make_scheduler(kind, num_inference_steps, prediction_type, backend="auto")
  FusedDDIMScheduler, FusedDDPMScheduler
  triton_available()

Importing this package never imports Triton: the kernels are built on first use, so machines
without Triton (laptops, phones' build hosts) run the torch reference paths. "auto" picks Triton
only for CUDA tensors. On CPU, Triton runs under its interpreter (`TRITON_INTERPRET=1`) when a
caller asks for backend="triton" explicitly (that is how the tests run).

The kernels build on the core library (`edgeseg.losses`, `edgeseg.diffusion`); the core never
imports this package at module import time.
"""
from __future__ import annotations

import functools

from .fused_distill_loss import fused_distill_loss
from .fused_sampler_step import FusedDDIMScheduler, FusedDDPMScheduler, fused_sampler_step, make_scheduler

__all__ = [
    "fused_distill_loss",
    "make_scheduler",
    "FusedDDIMScheduler",
    "FusedDDPMScheduler",
    "fused_sampler_step",
    "triton_available",
]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports (checked once, on first call)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True
