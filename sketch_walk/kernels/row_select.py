"""Sketch&Walk prefill steps 5 and 7 in Triton: per row of a block matrix, sharpen or renormalise, then the kept lists.

One program per row i of a (B, G', n_b, n_b) block matrix (grid (n_b, B * G')); the row (all n_b entries)
lives in registers. In order, each enabled by a flag:
  * input: the sum of S partial matrices X[s] (the head-split partials of :mod:`.block_transition`,
    added in the fixed order s = 0..S-1), entries j > i read as 0;
  * MODE 1, rownorm: x / max(sum x, tiny)  (:func:`sketch_walk.walk.rownorm`; the walk's last step);
    MODE 2, sharpen: softmax_j(s log x)  (:func:`sketch_walk.walk.sharpen`, step 5: rownorm(x ** s) without
    fp32 underflow to ties);
  * WRITE: the row to Out (may be X itself: the program reads its row before writing it);
  * SELECT: step 7, exactly :func:`sketch_walk.selection.select_blocks` + ``expand_to_kv_heads`` on the row:
    keep sink {0..n_sink-1}, local {i-n_local+1..i} and the top_k_blocks candidates (n_sink <= j <= i - n_local) by
    (score, index) -- score = max(x, 0) with NaN -> 0 and +inf -> FLT_MAX, ties to the higher index; rows
    with i + 1 <= n_sink + n_local + top_k_blocks, or i >= n_b - dense_last, are dense. The threshold (the top_k_blocks-th
    largest candidate) comes from top_k_blocks max-reductions over unique int64 keys (fp32 bits << 32 | j;
    non-negative floats order as their bits) when top_k_blocks <= 8, else from a bisection on the fp32 bit pattern
    (31 count-reductions) with ties at the threshold resolved by a reverse cumulative count; the kept
    set is written ascending through a cumulative sum (scatter), -1 past the count, to every key head of the
    group (select_per "layer": all H_kv heads get the same list).
So A -> W (sharpen) is one launch, and R -> rownorm(R) -> lists another; with walk_damping 0 one launch
does sharpen + lists. No host synchronisation: list widths come from shapes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..core.kernels._launch import pow2

# top_k_blocks up to this: TOP_K_BLOCKS int64 max-reductions; above: the 31-step bisection (int32 count-reductions). Measured
# on the H100 at top_k_blocks 16 (benchmarks/results/selection_speed_*.json), 4 warps: the bisection 0.070 ms vs 0.096
# at n_b 2048, 0.025 vs 0.027 at 1024, so one int64 max-reduction costs about three count-reductions: the crossover
# lies near top_k_blocks 10.
ITERATIVE_MAX_K = 8


@triton.jit(do_not_specialize=["N_BLOCKS", "MAX_KEPT", "DENSE_FROM"])
def _row_select_kernel(
    X, Out, Idx, Cnt,
    s_exp,
    stride_xs, stride_xb, stride_xg, stride_xm,
    stride_ob, stride_og, stride_om,
    stride_ib, stride_ih, stride_im,
    stride_cb, stride_ch,
    GP, H_KV, N_BLOCKS, SPLIT, MAX_KEPT, N_SINK, N_LOCAL, TOP_K_BLOCKS, DENSE_FROM,
    MODE: tl.constexpr,             # 0: as read; 1: rownorm; 2: softmax(s_exp * log x)
    WRITE: tl.constexpr,
    SELECT: tl.constexpr,
    ITERATIVE: tl.constexpr,        # top-k by TOP_K_BLOCKS max-reductions (small TOP_K_BLOCKS) instead of the 31-step bisection
    BLOCK_N: tl.constexpr,          # pow2 >= N_BLOCKS
):
    i = tl.program_id(0)
    bg = tl.program_id(1)
    b = (bg // GP).to(tl.int64)
    gp = (bg % GP).to(tl.int64)
    j = tl.arange(0, BLOCK_N)
    causal = j <= i                                   # (i < N_BLOCKS, so also j < N_BLOCKS)

    # The causal mask makes the loads 4 bytes wide (i varies per program) but skips the upper triangle: half
    # the bytes. Unmasked 16-byte loads of whole rows measured slower (docs/PERFORMANCE.md).
    x_ptr = X + b * stride_xb + gp * stride_xg + i.to(tl.int64) * stride_xm + j
    x = tl.load(x_ptr, mask=causal, other=0.0)
    for sp in range(1, SPLIT):
        x += tl.load(x_ptr + sp * stride_xs, mask=causal, other=0.0)

    if MODE == 1:
        x = x / tl.maximum(tl.sum(x, 0), 1.1754943508222875e-38)
    elif MODE == 2:
        lx = tl.where(causal, tl.log(x) * s_exp, float("-inf"))
        e = tl.exp(lx - tl.max(lx, 0))
        x = e / tl.sum(e, 0)
    if WRITE:
        tl.store(Out + b * stride_ob + gp * stride_og + i.to(tl.int64) * stride_om + j, x, mask=j < N_BLOCKS)

    if SELECT:
        budget = N_SINK + N_LOCAL + TOP_K_BLOCKS
        dense = (i + 1 <= budget) | (i >= DENSE_FROM)
        sc = tl.where(x > 0, tl.minimum(x, 3.4028234663852886e38), 0.0)     # NaN, -inf, -0.0, < 0 -> 0
        cand = (j >= N_SINK) & (j <= i - N_LOCAL)
        bits = tl.where(cand, sc.to(tl.int32, bitcast=True), -1)
        if ITERATIVE:
            # small top_k_blocks: TOP_K_BLOCKS max-reductions over unique int64 keys (bits << 32 | j; ties -> higher j)
            keys = tl.where(cand, (bits.to(tl.int64) << 32) | j.to(tl.int64), -1)
            work = keys
            thr = tl.max(work, 0)
            for _k in range(1, TOP_K_BLOCKS):
                work = tl.where(work == thr, -1, work)
                thr = tl.max(work, 0)
            top = keys >= thr
        else:
            # t = the TOP_K_BLOCKS-th largest candidate bit pattern: the largest t with #{bits >= t} >= TOP_K_BLOCKS
            t = tl.sum(tl.zeros([BLOCK_N], dtype=tl.int32), 0)
            for k in range(0, 31):
                c = t | (1 << (30 - k))
                n_ge = tl.sum((bits >= c).to(tl.int32), 0)
                t = tl.where(n_ge >= TOP_K_BLOCKS, c, t)
            gt = bits > t
            eq = bits == t
            need = TOP_K_BLOCKS - tl.sum(gt.to(tl.int32), 0)
            rank = tl.cumsum(eq.to(tl.int32), 0, reverse=True)      # ties: the more recent blocks first
            top = gt | (eq & (rank <= need))
        kept = tl.where(dense, causal, (j < N_SINK) | ((j > i - N_LOCAL) & causal) | top)
        kept_i = kept.to(tl.int32)
        cnt = tl.sum(kept_i, 0)
        pos = tl.cumsum(kept_i, 0) - 1
        copies = H_KV // GP
        for c in range(0, copies):
            hh = gp * copies + c
            base = Idx + b * stride_ib + hh * stride_ih + i.to(tl.int64) * stride_im
            tl.store(base + pos, j, mask=kept)
            tl.store(base + j, tl.full([BLOCK_N], -1, dtype=tl.int32), mask=(j >= cnt) & (j < MAX_KEPT))
            tl.store(Cnt + b * stride_cb + hh * stride_ch + i, cnt)


def _warps(block_n: int) -> int:
    # H100, n_b 2048: 4 warps 0.070 ms, 8 warps 0.081 (selection), 0.014 vs 0.019 (sharpen)
    return 4 if block_n <= 2048 else (8 if block_n <= 4096 else 16)


_PLACEHOLDERS: dict = {}


def _placeholder(device: torch.device) -> torch.Tensor:
    """A 1-element int32 tensor per device for the list pointers of a launch without lists (saves an allocation)."""
    t = _PLACEHOLDERS.get(device)
    if t is None:
        t = _PLACEHOLDERS[device] = torch.empty(1, dtype=torch.int32, device=device)
    return t


def row_pass_triton(x: torch.Tensor, mode: int = 0, s_exp: float = 1.0, out: Optional[torch.Tensor] = None,
                    lists: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, n_sink: int = 1, n_local: int = 1,
                    top_k_blocks: int = 16, dense_last: int = 0, num_warps: Optional[int] = None,
                    iterative: Optional[bool] = None) -> None:
    """One launch over the rows of x: (S, B, G', n_b, n_b) partials or (B, G', n_b, n_b), fp32, last stride 1.

    ``mode`` 0 / 1 (rownorm) / 2 (sharpen by ``s_exp``); ``out`` (B, G', n_b, n_b) fp32 (last stride 1, may be
    x itself when S = 1) receives the rows; ``lists`` = (block_idx (B, H_kv, n_b, max_kept) int32, block_cnt
    (B, H_kv, n_b) int32), both last stride 1, receive the selection (module docstring), H_kv a multiple of G'.
    ``num_warps`` / ``iterative`` (top-k by max-reductions instead of the bisection): launch choices, for the
    benchmarks.
    """
    if x.dim() == 4:
        x = x.unsqueeze(0)
    if x.dtype != torch.float32 or x.stride(-1) != 1:
        raise ValueError("x must be fp32 with last stride 1")
    split, b, gp, nb, nb2 = x.shape
    if nb != nb2:
        raise ValueError(f"expected square block matrices, got {tuple(x.shape)}")
    if out is not None and (out.shape != (b, gp, nb, nb) or out.dtype != torch.float32 or out.stride(-1) != 1):
        raise ValueError(f"out must be fp32 {(b, gp, nb, nb)} with last stride 1")
    if b == 0 or nb == 0 or gp == 0:
        return
    if lists is not None:
        idx, cnt = lists
        hkv, max_kept = idx.shape[1], idx.shape[-1]
        if (idx.shape[0], idx.shape[2]) != (b, nb) or cnt.shape != (b, hkv, nb) or hkv % gp or \
                idx.dtype != torch.int32 or cnt.dtype != torch.int32 or idx.stride(-1) != 1 or max_kept > nb:
            raise ValueError(f"lists {tuple(idx.shape)} {idx.dtype} / {tuple(cnt.shape)} {cnt.dtype} do not fit "
                             f"{(b, gp, nb)}")
        if top_k_blocks < 1 or n_sink < 0 or n_local < 0:
            raise ValueError("top_k_blocks >= 1, n_sink >= 0, n_local >= 0")
        i_strides = (idx.stride(0), idx.stride(1), idx.stride(2))
        c_strides = (cnt.stride(0), cnt.stride(1))
        dense_from = nb - dense_last if dense_last > 0 else nb
    else:
        idx = cnt = _placeholder(x.device)            # never read: SELECT is off
        hkv, max_kept, i_strides, c_strides, dense_from = gp, 0, (0, 0, 0), (0, 0), nb
    o = out if out is not None else x[0]
    bn = max(16, pow2(nb))
    _row_select_kernel[(nb, b * gp)](
        x, o, idx, cnt, float(s_exp),
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        o.stride(0), o.stride(1), o.stride(2),
        *i_strides, *c_strides,
        gp, hkv, nb, split, max_kept, n_sink, n_local, top_k_blocks, dense_from,
        MODE=int(mode), WRITE=out is not None, SELECT=lists is not None,
        ITERATIVE=(top_k_blocks <= ITERATIVE_MAX_K) if iterative is None else bool(iterative),
        BLOCK_N=bn, num_warps=num_warps or _warps(bn))


def select_blocks_triton(scores: torch.Tensor, n_sink: int, n_local: int, top_k_blocks: int, dense_last: int = 0,
                         n_kv: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prefill step 7 in one launch: scores (B, G', n_b, n_b) fp32 -> lists (B, n_kv, n_b, max_kept), (B, n_kv, n_b).

    Equals ``expand_to_kv_heads(*select_blocks(scores, arange(n_b), n_sink, n_local, top_k_blocks, dense_last), n_kv)``
    (:func:`select_blocks_reference`) exactly, ties included; entries j > i are ignored (read as 0).
    """
    from ..selection import max_kept_for
    b, gp, nb, _ = scores.shape
    n_kv = n_kv or gp
    width = max_kept_for(nb, n_sink + n_local + top_k_blocks, dense_last)
    idx = torch.empty(b, n_kv, nb, width, dtype=torch.int32, device=scores.device)
    cnt = torch.empty(b, n_kv, nb, dtype=torch.int32, device=scores.device)
    row_pass_triton(scores.float().contiguous(), 0, lists=(idx, cnt), n_sink=n_sink, n_local=n_local, top_k_blocks=top_k_blocks,
                    dense_last=dense_last)
    return idx, cnt


def select_blocks_reference(scores: torch.Tensor, n_sink: int, n_local: int, top_k_blocks: int, dense_last: int = 0,
                            n_kv: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The torch path: :func:`sketch_walk.selection.select_blocks` then ``expand_to_kv_heads``."""
    from ..selection import expand_to_kv_heads, select_blocks
    nb = scores.shape[-1]
    idx, cnt = select_blocks(scores, torch.arange(nb, device=scores.device), n_sink, n_local, top_k_blocks,
                             dense_last=dense_last)
    return expand_to_kv_heads(idx, cnt, n_kv or scores.shape[1])
