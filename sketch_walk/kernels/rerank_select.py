"""decode_rerank's second half in Triton: the exact attention mass over a shortlist and the budget picked from it.

What it computes (docs/ALGORITHM.md "Decode scorers", ``decode_rerank``; the PyTorch reference is
:func:`sketch_walk.selection.shortlist_mass` followed by :func:`sketch_walk.selection.rerank_plain`), for one decode
query per sequence, a cache of n keys in n_b blocks and the shortlist S (B, H_kv, W) of kept-block ids (ascending,
-1 padded; the Triton decode selection with R x top_k):

  1. ``_block_lse_kernel``, grid (B * H_kv * W,): program (b, g, w) loads block j = S[b, g, w]'s keys (at most
     block_size rows; positions >= n masked) once for the r query heads of key head g and writes
     L[b, g, h, w] = logsumexp_t (q_h . k_t * scale) (-inf for a padded entry);
  2. ``_rerank_final_kernel``, grid (B * G',): per head M_h[w] = exp(L_h[w] - logsumexp_w' L_h[w']) (the softmax
     restricted to S, summed per block), their mean over the group's heads (all heads for select_per "layer"),
     then the plain fixed rule on those W entries: the forced blocks (sink j < n_sink, local j > n_b - 1 - n_local)
     and the top_k best others, ranked by (bits of the mass, j) so a tie goes to the later block; S is ascending,
     so the kept entries, compacted by a prefix sum, are the ascending list. block_cnt = n_sink + n_local + top_k.

A row with n_b <= that budget is dense and is not launched (the shortlist holds every block). Work: W * block_size
keys per key head read once (Llama-3.1-8B at R = 8: 130 x 64 rows of 128 bf16 per key head, ~17 MB), two launches,
no host synchronisation (n may be a device scalar: a CUDA-graph step), so it is capturable.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..core.kernels._launch import pow2


@triton.jit(do_not_specialize=["N_KEYS", "W"])
def _block_lse_kernel(
    Q, stride_qb, stride_qh, K, stride_kb, stride_kg, stride_kn, IDX, NVALID, L,
    N_KEYS, W, H_KV, scale,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_NVALID: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    w = pid % W
    bg = pid // W                                           # b * H_KV + g
    b = bg // H_KV
    g = bg % H_KV
    j = tl.load(IDX + bg * W + w).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_t = tl.arange(0, BS)
    n = tl.load(NVALID).to(tl.int64) if HAS_NVALID else N_KEYS
    pos = j * BS + offs_t
    ok_t = (pos < n) & (pos >= 0)                            # j = -1 (padding): every position negative
    ok_r = offs_r < GROUP
    acc = tl.zeros([BLOCK_R, BS], dtype=tl.float32)
    for d0 in tl.static_range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        ok_d = offs_d < D
        q = tl.load(Q + b * stride_qb + (g * GROUP + offs_r)[:, None] * stride_qh + offs_d[None, :],
                    mask=ok_r[:, None] & ok_d[None, :], other=0.0).to(tl.float32)
        k = tl.load(K + b * stride_kb + g * stride_kg + pos[:, None] * stride_kn + offs_d[None, :],
                    mask=ok_t[:, None] & ok_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(q[:, None, :] * k[None, :, :], axis=2)
    logit = tl.where(ok_t[None, :], acc * scale, float("-inf"))
    m = tl.max(logit, axis=1)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    lse = tl.where(m > float("-inf"), m_safe + tl.log(tl.sum(tl.exp(logit - m_safe[:, None]), axis=1)), float("-inf"))
    tl.store(L + (bg * GROUP + offs_r) * W + w, lse, mask=ok_r)


@triton.jit(do_not_specialize=["NB", "W"])
def _rerank_final_kernel(
    L, IDX, OUT_IDX, OUT_CNT, SCORES,
    NB, W, G_W, H_KV,
    NH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, KV_PER_G: tl.constexpr,
    N_SINK: tl.constexpr, N_LOCAL: tl.constexpr, TOP_K: tl.constexpr, WRITE_SCORES: tl.constexpr,
):
    bgw = tl.program_id(0).to(tl.int64)
    b = bgw // G_W
    g = bgw % G_W
    offs_h = tl.arange(0, BLOCK_H)
    offs_w = tl.arange(0, BLOCK_W)
    ok_h = offs_h < NH
    ok_w = offs_w < W
    # the heads of this selection row are contiguous in L: (b, g * KV_PER_G .. , r, w) = rows b*H + g*NH + h
    lse = tl.load(L + ((b * H_KV * (NH // KV_PER_G) + g * NH + offs_h)[:, None]) * W + offs_w[None, :],
                  mask=ok_h[:, None] & ok_w[None, :], other=float("-inf"))
    m = tl.max(lse, axis=1)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    e = tl.exp(lse - m_safe[:, None])
    mass = e / tl.maximum(tl.sum(e, axis=1), 1.1754943508222875e-38)[:, None]
    score = tl.sum(tl.where(ok_h[:, None], mass, 0.0), axis=0) / NH          # (BLOCK_W,): mean over the heads
    if WRITE_SCORES:
        tl.store(SCORES + bgw * W + offs_w, score, mask=ok_w)
    hk0 = b * H_KV + g * KV_PER_G
    j = tl.load(IDX + hk0 * W + offs_w, mask=ok_w, other=-1).to(tl.int64)
    valid = ok_w & (j >= 0)
    forced = valid & ((j < N_SINK) | (j > NB - 1 - N_LOCAL))
    s = tl.where(score > 0.0, score, 0.0)                                    # NaN and negatives -> +0.0
    s = tl.minimum(s, 3.4028234663852886e38)
    key = (s.to(tl.int32, bitcast=True).to(tl.int64) << 32) | j
    key = tl.where(forced, (tl.full([BLOCK_W], 0x7FFFFFFF, tl.int64) << 32) | j, key)
    key = tl.where(valid, key, -1)
    thr = tl.max(key, axis=0)
    for _ in range(N_SINK + N_LOCAL + TOP_K - 1):                            # the budget-th largest (unique keys)
        thr = tl.max(tl.where(key < thr, key, -1), axis=0)
    keep = (key >= thr) & valid
    pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    for gg in tl.static_range(KV_PER_G):
        hk = hk0 + gg
        tl.store(OUT_IDX + hk * (N_SINK + N_LOCAL + TOP_K) + pos, j.to(tl.int32), mask=keep)
        tl.store(OUT_CNT + hk, tl.full([], N_SINK + N_LOCAL + TOP_K, tl.int32))


def rerank_select_triton(query: torch.Tensor, key_cache: torch.Tensor, shortlist: torch.Tensor, n_blocks: int,
                         scale: float, *, block_size: int, select_per: str, n_sink: int, n_local: int, top_k: int,
                         n_valid: Optional[torch.Tensor] = None, return_scores: bool = False
                         ) -> Tuple[torch.Tensor, ...]:
    """The kept lists of one decode step re-ranked over ``shortlist`` (module docstring).

    query (B, H, 1, d), key_cache (B, H_kv, N, d) (unit last stride; a static buffer with ``n_valid`` keys is
    fine), shortlist (B, H_kv, W) int32 ascending, -1 padded (the same list for every key head with select_per
    "layer"), n_blocks = n_b of the step. Returns block_idx (B, H_kv, budget) int32 and block_cnt (B, H_kv) int32,
    and with ``return_scores`` the entries' masses (B, G', W) fp32 (G' = 1 for "layer", H_kv for "kv_head").
    """
    b, h, _, d = query.shape
    hkv, n = key_cache.shape[1], key_cache.shape[2]
    w = shortlist.shape[-1]
    budget = n_sink + n_local + top_k
    if n_blocks <= budget:
        raise ValueError("rerank_select: a dense row (n_blocks <= the budget) keeps the whole shortlist")
    if h % hkv or shortlist.shape[:2] != (b, hkv) or w < budget:
        raise ValueError(f"rerank_select: query {tuple(query.shape)}, cache {tuple(key_cache.shape)}, shortlist "
                         f"{tuple(shortlist.shape)}, budget {budget}")
    group = h // hkv
    g_w = 1 if select_per == "layer" else hkv
    q = query[:, :, 0]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if key_cache.stride(-1) != 1:
        raise ValueError("rerank_select: the key cache needs a unit last stride")
    idx_in = shortlist.to(torch.int32).contiguous()
    dev = query.device
    lse = torch.empty(b, h, w, dtype=torch.float32, device=dev)
    out_idx = torch.empty(b, hkv, budget, dtype=torch.int32, device=dev)
    out_cnt = torch.empty(b, hkv, dtype=torch.int32, device=dev)
    scores = torch.empty(b, g_w, w, dtype=torch.float32, device=dev) if return_scores else lse
    nvalid = n_valid if n_valid is not None else lse                          # a dummy pointer when unused
    _block_lse_kernel[(b * hkv * w,)](
        q, q.stride(0), q.stride(1), key_cache, key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        idx_in, nvalid, lse, n, w, hkv, float(scale),
        GROUP=group, BLOCK_R=max(2, pow2(group)), BS=block_size, D=d, BLOCK_D=min(32, pow2(d)),
        HAS_NVALID=n_valid is not None, num_warps=4)
    nh = h // g_w
    _rerank_final_kernel[(b * g_w,)](
        lse, idx_in, out_idx, out_cnt, scores, n_blocks, w, g_w, hkv,
        NH=nh, BLOCK_H=max(2, pow2(nh)), BLOCK_W=max(16, pow2(w)), KV_PER_G=hkv // g_w,
        N_SINK=n_sink, N_LOCAL=n_local, TOP_K=top_k, WRITE_SCORES=return_scores, num_warps=4)
    return (out_idx, out_cnt, scores) if return_scores else (out_idx, out_cnt)
