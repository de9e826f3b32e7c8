"""Sketch&Walk prefill step 4 in Triton: the block transition A, without per-head n_b x n_b score matrices.

Math (docs/ALGORITHM.md steps 3, 3b, 4; the PyTorch reference is :func:`block_transition_reference`, the math of
:func:`sketch_walk.walk.block_transition` over :func:`sketch_walk.sketch.scores_minmax` / ``scores_mean``).
Query head h, key head g = h // r, query block i, key block j:

    minmax:  Ahat_h[i, j] = scale * (<max(Qbar_h[i], 0), Kmax_g[j]> + <min(Qbar_h[i], 0), Kmin_g[j]>)
    mean:    Ahat_h[i, j] = scale * <Qtil_h[i], Ktil_g[j]>            (sketched pooled vectors, dim k')
    P_h[i, :] = softmax over j <= i of Ahat_h[i, :]   (j > i: 0, causal at block level)
    A[b, g', i, j] = mean of P_h[i, j] over the heads h of output group g'
                     (select_per "layer": all H heads, G' = 1; "kv_head": the r heads of key head g', G' = H_kv)

Two passes, both recomputing the scores from the pooled vectors (O(n_b^2 d) FLOPs per head and pass,
O(H n_b + G' n_b^2) bytes written):
  1. ``_transition_stats_kernel``, grid (row tiles, B * H): per (b, h, row i) the base-2 log-sum-exp
     lse2 = log2 sum_{j <= i} 2^(s_ij), s = Ahat * log2(e), by an online softmax over the causal
     key-block tiles of its row tile (heavy row tiles first).
  2. ``_transition_mean_kernel``, grid (row tiles, column tiles, B * G' * S): loops over the heads of
     its output group (a 1/S share of them), recomputes the score tile and adds 2^(s - lse2); writes
     the share's sum times 1/(heads of the group). S ("head split") > 1 gives short rows (8K-32K tokens)
     enough programs; the S partial matrices are summed in a fixed order by whoever reads them
     (:mod:`.row_select` does it in the same pass as the sharpening; :func:`block_transition_triton`
     with torch), so the result is deterministic. Tiles above the diagonal are written as zeros.
Both loop over (key tile or head) x (BLOCK_K-channel chunk) in one flat loop, the per-tile epilogue (softmax
update, or 2^(s - lse2)) after a tile's last chunk: the persistent-matmul pattern, so Triton pipelines the
chunk loads (cp.async) and shared memory stays ~100 KB with fp32 operands (whole-d tiles needed 256-460 KB).

Cost at 128K tokens, Llama-3.1-8B geometry (n_b = 2048, H = 32, d = 128, minmax: 2d = 256 channels), per
pass: 32 heads x 528 causal 64 x 64 tiles x 64 x 64 x 256 x 2 = 35 GFLOP of TF32 (~0.1-0.2 ms on an H100),
inputs ~40 MB (L2-resident tiles), output 16 MB (pass 2). At 8K (n_b = 128): tiny; latency, S = 32.

Dot precision. Scores accumulate in fp32. Default "auto": "fp16" from 1536 key blocks on, "tf32" below
(:func:`dot_precision`). "fp16": Qbar (or Qtil) is scaled and, with the key summaries, rounded to fp16 once
(clamped to +-65504), and the dots run at fp16 tensor-core rate: the same 10-bit mantissa as TF32 at half
the bytes per tile and twice the rate. The minmax selection has the pooling kernel write these operands
(``prescaled``); otherwise the wrapper rounds them in three launches. At 128K the two passes take 0.65 ms
with TF32 operands (~110 TFLOP/s), 0.42 ms with fp16 rounded here, 0.34 ms prescaled. Minmax keys of an
fp16 model are exact in fp16; bf16 keys lose nothing either unless below fp16's normal range (6e-5), where
they no longer matter to a score. The error is Qbar's rounding, |d Ahat| <~ 2^-11 scale sum_c |q_c k_c|,
~1e-3 relative on P. The selection only needs the order of W, and that error is far below the sketch's own
(minmax is an upper bound; mean is a random projection). SKETCH_WALK_SELECT_DOT=fp16 or tf32 (fp32 operands entering
``tl.dot`` as TF32), tf32x3 (~fp32, triple the cost) or ieee (no tensor cores, ~8x slower)
override it, for checking. The walk step (:mod:`.walk_step`) multiplies probabilities down to ~1e-30 and
stays TF32 under "fp16". The interpreter computes exact fp32 dots for fp32 operands and fp16 products for
fp16 ones.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..core.errors import UsageError
from ..core.kernels._launch import LOG2E, TunedKernel, cdiv, pow2, sm_count

_FP16_MAX = 65504.0
DOT_PRECISIONS = ("fp16", "tf32", "tf32x3", "ieee")


@triton.jit
def _score_chunk(acc, QP, KA, KB, q_off, k_off, rows, row_ok, cols, kk, stride_qm, stride_km, qk_scale, N_BLOCKS,
                 DIM: tl.constexpr, MINMAX: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) += the scaled scores of query rows ``rows`` against key blocks ``cols`` over the
    channels [kk, kk + BLOCK_K): minmax <max(q, 0), Kmax> + <min(q, 0), Kmin>, mean <q, Ktil>. The scale
    (scale * log2 e > 0) is applied to q, where it commutes with max(., 0) / min(., 0). Rows / key blocks
    past N_BLOCKS and channels past DIM load as 0."""
    offs_k = kk + tl.arange(0, BLOCK_K)
    k_ok = offs_k < DIM
    q = tl.load(QP + q_off + rows[:, None].to(tl.int64) * stride_qm + offs_k[None, :],
                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    kmask = (cols < N_BLOCKS)[:, None] & k_ok[None, :]
    koff = k_off + cols[:, None].to(tl.int64) * stride_km + offs_k[None, :]
    ka = tl.load(KA + koff, mask=kmask, other=0.0)
    if DOT_PREC == "fp16":
        # fp16 operands, already scaled by the wrapper or the pooling kernel (qk_scale is 1): fp16 dots with
        # fp32 accumulation
        if MINMAX:
            kb = tl.load(KB + koff, mask=kmask, other=0.0)
            acc = tl.dot(tl.maximum(q, 0.0).to(tl.float16), tl.trans(ka), acc)
            acc = tl.dot(tl.minimum(q, 0.0).to(tl.float16), tl.trans(kb), acc)
        else:
            acc = tl.dot(q, tl.trans(ka), acc)
    else:
        q = q * qk_scale
        if MINMAX:
            kb = tl.load(KB + koff, mask=kmask, other=0.0)
            acc = tl.dot(tl.maximum(q, 0.0), tl.trans(ka), acc, input_precision=DOT_PREC)
            acc = tl.dot(tl.minimum(q, 0.0), tl.trans(kb), acc, input_precision=DOT_PREC)
        else:
            acc = tl.dot(q, tl.trans(ka), acc, input_precision=DOT_PREC)
    return acc


@triton.jit(do_not_specialize=["N_BLOCKS", "nb_key"])
def _transition_stats_kernel(
    QP, KA, KB, Lse,
    qk_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_km,
    H, N_BLOCKS,
    nb_key,                                  # autotune key only (pow2 bucket of n_b)
    GROUP: tl.constexpr,                     # r = H / H_kv
    DIM: tl.constexpr,                       # d (minmax) or k' (mean)
    BLOCK_D: tl.constexpr,                   # pow2 >= DIM
    MINMAX: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,                   # channels per step (divides BLOCK_D)
):
    N_DK: tl.constexpr = BLOCK_D // BLOCK_K
    n_row_tiles = tl.cdiv(N_BLOCKS, BLOCK_M)
    pid_m = n_row_tiles - 1 - tl.program_id(0)            # longest rows first
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    g = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N_BLOCKS
    offs_n = tl.arange(0, BLOCK_N)
    q_off = b * stride_qb + h * stride_qh
    k_off = b * stride_kb + g * stride_kh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    hi = tl.minimum(N_BLOCKS, (pid_m + 1) * BLOCK_M)      # causal: key blocks <= the tile's last row
    n_iter = tl.cdiv(hi, BLOCK_N) * N_DK
    # one flat loop over (key-block tile, channel chunk), the softmax update after a tile's last chunk
    # (the persistent-matmul pattern: the loads of every step are pipelined)
    for it in range(0, n_iter):
        ck = it % N_DK
        cols = (it // N_DK) * BLOCK_N + offs_n
        acc = _score_chunk(acc, QP, KA, KB, q_off, k_off, rows, row_ok, cols, ck * BLOCK_K, stride_qm, stride_km,
                           qk_scale, N_BLOCKS, DIM, MINMAX, DOT_PREC, BLOCK_K)
        if ck == N_DK - 1:
            s = tl.where(cols[None, :] <= rows[:, None], acc, float("-inf"))   # column 0 is in every row
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(p, 1)
            m_i = m_new
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    lse = m_i + tl.math.log2(l_i)
    tl.store(Lse + bh.to(tl.int64) * N_BLOCKS + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=["N_BLOCKS", "nb_key"])
def _transition_mean_kernel(
    QP, KA, KB, Lse, Out,
    qk_scale, inv_heads,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_km,
    stride_os, stride_ob, stride_og, stride_om,
    H, N_BLOCKS, GP, SPLIT, HEADS_PER_SPLIT,
    nb_key,
    GROUP: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MINMAX: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    N_DK: tl.constexpr = BLOCK_D // BLOCK_K
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    z = tl.program_id(2)
    sp = z % SPLIT
    bgp = z // SPLIT
    b = (bgp // GP).to(tl.int64)
    gp = bgp % GP
    heads_out = H // GP
    h0 = gp * heads_out + sp * HEADS_PER_SPLIT
    h1 = tl.minimum(h0 + HEADS_PER_SPLIT, (gp + 1) * heads_out)
    causal_tile = pid_n * BLOCK_N <= pid_m * BLOCK_M + (BLOCK_M - 1)
    n_iter = tl.where(causal_tile, tl.maximum(h1 - h0, 0), 0) * N_DK   # tiles above the diagonal: zeros

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N_BLOCKS
    col_ok = cols < N_BLOCKS

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # one flat loop over (head of this share, channel chunk); a head's probabilities are added after its
    # last chunk
    for it in range(0, n_iter):
        ck = it % N_DK
        h = (h0 + it // N_DK).to(tl.int64)
        g = h // GROUP
        acc = _score_chunk(acc, QP, KA, KB, b * stride_qb + h * stride_qh, b * stride_kb + g * stride_kh, rows,
                           row_ok, cols, ck * BLOCK_K, stride_qm, stride_km, qk_scale, N_BLOCKS, DIM, MINMAX,
                           DOT_PREC, BLOCK_K)
        if ck == N_DK - 1:
            lse = tl.load(Lse + (b * H + h) * N_BLOCKS + rows, mask=row_ok, other=0.0)
            out += tl.math.exp2(acc - lse[:, None])       # j > i may overflow to inf here; masked below
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    out = tl.where(cols[None, :] <= rows[:, None], out * inv_heads, 0.0)
    o_ptrs = Out + sp.to(tl.int64) * stride_os + b * stride_ob + gp.to(tl.int64) * stride_og \
        + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(o_ptrs, out, mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------

_SMEM_BUDGET = 200 * 1024       # bytes of shared memory a config may plan for (H100: 227 KB a block)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class DotPrecisionError(UsageError, ValueError):
    """A bad SKETCH_WALK_SELECT_DOT: a usage error for the scripts (one line, exit 2), a ValueError for callers."""


# From this many key blocks on (96K tokens at block 64), "auto" takes fp16 operands. Measured on the H100
# (benchmarks/results/attention_speed_NVIDIA_H100_80GB_HBM3.json, transition vs transition@tf32, Llama-3.1-8B
# geometry), fp16 rounded by the wrapper: 128K 0.42 ms vs 0.65 TF32; 64K 0.20 vs 0.19; 8K-32K 0.17-0.21 vs
# 0.08-0.10, where the wrapper's three rounding launches cost more than the dots save. The prescaled operands
# (rounded by the pooling: 0.34 ms at 128K) were not timed below 128K; the threshold may come down.
FP16_MIN_BLOCKS = 1536


def dot_precision(n_blocks: Optional[int] = None) -> str:
    """The dot precision of step 4: $SKETCH_WALK_SELECT_DOT if set, else "auto": fp16 operands from
    :data:`FP16_MIN_BLOCKS` key blocks on, TF32 below (and when ``n_blocks`` is not given)."""
    p = os.environ.get("SKETCH_WALK_SELECT_DOT", "auto")
    if p not in DOT_PRECISIONS + ("auto",):
        raise DotPrecisionError(f"environment variable SKETCH_WALK_SELECT_DOT={p!r}: set it to auto or one of "
                                f"{', '.join(DOT_PRECISIONS)}, or unset it")
    if p == "auto":
        return "fp16" if n_blocks is not None and n_blocks >= FP16_MIN_BLOCKS else "tf32"
    return p


def candidate_configs(block_d: int, minmax: bool, half: bool = False) -> list:
    """GPU autotune space of both passes: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), kept to those whose
    pipelined stages (a BLOCK_M x BLOCK_K query chunk and 1-2 BLOCK_N x BLOCK_K key chunks) fit ~200 KB of
    shared memory. fp32 operands, compiled for sm_90 with Triton 3.9 (minmax, d 64..256; mean, k' 64): 72 / 96 /
    124 / 144 KB of shared memory, cp.async pipelines, TF32 wgmma, no register spills except pass 2 at
    128 x 128 (68 bytes); BLOCK_K 64 spilled 160-400 bytes in pass 2: left out. ``half`` (fp16 operands): the
    same tiles plus 64-channel chunks (half the bytes a stage, half the loop trips; the passes are bound by
    the L2 reads of their operand tiles more than by the dot rate)."""
    n_k = 2 if minmax else 1
    elem = 2 if half else 4
    shapes = [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 3)]
    if half:
        shapes += [(128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 2)]
    cfgs = []
    for bm, bn, bk, w, s in shapes:
        bk = min(bk, block_d)
        if s * elem * bk * (bm + n_k * bn) <= _SMEM_BUDGET:
            cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s))
    return cfgs


_tuned: Dict[Tuple[str, int, bool, bool], TunedKernel] = {}


def _tuned_kernel(which: str, block_d: int, minmax: bool, half: bool) -> TunedKernel:
    key = (which, block_d, minmax, half)
    if key not in _tuned:
        kern = _transition_stats_kernel if which == "stats" else _transition_mean_kernel
        _tuned[key] = TunedKernel(kern, candidate_configs(block_d, minmax, half),
                                  ["nb_key", "GROUP", "DIM", "MINMAX", "DOT_PREC"])
    return _tuned[key]


def default_head_split(n_b: int, batch: int, groups: int, heads_out: int, n_sm: int = 132) -> int:
    """Head split S of pass 2: the largest power of two <= heads_out with S x (causal 64 x 64 tiles) x B x G'
    <= 4 programs an SM (8K tokens: S = 32 for a layer selection; 128K: S = 1)."""
    t = (n_b + 63) // 64
    tiles = max(1, t * (t + 1) // 2 * batch * groups)
    s = 1
    while s * 2 <= heads_out and tiles * s * 2 <= 4 * n_sm:
        s *= 2
    return s


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------

def block_transition_partials(qp: torch.Tensor, ka: torch.Tensor, kb: Optional[torch.Tensor], scale: float,
                              select_per: str = "layer", head_split: Optional[int] = None,
                              config: Optional[dict] = None, precision: Optional[str] = None,
                              out: Optional[torch.Tensor] = None, prescaled: bool = False) -> torch.Tensor:
    """Step 4 in two launches. Returns partials (S, B, G', n_b, n_b) fp32 whose sum over S is A (``out`` when
    given: fp32, that shape, last stride 1; every element is written).

    qp (B, H, n_b, D) fp32: Qbar (minmax, D = d) or Qtil (mean, D = k'); ka (B, H_kv, n_b, D) fp32: Kmax or
    Ktil; kb: Kmin (minmax) or None (mean). ``scale`` > 0: the attention's scale. ``config`` pins
    BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages for both passes (the GPU autotunes otherwise, the
    interpreter uses 16 x 16 tiles and 32-channel chunks). ``precision``: tl.dot input precision (module
    docstring), default :func:`dot_precision` of n_b. ``head_split``: S (default :func:`default_head_split`).
    ``prescaled``: qp, ka, kb are already the fp16 operands, qp times scale * log2(e) and all clamped to fp16's
    range (``block_pool_triton(..., half_scale=scale * LOG2E)`` writes them); needs precision "fp16".
    """
    minmax = kb is not None
    if qp.dim() != 4 or ka.dim() != 4 or qp.shape[-2:] != ka.shape[-2:] or qp.shape[0] != ka.shape[0]:
        raise ValueError(f"expected qp (B, H, n_b, D) and ka (B, H_kv, n_b, D); got {tuple(qp.shape)}, "
                         f"{tuple(ka.shape)}")
    if minmax and kb.shape != ka.shape:
        raise ValueError(f"kmin {tuple(kb.shape)} != kmax {tuple(ka.shape)}")
    if select_per not in ("layer", "kv_head"):
        raise ValueError(f"select_per {select_per!r}")
    if not scale > 0:
        raise ValueError(f"the score scale must be > 0 (got {scale})")
    b, h, nb, dim = qp.shape
    hkv = ka.shape[1]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} key heads")
    group = h // hkv
    gp = 1 if select_per == "layer" else hkv
    heads_out = h // gp
    dev = qp.device
    prec = precision or dot_precision(nb)
    qk_scale = float(scale) * LOG2E
    if prescaled:
        if prec != "fp16" or any(t is not None and t.dtype != torch.float16 for t in (qp, ka, kb)):
            raise ValueError(f"prescaled operands must be fp16 at precision fp16 (got {prec}, {qp.dtype})")
        qp, ka = qp.contiguous(), ka.contiguous()
        kb = kb.contiguous() if minmax else ka
        qk_scale = 1.0
    elif prec == "fp16":
        # Scale q here (it commutes with max(., 0) / min(., 0)) and round every operand to fp16 once: half the
        # bytes per tile and twice the tensor-core rate of TF32, same 10-bit mantissa. Clamped to fp16's range
        # so an outlier cannot turn a score into inf - inf = NaN.
        qp = (qp.float() * qk_scale).clamp_(-_FP16_MAX, _FP16_MAX).half().contiguous()
        ka = ka.float().clamp(-_FP16_MAX, _FP16_MAX).half().contiguous()
        kb = kb.float().clamp(-_FP16_MAX, _FP16_MAX).half().contiguous() if minmax else ka
        qk_scale = 1.0
    else:
        qp = qp.float().contiguous()
        ka = ka.float().contiguous()
        kb = kb.float().contiguous() if minmax else ka
    split = head_split or default_head_split(nb, b, gp, heads_out, sm_count(dev))
    split = max(1, min(int(split), heads_out))
    hps = (heads_out + split - 1) // split
    lse = torch.empty(b, h, nb, dtype=torch.float32, device=dev)
    if out is None:
        out = torch.empty(split, b, gp, nb, nb, dtype=torch.float32, device=dev)
    elif out.shape != (split, b, gp, nb, nb) or out.dtype != torch.float32 or out.stride(-1) != 1:
        raise ValueError(f"out must be fp32 {(split, b, gp, nb, nb)} with last stride 1")
    if b == 0 or nb == 0:
        return out
    bd = max(16, pow2(dim))
    meta = dict(GROUP=group, DIM=dim, BLOCK_D=bd, MINMAX=minmax, DOT_PREC=prec)
    a1 = (qp, ka, kb, lse, qk_scale, qp.stride(0), qp.stride(1), qp.stride(2),
          ka.stride(0), ka.stride(1), ka.stride(2), h, nb, pow2(nb))
    a2 = (qp, ka, kb, lse, out, qk_scale, 1.0 / heads_out, qp.stride(0), qp.stride(1), qp.stride(2),
          ka.stride(0), ka.stride(1), ka.stride(2),
          out.stride(0), out.stride(1), out.stride(2), out.stride(3), h, nb, gp, split, hps, pow2(nb))

    pinned = config
    if pinned is None and _interpret():
        pinned = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    if pinned is not None:
        bm, bn = int(pinned["BLOCK_M"]), int(pinned["BLOCK_N"])
        bk = min(int(pinned.get("BLOCK_K", 32)), bd)
        kw = dict(meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=int(pinned.get("num_warps", 4)),
                  num_stages=int(pinned.get("num_stages", 2)))
        _transition_stats_kernel[(cdiv(nb, bm), b * h)](*a1, **kw)
        _transition_mean_kernel[(cdiv(nb, bm), cdiv(nb, bn), b * gp * split)](*a2, **kw)
        return out

    half = prec == "fp16"
    key = (pow2(nb), group, dim, prec, qp.dtype)         # the Autotuner's key (its arguments and dtypes)
    _tuned_kernel("stats", bd, minmax, half)(lambda m: (cdiv(nb, m["BLOCK_M"]), b * h), key, *a1, **meta)
    _tuned_kernel("mean", bd, minmax, half)(
        lambda m: (cdiv(nb, m["BLOCK_M"]), cdiv(nb, m["BLOCK_N"]), b * gp * split), key, *a2, **meta)
    return out


def block_transition_triton(qp: torch.Tensor, ka: torch.Tensor, kb: Optional[torch.Tensor], scale: float,
                            select_per: str = "layer", **kw) -> torch.Tensor:
    """A (B, G', n_b, n_b) fp32, lower triangular, rows stochastic (see :func:`block_transition_partials`)."""
    part = block_transition_partials(qp, ka, kb, scale, select_per, **kw)
    return part[0] if part.shape[0] == 1 else part.sum(0)


def block_transition_reference(qp: torch.Tensor, ka: torch.Tensor, kb: Optional[torch.Tensor], scale: float,
                               select_per: str = "layer") -> torch.Tensor:
    """Step 4 in PyTorch, in the inputs' dtype (float64 for tests): the scores of sketch_walk.sketch
    (``scores_minmax`` / ``scores_mean``), causal row softmax, head mean (all heads or each key head's group),
    as :func:`sketch_walk.walk.block_transition` computes it in fp32. O(H n_b^2) memory: small inputs only."""
    from ..sketch import scores_mean, scores_minmax
    b, h, nb, dim = qp.shape
    hkv = ka.shape[1]
    qg = qp.view(b, hkv, h // hkv, nb, dim)
    s = scores_mean(qg, ka, scale) if kb is None else scores_minmax(qg, ka, kb, scale)    # (B, H_kv, r, n_b, n_b)
    j = torch.arange(nb, device=qp.device)
    p = torch.softmax(s.masked_fill(j.unsqueeze(0) > j.unsqueeze(1), float("-inf")), dim=-1)
    return p.mean(dim=(1, 2)).unsqueeze(1) if select_per == "layer" else p.mean(dim=2)
