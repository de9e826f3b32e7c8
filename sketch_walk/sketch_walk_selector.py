"""SketchWalkSelector: Sketch&Walk (and its oracle / local controls) as a :class:`BlockSelector`.

Prefill, at every sparse layer (ALGORITHM.md steps 1-7):
  pool Q and K per block -> (mean) SRHT-sketch both and score / (minmax) bound q.k by Kmax, Kmin
  -> causal row-softmax per head, head mean (A) -> sharpen (W) -> walk with the previous sparse
  layer's R -> sink U local U top-k per query block.
Decode, one new token per step (unless the hook runs decode dense):
  update the current block's running K sum / count (and max / min) from the new key only, in O(d);
  re-sketch that one block (O(d k)); score the new query (or the mean of the last
  ``decode_query_window`` queries) against every block summary; head mean, sharpen, walk with
  r_l = rownorm((1 - beta) w_l + beta r_{l-1} W_l_cache); select afresh at every step.
  Cost per layer and step: O(n_b d) for the scores and O(n_b^2) for the walk term (skipped when
  walk_damping is 0); the prefill's sketch is never recomputed.

All per-sequence state (the walk's R across layers, the decode state of every layer) lives in
one :class:`SketchWalkState`, replaced by :meth:`SketchWalkSelector.reset` for every prompt.

Choices where ALGORITHM.md is silent (all documented where they act):
* block scores use the attention's own scale (``module.scaling``; 1/sqrt(d) for Llama);
* running K block sums are kept in float64, so incremental sums equal a recomputation from the cache
  exactly (fp32 / bf16 keys: exact while a block's values span < 29 binades, i.e. always in practice);
* W_cache: the row of the current block is overwritten by the current decode row w_l at every
  step (a new row and a zero column are appended when a new block opens); it is the transition of the
  most recent query of that block. The hop term for the first sparse layer (R = identity) is that row.
* select_per "kv_head": the walk carries one R per key head, but its multi-hop term uses the head
  mean of the previous layer's R (heads are not aligned across layers), see :mod:`sketch_walk.walk`;
* decode_query_window > 1: the window holds the last queries of the same layer, the prompt's last
  ones included at the first decode step;
* oracle: exact block attention mass of the layer (no sharpening, no walk: the ceiling of one-hop
  selection); in decode the new query's own mass (decode_query_window does not apply);
* local: sink + the last n_local + top_k_blocks blocks (same budget as Sketch&Walk);
* dense_last_blocks acts on prefill only.
GPU notes: no data-dependent host syncs (list widths come from shapes), no O(n^2) memory (the
transition is accumulated per chunk of key heads), batched torch ops; the oracle is O(n^2) time.
Decode selection (sketchwalk, walk_steps 1) runs as 3 Triton launches on CUDA
(:mod:`sketch_walk.kernels.decode_select`, backend "triton"); the torch code below is its reference.
Prefill selection (sketchwalk) likewise runs as ~6 Triton launches (:mod:`sketch_walk.kernels.prefill_selection`)
with the same state; oracle and local stay torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from .block_sparse import num_blocks
from .config import SketchWalkConfig
from .errors import UsageError
from .selection import expand_to_kv_heads, local_scores, oracle_block_mass, select_blocks
from .selector import BlockLists, BlockSelector, check_decode_step
from .sketch import (block_minmax, block_rows, block_sum, layer_seed, scores_mean, scores_minmax, srht,
                     srht_matrix)
from .walk import block_transition, causal_block_mask, kv_chunk_size, sharpen, walk_row, walk_update


@dataclass
class LayerDecodeState:
    """Running summaries of one sparse layer, for decode. Block axes have a capacity ``cap`` >= n_b.

    n: tokens summarised; block_size. counts (cap,) fp64 tokens per block; sums (B, H_kv, cap, d) fp64
    (key_summary mean); k_t (B, H_kv, cap, k') fp32, the sketched block means (mean); kmax / kmin
    (B, H_kv, cap, d) fp32 (minmax); w_cache (B, G', cap, cap) fp32, the sharpened transition
    (walk_damping > 0); q_recent (B, H, <= window-1, d) fp32, the last queries (decode_query_window > 1).
    Only the first n_b = ceil(n / block_size) entries of a block axis are meaningful.
    """

    n: int
    block_size: int
    counts: torch.Tensor
    sums: Optional[torch.Tensor] = None
    k_t: Optional[torch.Tensor] = None
    kmax: Optional[torch.Tensor] = None
    kmin: Optional[torch.Tensor] = None
    w_cache: Optional[torch.Tensor] = None
    q_recent: Optional[torch.Tensor] = None

    @property
    def n_blocks(self) -> int:
        return num_blocks(self.n, self.block_size)

    @property
    def capacity(self) -> int:
        return self.counts.shape[0]

    def block_mean(self) -> torch.Tensor:
        """Kbar (B, H_kv, n_b, d) fp32 of the summarised keys, from the running sums (key_summary mean)."""
        nb = self.n_blocks
        return (self.sums[:, :, :nb] / self.counts[:nb].unsqueeze(-1)).float()

    def ensure_capacity(self, need: int) -> None:
        """Grow every block axis to at least ``need`` blocks (doubling, so growth is amortised O(1))."""
        if need <= self.capacity:
            return
        new = max(need, 2 * self.capacity, 8)
        self.counts = _grow(self.counts, new, [0])
        self.sums = _grow(self.sums, new, [2])
        self.k_t = _grow(self.k_t, new, [2])
        self.kmax = _grow(self.kmax, new, [2], float("-inf"))
        self.kmin = _grow(self.kmin, new, [2], float("inf"))
        self.w_cache = _grow(self.w_cache, new, [2, 3])


@dataclass
class SketchWalkState:
    """Everything Sketch&Walk remembers about the current sequence (batch); a fresh one per prompt."""

    batch_size: int = 0
    walk_r: Optional[torch.Tensor] = None          # R of the last sparse layer in this prefill
    decode_r: Optional[torch.Tensor] = None        # r of the last sparse layer at the current decode step
    decode_r_len: int = -1                         # the cache length that decode_r belongs to
    layers: Dict[int, LayerDecodeState] = field(default_factory=dict)


def _grow(x: Optional[torch.Tensor], cap: int, dims, fill: float = 0.0) -> Optional[torch.Tensor]:
    """Copy ``x`` into a larger tensor whose axes ``dims`` have size ``cap`` (new entries = ``fill``)."""
    if x is None:
        return None
    shape = list(x.shape)
    for d in dims:
        shape[d] = cap
    out = torch.full(shape, fill, dtype=x.dtype, device=x.device)
    out[tuple(slice(0, s) for s in x.shape)] = x
    return out


class SketchWalkSelector(BlockSelector):
    """Sketch&Walk block selection (``config.selector`` "sketchwalk"), or the "oracle" / "local" controls."""

    #: bytes of per-head score matrices alive at once in prefill (chunks of key heads)
    score_budget_bytes: int = 1 << 28
    #: selection backend (prefill and decode): None follows :func:`sketch_walk.block_sparse.resolve_backend`
    #: (Triton kernels of :mod:`sketch_walk.kernels.prefill_selection` / :mod:`sketch_walk.kernels.decode_select`
    #: on CUDA, torch elsewhere); "torch" / "triton" force one
    backend: Optional[str] = None

    def __init__(self, config: Optional[SketchWalkConfig] = None):
        self.config = config or SketchWalkConfig()
        self.block_size = self.config.block_size
        self.name = self.config.selector
        self.state = SketchWalkState()
        self._head_dim: Optional[int] = None
        self._srht_cache: Dict[Any, torch.Tensor] = {}     # (layer, d, device) -> S, so decode copies nothing

    # ------------------------------------------------------------------------------------------
    def reset(self, batch_size: int) -> None:
        self.state = SketchWalkState(batch_size=batch_size)

    def is_sparse_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.config.dense_layers

    def describe(self) -> Dict[str, Any]:
        c = self.config
        out: Dict[str, Any] = {"method": "sketch_walk", "selector": c.selector}
        out.update(c.to_dict())
        out["inactive_knobs"] = c.inactive_knobs(self._head_dim)
        return out

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _scale(module, d: int) -> float:
        s = getattr(module, "scaling", None)
        return float(s) if s is not None else 1.0 / math.sqrt(d)

    def _srht(self, layer_idx: int, d: int, device) -> torch.Tensor:
        key = (layer_idx, d, str(device))
        s = self._srht_cache.get(key)
        if s is None:
            s = srht_matrix(d, self.config.sketch_dim, layer_seed(self.config.hadamard_seed, layer_idx), device)
            self._srht_cache[key] = s
        return s

    def _lists(self, r_scores: torch.Tensor, row_ids: torch.Tensor, n_kv: int, dense_last: int) -> BlockLists:
        c = self.config
        idx, cnt = select_blocks(r_scores, row_ids, c.n_sink, c.n_local, c.top_k_blocks, dense_last=dense_last)
        return expand_to_kv_heads(idx, cnt, n_kv)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def select_prefill(self, layer_idx: int, module, query: torch.Tensor, key: torch.Tensor) -> BlockLists:
        c = self.config
        b, h, n, d = query.shape
        hkv = key.shape[1]
        if key.shape[2] != n:
            raise UsageError(f"Sketch&Walk prefill expects the whole prompt in one call; got {n} queries against "
                             f"{key.shape[2]} keys (chunked prefill is not supported)")
        if h % hkv:
            raise UsageError(f"{h} query heads are not a multiple of {hkv} key heads")
        self._head_dim = d
        bs = c.block_size
        nb = num_blocks(n, bs)
        scale = self._scale(module, d)
        if self.state.batch_size != b:
            self.reset(b)

        from .block_sparse import resolve_backend
        if c.selector == "sketchwalk" and resolve_backend(query.device, self.backend) == "triton":
            return self._select_prefill_triton(layer_idx, query, key, scale)           # GPU: ~6 Triton launches
        rows_ids = torch.arange(nb, device=query.device)
        if c.selector == "local":
            return self._lists(local_scores(nb, nb, query.device), rows_ids, hkv, c.dense_last_blocks)
        if c.selector == "oracle":
            mass = oracle_block_mass(query, key, bs, scale, c.select_per, causal=True,
                                     budget_bytes=self.score_budget_bytes)
            return self._lists(mass, rows_ids, hkv, c.dense_last_blocks)

        r = h // hkv
        rows = block_rows(n, bs, device=query.device)
        q_bar = (block_sum(query, bs) / rows.unsqueeze(-1)).view(b, hkv, r, nb, d)        # step 1
        st = LayerDecodeState(n=n, block_size=bs, counts=rows.double())
        if c.key_summary == "mean":
            st.sums = block_sum(key, bs, dtype=torch.float64)                            # (B, Hkv, nb, d)
            k_bar = (st.sums / st.counts.unsqueeze(-1)).float()
            s_mat = self._srht(layer_idx, d, query.device)                               # step 2
            q_t, st.k_t = srht(q_bar, s_mat), srht(k_bar, s_mat)
            score_fn = lambda g0, g1: scores_mean(q_t[:, g0:g1], st.k_t[:, g0:g1], scale)  # noqa: E731  step 3
        else:
            st.kmax, st.kmin = block_minmax(key, bs)                                     # step 3b
            score_fn = lambda g0, g1: scores_minmax(q_bar[:, g0:g1], st.kmax[:, g0:g1],  # noqa: E731
                                                    st.kmin[:, g0:g1], scale)
        chunk = kv_chunk_size(b, hkv, r, nb, nb, self.score_budget_bytes)
        a = block_transition(score_fn, hkv, r, c.select_per, causal_block_mask(rows_ids, nb), chunk)  # step 4
        w = sharpen(a, c.sparsity_exponent)                                              # step 5
        walk = walk_update(w, self.state.walk_r, c.walk_damping, c.walk_steps)           # step 6
        self.state.walk_r = walk
        if not c.skip_decode:
            if c.walk_damping > 0:
                st.w_cache = w
            if c.decode_query_window > 1:
                st.q_recent = query[:, :, max(0, n - (c.decode_query_window - 1)):].float()
            self.state.layers[layer_idx] = st
        return self._lists(walk, rows_ids, hkv, c.dense_last_blocks)                   # step 7

    def _select_prefill_triton(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor,
                               scale: float) -> BlockLists:
        """select_prefill's sketchwalk path in Triton (:mod:`sketch_walk.kernels.prefill_selection`: ~6 launches,
        no host sync): the same lists, walk R, W_cache and decode summaries as the torch path above, up to TF32
        (fp16 operands from 1536 key blocks on) dot products and summation order (so near-ties may pick differently)."""
        from .kernels.prefill_selection import sketch_walk_prefill_triton
        c = self.config
        n, d = query.shape[2], query.shape[3]
        res = sketch_walk_prefill_triton(
            query, key, block_size=c.block_size, scale=scale, key_summary=c.key_summary, select_per=c.select_per,
            srht_matrix=self._srht(layer_idx, d, query.device) if c.key_summary == "mean" else None,
            sparsity_exponent=c.sparsity_exponent, walk_damping=c.walk_damping, walk_steps=c.walk_steps,
            r_prev=self.state.walk_r if c.walk_damping > 0 else None, n_sink=c.n_sink, n_local=c.n_local,
            top_k=c.top_k_blocks, dense_last=c.dense_last_blocks)
        self.state.walk_r = res.walk
        if not c.skip_decode:
            st = LayerDecodeState(n=n, block_size=c.block_size, counts=res.counts, sums=res.sums, k_t=res.k_t,
                                  kmax=res.kmax, kmin=res.kmin)
            if c.walk_damping > 0:
                st.w_cache = res.w
            if c.decode_query_window > 1:
                st.q_recent = query[:, :, max(0, n - (c.decode_query_window - 1)):].float()
            self.state.layers[layer_idx] = st
        return res.block_idx, res.block_cnt

    # ------------------------------------------------------------------------------------------
    def _append_key(self, st: LayerDecodeState, k_new: torch.Tensor, layer_idx: int, d: int,
                    fold_in_kernel: bool = False) -> int:
        """Fold the new key (B, H_kv, d) into the running summaries of its block, in O(d). Returns n_b.

        A new block (position a multiple of block_size) starts from count 0, sum 0, max -inf, min +inf and a
        zero row and column of W_cache (capacity grows by doubling). ``fold_in_kernel`` (key_summary minmax on
        the Triton decode path): only the capacity and W_cache are handled here; the count and Kmax / Kmin of
        the block are updated by :func:`sketch_walk.kernels.decode_select.decode_select_triton`.
        """
        pos = st.n
        i = pos // st.block_size
        if pos % st.block_size == 0:                                   # a new block opens
            st.ensure_capacity(i + 1)
            # fill_ with a Python number launches a kernel; `x[i] = v` would copy a CPU scalar (a host sync)
            if not fold_in_kernel:
                st.counts[i].fill_(0)
            if st.sums is not None:
                st.sums[:, :, i].fill_(0)
            if st.kmax is not None and not fold_in_kernel:
                st.kmax[:, :, i].fill_(float("-inf"))
                st.kmin[:, :, i].fill_(float("inf"))
            if st.w_cache is not None:
                st.w_cache[:, :, i, :].fill_(0)
                st.w_cache[:, :, :, i].fill_(0)
        if fold_in_kernel:
            st.n = pos + 1
            return i + 1
        st.counts[i] += 1
        if st.sums is not None:
            st.sums[:, :, i] += k_new.double()
            k_bar = (st.sums[:, :, i] / st.counts[i]).float()
            st.k_t[:, :, i] = srht(k_bar, self._srht(layer_idx, d, k_new.device))
        if st.kmax is not None:
            kf = k_new.float()
            st.kmax[:, :, i] = torch.maximum(st.kmax[:, :, i], kf)
            st.kmin[:, :, i] = torch.minimum(st.kmin[:, :, i], kf)
        st.n = pos + 1
        return i + 1

    @torch.no_grad()
    def select_decode(self, layer_idx: int, module, query: torch.Tensor, key_cache: torch.Tensor) -> BlockLists:
        c = self.config
        b, h, one, d = query.shape
        hkv, n_keys = key_cache.shape[1], key_cache.shape[2]
        r = h // hkv
        bs = c.block_size
        nb = num_blocks(n_keys, bs)
        row = torch.full((1,), nb - 1, dtype=torch.long, device=query.device)
        scale = self._scale(module, d)
        if c.selector == "local":
            idx, cnt = self._lists(local_scores(nb, 1, query.device), row, hkv, 0)
            return idx.squeeze(-2), cnt.squeeze(-1)
        if c.selector == "oracle":
            mass = oracle_block_mass(query, key_cache, bs, scale, c.select_per, causal=False)  # (B, G', 1, nb)
            idx, cnt = self._lists(mass, row, hkv, 0)
            return idx.squeeze(-2), cnt.squeeze(-1)

        st = self.state.layers.get(layer_idx)
        check_decode_step("Sketch&Walk", layer_idx, None if st is None else st.n, n_keys, "decode state",
                          "every prompt must go through the sparse prefill first")
        if self._fused_decode(query.device):
            return self._select_decode_fused(layer_idx, st, query, key_cache, scale)
        self._append_key(st, key_cache[:, :, -1], layer_idx, d)

        q_new = query[:, :, 0].float()                                               # (B, H, d)
        if c.decode_query_window > 1:
            window = torch.cat([st.q_recent, q_new.unsqueeze(2)], dim=2) if st.q_recent is not None \
                else q_new.unsqueeze(2)
            q_pool = window.mean(dim=2)
            st.q_recent = window[:, :, -(c.decode_query_window - 1):]
        else:
            q_pool = q_new
        q_pool = q_pool.view(b, hkv, r, 1, d)
        if c.key_summary == "mean":
            q_t = srht(q_pool, self._srht(layer_idx, d, query.device))
            k_t = st.k_t[:, :, :nb]
            score_fn = lambda g0, g1: scores_mean(q_t[:, g0:g1], k_t[:, g0:g1], scale)  # noqa: E731
        else:
            kmax, kmin = st.kmax[:, :, :nb], st.kmin[:, :, :nb]
            score_fn = lambda g0, g1: scores_minmax(q_pool[:, g0:g1], kmax[:, g0:g1], kmin[:, g0:g1],  # noqa: E731
                                                    scale)
        p = block_transition(score_fn, hkv, r, c.select_per, None, None).squeeze(-2)  # (B, G', nb)
        w = sharpen(p, c.sparsity_exponent)
        if c.walk_damping > 0:
            st.w_cache[:, :, nb - 1, :nb] = w
            prev = self.state.decode_r if self.state.decode_r_len == n_keys else None
            rr = walk_row(w, prev, st.w_cache[:, :, :nb, :nb], c.walk_damping, c.walk_steps)
            self.state.decode_r, self.state.decode_r_len = rr, n_keys
        else:
            rr = w
        idx, cnt = self._lists(rr.unsqueeze(-2), row, hkv, 0)
        return idx.squeeze(-2), cnt.squeeze(-1)

    # ------------------------------------------------------------------------------------------
    def _fused_decode(self, device) -> bool:
        """Whether decode selection runs the Triton kernels: the backend resolves to "triton" (CUDA, or forced
        with TRITON_INTERPRET=1) and walk_steps is 1 (or the walk is off); otherwise the torch path below."""
        from .block_sparse import resolve_backend
        c = self.config
        if c.walk_steps != 1 and c.walk_damping > 0:
            return False
        return resolve_backend(device, self.backend) == "triton"

    def _select_decode_fused(self, layer_idx: int, st: LayerDecodeState, query: torch.Tensor,
                             key_cache: torch.Tensor, scale: float) -> BlockLists:
        """select_decode's sketchwalk path in 3 Triton launches (:mod:`sketch_walk.kernels.decode_select`): the same
        state updates and lists as the torch path, no host sync, graph-capturable for a given cache length."""
        from .kernels.decode_select import decode_select_triton
        c = self.config
        d = query.shape[-1]
        n_keys = key_cache.shape[2]
        new_block = st.n % st.block_size == 0
        minmax = c.key_summary != "mean"
        nb = self._append_key(st, key_cache[:, :, -1], layer_idx, d, fold_in_kernel=minmax)
        q_pool = query[:, :, 0]                                                      # (B, H, d), any dtype
        if c.decode_query_window > 1:
            q_new = q_pool.float().unsqueeze(2)
            window = torch.cat([st.q_recent, q_new], dim=2) if st.q_recent is not None else q_new
            q_pool = window.mean(dim=2)
            st.q_recent = window[:, :, -(c.decode_query_window - 1):]
        if minmax:
            q_in, summ_a, summ_b = q_pool, st.kmax, st.kmin
        else:
            q_in, summ_a, summ_b = srht(q_pool, self._srht(layer_idx, d, query.device)), st.k_t, None
        walk = c.walk_damping > 0
        prev = self.state.decode_r if walk and self.state.decode_r_len == n_keys else None
        idx, cnt, rr = decode_select_triton(
            q_in, summ_a, summ_b, nb, scale, select_per=c.select_per, sparsity_exponent=c.sparsity_exponent,
            walk_damping=c.walk_damping, n_sink=c.n_sink, n_local=c.n_local, top_k=c.top_k_blocks,
            w_cache=st.w_cache if walk else None, r_prev=prev, k_new=key_cache[:, :, -1] if minmax else None,
            counts=st.counts if minmax else None, new_block=new_block)
        if walk:
            self.state.decode_r, self.state.decode_r_len = rr, n_keys
        return idx, cnt
