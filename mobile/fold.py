"""Rewrite a trained network into an export-friendly copy with the same numbers.

XNNPACK (ExecuTorch's CPU delegate) and CoreML take plain convolutions, reductions over the
innermost dimensions and softmaxes over the last dimension. Several things in DermoSegDiff are not
of that shape, and left alone they cut the exported graph into many delegate calls with layout
copies between them:

* ``WSConv2d`` standardises its kernel at every call: folded once into a plain ``nn.Conv2d``
  holding the standardised weights (eps 1e-5, fp32, as in training);
* ``nn.GroupNorm`` lowers to ``native_group_norm``, which XNNPACK does not take: replaced by
  :class:`ExportGroupNorm`, per-channel spatial means (XNNPACK's global average pooling) and a
  group average as a 1x1 conv, with no reshape (a reshape needs NCHW and costs two layout
  transposes in XNNPACK's NHWC graph), same affine parameters; the affine, with a conv
  ``Block``'s time scale/shift folded in, is one depthwise 1x1 conv (:class:`ExportBlock`);
* nearest 2x upsampling followed by a 3x3 conv (the decoder's ``upsample``) lowers to
  ``upsample_nearest2d``, which XNNPACK does not take: replaced by the single equivalent
  transposed convolution (stride 2, kernel 4, padding 1), :func:`fold_upsample_conv`;
* a mobile ``Block`` (BatchNorm, ReLU) is one conv + ReLU: BatchNorm's statistics and affine and
  the time scale/shift rescale the conv's kernel and bias (:class:`ExportFoldedBlock`);
* ``Downsample`` (space-to-depth 2x2, then a 1x1 conv) is one conv with kernel 2 and stride 2
  (:func:`fold_space_to_depth_conv`): no pixel_unshuffle copy;
* the attention blocks split q, k, v with ``unbind`` and multiply 4-D tensors with ``@``, which
  lower to ``squeeze_copy`` and ``expand_copy`` (not delegated): replaced by
  :class:`ExportLinearAttention` / :class:`ExportAttention`, the same math on
  ``B*heads x dh x HW`` tensors with ``bmm`` and permutes (all delegated); the linear
  attention computes q, k and v with three convs (no 3x-wide output and slice copies to hold).

Every softmax in the model is already over the last dimension (models.py), so nothing to do.
:func:`prepare_for_export` returns a deep copy; the input model is not touched. The result
equals the original to float32 rounding (tests/test_mobile.py checks 1e-5).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from edgeseg.models import Attention, Block, Downsample, LinearAttention, WSConv2d

__all__ = ["ExportGroupNorm", "ExportBlock", "ExportFoldedBlock", "fold_space_to_depth_conv", "ExportLinearAttention", "ExportAttention", "fold_ws_conv", "fold_upsample_conv", "prepare_for_export", "count_modules"]


class ExportGroupNorm(nn.Module):
    """GroupNorm as XNNPACK runs it best: channels-last, no reshape, no transposes.

    XNNPACK runs the network in NHWC; an op it considers layout-bound (a reshape, a binary op
    with an NCHW constant) costs a transpose on each side, and the straightforward
    ``reshape(B, G, C/G, HW)`` GroupNorm with per-channel constants (eps, affine) fills the
    graph with them (numbers: bench/README.md, "Design measurements"). Here every step is a
    global average pool or a conv, which XNNPACK runs in NHWC:

    * statistics: per-channel spatial means (``mean(dims=(2, 3))``: global average pooling),
      then a fixed 1x1 conv that averages them over each group of C/G channels (every channel
      has H*W pixels, so the mean of the means is the group mean): block-diagonal C -> C, or
      C -> 1 for a single group (broadcast over channels; C times fewer constant bytes); eps is
      that conv's bias in the variance branch;
    * affine, with ``Block``'s time scale/shift folded in when given:
      ``(y w + b)(scale + 1) + shift = y [w (scale + 1)] + [b (scale + 1) + shift]``, as a
      depthwise 1x1 conv; once the timestep is fixed its weight and bias are constants.

    Same parameters (``weight``, ``bias``) and eps as the ``nn.GroupNorm`` it replaces, so a state
    dict moves across unchanged; biased variance, as in GroupNorm. The constant buffers are
    non-persistent, and the int8 quantizer leaves all of these convs in fp32 (mobile/quantize.py).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels {num_channels} is not divisible by num_groups {num_groups}")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        # one group: C -> 1 (the statistics broadcast over channels); else block-diagonal C -> C
        group = torch.arange(num_channels) // (num_channels // num_groups)
        rows = torch.zeros(1, dtype=torch.long) if num_groups == 1 else group
        avg = (rows[:, None] == group[None, :]).float() / (num_channels // num_groups)
        self.register_buffer("group_avg", avg[:, :, None, None], persistent=False)
        self.register_buffer("eps_bias", torch.full((avg.shape[0],), float(eps)), persistent=False)

    @classmethod
    def from_group_norm(cls, gn: nn.GroupNorm) -> "ExportGroupNorm":
        m = cls(gn.num_groups, gn.num_channels, gn.eps, gn.affine)
        if gn.affine:
            m.weight.data.copy_(gn.weight.detach())
            m.bias.data.copy_(gn.bias.detach())
        return m.to(gn.weight.device if gn.affine else "cpu")

    def forward(self, x: torch.Tensor, scale_shift=None) -> torch.Tensor:
        """GroupNorm(x), then ``* (scale + 1) + shift`` if given (``Block``'s time conditioning)."""
        d = x - F.conv2d(x.mean(dim=(2, 3), keepdim=True), self.group_avg)
        var_eps = F.conv2d((d * d).mean(dim=(2, 3), keepdim=True), self.group_avg, self.eps_bias)
        y = d * torch.rsqrt(var_eps)
        c = self.num_channels
        w = self.weight.reshape(1, c, 1, 1) if self.weight is not None else None
        b = self.bias.reshape(1, c, 1, 1) if self.bias is not None else None
        if scale_shift is not None:
            scale, shift = scale_shift
            w = scale + 1 if w is None else w * (scale + 1)
            b = shift if b is None else b * (scale + 1) + shift
        if w is None:
            return y
        if w.shape[0] != 1:  # per-sample conditioning (eager use with a batch of timesteps)
            return y * w + b
        return F.conv2d(y, w.reshape(c, 1, 1, 1), b.reshape(c), groups=c)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


class ExportBlock(nn.Module):
    """``Block`` whose GroupNorm takes the time scale/shift (see :meth:`ExportGroupNorm.forward`)."""

    def __init__(self, m: Block):
        super().__init__()
        if not isinstance(m.norm, ExportGroupNorm):
            raise TypeError("ExportBlock needs the block's GroupNorm rewritten as ExportGroupNorm first")
        self.proj, self.norm, self.act = m.proj, m.norm, m.act

    def forward(self, x: torch.Tensor, scale_shift=None) -> torch.Tensor:
        return self.act(self.norm(self.proj(x), scale_shift))


class ExportFoldedBlock(nn.Module):
    """A mobile ``Block`` (conv, BatchNorm, time scale/shift, ReLU) as one conv + ReLU.

    In eval mode BatchNorm is a per-channel affine, folded into the conv once
    (``torch.nn.utils.fusion.fuse_conv_bn_weights``); with the timestep fixed, so is the time
    scale/shift: ``relu((conv(x) w' + b') (scale + 1) + shift)`` is ``relu(conv''(x))`` with the
    kernel and bias rescaled per output channel. That rescaling is written as tensor ops on
    constants, so the export's constant propagation leaves one conv with constant weights per
    block, and the int8 quantizer its conv + ReLU pattern.
    """

    def __init__(self, m: Block):
        from torch.nn.utils.fusion import fuse_conv_bn_weights

        super().__init__()
        conv, bn = m.proj, m.norm
        if not isinstance(bn, nn.BatchNorm2d) or type(conv) is not nn.Conv2d:
            raise TypeError("ExportFoldedBlock needs a Block with BatchNorm and its WSConv2d folded first")
        self.weight, self.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                      bn.eps, bn.weight, bn.bias)
        self.padding, self.act = conv.padding, m.act

    def forward(self, x: torch.Tensor, scale_shift=None) -> torch.Tensor:
        if scale_shift is None:
            return self.act(F.conv2d(x, self.weight, self.bias, padding=self.padding))
        scale, shift = scale_shift
        if scale.shape[0] != 1:  # per-sample conditioning (eager use with a batch of timesteps)
            return self.act(F.conv2d(x, self.weight, self.bias, padding=self.padding) * (scale + 1) + shift)
        s = scale.reshape(-1) + 1
        w, b = self.weight * s.reshape(-1, 1, 1, 1), self.bias * s + shift.reshape(-1)
        return self.act(F.conv2d(x, w, b, padding=self.padding))


def fold_space_to_depth_conv(m: Downsample) -> nn.Conv2d:
    """Conv2d(kernel 2, stride 2) == conv1x1(pixel_unshuffle(x, 2)): no space-to-depth copy.

    pixel_unshuffle puts input channel c's pixel (i, j) of each 2x2 cell in channel 4c + 2i + j.
    """
    w = m.conv.weight.detach()  # out, 4 * in, 1, 1
    out_c, in4 = w.shape[:2]
    conv = nn.Conv2d(in4 // 4, out_c, 2, stride=2, bias=m.conv.bias is not None).to(w.device, w.dtype)
    with torch.no_grad():
        conv.weight.copy_(w.reshape(out_c, in4 // 4, 2, 2))
        if m.conv.bias is not None:
            conv.bias.copy_(m.conv.bias)
    return conv


def _split_qkv(to_qkv: nn.Conv2d, hidden: int) -> tuple[nn.Conv2d, nn.Conv2d, nn.Conv2d]:
    """The q, k and v 1x1 convs whose weights are the three slices of `to_qkv`'s (no bias)."""
    convs = []
    for i in range(3):
        conv = nn.Conv2d(to_qkv.in_channels, hidden, 1, bias=False).to(to_qkv.weight.device, to_qkv.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(to_qkv.weight[i * hidden : (i + 1) * hidden])
        convs.append(conv.eval().requires_grad_(False))
    return convs[0], convs[1], convs[2]


class ExportLinearAttention(nn.Module):
    """LinearAttention with three 1x1 convs (q, k, v) and bmm on 3-D tensors, k and v first.

    One q/k/v conv and channel slices made XNNPACK hold the 3 x hidden-channel output and its
    three slice copies at once (at 128 px, N = 3: 38 MB + 38 MB); separate convs, with the k/v
    context computed (and its inputs freed) before q, took 30 MB off student-mobile's program
    (bench/README.md, "Design measurements"). Same numbers: each conv computes the same output
    channels as the fused one.
    """

    def __init__(self, m: LinearAttention):
        super().__init__()
        self.heads, self.dim_head, self.scale = m.heads, m.dim_head, m.scale
        self.to_q, self.to_k, self.to_v = _split_qkv(m.to_qkv, m.heads * m.dim_head)
        self.to_out = m.to_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        hd, dh, n = self.heads, self.dim_head, h * w
        k = self.to_k(x).reshape(b * hd, dh, n).softmax(dim=-1)  # over positions
        v = self.to_v(x).reshape(b * hd, dh, n)
        context = torch.bmm(k, v.transpose(1, 2))  # (b hd) dh dh
        q = self.to_q(x).reshape(b * hd, dh, n).transpose(1, 2).softmax(dim=-1) * self.scale  # over channels
        out = torch.bmm(q, context)  # (b hd) n dh
        return self.to_out(out.transpose(1, 2).reshape(b, hd * dh, h, w))


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


def _is_upsample_conv(m: nn.Module) -> bool:
    """The decoder's ``Sequential(nearest 2x Upsample, plain 3x3 conv, stride 1, padding 1)``."""
    return (
        isinstance(m, nn.Sequential) and len(m) == 2 and _is_nearest_up2(m[0])
        and isinstance(m[1], nn.Conv2d) and not isinstance(m[1], WSConv2d)
        and m[1].kernel_size == (3, 3) and m[1].padding == (1, 1)
        and m[1].stride == (1, 1) and m[1].groups == 1
    )


def _rewrite(module: nn.Module) -> None:
    """Replace, in place and depth first, every submodule that has an export-friendly form."""
    for name, child in list(module.named_children()):
        if type(child) is Block:
            _rewrite(child)
            folded = isinstance(child.norm, nn.BatchNorm2d)
            setattr(module, name, ExportFoldedBlock(child) if folded else ExportBlock(child))
        elif type(child) is Downsample:
            setattr(module, name, fold_space_to_depth_conv(child))
        elif type(child) is LinearAttention:
            new = ExportLinearAttention(child)
            _rewrite(new)
            setattr(module, name, new)
        elif type(child) is Attention:
            new = ExportAttention(child)
            _rewrite(new)
            setattr(module, name, new)
        elif isinstance(child, WSConv2d):
            setattr(module, name, fold_ws_conv(child))
        elif isinstance(child, nn.GroupNorm):
            setattr(module, name, ExportGroupNorm.from_group_norm(child))
        elif _is_upsample_conv(child):
            setattr(module, name, fold_upsample_conv(child[1]))
        else:
            _rewrite(child)


def prepare_for_export(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in eval mode, with every rewrite of the module docstring applied."""
    out = copy.deepcopy(model).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    _rewrite(out)
    return out


def count_modules(model: nn.Module) -> dict[str, int]:
    """How many modules of each kind the rewrites look at (for reports and tests)."""
    kinds = {"WSConv2d": WSConv2d, "GroupNorm": nn.GroupNorm, "ExportGroupNorm": ExportGroupNorm,
             "Block": Block, "ExportBlock": ExportBlock,
             "Upsample": nn.Upsample, "ConvTranspose2d": nn.ConvTranspose2d,
             "LinearAttention": LinearAttention, "Attention": Attention,
             "ExportLinearAttention": ExportLinearAttention, "ExportAttention": ExportAttention}
    return {k: sum(isinstance(m, t) for m in model.modules()) for k, t in kinds.items()}

