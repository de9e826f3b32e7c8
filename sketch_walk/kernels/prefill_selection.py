"""Sketch&Walk prefill selection (docs/ALGORITHM.md steps 1-7) on the GPU: the Triton kernels composed.

:meth:`sketch_walk.SketchWalkSelector.select_prefill` runs this when the backend resolves to "triton" (CUDA, or
TRITON_INTERPRET=1 with the backend forced); the torch path (:mod:`sketch_walk.sketch`, :mod:`sketch_walk.walk`,
:mod:`sketch_walk.selection`) stays the CPU path and the reference. Launches per sparse layer (no host sync,
list widths from shapes, so CUDA-graph capturable):

  1. :mod:`.block_pool`        Q block means + K minmax (or fp64 sums + means), one pass over Q and K
     (mean: + 2 torch matmuls, the SRHT of the pooled vectors; minmax at fp16 dot precision: the pooling
     also writes the transition's fp16 operands, scaled Qbar and Kmax / Kmin copies)
  2. :mod:`.block_transition`  pass 1: per-(head, row) log-sum-exp of the block scores
  3. :mod:`.block_transition`  pass 2: head-mean of the causal softmax, S head-split partials
  4. :mod:`.row_select`        sum of the partials, sharpening W = softmax(s log A)       [+ lists if beta = 0]
  5. :mod:`.walk_step`         C = (1 - beta) W + beta R_prev W (lower-triangular tiles only)   [beta > 0]
  6. :mod:`.row_select`        R = rownorm(C), in place, and the kept-block lists               [beta > 0]
(walk_steps > 1 repeats 5-6; the first sparse layer, R_prev = identity, has R = rownorm(W) in step 6, no 5.)
Plus ~9 tensor allocations (torch.empty, no kernels); autotuned launches skip the Autotuner once a size was tuned
(:class:`._launch.TunedKernel`). The torch path launches ~50-100 kernels a layer.

Differences from the torch path, all below what an order-only selection sees: fp32 sums in another order
(pooling), TF32 dot products on the GPU, fp16 operands from 1536 key blocks on (:mod:`.block_transition`), the
first layer's R = rownorm(W) instead of
rownorm((1 - beta) W + beta W), GPU exp / log. The interpreter reproduces the torch path's lists except at
near-ties (tests/test_selection_kernels.py).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..selection import max_kept_for
from .block_pool import PooledBlocks, block_pool_triton
from .block_transition import LOG2E, block_transition_partials, dot_precision
from .row_select import row_pass_triton
from .walk_step import walk_step_triton


class PrefillSelection(NamedTuple):
    """What the selector keeps: the lists, the walk R (next layer's R_prev), W (decode's W_cache) and the
    decode state's block summaries (counts fp64; mean: sums fp64 and k_t; minmax: kmax, kmin)."""
    block_idx: torch.Tensor
    block_cnt: torch.Tensor
    walk: torch.Tensor
    w: torch.Tensor
    counts: torch.Tensor
    sums: Optional[torch.Tensor]
    k_t: Optional[torch.Tensor]
    kmax: Optional[torch.Tensor]
    kmin: Optional[torch.Tensor]


class _Operands(NamedTuple):
    pooled: PooledBlocks
    qp: torch.Tensor                 # Qbar, Qtil (mean) or the fp16 scaled Qbar (prescaled)
    ka: torch.Tensor                 # Kmax, Ktil (mean: the decode state's k_t) or its fp16 copy
    kb: Optional[torch.Tensor]
    prescaled: bool


def _pool_operands(query: torch.Tensor, key: torch.Tensor, block_size: int, scale: float, key_summary: str,
                   srht_matrix: Optional[torch.Tensor]) -> _Operands:
    """Steps 1-3b: pooling, and the transition's operands. Minmax at fp16 dot precision: the pooling kernel
    writes them (scaled, rounded), so the transition needs no rounding launches."""
    nb = (query.shape[2] + block_size - 1) // block_size
    if key_summary == "mean":
        if srht_matrix is None:
            raise ValueError("key_summary mean needs the SRHT matrix")
        pooled = block_pool_triton(query, key, block_size, key_summary)
        st = srht_matrix.t()
        return _Operands(pooled, torch.matmul(pooled.q_bar, st), torch.matmul(pooled.kb, st), None, False)  # step 2
    if dot_precision(nb) == "fp16":
        pooled = block_pool_triton(query, key, block_size, key_summary, half_scale=scale * LOG2E)
        return _Operands(pooled, pooled.q_bar, pooled.ka16, pooled.kb16, True)
    pooled = block_pool_triton(query, key, block_size, key_summary)
    return _Operands(pooled, pooled.q_bar, pooled.ka, pooled.kb, False)


def _transition(ops: _Operands, scale: float, select_per: str, **kw) -> torch.Tensor:
    if ops.prescaled:
        kw = dict(kw, precision="fp16", prescaled=True)
    return block_transition_partials(ops.qp, ops.ka, ops.kb, scale, select_per, **kw)


def sketch_walk_prefill_triton(query: torch.Tensor, key: torch.Tensor, *, block_size: int, scale: float,
                               key_summary: str = "minmax", select_per: str = "layer",
                               srht_matrix: Optional[torch.Tensor] = None, sparsity_exponent: float = 8.0,
                               walk_damping: float = 0.25, walk_steps: int = 1,
                               r_prev: Optional[torch.Tensor] = None, n_sink: int = 1, n_local: int = 1,
                               top_k_blocks: int = 16, dense_last: int = 0,
                               head_split: Optional[int] = None) -> PrefillSelection:
    """Steps 1-7 for one sparse layer. query (B, H, n, d), key (B, H_kv, n, d) (after RoPE, any float dtype);
    srht_matrix (k', d) fp32 for key_summary "mean"; r_prev (B, G_prev, n_b, n_b) the previous sparse layer's R
    or None. Returns :class:`PrefillSelection` with lists (B, H_kv, n_b, max_kept) int32 / (B, H_kv, n_b) int32."""
    b = query.shape[0]
    hkv = key.shape[1]
    ops = _pool_operands(query, key, block_size, scale, key_summary, srht_matrix)
    pooled = ops.pooled
    mean = key_summary == "mean"
    sums, k_t = (pooled.ka, ops.ka) if mean else (None, None)
    kmax, kmin = (None, None) if mean else (pooled.ka, pooled.kb)
    part = _transition(ops, scale, select_per, head_split=head_split)               # step 4
    split, _, gp, nb, _ = part.shape

    budget = n_sink + n_local + top_k_blocks
    idx = torch.empty(b, hkv, nb, max_kept_for(nb, budget, dense_last), dtype=torch.int32, device=query.device)
    cnt = torch.empty(b, hkv, nb, dtype=torch.int32, device=query.device)
    sel = dict(lists=(idx, cnt), n_sink=n_sink, n_local=n_local, top_k_blocks=top_k_blocks, dense_last=dense_last)
    sharpen_mode = 1 if sparsity_exponent == 1.0 else 2                           # s = 1: rownorm (walk.sharpen)
    w = part[0] if split == 1 else torch.empty(b, gp, nb, nb, dtype=torch.float32, device=query.device)
    if walk_damping == 0.0:                                                        # one-hop: R = W
        row_pass_triton(part, sharpen_mode, sparsity_exponent, out=w, **sel)
        walk = w
    else:
        row_pass_triton(part, sharpen_mode, sparsity_exponent, out=w)            # step 5
        cur = None
        if r_prev is not None:                                                     # walk._prev_for
            cur = r_prev.mean(dim=1, keepdim=True) if r_prev.shape[1] > 1 else r_prev
        for step in range(walk_steps):                                             # step 6
            last = step == walk_steps - 1
            if cur is None:
                nxt = torch.empty_like(w)
                row_pass_triton(w, 1, out=nxt, **(sel if last else {}))
            else:
                nxt = walk_step_triton(cur, w, walk_damping)
                row_pass_triton(nxt, 1, out=nxt, **(sel if last else {}))
            cur = nxt
        walk = cur
    return PrefillSelection(idx, cnt, walk, w, pooled.counts, sums, k_t, kmax, kmin)


def stage_callables(query: torch.Tensor, key: torch.Tensor, *, block_size: int, scale: float,
                    key_summary: str = "minmax", select_per: str = "layer",
                    srht_matrix: Optional[torch.Tensor] = None, sparsity_exponent: float = 8.0,
                    walk_damping: float = 0.25, r_prev: Optional[torch.Tensor] = None, n_sink: int = 1,
                    n_local: int = 1, top_k_blocks: int = 16, dense_last: int = 0,
                    other_precisions: tuple = ()) -> dict:
    """{stage name: zero-argument callable} running each launch of :func:`sketch_walk_prefill_triton` (walk_steps
    1) alone on inputs prepared once, for a timing breakdown (benchmarks/attention_speed.py). The row passes run
    in place on scratch copies, so repeated calls time the same work (values drift; only the cost matters).
    ``other_precisions``: also "transition@<p>" for each dot precision p (not a stage: a comparison)."""
    ops = _pool_operands(query, key, block_size, scale, key_summary, srht_matrix)
    part = _transition(ops, scale, select_per)
    split, b, gp, nb, _ = part.shape
    hkv = key.shape[1]
    budget = n_sink + n_local + top_k_blocks
    idx = torch.empty(b, hkv, nb, max_kept_for(nb, budget, dense_last), dtype=torch.int32, device=query.device)
    cnt = torch.empty(b, hkv, nb, dtype=torch.int32, device=query.device)
    sel = dict(lists=(idx, cnt), n_sink=n_sink, n_local=n_local, top_k_blocks=top_k_blocks, dense_last=dense_last)
    mode = 1 if sparsity_exponent == 1.0 else 2
    part_scratch = part.clone()
    w = torch.empty(b, gp, nb, nb, dtype=torch.float32, device=query.device)
    row_pass_triton(part, mode, sparsity_exponent, out=w)
    c_buf = torch.empty_like(w)
    pooled = ops.pooled
    half_scale = scale * LOG2E if ops.prescaled else None
    fns = {"pool": lambda: block_pool_triton(query, key, block_size, key_summary, half_scale=half_scale),
           "transition": lambda: _transition(ops, scale, select_per, out=part_scratch)}
    # the comparisons take fp32 operands (an fp16 one is rounded by the transition's wrapper, as before the fusion)
    q32, ka32, kb32 = (pooled.q_bar.float() / half_scale, pooled.ka, pooled.kb) if half_scale else \
        (ops.qp, ops.ka, ops.kb)
    for prec in other_precisions:
        fns[f"transition@{prec}"] = lambda prec=prec: block_transition_partials(
            q32, ka32, kb32, scale, select_per, precision=prec, out=part_scratch)
    if key_summary == "mean":
        st = srht_matrix.t()
        fns["srht"] = lambda: (torch.matmul(pooled.q_bar, st), torch.matmul(pooled.kb, st))
    if walk_damping == 0.0:
        fns["sharpen_select"] = lambda: row_pass_triton(part_scratch, mode, sparsity_exponent, out=w, **sel)
        return fns
    fns["sharpen"] = lambda: row_pass_triton(part_scratch, mode, sparsity_exponent, out=w)
    if r_prev is not None:
        cur = r_prev.mean(dim=1, keepdim=True) if r_prev.shape[1] > 1 else r_prev
        fns["walk"] = lambda: walk_step_triton(cur, w, walk_damping, out=c_buf)
    else:
        c_buf.copy_(w)
    fns["rownorm_select"] = lambda: row_pass_triton(c_buf, 1, out=c_buf, **sel)
    return fns
