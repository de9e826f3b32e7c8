"""Host-side helpers shared by the Triton kernel wrappers (input layout checks, sizes)."""
from __future__ import annotations

from typing import Tuple

import torch


def pow2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, (int(x) - 1).bit_length())


def check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size} must be a power of two >= 16")


def unit_stride(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The kernels index the head dim with stride 1: copy only tensors whose last dim is strided."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def int32_lists(block_idx: torch.Tensor, block_cnt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kept-block lists as the kernels read them: int32, unit stride along the last dim."""
    return unit_stride(block_idx.to(torch.int32), block_cnt.to(torch.int32))
