"""Run an exported ``.pte`` through ExecuTorch's Python runtime (``edgeseg segment --model x.pte``).

>>> seg = PteSegmenter("student.pte")                  # reads student.pte.json too
>>> mean, std = seg(x, seed=0)                         # x: B x 3 x H x W in [0, 1]; mask = mean > 0

Photos go through :class:`edgeseg.Segmenter` (``Segmenter.from_pretrained("student.pte")``),
which preprocesses them exactly as for the eager model; this class is the runtime wrapper it
uses. The program has a fixed batch (the sidecar's ``batch``, 1 by default): ``__call__`` runs
any number of images through it batch by batch. The initial noise is given (``B*N x 1 x H x W``,
image b's ensemble in rows b*N .. b*N+N-1, as the eager sampler takes it) or drawn in one call
from a ``torch.Generator`` seeded with `seed`, so the same images and seed give the same masks.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from edgeseg.errors import EdgesegError
from edgeseg.mobile import sidecar as sc

__all__ = ["PteSegmenter"]


class PteSegmenter:
    """A .pte segmenter and its sidecar; callable on preprocessed image batches."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise EdgesegError(f"{self.path}: no such .pte file" if not self.path.exists()
                               else f"{self.path}: not a regular file")
        self.meta = sc.read_sidecar(self.path)
        if self.meta.get("target") != "executorch":
            raise EdgesegError(f"{self.path}: sidecar describes a {self.meta.get('target')!r} export, not executorch")
        if self.meta.get("status", "ok") != "ok":
            raise EdgesegError(f"{self.path}: this export failed its parity check; re-export it")
        side = sc.sidecar_path(self.path)
        if verify:
            digest, size = sc.file_digest(self.path)
            if digest != self.meta.get("sha256"):
                raise EdgesegError(f"{self.path}: sha256 does not match its sidecar (file changed after export)")
            sc.check_contract(self.meta, side)
        else:
            sc.check_contract({k: v for k, v in self.meta.items() if k != "contract_sha256"}, side)
        try:
            from executorch.runtime import Runtime
        except ImportError as e:  # pragma: no cover
            raise EdgesegError(f"running a .pte needs ExecuTorch: pip install 'edgeseg[mobile]' ({e})") from None
        try:
            self.program = Runtime.get().load_program(self.path)
            self.method = self.program.load_method("forward")
        except (RuntimeError, ValueError) as e:
            msg = " ".join(str(e).split())[:160]
            raise EdgesegError(f"{self.path}: not a loadable ExecuTorch program ({msg})") from None
        self.batch = int(self.meta["batch"])
        self.ensemble = int(self.meta["ensemble"])
        self.steps = int(self.meta["steps"])
        self.image_size = tuple(int(v) for v in self.meta["image_size"])
        self.threshold = float(self.meta["threshold"])

    def __repr__(self) -> str:
        return (f"PteSegmenter({str(self.path)!r}, preset={self.meta['preset']!r}, K={self.steps}, "
                f"N={self.ensemble}, quantize={self.meta['quantize']!r})")

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != self.image_size:
            raise EdgesegError(
                f"expected images B x 3 x {self.image_size[0]} x {self.image_size[1]} "
                f"(see the sidecar's preprocessing), got {tuple(images.shape)}"
            )
        return images.detach().to("cpu", torch.float32).contiguous()

    def __call__(self, images: torch.Tensor, noise: torch.Tensor | None = None, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean B x 1 x H x W in [-1, 1], std B x 1 x H x W) for preprocessed images."""
        images = self._check(images)
        b, n_ens, (h, w) = self.batch, self.ensemble, self.image_size
        n = images.shape[0]
        if noise is None:
            noise = torch.randn((n * n_ens, 1, h, w), generator=torch.Generator().manual_seed(int(seed)))
        if tuple(noise.shape) != (n * n_ens, 1, h, w):
            raise EdgesegError(f"noise must be {n * n_ens} x 1 x {h} x {w} for {n} image(s), got {tuple(noise.shape)}")
        noise = noise.detach().to("cpu", torch.float32)
        means, stds = [], []
        for i in range(0, n, b):
            chunk, nz = images[i : i + b], noise[i * n_ens : (i + b) * n_ens]
            real = chunk.shape[0]
            if real < b:  # pad the last chunk up to the program's fixed batch
                chunk = torch.cat([chunk, chunk[-1:].expand(b - real, -1, -1, -1)])
                nz = torch.cat([nz, nz[-n_ens:].repeat(b - real, 1, 1, 1)])
            mean, std = self.method.execute((chunk.contiguous(), nz.contiguous()))[:2]
            means.append(mean[:real].clone())
            stds.append(std[:real].clone())
        return torch.cat(means), torch.cat(stds)

    def masks(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Boolean masks B x 1 x H x W (mean > threshold)."""
        return self(images, seed=seed)[0] > self.threshold

    def latency(self, repeats: int = 10, warmup: int = 2) -> dict:
        """Median/min wall time of one program call (batch `batch`) in ms, random inputs."""
        h, w = self.image_size
        x = torch.rand(self.batch, 3, h, w)
        nz = torch.randn(self.batch * self.ensemble, 1, h, w)
        for _ in range(warmup):
            self.method.execute((x, nz))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.method.execute((x, nz))
            times.append((time.perf_counter() - t0) * 1000)
        times.sort()
        return {"median_ms": times[len(times) // 2], "min_ms": times[0], "repeats": repeats, "batch": self.batch}
