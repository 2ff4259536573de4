"""Fused Triton kernels for edgeseg (installed as `edgeseg.kernels`).

Public API (ops on tensors and coefficients):
  fused_distill_loss(eps_s, eps_t, noise, d, t, T, ..., backend="auto") -> (total, terms)
  fused_sampler_step(model_output, x_t, prediction_type, mode, sa, s1, c_x0, c_b, std, noise)
      -> (prev_sample, pred_original_sample)
  triton_available()

Importing this package never imports Triton: the kernels are built on first use, so machines
without Triton (laptops, phones' build hosts) run the torch reference paths. "auto" picks Triton
only for CUDA tensors. On CPU, Triton runs under its interpreter (`TRITON_INTERPRET=1`) when a
caller asks for backend="triton" explicitly (that is how the tests run).

The dependency runs one way: the core (`edgeseg.train`, `edgeseg.sampling`) imports this
package and chooses the backend; nothing here imports the rest of `edgeseg`
(tests/test_kernels.py checks it). The schedulers that use the fused step are the core's
(`edgeseg.sampling.make_scheduler`, `FusedDDIMScheduler`, `FusedDDPMScheduler`).
"""
from __future__ import annotations

from ._launch import triton_available
from .fused_distill_loss import fused_distill_loss
from .fused_sampler_step import fused_sampler_step

__all__ = [
    "fused_distill_loss",
    "fused_sampler_step",
    "triton_available",
]
