"""Pictures: predicted vs true outlines, uncertainty heat maps, training curves."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

__all__ = ["to_uint8_image", "draw_outlines", "heatmap", "outline_overlay", "uncertainty_heatmap", "save_grid",
           "plot_curves"]

DISPLAY_MAX_SIDE = 1024  # overlays of large photos are drawn at most this wide/high

TRUE_COLOR = (0, 255, 0)  # green: ground truth
PRED_COLOR = (255, 0, 255)  # magenta: prediction


def to_uint8_image(image) -> np.ndarray:
    """3 x H x W float in [0, 1] (tensor or array) -> H x W x 3 uint8 RGB."""
    a = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3:
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(a)


def _binary(mask) -> np.ndarray:
    m = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
    return (np.squeeze(m) > 0).astype(np.uint8)


def draw_outlines(image, true_mask=None, pred_mask=None, scale: int = 2) -> np.ndarray:
    """Image (upscaled `scale`x for legibility) with true (green) and predicted (magenta) outlines."""
    img = to_uint8_image(image)
    h, w = img.shape[:2]
    img = cv2.resize(img, (w * scale, h * scale), interpolation=cv2.INTER_LINEAR)
    for mask, color in ((true_mask, TRUE_COLOR), (pred_mask, PRED_COLOR)):
        if mask is None:
            continue
        m = cv2.resize(_binary(mask), (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(img, contours, -1, color, 1)
    return img


def heatmap(values, scale: int = 2, vmax: float | None = None) -> np.ndarray:
    """A per-pixel map (e.g. ensemble spread) as an RGB heat map."""
    v = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)
    v = v.reshape(v.shape[-2:]).astype(np.float32)  # not squeeze: a 1-pixel-wide map stays 2-D
    vmax = float(v.max()) if vmax is None else vmax
    u8 = (np.clip(v / max(vmax, 1e-8), 0, 1) * 255).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
    return cv2.resize(rgb, (v.shape[1] * scale, v.shape[0] * scale), interpolation=cv2.INTER_NEAREST)


def _display_size(h: int, w: int) -> tuple[int, int]:
    f = min(1.0, DISPLAY_MAX_SIDE / max(h, w))
    return max(1, round(h * f)), max(1, round(w * f))


def outline_overlay(rgb: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """A photo (H x W x 3 uint8, any size) with the predicted outline in magenta (where
    `probability`, a map or a boolean mask, crosses 0.5), drawn at display size (at most
    DISPLAY_MAX_SIDE pixels a side). `segment` passes the cleaned mask, so the outline is the mask's."""
    h, w = _display_size(*rgb.shape[:2])
    img = np.ascontiguousarray(cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)) if (h, w) != rgb.shape[:2] \
        else rgb.copy()
    p = cv2.resize(probability.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    contours, _ = cv2.findContours((p > 0.5).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(img, contours, -1, PRED_COLOR, max(1, round(max(h, w) / 300)))
    return img


def uncertainty_heatmap(uncertainty: np.ndarray) -> np.ndarray:
    """An uncertainty map in [0, 1] as an RGB heat map at display size."""
    h, w = _display_size(*uncertainty.shape[:2])
    u = cv2.resize(uncertainty.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return heatmap(u, scale=1, vmax=1.0)


def save_grid(tiles: Sequence[np.ndarray], path: str | Path, cols: int = 4, labels: Sequence[str] | None = None) -> Path:
    """Tile equally sized RGB images into one PNG (optional label above each)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = tiles[0].shape[:2]
    pad = 16 if labels else 0
    rows = (len(tiles) + cols - 1) // cols
    canvas = np.full((rows * (h + pad), cols * w, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        canvas[r * (h + pad) + pad : r * (h + pad) + pad + h, c * w : c * w + w] = tile
        if labels:
            cv2.putText(canvas, str(labels[i])[:28], (c * w + 2, r * (h + pad) + 12), cv2.FONT_HERSHEY_SIMPLEX,
                        0.35, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    return path


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Loss (train/val) and, when present, validation Dice per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    ep = [h["epoch"] for h in history]
    has_dsc = any("val_dsc" in h for h in history)
    fig, axes = plt.subplots(1, 2 if has_dsc else 1, figsize=(10 if has_dsc else 5, 3.5), squeeze=False)
    ax = axes[0][0]
    ax.plot(ep, [h.get("train_loss", np.nan) for h in history], label="train loss")
    ax.plot(ep, [h.get("val_loss", np.nan) for h in history], label="val loss")
    ax.set_xlabel("epoch"), ax.set_yscale("log"), ax.legend(), ax.set_title(title)
    if has_dsc:
        ax = axes[0][1]
        ax.plot(ep, [h.get("val_dsc", np.nan) for h in history], "o-", label="val Dice (EMA)")
        ax.set_xlabel("epoch"), ax.set_ylim(0, 1), ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
