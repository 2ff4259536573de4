"""Sampler factory and the schedulers whose step can run the fused Triton update.

The backend choice lives here, on the core side: `FusedDDIMScheduler` / `FusedDDPMScheduler`
are the core schedulers of `edgeseg.diffusion` whose `step` hands the update to
`edgeseg.kernels.fused_sampler_step` (an op on tensors and coefficients) when the tensors are on
CUDA and Triton imports (backend "auto"), or always (backend "triton"); otherwise, and for
backend "torch", it is the core torch step. The coefficients are read on the host from the
float32 schedule arrays exactly as the torch step reads them, and the noise is drawn with
`torch.randn` exactly as the torch step draws it (same generator consumption), so a seeded
generator gives the same chain on either backend. Both return `SchedulerOutput`.

`edgeseg.kernels` is imported on first use only (importing this module needs neither it nor Triton).
"""
from __future__ import annotations

import torch

from edgeseg.diffusion import DDIMScheduler, DDPMScheduler, NoiseSchedule, SchedulerOutput, draw_noise

__all__ = ["FusedDDIMScheduler", "FusedDDPMScheduler", "make_scheduler"]


def _check_backend(backend: str) -> str:
    from edgeseg.kernels._launch import check_backend

    return check_backend(backend)


def _use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    from edgeseg.kernels._launch import use_triton

    return use_triton(backend, *tensors)


def _op():
    """The fused update op, looked up on its module at call time (tests monkeypatch it there)."""
    import importlib

    return importlib.import_module("edgeseg.kernels.fused_sampler_step").fused_sampler_step


class FusedDDIMScheduler(DDIMScheduler):
    """`DDIMScheduler` whose `step` runs the fused kernel on CUDA tensors (backend "auto")."""

    def __init__(self, schedule: NoiseSchedule | None = None, prediction_type: str = "epsilon",
                 backend: str = "auto", eta: float = 0.0):
        super().__init__(schedule, prediction_type, eta=eta)
        self.backend = _check_backend(backend)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
    ) -> SchedulerOutput:
        if not _use_triton(self.backend, model_output, sample):
            return super().step(model_output, timestep, sample, generator, noise=noise)
        t = int(timestep)
        sa, s1, c_x0, c_eps, sigma = self.update_coefficients(t)
        if sigma > 0.0 and noise is None:
            noise = draw_noise(sample, generator)  # as DDIMScheduler.step draws it
        prev, x0 = _op()(
            model_output, sample, self.prediction_type, "ddim", sa, s1, c_x0, c_eps,
            std=sigma, noise=noise if sigma > 0.0 else None,
        )
        return SchedulerOutput(prev, x0)


class FusedDDPMScheduler(DDPMScheduler):
    """`DDPMScheduler` whose `step` runs the fused kernel on CUDA tensors (backend "auto")."""

    def __init__(self, schedule: NoiseSchedule | None = None, prediction_type: str = "epsilon",
                 backend: str = "auto"):
        super().__init__(schedule, prediction_type)
        self.backend = _check_backend(backend)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
    ) -> SchedulerOutput:
        if not _use_triton(self.backend, model_output, sample):
            return super().step(model_output, timestep, sample, generator, noise=noise)
        t = int(timestep)
        s = self.schedule
        if t > 0 and noise is None:
            noise = draw_noise(sample, generator)  # as DDPMScheduler.step draws it
        std = float(s.posterior_std(t)) if t > 0 else 0.0
        prev, x0 = _op()(
            model_output, sample, self.prediction_type, "ddpm",
            float(s.sqrt_alphas_cumprod[t]), float(s.sqrt_one_minus_alphas_cumprod[t]),
            float(s.posterior_mean_coef1[t]), float(s.posterior_mean_coef2[t]),
            std=std, noise=noise if t > 0 else None,
        )
        return SchedulerOutput(prev, x0)


def make_scheduler(
    kind: str,
    num_inference_steps: int | None,
    prediction_type: str = "epsilon",
    backend: str = "auto",
    schedule: NoiseSchedule | None = None,
    eta: float = 0.0,
):
    """The evaluation code's sampler factory: "ddpm" (all T ancestral steps) or "ddim" (K steps,
    `eta` as `DDIMScheduler`; "ddpm" takes only eta = 0).

    Returns a FusedDDPMScheduler / FusedDDIMScheduler with `set_timesteps` already called; its
    `step` uses the Triton kernel on CUDA tensors when backend is "auto" (or always with
    "triton"), the core torch step otherwise.
    """
    kind = str(kind).lower()
    if kind == "ddpm":
        if eta:
            raise ValueError("eta is a DDIM setting; the ancestral DDPM sampler has none")
        sch = FusedDDPMScheduler(schedule, prediction_type, backend)
        sch.set_timesteps(num_inference_steps)
    elif kind == "ddim":
        sch = FusedDDIMScheduler(schedule, prediction_type, backend, eta=eta)
        if num_inference_steps is None:
            raise ValueError("the DDIM sampler needs num_inference_steps")
        sch.set_timesteps(num_inference_steps)
    else:
        raise ValueError(f"kind must be 'ddpm' or 'ddim', got {kind!r}")
    return sch
