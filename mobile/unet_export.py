"""The discriminative baseline (:class:`edgeseg.baselines.SmallUNet`) as an ExecuTorch program,
made with the student's tooling (quantizer, lowering, gate, placement)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgeseg.errors import EdgesegError
from edgeseg.mobile import sidecar as sc
from edgeseg.mobile.executorch_export import load_method, lower_executorch, to_program
from edgeseg.mobile.gate import PARITY_THRESHOLDS, checked_parity, dice_problem, gate_and_place
from edgeseg.mobile.job import CALIBRATION_IMAGES, PARITY_IMAGES, Progress, load_images, quiet, say
from edgeseg.mobile.placement import check_output, write_temp

__all__ = ["UNET_TARGET", "UNET_RECIPE", "UNET_FP32_PROB_ATOL", "parity_unet_pte", "export_unet_pte"]

#: Sidecar ``target`` of a baseline U-Net program (PteSegmenter, which runs students, refuses it).
UNET_TARGET = "executorch-unet"
#: Bumped whenever the exported U-Net program changes for the same weights.
UNET_RECIPE = 1
#: fp32 gate: the largest |sigmoid(program) - sigmoid(eager)| accepted (besides mask Dice >= 0.99).
UNET_FP32_PROB_ATOL = 1e-3


def _unet_channels(model: nn.Module) -> list[int] | None:
    """SmallUNet's ``channels`` (the output width of each encoder block), None for another network."""
    try:
        return [int(next(m for m in blk if isinstance(m, nn.Conv2d)).out_channels) for blk in model.enc]
    except (AttributeError, StopIteration, TypeError):
        return None


def parity_unet_pte(path: str | Path, model: nn.Module, images: torch.Tensor) -> dict:
    """A U-Net .pte (image -> logits) vs eager `model` on `images`, one image per call: mask Dice
    of logits > 0 and the largest logit and probability deviations."""
    method = load_method(path)
    got, ref = [], []
    with torch.no_grad():
        for img in images:
            x = img[None].contiguous()
            got.append(method.execute((x,))[0].float())
            ref.append(model(x).float())
    got, ref = torch.cat(got), torch.cat(ref)
    dsc = sc.dice_masks(got > 0, ref > 0)
    return {
        "mask_dsc_vs_eager": round(float(dsc.mean()), 6),
        "n_images": int(len(images)),
        "min_dsc": round(float(dsc.min()), 6),
        "max_abs_diff_logits": round(float((got - ref).abs().max()), 6),
        "max_abs_diff_prob": round(float((got.sigmoid() - ref.sigmoid()).abs().max()), 6),
        "eager_foreground_fraction": round(float((ref > 0).float().mean()), 4),
    }


def _unet_images(images, calibration_images, n_calibration: int, n_parity: int, size: int, dataset: str, data_dir
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(parity images, calibration images or None when `n_calibration` is 0): the ones given, else
    loaded from `dataset`; each N x 3 x `size` x `size` (N >= 1)."""
    if images is None:
        images = load_images(dataset, "test", n_parity, size, data_dir)
    calib = None
    if n_calibration:
        calib = calibration_images if calibration_images is not None else load_images(
            dataset, "train", n_calibration, size, data_dir)
    for what, t in (("images", images), ("calibration_images", calib)):
        if t is not None and (t.ndim != 4 or tuple(t.shape[1:]) != (3, size, size) or len(t) == 0):
            raise EdgesegError(f"{what} must be N x 3 x {size} x {size} (N >= 1), got {tuple(t.shape)}")
    return images.float().contiguous(), calib


def _unet_sidecar(model: nn.Module, net: nn.Module, out: Path, size: int, quantize: str, calls: int,
                  others: dict) -> dict:
    """The U-Net program's sidecar fields (the same contract fields as the student's; its own I/O)."""
    return {
        "format": sc.FORMAT, "format_version": sc.FORMAT_VERSION, "recipe": UNET_RECIPE, "target": UNET_TARGET,
        "file": out.name, "status": "ok", "model": type(model).__name__.lstrip("_"), "channels": _unet_channels(net),
        "params": int(sum(p.numel() for p in net.parameters())), "image_size": [size, size],
        "preprocessing": sc.preprocessing_for(size), "batch": 1,
        "inputs": [{"name": "image", "shape": [1, 3, size, size], "dtype": "float32",
                    "description": "preprocessed RGB image, see preprocessing"}],
        "outputs": [{"name": "logits", "shape": [1, 1, size, size], "dtype": "float32",
                     "description": "lesion logits; lesion where logits > threshold (sigmoid > 0.5)"}],
        "threshold": 0.0, "quantize": quantize, "delegate_calls": calls, "non_delegated_ops": others,
    }


def _unet_problem(parity: dict, threshold: float, quantize: str) -> str | None:
    """The gate's verdict: mask Dice, and for fp32 also the probabilities' deviation."""
    problem = dice_problem(parity, threshold, quantize)
    if problem is None and quantize == "none" and parity["max_abs_diff_prob"] > UNET_FP32_PROB_ATOL:
        problem = (f"parity check failed: fp32 probabilities differ from eager by {parity['max_abs_diff_prob']:.2e} "
                   f"> {UNET_FP32_PROB_ATOL}")
    return problem


def export_unet_pte(
    model: nn.Module,
    out: str | Path,
    quantize: str = "none",
    images: torch.Tensor | None = None,
    size: int = 64,
    *,
    calibration_images: torch.Tensor | None = None,
    dataset: str = "synthetic",
    data_dir: str | Path | None = None,
    n_parity_images: int = PARITY_IMAGES,
    n_calibration_images: int = CALIBRATION_IMAGES,
    parity_threshold: float | None = None,
    progress: Progress | None = None,
    overwrite: bool = True,
) -> dict:
    """The baseline U-Net (:class:`edgeseg.baselines.SmallUNet`) as an ExecuTorch program, made
    with the student's tooling: torch.export -> [int8: :func:`~edgeseg.mobile.quantize.quantize_int8`,
    the same XNNPACK conv quantizer, calibrated through ``calibration_batches``] ->
    :func:`lower_executorch` -> :func:`to_program`, written under a temporary name and placed atomically.

    The program is the network itself, unwrapped: input ``image`` 1 x 3 x `size` x `size` in
    [0, 1] (as edgeseg.data gives it, the U-Net's training input), output ``logits``
    1 x 1 x `size` x `size`; lesion where logits > 0 (sigmoid > 0.5), as in
    :func:`edgeseg.baselines.eval_dice`. `model` is not changed (a copy is put in eval mode,
    contiguous memory format: ``train_unet`` trains channels-last). BatchNorm is folded into
    the convs (by XNNPACK's lowering for fp32, by ``prepare_pt2e`` for int8).

    Parity gate: the program in ExecuTorch's Python runtime vs eager on `images` (default the
    first `n_parity_images` of `dataset`'s test split): mask Dice >= 0.99 for fp32 (and
    |sigmoid difference| <= :data:`UNET_FP32_PROB_ATOL`) or >= 0.97 for int8 (`parity_threshold`
    overrides the Dice bound; 0 records it without enforcing, for untrained networks). On failure
    the program is kept as ``<out>.failed`` and EdgesegError is raised, as for the student.
    int8 calibrates on `calibration_images` (default `n_calibration_images` of the train split).

    Writes ``out`` and the sidecar ``out.json`` (``target`` :data:`UNET_TARGET`); returns the
    sidecar dict: ``path``, ``size_bytes``, ``sha256``, ``parity``, ``channels``, ...
    """
    import copy

    from edgeseg.mobile.quantize import calibration_batches, quantize_int8

    if quantize not in PARITY_THRESHOLDS:
        raise EdgesegError(f"quantize must be none or int8 for ExecuTorch, got {quantize!r}")
    out = Path(out)
    check_output(out, ".pte", overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    threshold = PARITY_THRESHOLDS[quantize] if parity_threshold is None else float(parity_threshold)
    net = copy.deepcopy(model).float().eval().to(memory_format=torch.contiguous_format)
    parity_source = "given" if images is not None else f"{dataset} test split"
    images, calib = _unet_images(images, calibration_images if quantize == "int8" else None,
                                 n_calibration_images if quantize == "int8" else 0, n_parity_images, size, dataset,
                                 data_dir)
    example = (torch.rand(1, 3, size, size),)
    with torch.no_grad():
        shape = tuple(net(example[0]).shape)
    if shape != (1, 1, size, size):
        raise EdgesegError(f"the U-Net must map 1 x 3 x {size} x {size} to 1 x 1 x {size} x {size}, got {shape}")

    say(progress, f"exporting the U-Net at {size} px ({'int8' if quantize == 'int8' else 'fp32'})")
    with quiet(), torch.no_grad():
        ep = torch.export.export(net, example, strict=False)
        if quantize == "int8":
            say(progress, f"calibrating int8 on {len(calib)} images")
            ep = quantize_int8(ep, example, ((img,) for img, _ in calibration_batches(calib.float(), 1)))
    say(progress, "lowering to XNNPACK")
    lowered, calls, others = lower_executorch(ep, quantize)
    tmp = write_temp(out, to_program(lowered).write_to_file)

    say(progress, f"parity: .pte (ExecuTorch runtime) vs eager on {len(images)} images")
    parity, _ = checked_parity(tmp, out, lambda: (parity_unet_pte(tmp, net, images), None))
    parity.update(images=parity_source, threshold=threshold, runtime="executorch.runtime (Python)",
                  **({"prob_atol": UNET_FP32_PROB_ATOL} if quantize == "none" else {}))
    problem = _unet_problem(parity, threshold, quantize)
    meta = _unet_sidecar(model, net, out, size, quantize, calls, others)
    meta["calibration"] = None if calib is None else {
        "n_images": int(len(calib)), "source": "given" if calibration_images is not None else f"{dataset} train split"}
    meta["parity"] = parity
    return gate_and_place(tmp, out, meta, problem, overwrite)
