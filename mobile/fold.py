"""Rewrite a trained network into an export-friendly copy with the same numbers.

XNNPACK (ExecuTorch's CPU delegate) and CoreML take plain convolutions, reductions over the
innermost dimensions and softmaxes over the last dimension. Four things in DermoSegDiff are not
of that shape, and left alone they cut the exported graph into many delegate calls with layout
copies between them (DESIGN.md section 8):

* ``WSConv2d`` standardises its kernel at every call: folded once into a plain ``nn.Conv2d``
  holding the standardised weights (eps 1e-5, fp32, as in training);
* ``nn.GroupNorm`` lowers to ``native_group_norm``, which XNNPACK does not take: replaced by
  :class:`ExportGroupNorm`, reshape to ``B x G x C/G x HW`` and mean / variance over the last
  two dims (XNNPACK's global average pooling), same affine parameters;
* nearest 2x upsampling followed by a 3x3 conv (the decoder's ``upsample``) lowers to
  ``upsample_nearest2d``, which XNNPACK does not take: replaced by the single equivalent
  transposed convolution (stride 2, kernel 4, padding 1), :func:`fold_upsample_conv`.

* the attention blocks split q, k, v with ``unbind`` and multiply 4-D tensors with ``@``, which
  lower to ``squeeze_copy`` and ``expand_copy`` (not delegated): replaced by
  :class:`ExportLinearAttention` / :class:`ExportAttention`, the same math on
  ``B*heads x dh x HW`` tensors with channel slices, ``bmm`` and permutes (all delegated).

Every softmax in the model is already over the last dimension (models.py), so nothing to do.
:func:`prepare_for_export` returns a deep copy; the input model is not touched. The result
equals the original to float32 rounding (tests/test_mobile.py checks 1e-5).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from edgeseg.models import Attention, LinearAttention, WSConv2d

__all__ = ["ExportGroupNorm", "ExportLinearAttention", "ExportAttention", "fold_ws_conv", "fold_upsample_conv", "prepare_for_export", "count_modules"]


class ExportGroupNorm(nn.Module):
    """GroupNorm as reshape + mean/variance over the last two dims (delegated by XNNPACK).

    Same parameters (``weight``, ``bias``) and eps as the ``nn.GroupNorm`` it replaces, so a
    state dict moves across unchanged. Variance is the biased one, as in GroupNorm.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm) -> "ExportGroupNorm":
        m = cls(gn.num_groups, gn.num_channels, gn.eps, gn.affine)
        if gn.affine:
            m.weight.data.copy_(gn.weight.detach())
            m.bias.data.copy_(gn.bias.detach())
        return m.to(gn.weight.device if gn.affine else "cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = self.num_groups
        xg = x.reshape(b, g, c // g, h * w)
        mean = xg.mean(dim=(2, 3), keepdim=True)
        d = xg - mean
        var = (d * d).mean(dim=(2, 3), keepdim=True)
        y = (d * torch.rsqrt(var + self.eps)).reshape(b, c, h, w)
        if self.weight is not None:
            y = y * self.weight.reshape(1, c, 1, 1) + self.bias.reshape(1, c, 1, 1)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


class ExportLinearAttention(nn.Module):
    """LinearAttention with slices + bmm on 3-D tensors; shares the original's submodules."""

    def __init__(self, m: LinearAttention):
        super().__init__()
        self.heads, self.dim_head, self.scale = m.heads, m.dim_head, m.scale
        self.to_qkv, self.to_out = m.to_qkv, m.to_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        hd, dh, n = self.heads, self.dim_head, h * w
        c = hd * dh
        qkv = self.to_qkv(x)
        q = qkv[:, :c].reshape(b * hd, dh, n)
        k = qkv[:, c : 2 * c].reshape(b * hd, dh, n)
        v = qkv[:, 2 * c :].reshape(b * hd, dh, n)
        q = q.transpose(1, 2).softmax(dim=-1) * self.scale  # (b hd) n dh: softmax over channels
        k = k.softmax(dim=-1)  # over positions
        context = torch.bmm(k, v.transpose(1, 2))  # (b hd) dh dh
        out = torch.bmm(q, context)  # (b hd) n dh
        return self.to_out(out.transpose(1, 2).reshape(b, c, h, w))


class ExportAttention(nn.Module):
    """Attention with slices + bmm on 3-D tensors; shares the original's submodules."""

    def __init__(self, m: Attention):
        super().__init__()
        self.heads, self.dim_head, self.scale = m.heads, m.dim_head, m.scale
        self.to_qkv, self.to_out = m.to_qkv, m.to_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        hd, dh, n = self.heads, self.dim_head, h * w
        c = hd * dh
        qkv = self.to_qkv(x)
        q = qkv[:, :c].reshape(b * hd, dh, n)
        k = qkv[:, c : 2 * c].reshape(b * hd, dh, n)
        v = qkv[:, 2 * c :].reshape(b * hd, dh, n)
        sim = torch.bmm(q.transpose(1, 2) * self.scale, k)  # (b hd) n n
        attn = sim.softmax(dim=-1)
        out = torch.bmm(attn, v.transpose(1, 2))  # (b hd) n dh
        return self.to_out(out.transpose(1, 2).reshape(b, c, h, w))


def fold_ws_conv(m: WSConv2d) -> nn.Conv2d:
    """A plain conv whose weight is the standardised weight of `m` (bias kept)."""
    conv = nn.Conv2d(
        m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
        bias=m.bias is not None, padding_mode=m.padding_mode,
    ).to(m.weight.device, m.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(m.standardized_weight())
        if m.bias is not None:
            conv.bias.copy_(m.bias)
    return conv


# k[j] = sum_d _UP[j, d] * w[d]: the 1-D taps of a stride-2, kernel-4, padding-1 transposed conv
# that equals nearest 2x upsampling followed by a 3-tap conv with padding 1.
_UP = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def fold_upsample_conv(conv: nn.Conv2d) -> nn.ConvTranspose2d:
    """ConvTranspose2d(stride 2, kernel 4, padding 1) == conv3x3(pad 1)(nearest_upsample_2x(x))."""
    if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
        raise ValueError("fold_upsample_conv needs a 3x3, stride 1, padding 1, groups 1 conv")
    w = conv.weight.detach().double()  # out, in, 3, 3
    up = _UP.to(w)
    k = torch.einsum("ad,be,oide->ioab", up, up, w)  # in, out, 4, 4 (transposed-conv layout)
    t = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, 4, stride=2, padding=1, bias=conv.bias is not None)
    t = t.to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        t.weight.copy_(k.to(conv.weight.dtype))
        if conv.bias is not None:
            t.bias.copy_(conv.bias)
    return t


def _is_nearest_up2(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Upsample) and m.mode == "nearest" and m.size is None
        and m.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0))
    )


def _rewrite(module: nn.Module, ws: bool, gn: bool, up: bool, attn: bool) -> None:
    for name, child in list(module.named_children()):
        if attn and type(child) is LinearAttention:
            new = ExportLinearAttention(child)
            _rewrite(new, ws, gn, up, attn)
            setattr(module, name, new)
        elif attn and type(child) is Attention:
            new = ExportAttention(child)
            _rewrite(new, ws, gn, up, attn)
            setattr(module, name, new)
        elif ws and isinstance(child, WSConv2d):
            setattr(module, name, fold_ws_conv(child))
        elif gn and isinstance(child, nn.GroupNorm):
            setattr(module, name, ExportGroupNorm.from_group_norm(child))
        elif (
            up and isinstance(child, nn.Sequential) and len(child) == 2 and _is_nearest_up2(child[0])
            and isinstance(child[1], nn.Conv2d) and not isinstance(child[1], WSConv2d)
            and child[1].kernel_size == (3, 3) and child[1].padding == (1, 1)
            and child[1].stride == (1, 1) and child[1].groups == 1
        ):
            setattr(module, name, fold_upsample_conv(child[1]))
        else:
            _rewrite(child, ws, gn, up, attn)


def prepare_for_export(
    model: nn.Module, *, fold_ws: bool = True, group_norm: bool = True, upsample: bool = True,
    attention: bool = True,
) -> nn.Module:
    """A deep copy of `model` in eval mode, rewritten for export (see the module docstring).

    The keyword switches exist to measure what each rewrite buys (the naive graph is
    ``prepare_for_export(m, fold_ws=False, group_norm=False, upsample=False, attention=False)``);
    export always
    uses all of them. A model with WSConv2d left unfolded still exports (the standardisation is
    traced into the graph), it is just slower.
    """
    out = copy.deepcopy(model).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    _rewrite(out, fold_ws, group_norm, upsample, attention)
    return out


def count_modules(model: nn.Module) -> dict[str, int]:
    """How many modules of each kind the rewrites look at (for reports and tests)."""
    kinds = {"WSConv2d": WSConv2d, "GroupNorm": nn.GroupNorm, "ExportGroupNorm": ExportGroupNorm,
             "Upsample": nn.Upsample, "ConvTranspose2d": nn.ConvTranspose2d,
             "LinearAttention": LinearAttention, "Attention": Attention,
             "ExportLinearAttention": ExportLinearAttention, "ExportAttention": ExportAttention}
    return {k: sum(isinstance(m, t) for m in model.modules()) for k, t in kinds.items()}

