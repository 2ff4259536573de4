"""Fused student objective (L2 + EFKD + boundary) in one pass over the maps, plus its backward.

Liger-Kernel layout: the Triton kernels (top-level `@triton.jit` functions in
`_distill_loss_kernels`, which `_kernels()` imports on first use, so importing this module never
needs Triton), their launch functions, the `torch.autograd.Function` and the plain-torch
reference (`fused_distill_loss_torch`, self-contained: the same torch expressions as
`edgeseg.losses`, which tests/test_kernels.py checks it against) side by side. Like all of
`edgeseg.kernels`, this module imports nothing from the rest of `edgeseg`.

Semantics are those of `edgeseg.losses` (and of the authors' code, tests/golden/README.md) exactly:

    l2       = mean((pred_s - target)^2)
    boundary = mean(A(d, t; gamma_b) * (pred_s - target)^2)
    efkd     = lambda_e * mean_b(sum_edge d2_kd / (n_edge + 1e-8))
             + lambda_b * mean_b(sum_body d2_kd / (n_body + 1e-8)),   d2_kd = (pred_s - pred_t)^2
    total    = w0 * l2 + w1 * efkd + w2 * boundary

with A = d ** t_p (t_p as `edgeseg.boundary.t_power`, of which `t_power` here is a copy:
float64 from the integer t, rounded to float32; 0 ** 0 = 1), edge = A(d, t; gamma_kd) > tau in
float32 (ties go to body), empty regions adding 0 but still counted in the batch mean.
Everything is computed in float32 whatever the input dtype.
"""
from __future__ import annotations

import functools
from typing import Dict, Tuple

import torch

from ._launch import cdiv, device_of, next_pow2, num_warps, store_dtype, use_triton

__all__ = [
    "fused_distill_loss", "fused_distill_loss_torch", "fused_distill_loss_triton", "FusedDistillLossFunction",
    "t_power",
]

_EPS_COUNT = 1e-8  # = edgeseg.losses._EPS_COUNT (tests check); the kernels take it as `eps`
_NUM_PARTIALS = 5
DEFAULT_BLOCK = 1024


# ----------------------------------------------------------------------------------------
# Triton kernels (their module is imported on first use, so `import triton` happens only then)
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _kernels():
    """(forward partials, forward finalize, backward) kernels."""
    from . import _distill_loss_kernels as k

    return k._distill_fwd_partials, k._distill_fwd_finalize, k._distill_bwd


def t_power(t: torch.Tensor, T: int, gamma: float) -> torch.Tensor:
    """Exponent t_p = (gamma * (T - t) / T) ** gamma in float64, rounded to float32.

    A copy of `edgeseg.boundary.t_power` (the kernels import nothing from the core);
    tests/test_kernels.py checks the two agree bit for bit."""
    t64 = t.to(torch.float64)
    return ((gamma * (T - t64)) / T).pow(gamma).to(torch.float32)


def _attention(d: torch.Tensor, t: torch.Tensor, T: int, gamma: float) -> torch.Tensor:
    """`d ** t_p` per sample, 0 ** 0 = 1 (as `edgeseg.boundary.attention`)."""
    tp = t_power(t.to(d.device), T, gamma).view(-1, *([1] * (d.dim() - 1)))
    return d.float().pow(tp)


# t_p for every integer t in [0, T], per (T, gamma, device): the kernels gather t_p[t_b], so the
# exponent is bit-identical to `t_power` (= `edgeseg.boundary.t_power`) and costs no launches per step.
_TP_TABLES: Dict[tuple, torch.Tensor] = {}


def _tp_table(T: int, gamma: float, device: torch.device) -> torch.Tensor:
    key = (int(T), float(gamma), str(device))
    tab = _TP_TABLES.get(key)
    if tab is None:
        tab = t_power(torch.arange(int(T) + 1, dtype=torch.int64), int(T), float(gamma)).contiguous().to(device)
        _TP_TABLES[key] = tab
    return tab


def _as_t(t, B: int, device: torch.device) -> torch.Tensor:
    if isinstance(t, int):
        return torch.full((B,), t, dtype=torch.int64, device=device)
    t = torch.as_tensor(t)
    if t.dim() == 0:
        t = t.expand(B)
    if t.numel() != B:
        raise ValueError(f"t must hold one timestep per sample ({B}), got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.int64).contiguous()


def _check_maps(eps_s, eps_t, noise, d) -> Tuple[int, int]:
    shape = eps_s.shape
    for name, x in (("eps_t", eps_t), ("noise", noise), ("d", d)):
        if x.shape != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} like eps_s")
        if x.device != eps_s.device:
            raise ValueError(f"{name} is on {x.device}, eps_s on {eps_s.device}")
    if eps_s.dim() < 1 or eps_s.shape[0] == 0 or eps_s.numel() == 0:
        raise ValueError("fused_distill_loss needs a non-empty batch")
    B = int(shape[0])
    N = eps_s.numel() // B
    if N >= 2**24:
        raise ValueError("per-sample maps above 2**24 pixels are not supported (float32 counts)")
    return B, N


# ----------------------------------------------------------------------------------------
# launch functions
# ----------------------------------------------------------------------------------------
def _launch_forward(s, te, y, dd, tt, tp_kd, tp_b, T, tau, lambda_e, lambda_b, w0, w1, w2, block):
    """Run the forward kernels; returns (out = [total, l2, efkd, boundary], per-sample edge counts)."""
    fwd_partials, fwd_finalize, _ = _kernels()
    B = int(s.shape[0])
    N = s.numel() // B
    dev = s.device
    nblk = cdiv(N, block)
    part = torch.empty((B, nblk, _NUM_PARTIALS), device=dev, dtype=torch.float32)
    counts = torch.empty((B,), device=dev, dtype=torch.float32)
    out = torch.empty((4,), device=dev, dtype=torch.float32)
    block_b = min(64, max(2, next_pow2(B)))
    block_k = min(64, max(2, next_pow2(nblk)))
    with device_of(s):
        fwd_partials[(B, nblk)](
            s, te, y, dd, tt, tp_kd, tp_b, part, N, nblk, int(T), float(tau),
            BLOCK=block, num_warps=num_warps(block),
        )
        fwd_finalize[(1,)](
            part, counts, out, B, nblk, float(N), float(B * N), float(B),
            float(lambda_e), float(lambda_b), float(w0), float(w1), float(w2), _EPS_COUNT,
            BLOCK_B=block_b, BLOCK_K=block_k, num_warps=4,
        )
    return out, counts


def _launch_backward(saved, consts, grads, grad_dtype):
    """Run the backward kernel; returns d(loss)/d(eps_s) in `grad_dtype`.

    `grads` are the incoming (g_total, g_l2, g_efkd, g_boundary), some of them None."""
    _, _, bwd = _kernels()
    s, te, y, dd, tt, tp_kd, tp_b, counts = saved
    B, N, T, tau, lambda_e, lambda_b, w0, w1, w2, block = consts
    # Triton's CPU interpreter truncates fp32 -> bf16/fp16 stores instead of rounding to
    # nearest even as the GPU does; there, write fp32 and let torch round (tests only).
    grad = torch.empty(s.shape, device=s.device, dtype=store_dtype(grad_dtype))
    gs = [g.contiguous() if g is not None else None for g in grads]
    dummy = next(g for g in gs if g is not None)
    with device_of(s):
        bwd[(B, cdiv(N, block))](
            s, te, y, dd, tt, tp_kd, tp_b, counts,
            *[g if g is not None else dummy for g in gs], grad,
            N, T, float(N), tau, 1.0 / (B * N), 1.0 / B, lambda_e, lambda_b, w0, w1, w2, _EPS_COUNT,
            HAS_G_TOT=gs[0] is not None, HAS_G_L2=gs[1] is not None,
            HAS_G_KD=gs[2] is not None, HAS_G_BD=gs[3] is not None,
            BLOCK=block, num_warps=num_warps(block),
        )
    return grad.to(grad_dtype)


# ----------------------------------------------------------------------------------------
# autograd.Function
# ----------------------------------------------------------------------------------------
class FusedDistillLossFunction(torch.autograd.Function):
    """Autograd wrapper: outputs (total, l2, efkd, boundary); gradient w.r.t. eps_s only."""

    @staticmethod
    def forward(ctx, eps_s, eps_t, noise, d, t, T, tau, lambda_e, lambda_b, gamma_kd, gamma_b, w0, w1, w2, block):
        B, N = _check_maps(eps_s, eps_t, noise, d)
        dev = eps_s.device
        s, te, y, dd = (x.detach().contiguous() for x in (eps_s, eps_t, noise, d))
        tt = _as_t(t, B, dev)
        if not tt.is_cuda and tt.numel() and not bool(((tt >= 0) & (tt <= int(T))).all()):
            raise ValueError(f"t must lie in [0, {int(T)}]")  # (not checked on CUDA: no host sync)
        tp_kd = _tp_table(T, gamma_kd, dev)
        tp_b = _tp_table(T, gamma_b, dev)
        block = int(block) if block else min(DEFAULT_BLOCK, max(16, next_pow2(N)))
        out, counts = _launch_forward(s, te, y, dd, tt, tp_kd, tp_b, T, tau, lambda_e, lambda_b, w0, w1, w2, block)
        ctx.save_for_backward(s, te, y, dd, tt, tp_kd, tp_b, counts)
        ctx.consts = (B, N, int(T), float(tau), float(lambda_e), float(lambda_b), float(w0), float(w1), float(w2), block)
        ctx.grad_dtype = eps_s.dtype
        ctx.set_materialize_grads(False)
        return out[0], out[1], out[2], out[3]

    @staticmethod
    def backward(ctx, g_tot, g_l2, g_kd, g_bd):
        n_none = 14
        if not ctx.needs_input_grad[0] or all(g is None for g in (g_tot, g_l2, g_kd, g_bd)):
            return (None,) * (n_none + 1)
        grad = _launch_backward(ctx.saved_tensors, ctx.consts, (g_tot, g_l2, g_kd, g_bd), ctx.grad_dtype)
        return (grad,) + (None,) * n_none


def _unpack_weights(weights):
    w = tuple(float(x) for x in weights)
    if len(w) != 3:
        raise ValueError(f"weights must be (w_l2, w_kd, w_boundary), got {weights!r}")
    return w


def fused_distill_loss_triton(
    eps_s, eps_t, noise, d, t, T, tau=0.6, lambda_e=5.0, lambda_b=2.0, gamma_kd=1.5, gamma_b=0.2,
    weights=(1.0, 0.25, 0.25), block: int | None = None,
):
    """The Triton path (any device Triton can run on, CPU included under TRITON_INTERPRET=1).

    `block` overrides the per-program tile (a power of two; tests use small ones to exercise
    many blocks and ragged tails).
    """
    w0, w1, w2 = _unpack_weights(weights)
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    total, l2, efkd, bd = FusedDistillLossFunction.apply(
        eps_s, eps_t, noise, d, t, int(T), tau, lambda_e, lambda_b, gamma_kd, gamma_b, w0, w1, w2, block
    )
    return total, {"l2": l2, "efkd": efkd, "boundary": bd}


# ----------------------------------------------------------------------------------------
# plain-torch reference
# ----------------------------------------------------------------------------------------
def fused_distill_loss_torch(
    eps_s, eps_t, noise, d, t, T, tau=0.6, lambda_e=5.0, lambda_b=2.0, gamma_kd=1.5, gamma_b=0.2,
    weights=(1.0, 0.25, 0.25),
):
    """The reference in plain torch: term by term the expressions of `edgeseg.losses`
    (`l2_loss`, `boundary_loss`, `efkd_loss`, combined as `student_objective`), bit for bit."""
    w0, w1, w2 = _unpack_weights(weights)
    B, _ = _check_maps(eps_s, eps_t, noise, d)
    tt = _as_t(t, B, d.device)
    T = int(T)
    # each term's own expression (no shared subexpressions: the autograd graph, and so the
    # gradient's rounding, is that of edgeseg.losses too)
    l2 = (eps_s.float() - noise.float()).pow(2).mean()
    bd = (_attention(d, tt, T, gamma_b) * (eps_s.float() - noise.float()).pow(2)).mean()
    edge = (_attention(d, tt, T, gamma_kd) > tau).float()
    body = 1.0 - edge
    d2k = (eps_s.float() - eps_t.detach().float()).pow(2)
    dims = tuple(range(1, d2k.dim()))
    l_edge = (edge * d2k).sum(dims) / (edge.sum(dims) + _EPS_COUNT)
    l_body = (body * d2k).sum(dims) / (body.sum(dims) + _EPS_COUNT)
    k = lambda_e * l_edge.mean() + lambda_b * l_body.mean()
    total = w0 * l2 + w1 * k + w2 * bd
    return total, {"l2": l2, "efkd": k, "boundary": bd}


def fused_distill_loss(
    eps_s: torch.Tensor,
    eps_t: torch.Tensor,
    noise: torch.Tensor,
    d: torch.Tensor,
    t,
    T: int,
    tau: float = 0.6,
    lambda_e: float = 5.0,
    lambda_b: float = 2.0,
    gamma_kd: float = 1.5,
    gamma_b: float = 0.2,
    weights=(1.0, 0.25, 0.25),
    backend: str = "auto",
):
    """Student objective `w0*l2 + w1*efkd + w2*boundary`; returns (total, {"l2","efkd","boundary"}).

    Arguments (all maps B x ... of one shape, on one device, any of fp32 / bf16 / fp16):
      eps_s  the student's prediction (gradient flows here only),
      eps_t  the teacher's prediction (detached),
      noise  the training target: the noise for "epsilon" prediction, x0 for "sample", v for
             "v_prediction" (no gradient),
      d      the normalised boundary distance map in [0, 1] (`edgeseg.boundary.distance_map`),
      t      the B integer timesteps in [0, T] (tensor or int), T the number of train steps.
    backend: "triton" (fused kernels), "torch" (the plain-torch reference), "auto" (Triton when the maps
    are CUDA tensors and Triton imports, torch otherwise). Scalars are float32 tensors.
    """
    if use_triton(backend, eps_s, eps_t, noise, d):
        return fused_distill_loss_triton(
            eps_s, eps_t, noise, d, t, T, tau, lambda_e, lambda_b, gamma_kd, gamma_b, weights
        )
    return fused_distill_loss_torch(eps_s, eps_t, noise, d, t, T, tau, lambda_e, lambda_b, gamma_kd, gamma_b, weights)
