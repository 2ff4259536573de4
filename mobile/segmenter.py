"""The whole few-step segmenter as one module: what the phone runs.

``FewStepSegmenter(net, steps=K, ensemble=N)`` takes an image batch and the initial noise and
returns ``(mean, std)``, exactly as :func:`edgeseg.diffusion.sample_masks` with a
:class:`~edgeseg.diffusion.DDIMScheduler` does on the same noise:

* the K DDIM steps (eta = 0, trailing timesteps, previous timestep from the chosen list) are a
  Python loop unrolled when traced; their coefficients are float constants;
* the time embeddings of the K timesteps are computed once here (fp32, eager) and stored as
  buffers, so the exported graph holds no sin/cos/arange of constant inputs;
* the ensemble is a batch dimension: the image is repeated N times (image b occupies rows
  b*N .. b*N+N-1, as ``repeat_interleave``), the noise is ``B*N x 1 x H x W``;
* outputs: ``mean`` (B x 1 x H x W) is the ensemble average of the final x0 in **[-1, 1]**,
  threshold it at **0** for the mask (``(mean + 1) / 2`` is a [0, 1] soft mask, threshold 0.5);
  ``std`` (B x 1 x H x W, population std over the ensemble, in [0, 1]) is the uncertainty map.

Reductions over the ensemble are written as permute + mean over the last two dims so XNNPACK
takes them (see fold.py).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from edgeseg.diffusion import DDIMScheduler, NoiseSchedule

__all__ = ["FewStepSegmenter", "ddim_plan"]


def ddim_plan(steps: int, schedule: NoiseSchedule | None = None) -> list[tuple[int, tuple[float, float, float, float]]]:
    """[(t, (sqrt(abar_t), sqrt(1-abar_t), sqrt(abar_prev), sqrt(1-abar_prev))), ...] for K steps."""
    sch = DDIMScheduler(schedule)
    sch.set_timesteps(steps)
    return [(int(t), sch.step_coefficients(int(t))) for t in sch.timesteps.tolist()]


class FewStepSegmenter(nn.Module):
    """K unrolled DDIM steps of a DermoSegDiff network with an N-member ensemble as batch."""

    def __init__(self, net: nn.Module, steps: int, ensemble: int, prediction_type: str | None = None,
                 schedule: NoiseSchedule | None = None, copy_per_step: bool = False):
        super().__init__()
        if steps < 1 or ensemble < 1:
            raise ValueError(f"steps and ensemble must be >= 1, got {steps}, {ensemble}")
        self.net = net
        self.steps, self.ensemble = int(steps), int(ensemble)
        self.prediction_type = prediction_type or net.preset.prediction_type
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"unknown prediction type {self.prediction_type!r}")
        self.plan = ddim_plan(self.steps, schedule)
        self.timesteps = [t for t, _ in self.plan]
        # For int8: PT2E annotates a conv only if its weight node is not yet annotated, so with one
        # shared set of weights only the first unrolled step would be quantized (the others stay
        # fp32, and their fp32 weights land in the file). Each step after the first gets its own
        # copy; quantized with the same per-channel observers, the copies are byte-identical and
        # the .pte stores them once (XNNPACK keys its constants by sha256). Each step's int32
        # conv biases still differ: they carry that step's input scale.
        self.step_nets = nn.ModuleList(copy.deepcopy(net) for _ in range(1, len(self.plan))) if copy_per_step else None
        with torch.no_grad():
            for i, (t, _) in enumerate(self.plan):
                tt = torch.tensor([t], dtype=torch.long)
                self.register_buffer(f"temb_x{i}", net.time_x(tt).detach().clone())
                self.register_buffer(f"temb_g{i}", net.time_g(tt).detach().clone())

    def _ddim_step(self, out: torch.Tensor, x: torch.Tensor, coef, last: bool) -> torch.Tensor:
        sa, s1, sa_prev, s1_prev = coef
        p = self.prediction_type
        if p == "epsilon":
            x0 = (x - s1 * out) / sa
        elif p == "sample":
            x0 = out
        else:
            x0 = sa * x - s1 * out
        x0 = x0.clamp(-1.0, 1.0)
        if last and sa_prev == 1.0 and s1_prev == 0.0:
            return x0  # sa_prev * x0 + 0 * eps: the final step lands on x0
        eps = (x - sa * x0) / s1
        return sa_prev * x0 + s1_prev * eps

    def _ensemble_mean(self, x: torch.Tensor, b: int, hw: int) -> torch.Tensor:
        # (B*N, 1, H, W) -> (B, HW, N, 1) -> mean over the last two dims: delegable
        n = self.ensemble
        xr = x.reshape(b, n, hw).permute(0, 2, 1).reshape(b, hw, n, 1)
        return xr, xr.mean(dim=(2, 3), keepdim=True)

    def forward(self, image: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = image.shape
        n = self.ensemble
        # repeat_interleave(n, 0) written as cat along channels + reshape
        g = torch.cat([image] * n, dim=1).reshape(b * n, 3, h, w) if n > 1 else image
        x = noise
        for i, (_, coef) in enumerate(self.plan):
            net = self.net if i == 0 or self.step_nets is None else self.step_nets[i - 1]
            tx, tg = getattr(self, f"temb_x{i}"), getattr(self, f"temb_g{i}")
            out = net.denoise(x, g, tx, tg)
            x = self._ddim_step(out, x, coef, last=i == len(self.plan) - 1)
        xr, mean = self._ensemble_mean(x, b, h * w)
        d = xr - mean
        std = torch.sqrt((d * d).mean(dim=(2, 3), keepdim=True))
        return mean.reshape(b, 1, h, w), std.reshape(b, 1, h, w)
