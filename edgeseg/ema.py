"""Exponential moving average of a network's weights (the weights a run ships)."""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of weights; copies the online weights until `start` steps."""

    def __init__(self, model: nn.Module, beta: float, start: int):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.beta, self.start = beta, start

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        dst, src = [], []
        for d, s in zip(self.model.state_dict().values(), model.state_dict().values()):
            if d.is_floating_point():
                dst.append(d)
                src.append(s.detach())
            else:  # an integer buffer (BatchNorm's batch count) is copied, never averaged
                d.copy_(s)
        if step <= self.start:
            torch._foreach_copy_(dst, src)
        else:
            torch._foreach_lerp_(dst, src, 1.0 - self.beta)
