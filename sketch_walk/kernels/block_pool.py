"""Sketch&Walk prefill step 1 / 3b in Triton: block pooling of Q and K in one pass over both.

Math (ALGORITHM.md steps 1, 3b; :mod:`sketch_walk.sketch` is the PyTorch reference): n tokens, block
size B, n_b = ceil(n / B) blocks, the last one partial with c_i = min(B, n - i B) real tokens.

    q_bar[b, h, i]  = (1 / c_i) sum_{t in block i} q[b, h, t]          fp32 sums    (step 1)
    key_summary "minmax":
        kmax[b, g, i] = max_{t in block i} k[b, g, t],  kmin likewise    fp32 (exact)  (step 3b)
    key_summary "mean":
        ksum[b, g, i] = sum_{t in block i} k[b, g, t]                    fp64 (exact for bf16/fp16/fp32
                                                                          keys: the decode state's running sums)
        kbar[b, g, i] = float32(ksum / c_i)                              bit-equal to the torch path's
    counts[i] = c_i (fp64, the decode state's block counts)

Shapes: q (B, H, n, d), k (B, H_kv, n, d), any strides with the last one 1 (a model's (B, n, H, d)
transposed view is read in place). Outputs are contiguous.

Kernel layout: one program per (key block i, sequence b, key head g), grid (n_b, B * H_kv). It reads
the key head's block once (BLOCK_T tokens at a time) for its summary, then the r = H / H_kv query heads
of the group for their means: every byte of Q and K is read exactly once, one launch for both (at 128K
tokens, Llama-3.1-8B: 1 GiB of bf16 Q + 0.25 GiB of K, ~0.45 ms at H100 bandwidth: the floor of the
whole selection). Programs of (b = 0, g = 0) also write ``counts``.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._launch import check_block_size, pow2, unit_stride


@triton.jit
def _block_pool_kernel(
    Q, K, QBar, KA, KB, Counts,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    H_KV, N_CTX, N_BLOCKS,
    GROUP: tl.constexpr,            # r = H / H_kv
    BLOCK_SIZE: tl.constexpr,       # tokens per block
    BLOCK_T: tl.constexpr,          # tokens loaded per step (divides BLOCK_SIZE)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,          # pow2 >= HEAD_DIM
    KEY_MEAN: tl.constexpr,         # False: KA = kmax, KB = kmin (fp32); True: KA = ksum (fp64), KB = kbar (fp32)
):
    blk = tl.program_id(0)
    bg = tl.program_id(1)
    b = (bg // H_KV).to(tl.int64)
    g = (bg % H_KV).to(tl.int64)
    start = blk * BLOCK_SIZE
    count = tl.minimum(N_CTX - start, BLOCK_SIZE)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    out_row = (bg.to(tl.int64) * N_BLOCKS + blk) * HEAD_DIM           # (b, g, blk) row of a (B, H_kv, n_b, d) output

    # key summary of key head g
    k_base = K + b * stride_kb + g * stride_kh
    if KEY_MEAN:
        ksum = tl.zeros([BLOCK_D], dtype=tl.float64)
    else:
        kmax = tl.full([BLOCK_D], float("-inf"), dtype=tl.float32)
        kmin = tl.full([BLOCK_D], float("inf"), dtype=tl.float32)
    for t0 in tl.static_range(0, BLOCK_SIZE, BLOCK_T):
        pos = start + t0 + offs_t
        ok = (pos < N_CTX)[:, None] & d_ok[None, :]
        xk = tl.load(k_base + pos[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=ok, other=0.0)
        if KEY_MEAN:
            ksum += tl.sum(xk.to(tl.float64), axis=0)
        else:
            xf = xk.to(tl.float32)
            kmax = tl.maximum(kmax, tl.max(tl.where(ok, xf, float("-inf")), axis=0))
            kmin = tl.minimum(kmin, tl.min(tl.where(ok, xf, float("inf")), axis=0))
    if KEY_MEAN:
        tl.store(KA + out_row + offs_d, ksum, mask=d_ok)
        tl.store(KB + out_row + offs_d, (ksum / count.to(tl.float64)).to(tl.float32), mask=d_ok)
    else:
        tl.store(KA + out_row + offs_d, kmax, mask=d_ok)
        tl.store(KB + out_row + offs_d, kmin, mask=d_ok)

    # block means of the group's query heads
    inv = 1.0 / count.to(tl.float32)
    for hh in range(0, GROUP):
        head = g * GROUP + hh
        q_base = Q + b * stride_qb + head * stride_qh
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t0 in tl.static_range(0, BLOCK_SIZE, BLOCK_T):
            pos = start + t0 + offs_t
            ok = (pos < N_CTX)[:, None] & d_ok[None, :]
            xq = tl.load(q_base + pos[:, None].to(tl.int64) * stride_qn + offs_d[None, :], mask=ok, other=0.0)
            acc += tl.sum(xq.to(tl.float32), axis=0)
        q_row = ((b * H_KV * GROUP + head) * N_BLOCKS + blk) * HEAD_DIM
        tl.store(QBar + q_row + offs_d, acc * inv, mask=d_ok)

    if bg == 0:
        tl.store(Counts + blk, count.to(tl.float64))


class PooledBlocks(NamedTuple):
    """Step-1 / 3b summaries: q_bar (B, H, n_b, d) fp32; counts (n_b,) fp64; minmax: ka = kmax, kb = kmin
    (B, H_kv, n_b, d) fp32; mean: ka = ksum (B, H_kv, n_b, d) fp64, kb = kbar fp32."""
    q_bar: torch.Tensor
    counts: torch.Tensor
    ka: torch.Tensor
    kb: torch.Tensor


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_pool_reference(q: torch.Tensor, k: torch.Tensor, block_size: int, key_summary: str) -> PooledBlocks:
    """The torch path's pooling (sketch_walk.sketch), as the selector computes it."""
    from ..sketch import block_minmax, block_rows, block_sum
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
                      out: Optional[PooledBlocks] = None) -> PooledBlocks:
    """Pool Q (block means) and K (minmax or fp64 sums + means) in one launch (module docstring).

    ``out``: preallocated contiguous outputs of the right shapes and dtypes (tests poison them), else new ones.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"expected q (B, H, n, d) and k (B, H_kv, n, d); got {tuple(q.shape)}, {tuple(k.shape)}")
    b, h, n, d = q.shape
    hkv = k.shape[1]
    if h % hkv or k.shape[0] != b or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if key_summary not in ("minmax", "mean"):
        raise ValueError(f"key_summary {key_summary!r}")
    check_block_size(block_size)
    q, k = unit_stride(q, k)
    nb = (n + block_size - 1) // block_size
    dev = q.device
    mean = key_summary == "mean"
    want = PooledBlocks((b, h, nb, d, torch.float32), (nb, torch.float64),
                        (b, hkv, nb, d, torch.float64 if mean else torch.float32), (b, hkv, nb, d, torch.float32))
    if out is None:
        out = PooledBlocks(*(torch.empty(*w[:-1], dtype=w[-1], device=dev) for w in want))
    for t, w in zip(out, want):
        if tuple(t.shape) != w[:-1] or t.dtype != w[-1] or not t.is_contiguous():
            raise ValueError(f"out tensor {tuple(t.shape)} {t.dtype} should be contiguous {w[:-1]} {w[-1]}")
    q_bar, counts, ka, kb = out
    if nb == 0 or b == 0 or h == 0:
        return PooledBlocks(q_bar, counts, ka, kb)
    bd = max(16, pow2(d))
    # 2K elements per load (16 tokens x 128 channels); the block's loads are unrolled (4 in flight a program).
    # Compiled for sm_90 (d 128, bf16): 154 registers at 4 warps, ~3 programs (48 KB of loads in flight) an SM;
    # 64-token loads at 8 warps (149 registers) would leave one program an SM.
    bt = block_t or max(1, 2048 // bd)
    bt = min(pow2(bt), block_size)
    grid = (nb, b * hkv)
    _block_pool_kernel[grid](q, k, q_bar, ka, kb, counts,
                             q.stride(0), q.stride(1), q.stride(2),
                             k.stride(0), k.stride(1), k.stride(2),
                             hkv, n, nb,
                             GROUP=h // hkv, BLOCK_SIZE=block_size, BLOCK_T=bt, HEAD_DIM=d, BLOCK_D=bd,
                             KEY_MEAN=mean, num_warps=num_warps or 4)
    return PooledBlocks(q_bar, counts, ka, kb)
