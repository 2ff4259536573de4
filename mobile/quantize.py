"""PT2E int8 post-training quantization for XNNPACK.

Static int8: activations per tensor (histogram observers), weights per output channel,
symmetric (``get_symmetric_quantization_config(is_per_channel=True)``), as XNNPACK runs them.

What is quantized is the whole exported segmenter, so every unrolled DDIM step of the network
is its own copy in the graph with its own activation observers. Calibration runs that program on
real training images with fresh Gaussian noise: each copy then sees exactly the timestep it
runs at (the K chosen timesteps) and the x_t distribution the sampler actually produces at that
step (the model's own trajectory from x_T), which is what "calibrated at sampled timesteps"
must mean for a K-step program. Weights are shared across steps and quantized once.

APIs (torch 2.13, torchao 0.18, executorch 1.5): ``torch.export.export(...).module()`` ->
``torchao.quantization.pt2e.quantize_pt2e.prepare_pt2e`` -> calibrate -> ``convert_pt2e``;
the quantizer is ``executorch.backends.xnnpack.quantizer.xnnpack_quantizer.XNNPACKQuantizer``.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

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
    if n.op != "call_function" or n.target not in (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default):
        return False
    w = n.args[1]
    shape = getattr(getattr(w, "meta", {}).get("val"), "shape", None)
    return shape is not None and len(shape) == 4 and shape[1] == 1 and shape[0] > 1


def _quantizable(skip_modules: tuple[str, ...]):
    from torchao.quantization.pt2e.quantizer import get_module_name_filter

    name_filters = [get_module_name_filter(m) for m in skip_modules]

    def keep(n) -> bool:
        return not _single_input_channel_conv(n) and not any(f(n) for f in name_filters)

    return keep


def quantize_int8(
    module: nn.Module | torch.export.ExportedProgram,
    example_inputs: tuple[torch.Tensor, ...],
    calibration: Iterable[tuple[torch.Tensor, ...]],
    progress: Callable[[int], None] | None = None,
    skip_modules: tuple[str, ...] = (),
) -> torch.export.ExportedProgram:
    """Quantize (int8, per-channel symmetric weights) and re-export.

    `module` is an nn.Module (exported here) or an ExportedProgram (for instance one whose
    constant subgraphs were already folded; export.py folds before quantizing, because folding
    after would turn the int8 weights' dequantize nodes back into float constants).
    `calibration` yields input tuples of the same shapes as `example_inputs`. Returns the
    ExportedProgram of the quantized (q/dq) graph, ready for ``to_edge_transform_and_lower``.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if isinstance(module, torch.export.ExportedProgram):
        captured = module.module()
    else:
        captured = torch.export.export(module.eval(), example_inputs, strict=False).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    quantizer.set_filter_function(_quantizable(skip_modules))
    prepared = prepare_pt2e(captured, quantizer)
    n = 0
    with torch.no_grad():
        for inputs in calibration:
            prepared(*inputs)
            n += 1
            if progress is not None:
                progress(n)
    if n == 0:
        raise ValueError("quantize_int8 needs at least one calibration batch")
    converted = convert_pt2e(prepared)
    return torch.export.export(converted, example_inputs, strict=False)
