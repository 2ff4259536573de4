"""PT2E int8 post-training quantization for XNNPACK.

Static int8 on the convolutions and linears: activations per tensor (histogram observers),
weights per output channel, symmetric (``get_symmetric_quantization_config(is_per_channel=True)``),
as XNNPACK runs them; and on the concatenations, residual adds and gating multiplies whose
inputs are all int8 (conv + ReLU networks: the mobile blocks, the U-Net), so int8 flows from
conv to conv without converts. Everything else (GroupNorm statistics, softmax, the DDIM
arithmetic, every join with an fp32 input) stays fp32 inside the same XNNPACK delegate, with a
convert where int8 meets fp32 (:func:`edgeseg.mobile.workarounds.int8_partitioner`). On the
trained tiny student (K=1, N=3) this gives mask Dice 0.98 vs eager; the stock quantizer gave
0.63 (see ``_xnnpack_conv_quantizer`` for why).

What is quantized is the whole exported segmenter, so every unrolled DDIM step of the network
is its own copy in the graph with its own activation observers. Calibration runs that program on
real training images with fresh Gaussian noise: each copy then sees exactly the timestep it
runs at (the K chosen timesteps) and the x_t distribution the sampler actually produces at that
step (the model's own trajectory from x_T), which is what "calibrated at sampled timesteps"
must mean for a K-step program. Each step has its own copy of the weights (PT2E would otherwise
quantize only the first step's convs); the int8 copies are identical and stored once.

APIs (torch 2.13, torchao 0.18, executorch 1.5): ``torch.export.export(...).module()`` ->
``torchao.quantization.pt2e.quantize_pt2e.prepare_pt2e`` -> calibrate -> ``convert_pt2e``;
the quantizer is a subclass of ``executorch.backends.xnnpack.quantizer.xnnpack_quantizer.XNNPACKQuantizer``.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from edgeseg.mobile.fold import ExportGroupNorm

__all__ = ["quantize_int8", "calibration_batches"]


def calibration_batches(
    images: torch.Tensor, ensemble: int, batch: int = 1, seed: int = 1234
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(image B x 3 x H x W, noise B*N x 1 x H x W) pairs over `images`, fresh noise each."""
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0] - images.shape[0] % batch
    for i in range(0, n, batch):
        img = images[i : i + batch]
        noise = torch.randn((batch * ensemble, 1, *img.shape[-2:]), generator=gen)
        yield img, noise


def _single_input_channel_conv(n) -> bool:
    """A conv with one input channel and several outputs (the network's ``init_x``, 1 -> dim_x).

    XNNPACK treats it as a depthwise conv; quantized (int8, per-channel) it is rejected when the
    program is loaded ("Failed to create depthwise convolution node ... invalid_parameter") for
    the unrolled steps after the first. It holds a few dozen weights, so it stays fp32.
    """
    if getattr(n, "op", None) != "call_function" or n.target not in (
            torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default):
        return False
    w = n.args[1]
    shape = getattr(getattr(w, "meta", {}).get("val"), "shape", None)
    return shape is not None and len(shape) == 4 and shape[1] == 1 and shape[0] > 1


_EXPORT_GROUP_NORM = f"{ExportGroupNorm.__module__}.{ExportGroupNorm.__qualname__}"


def _group_norm_conv(n) -> bool:
    """A conv inside an ExportGroupNorm (group statistics, affine): normalisation stays fp32."""
    stack = n.meta.get("nn_module_stack", {}) if n.op == "call_function" else {}
    return any(t == _EXPORT_GROUP_NORM for _, t in stack.values())  # (path, qualified type name)


def _quantizable(n) -> bool:
    return not (_single_input_channel_conv(n) or _group_norm_conv(n))


_CAT = (torch.ops.aten.cat.default,)
_ELEMENTWISE = (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor)  # XNNPACK rescales their int8 inputs

#: A concatenation runs in int8 only if its inputs' calibrated ranges (largest |value|) are within
#: this factor of each other: they share one scale, so the smallest keeps >= 127 / ratio levels.
CAT_RANGE_RATIO = 4.0

#: Calibration batches run through the float graph to measure those ranges.
RANGE_BATCHES = 8


def _int8_output(n) -> bool:
    """Whether `n`'s output is annotated as int8 (a quantized conv/linear, or a join annotated here)."""
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    a = n.meta.get(Q_ANNOTATION_KEY) if isinstance(n, torch.fx.Node) else None
    return a is not None and a.output_qspec is not None


def _join_inputs(n) -> list | None:
    """The tensor inputs of a cat/add/mul that can run in int8, else None: every input is int8
    already, or is the fp32 first conv (whose output is then written in int8)."""
    if n.op != "call_function" or n.target not in _CAT + _ELEMENTWISE or n.kwargs.get("alpha", 1) != 1:
        return None
    inputs = list(n.args[0]) if n.target in _CAT else list(n.args[:2])
    if len(inputs) < 2 or not all(_int8_output(i) or _single_input_channel_conv(i) for i in inputs):
        return None
    return inputs


def output_absmax(gm: torch.fx.GraphModule, batches: Iterable[tuple[torch.Tensor, ...]]) -> dict[str, float]:
    """Largest |value| of every floating-point node output of `gm` over `batches`, by node name."""
    absmax: dict[str, float] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
                absmax[n.name] = max(absmax.get(n.name, 0.0), float(out.detach().abs().max()))
            return out

    with torch.no_grad():
        for inputs in batches:
            Recorder(gm).run(*inputs)
    return absmax


class _ScaleGroups:
    """Union-find over the nodes that concatenations tie to one int8 scale, with each group's
    smallest and largest calibrated range (a concatenation's own range is its largest input's)."""

    def __init__(self, absmax: dict[str, float]):
        self.absmax, self.parent, self.span = absmax, {}, {}

    def root(self, n):
        while self.parent.setdefault(n, n) is not n:
            n = self.parent[n]
        return n

    def _span(self, n):
        r = self.root(n)
        if r not in self.span:
            a = self.absmax.get(n.name, 0.0)
            self.span[r] = (a, a)
        return self.span[r]

    def try_join(self, cat, inputs) -> bool:
        """Tie `cat` and its inputs into one group if the merged ranges stay within CAT_RANGE_RATIO."""
        roots = {self.root(i) for i in inputs}
        spans = [self._span(r) for r in roots]
        lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
        if lo <= 0 or hi > CAT_RANGE_RATIO * lo:
            return False
        for r in roots:
            self.parent[r] = cat
        self.parent[cat], self.span[cat] = cat, (lo, hi)
        return True


def _annotate_int8_joins(graph: torch.fx.Graph, act, absmax: dict[str, float]) -> None:
    """Keep int8 through the concatenations, adds and multiplies that join int8 tensors.

    With only the convs quantized, every skip concatenation, residual add and gating multiply of
    a conv + ReLU network (the mobile blocks, the U-Net) sits between converts and works on fp32
    copies. Here an add or multiply of int8 inputs gets its own output scale (XNNPACK's int8 ops
    rescale their inputs); a concatenation must copy bytes, so its inputs and output share one
    scale: one observer sees all of them, and the producers write that scale directly. Tying
    tensors of very different ranges to one scale erases the smaller one (the final block's
    concatenation of the decoder output with the first convs' outputs, 10x apart, turned the
    masks to noise), so a concatenation whose inputs' calibrated ranges (`absmax`, by node name)
    differ by more than :data:`CAT_RANGE_RATIO` stays fp32. A join with any other fp32 input
    (the paper blocks: GroupNorm and SiLU outputs) is left as it was. `act` is the activation
    quantization spec the convs got.
    """
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    groups, cats = _ScaleGroups(absmax), []
    for n in graph.nodes:  # topological order: a join's inputs are settled before it is seen
        inputs = _join_inputs(n)
        if inputs is None or (n.target in _CAT and not groups.try_join(n, inputs)):
            continue
        for i in inputs:
            if not _int8_output(i):  # the fp32 first conv: written in int8 for the join
                i.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(output_qspec=act, _annotated=True)
        if n.target in _CAT:
            n.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(output_qspec=act, _annotated=True)
            cats.append((n, inputs))
        else:
            n.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
                input_qspec_map={i: act for i in inputs}, output_qspec=act, _annotated=True)
    order = {n: k for k, n in enumerate(graph.nodes)}
    first: dict = {}
    for n in sorted(groups.parent, key=order.__getitem__):
        first.setdefault(groups.root(n), n)  # the group's earliest node keeps its observer; the rest share it
    for n in groups.parent:
        if first[groups.root(n)] is not n:
            n.meta[Q_ANNOTATION_KEY].output_qspec = SharedQuantizationSpec(first[groups.root(n)])
    for n, inputs in cats:
        shared = SharedQuantizationSpec(first[groups.root(n)])
        n.meta[Q_ANNOTATION_KEY].input_qspec_map = {i: shared for i in inputs}


def _xnnpack_conv_quantizer(absmax: dict[str, float] | None = None):
    """XNNPACK's quantizer restricted to convolutions and linears, plus the int8 joins
    (:func:`_annotate_int8_joins`, given the float graph's ranges `absmax`; none without them).

    Measured on the trained tiny student (K=1, N=3, 16 test images, q/dq graph run in PyTorch):
    the stock ``XNNPACKQuantizer`` gives mask Dice 0.69 vs eager, this one 0.98. Two things in
    the stock annotation break this network:

    * its ``cat`` annotator ignores the filter and makes every input of a concatenation share
      ONE scale, taken from one input: DermoSegDiff concatenates the mask branch, the image
      branch and the skips (ranges that differ by 10x), so the other inputs are clipped;
    * ``propagate_annotation`` then carries those shared scales through reshapes and means.

    Left in fp32 (XNNPACK runs them in the same delegate, converting at each conv): the GroupNorm
    statistics, softmax, the DDIM arithmetic, and every cat, add and mul with an fp32 input.
    Quantizing all adds and muls of the paper blocks as well cost another 4 points of Dice (0.94).

    ``conv_relu`` is kept for the baseline U-Net (:func:`edgeseg.mobile.unet_export.export_unet_pte`)
    and the students with mobile blocks (each block one conv + ReLU after folding): the stock
    ``conv`` annotator skips a conv whose only user is a ReLU, leaving it to ``conv_relu``, so
    without it every such block would stay fp32. Paper blocks (SiLU) match only ``conv``.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    class ConvLinearQuantizer(XNNPACKQuantizer):
        SUPPORTED_PATTERNS = [p for p in XNNPACKQuantizer.SUPPORTED_PATTERNS
                              if p.name in ("conv_relu", "conv", "conv_transpose", "linear")]

        def annotate(self, model):
            model = self._annotate_for_quantization_config(model)  # no propagate_annotation
            if absmax is not None:
                _annotate_int8_joins(model.graph, self.global_config.input_activation, absmax)
            return model

    q = ConvLinearQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    q.set_filter_function(_quantizable)
    return q


def quantize_int8(
    module: nn.Module | torch.export.ExportedProgram,
    example_inputs: tuple[torch.Tensor, ...],
    calibration: Iterable[tuple[torch.Tensor, ...]],
    progress: Callable[[int], None] | None = None,
) -> torch.export.ExportedProgram:
    """Quantize (int8, per-channel symmetric weights) and re-export.

    `module` is an nn.Module (exported here) or an ExportedProgram (for instance one whose
    constant subgraphs were already folded; job.export_program folds before quantizing, because folding
    after would turn the int8 weights' dequantize nodes back into float constants).
    `calibration` yields input tuples of the same shapes as `example_inputs`; its first
    :data:`RANGE_BATCHES` also run through the float graph first, to decide which
    concatenations can share a scale. Returns the ExportedProgram of the quantized (q/dq)
    graph, ready for ``to_edge_transform_and_lower``.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if isinstance(module, torch.export.ExportedProgram):
        captured = module.module()
    else:
        captured = torch.export.export(module.eval(), example_inputs, strict=False).module()
    calibration = list(calibration)
    if not calibration:
        raise ValueError("quantize_int8 needs at least one calibration batch")
    absmax = output_absmax(captured, calibration[:RANGE_BATCHES])
    prepared = prepare_pt2e(captured, _xnnpack_conv_quantizer(absmax))
    n = 0
    with torch.no_grad():
        for inputs in calibration:
            prepared(*inputs)
            n += 1
            if progress is not None:
                progress(n)
    converted = convert_pt2e(prepared)
    return torch.export.export(converted, example_inputs, strict=False)
