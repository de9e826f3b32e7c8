"""Sketch&Walk decode selection in Triton: one decode step of one sparse layer in three launches.

What it computes (docs/ALGORITHM.md "Decode"; the PyTorch reference :func:`decode_select_reference`
beside it is the selector's torch path, op for op), for the new query of every sequence with
n_b cached blocks (the current, possibly partial, block is n_b - 1):

  (a) fold: (key_summary minmax) Kmax[n_b-1] = max(Kmax[n_b-1], k_new), Kmin likewise, counts[n_b-1] += 1
      (a block that opens this step starts from k_new and count 1). key_summary mean folds in torch
      (fp64 sums + re-sketch, :meth:`SketchWalkSelector._append_key`) and passes the sketched q_t, k_t;
  (b) scores Ahat_h[j] = (<q_h+, Kmax_g[j]> + <q_h-, Kmin_g[j]>) * scale (minmax) or <q_t_h, k_t_g[j]> * scale
      (mean), p_h = softmax_j(Ahat_h), a = mean of p_h over the heads of a group (G' = 1 group of all H
      heads for select_per "layer", G' = H_kv groups of r heads for "kv_head");
  (c) w = rownorm(a ** s) as softmax(s * log a) (s = 1: rownorm(a));
  (d) W_cache[n_b-1, :n_b] = w and r = rownorm((1 - beta) w + beta r_prev W_cache[:n_b, :n_b]); r_prev None
      (the first sparse layer) means hop = W_cache[n_b-1] = w; beta = 0 gives r = w (no W_cache access);
  (e) the kept-block list of the decode row i = n_b - 1, exactly as :func:`sketch_walk.selection.select_blocks`
      (dense row when n_b <= n_sink + n_local + top_k_blocks; otherwise sink U local U top-k of the candidates
      n_sink <= j <= i - n_local, ranked by (bits of max(r, 0), j) so a higher index wins a tie), expanded
      to the key heads: block_idx (B, H_kv, max_kept) int32 ascending, block_cnt (B, H_kv) int32.
      In decode every row is full (count == max_kept), so no -1 padding ever occurs.

Launches (no host synchronisation; every grid and width follows from shapes and n_b, so a decode step
is CUDA-graph capturable):
  1. ``_scores_hop_kernel``, 1-D grid of B*G'*R*TJ hop programs (first) + B*H_kv*T score programs:
     score program (b, g, tile t of BLOCK_N blocks): loads the tile of both summaries once for the r
     query heads of key head g (folding k_new into block n_b-1 in registers and storing that row back),
     writes the raw scores S (B, H, n_b) and per-tile softmax stats (max, sum exp) per head;
     hop program (b, g', row chunk, column tile): the partial products sum_{i in chunk} r_prev[i] W[i, j]
     over rows i < n_b - 1 (row n_b - 1 is w, added in launch 3), reading only the lower triangle j <= i
     (W_cache is causal: row i was written with columns <= i, the rest stay 0).
     Both halves are bandwidth bound and independent, so one launch streams the summaries and W_cache
     together (Llama-3.1-8B, 128K: 16 MB of Kmax/Kmin + ~8 MB of W_cache's lower triangle).
  2. ``_head_mean_kernel``, grid (column tiles, B*G'): merges the tile stats into each head's softmax
     max / denominator, forms a = mean_h exp(S_h - m_h) / l_h and sums the hop partials.
  3. ``_final_kernel``, grid (B*G',): one program per selection row (n_b entries in registers):
     sharpen, write W_cache's row, walk, rownorm, the top-k threshold by TOP_K_BLOCKS max-reductions over unique
     int64 keys, positions by a prefix sum, and the lists of every key head of the group.
Host-side choices are made on host values only: n_b, whether the block opens this step (a constexpr
variant of launch 1), whether r_prev exists, the tile counts; scratch buffers come from torch.empty (the
graph's pool under capture). Llama-3.1-8B at 128K (n_b 2048, H 32, H_kv 8, d 128, top_k_blocks 16): 256 hop
(136 with work) + 512 score programs in launch 1 (~24 MB read), 32 in launch 2 (~1 MB), 1 in launch 3 (2048-entry row).
walk_steps > 1 is not fused (the second hop needs the full new r first): the selector keeps torch for it.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..core.kernels._launch import cdiv, pow2, unit_stride

#: tile sizes (tests shrink them to exercise several tiles at small n_b)
DEFAULT_CONFIG: Dict[str, int] = dict(BLOCK_N=32, BLOCK_D=32, BLOCK_J=128, BLOCK_I=128, SUB_I=32, BLOCK_J2=64,
                                      BLOCK_T=32, num_warps=4)
#: tests set this to fill the scratch buffers with NaN (an element read before it is written then shows)
POISON_SCRATCH = False


@triton.jit
def _score_tile(
    pid, Q, stride_qb, stride_qh, KA, KB, stride_kb, stride_kh, stride_kn, KNEW, stride_nb, stride_nh, COUNTS,
    S, TMAX, TSUM, scale, NB, H_KV, T,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, DQ: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, MINMAX: tl.constexpr, FOLD: tl.constexpr, NEW_BLOCK,
):
    """Scores of the r query heads of key head g against a tile of BLOCK_N blocks (+ the fold of block NB-1)."""
    t = pid % T
    bg = pid // T
    b = (bg // H_KV).to(tl.int64)
    g = (bg % H_KV).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < GROUP
    head = g * GROUP + offs_r
    offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NB
    is_cur = offs_n == NB - 1
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    k_base = b * stride_kb + g * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn
    for d0 in tl.static_range(0, DQ, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < DQ
        q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        kmask = n_ok[:, None] & d_ok[None, :]
        ka = tl.load(KA + k_base + offs_d[None, :], mask=kmask, other=0.0)
        if MINMAX:
            kb = tl.load(KB + k_base + offs_d[None, :], mask=kmask, other=0.0)
            if FOLD:
                kn = tl.load(KNEW + b * stride_nb + g * stride_nh + offs_d, mask=d_ok, other=0.0)
                kn = kn.to(tl.float32)[None, :]
                if NEW_BLOCK != 0:                                # the block opens with this key
                    ka = tl.where(is_cur[:, None], kn, ka)
                    kb = tl.where(is_cur[:, None], kn, kb)
                else:
                    ka = tl.where(is_cur[:, None], tl.maximum(ka, kn), ka)
                    kb = tl.where(is_cur[:, None], tl.minimum(kb, kn), kb)
                smask = is_cur[:, None] & d_ok[None, :]
                tl.store(KA + k_base + offs_d[None, :], ka, mask=smask)
                tl.store(KB + k_base + offs_d[None, :], kb, mask=smask)
            qp = tl.maximum(q, 0.0)
            qn = tl.minimum(q, 0.0)
            acc += tl.sum(qp[:, None, :] * ka[None, :, :] + qn[:, None, :] * kb[None, :, :], axis=2)
        else:
            acc += tl.sum(q[:, None, :] * ka[None, :, :], axis=2)
    s = acc * scale
    s = tl.where(n_ok[None, :], s, float("-inf"))
    row = b * (H_KV * GROUP) + head                                       # (BLOCK_R,) rows of S
    tl.store(S + row[:, None] * NB + offs_n[None, :], s, mask=r_ok[:, None] & n_ok[None, :])
    m = tl.max(s, axis=1)
    l = tl.sum(tl.exp(s - m[:, None]), axis=1)
    tl.store(TMAX + row * T + t, m, mask=r_ok)
    tl.store(TSUM + row * T + t, l, mask=r_ok)
    if FOLD:
        if (bg == 0) & (t == (NB - 1) // BLOCK_N):
            c = tl.load(COUNTS + NB - 1)
            if NEW_BLOCK != 0:
                c = c * 0.0
            tl.store(COUNTS + NB - 1, c + 1.0)


@triton.jit
def _hop_tile(
    p2, RPREV, stride_rb, WC, stride_wb, stride_wg, stride_wi, HP, NB, R, TJ, G_W,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, SUB_I: tl.constexpr,
):
    """Hop partials: HP[b, g, it, j] = sum over rows i of chunk it (i < NB-1, i >= j) of r_prev[i] W[i, j]."""
    jt = p2 % TJ
    tmp = p2 // TJ
    it = tmp % R
    bgw = (tmp // R).to(tl.int64)
    b = bgw // G_W
    g = bgw % G_W
    offs_j = jt * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = offs_j < NB
    i_hi = tl.minimum(it * BLOCK_I + BLOCK_I, NB - 1)
    i_lo = tl.maximum(it * BLOCK_I, jt * BLOCK_J)                        # rows i < j0 see no j >= j0
    acc = tl.zeros([BLOCK_J], dtype=tl.float32)
    w_base = WC + b * stride_wb + g * stride_wg
    for i0 in range(i_lo, i_hi, SUB_I):
        offs_i = i0 + tl.arange(0, SUB_I)
        i_ok = offs_i < i_hi
        rp = tl.load(RPREV + b * stride_rb + offs_i, mask=i_ok, other=0.0)
        wmask = i_ok[:, None] & j_ok[None, :] & (offs_j[None, :] <= offs_i[:, None])
        w = tl.load(w_base + offs_i[:, None].to(tl.int64) * stride_wi + offs_j[None, :], mask=wmask, other=0.0)
        acc += tl.sum(rp[:, None] * w, axis=0)
    tl.store(HP + (bgw * R + it) * NB + offs_j, acc, mask=j_ok)


@triton.jit(do_not_specialize=["stride_rb", "NB", "N_HOP", "T", "R", "TJ", "NEW_BLOCK"])
def _scores_hop_kernel(
    Q, stride_qb, stride_qh,
    KA, KB, stride_kb, stride_kh, stride_kn,
    KNEW, stride_nb, stride_nh,
    COUNTS,
    S, TMAX, TSUM,
    RPREV, stride_rb,
    WC, stride_wb, stride_wg, stride_wi,
    HP,
    scale, NB, H_KV, N_HOP, T, R, TJ, G_W,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, DQ: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, MINMAX: tl.constexpr, FOLD: tl.constexpr, NEW_BLOCK,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, SUB_I: tl.constexpr,
):
    # the hop programs (fewer, longer) come first so that they start first; the score programs fill in
    pid = tl.program_id(0)
    if pid >= N_HOP:
        _score_tile(pid - N_HOP, Q, stride_qb, stride_qh, KA, KB, stride_kb, stride_kh, stride_kn, KNEW, stride_nb,
                    stride_nh, COUNTS, S, TMAX, TSUM, scale, NB, H_KV, T,
                    GROUP, BLOCK_R, DQ, BLOCK_D, BLOCK_N, MINMAX, FOLD, NEW_BLOCK)
    else:
        _hop_tile(pid, RPREV, stride_rb, WC, stride_wb, stride_wg, stride_wi, HP, NB, R, TJ, G_W,
                  BLOCK_I, BLOCK_J, SUB_I)


@triton.jit(do_not_specialize=["NB", "T", "R"])
def _head_mean_kernel(
    S, TMAX, TSUM, HP, A, HOP,
    NB, T, R, H, G_W,
    NH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr,
    HAS_HOP: tl.constexpr,
):
    jt = tl.program_id(0)
    bgw = tl.program_id(1).to(tl.int64)
    b = bgw // G_W
    g = bgw % G_W
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < NH
    row = b * H + g * NH + offs_h                                          # the heads of group g
    # each head's softmax max and denominator over all blocks, from the tile stats
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        msk = h_ok[:, None] & (offs_t[None, :] < T)
        tm = tl.load(TMAX + row[:, None] * T + offs_t[None, :], mask=msk, other=float("-inf"))
        ts = tl.load(TSUM + row[:, None] * T + offs_t[None, :], mask=msk, other=0.0)
        m_new = tl.maximum(m, tl.max(tm, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(ts * tl.exp(tm - m_safe[:, None]), axis=1)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    inv_l = tl.where(h_ok & (l > 0.0), 1.0 / l, 0.0)
    offs_j = jt * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = offs_j < NB
    s = tl.load(S + row[:, None] * NB + offs_j[None, :], mask=h_ok[:, None] & j_ok[None, :], other=float("-inf"))
    p = tl.exp(s - m_safe[:, None]) * inv_l[:, None]
    a = tl.sum(p, axis=0) / NH
    tl.store(A + bgw * NB + offs_j, a, mask=j_ok)
    if HAS_HOP:
        hop = tl.zeros([BLOCK_J], dtype=tl.float32)
        for it in range(0, R):
            hop += tl.load(HP + (bgw * R + it) * NB + offs_j, mask=j_ok, other=0.0)
        tl.store(HOP + bgw * NB + offs_j, hop, mask=j_ok)


@triton.jit(do_not_specialize=["stride_rb", "NB"])
def _final_kernel(
    A, HOP, RPREV, stride_rb, WC, stride_wb, stride_wg, stride_wi, ROUT, IDX, CNT,
    NB, G_W, H_KV, s_exp, beta,
    KV_PER_G: tl.constexpr, MAX_KEPT: tl.constexpr, N_SINK: tl.constexpr, N_LOCAL: tl.constexpr,
    TOP_K_BLOCKS: tl.constexpr, BLOCK_NB: tl.constexpr,
    SHARPEN: tl.constexpr, WALK: tl.constexpr, HAS_PREV: tl.constexpr, DENSE: tl.constexpr,
):
    bgw = tl.program_id(0).to(tl.int64)
    b = bgw // G_W
    g = bgw % G_W
    offs = tl.arange(0, BLOCK_NB)
    ok = offs < NB
    a = tl.load(A + bgw * NB + offs, mask=ok, other=0.0)
    # (c) sharpen
    if SHARPEN:
        x = tl.where(ok, tl.log(a) * s_exp, float("-inf"))
        e = tl.exp(x - tl.max(x, axis=0))
        w = e / tl.sum(e, axis=0)
    else:
        w = a / tl.maximum(tl.sum(a, axis=0), 1.1754943508222875e-38)
    # (d) the walk row
    if WALK:
        tl.store(WC + b * stride_wb + g * stride_wg + (b * 0 + NB - 1) * stride_wi + offs, w, mask=ok)
        if HAS_PREV:
            r_last = tl.load(RPREV + b * stride_rb + NB - 1)
            hop = tl.load(HOP + bgw * NB + offs, mask=ok, other=0.0) + r_last * w
        else:
            hop = w
        v = (1.0 - beta) * w + beta * hop
        r = v / tl.maximum(tl.sum(v, axis=0), 1.1754943508222875e-38)
    else:
        r = w
    tl.store(ROUT + bgw * NB + offs, r, mask=ok)
    # (e) the kept-block list of row i = NB - 1
    if DENSE:
        for gg in tl.static_range(KV_PER_G):
            hk = b * H_KV + g * KV_PER_G + gg
            tl.store(IDX + hk * MAX_KEPT + offs, offs.to(tl.int32), mask=ok)
            tl.store(CNT + hk, tl.sum(ok.to(tl.int32), axis=0))
    else:
        i = NB - 1
        cand = ok & (offs >= N_SINK) & (offs <= i - N_LOCAL)
        rr = tl.where(r > 0.0, r, 0.0)                          # NaN, -inf, negatives (and -0.0) -> +0.0
        rr = tl.minimum(rr, 3.4028234663852886e38)               # +inf -> float max, as nan_to_num
        key = (rr.to(tl.int32, bitcast=True).to(tl.int64) << 32) | offs.to(tl.int64)
        key = tl.where(cand, key, -1)
        thr = tl.max(key, axis=0)
        for _ in range(TOP_K_BLOCKS - 1):                                # the TOP_K_BLOCKS-th largest (keys are unique)
            thr = tl.max(tl.where(key < thr, key, -1), axis=0)
        keep = key >= thr                                         # exactly TOP_K_BLOCKS candidates (thr >= 0)
        pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
        loc = offs - (NB - N_LOCAL)                               # 0..N_LOCAL-1 for the local blocks
        for gg in tl.static_range(KV_PER_G):
            hk = b * H_KV + g * KV_PER_G + gg
            base = IDX + hk * MAX_KEPT
            tl.store(base + offs, offs.to(tl.int32), mask=offs < N_SINK)
            tl.store(base + N_SINK + pos, offs.to(tl.int32), mask=keep)
            tl.store(base + N_SINK + TOP_K_BLOCKS + loc, offs.to(tl.int32), mask=ok & (loc >= 0))
            tl.store(CNT + hk, tl.full([], MAX_KEPT, tl.int32))


def _max_kept(n_b: int, budget: int) -> int:
    return min(n_b, budget)


def decode_select_triton(q: torch.Tensor, summ_a: torch.Tensor, summ_b: Optional[torch.Tensor], n_blocks: int,
                         scale: float, *, select_per: str, sparsity_exponent: float, walk_damping: float,
                         n_sink: int, n_local: int, top_k_blocks: int, w_cache: Optional[torch.Tensor] = None,
                         r_prev: Optional[torch.Tensor] = None, k_new: Optional[torch.Tensor] = None,
                         counts: Optional[torch.Tensor] = None, new_block: bool = False,
                         out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                         config: Optional[Dict[str, int]] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step's selection of one layer (module docstring). Returns (block_idx, block_cnt, r).

    q (B, H, d') any float dtype: the (pooled) new query (minmax) or its sketch q_t (mean); summ_a, summ_b
    (B, H_kv, cap, d') fp32: Kmax, Kmin (minmax) or summ_a = k_t and summ_b None (mean); n_blocks = n_b <= cap.
    k_new (B, H_kv, d) and counts (cap,) fp64: fold the new key into block n_b - 1 of Kmax / Kmin / counts
    in place (minmax only; ``new_block``: that block opens with this key). w_cache (B, G', cap, cap) fp32
    (needed when walk_damping > 0; its row n_b - 1 is overwritten with w); r_prev (B, G_prev, n_b) fp32, the
    previous sparse layer's r (its group mean is used when G_prev > 1), or None. walk_steps 1 only.
    Returns block_idx (B, H_kv, max_kept) int32, block_cnt (B, H_kv) int32, r (B, G', n_b) fp32
    (G' = 1 for select_per "layer", H_kv for "kv_head"); ``out`` = those three, written in place.
    """
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    bsz, h, dq = q.shape
    hkv, cap = summ_a.shape[1], summ_a.shape[2]
    nb = int(n_blocks)
    if h % hkv or summ_a.shape[0] != bsz or summ_a.shape[3] != dq or not 1 <= nb <= cap:
        raise ValueError(f"decode_select: q {tuple(q.shape)}, summaries {tuple(summ_a.shape)}, n_blocks {nb}")
    minmax = summ_b is not None
    fold = k_new is not None
    if fold and (not minmax or counts is None or counts.dtype != torch.float64 or counts.stride(0) != 1):
        raise ValueError("decode_select: folding the new key needs key_summary minmax and the fp64 counts (cap,)")
    walk = walk_damping > 0
    if walk and w_cache is None:
        raise ValueError("decode_select: walk_damping > 0 needs w_cache")
    group = h // hkv
    g_w = 1 if select_per == "layer" else hkv
    nh = h // g_w
    dev = q.device
    (q,) = unit_stride(q)
    if summ_a.stride(-1) != 1 or (minmax and (summ_b.stride() != summ_a.stride())) or \
            summ_a.dtype != torch.float32:
        raise ValueError("decode_select: summaries must be fp32 with unit last stride (Kmax and Kmin alike)")
    if fold:
        (k_new,) = unit_stride(k_new)
    has_prev = walk and r_prev is not None
    if has_prev:
        if r_prev.shape[1] > 1:
            r_prev = r_prev.mean(dim=1, keepdim=True)         # _prev_for: heads are not aligned across layers
        r_prev = r_prev.float()
        if r_prev.stride(-1) != 1:
            r_prev = r_prev.contiguous()
    if walk and (w_cache.stride(-1) != 1 or w_cache.dtype != torch.float32 or w_cache.shape[1] != g_w):
        raise ValueError(f"decode_select: w_cache {tuple(w_cache.shape)} must be fp32 (B, {g_w}, cap, cap), unit "
                         f"last stride")
    budget = n_sink + n_local + top_k_blocks
    max_kept = _max_kept(nb, budget)
    dense = nb <= budget

    bn, bj, bi = cfg["BLOCK_N"], cfg["BLOCK_J"], cfg["BLOCK_I"]
    T = cdiv(nb, bn)
    R = max(1, cdiv(nb - 1, bi))
    TJ = cdiv(nb, bj)
    new = torch.full if POISON_SCRATCH else (lambda shape, fill, **kw: torch.empty(shape, **kw))
    f32 = dict(dtype=torch.float32, device=dev)
    s_buf = new((bsz, h, nb), float("nan"), **f32)
    tmax = new((bsz, h, T), float("nan"), **f32)
    tsum = new((bsz, h, T), float("nan"), **f32)
    hp = new((bsz, g_w, R, nb), float("nan"), **f32) if has_prev else s_buf
    a_buf = new((bsz, g_w, nb), float("nan"), **f32)
    hop = new((bsz, g_w, nb), float("nan"), **f32) if has_prev else a_buf
    if out is None:
        idx = torch.empty(bsz, hkv, max_kept, dtype=torch.int32, device=dev)
        cnt = torch.empty(bsz, hkv, dtype=torch.int32, device=dev)
        r_out = torch.empty(bsz, g_w, nb, **f32)
    else:
        idx, cnt, r_out = out
        if idx.shape != (bsz, hkv, max_kept) or cnt.shape != (bsz, hkv) or r_out.shape != (bsz, g_w, nb) \
                or not (idx.is_contiguous() and cnt.is_contiguous() and r_out.is_contiguous()):
            raise ValueError("decode_select: out buffers of the wrong shape or layout")
    if bsz == 0:
        return idx, cnt, r_out

    kb = summ_b if minmax else summ_a
    kn = k_new if fold else q
    cn = counts if fold else s_buf
    rp = r_prev if has_prev else s_buf
    wc = w_cache if walk else s_buf
    wst = (w_cache.stride(0), w_cache.stride(1), w_cache.stride(2)) if walk else (0, 0, 0)
    n_score = bsz * hkv * T
    n_hop = bsz * g_w * R * TJ if has_prev else 0
    _scores_hop_kernel[(n_score + n_hop,)](
        q, q.stride(0), q.stride(1),
        summ_a, kb, summ_a.stride(0), summ_a.stride(1), summ_a.stride(2),
        kn, kn.stride(0), kn.stride(1),
        cn,
        s_buf, tmax, tsum,
        rp, rp.stride(0) if has_prev else 0,
        wc, *wst,
        hp,
        float(scale), nb, hkv, n_hop, T, R, TJ, g_w,
        GROUP=group, BLOCK_R=pow2(group), DQ=dq, BLOCK_D=min(cfg["BLOCK_D"], pow2(dq)), BLOCK_N=bn,
        MINMAX=minmax, FOLD=fold, NEW_BLOCK=int(bool(new_block) and fold), BLOCK_I=bi, BLOCK_J=bj, SUB_I=cfg["SUB_I"],
        num_warps=cfg["num_warps"])
    bj2 = cfg["BLOCK_J2"]
    _head_mean_kernel[(cdiv(nb, bj2), bsz * g_w)](
        s_buf, tmax, tsum, hp, a_buf, hop, nb, T, R, h, g_w,
        NH=nh, BLOCK_H=pow2(nh), BLOCK_T=min(cfg["BLOCK_T"], pow2(T)), BLOCK_J=bj2, HAS_HOP=has_prev,
        num_warps=cfg["num_warps"])
    bnb = max(16, pow2(nb))
    _final_kernel[(bsz * g_w,)](
        a_buf, hop, rp, rp.stride(0) if has_prev else 0, wc, *wst, r_out, idx, cnt,
        nb, g_w, hkv, float(sparsity_exponent), float(walk_damping),
        KV_PER_G=hkv // g_w, MAX_KEPT=max_kept, N_SINK=n_sink, N_LOCAL=n_local, TOP_K_BLOCKS=top_k_blocks, BLOCK_NB=bnb,
        SHARPEN=float(sparsity_exponent) != 1.0, WALK=walk, HAS_PREV=has_prev, DENSE=dense,
        num_warps=4 if bnb <= 1024 else (8 if bnb <= 4096 else 16))
    return idx, cnt, r_out


@torch.no_grad()
def decode_select_reference(q: torch.Tensor, summ_a: torch.Tensor, summ_b: Optional[torch.Tensor], n_blocks: int,
                            scale: float, *, select_per: str, sparsity_exponent: float, walk_damping: float,
                            n_sink: int, n_local: int, top_k_blocks: int, w_cache: Optional[torch.Tensor] = None,
                            r_prev: Optional[torch.Tensor] = None, k_new: Optional[torch.Tensor] = None,
                            counts: Optional[torch.Tensor] = None, new_block: bool = False,
                            **_ignored) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PyTorch path of :meth:`SketchWalkSelector.select_decode` (after the key fold), same arguments and
    in-place effects as :func:`decode_select_triton`."""
    from ..selection import expand_to_kv_heads, select_blocks
    from ..sketch import scores_mean, scores_minmax
    from ..walk import block_transition, sharpen, walk_row
    bsz, h, dq = q.shape
    hkv = summ_a.shape[1]
    r = h // hkv
    nb = int(n_blocks)
    if k_new is not None:
        i = nb - 1
        kf = k_new.float()
        if new_block:
            summ_a[:, :, i] = kf
            summ_b[:, :, i] = kf
            counts[i].fill_(1)
        else:
            summ_a[:, :, i] = torch.maximum(summ_a[:, :, i], kf)
            summ_b[:, :, i] = torch.minimum(summ_b[:, :, i], kf)
            counts[i] += 1
    qg = q.float().view(bsz, hkv, r, 1, dq)
    ka = summ_a[:, :, :nb]
    if summ_b is not None:
        kb = summ_b[:, :, :nb]
        score_fn = lambda g0, g1: scores_minmax(qg[:, g0:g1], ka[:, g0:g1],  # noqa: E731
                                                kb[:, g0:g1], scale)
    else:
        score_fn = lambda g0, g1: scores_mean(qg[:, g0:g1], ka[:, g0:g1], scale)  # noqa: E731
    p = block_transition(score_fn, hkv, r, select_per, None, None).squeeze(-2)      # (B, G', nb)
    w = sharpen(p, sparsity_exponent)
    if walk_damping > 0:
        w_cache[:, :, nb - 1, :nb] = w
        rr = walk_row(w, r_prev, w_cache[:, :, :nb, :nb], walk_damping, 1)
    else:
        rr = w
    row = torch.full((1,), nb - 1, dtype=torch.long, device=q.device)
    idx, cnt = select_blocks(rr.unsqueeze(-2), row, n_sink, n_local, top_k_blocks)
    idx, cnt = expand_to_kv_heads(idx, cnt, hkv)
    return idx.squeeze(-2), cnt.squeeze(-1), rr


__all__ = ["decode_select_triton", "decode_select_reference", "DEFAULT_CONFIG"]
