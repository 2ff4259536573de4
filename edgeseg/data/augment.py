"""Training augmentation: Albumentations, train split only.

Image and mask go through the same geometric transforms (mask with nearest interpolation).
Every item is deterministic: its random state is derived from (seed, epoch, index, loader
seed), so a run is reproducible whatever the number of DataLoader workers. Call
``dataset.set_epoch(e)`` each epoch when using ``num_workers=0`` or persistent workers; with
ordinary (re-created) workers, the loader's per-epoch base seed already varies the draws.
"""
from __future__ import annotations

import random

import numpy as np

__all__ = ["build_augment", "item_seed", "worker_init_fn"]


def build_augment():
    import albumentations as A
    import cv2

    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-25, 25),
                 border_mode=cv2.BORDER_REFLECT_101, p=0.3),
        A.OneOf([
            A.ElasticTransform(alpha=20, sigma=6, border_mode=cv2.BORDER_REFLECT_101),
            A.GridDistortion(num_steps=5, distort_limit=0.2, border_mode=cv2.BORDER_REFLECT_101),
        ], p=0.15),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.04, 0.12),
                        hole_width_range=(0.04, 0.12), p=0.1),
        A.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.03, p=0.2),
        A.RandomGamma(gamma_limit=(85, 115), p=0.1),
        A.CLAHE(clip_limit=2.0, p=0.05),
        A.GaussNoise(std_range=(0.01, 0.04), p=0.1),
    ], seed=0)


def item_seed(seed: int, epoch: int, index: int, base: int = 0) -> int:
    return int(np.random.SeedSequence([seed, epoch, index, base & 0xFFFFFFFF]).generate_state(1)[0])


def worker_init_fn(worker_id: int) -> None:
    """Seed python/numpy/OpenCV state of a DataLoader worker from torch's per-worker seed."""
    import cv2
    import torch

    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
