"""`edgeseg.Segmenter`: segment a photo with a trained student, eager or exported.

>>> import edgeseg
>>> seg = edgeseg.Segmenter.from_pretrained()          # the shipped real-lesion student
>>> out = seg.segment("lesion.jpg")                    # path, H x W x 3 uint8 RGB array or PIL image
>>> out.mask.shape == out.probability.shape            # the photo's own size

Preprocessing (one reader, resize to the model's square input, scale to [0, 1]) and
postprocessing (the soft prediction upsampled to the photo's size, then thresholded, so the
outline is smooth at any resolution) live here once; `edgeseg segment` calls this class.
Each shipped model's intended use, training data, metrics and limitations: docs/models/.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgeseg.errors import CheckpointError, EdgesegError

__all__ = ["Segmentation", "Segmenter", "UNCERTAINTY_MAPS", "uncertainty_map", "postprocess", "clean_mask"]

UNCERTAINTY_MAPS = ("margin", "spread", "combined")
MAX_STEPS = 250  # DDIM steps: at most the training timesteps (the CLI's cap too)
MAX_ENSEMBLE = 64  # the CLI's cap: memory grows with the ensemble


def uncertainty_map(mean, spread, kind: str):
    """Per-pixel uncertainty (larger = less sure, in [0, 1]) from the ensemble's mean in [-1, 1]
    and its spread (std), for torch tensors or numpy arrays alike:

    margin    ``1 - |mean|`` = ``1 - |2p - 1|``: 1 on the decision boundary, 0 where all members are
              sure; needs no ensemble;
    spread    the ensemble's standard deviation (0 everywhere with one member);
    combined  ``(margin + spread) / 2``.
    """
    if kind == "margin":
        return 1.0 - abs(mean)
    if kind == "spread":
        return spread
    if kind == "combined":
        return 0.5 * ((1.0 - abs(mean)) + spread)
    raise EdgesegError(f"unknown uncertainty map {kind!r}; known: {', '.join(UNCERTAINTY_MAPS)}")


@dataclass
class Segmentation:
    """One photo's result, at the photo's own resolution.

    ``probability``: lesion probability in [0, 1] (the sampler's mean mapped from [-1, 1]);
    ``mask``: ``probability > 0.5`` after :func:`clean_mask` (the defaults table's cleanup: none,
    chosen on validation); ``uncertainty``: the map chosen by measurement
    (:data:`edgeseg.defaults.UNCERTAINTY_MAP`, see :func:`uncertainty_map`), in [0, 1], larger =
    less sure.
    """

    mask: np.ndarray
    probability: np.ndarray
    uncertainty: np.ndarray

    @property
    def lesion_fraction(self) -> float:
        return float(self.mask.mean())


Predict = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class Segmenter:
    """A trained student and its sampler; see the module docstring.

    ``core`` is the :class:`~edgeseg.diffusion.SamplerCore` (network + scheduler + ensemble) for an
    eager model: the module ``edgeseg export`` traces, so the phone runs what :meth:`segment` runs.
    It is None for a loaded ``.pte`` (the program is the core).
    """

    def __init__(self, predict: Predict, image_size: int, steps: int, ensemble: int, source: str = "",
                 seed: int = 0, core: torch.nn.Module | None = None, sampler: str = "ddim", eta: float = 0.0):
        self._predict = predict
        self.image_size, self.steps, self.ensemble = int(image_size), int(steps), int(ensemble)
        self.source, self.seed, self.core = source, int(seed), core
        self.sampler, self.eta = sampler, float(eta)

    def __repr__(self) -> str:
        eta = f", eta {self.eta:g}" if self.eta else ""
        return (f"Segmenter({self.source!r}, {self.image_size}px, {self.sampler.upper()} {self.steps} step(s) x "
                f"{self.ensemble}{eta})")

    # ---- loading ---------------------------------------------------------------------
    @classmethod
    def from_model(cls, model, *, steps: int | None = None, ensemble: int | None = None, seed: int = 0,
                   source: str = "", sampler: str = "ddim", eta: float = 0.0, backend: str = "auto"
                   ) -> "Segmenter":
        """Wrap an eager DermoSegDiff (defaults for K and N from :mod:`edgeseg.defaults`).

        `sampler` "ddim" (K steps, `eta` as :class:`~edgeseg.diffusion.DDIMScheduler`) or "ddpm"
        (the paper's ancestral sampler, all T steps); `backend` as :func:`edgeseg.sampling.make_scheduler`
        ("torch" for the plain core step, as exported)."""
        from edgeseg.defaults import sampler_defaults
        from edgeseg.diffusion import SamplerCore
        from edgeseg.sampling import make_scheduler

        dk, dn = sampler_defaults(model.preset.prediction_type)
        sampler = str(sampler).lower()
        k = None if sampler == "ddpm" and steps is None else _positive(steps, dk, "steps", MAX_STEPS)
        n = _positive(ensemble, dn, "ensemble", MAX_ENSEMBLE)
        try:
            scheduler = make_scheduler(sampler, k, model.preset.prediction_type, backend,
                                       schedule=getattr(model, "noise_schedule", None), eta=eta)
        except ValueError as e:
            raise EdgesegError(str(e)) from None
        core = SamplerCore(model.eval(), scheduler, n)

        @torch.no_grad()
        def run(images: torch.Tensor, noise: torch.Tensor, gen: torch.Generator):
            device = next(model.parameters()).device
            return core(images.to(device), noise.to(device), generator=gen)

        return cls(run, model.preset.image_size, len(core.timesteps), n, source or model.preset.name, seed,
                   core=core, sampler=sampler, eta=eta)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, *, steps: int | None = None,
                        ensemble: int | None = None, seed: int = 0, eta: float = 0.0) -> "Segmenter":
        """``source``: a run folder, a ``.safetensors`` checkpoint, a shipped model's name, or an
        exported ``.pte``; ``None`` is the default shipped model (``edgeseg.defaults.DEFAULT_MODEL``)."""
        from edgeseg.checkpoint import load_model
        from edgeseg.defaults import DEFAULT_MODEL
        from edgeseg.runs import SHIPPED_MODELS, shipped_path

        source = DEFAULT_MODEL if source is None else source
        kw = dict(steps=steps, ensemble=ensemble, seed=seed, eta=eta)
        if isinstance(source, os.PathLike) and os.fspath(source) in SHIPPED_MODELS and not Path(source).exists():
            source = os.fspath(source)  # a Path of a shipped name names that model, as the str does
        if isinstance(source, str) and source in SHIPPED_MODELS:
            return cls.from_model(load_model(shipped_path(source)), source=source, **kw)
        path = Path(source)
        if path.suffix == ".pte":
            if eta:
                raise EdgesegError(f"{path}: an exported program runs DDIM with eta = 0; eta={eta} is eager only")
            return cls._from_pte(path, steps, ensemble, seed)
        if path.is_dir():
            path = path / "student.safetensors"
        if path.suffix != ".safetensors" or not path.exists():
            raise CheckpointError(f"{source}: not a run folder, .safetensors checkpoint, .pte program or shipped "
                                  f"model (shipped: {', '.join(SHIPPED_MODELS)})")
        return cls.from_model(load_model(path), source=str(path), **kw)

    @classmethod
    def _from_pte(cls, path: Path, steps: int | None, ensemble: int | None, seed: int) -> "Segmenter":
        from edgeseg.mobile import sidecar
        from edgeseg.mobile.runtime import PteSegmenter

        if path.is_file():  # the sidecar says what is baked in: refuse before the runtime loads (and talks)
            meta = sidecar.read_sidecar(path)
            for name in ("steps", "ensemble"):
                asked = {"steps": steps, "ensemble": ensemble}[name]
                if asked is not None and name in meta and int(asked) != int(meta[name]):
                    raise EdgesegError(f"{path}: the program has {name}={meta[name]} baked in; re-export for "
                                       f"{name}={asked}")
        pte = PteSegmenter(path)
        if pte.image_size[0] != pte.image_size[1]:
            raise EdgesegError(f"{path}: non-square programs are not supported ({pte.image_size})")

        def run(images: torch.Tensor, noise: torch.Tensor, gen: torch.Generator):
            return pte(images, noise)

        return cls(run, pte.image_size[0], pte.steps, pte.ensemble, str(path), seed)

    # ---- batched tensors (evaluation, export checks) -------------------------------------
    def predict(self, images: torch.Tensor, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean in [-1, 1], ensemble std) for B x 3 x S x S images in [0, 1]; mask = mean > 0.

        `noise` (B*N x 1 x S x S) is the initial x_T; when None it is drawn from `generator`
        (default: one seeded with ``seed``), which also feeds the sampler's own draws (eta > 0, DDPM)."""
        gen = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        b, _, h, w = images.shape
        if noise is None:
            noise = torch.randn((b * self.ensemble, 1, h, w), generator=gen)
        elif tuple(noise.shape) != (b * self.ensemble, 1, h, w):
            raise EdgesegError(f"noise must be {b * self.ensemble} x 1 x {h} x {w} for {b} image(s) and an "
                               f"ensemble of {self.ensemble}, got {tuple(noise.shape)}")
        return self._predict(images, noise, gen)

    # ---- one photo -----------------------------------------------------------------------
    def preprocess(self, image) -> tuple[torch.Tensor, np.ndarray, tuple[int, int]]:
        """(1 x 3 x S x S model input, the decoded RGB, the photo's (H, W))."""
        from edgeseg.imageio import resize_rgb

        rgb = _load(image)
        x = torch.from_numpy(resize_rgb(rgb, self.image_size)).permute(2, 0, 1)[None].float() / 255.0
        return x, rgb, rgb.shape[:2]

    def segment(self, image) -> Segmentation:
        """Segment one photo (path, H x W x 3 uint8 RGB array, or PIL image)."""
        return self.segment_photo(image)[0]

    def segment_photo(self, image) -> tuple[Segmentation, np.ndarray]:
        """:meth:`segment`, plus the decoded RGB (the photo's size, as displayed) for drawing."""
        x, rgb, hw = self.preprocess(image)
        mean, std = self.predict(x)
        return postprocess(mean[0, 0].cpu().numpy(), hw, std[0, 0].cpu().numpy()), rgb


def clean_mask(mask: np.ndarray, how: str | None = None) -> np.ndarray:
    """The thresholded mask after the cleanup `how` (default :data:`edgeseg.defaults.MASK_CLEANUP`):
    "largest-filled" keeps the largest 8-connected lesion and fills its holes; "none" returns it as is."""
    from edgeseg.defaults import MASK_CLEANUP, MASK_CLEANUPS

    how = how or MASK_CLEANUP
    if how not in MASK_CLEANUPS:
        raise EdgesegError(f"unknown mask cleanup {how!r}; known: {', '.join(MASK_CLEANUPS)}")
    if how == "none" or not mask.any():
        return mask
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def postprocess(mean: np.ndarray, hw: tuple[int, int], spread: np.ndarray | None = None,
                kind: str | None = None, cleanup: str | None = None) -> Segmentation:
    """Upsample the soft S x S mean (in [-1, 1]) to H x W, then threshold: a smooth outline, cleaned
    by :func:`clean_mask` (`cleanup`, default the table's); the uncertainty map (`kind`, default the
    table's) from the upsampled mean and spread. The probability stays the model's own."""
    import cv2

    from edgeseg.defaults import UNCERTAINTY_MAP

    h, w = hw

    def up(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32)
        return cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR) if a.shape != (h, w) else a

    m = np.clip(up(mean), -1.0, 1.0)
    sd = up(spread) if spread is not None else np.zeros_like(m)
    u = np.clip(uncertainty_map(m, sd, kind or UNCERTAINTY_MAP), 0.0, 1.0).astype(np.float32)
    p = (m + 1.0) * 0.5
    return Segmentation(mask=clean_mask(p > 0.5, cleanup), probability=p, uncertainty=u)


def _positive(value: int | None, default: int, name: str, high: int) -> int:
    v = default if value is None else value
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= high:
        raise EdgesegError(f"{name} must be a whole number from 1 to {high}, got {value!r}")
    return int(v)


def _load(image) -> np.ndarray:
    """The RGB uint8 of a path, an array or a PIL image, as displayed.

    Paths are decoded at full size (no JPEG draft decoding), so ``segment(path)`` and
    ``segment(array of the same decoded photo)`` give the same result."""
    from edgeseg.imageio import pil_to_rgb, read_rgb

    if isinstance(image, (str, os.PathLike)):
        return read_rgb(image)
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL: the same conversion as a file
        if min(image.size) < 1:
            raise EdgesegError(f"the PIL image is {image.size[0]}x{image.size[1]}, it has no pixels")
        return pil_to_rgb(image, "PIL image")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise EdgesegError(f"expected an H x W x 3 uint8 RGB image, got shape {arr.shape} dtype {arr.dtype}")
    if min(arr.shape[:2]) < 1:
        raise EdgesegError(f"the image is {arr.shape[1]}x{arr.shape[0]}, it has no pixels")
    return arr
