"""The Triton kernels of `fused_distill_loss` (see that module for the maths and the launch).

This module imports Triton at its top, so `fused_distill_loss._kernels()` imports it only on
first use: importing `edgeseg.kernels` never needs Triton.

Forward: grid (B, ceil(N / BLOCK)); each program reads its block of the four maps once, forms
both attentions in-register from one log2 (`exp2(t_p * log2(d))`), and writes five partial sums
(sum d2, sum A_b d2, n_edge, sum edge d2_kd, sum body d2_kd) to a small [B, nblk, 5] buffer.
A single-program finalize kernel reduces that buffer in a fixed order (deterministic: no
atomics) into the four scalars and the per-sample edge counts. Backward: one more pass that
recomputes the attentions and writes d(loss)/d(pred_s) in pred_s's dtype.

`eps` is the guard against empty edge / body regions (`fused_distill_loss._EPS_COUNT`).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _block(N, BLOCK: tl.constexpr):
    """This program's sample `b`, block `blk`, offsets in the sample, their mask, sample base."""
    b = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    return b, blk, offs, offs < N, b.to(tl.int64) * N


@triton.jit
def _load_maps(s_ptr, te_ptr, y_ptr, d_ptr, base, offs, m):
    """The block of student, teacher, target (float32) and distance (1.0 past the end)."""
    s = tl.load(s_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    te = tl.load(te_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + base + offs, mask=m, other=1.0).to(tl.float32)
    return s, te, y, d


@triton.jit
def _attentions(d, b, t_ptr, tp_kd_ptr, tp_b_ptr, T):
    """A(d, t; gamma_kd) and A(d, t; gamma_b): `d ** t_p` with t_p gathered from the tables."""
    tb = tl.load(t_ptr + b)
    t_ok = (tb >= 0) & (tb <= T)  # memory safety only: t must lie in [0, T]
    tp_kd = tl.load(tp_kd_ptr + tb, mask=t_ok, other=0.0)
    tp_b = tl.load(tp_b_ptr + tb, mask=t_ok, other=0.0)
    # d ** tp in-register, one log2 for both exponents; 0 ** tp = 0 for tp > 0, 0 ** 0 = 1
    # (d is a normalised distance in [0, 1]; d < 0 would be NaN in torch.pow, 0/1 here).
    lg = tl.log2(tl.where(d > 0.0, d, 1.0))
    a_kd = tl.where(d > 0.0, tl.exp2(tp_kd * lg), (tp_kd <= 0.0).to(tl.float32))
    a_b = tl.where(d > 0.0, tl.exp2(tp_b * lg), (tp_b <= 0.0).to(tl.float32))
    return a_kd, a_b


@triton.jit
def _distill_fwd_partials(
    s_ptr, te_ptr, y_ptr, d_ptr, t_ptr, tp_kd_ptr, tp_b_ptr, part_ptr,
    N, NBLK, T, tau,
    BLOCK: tl.constexpr,
):
    b, blk, offs, m, base = _block(N, BLOCK)
    s, te, y, d = _load_maps(s_ptr, te_ptr, y_ptr, d_ptr, base, offs, m)
    a_kd, a_b = _attentions(d, b, t_ptr, tp_kd_ptr, tp_b_ptr, T)
    dn = s - y
    d2n = dn * dn
    dk = s - te
    d2k = dk * dk
    edge = (a_kd > tau) & m
    out = part_ptr + (b.to(tl.int64) * NBLK + blk) * 5
    tl.store(out + 0, tl.sum(d2n, axis=0))
    tl.store(out + 1, tl.sum(a_b * d2n, axis=0))
    tl.store(out + 2, tl.sum(edge.to(tl.float32), axis=0))
    tl.store(out + 3, tl.sum(tl.where(edge, d2k, 0.0), axis=0))
    tl.store(out + 4, tl.sum(tl.where(edge, 0.0, d2k), axis=0))


@triton.jit
def _sum_partials(part_ptr, ob, mb, NBLK, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """The five partial sums of samples `ob` over all their blocks, in a fixed order."""
    s_n = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_a = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_c = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_e = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_b = tl.zeros([BLOCK_B], dtype=tl.float32)
    for k0 in range(0, NBLK, BLOCK_K):
        ok = k0 + tl.arange(0, BLOCK_K)
        mk = mb[:, None] & (ok < NBLK)[None, :]
        p = part_ptr + (ob[:, None].to(tl.int64) * NBLK + ok[None, :]) * 5
        s_n += tl.sum(tl.load(p + 0, mask=mk, other=0.0), axis=1)
        s_a += tl.sum(tl.load(p + 1, mask=mk, other=0.0), axis=1)
        s_c += tl.sum(tl.load(p + 2, mask=mk, other=0.0), axis=1)
        s_e += tl.sum(tl.load(p + 3, mask=mk, other=0.0), axis=1)
        s_b += tl.sum(tl.load(p + 4, mask=mk, other=0.0), axis=1)
    return s_n, s_a, s_c, s_e, s_b


@triton.jit
def _distill_fwd_finalize(
    part_ptr, cnt_ptr, out_ptr,
    B, NBLK, n_f, bn_f, b_f, lambda_e, lambda_b, w0, w1, w2, eps,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_n = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_e = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        ob = b0 + tl.arange(0, BLOCK_B)
        mb = ob < B
        s_n, s_a, s_c, s_e, s_b = _sum_partials(part_ptr, ob, mb, NBLK, BLOCK_B, BLOCK_K)
        tl.store(cnt_ptr + ob, s_c, mask=mb)
        # IEEE division (as torch) rather than the approximate div.full.f32 of `/`
        l_edge = tl.div_rn(s_e, s_c + eps)
        l_body = tl.div_rn(s_b, (n_f - s_c) + eps)
        acc_n += s_n
        acc_a += s_a
        acc_e += tl.where(mb, l_edge, 0.0)
        acc_b += tl.where(mb, l_body, 0.0)
    l2 = tl.div_rn(tl.sum(acc_n, axis=0), bn_f)
    bd = tl.div_rn(tl.sum(acc_a, axis=0), bn_f)
    efkd = lambda_e * tl.div_rn(tl.sum(acc_e, axis=0), b_f) + lambda_b * tl.div_rn(tl.sum(acc_b, axis=0), b_f)
    total = w0 * l2 + w1 * efkd + w2 * bd
    tl.store(out_ptr + 0, total)
    tl.store(out_ptr + 1, l2)
    tl.store(out_ptr + 2, efkd)
    tl.store(out_ptr + 3, bd)


@triton.jit
def _term_weights(g_tot_ptr, g_l2_ptr, g_kd_ptr, g_bd_ptr, w0, w1, w2,
                  HAS_G_TOT: tl.constexpr, HAS_G_L2: tl.constexpr, HAS_G_KD: tl.constexpr,
                  HAS_G_BD: tl.constexpr):
    """Effective weights of the three terms: total's weight times g_total plus each term's
    own incoming gradient (when a term itself was back-propagated)."""
    g_tot = 0.0
    if HAS_G_TOT:
        g_tot = tl.load(g_tot_ptr).to(tl.float32)
    W0 = g_tot * w0
    W1 = g_tot * w1
    W2 = g_tot * w2
    if HAS_G_L2:
        W0 += tl.load(g_l2_ptr).to(tl.float32)
    if HAS_G_KD:
        W1 += tl.load(g_kd_ptr).to(tl.float32)
    if HAS_G_BD:
        W2 += tl.load(g_bd_ptr).to(tl.float32)
    return W0, W1, W2


@triton.jit
def _distill_bwd(
    s_ptr, te_ptr, y_ptr, d_ptr, t_ptr, tp_kd_ptr, tp_b_ptr, cnt_ptr,
    g_tot_ptr, g_l2_ptr, g_kd_ptr, g_bd_ptr, grad_ptr,
    N, T, n_f, tau, inv_bn, inv_b, lambda_e, lambda_b, w0, w1, w2, eps,
    HAS_G_TOT: tl.constexpr, HAS_G_L2: tl.constexpr, HAS_G_KD: tl.constexpr, HAS_G_BD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b, blk, offs, m, base = _block(N, BLOCK)
    W0, W1, W2 = _term_weights(g_tot_ptr, g_l2_ptr, g_kd_ptr, g_bd_ptr, w0, w1, w2,
                               HAS_G_TOT, HAS_G_L2, HAS_G_KD, HAS_G_BD)
    n_e = tl.load(cnt_ptr + b)
    c_n = 2.0 * W0 * inv_bn
    c_a = 2.0 * W2 * inv_bn
    c_e = 2.0 * W1 * lambda_e * inv_b / (n_e + eps)
    c_b = 2.0 * W1 * lambda_b * inv_b / ((n_f - n_e) + eps)
    s, te, y, d = _load_maps(s_ptr, te_ptr, y_ptr, d_ptr, base, offs, m)
    a_kd, a_b = _attentions(d, b, t_ptr, tp_kd_ptr, tp_b_ptr, T)
    edge = a_kd > tau
    g = (s - y) * (c_n + c_a * a_b) + (s - te) * tl.where(edge, c_e, c_b)
    tl.store(grad_ptr + base + offs, g.to(grad_ptr.dtype.element_ty), mask=m)
