"""Block-sparse decode attention in Triton (flash-decoding over the kept blocks of the cache).

Math: one new query per sequence at position N-1; for head h (key head g = h // r) with kept
cache blocks S[b, g] (entries at positions >= block_cnt ignored) and K = {s < N : block(s) in S},

    out[b, h] = sum_{s in K} softmax_s(scale * q . k_s) v_s,    lse[b, h] = log sum_{s in K} exp(scale * q . k_s)

An empty list gives out = 0, lse = -inf.

Shapes: q (B, H, 1, d); k_cache, v_cache (B, H_kv, N, d) (the new token's key included; any
strides, last one 1); block_idx int32 (B, H_kv, max_kept); block_cnt int32 (B, H_kv). Returns
out (B, H, 1, d) in q's dtype and lse (B, H, 1) fp32 (natural log).

Two launches, no host synchronisation (CUDA-graph safe: the split count follows from shapes):
  1. ``_decode_split_kernel``: grid (splits, B * H_kv). Split s takes the kept entries
     [s * BPS, (s + 1) * BPS) of its list; its M dimension packs the r query heads of the group
     (padded to 16 rows for the tensor cores), so each K/V block is read once for the group.
     It writes a normalised partial output and its lse (base 2) in fp32.
  2. ``_decode_reduce_kernel``: grid (B * H,), merges the splits: w_s = 2^(lse_s - max),
     out = sum w_s o_s / sum w_s, lse = max + log2(sum w_s) (then times ln 2).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import LOG2E, cdiv, check_block_size, int32_lists, pow2, sm_count, unit_stride
from .block_sparse_prefill import online_softmax_step


@triton.jit(do_not_specialize=["N_KEYS", "BPS", "NUM_SPLITS"])
def _decode_split_kernel(
    Q, K, V, Opart, Lpart, BlockIdx, BlockCnt, NKeys,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ib, stride_ih,
    stride_cb,
    H_KV, N_KEYS, BPS, NUM_SPLITS,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, N_FROM_PTR: tl.constexpr = False,
):
    pid_s = tl.program_id(0)
    bg = tl.program_id(1)
    if N_FROM_PTR:                      # the cache's length on the device (a static cache under a CUDA graph)
        N_KEYS = tl.load(NKeys).to(tl.int32)
    b = (bg // H_KV).to(tl.int64)
    g = (bg % H_KV).to(tl.int64)

    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < GROUP
    head = g * GROUP + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)

    cnt = tl.load(BlockCnt + b * stride_cb + g)
    start = pid_s * BPS
    end = tl.minimum(start + BPS, cnt)
    idx_base = BlockIdx + b * stride_ib + g * stride_ih
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    offs_n = tl.arange(0, BLOCK_SIZE)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for e in range(start, end):
        blk = tl.load(idx_base + e)
        kpos = blk * BLOCK_SIZE + offs_n
        k_ok = kpos < N_KEYS
        kmask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + kpos[:, None] * stride_kn + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(v_base + kpos[:, None] * stride_vn + offs_d[None, :], mask=kmask, other=0.0)
        qk = tl.dot(q, tl.trans(k))
        qk = tl.where(k_ok[None, :], qk, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, qk, v, qk_scale)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse2 = tl.where(seen, m_i + tl.math.log2(l_safe), float("-inf"))
    # Opart (B * H, NUM_SPLITS, BLOCK_D), Lpart (B * H, NUM_SPLITS), contiguous
    row = b * (H_KV * GROUP) + head
    tl.store(Opart + (row[:, None] * NUM_SPLITS + pid_s) * BLOCK_D + offs_d[None, :], o, mask=h_ok[:, None])
    tl.store(Lpart + row * NUM_SPLITS + pid_s, lse2, mask=h_ok)


@triton.jit(do_not_specialize=["NUM_SPLITS"])
def _decode_reduce_kernel(
    Opart, Lpart, Out, Lse,
    stride_ob, stride_oh, H,
    NUM_SPLITS, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // H
    h = row % H
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    lse2 = tl.load(Lpart + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse2, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse2 - m_safe)
    w = tl.where(s_ok, w, 0.0)
    o = tl.load(Opart + (row * NUM_SPLITS + offs_s[:, None]) * BLOCK_D + offs_d[None, :],
                mask=s_ok[:, None], other=0.0)
    den = tl.sum(w, 0)
    seen = den > 0.0
    den_safe = tl.where(seen, den, 1.0)
    out = tl.sum(o * w[:, None], 0) / den_safe
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(Lse + row, tl.where(seen, (m_safe + tl.math.log2(den_safe)) * 0.6931471805599453, float("-inf")))


def _target_programs(device: torch.device) -> int:
    return 2 * sm_count(device, default=4)


def block_sparse_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_idx: torch.Tensor, block_cnt: torch.Tensor, block_size: int,
                               sm_scale: Optional[float] = None, blocks_per_split: Optional[int] = None,
                               num_warps: int = 4, num_stages: int = 2, out: Optional[torch.Tensor] = None,
                               lse: Optional[torch.Tensor] = None, n_keys: Optional[torch.Tensor] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse decode attention (module docstring). Returns (out (B, H, 1, d), lse (B, H, 1) fp32).

    ``n_keys``: a one-element integer tensor on the device holding the cache's real length N' <= N (keys from N' on
    are ignored; read by the kernel, so a CUDA graph replays it for every length of a static cache's bucket).

    ``out`` (B, H, 1, d) in q's dtype (last stride 1) and ``lse`` (B, H, 1) fp32 contiguous, when given,
    are written in place.

    ``blocks_per_split`` (kept blocks per program) defaults to the fewest that still give about two
    programs per multiprocessor; it depends on shapes only, so the call is CUDA-graph safe.
    """
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"decode expects q (B, H, 1, d), got {tuple(q.shape)}")
    b, h, _, d = q.shape
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"expected k_cache, v_cache (B, H_kv, N, d); got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    h_kv, n = k_cache.shape[1], k_cache.shape[2]
    if h % h_kv:
        raise ValueError(f"query heads {h} must be a multiple of key heads {h_kv}")
    check_block_size(block_size)
    if block_idx.shape[:2] != (b, h_kv) or block_cnt.shape != (b, h_kv):
        raise ValueError(f"block lists {tuple(block_idx.shape)} / {tuple(block_cnt.shape)} do not match (B, H_kv)")
    group = h // h_kv
    q, k_cache, v_cache = unit_stride(q, k_cache, v_cache)
    block_idx, block_cnt = int32_lists(block_idx, block_cnt)
    max_kept = block_idx.shape[-1]      # counts must not exceed it (the list format's contract)

    if out is None:
        out = torch.empty(b, h, 1, d, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with last stride 1")
    if lse is None:
        lse = torch.empty(b, h, 1, dtype=torch.float32, device=q.device)
    elif lse.shape != (b, h, 1) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous fp32 tensor {(b, h, 1)}")
    if b == 0 or h == 0:
        return out, lse
    if max_kept == 0 or n == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    bd = max(16, pow2(d))
    if blocks_per_split is None:
        blocks_per_split = max(1, cdiv(max_kept * b * h_kv, _target_programs(q.device)))
    splits = cdiv(max_kept, blocks_per_split)
    opart = torch.empty(b * h, splits, bd, dtype=torch.float32, device=q.device)
    lpart = torch.empty(b * h, splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(splits, b * h_kv)](
        q, k_cache, v_cache, opart, lpart, block_idx, block_cnt, block_cnt if n_keys is None else n_keys,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_idx.stride(0), block_idx.stride(1), block_cnt.stride(0),
        h_kv, n, blocks_per_split, splits,
        GROUP=group, BLOCK_H=max(16, pow2(group)), BLOCK_SIZE=block_size, HEAD_DIM=d, BLOCK_D=bd,
        N_FROM_PTR=n_keys is not None, num_warps=num_warps, num_stages=num_stages)
    _decode_reduce_kernel[(b * h,)](
        opart, lpart, out, lse, out.stride(0), out.stride(1), h, splits,
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_S=max(2, pow2(splits)), num_warps=4 if bd >= 128 else 2)
    return out, lse
