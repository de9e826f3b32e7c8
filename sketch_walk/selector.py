"""SketchWalkSelector: Sketch&Walk (and its oracle / local controls) as a :class:`BlockSelector`.

Prefill, at every sparse layer (docs/ALGORITHM.md steps 1-7):
  pool Q and K per block -> (mean) SRHT-sketch both and score / (minmax) bound q.k by Kmax, Kmin
  -> causal row-softmax per head, head mean (A) -> sharpen (W) -> walk with the previous sparse
  layer's R -> sink U local U top-k per query block.
Decode, one new token per step (unless the hook runs decode dense):
  update the current block's running K sum / count (and max / min) from the new key only, in O(d);
  re-sketch that one block (O(d k)); score the new query (or the mean of the last
  ``decode_query_window`` queries) against every block summary; head mean, sharpen, walk with
  r_l = rownorm((1 - beta) w_l + beta r_{l-1} W_l_cache); select afresh at every step; with decode_rerank R the
  estimate only shortlists R times the budget and the new query's exact attention mass over the shortlist's keys
  picks the budget from it (O(R budget B d) more per step: keys, no values).
  Cost per layer and step: O(n_b d) for the scores and O(n_b^2) for the walk term (skipped when
  walk_damping is 0); the prefill's sketch is never recomputed.

All per-sequence state (the walk's R across layers, the decode state of every layer) lives in
one :class:`SketchWalkState`, replaced by :meth:`SketchWalkSelector.reset` for every prompt.

Choices where docs/ALGORITHM.md is silent (all documented where they act):
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
with the same state; oracle and local stay torch. The kernels implement the seed's rules only
(:meth:`SketchWalkSelector._kernels_cover`); the budgets, fractions and scorers of docs/ALGORITHM.md "Budgets" and
"Decode scorers" (and so ``--preset authors``) run the torch code below on every device.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from .config import SketchWalkConfig
from .core.block_sparse import num_blocks, resolve_backend
from .core.block_summary import RunningBlockSummary, block_mean, block_sum, grow_blocks
from .core.contract import BlockLists, BlockSelector, check_decode_step
from .core.errors import UsageError
from .core.hook import SparseAttentionSession, enable_sparse_attention
from .selection import (expand_to_kv_heads, local_scores, oracle_block_mass, rerank_plain, row_rule, select_by_rule,
                        shortlist_mass, spread_to_blocks)
from .sketch import (authors_score_scale, layer_seed, max_over_sub_blocks, scores_mean, scores_minmax, srht,
                     srht_matrix)
from .walk import (block_transition, causal_block_mask, kv_chunk_size, running_transition_update, sharpen, walk_row,
                   walk_update)


@dataclass
class LayerDecodeState:
    """What one sparse layer keeps for decode.

    ``keys``: the running block summaries of its keys (:class:`RunningBlockSummary`: counts, with fp64 sums for
    key_summary mean or Kmax / Kmin for minmax, of blocks or, with key_sub_blocks > 1, of sub-blocks);
    ``block_size`` the selection's block; ``k_t`` (B, H_kv, cap, k') fp32, the sketched block means (mean);
    ``w_cache`` (B, G', cap, cap) fp32, the sharpened transition (walk_damping > 0); ``q_recent``
    (B, H, <= window-1, d) fp32, the last queries (decode_query_window > 1); ``question`` (B, G', cap) bool, the
    blocks the prompt's last query block chose at prefill (decode_keep_question), at most ``question_width`` of
    them. Block axes have a capacity ``cap`` >= n_b; only the first n_b entries mean anything.
    """

    keys: RunningBlockSummary
    block_size: int
    k_t: Optional[torch.Tensor] = None
    w_cache: Optional[torch.Tensor] = None
    q_recent: Optional[torch.Tensor] = None
    question: Optional[torch.Tensor] = None
    question_width: int = 0
    padded_means: bool = False

    def grow(self, cap: int) -> None:
        """The block axes of k_t, question and W_cache to at least ``cap`` blocks (the new entries zero)."""
        if self.k_t is not None and self.k_t.shape[2] < cap:
            self.k_t = grow_blocks(self.k_t, cap, [2])
        if self.question is not None and self.question.shape[2] < cap:
            self.question = grow_blocks(self.question, cap, [2])
        if self.w_cache is not None and self.w_cache.shape[2] < cap:
            self.w_cache = grow_blocks(self.w_cache, cap, [2, 3])

    def append_key(self, k_new: torch.Tensor, srht_matrix: Optional[torch.Tensor],
                   minmax_elsewhere: bool = False) -> int:
        """Fold the new key (B, H_kv, d) into the running summaries of its block, in O(d). Returns n_b.

        A new block (position a multiple of block_size) starts from count 0, sum 0, max -inf, min +inf and a
        zero row and column of W_cache. ``minmax_elsewhere`` (key_summary minmax on the Triton decode path):
        the count and Kmax / Kmin of the block are updated by
        :func:`sketch_walk.kernels.decode_select.decode_select_triton`. With key_summary mean the block's
        sketch is recomputed from its running mean (``srht_matrix``, O(d k); ``padded_means``: sum / block_size).
        """
        pos = self.keys.n
        i = pos // self.block_size
        j = self.keys.append(k_new, minmax_elsewhere=minmax_elsewhere)     # == i unless keys hold sub-blocks
        if pos % self.block_size == 0:
            self.grow(-(-self.keys.capacity * self.keys.block_size // self.block_size))
            if self.w_cache is not None:
                self.w_cache[:, :, i, :].fill_(0)
                self.w_cache[:, :, :, i].fill_(0)
        if self.k_t is not None:
            self.k_t[:, :, j] = srht(self.keys.mean(j, padded=self.padded_means).float(), srht_matrix)
        return i + 1


@dataclass
class SketchWalkState:
    """Everything Sketch&Walk remembers about the current sequence (batch); a fresh one per prompt."""

    batch_size: int = 0
    walk_r: Optional[torch.Tensor] = None          # R of the last sparse layer in this prefill
    decode_r: Optional[torch.Tensor] = None        # r of the last sparse layer at the current decode step
    decode_r_len: int = -1                         # the cache length that decode_r belongs to
    layers: Dict[int, LayerDecodeState] = field(default_factory=dict)


class SketchWalkSelector(BlockSelector):
    """Sketch&Walk block selection (``config.selector`` "sketchwalk"), or the "oracle" / "local" controls."""

    #: bytes of per-head score matrices alive at once in prefill (chunks of key heads)
    score_budget_bytes: int = 1 << 28
    #: selection backend (prefill and decode): None follows :func:`sketch_walk.core.block_sparse.resolve_backend`
    #: (Triton kernels of :mod:`sketch_walk.kernels.prefill_selection` / :mod:`sketch_walk.kernels.decode_select`
    #: on CUDA, torch elsewhere); "torch" / "triton" force one
    backend: Optional[str] = None
    #: padded batches: the hook runs each sequence alone with its own :class:`SketchWalkState` (sketch_walk.core.hook)
    padded_batches = True
    row_state_attrs = ("state",)

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

    def _score_scale(self, module, d: int) -> float:
        """The block scores' logit scale: the attention's, or with key_summary mean and score_scale "authors" theirs."""
        c = self.config
        if c.key_summary == "mean" and c.score_scale == "authors":
            return authors_score_scale(d, c.sketch_dim)
        return self._scale(module, d)

    def _lists(self, r_scores: torch.Tensor, row_ids: torch.Tensor, n_kv: int, dense_last: int, n_tokens: int,
               decode: bool, extra: Optional[torch.Tensor] = None, extra_width: int = 0, widen: int = 0) -> BlockLists:
        """Step 7 with the configured budget (:func:`sketch_walk.selection.row_rule` for this context length);
        ``widen`` R > 0: R times that budget (decode_rerank's shortlist)."""
        rule = row_rule(self.config, n_tokens, decode)
        if widen:
            rule = rule.widened(widen)
        idx, cnt = select_by_rule(r_scores, row_ids, rule, dense_last, extra, extra_width)
        return expand_to_kv_heads(idx, cnt, n_kv)

    def _rerank(self, query: torch.Tensor, key_cache: torch.Tensor, shortlist: torch.Tensor, scale: float,
                extra: Optional[torch.Tensor] = None, extra_width: int = 0, n_blocks: Optional[int] = None,
                n_valid: Optional[torch.Tensor] = None) -> BlockLists:
        """decode_rerank: the configured budget spent on the shortlist (B, H_kv, W) by the new query's exact attention
        mass over the shortlist's keys (:func:`sketch_walk.selection.shortlist_mass`); forced blocks stay. A plain
        fixed rule works on the W entries (:func:`sketch_walk.selection.rerank_plain`), others on all n_b blocks.
        A static step passes its bucket's ``n_blocks`` and the cache length ``n_valid`` as a device scalar."""
        c = self.config
        hkv = key_cache.shape[1]
        n_keys = key_cache.shape[2] if n_blocks is None else n_blocks * c.block_size
        nb = num_blocks(n_keys, c.block_size)
        lists = shortlist if c.select_per == "kv_head" else shortlist[:, :1]
        rule = row_rule(c, n_keys, True)
        if (rule.plain and extra is None and nb > rule.sink_keep + rule.local_keep + rule.top_k
                and self._rerank_kernel(query.device)):
            from .kernels.rerank_select import rerank_select_triton
            return rerank_select_triton(query, key_cache, shortlist, nb, scale, block_size=c.block_size,
                                        select_per=c.select_per, n_sink=rule.sink_keep, n_local=rule.local_keep,
                                        top_k=rule.top_k, n_valid=n_valid)
        mass = shortlist_mass(query, key_cache, shortlist, c.block_size, scale, c.select_per, n_valid)  # (B, G', W)
        if rule.plain and extra is None:
            return expand_to_kv_heads(*rerank_plain(mass, lists, nb, rule), hkv)
        row = torch.full((1,), nb - 1, dtype=torch.long, device=query.device)
        scores = spread_to_blocks(mass, lists, nb).unsqueeze(-2)
        idx, cnt = self._lists(scores, row, hkv, 0, n_keys, True, extra, extra_width)
        return idx.squeeze(-2), cnt.squeeze(-1)

    def _rerank_kernel(self, device) -> bool:
        """Whether the re-ranking runs sketch_walk/kernels/rerank_select.py (two launches) instead of ~25 PyTorch ops:
        on the Triton backend (the GPU's), unless SKETCH_WALK_RERANK_KERNEL=0. Its lists equal the PyTorch path's on
        the H200 and under Triton's interpreter (tests/test_decode_rerank.py); the step at 128K as a CUDA graph took
        117 us against the PyTorch path's 271 us (docs/PERFORMANCE.md section 6)."""
        return (os.environ.get("SKETCH_WALK_RERANK_KERNEL", "1") != "0"
                and resolve_backend(device, self.backend) == "triton")

    def _question_blocks(self, walk: torch.Tensor, n_tokens: int) -> Tuple[torch.Tensor, int]:
        """The blocks the prompt's last query block keeps under the budget (dense_last aside): (B, G', n_b) bool and
        the most it can hold (from shapes)."""
        nb = walk.shape[-1]
        rule = row_rule(self.config, n_tokens, decode=False)
        idx, _ = select_by_rule(walk[..., -1:, :], torch.full((1,), nb - 1, device=walk.device), rule)
        idx = idx.squeeze(-2).long()                                                   # (B, G', w), -1 padded
        mask = torch.zeros(*idx.shape[:-1], nb + 1, dtype=torch.bool, device=walk.device)
        mask.scatter_(-1, torch.where(idx < 0, nb, idx), True)
        return mask[..., :nb], idx.shape[-1]

    def _keep_decode_state(self, layer_idx: int, keys: RunningBlockSummary, k_t: Optional[torch.Tensor],
                           w: torch.Tensor, walk: torch.Tensor, query: torch.Tensor) -> None:
        """After a prefill: what decode needs of this layer (nothing when decode runs dense)."""
        c = self.config
        if c.skip_decode:
            return
        st = LayerDecodeState(keys=keys, block_size=c.block_size, k_t=k_t, padded_means=c.pool_partial == "padded")
        if c.walk_damping > 0:
            st.w_cache = w
        if c.decode_query_window > 1:
            n = query.shape[2]
            st.q_recent = query[:, :, max(0, n - (c.decode_query_window - 1)):].float()
        if c.decode_keep_question:
            st.question, st.question_width = self._question_blocks(walk, query.shape[2])
        self.state.layers[layer_idx] = st

    def _kernels_cover(self, decode: bool) -> bool:
        """Whether the Triton selection kernels implement this configuration (the seed's rules: a fixed budget, no
        token fractions, causal scores, the identity walk start, exact means, whole-block bounds; in decode also the
        chained walk, the latest-row transition, one scored query and no question blocks). Otherwise torch runs."""
        c = self.config
        ok = (c.budget_mode == "fixed" and c.window_fraction == 0 and c.causal_scores and c.walk_start == "identity"
              and c.pool_partial == "exact" and c.key_sub_blocks == 1)
        if decode:
            ok = ok and c.decode_walk == "chain" and c.decode_transition == "latest_row" and not c.decode_keep_question \
                and (c.decode_query_window == 1 or c.decode_window_scoring == "mean_query")
        return ok

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

        if (c.selector == "sketchwalk" and self._kernels_cover(decode=False)
                and resolve_backend(query.device, self.backend) == "triton"):
            return self._select_prefill_triton(layer_idx, query, key, self._score_scale(module, d))  # ~6 launches
        rows_ids = torch.arange(nb, device=query.device)
        if c.selector == "local":
            return self._lists(local_scores(nb, nb, query.device), rows_ids, hkv, c.dense_last_blocks, n, False)
        if c.selector == "oracle":
            mass = oracle_block_mass(query, key, bs, scale, c.select_per, causal=True,
                                     budget_bytes=self.score_budget_bytes)
            return self._lists(mass, rows_ids, hkv, c.dense_last_blocks, n, False)

        r = h // hkv
        padded = c.pool_partial == "padded"
        q_bar = (block_sum(query, bs) / bs if padded else block_mean(query, bs)).view(b, hkv, r, nb, d)  # step 1
        mean = c.key_summary == "mean"
        sub = 1 if mean else c.key_sub_blocks
        keys = RunningBlockSummary.from_keys(key, bs // sub, sum_dtype=torch.float64 if mean else None,
                                             minmax=not mean)
        k_t = None
        if mean:
            s_mat = self._srht(layer_idx, d, query.device)                               # step 2
            q_t, k_t = srht(q_bar, s_mat), srht(keys.mean(padded=padded).float(), s_mat)
            scale = self._score_scale(module, d)
            score_fn = lambda g0, g1: scores_mean(q_t[:, g0:g1], k_t[:, g0:g1], scale)  # noqa: E731  step 3
        else:                                                                            # step 3b
            score_fn = lambda g0, g1: max_over_sub_blocks(scores_minmax(  # noqa: E731
                q_bar[:, g0:g1], keys.kmax[:, g0:g1], keys.kmin[:, g0:g1], scale), sub, nb)
        chunk = kv_chunk_size(b, hkv, r, nb, nb * sub, self.score_budget_bytes)
        not_causal = causal_block_mask(rows_ids, nb) if c.causal_scores else None
        a = block_transition(score_fn, hkv, r, c.select_per, not_causal, chunk)          # step 4
        w = sharpen(a, c.sparsity_exponent)                                              # step 5
        walk = walk_update(w, self.state.walk_r, c.walk_damping, c.walk_steps, c.walk_start)  # step 6
        self.state.walk_r = walk
        self._keep_decode_state(layer_idx, keys, k_t, w, walk, query)
        return self._lists(walk, rows_ids, hkv, c.dense_last_blocks, n, False)         # step 7

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
            top_k_blocks=c.top_k_blocks, dense_last=c.dense_last_blocks)
        self.state.walk_r = res.walk
        keys = RunningBlockSummary(block_size=c.block_size, n=n, counts=res.counts, sums=res.sums, kmax=res.kmax,
                                   kmin=res.kmin)
        self._keep_decode_state(layer_idx, keys, res.k_t, res.w, res.walk, query)
        return res.block_idx, res.block_cnt

    # ------------------------------------------------------------------------------------------
    def _decode_window(self, st: LayerDecodeState, query: torch.Tensor) -> torch.Tensor:
        """This layer's last decode_query_window N > 1 queries (B, H, <= N, d) fp32, the new one last (the prompt's
        last ones included at the first decode steps); the state keeps the last N - 1."""
        q_new = query[:, :, :1].float()
        window = q_new if st.q_recent is None else torch.cat([st.q_recent, q_new], dim=2)
        st.q_recent = window[:, :, -(self.config.decode_query_window - 1):]
        return window

    def _decode_query(self, st: LayerDecodeState, query: torch.Tensor) -> torch.Tensor:
        """The query decode scores, (B, H, d): the new one in its own dtype, or with decode_query_window N > 1 the
        fp32 mean of this layer's last N queries (:meth:`_decode_window`)."""
        if self.config.decode_query_window <= 1:
            return query[:, :, 0]
        return self._decode_window(st, query).mean(dim=2)

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
            idx, cnt = self._lists(local_scores(nb, 1, query.device), row, hkv, 0, n_keys, True)
            return idx.squeeze(-2), cnt.squeeze(-1)
        if c.selector == "oracle":
            mass = oracle_block_mass(query, key_cache, bs, scale, c.select_per, causal=False)  # (B, G', 1, nb)
            idx, cnt = self._lists(mass, row, hkv, 0, n_keys, True)
            return idx.squeeze(-2), cnt.squeeze(-1)

        st = self.state.layers.get(layer_idx)
        check_decode_step("Sketch&Walk", layer_idx, None if st is None else st.keys.n, n_keys, "decode state",
                          "every prompt must go through the sparse prefill first")
        if self._fused_decode(query.device):
            idx, cnt = self._select_decode_fused(layer_idx, st, query, key_cache, self._score_scale(module, d))
            return self._rerank(query, key_cache, idx, scale) if c.decode_rerank else (idx, cnt)
        s_mat = self._srht(layer_idx, d, query.device) if c.key_summary == "mean" else None
        st.append_key(key_cache[:, :, -1], s_mat)

        if c.decode_query_window > 1 and c.decode_window_scoring == "each_query":
            queries = self._decode_window(st, query)                                    # (B, H, W, d)
        else:
            queries = self._decode_query(st, query).unsqueeze(2)                        # (B, H, 1, d)
        q_pool = queries.float().view(b, hkv, r, queries.shape[2], d)
        if c.key_summary == "mean":
            q_t = srht(q_pool, s_mat)
            k_t = st.k_t[:, :, :nb]
            sc = self._score_scale(module, d)
            score_fn = lambda g0, g1: scores_mean(q_t[:, g0:g1], k_t[:, g0:g1], sc)  # noqa: E731
        else:
            n_sub = st.keys.n_blocks
            kmax, kmin = st.keys.kmax[:, :, :n_sub], st.keys.kmin[:, :, :n_sub]
            score_fn = lambda g0, g1: max_over_sub_blocks(scores_minmax(  # noqa: E731
                q_pool[:, g0:g1], kmax[:, g0:g1], kmin[:, g0:g1], scale), c.key_sub_blocks, nb)
        # (B, G', W, nb) -> (B, G', nb): one query, or the mean of the window's per-query block distributions
        p = block_transition(score_fn, hkv, r, c.select_per, None, None).mean(dim=-2)
        w = sharpen(p, c.sparsity_exponent)
        if c.walk_damping > 0:
            w_cache = st.w_cache[:, :, :nb, :nb]
            if c.decode_transition == "running_mean":
                running_transition_update(w_cache, w, nb - 1, (n_keys - 1) % bs + 1)
            else:
                w_cache[:, :, nb - 1] = w
            if c.decode_walk == "own":
                prev, start = None, "transition"
            else:
                prev = self.state.decode_r if self.state.decode_r_len == n_keys else None
                start = c.walk_start
            rr = walk_row(w, prev, w_cache, c.walk_damping, c.walk_steps, start)
            self.state.decode_r, self.state.decode_r_len = rr, n_keys
        else:
            rr = w
        extra = None if st.question is None else st.question[:, :, :nb].unsqueeze(-2)
        if c.decode_rerank:
            short, _ = self._lists(rr.unsqueeze(-2), row, hkv, 0, n_keys, True, widen=c.decode_rerank)
            return self._rerank(query, key_cache, short.squeeze(-2), scale, extra, st.question_width)
        idx, cnt = self._lists(rr.unsqueeze(-2), row, hkv, 0, n_keys, True, extra, st.question_width)
        return idx.squeeze(-2), cnt.squeeze(-1)

    # ------------------------------------------------------------------------------------------
    def _fused_decode(self, device) -> bool:
        """Whether decode selection runs the Triton kernels: the backend resolves to "triton" (CUDA, or forced
        with TRITON_INTERPRET=1) and walk_steps is 1 (or the walk is off); otherwise the torch path above."""
        c = self.config
        if (c.walk_steps != 1 and c.walk_damping > 0) or not self._kernels_cover(decode=True):
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
        new_block = st.keys.n % st.keys.block_size == 0
        minmax = c.key_summary != "mean"
        s_mat = None if minmax else self._srht(layer_idx, d, query.device)
        nb = st.append_key(key_cache[:, :, -1], s_mat, minmax_elsewhere=minmax)
        q_pool = self._decode_query(st, query)                                       # (B, H, d)
        if minmax:
            q_in, summ_a, summ_b = q_pool, st.keys.kmax, st.keys.kmin
        else:
            q_in, summ_a, summ_b = srht(q_pool, s_mat), st.k_t, None
        walk = c.walk_damping > 0
        prev = self.state.decode_r if walk and self.state.decode_r_len == n_keys else None
        idx, cnt, rr = decode_select_triton(
            q_in, summ_a, summ_b, nb, scale, select_per=c.select_per, sparsity_exponent=c.sparsity_exponent,
            walk_damping=c.walk_damping, n_sink=c.n_sink, n_local=c.n_local,
            top_k_blocks=c.top_k_blocks * max(1, c.decode_rerank),                   # decode_rerank: the shortlist
            w_cache=st.w_cache if walk else None, r_prev=prev, k_new=key_cache[:, :, -1] if minmax else None,
            counts=st.keys.counts if minmax else None, new_block=new_block)
        if walk:
            self.state.decode_r, self.state.decode_r_len = rr, n_keys
        return idx, cnt

    # ------------------------------------------------------------------------------------------
    # Static-cache decode (CUDA graphs): sketch_walk.core.static_decode
    def static_decode_support(self) -> Optional[str]:
        """None for the configurations :meth:`select_decode_static` covers: the fused decode's (the seed's rules, one
        walk step, one scored query), else why not."""
        c = self.config
        if c.selector != "sketchwalk":
            return f"selector {c.selector}"
        if not self._kernels_cover(decode=True):
            return "a budget, fraction or decode scorer without the fused decode (torch only)"
        if c.walk_steps != 1 and c.walk_damping > 0:
            return "walk_steps > 1"
        if c.decode_query_window != 1:
            return "decode_query_window > 1"
        return None

    def prepare_static_decode(self, capacity_tokens: int) -> None:
        """Every layer's block axes grown to the capacity, the blocks not yet opened empty (count 0, sum 0, max -inf,
        min +inf, zero W_cache rows and columns): folding a key into an empty block then equals opening it, so no step
        opens a block on the host."""
        bs = self.config.block_size
        cap = num_blocks(capacity_tokens, bs)
        for st in self.state.layers.values():
            now = st.keys.n_blocks
            st.keys.empty_from(cap)
            st.grow(cap)
            if st.w_cache is not None:
                st.w_cache[:, :, now:].zero_()
                st.w_cache[:, :, :, now:].zero_()
        self._static_first = min(self.state.layers) if self.state.layers else None

    def select_decode_static(self, layer_idx: int, module, query: torch.Tensor, k_new: torch.Tensor,
                             n_blocks: int, key_cache: Optional[torch.Tensor] = None,
                             n_keys: Optional[torch.Tensor] = None) -> BlockLists:
        """The fused decode step (:meth:`_select_decode_fused`) on device-side state only: the fold into block
        n_blocks - 1 (prepared empty by :meth:`prepare_static_decode`), scores, walk with this step's previous sparse
        layer, lists. The Triton kernels on CUDA, :func:`sketch_walk.kernels.decode_select.decode_select_reference`
        (the same effects in torch) elsewhere; with decode_rerank, their lists are the shortlist, re-ranked over
        ``key_cache`` up to ``n_keys`` (:meth:`_rerank`)."""
        from .kernels.decode_select import decode_select_reference, decode_select_triton
        c = self.config
        st = self.state.layers[layer_idx]
        d = query.shape[-1]
        scale = self._score_scale(module, d)
        minmax = c.key_summary != "mean"
        q_new = query[:, :, 0]
        if minmax:
            q_in, summ_a, summ_b = q_new, st.keys.kmax, st.keys.kmin
        else:
            j = n_blocks - 1
            s_mat = self._srht(layer_idx, d, query.device)
            st.keys.fold(k_new, j)
            st.k_t[:, :, j] = srht(st.keys.mean(j, padded=st.padded_means).float(), s_mat)
            q_in, summ_a, summ_b = srht(q_new, s_mat), st.k_t, None
        walk = c.walk_damping > 0
        prev = self.state.decode_r if walk and layer_idx != getattr(self, "_static_first", None) else None
        fn = decode_select_triton if resolve_backend(query.device, self.backend) == "triton" else decode_select_reference
        idx, cnt, rr = fn(
            q_in, summ_a, summ_b, n_blocks, scale, select_per=c.select_per, sparsity_exponent=c.sparsity_exponent,
            walk_damping=c.walk_damping, n_sink=c.n_sink, n_local=c.n_local,
            top_k_blocks=c.top_k_blocks * max(1, c.decode_rerank),                   # decode_rerank: the shortlist
            w_cache=st.w_cache if walk else None, r_prev=prev, k_new=k_new if minmax else None,
            counts=st.keys.counts if minmax else None, new_block=False)
        if walk:
            self.state.decode_r = rr
        if c.decode_rerank:
            if key_cache is None or n_keys is None:
                raise RuntimeError("decode_rerank in a static decode step needs the key cache and its length")
            return self._rerank(query, key_cache, idx, self._scale(module, d), n_blocks=n_blocks, n_valid=n_keys)
        return idx, cnt

    def finish_static_decode(self, n_keys: int) -> None:
        for st in self.state.layers.values():
            st.keys.n = n_keys
        self.state.decode_r_len = n_keys


def enable_sketch_walk(model, config: Optional[SketchWalkConfig] = None, backend: Optional[str] = None
                       ) -> SparseAttentionSession:
    """Run ``model`` with Sketch&Walk (or its oracle / local controls, ``config.selector``); returns the session.

    ``config`` may be a :class:`SketchWalkConfig` or a dict of its knobs (default: every default).
    ``backend``: None / "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
    """
    if config is None:
        config = SketchWalkConfig()
    elif isinstance(config, dict):
        config = SketchWalkConfig.from_dict(config)
    elif not isinstance(config, SketchWalkConfig):
        raise UsageError(f"config must be a SketchWalkConfig or a dict of its knobs, got {type(config).__name__}")
    return enable_sparse_attention(model, SketchWalkSelector(config), skip_decode=config.skip_decode,
                                   backend=backend)
