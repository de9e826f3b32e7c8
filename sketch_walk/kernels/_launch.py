"""Host-side helpers shared by the Triton kernel wrappers (input layout checks, sizes).

Convention of every kernel here: integer arguments that follow the prompt or cache length (N_CTX,
N_BLOCKS, N_KEYS, NB, split and tile counts, NEW_BLOCK) are listed in ``do_not_specialize``. Triton
otherwise compiles a new variant whenever such a value turns divisible by 16 (or equals 1), and a
generation crosses those values every few steps, compiling inside timed samples. (This was a suspect for
the slow first sample of a run, 9.6 s of decode against a median 1.3 s for Gemma-3 at 32K on the H100;
with it in place the first sample still took 3.5x the median, so most of that cost lies elsewhere:
call_api's warm-up now runs a whole generation.) Sizes that pick a tile (autotune keys, constexprs)
stay specialised.
"""
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
