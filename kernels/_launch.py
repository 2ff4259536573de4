"""Launch helpers shared by the kernels: Triton availability, backend choice, block and warp
sizes, contiguity, the interpreter's quirks and the launch device.

Nothing here imports Triton at module import time, nor anything of `edgeseg` outside
`edgeseg.kernels` (the core chooses the backend and passes tensors and coefficients in).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

__all__ = [
    "BACKENDS",
    "triton_available",
    "interpreting",
    "check_backend",
    "use_triton",
    "device_of",
    "next_pow2",
    "num_warps",
    "cdiv",
    "contiguous",
    "store_dtype",
]

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports (checked once, on first call)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # older Triton: the environment variable
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return backend


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """"torch": never; "triton": always; "auto": when every tensor is on CUDA and Triton imports."""
    check_backend(backend)
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    return all(x.is_cuda for x in tensors) and triton_available()


def device_of(x: torch.Tensor):
    """Launch on the tensor's GPU even when another one is current (multi-GPU processes)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def num_warps(block: int) -> int:
    """Warps for a 1-D tile of `block` elements."""
    return 8 if block >= 2048 else 4 if block >= 512 else 2 if block >= 128 else 1


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def contiguous(*xs: torch.Tensor | None):
    """The tensors made contiguous (None passes through)."""
    return tuple(x.contiguous() if x is not None else None for x in xs)


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel should store `dtype` results in. Triton's CPU interpreter truncates
    fp32 -> bf16/fp16 stores (the GPU rounds to nearest even); there, store fp32 and let torch
    round afterwards (tests only)."""
    return torch.float32 if interpreting() else dtype
