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
                 schedule: NoiseSchedule | None = None, per_step_bias: bool = False):
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
        # int8 XNNPACK needs each conv's int32 bias quantized with ITS input scale
        # (bias_scale = input_scale * weight_scale); the unrolled steps share weights but see
        # different input ranges, so every step after the first gets its own copy of the biases.
        self.per_step_bias = bool(per_step_bias)
        self._bias_owners = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
                             and m.bias is not None]
        self.step_biases = nn.ModuleList()
        if self.per_step_bias:
            for _ in range(1, len(self.plan)):
                self.step_biases.append(nn.ParameterList(
                    [nn.Parameter(m.bias.detach().clone(), requires_grad=False) for m in self._bias_owners]))
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
        originals = [m.bias for m in self._bias_owners]
        try:
            for i, (_, coef) in enumerate(self.plan):
                if self.per_step_bias and i > 0:
                    for m, b_i in zip(self._bias_owners, self.step_biases[i - 1]):
                        m.bias = b_i
                tx, tg = getattr(self, f"temb_x{i}"), getattr(self, f"temb_g{i}")
                out = self.net.denoise(x, g, tx, tg)
                x = self._ddim_step(out, x, coef, last=i == len(self.plan) - 1)
        finally:
            for m, b0 in zip(self._bias_owners, originals):
                m.bias = b0
        xr, mean = self._ensemble_mean(x, b, h * w)
        d = xr - mean
        std = torch.sqrt((d * d).mean(dim=(2, 3), keepdim=True))
        return mean.reshape(b, 1, h, w), std.reshape(b, 1, h, w)
