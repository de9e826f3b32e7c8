"""Sketch&Walk prefill step 1 / 3b in Triton: block pooling of Q and K in one pass over both.

Math (docs/ALGORITHM.md steps 1, 3b; :mod:`sketch_walk.core.block_summary` is the PyTorch reference): n tokens, block
size B, n_b = ceil(n / B) blocks, the last one partial with c_i = min(B, n - i B) real tokens.

    q_bar[b, h, i]  = (1 / c_i) sum_{t in block i} q[b, h, t]          fp32 sums    (step 1)
    key_summary "minmax":
        kmax[b, g, i] = max_{t in block i} k[b, g, t],  kmin likewise    fp32 (exact)  (step 3b)
    key_summary "mean":
        ksum[b, g, i] = sum_{t in block i} k[b, g, t]                    fp64 (exact for bf16/fp16/fp32
                                                                          keys: the decode state's running sums)
        kbar[b, g, i] = float32(ksum / c_i)                              bit-equal to the torch path's
    counts[i] = c_i (fp64, the decode state's block counts)
    with ``half_scale`` c (minmax only; the fp16 operands of :mod:`.block_transition`, which then needs no
    rounding launches of its own):
        q_bar[b, h, i] = fp16(clamp(c * mean, +-65504)),  ka16 / kb16 = fp16(clamp(kmax / kmin, +-65504))

Shapes: q (B, H, n, d), k (B, H_kv, n, d), any strides with the last one 1 (a model's (B, n, H, d)
transposed view is read in place). Outputs are contiguous.

Kernel layout: one program per (key block i, sequence b, key head g, stream s), grid (n_b, B * H_kv, r + 1)
(``blocks_per_prog`` p > 1: p consecutive blocks a program, grid (ceil(n_b / p), B * H_kv, r + 1)):
stream s < r averages query head g r + s, stream s = r summarises key head g, so every byte of Q and K is
read exactly once, in one launch (at 128K tokens, Llama-3.1-8B: 1 GiB of bf16 Q + 0.25 GiB of K, ~0.45 ms
at H100 bandwidth: the floor of the whole selection). Each program streams its block through a 2-D
register accumulator (sum / max / min per element, BLOCK_T x d) and reduces across tokens once at the end:
no cross-warp reduction inside the load loop, so a program's loads are all in flight together and many
small programs share an SM. (The first version, one program per (block, key head) reducing every 16-token
load across warps and walking the r query heads in turn, ran at ~1/4 of bandwidth: 1.85 ms at 128K.)
Programs of (b = 0, g = 0, s = r) also write ``counts``.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..core.kernels._launch import cdiv, check_block_size, pow2, unit_stride


@triton.jit
def _clamp_fp16(x):
    """fp16(clamp(x, +-65504)) with NaN kept NaN, as torch.clamp does (tl.maximum alone would drop it)."""
    x = tl.maximum(x, -65504.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, 65504.0, propagate_nan=tl.PropagateNan.ALL).to(tl.float16)


@triton.jit(do_not_specialize=["N_CTX", "N_BLOCKS"])
def _block_pool_kernel(
    Q, K, QBar, KA, KB, Counts, KA16, KB16,
    q_scale,                        # HALF_OUT: QBar receives the block mean times this (the score scale)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    H_KV, N_CTX, N_BLOCKS,
    GROUP: tl.constexpr,            # r = H / H_kv
    BLOCK_SIZE: tl.constexpr,       # tokens per block
    BLOCK_T: tl.constexpr,          # tokens per load (divides BLOCK_SIZE); the accumulator is BLOCK_T x BLOCK_D
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,          # pow2 >= HEAD_DIM
    KEY_MEAN: tl.constexpr,         # False: KA = kmax, KB = kmin (fp32); True: KA = ksum (fp64), KB = kbar (fp32)
    HALF_OUT: tl.constexpr,         # minmax only: QBar fp16 scaled, and fp16 copies KA16 / KB16 of kmax / kmin
    BLOCKS_PER_PROG: tl.constexpr,  # consecutive blocks one program pools (their loads are all issued together)
):
    bg = tl.program_id(1)
    stream = tl.program_id(2)       # < GROUP: query head g * GROUP + stream; == GROUP: key head g
    b = (bg // H_KV).to(tl.int64)
    g = (bg % H_KV).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for u in tl.static_range(0, BLOCKS_PER_PROG):
        blk = tl.program_id(0) * BLOCKS_PER_PROG + u
        if blk < N_BLOCKS:
            start = blk * BLOCK_SIZE
            count = tl.minimum(N_CTX - start, BLOCK_SIZE)
            if stream < GROUP:
                head = g * GROUP + stream
                q_base = Q + b * stride_qb + head * stride_qh
                acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
                for t0 in tl.static_range(0, BLOCK_SIZE, BLOCK_T):
                    pos = start + t0 + offs_t
                    ok = (pos < N_CTX)[:, None] & d_ok[None, :]
                    acc += tl.load(q_base + pos[:, None].to(tl.int64) * stride_qn + offs_d[None, :], mask=ok,
                                   other=0.0).to(tl.float32)
                q_row = ((b * H_KV * GROUP + head) * N_BLOCKS + blk) * HEAD_DIM
                q_mean = tl.sum(acc, axis=0) * (1.0 / count.to(tl.float32))
                if HALF_OUT:
                    q_mean = _clamp_fp16(q_mean * q_scale)
                tl.store(QBar + q_row + offs_d, q_mean, mask=d_ok)
            else:
                out_row = (bg.to(tl.int64) * N_BLOCKS + blk) * HEAD_DIM   # (b, g, blk) row of (B, H_kv, n_b, d)
                k_base = K + b * stride_kb + g * stride_kh
                if KEY_MEAN:
                    ksum = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float64)
                else:
                    kmax = tl.full([BLOCK_T, BLOCK_D], float("-inf"), dtype=tl.float32)
                    kmin = tl.full([BLOCK_T, BLOCK_D], float("inf"), dtype=tl.float32)
                for t0 in tl.static_range(0, BLOCK_SIZE, BLOCK_T):
                    pos = start + t0 + offs_t
                    ok = (pos < N_CTX)[:, None] & d_ok[None, :]
                    xk = tl.load(k_base + pos[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=ok,
                                 other=0.0)
                    if KEY_MEAN:
                        ksum += xk.to(tl.float64)
                    else:
                        xf = xk.to(tl.float32)
                        kmax = tl.maximum(kmax, tl.where(ok, xf, float("-inf")))
                        kmin = tl.minimum(kmin, tl.where(ok, xf, float("inf")))
                if KEY_MEAN:
                    total = tl.sum(ksum, axis=0)
                    tl.store(KA + out_row + offs_d, total, mask=d_ok)
                    tl.store(KB + out_row + offs_d, (total / count.to(tl.float64)).to(tl.float32), mask=d_ok)
                else:
                    k_hi = tl.max(kmax, axis=0)
                    k_lo = tl.min(kmin, axis=0)
                    tl.store(KA + out_row + offs_d, k_hi, mask=d_ok)
                    tl.store(KB + out_row + offs_d, k_lo, mask=d_ok)
                    if HALF_OUT:
                        tl.store(KA16 + out_row + offs_d,
                                 _clamp_fp16(k_hi), mask=d_ok)
                        tl.store(KB16 + out_row + offs_d,
                                 _clamp_fp16(k_lo), mask=d_ok)
                if bg == 0:
                    tl.store(Counts + blk, count.to(tl.float64))


class PooledBlocks(NamedTuple):
    """Step-1 / 3b summaries: q_bar (B, H, n_b, d) fp32; counts (n_b,) fp64; minmax: ka = kmax, kb = kmin
    (B, H_kv, n_b, d) fp32; mean: ka = ksum (B, H_kv, n_b, d) fp64, kb = kbar fp32.
    With ``half_scale`` (minmax): q_bar is fp16, the block means times half_scale, and ka16 / kb16 are fp16
    copies of kmax / kmin, all clamped to +-65504: the fp16 operands of :mod:`.block_transition`."""
    q_bar: torch.Tensor
    counts: torch.Tensor
    ka: torch.Tensor
    kb: torch.Tensor
    ka16: Optional[torch.Tensor] = None
    kb16: Optional[torch.Tensor] = None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_pool_reference(q: torch.Tensor, k: torch.Tensor, block_size: int, key_summary: str) -> PooledBlocks:
    """The torch path's pooling (sketch_walk.sketch), as the selector computes it."""
    from ..core.block_summary import block_minmax, block_rows, block_sum
    rows = block_rows(q.shape[-2], block_size, device=q.device)
    q_bar = block_sum(q, block_size) / rows.unsqueeze(-1)
    counts = rows.double()
    if key_summary == "mean":
        ksum = block_sum(k, block_size, dtype=torch.float64)
        return PooledBlocks(q_bar, counts, ksum, (ksum / counts.unsqueeze(-1)).float())
    kmax, kmin = block_minmax(k, block_size)
    return PooledBlocks(q_bar, counts, kmax, kmin)


def block_pool_triton(q: torch.Tensor, k: torch.Tensor, block_size: int, key_summary: str = "minmax",
                      block_t: Optional[int] = None, num_warps: Optional[int] = None,
                      out: Optional[PooledBlocks] = None, half_scale: Optional[float] = None,
                      blocks_per_prog: int = 1) -> PooledBlocks:
    """Pool Q (block means) and K (minmax or fp64 sums + means) in one launch (module docstring).

    ``half_scale`` (minmax only): write the fp16 operands of the transition too (:class:`PooledBlocks`), so it
    needs no rounding launches. ``out``: preallocated contiguous outputs of the right shapes and dtypes (tests
    poison them), else new ones. ``block_t`` / ``num_warps`` / ``blocks_per_prog``: launch shape (benchmarks).
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"expected q (B, H, n, d) and k (B, H_kv, n, d); got {tuple(q.shape)}, {tuple(k.shape)}")
    b, h, n, d = q.shape
    hkv = k.shape[1]
    if h % hkv or k.shape[0] != b or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if key_summary not in ("minmax", "mean"):
        raise ValueError(f"key_summary {key_summary!r}")
    half = half_scale is not None
    if half and (key_summary != "minmax" or not half_scale > 0):
        raise ValueError(f"half_scale needs key_summary minmax and a scale > 0 (got {key_summary}, {half_scale})")
    check_block_size(block_size)
    q, k = unit_stride(q, k)
    nb = (n + block_size - 1) // block_size
    dev = q.device
    mean = key_summary == "mean"
    want = [(b, h, nb, d, torch.float16 if half else torch.float32), (nb, torch.float64),
            (b, hkv, nb, d, torch.float64 if mean else torch.float32), (b, hkv, nb, d, torch.float32)]
    if half:
        want += [(b, hkv, nb, d, torch.float16)] * 2
    if out is None:
        out = PooledBlocks(*(torch.empty(*w[:-1], dtype=w[-1], device=dev) for w in want))
    for t, w in zip(out, want):
        if t is None or tuple(t.shape) != w[:-1] or t.dtype != w[-1] or not t.is_contiguous():
            got = "None" if t is None else f"{tuple(t.shape)} {t.dtype}"
            raise ValueError(f"out tensor {got} should be contiguous {w[:-1]} {w[-1]}")
    if nb == 0 or b == 0 or h == 0:
        return out
    q_bar, counts, ka, kb = out[:4]
    ka16, kb16 = (out.ka16, out.kb16) if half else (ka, kb)
    bd = max(16, pow2(d))
    # 4K elements per load (32 tokens x 128 channels, 8 KB of bf16): a 64-token block is 2 loads, both in
    # flight; 2 warps (the fp32 accumulator is 64 registers a thread), so many small programs share an SM:
    # measured on the H100 at 64K tokens 0.25 ms at 2 warps, 0.28 at 4, 0.49 at 8 (docs/PERFORMANCE.md).
    bt = block_t or max(1, 4096 // bd)
    bt = min(pow2(bt), block_size)
    bpp = max(1, int(blocks_per_prog))
    grid = (cdiv(nb, bpp), b * hkv, h // hkv + 1)
    _block_pool_kernel[grid](q, k, q_bar, ka, kb, counts, ka16, kb16, float(half_scale or 1.0),
                             q.stride(0), q.stride(1), q.stride(2),
                             k.stride(0), k.stride(1), k.stride(2),
                             hkv, n, nb,
                             GROUP=h // hkv, BLOCK_SIZE=block_size, BLOCK_T=bt, HEAD_DIM=d, BLOCK_D=bd,
                             KEY_MEAN=mean, HALF_OUT=half, BLOCKS_PER_PROG=bpp, num_warps=num_warps or 2)
    return out
