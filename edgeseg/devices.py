"""The device a run trains on: torchrun's process group (DDP) when launched by torchrun, the GPU
when there is one, and whether bf16 autocast pays there."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "dist_info", "bf16_supported"]


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> torch.device:
    """Join the torchrun process group if launched by torchrun; pick the device."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast pays on this device: CUDA, or a CPU with native bf16 (AVX-512 BF16 or AMX),
    where oneDNN runs bf16 convolutions and matmuls natively instead of emulating them."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
