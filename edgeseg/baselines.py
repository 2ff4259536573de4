"""Baselines a mobile user would pick instead of the distilled student.

* :func:`otsu_dice`: Otsu's threshold on CIELAB lightness, lesion = the darker side.
* :class:`SmallUNet`: a small discriminative U-Net (~0.13 M parameters, the EGE-UNet /
  MALUNet size class) trained by :func:`train_unet` with Dice + BCE, scored by
  :func:`eval_dice`.

Dice is computed per image, ``2|P∩G| / (|P|+|G|)`` (1 when both are empty), then averaged.
"""
from __future__ import annotations

import math
import time

import numpy as np

__all__ = ["dice", "otsu_predict", "otsu_dice", "SmallUNet", "UNET_CHANNELS", "unet_channels_for_gflop", "unet_channels_like",
           "unet_gflop",
           "train_unet", "eval_dice"]


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of one image pair (values > 0 are foreground): :func:`edgeseg.metrics.mask_dice`."""
    from edgeseg.metrics import mask_dice

    return float(mask_dice(np.asarray(pred)[None] > 0, np.asarray(gt)[None] > 0)[0])


def _arrays(dataset):
    """(N x H x W x 3 uint8, N x H x W uint8 {0,1}) of a dataset (cached arrays when present)."""
    if hasattr(dataset, "images") and hasattr(dataset, "masks") and not getattr(dataset, "augment", False):
        return np.asarray(dataset.images), (np.asarray(dataset.masks) > 0).astype(np.uint8)
    ims, ms = [], []
    for i in range(len(dataset)):
        image, mask, _ = dataset[i]
        ims.append((image.numpy().transpose(1, 2, 0) * 255 + 0.5).clip(0, 255).astype(np.uint8))
        ms.append((mask.numpy()[0] > 0).astype(np.uint8))
    return np.stack(ims), np.stack(ms)


def otsu_predict(image_rgb_u8: np.ndarray) -> np.ndarray:
    import cv2

    L = cv2.cvtColor(np.ascontiguousarray(image_rgb_u8), cv2.COLOR_RGB2LAB)[..., 0]
    t, _ = cv2.threshold(L, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return (L <= t).astype(np.uint8)


def otsu_dice(dataset) -> float:
    """Mean Dice of Otsu on CIELAB L (lesion = darker side) over a dataset."""
    ims, ms = _arrays(dataset)
    return float(np.mean([dice(otsu_predict(x), y) for x, y in zip(ims, ms)]))


def _torch():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    return torch, nn, F


def _block(nn, cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


#: SmallUNet's own widths (~0.12 M parameters); wider U-Nets scale all five by one factor.
UNET_CHANNELS = (8, 16, 24, 32, 48)


def unet_gflop(channels, size: int) -> float:
    """GFLOP of one SmallUNet pass on a size x size image (2 FLOPs per multiply-add)."""
    torch, _, _ = _torch()
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), FlopCounterMode(display=False) as fc:
        SmallUNet(tuple(channels))(torch.empty(1, 3, size, size))
    return fc.get_total_flops() / 1e9


def unet_channels_for_gflop(gflop: float, size: int) -> tuple[int, ...]:
    """SmallUNet widths (UNET_CHANNELS times a whole number, so every width stays a multiple of 8
    as fast int8 kernels like) whose pass costs closest to `gflop` at `size`: the same-compute
    discriminative baseline for a diffusion student."""
    base = unet_gflop(UNET_CHANNELS, size)
    guess = max(1, round(math.sqrt(gflop / base)))  # conv FLOPs grow with width squared
    options = [tuple(c * m for c in UNET_CHANNELS) for m in range(max(1, guess - 1), guess + 2)]
    return min(options, key=lambda ch: abs(unet_gflop(ch, size) - gflop))


def unet_channels_like(student_preset: str, size: int, steps: int | None = None,
                       ensemble: int | None = None) -> tuple[int, ...]:
    """SmallUNet widths whose one pass costs what the student costs per image: K x N network calls
    (the defaults table's K and N for its prediction type when not given) at `size`."""
    from edgeseg.defaults import sampler_defaults
    from edgeseg.models import flops_per_call, preset

    k, n = sampler_defaults(preset(student_preset).prediction_type)
    calls = (steps or k) * (ensemble or n)
    return unet_channels_for_gflop(flops_per_call(student_preset)[0] / 1e9 * calls, size)


def SmallUNet(channels=UNET_CHANNELS):
    """A 4-level U-Net with plain conv blocks; returns logits (B x 1 x H x W)."""
    torch, nn, F = _torch()

    class _SmallUNet(nn.Module):
        def __init__(self):
            super().__init__()
            c = channels
            self.enc = nn.ModuleList([_block(nn, 3, c[0])] +
                                     [_block(nn, c[i], c[i + 1]) for i in range(len(c) - 1)])
            self.dec = nn.ModuleList([_block(nn, c[i + 1] + c[i], c[i])
                                      for i in reversed(range(len(c) - 1))])
            self.head = nn.Conv2d(c[0], 1, 1)

        def forward(self, x):
            skips = []
            for i, e in enumerate(self.enc):
                x = e(x if i == 0 else F.max_pool2d(x, 2))
                skips.append(x)
            x = skips.pop()
            for d in self.dec:
                s = skips.pop()
                x = F.interpolate(x, size=s.shape[-2:], mode="bilinear", align_corners=False)
                x = d(torch.cat([x, s], 1))
            return self.head(x)

    return _SmallUNet()


def _to_tensors(dataset):
    torch, _, _ = _torch()
    ims, ms = _arrays(dataset)
    return (torch.from_numpy(np.array(ims)).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(np.ascontiguousarray(ms))[:, None].contiguous())


def train_unet(train_ds, val_ds=None, minutes: float | None = 4.0, steps: int | None = None,
               seed: int = 0, batch_size: int = 16, lr: float = 3e-3, threads: int | None = None,
               log=None, channels=UNET_CHANNELS, state_path=None, save_every: float = 300.0):
    """Train :func:`SmallUNet` with Dice + BCE (Adam, cosine LR, flips) for ``minutes`` of wall
    time or ``steps`` steps, whichever comes first. Returns (model, info dict).

    With ``state_path`` the run is resumable: weights, optimizer, sampling generator, step and
    training seconds are written there (atomically) every ``save_every`` seconds and at the end,
    and a run started with an existing state continues from it (the cosine schedule goes on at
    the training seconds it had reached; a finished run returns at once)."""
    from edgeseg.train import cosine_lr_factor

    torch, nn, F = _torch()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = _to_tensors(train_ds)
    n = x_all.shape[0]
    # channels-last: the faster layout for these convs on CPU (bench/README.md, "Design measurements")
    model = SmallUNet(tuple(channels)).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    budget = None if minutes is None else minutes * 60.0
    max_steps = steps if steps is not None else 10**9
    recipe = {"channels": list(channels), "seed": seed, "batch_size": batch_size, "lr": lr,
              "budget_seconds": budget, "steps": steps}
    step, done_seconds = _load_unet_state(state_path, recipe, model, opt, g) if state_path else (0, 0.0)
    if step and log:
        log(f"resumed at step {step} ({done_seconds:.0f}s trained)")
    t0 = time.perf_counter() - done_seconds
    last_save = time.perf_counter()
    model.train()
    while step < max_steps:
        elapsed = time.perf_counter() - t0
        if budget is not None and elapsed >= budget:
            break
        frac = (step / max_steps) if steps is not None else elapsed / budget
        for pg in opt.param_groups:
            pg["lr"] = lr * cosine_lr_factor(frac)
        loss = _unet_step(model, opt, x_all, y_all, g, batch_size)
        step += 1
        if log and step % 100 == 0:
            log(f"step {step} loss {loss:.4f} {time.perf_counter() - t0:.0f}s")
        if state_path and time.perf_counter() - last_save >= save_every:
            _save_unet_state(state_path, recipe, model, opt, g, step, time.perf_counter() - t0)
            last_save = time.perf_counter()
    train_seconds = time.perf_counter() - t0
    if state_path:
        _save_unet_state(state_path, recipe, model, opt, g, step, train_seconds)
    from edgeseg.models import count_params

    info = {"steps": step, "train_seconds": train_seconds,
            "params": count_params(model), "batch_size": batch_size, "channels": list(channels)}
    if val_ds is not None:
        info["val_dice"] = eval_dice(model, val_ds)
    return model, info


def _unet_step(model, opt, x_all, y_all, g, batch_size: int) -> float:
    """One Dice + BCE step on a random batch with random flips; returns the loss."""
    torch, _, F = _torch()
    idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=g)
    x = (x_all[idx].float() / 255.0).contiguous(memory_format=torch.channels_last)
    y = y_all[idx].float()
    if torch.rand(1, generator=g).item() < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    if torch.rand(1, generator=g).item() < 0.5:
        x, y = x.flip(-2), y.flip(-2)
    logits = model(x)
    p = torch.sigmoid(logits)
    inter = (p * y).sum((1, 2, 3))
    dl = 1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1)
    loss = F.binary_cross_entropy_with_logits(logits, y) + dl.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def _save_unet_state(path, recipe: dict, model, opt, g, step: int, train_seconds: float) -> None:
    import io

    from edgeseg.checkpoint import atomic_write_bytes

    torch, _, _ = _torch()
    buf = io.BytesIO()
    torch.save({"recipe": recipe, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "generator": g.get_state(), "step": step, "train_seconds": train_seconds}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_unet_state(path, recipe: dict, model, opt, g) -> tuple[int, float]:
    """(step, training seconds) of the state at `path` loaded into model/opt/g; (0, 0.0) when there
    is none. A state written for another recipe is refused: its schedule would not continue."""
    from pathlib import Path

    torch, _, _ = _torch()
    path = Path(path)
    if not path.exists():
        return 0, 0.0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable U-Net training state ({type(e).__name__}: {e})") from None
    if state.get("recipe") != recipe:
        theirs, ours = state.get("recipe", {}), recipe
        diff = ", ".join(f"{k} {theirs.get(k)!r} there, {ours[k]!r} now" for k in ours if theirs.get(k) != ours[k])
        raise ValueError(f"{path}: this U-Net state was trained with another recipe ({diff}); "
                         "delete it to start again")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    g.set_state(state["generator"])
    return int(state["step"]), float(state["train_seconds"])


def eval_dice(model, dataset, batch_size: int = 64) -> float:
    """Mean per-image Dice of ``model`` (logits > 0) on a dataset."""
    from edgeseg.metrics import mask_dice

    torch, _, _ = _torch()
    x_all, y_all = _to_tensors(dataset)
    model.eval()
    scores = []
    with torch.no_grad():
        for s in range(0, x_all.shape[0], batch_size):
            pred = (model(x_all[s:s + batch_size].float() / 255.0) > 0).numpy()[:, 0]
            gt = y_all[s:s + batch_size].numpy()[:, 0]
            scores += mask_dice(pred, gt > 0).tolist()
    return float(np.mean(scores))
