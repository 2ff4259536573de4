"""Fused sampler step: one elementwise kernel from (model_output, x_t, [noise]) to
(x_{t_prev}, x0).

An op on tensors and coefficients only: it knows nothing of the core's schedulers. The core
(`edgeseg.sampling`) reads the coefficients off its float32 schedule on the host and chooses
this op or its own torch step. The kernel folds the x0 / eps algebra of
`edgeseg.diffusion.NoiseSchedule.to_x0_eps` (x0 from the network output for the three
prediction types, clipped to [-1, 1], eps re-derived from the clipped x0) into the update:

  mode "ddim":  x_prev = c_x0 * x0 + c_b * eps       (+ std * noise when `noise` is given)
                c_x0 = sqrt(abar_prev), c_b = sqrt(1 - abar_prev - sigma^2), std = sigma (eta > 0)
  mode "ddpm":  x_prev = c_x0 * x0 + c_b * x_t       (+ std * noise when `noise` is given)
                c_x0 = posterior_mean_coef1[t], c_b = posterior_mean_coef2[t], std = posterior std

with (sa, s1) = (sqrt(abar_t), sqrt(1 - abar_t)). The kernel computes in float32 whatever the
input dtype, in the torch step's operation order (IEEE division, no FMA contraction), so with
the same coefficients it equals the torch step up to float rounding. Noise is the caller's
(drawn with torch, exactly as the torch step draws it).

Triton is imported lazily, inside `_kernel()`.
"""
from __future__ import annotations

import functools

import torch

from ._launch import cdiv, contiguous, device_of, store_dtype

__all__ = ["fused_sampler_step", "PRED_CODES", "MODES"]

# the kernel's code for each of the core's prediction types (edgeseg.diffusion.PREDICTION_TYPES;
# nothing here imports the core, so tests check the keys agree)
PRED_CODES: dict[str, int] = {"epsilon": 0, "sample": 1, "v_prediction": 2}
MODES: tuple[str, ...] = ("ddim", "ddpm")
_MODE_CODE = {m: i for i, m in enumerate(MODES)}  # ddim 0, ddpm 1
_BLOCK = 1024


@functools.lru_cache(maxsize=None)
def _kernel():
    global triton, tl  # the jitted function resolves `tl` from this module's globals
    import triton
    import triton.language as tl

    @triton.jit
    def _sampler_step_kernel(
        out_ptr, x_ptr, noise_ptr, y_ptr, x0_ptr, n,
        sa, s1, c_x0, c_b, std,
        PRED: tl.constexpr, MODE: tl.constexpr, HAS_NOISE: tl.constexpr, WRITE_X0: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        o = tl.load(out_ptr + offs, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        # Operation order and rounding as the torch step: IEEE division (div_rn), no FMA
        # contraction (the launch passes enable_fp_fusion=False).
        # x0 from the network output (NoiseSchedule.to_x0_eps), clipped to [-1, 1]
        if PRED == 0:
            x0 = tl.div_rn(x - s1 * o, sa)
        elif PRED == 1:
            x0 = o
        else:
            x0 = sa * x - s1 * o
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
        if MODE == 0:
            # DDIM: c_x0 = sqrt(abar_prev), c_b = sqrt(1 - abar_prev - sigma^2)
            eps = tl.div_rn(x - sa * x0, s1)
            res = c_x0 * x0 + c_b * eps
        else:
            # DDPM posterior mean: c_x0 = posterior_mean_coef1[t], c_b = posterior_mean_coef2[t]
            res = c_x0 * x0 + c_b * x
        if HAS_NOISE:
            z = tl.load(noise_ptr + offs, mask=m, other=0.0).to(tl.float32)
            res = res + std * z
        tl.store(y_ptr + offs, res.to(y_ptr.dtype.element_ty), mask=m)
        if WRITE_X0:
            tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=m)

    return _sampler_step_kernel


def fused_sampler_step(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    prediction_type: str,
    mode: str,
    sa: float,
    s1: float,
    c_x0: float,
    c_b: float,
    std: float = 0.0,
    noise: torch.Tensor | None = None,
    block: int = _BLOCK,
    return_x0: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused step; returns (prev_sample, pred_original_sample), the second None when
    `return_x0` is False (one store less). Coefficients as in the module docstring; `std * noise`
    is added when `noise` is given. Output dtype: the promotion of model_output's and x_t's
    dtypes (as the torch step)."""
    if prediction_type not in PRED_CODES:
        raise ValueError(f"prediction_type must be one of {tuple(PRED_CODES)}, got {prediction_type!r}")
    if mode not in _MODE_CODE:
        raise ValueError(f"mode must be 'ddim' or 'ddpm', got {mode!r}")
    if model_output.shape != x_t.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and x_t {tuple(x_t.shape)} differ in shape")
    if noise is not None and noise.shape != x_t.shape:
        raise ValueError(f"noise {tuple(noise.shape)} and x_t {tuple(x_t.shape)} differ in shape")
    k = _kernel()
    o, x, z = contiguous(model_output, x_t, noise)
    out_dtype = torch.promote_types(o.dtype, x.dtype)
    y = torch.empty(x.shape, device=x.device, dtype=store_dtype(out_dtype))
    x0 = torch.empty_like(y) if return_x0 else y  # (not written without WRITE_X0)
    n = x.numel()
    if n:
        with device_of(x):
            k[(cdiv(n, block),)](
                o, x, z if z is not None else x, y, x0, n,
                float(sa), float(s1), float(c_x0), float(c_b), float(std),
                PRED=PRED_CODES[prediction_type], MODE=_MODE_CODE[mode], HAS_NOISE=z is not None,
                WRITE_X0=bool(return_x0), BLOCK=block, num_warps=4,
                enable_fp_fusion=False,  # no FMA contraction: each op rounds as torch's separate kernels do
            )
    return y.to(out_dtype), (x0.to(out_dtype) if return_x0 else None)
