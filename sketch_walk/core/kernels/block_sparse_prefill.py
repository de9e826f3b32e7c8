"""Block-sparse prefill attention in Triton (FlashAttention-style forward over kept key blocks).

Math (see :mod:`sketch_walk.core.block_sparse` for the kept-block list format): for query t of head h
(key head g = h // r, r = H / H_kv, query block i = t // B) and kept key set
K_t = {s : block(s) in S_i[b, g], s <= t},

    out[b, h, t] = sum_{s in K_t} softmax_s(scale * q_t . k_s) v_s
    lse[b, h, t] = log sum_{s in K_t} exp(scale * q_t . k_s)          (natural log, fp32)

A query with no visible key (an empty list) gets out = 0 and lse = -inf.

Shapes: q (B, H, n, d); k, v (B, H_kv, n, d) (any strides, last one 1); block_idx int32
(B, H_kv, n_b, max_kept) ascending, causal (j <= i), entries at positions >= block_cnt ignored;
block_cnt int32 (B, H_kv, n_b). Returns out (B, H, n, d) in q's dtype, lse (B, H, n) fp32.

Kernel layout. One program per (query block i, sequence b, key head g, head split): its M
dimension packs HPP query heads of g's group times the B rows of block i (row m is head
m // B, token m % B), so each K/V tile is loaded once and serves all HPP heads (HPP = r when the
tile fits: Llama's r = 4 at B = 64 gives M = 256). It walks the kept list in three phases:
  1. the off-diagonal blocks (j < i), KPI kept blocks per step (an N tile of KPI * B gathered
     rows), no masking at all;
  2. a tail step when their count is not a multiple of KPI (columns of missing entries -> -inf);
  3. the diagonal block (when listed: it is the last entry), token-level causal mask, partial
     last block masked on load.
With a sliding window w (HAS_WINDOW) every phase also masks keys s with t - s >= w, token by token.
Online softmax in base 2 (exp2, scale * log2(e) folded into one FMA), fp32 accumulators.
Grid axis 0 runs over (b, g, split) so the heaviest query blocks (the last ones, under causal
density) of every head start first; axis 1 runs over query blocks in reverse.
Precondition (as the list format says): entries are causal and ascending; an entry j > i would
be attended unmasked.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._launch import LOG2E, TunedKernel, cdiv, check_block_size, int32_lists, pow2, unit_stride


@triton.jit
def online_softmax_step(acc, m_i, l_i, qk, v, qk_scale):
    """One online-softmax update with raw scores qk (masked entries -inf), in base 2 (the decode kernel's too).
    The prefill starts the running maximum m_i at a finite -1e30, not -inf: a row with no visible key so far
    (a sliding window's first block) keeps m_i finite, so its exp2(-inf - m_i) is 0, never NaN. Decode may
    start at -inf: every listed cache block holds a visible key."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["N_CTX", "N_BLOCKS", "nb_key", "kept_key"])
def _block_sparse_prefill_kernel(
    Q, K, V, Out, Lse, BlockIdx, BlockCnt,
    qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_ib, stride_ih, stride_in,
    stride_cb, stride_ch,
    H_KV, N_CTX, N_BLOCKS,
    WINDOW,                                # sliding window w: keys t-w+1..t only (when HAS_WINDOW)
    nb_key, kept_key,                      # autotune keys only (size buckets), unused
    GROUP: tl.constexpr,                   # r = H / H_kv
    HPP: tl.constexpr,                     # query heads packed per program
    BLOCK_SIZE: tl.constexpr,              # B, tokens per block (query and key)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,                 # next power of two >= HEAD_DIM
    BLOCK_M: tl.constexpr,                 # next power of two >= HPP * BLOCK_SIZE
    KPI: tl.constexpr,                     # kept blocks per step of phase 1
    HAS_WINDOW: tl.constexpr,              # mask keys with t - s >= WINDOW in every phase
):
    N_SPLIT: tl.constexpr = (GROUP + HPP - 1) // HPP
    BLOCK_N: tl.constexpr = KPI * BLOCK_SIZE
    pid_h = tl.program_id(0)
    qblk = N_BLOCKS - 1 - tl.program_id(1)
    split = pid_h % N_SPLIT
    bg = pid_h // N_SPLIT
    b = (bg // H_KV).to(tl.int64)
    g = (bg % H_KV).to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    head_in = split * HPP + offs_m // BLOCK_SIZE            # head inside the group
    qpos = qblk * BLOCK_SIZE + offs_m % BLOCK_SIZE
    row_ok = (offs_m < HPP * BLOCK_SIZE) & (head_in < GROUP) & (qpos < N_CTX)
    head = g * GROUP + head_in
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + qpos[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    idx_base = BlockIdx + b * stride_ib + g * stride_ih + qblk * stride_in
    cnt = tl.load(BlockCnt + b * stride_cb + g * stride_ch + qblk)
    last = tl.load(idx_base + tl.maximum(cnt - 1, 0))
    has_diag = (cnt > 0) & (last == qblk)
    n_off = cnt - has_diag.to(tl.int32)                     # off-diagonal entries

    # finite start: see online_softmax_step
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    offs_n = tl.arange(0, BLOCK_N)
    ent_n = offs_n // BLOCK_SIZE
    tok_n = offs_n % BLOCK_SIZE

    # Phase 1: full steps of KPI off-diagonal blocks, no masks.
    n_steps = n_off // KPI
    for step in range(0, n_steps):
        blk = tl.load(idx_base + step * KPI + ent_n)
        kpos = blk * BLOCK_SIZE + tok_n
        if BLOCK_D == HEAD_DIM:
            k = tl.load(k_base + kpos[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(v_base + kpos[:, None] * stride_vn + offs_d[None, :])
        else:
            k = tl.load(k_base + kpos[:, None] * stride_kn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            v = tl.load(v_base + kpos[:, None] * stride_vn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k))
        if HAS_WINDOW:
            qk = tl.where(qpos[:, None] - kpos[None, :] < WINDOW, qk, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, qk, v, qk_scale)

    # Phase 2: the remaining (< KPI) off-diagonal blocks.
    if KPI > 1:
        ent = n_steps * KPI + ent_n
        ent_ok = ent < n_off
        if n_steps * KPI < n_off:
            blk = tl.load(idx_base + ent, mask=ent_ok, other=0)
            kpos = blk * BLOCK_SIZE + tok_n
            kmask = ent_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + kpos[:, None] * stride_kn + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(v_base + kpos[:, None] * stride_vn + offs_d[None, :], mask=kmask, other=0.0)
            qk = tl.dot(q, tl.trans(k))
            qk = tl.where(ent_ok[None, :], qk, float("-inf"))
            if HAS_WINDOW:
                qk = tl.where(qpos[:, None] - kpos[None, :] < WINDOW, qk, float("-inf"))
            acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, qk, v, qk_scale)

    # Phase 3: the diagonal block, token-level causal (also masks the partial last block).
    if has_diag:
        offs_b = tl.arange(0, BLOCK_SIZE)
        kpos = qblk * BLOCK_SIZE + offs_b
        kmask = (kpos < N_CTX)[:, None] & d_ok[None, :]
        k = tl.load(k_base + kpos[:, None] * stride_kn + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(v_base + kpos[:, None] * stride_vn + offs_d[None, :], mask=kmask, other=0.0)
        qk = tl.dot(q, tl.trans(k))
        qk = tl.where(kpos[None, :] <= qpos[:, None], qk, float("-inf"))
        if HAS_WINDOW:
            qk = tl.where(qpos[:, None] - kpos[None, :] < WINDOW, qk, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, qk, v, qk_scale)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = Out + b * stride_ob + head[:, None] * stride_oh + qpos[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    # lse is a contiguous (B, H, n) tensor
    l_ptrs = Lse + (b * (H_KV * GROUP) + head) * N_CTX + qpos
    tl.store(l_ptrs, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------

_M_BUDGET = 256 * 128      # BLOCK_M * BLOCK_D elements of fp32 accumulator per program (at most)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_hpp(group: int, block_size: int, head_dim: int, budget: int = _M_BUDGET) -> int:
    """Most query heads of a group whose packed tile (pow2(HPP * B) x pow2(d)) fits ``budget``."""
    bd = max(16, pow2(head_dim))
    for hpp in range(group, 0, -1):
        if group % hpp == 0 and pow2(hpp * block_size) * bd <= budget:
            return hpp
    return 1


def candidate_configs(group: int, block_size: int, head_dim: int, windowed: bool = False) -> list:
    """The GPU autotune space: (HPP, KPI, num_warps, num_stages) variants for this geometry
    (``windowed``: num_stages 1 only, see :data:`WINDOW_NUM_STAGES`)."""
    bd = max(16, pow2(head_dim))
    hpp_full = default_hpp(group, block_size, head_dim)
    hpp_half = default_hpp(group, block_size, head_dim, budget=_M_BUDGET // 2)
    cfgs = []
    seen = set()

    def add(hpp, kpi, w, s):
        m = pow2(hpp * block_size)
        if (hpp, kpi, w, s) in seen or kpi * block_size > 256:
            return
        # keep the S tile (M x KPI*B fp32) plus the accumulator within ~256 registers a thread
        if (m * kpi * block_size + m * bd) > 2 * 128 * 32 * w:
            return
        if windowed:
            s = WINDOW_NUM_STAGES
            if (hpp, kpi, w, s) in seen:
                return
        seen.add((hpp, kpi, w, s))
        cfgs.append(triton.Config({"HPP": hpp, "KPI": kpi, "BLOCK_M": m}, num_warps=w, num_stages=s))

    for s in (2, 3):
        add(hpp_full, 1, 8, s)
    add(hpp_half, 2, 8, 3)
    add(hpp_half, 1, 4, 3)
    # (HPP full, KPI 2, 16 warps) was tried: 2.9 s vs 0.31 s at 128K full density (register spills), dropped
    if not cfgs:
        cfgs.append(triton.Config({"HPP": 1, "KPI": 1, "BLOCK_M": pow2(block_size)}, num_warps=4,
                                  num_stages=WINDOW_NUM_STAGES if windowed else 2))
    return cfgs


# With a sliding window the key loop runs unpipelined. Measured on an H100 (Triton 3.6): with
# num_stages >= 2 the windowed kernel returned wrong rows (8-15 of every 16-row block, relative error
# 0.05-0.36) whenever a row of the tile saw no key of its first listed block (w a multiple of the
# block size: 16, 32, 48, Gemma's 512 at block 64), for every HPP/KPI/num_warps tried; num_stages 1
# was right, as was the interpreter. A finite running-max start did not change it.
WINDOW_NUM_STAGES = 1

_tuned: Dict[Tuple[int, int, int, bool], TunedKernel] = {}


def _tuned_kernel(group: int, block_size: int, head_dim: int, windowed: bool) -> TunedKernel:
    key = (group, block_size, head_dim, windowed)
    if key not in _tuned:
        _tuned[key] = TunedKernel(_block_sparse_prefill_kernel,
                                  candidate_configs(group, block_size, head_dim, windowed),
                                  ["nb_key", "kept_key", "GROUP", "BLOCK_SIZE", "HEAD_DIM"])
    return _tuned[key]


def _parse_config_env() -> Optional[dict]:
    """SKETCH_WALK_PREFILL_CONFIG="HPP=4,KPI=1,num_warps=8,num_stages=2" pins one config (benchmarks)."""
    spec = os.environ.get("SKETCH_WALK_PREFILL_CONFIG")
    if not spec:
        return None
    return {k.strip(): int(v) for k, v in (kv.split("=") for kv in spec.split(","))}


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def block_sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                                  block_cnt: torch.Tensor, block_size: int, sm_scale: Optional[float] = None,
                                  config: Optional[dict] = None, out: Optional[torch.Tensor] = None,
                                  lse: Optional[torch.Tensor] = None,
                                  window: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse prefill attention (module docstring). Returns (out in q's dtype, lse fp32 natural log).

    ``window`` w (a sliding-window layer, e.g. Gemma-3's 512): query t sees only keys t-w+1..t of its
    listed blocks (:func:`sketch_walk.core.block_sparse.window_block_lists` lists exactly the blocks needed).

    ``out`` (B, H, n, d) in q's dtype (last stride 1) and ``lse`` (B, H, n) fp32 contiguous, when
    given, are written in place (tests poison them first; callers may reuse buffers).

    ``config`` (dict with HPP, KPI, num_warps, num_stages) pins one kernel configuration; by
    default the GPU autotunes over :func:`candidate_configs` and the interpreter uses a fixed one.
    """
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B, H, n, d), k and v (B, H_kv, n, d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, n, d = q.shape
    h_kv = k.shape[1]
    if h % h_kv or k.shape[0] != b or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}")
    check_block_size(block_size)
    group = h // h_kv
    nb = (n + block_size - 1) // block_size
    if block_idx.shape[:3] != (b, h_kv, nb) or block_cnt.shape != (b, h_kv, nb):
        raise ValueError(f"block lists {tuple(block_idx.shape)} / {tuple(block_cnt.shape)} do not match "
                         f"(B, H_kv, n_b) = {(b, h_kv, nb)}")
    q, k, v = unit_stride(q, k, v)
    block_idx, block_cnt = int32_lists(block_idx, block_cnt)
    max_kept = block_idx.shape[-1]      # counts must not exceed it (the list format's contract)

    if out is None:
        out = torch.empty(b, h, n, d, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with last stride 1")
    if lse is None:
        lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    elif lse.shape != (b, h, n) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous fp32 tensor {(b, h, n)}")
    if n == 0 or b == 0 or h == 0:
        return out, lse
    if max_kept == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    bd = max(16, pow2(d))
    args = (q, k, v, out, lse, block_idx, block_cnt, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
            block_cnt.stride(0), block_cnt.stride(1),
            h_kv, n, nb, int(window or 0), pow2(nb), pow2(max_kept))
    if window is not None and window < 1:
        raise ValueError(f"window {window} must be >= 1")
    meta = dict(GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=d, BLOCK_D=bd, HAS_WINDOW=bool(window))

    pinned = config or _parse_config_env()
    if pinned is None and _interpret():
        pinned = {"HPP": default_hpp(group, block_size, d), "KPI": 2, "num_warps": 4, "num_stages": 1}
    if pinned is not None:
        hpp, kpi = int(pinned["HPP"]), int(pinned.get("KPI", 1))
        grid = (b * h_kv * cdiv(group, hpp), nb)
        _block_sparse_prefill_kernel[grid](*args, **meta, HPP=hpp, KPI=kpi, BLOCK_M=pow2(hpp * block_size),
                                           num_warps=int(pinned.get("num_warps", 4)),
                                           num_stages=WINDOW_NUM_STAGES if window else
                                           int(pinned.get("num_stages", 2)))
        return out, lse

    def grid(META):
        return (b * h_kv * cdiv(group, META["HPP"]), nb)

    key = (pow2(nb), pow2(max_kept), q.dtype, k.dtype, v.dtype)   # the Autotuner's key (group etc. pick the tuner)
    _tuned_kernel(group, block_size, d, bool(window))(grid, key, *args, **meta)
    return out, lse
