"""Fused sampler step: one elementwise kernel from (model_output, x_t, [noise]) to x_{t_prev}.

Liger-Kernel layout: the Triton kernel, the launcher and the plain-torch reference (the core
schedulers' own `step`) side by side. The kernel folds `NoiseSchedule.to_x0_eps` (x0 from the
network output for the three prediction types, clipped to [-1, 1], eps re-derived from the
clipped x0) into the update:

  DDIM (eta = 0):  x_prev = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev) * eps
  DDPM ancestral:  x_prev = coef1_t * x0 + coef2_t * x_t (+ std_t * noise when t > 0)

with the schedule coefficients read on the host from the float32 schedule arrays (as the torch
step does), so the result equals `DDIMScheduler.step` / `DDPMScheduler.step` up to float
rounding (the kernel computes in float32 whatever the input dtype). DDPM noise is drawn with
`torch.randn` exactly as the torch step draws it, so a seeded generator gives the same chain.

Triton is imported lazily, inside `_kernel()`.
"""
from __future__ import annotations

import functools

import torch

from edgeseg.diffusion import PREDICTION_TYPES, DDIMScheduler, DDPMScheduler, NoiseSchedule

__all__ = [
    "fused_sampler_step",
    "reference_sampler_step",
    "FusedDDIMScheduler",
    "FusedDDPMScheduler",
    "make_scheduler",
]

_PRED_CODE = {p: i for i, p in enumerate(PREDICTION_TYPES)}  # epsilon 0, sample 1, v_prediction 2
_MODE_DDIM, _MODE_DDPM = 0, 1
_BLOCK = 1024


@functools.lru_cache(maxsize=None)
def _kernel():
    global triton, tl  # the jitted function resolves `tl` from this module's globals
    import triton
    import triton.language as tl

    @triton.jit
    def _sampler_step_kernel(
        out_ptr, x_ptr, noise_ptr, y_ptr, n,
        sa, s1, c_x0, c_b, std,
        PRED: tl.constexpr, MODE: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr,
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
            # DDIM, eta = 0: c_x0 = sqrt(abar_prev), c_b = sqrt(1 - abar_prev)
            eps = tl.div_rn(x - sa * x0, s1)
            res = c_x0 * x0 + c_b * eps
        else:
            # DDPM posterior mean: c_x0 = posterior_mean_coef1[t], c_b = posterior_mean_coef2[t]
            res = c_x0 * x0 + c_b * x
            if HAS_NOISE:
                z = tl.load(noise_ptr + offs, mask=m, other=0.0).to(tl.float32)
                res = res + std * z
        tl.store(y_ptr + offs, res.to(y_ptr.dtype.element_ty), mask=m)

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
) -> torch.Tensor:
    """Launch the fused step. mode "ddim": (c_x0, c_b) = (sqrt(abar_prev), sqrt(1-abar_prev));
    mode "ddpm": (c_x0, c_b) = (posterior_mean_coef1[t], posterior_mean_coef2[t]) and
    `std * noise` added when `noise` is given. (sa, s1) = (sqrt(abar_t), sqrt(1-abar_t)).
    Output dtype: the promotion of model_output's and x_t's dtypes (as the torch step)."""
    if prediction_type not in _PRED_CODE:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if mode not in ("ddim", "ddpm"):
        raise ValueError(f"mode must be 'ddim' or 'ddpm', got {mode!r}")
    if model_output.shape != x_t.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and x_t {tuple(x_t.shape)} differ in shape")
    if noise is not None and noise.shape != x_t.shape:
        raise ValueError(f"noise {tuple(noise.shape)} and x_t {tuple(x_t.shape)} differ in shape")
    k = _kernel()
    o = model_output.contiguous()
    x = x_t.contiguous()
    z = noise.contiguous() if noise is not None else x
    out_dtype = torch.promote_types(o.dtype, x.dtype)
    # Triton's CPU interpreter truncates fp32 -> bf16/fp16 stores (the GPU rounds to nearest
    # even); there, write fp32 and let torch round (tests only).
    from .fused_distill_loss import _device_of, _interpreting

    y = torch.empty(x.shape, device=x.device, dtype=torch.float32 if _interpreting() else out_dtype)
    n = x.numel()
    if n == 0:
        return y.to(out_dtype)
    grid = (triton.cdiv(n, block),)
    with _device_of(x):
        k[grid](
            o, x, z, y, n, float(sa), float(s1), float(c_x0), float(c_b), float(std),
            PRED=_PRED_CODE[prediction_type], MODE=_MODE_DDIM if mode == "ddim" else _MODE_DDPM,
            HAS_NOISE=noise is not None, BLOCK=block, num_warps=4,
            enable_fp_fusion=False,  # no FMA contraction: each op rounds as torch's separate kernels do
        )
    return y.to(out_dtype)


def reference_sampler_step(scheduler, model_output, t, x_t, noise=None):
    """The plain-torch step of the core scheduler class (what the fused kernel must equal)."""
    if isinstance(scheduler, DDPMScheduler):
        return DDPMScheduler.step(scheduler, model_output, t, x_t, noise=noise)
    return DDIMScheduler.step(scheduler, model_output, t, x_t)


def _check_backend(backend: str) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return backend


def _use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    from . import triton_available

    return all(x.is_cuda for x in tensors) and triton_available()


class FusedDDIMScheduler(DDIMScheduler):
    """`DDIMScheduler` whose `step` runs the fused kernel on CUDA tensors (backend "auto")."""

    def __init__(self, schedule: NoiseSchedule | None = None, prediction_type: str = "epsilon",
                 backend: str = "auto"):
        super().__init__(schedule, prediction_type)
        self.backend = _check_backend(backend)

    def step(self, model_output: torch.Tensor, t: int, x_t: torch.Tensor) -> torch.Tensor:
        if not _use_triton(self.backend, model_output, x_t):
            return super().step(model_output, t, x_t)
        t = int(t)
        sa, s1, sa_prev, s1_prev = self.step_coefficients(t)
        return fused_sampler_step(model_output, x_t, self.prediction_type, "ddim", sa, s1, sa_prev, s1_prev)


class FusedDDPMScheduler(DDPMScheduler):
    """`DDPMScheduler` whose `step` runs the fused kernel on CUDA tensors (backend "auto")."""

    def __init__(self, schedule: NoiseSchedule | None = None, prediction_type: str = "epsilon",
                 backend: str = "auto"):
        super().__init__(schedule, prediction_type)
        self.backend = _check_backend(backend)

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if not _use_triton(self.backend, model_output, x_t):
            return super().step(model_output, t, x_t, noise=noise, generator=generator)
        t = int(t)
        s = self.schedule
        if t > 0 and noise is None:
            # drawn exactly as DDPMScheduler.step draws it (same generator consumption)
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        std = float(s.posterior_std(t)) if t > 0 else 0.0
        return fused_sampler_step(
            model_output, x_t, self.prediction_type, "ddpm",
            float(s.sqrt_alphas_cumprod[t]), float(s.sqrt_one_minus_alphas_cumprod[t]),
            float(s.posterior_mean_coef1[t]), float(s.posterior_mean_coef2[t]),
            std=std, noise=noise if t > 0 else None,
        )


def make_scheduler(
    kind: str,
    num_inference_steps: int | None,
    prediction_type: str = "epsilon",
    backend: str = "auto",
    schedule: NoiseSchedule | None = None,
):
    """The evaluation code's sampler factory: "ddpm" (all T ancestral steps) or "ddim" (K steps).

    Returns a FusedDDPMScheduler / FusedDDIMScheduler with `set_timesteps` already called; its
    `step` uses the Triton kernel on CUDA tensors when backend is "auto" (or always with
    "triton"), the core torch step otherwise.
    """
    kind = str(kind).lower()
    if kind == "ddpm":
        sch = FusedDDPMScheduler(schedule, prediction_type, backend)
        sch.set_timesteps(num_inference_steps)
    elif kind == "ddim":
        sch = FusedDDIMScheduler(schedule, prediction_type, backend)
        if num_inference_steps is None:
            raise ValueError("the DDIM sampler needs num_inference_steps")
        sch.set_timesteps(num_inference_steps)
    else:
        raise ValueError(f"kind must be 'ddpm' or 'ddim', got {kind!r}")
    return sch
