"""Sketch&Walk prefill step 6 in Triton: one walk update before its row normalisation.

Math (:func:`sketch_walk.walk.walk_update` is the PyTorch reference, :func:`walk_step_reference` here):

    C[b, g'] = (1 - beta) W[b, g'] + beta R[b, g'] @ W[b, g']          (then R_l = rownorm(C), done by
                                                                        :mod:`.row_select` with the selection)

W (B, G', n_b, n_b) and R (B, G_R, n_b, n_b) fp32 are lower triangular (block-causal), G_R = 1 (broadcast over
G') or G'. Both being lower triangular, C[i, j] = (1 - beta) W[i, j] + beta sum_{j <= k <= i} R[i, k] W[k, j]:
the output tile (I, J) only runs over the k tiles J..I (1/6 of a dense product's FLOPs: ~2.9 GFLOP at
n_b = 2048), tiles above the diagonal are written as zeros without any product.

Grid (row tiles reversed, column tiles, B * G'). Products are tl.dot in TF32 on the GPU (R, W >= 0: no
cancellation, ~1e-3 relative at worst per entry, far below what changes a top-k; the interpreter is exact fp32).
``precision="bf16"`` rounds both tiles to bf16 in registers first (fp32's exponent range, so no probability
flushes; 8-bit mantissa, ~4e-3 relative): 0.045 vs 0.105 ms at 128K on the H100, with 99.8% of rows keeping
the same top-16 set on the benchmark's layer (docs/PERFORMANCE.md). An option, not the default:
TF32 keeps the lists closer to the torch reference's.

Bounds: when n_b is a multiple of 128 (every tile size here divides it: 8K, 16K, ... tokens at block 64) the
loads and stores carry no masks (``EVEN``). The masks are on the contiguous dimension, and n_b is not
specialised (see :mod:`._launch`), so Triton cannot prove them constant over 16 bytes and would issue 4-byte
accesses instead of 16-byte ones.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from ..core.kernels._launch import TunedKernel, cdiv, pow2

WALK_PRECISIONS = ("tf32", "tf32x3", "ieee", "bf16")
EVEN_MULTIPLE = 128             # n_b a multiple of this: every tile size divides it (no bounds masks)


@triton.jit(do_not_specialize=["N_BLOCKS", "nb_key"])
def _walk_step_kernel(
    R, W, C,
    beta,
    stride_rb, stride_rg, stride_rm,
    stride_wb, stride_wg, stride_wm,
    stride_cb, stride_cg, stride_cm,
    GP, N_BLOCKS,
    nb_key,                          # autotune key only
    DOT_PREC: tl.constexpr,          # tl.dot input precision, or "bf16": tiles rounded to bf16
    BLOCK: tl.constexpr,             # square output tiles (so the k range is whole tiles)
    BLOCK_K: tl.constexpr,           # divides BLOCK
    EVEN: tl.constexpr,              # N_BLOCKS % BLOCK == 0: no bounds masks
):
    n_tiles = tl.cdiv(N_BLOCKS, BLOCK)
    pid_m = n_tiles - 1 - tl.program_id(0)             # long k ranges first
    pid_n = tl.program_id(1)
    z = tl.program_id(2)
    b = (z // GP).to(tl.int64)
    gp = (z % GP).to(tl.int64)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N_BLOCKS
    col_ok = cols < N_BLOCKS
    offs_k = tl.arange(0, BLOCK_K)
    r_base = R + b * stride_rb + gp * stride_rg + rows[:, None].to(tl.int64) * stride_rm
    w_base = W + b * stride_wb + gp * stride_wg

    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    k_hi = tl.minimum(N_BLOCKS, (pid_m + 1) * BLOCK)   # empty range above the diagonal (pid_n > pid_m)
    for k0 in range(pid_n * BLOCK, k_hi, BLOCK_K):
        ks = k0 + offs_k
        r_ptrs = r_base + ks[None, :]
        w_ptrs = w_base + ks[:, None].to(tl.int64) * stride_wm + cols[None, :]
        if EVEN:
            r = tl.load(r_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = ks < N_BLOCKS
            r = tl.load(r_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_PREC == "bf16":
            acc = tl.dot(r.to(tl.bfloat16), w.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(r, w, acc, input_precision=DOT_PREC)
    wij_ptrs = w_base + rows[:, None].to(tl.int64) * stride_wm + cols[None, :]
    c_ptrs = C + b * stride_cb + gp * stride_cg + rows[:, None].to(tl.int64) * stride_cm + cols[None, :]
    if EVEN:
        c = (1.0 - beta) * tl.load(wij_ptrs) + beta * acc
        tl.store(c_ptrs, c)
    else:
        mask = row_ok[:, None] & col_ok[None, :]
        c = (1.0 - beta) * tl.load(wij_ptrs, mask=mask, other=0.0) + beta * acc
        tl.store(c_ptrs, c, mask=mask)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def candidate_configs() -> list:
    """GPU autotune space: (BLOCK, BLOCK_K, num_warps, num_stages); fp32 stages of 2 x BLOCK x BLOCK_K.
    Compiled for sm_90: 64/32 w4 s3 48 KB, 128/32 w8 s3 96 KB, no spills (BLOCK_K 64 spilled: left out)."""
    cfgs = [triton.Config({"BLOCK": bl, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bl, bk, w, s in ((64, 32, 4, 3), (128, 32, 8, 3), (64, 32, 4, 4))]
    # EVEN (no bounds masks) is decided once for all configs: each BLOCK must divide EVEN_MULTIPLE
    assert all(EVEN_MULTIPLE % c.kwargs["BLOCK"] == 0 and c.kwargs["BLOCK"] % c.kwargs["BLOCK_K"] == 0 for c in cfgs)
    return cfgs


_tuned: Dict[int, TunedKernel] = {}


def _tuned_kernel() -> TunedKernel:
    if 0 not in _tuned:
        _tuned[0] = TunedKernel(_walk_step_kernel, candidate_configs(), ["nb_key", "DOT_PREC", "EVEN"])
    return _tuned[0]


def walk_step_triton(r: torch.Tensor, w: torch.Tensor, beta: float, out: Optional[torch.Tensor] = None,
                     config: Optional[dict] = None, precision: Optional[str] = None,
                     unmasked: bool = True) -> torch.Tensor:
    """C = (1 - beta) W + beta R @ W (module docstring). r (B, 1 or G', n_b, n_b), w (B, G', n_b, n_b) fp32,
    lower triangular; returns C (B, G', n_b, n_b) fp32 (``out`` when given; it must not alias r or w).
    ``precision``: one of :data:`WALK_PRECISIONS` (default: TF32, or $SKETCH_WALK_SELECT_DOT's tf32x3 / ieee).
    ``unmasked=False`` keeps the bounds masks even where n_b allows without (benchmarks compare the two)."""
    from .block_transition import dot_precision
    if w.dim() != 4 or r.dim() != 4 or r.shape[0] != w.shape[0] or r.shape[2:] != w.shape[2:] or \
            r.shape[1] not in (1, w.shape[1]) or w.shape[2] != w.shape[3]:
        raise ValueError(f"walk shapes: R {tuple(r.shape)} and W {tuple(w.shape)} do not match (the previous "
                         f"layer's R must be (B, 1 or G', n_b, n_b) for the same prompt)")
    b, gp, nb, _ = w.shape
    r = r.float().contiguous()
    w = w.float().contiguous()
    if out is None:
        out = torch.empty(b, gp, nb, nb, dtype=torch.float32, device=w.device)
    if b == 0 or nb == 0:
        return out
    srg = r.stride(1) if r.shape[1] == gp else 0
    args = (r, w, out, float(beta), r.stride(0), srg, r.stride(2), w.stride(0), w.stride(1), w.stride(2),
            out.stride(0), out.stride(1), out.stride(2), gp, nb, pow2(nb))
    prec = precision or dot_precision()
    if prec == "fp16":      # R and W are probabilities down to ~1e-30: fp16 would flush them; the walk is cheap
        prec = "tf32"
    if prec not in WALK_PRECISIONS:
        raise ValueError(f"walk precision {prec!r}: one of {', '.join(WALK_PRECISIONS)}")
    even = unmasked and nb % EVEN_MULTIPLE == 0
    pinned = config
    if pinned is None and _interpret():
        pinned = {"BLOCK": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    if pinned is not None:
        bl, bk = int(pinned["BLOCK"]), int(pinned.get("BLOCK_K", pinned["BLOCK"]))
        if bl < 16 or bl & (bl - 1) or bk < 16 or bl % bk:
            raise ValueError(f"walk config BLOCK {bl} / BLOCK_K {bk}: powers of two >= 16, BLOCK_K dividing BLOCK")
        t = cdiv(nb, bl)
        _walk_step_kernel[(t, t, b * gp)](*args, DOT_PREC=prec, BLOCK=bl, BLOCK_K=bk,
                                         EVEN=even and EVEN_MULTIPLE % bl == 0,
                                         num_warps=int(pinned.get("num_warps", 4)),
                                         num_stages=int(pinned.get("num_stages", 2)))
        return out

    def grid(m):
        t = cdiv(nb, m["BLOCK"])
        return (t, t, b * gp)
    _tuned_kernel()(grid, (pow2(nb), prec, even), *args, DOT_PREC=prec, EVEN=even)
    return out


def walk_step_reference(r: torch.Tensor, w: torch.Tensor, beta: float) -> torch.Tensor:
    """(1 - beta) W + beta R @ W in the inputs' dtype (r broadcast over W's groups when it has one)."""
    return (1.0 - beta) * w + beta * torch.matmul(r, w)
