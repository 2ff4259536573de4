"""DDPM noise schedule, training targets, and the two samplers (diffusers-shaped schedulers).

Schedule (the paper's): T = 250, betas linear 4e-4 .. 0.08, float32 as the reference.
What the network predicts is a setting with diffusers' names:
  "epsilon"      the noise (the paper),
  "sample"       x0, the clean mask,
  "v_prediction" v = sqrt(abar) * eps - sqrt(1 - abar) * x0.
Both samplers predict x0 from the network output, clip it to [-1, 1] (masks live there), and
re-derive eps from the clipped x0, as the reference DDPM code does.

Both schedulers take the same call, diffusers' shape:
  step(model_output, timestep, sample, generator=None) -> SchedulerOutput(prev_sample, pred_original_sample)
DDPM (ancestral) draws its noise from `generator`; DDIM is deterministic with eta = 0 (the
default) and draws sigma_t * z from `generator` when eta > 0. Both accept an explicit `noise=`
(keyword only) in place of the draw, for tests and golden vectors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "sample", "v_prediction")

__all__ = [
    "NoiseSchedule",
    "PREDICTION_TYPES",
    "SchedulerOutput",
    "DDPMScheduler",
    "DDIMScheduler",
    "ddim_update",
    "SamplerCore",
    "sample_masks",
    "draw_noise",
]


def _check_prediction_type(p: str) -> str:
    if p not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {p!r}")
    return p


def _gather(a: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """a[t] broadcast to `like`'s rank; t is an int or a B tensor of ints."""
    if isinstance(t, int):
        return a[t].to(like.dtype)
    out = a.to(t.device)[t.long()].to(like.dtype)
    return out.view(-1, *([1] * (like.dim() - 1)))


@dataclass
class SchedulerOutput:
    """What a scheduler step returns (diffusers' names).

    prev_sample           x_{t_prev}, the next sample of the chain,
    pred_original_sample  the x0 the step used: predicted from the network output, clipped to [-1, 1].
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def draw_noise(sample: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like `sample` (how both schedulers draw it)."""
    return torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)


@dataclass(frozen=True)
class NoiseSchedule:
    """The linear-beta DDPM schedule and the x0 / eps / v algebra shared by training and sampling."""

    num_train_timesteps: int = 250
    beta_start: float = 4e-4
    beta_end: float = 0.08

    def __post_init__(self) -> None:
        T = self.num_train_timesteps
        betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
        abar = torch.cumprod(1.0 - betas, dim=0)
        abar_prev = torch.cat([torch.ones(1), abar[:-1]])
        arrays = dict(
            betas=betas,
            alphas=1.0 - betas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=torch.sqrt(abar),
            sqrt_one_minus_alphas_cumprod=torch.sqrt(1.0 - abar),
            posterior_variance=betas * (1.0 - abar_prev) / (1.0 - abar),
            posterior_mean_coef1=betas * torch.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * torch.sqrt(1.0 - betas) / (1.0 - abar),
        )
        for k, v in arrays.items():
            object.__setattr__(self, k, v)

    @property
    def T(self) -> int:
        return self.num_train_timesteps

    def to_dict(self) -> dict:
        """What checkpoints and exports store (the schedule travels with the weights)."""
        return {"kind": "linear", "num_train_timesteps": self.num_train_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end}

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseSchedule":
        if not isinstance(d, dict) or d.get("kind", "linear") != "linear":
            raise ValueError(f"unknown noise schedule {d!r} (only 'linear' betas are implemented)")
        T, b0, b1 = int(d["num_train_timesteps"]), float(d["beta_start"]), float(d["beta_end"])
        if not (T >= 1 and 0.0 < b0 <= b1 < 1.0):
            raise ValueError(f"noise schedule out of range: T={T}, betas {b0}..{b1}")
        return cls(T, b0, b1)

    def posterior_std(self, t: int) -> torch.Tensor:
        """sqrt of the posterior variance, from the log-variance clipped as in the reference (var[0] == 0)."""
        return torch.exp(0.5 * torch.log(self.posterior_variance[t].clamp(min=1e-20)))

    # ---- forward process ---------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (t indexes the arrays directly)."""
        return _gather(self.sqrt_alphas_cumprod, t, x0) * x0 + _gather(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * noise

    def training_target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str
    ) -> torch.Tensor:
        """What the network should output for this prediction type."""
        p = _check_prediction_type(prediction_type)
        if p == "epsilon":
            return noise
        if p == "sample":
            return x0
        return _gather(self.sqrt_alphas_cumprod, t, x0) * noise - _gather(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * x0

    def to_x0_eps(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, prediction_type: str,
        clip: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by the network output, x0 clipped to [-1, 1] (unless `clip` is False:
        training losses on x0 want the raw value) and eps re-derived."""
        p = _check_prediction_type(prediction_type)
        sa = _gather(self.sqrt_alphas_cumprod, t, x_t)
        s1 = _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        x0 = predicted_x0(model_output, x_t, p, sa, s1, clip=clip)
        return x0, (x_t - sa * x0) / s1


def predicted_x0(model_output: torch.Tensor, sample: torch.Tensor, prediction_type: str, sa, s1,
                 clip: bool = True) -> torch.Tensor:
    """x0 implied by the network output at a step with (sa, s1) = (sqrt(abar_t), sqrt(1 - abar_t)),
    clipped to [-1, 1] (masks live there) unless `clip` is False."""
    if prediction_type == "epsilon":
        x0 = (sample - s1 * model_output) / sa
    elif prediction_type == "sample":
        x0 = model_output
    else:
        x0 = sa * sample - s1 * model_output
    return x0.clamp(-1.0, 1.0) if clip else x0


def ddim_update(model_output: torch.Tensor, sample: torch.Tensor, prediction_type: str, sa: float, s1: float,
                c_x0: float, c_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM update on float coefficients: (c_x0 * x0 + c_eps * eps, x0).

    (sa, s1) = (sqrt(abar_t), sqrt(1 - abar_t)); x0 is clipped to [-1, 1] and eps re-derived from
    it. Plain Python floats keep the traced graph free of tensor constants; the final step
    (c_x0 = 1, c_eps = 0) returns x0 itself, so the exported program ends on it.
    """
    x0 = predicted_x0(model_output, sample, prediction_type, sa, s1)
    if c_x0 == 1.0 and c_eps == 0.0:
        return x0, x0
    eps = (sample - sa * x0) / s1
    return c_x0 * x0 + c_eps * eps, x0


class _SchedulerBase:
    """Shared state of the two schedulers: the schedule, prediction type and chosen timesteps."""

    def __init__(self, schedule: NoiseSchedule | None = None, prediction_type: str = "epsilon"):
        self.schedule = schedule or NoiseSchedule()
        self.prediction_type = _check_prediction_type(prediction_type)
        self.timesteps = torch.arange(self.schedule.T - 1, -1, -1)
        self._prev: dict[int, int] = {}
        self._index_prev()

    def _index_prev(self) -> None:
        ts = [int(v) for v in self.timesteps]
        # The previous timestep is the next entry of the chosen list (never t - T // K).
        self._prev = {t: (ts[i + 1] if i + 1 < len(ts) else -1) for i, t in enumerate(ts)}

    def previous_timestep(self, t: int) -> int:
        return self._prev[int(t)]

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)


class DDPMScheduler(_SchedulerBase):
    """The paper's ancestral sampler: all T steps, x_{t-1} ~ q(x_{t-1} | x_t, x0_hat)."""

    def set_timesteps(self, num_inference_steps: int | None = None) -> None:
        T = self.schedule.T
        if num_inference_steps not in (None, T):
            raise ValueError(f"the ancestral DDPM sampler runs all {T} steps; use DDIMScheduler for fewer")
        self.timesteps = torch.arange(T - 1, -1, -1)
        self._index_prev()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
    ) -> SchedulerOutput:
        """x_{t-1} = coef1_t x0 + coef2_t x_t + std_t z, z from `generator` (or `noise`); no z at t = 0."""
        t = int(timestep)
        s = self.schedule
        x0, _ = s.to_x0_eps(model_output, sample, t, self.prediction_type)
        mean = s.posterior_mean_coef1[t] * x0 + s.posterior_mean_coef2[t] * sample
        if t == 0:
            return SchedulerOutput(mean, x0)
        if noise is None:
            noise = draw_noise(sample, generator)
        return SchedulerOutput(mean + s.posterior_std(t) * noise, x0)


class DDIMScheduler(_SchedulerBase):
    """DDIM over K trailing-spaced timesteps (the first step is t = T-1); eta = 0 is deterministic.

    With eta > 0 each step adds the DDIM stochastic term (Song et al., Eq. 12/16):
        sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
        x_prev  = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t z,  z from `generator`
    (a = alphas_cumprod; a_prev = 1 past the last step, where sigma_t = 0 and nothing is drawn).
    eta = 1 is the ancestral DDPM variance on the K-step trajectory.
    """

    def __init__(self, schedule: NoiseSchedule | None = None, prediction_type: str = "epsilon", eta: float = 0.0):
        super().__init__(schedule, prediction_type)
        self.eta = self._check_eta(eta)

    @staticmethod
    def _check_eta(eta: float) -> float:
        eta = float(eta)
        if not (eta >= 0.0 and math.isfinite(eta)):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        return eta

    def set_timesteps(self, num_inference_steps: int, eta: float | None = None) -> None:
        T = self.schedule.T
        K = int(num_inference_steps)
        if not 1 <= K <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {K}")
        if eta is not None:
            self.eta = self._check_eta(eta)
        # diffusers' "trailing" spacing; K need not divide T.
        # [:K]: a float step can leave one extra entry near 0 (e.g. K = 61), which would become -1.
        ts = (np.round(np.arange(T, 0, -T / K)).astype(np.int64) - 1)[:K]
        self.timesteps = torch.from_numpy(ts)
        self._index_prev()
        # read once, as Python floats: a traced step (torch.export) must not read tensors
        self._coefficients = {(int(t), self.eta): self._update_coefficients(int(t)) for t in ts}

    def step_coefficients(self, t: int) -> tuple[float, float, float, float]:
        """(sqrt(abar_t), sqrt(1-abar_t), sqrt(abar_prev), sqrt(1-abar_prev)) for this step."""
        s = self.schedule
        t_prev = self.previous_timestep(t)
        a_prev = s.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0)
        return (
            float(s.sqrt_alphas_cumprod[t]),
            float(s.sqrt_one_minus_alphas_cumprod[t]),
            float(torch.sqrt(a_prev)),
            float(torch.sqrt(1.0 - a_prev)),
        )

    def update_coefficients(self, t: int) -> tuple[float, float, float, float, float]:
        """(sa, s1, c_x0, c_eps, sigma): x_prev = c_x0 * x0 + c_eps * eps + sigma * z at this step,
        with (sa, s1) = (sqrt(abar_t), sqrt(1-abar_t)) for the x0 / eps algebra.

        eta = 0: exactly `step_coefficients` and sigma = 0 (the deterministic step, bit for bit)."""
        cached = getattr(self, "_coefficients", {}).get((int(t), self.eta))
        return cached if cached is not None else self._update_coefficients(int(t))

    def _update_coefficients(self, t: int) -> tuple[float, float, float, float, float]:
        sa, s1, sa_prev, s1_prev = self.step_coefficients(t)
        if self.eta == 0.0:
            return sa, s1, sa_prev, s1_prev, 0.0
        s = self.schedule
        t_prev = self.previous_timestep(t)
        a_t = float(s.alphas_cumprod[t])
        a_prev = float(s.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
        sigma = self.eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t)) * math.sqrt(max(1.0 - a_t / a_prev, 0.0))
        c_eps = math.sqrt(max(1.0 - a_prev - sigma * sigma, 0.0))
        return sa, s1, sa_prev, c_eps, sigma

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
    ) -> SchedulerOutput:
        sa, s1, c_x0, c_eps, sigma = self.update_coefficients(int(timestep))
        prev, x0 = ddim_update(model_output, sample, self.prediction_type, sa, s1, c_x0, c_eps)
        if sigma > 0.0:
            if noise is None:
                noise = draw_noise(sample, generator)
            prev = prev + sigma * noise
        return SchedulerOutput(prev, x0)


class SamplerCore(nn.Module):
    """The sampling loop: image batch + initial noise -> (mean, std) over an ensemble of N.

    The one loop every inference runs (`edgeseg.Segmenter`, evaluation, the exported phone
    program): for each of the scheduler's timesteps, the network's prediction, then
    ``scheduler.step``. The ensemble is a batch dimension (image b occupies rows b*N .. b*N+N-1,
    as ``repeat_interleave``); `noise` is the initial x_T, ``B*N x 1 x H x W``.

    * A DermoSegDiff network (one with ``denoise``) gets its time embeddings computed once here
      and stored as buffers, so a traced graph holds no sin/cos of constant inputs; any other
      ``net(x_t, g, t)`` callable is called with the timestep batch.
    * ``mean`` (B x 1 x H x W) is the ensemble average of the final x0 in [-1, 1]: threshold it at
      0 for the mask; ``std`` is the population spread over the ensemble, in [0, 1].
    * Tensor ops only on the traced path (concatenation instead of ``repeat_interleave``,
      reductions over the innermost dims), so XNNPACK takes all of it.
    """

    def __init__(self, net: Callable, scheduler, ensemble: int = 1):
        super().__init__()
        if int(ensemble) < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        self.net = net
        self.scheduler = scheduler
        self.ensemble = int(ensemble)
        self.timesteps = [int(t) for t in scheduler.timesteps.tolist()]
        self.step_nets: nn.ModuleList | None = None
        self._embedded = callable(getattr(net, "denoise", None))
        if self._embedded:
            p = next(net.parameters())
            with torch.no_grad():
                for i, t in enumerate(self.timesteps):
                    tt = torch.tensor([t], dtype=torch.long, device=p.device)
                    self.register_buffer(f"temb_x{i}", net.time_x(tt).detach().clone(), persistent=False)
                    self.register_buffer(f"temb_g{i}", net.time_g(tt).detach().clone(), persistent=False)

    def untie_steps(self) -> "SamplerCore":
        """Give each step after the first its own copy of the network (for int8 export).

        PT2E annotates a conv only if its weight node is not annotated yet, so with one shared
        set of weights only the first unrolled step would be quantized. Quantized with the same
        observers, the copies are byte-identical and the .pte stores them once.
        """
        import copy

        self.step_nets = nn.ModuleList(copy.deepcopy(self.net) for _ in self.timesteps[1:])
        return self

    def _predict(self, i: int, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        net = self.net if i == 0 or self.step_nets is None else self.step_nets[i - 1]
        if self._embedded:
            return net.denoise(x, g, getattr(self, f"temb_x{i}"), getattr(self, f"temb_g{i}"))
        t = torch.full((x.shape[0],), self.timesteps[i], device=x.device, dtype=torch.long)
        return net(x, g, t)

    def forward(self, image: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None = None,
                progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = image.shape
        n = self.ensemble
        g = torch.cat([image] * n, dim=1).reshape(b * n, image.shape[1], h, w) if n > 1 else image
        x = noise.to(image.device, image.dtype)
        for i, t in enumerate(self.timesteps):
            x = self.scheduler.step(self._predict(i, x, g), t, x, generator=generator).prev_sample
            if progress is not None:
                progress(i + 1, len(self.timesteps))
        # (B*N, 1, H, W) -> (B, HW, N, 1): ensemble statistics as reductions over the last two dims
        xr = x.reshape(b, n, h * w).permute(0, 2, 1).reshape(b, h * w, n, 1)
        mean = xr.mean(dim=(2, 3), keepdim=True)
        d = xr - mean
        std = torch.sqrt((d * d).mean(dim=(2, 3), keepdim=True))
        return mean.reshape(b, 1, h, w), std.reshape(b, 1, h, w)


@torch.no_grad()
def sample_masks(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    scheduler: DDPMScheduler | DDIMScheduler,
    ensemble: int = 1,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment a batch of images with :class:`SamplerCore`: (mean, std) over the ensemble.

    `noise` (B*N x 1 x H x W) fixes the initial x_T for reproducible runs (drawn from `generator`
    when None); `generator` also feeds the schedulers' own draws (DDPM, DDIM with eta > 0). Any
    scheduler with the shared `step(model_output, timestep, sample, generator)` call works here.
    """
    B, _, H, W = image.shape
    if noise is None:
        noise = torch.randn((B * ensemble, 1, H, W), generator=generator, device=image.device)
    return SamplerCore(model, scheduler, ensemble)(image, noise, generator=generator, progress=progress)
