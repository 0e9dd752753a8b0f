"""Data-parallel attribution on torch.distributed (torchrun / accelerate launch): placeholder single-process API.

(Extended by the scale-out work; the single-process behaviour is: rank 0 of a world of 1.)
"""
from __future__ import annotations

import os

import torch.distributed as dist


def init_from_env() -> None:
    """Initialise the default process group when launched by torchrun / accelerate (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from ..caploc_dist_backend import backend  # pragma: no cover  (replaced by the scale-out implementation)


def dist_info(device: str) -> tuple[int, int, str]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finalize() -> None:
    pass
