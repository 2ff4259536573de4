"""The paper's losses in plain torch (the reference for the fused Triton kernel).

All are vectorised over the batch: no Python loop over samples, no host round trips.
`pred` and `target` are whatever the prediction type makes them (eps, x0 or v); with
"epsilon" these are exactly the paper's equations. `d` is the boundary distance map
(B x 1 x H x W, from the data workers), `t` the B integer timesteps.
"""
from __future__ import annotations

import torch

from edgeseg.boundary import attention

__all__ = [
    "l2_loss", "boundary_loss", "efkd_loss", "global_kd_loss", "student_objective", "teacher_objective",
    "x0_segmentation_loss", "feature_kd_loss",
]

_EPS_COUNT = 1e-8  # the reference's guard against empty edge/body regions


def l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((pred - target)^2)."""
    return (pred.float() - target.float()).pow(2).mean()


def boundary_loss(
    pred: torch.Tensor, target: torch.Tensor, d: torch.Tensor, t: torch.Tensor, T: int, gamma: float = 0.2
) -> torch.Tensor:
    """Paper Eq. 1: mean over all pixels of A(d, t; gamma) * (pred - target)^2."""
    w = attention(d, t, T, gamma)
    return (w * (pred.float() - target.float()).pow(2)).mean()


def global_kd_loss(pred_s: torch.Tensor, pred_t: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 2: mean((student - teacher)^2), teacher detached."""
    return (pred_s.float() - pred_t.detach().float()).pow(2).mean()


def efkd_loss(
    pred_s: torch.Tensor,
    pred_t: torch.Tensor,
    d: torch.Tensor,
    t: torch.Tensor,
    T: int,
    tau: float = 0.6,
    lambda_e: float = 5.0,
    lambda_b: float = 2.0,
    gamma: float = 1.5,
) -> torch.Tensor:
    """Edge-focused KD (Eq. 3-7): per-sample area-normalised edge and body terms, batch mean.

    Edge pixels: A(d, t; 1.5) > tau in float32 (ties go to body). An empty region adds 0 but
    still counts in the mean over the batch.
    """
    a = attention(d, t, T, gamma)
    edge = (a > tau).float()
    body = 1.0 - edge
    d2 = (pred_s.float() - pred_t.detach().float()).pow(2)
    dims = tuple(range(1, d2.dim()))
    l_edge = (edge * d2).sum(dims) / (edge.sum(dims) + _EPS_COUNT)
    l_body = (body * d2).sum(dims) / (body.sum(dims) + _EPS_COUNT)
    return lambda_e * l_edge.mean() + lambda_b * l_body.mean()


def x0_segmentation_loss(x0: torch.Tensor, mask: torch.Tensor, sharpness: float = 4.0) -> torch.Tensor:
    """Dice + BCE on the predicted mask x0 (unclipped, masks in {-1, 1}): the discriminative
    segmentation loss next to the diffusion loss. x0 is read as the logit ``sharpness * x0``, so
    the segmenter's threshold (x0 > 0) is the decision boundary and saturated pixels keep a gradient."""
    logits = sharpness * x0.float()
    y = (mask.float() > 0).float()
    p = torch.sigmoid(logits)
    dims = tuple(range(1, p.dim()))
    soft_dice = (2 * (p * y).sum(dims) + 1) / (p.sum(dims) + y.sum(dims) + 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    return bce + (1 - soft_dice).mean()


def feature_kd_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Feature distillation: over the feature maps both networks have (same name, same shape), the
    mean of ``mean((f_s - f_t)^2) / var(f_t)``, teacher detached. Dividing by the teacher map's
    variance weighs the stages alike whatever their scale. Zero when no map is shared.
    """
    terms = []
    for k, s in student.items():
        if k in teacher and teacher[k].shape == s.shape:
            t = teacher[k].detach().float()
            terms.append((s.float() - t).pow(2).mean() / (t.var() + 1e-6))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def teacher_objective(pred, target, d, t, T, w_l2: float = 1.0, w_boundary: float = 0.25):
    """Teacher: 1.0 L2 + 0.25 boundary. Returns (total, {"l2", "boundary"})."""
    l2 = l2_loss(pred, target)
    bd = boundary_loss(pred, target, d, t, T)
    return w_l2 * l2 + w_boundary * bd, {"l2": l2, "boundary": bd}


def student_objective(
    pred_s,
    pred_t,
    target,
    d,
    t,
    T,
    kd: str = "efkd",
    tau: float = 0.6,
    lambda_e: float = 5.0,
    lambda_b: float = 2.0,
    weights: tuple[float, float, float] = (1.0, 0.25, 0.25),
):
    """Student: w0 L2 + w1 KD + w2 boundary, KD one of "efkd", "global", "none".

    Returns (total, {"l2", "kd", "boundary"}). Plain torch; the trainer calls the dispatching
    `edgeseg.kernels.fused_distill_loss` instead when it can.
    """
    l2 = l2_loss(pred_s, target)
    bd = boundary_loss(pred_s, target, d, t, T)
    if kd == "efkd":
        k = efkd_loss(pred_s, pred_t, d, t, T, tau, lambda_e, lambda_b)
    elif kd == "global":
        k = global_kd_loss(pred_s, pred_t)
    elif kd == "none":
        k = torch.zeros((), device=l2.device)
    else:
        raise ValueError(f"kd must be 'efkd', 'global' or 'none', got {kd!r}")
    w0, w1, w2 = weights
    return w0 * l2 + w1 * k + w2 * bd, {"l2": l2, "kd": k, "boundary": bd}
