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

from typing import Callable, Dict, Tuple

import torch
import triton

LOG2E = 1.4426950408889634      # log2(e): the kernels' softmaxes run in base 2 (exp2), scores scaled by it


def pow2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, (int(x) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side grids (triton.cdiv, a ConstexprFunction, costs ~1.7 us a host call, this ~0.1 us)."""
    return -(-a // b)


_SM_COUNT: Dict[int, int] = {}


def sm_count(device: torch.device, default: int = 132) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the properties call is not free), else ``default``."""
    if device.type != "cuda":
        return default
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


def check_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size} must be a power of two >= 16")


def unit_stride(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The kernels index the head dim with stride 1: copy only tensors whose last dim is strided."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def int32_lists(block_idx: torch.Tensor, block_cnt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kept-block lists as the kernels read them: int32, unit stride along the last dim."""
    return unit_stride(block_idx.to(torch.int32), block_cnt.to(torch.int32))


def config_kwargs(cfg) -> dict:
    """A triton.Config as launch keyword arguments (its constexprs plus num_warps, num_stages, ...)."""
    if hasattr(cfg, "all_kwargs"):
        return dict(cfg.all_kwargs())
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


class TunedKernel:
    """A Triton kernel autotuned over ``configs``, launched through triton's Autotuner only the first time a
    ``key`` is seen; later launches with that key call the kernel with the config the Autotuner chose.

    Why: Autotuner.run rebuilds a dict of every argument and scans its argument list for each key at every
    call. On the H100 machine's host (benchmarks/host_overhead.py, A/B in one call) skipping it took the
    walk's launch from 44 to 29 us and the transition's two from 110-121 to 74-81 us (an empty kernel's
    launch costs ~15 us). At short prompts the selection is host-bound (6 launches for ~0.07 ms of GPU work
    at 8K tokens), so this is visible time. The direct launch skips what the Autotuner does around a launch
    (config pre-hooks, reset_to_zero / restore_value, pruning): configs must not need any of it.
    ``key`` must determine the Autotuner's own key (its key arguments and the tensor dtypes) for the
    remembered config to be the one tuned for it; any config of the space is correct for any input, so a
    coarser key could cost speed, never results.
    """

    def __init__(self, kernel, configs: list, key: list):
        if any(getattr(c, "pre_hook", None) for c in configs):
            raise ValueError("TunedKernel launches configs directly: a config pre_hook would be skipped")
        self.kernel = kernel
        self.tuner = triton.autotune(configs=configs, key=key)(kernel)
        self.chosen: Dict[tuple, dict] = {}

    def __call__(self, grid: Callable[[dict], tuple], key: tuple, *args, **meta) -> None:
        chosen = self.chosen.get(key)
        if chosen is None:
            self.tuner[grid](*args, **meta)
            self.chosen[key] = config_kwargs(self.tuner.best_config)
        else:
            self.kernel[grid](*args, **meta, **chosen)
