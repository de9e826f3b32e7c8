"""Block selection (docs/ALGORITHM.md step 7) and the scores of the two controls (oracle, local).

:func:`select_blocks` turns any block scores into kept-block lists (the format of
:mod:`sketch_walk.core.block_sparse`): for query block i keep
    S_i = {0..n_sink-1}  U  {i-n_local+1..i}  U  top_k_blocks highest scores among the other causal blocks,
rows with no more causal blocks than that budget are dense, and the last ``dense_last`` query
blocks may be made dense. It runs without host synchronisation: the list width ``max_kept`` and
every count follow from shapes (``n_sink + n_local + top_k_blocks`` per sparse row), not from data.

Ties are broken deterministically: among equal scores the more recent (higher-index) block wins.
(docs/ALGORITHM.md asks only for determinism; with sharpening, many far blocks underflow to exactly 0,
and then recency is the better prior.) It is exact: scores are packed with their block index into
one int64 key, so torch.topk never sees a tie.

Also here, for evaluation: the oracle's exact block attention mass (O(n^2) time, chunked memory)
and the local floor's scores (recency), so the Sketch&Walk server's three selectors share this selection and the kernel.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .core.block_sparse import num_blocks

BIG = 1 << 30


def max_kept_for(n_b: int, budget: int, dense_last: int = 0) -> int:
    """Width of the prefill lists, from shapes only: min(n_b, budget), or n_b when a dense last row needs it."""
    if dense_last > 0 and n_b > budget:
        return n_b
    return min(n_b, budget)


def _score_keys(scores: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys, unique per row: (float bits of max(score, 0)) << 32 | block index."""
    s = torch.nan_to_num(scores.float(), nan=0.0, posinf=torch.finfo(torch.float32).max, neginf=0.0).clamp_min(0.0)
    bits = s.contiguous().view(torch.int32).to(torch.int64)      # non-negative floats: bit order = value order
    j = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.int64)
    return (bits << 32) | j


def select_blocks(scores: torch.Tensor, row_ids: torch.Tensor, n_sink: int, n_local: int, top_k_blocks: int,
                  dense_last: int = 0, n_rows_total: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 7. Scores (..., m, n_b) (higher = keep; only the order matters, negative = 0) -> kept-block lists.

    ``row_ids`` (m,) long: the query-block index i of each row (prefill: arange(n_b); decode: [n_b - 1]).
    Entries j > i are never kept whatever their score. A row with i + 1 <= n_sink + n_local + top_k_blocks is
    dense (all causal blocks). ``dense_last``: rows with i >= n_rows_total - dense_last are dense too
    (``n_rows_total`` defaults to n_b). Returns block_idx int32 (..., m, max_kept) ascending, padded with
    -1, and block_cnt int32 (..., m); max_kept = :func:`max_kept_for` (computed from shapes).
    """
    n_b = scores.shape[-1]
    dev = scores.device
    budget = n_sink + n_local + top_k_blocks
    n_rows_total = n_b if n_rows_total is None else n_rows_total
    rows = row_ids.to(device=dev, dtype=torch.int64)
    i = rows.unsqueeze(-1)                                                   # (m, 1)
    j = torch.arange(n_b, device=dev, dtype=torch.int64)
    dense_rows = rows + 1 <= budget                                          # (m,)
    last_rows = (rows >= n_rows_total - dense_last) if dense_last > 0 else torch.zeros_like(dense_rows)

    # top-k among the candidates: causal, not sink, not local
    cand = (j <= i) & (j >= n_sink) & (j <= i - n_local)                     # (m, n_b)
    keys = torch.where(cand, _score_keys(scores), torch.full((), -1, dtype=torch.int64, device=dev))
    k = min(top_k_blocks, n_b)
    top = keys.topk(k, dim=-1, sorted=False)
    top_idx = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, BIG))
    if k < top_k_blocks:
        top_idx = F.pad(top_idx, (0, top_k_blocks - k), value=BIG)
    lead = top_idx.shape[:-2]
    m = rows.shape[0]
    sink = torch.arange(n_sink, device=dev, dtype=torch.int64).expand(*lead, m, n_sink)
    local = (i - n_local + 1 + torch.arange(n_local, device=dev, dtype=torch.int64)).expand(*lead, m, n_local)
    sparse = torch.cat([sink, local, top_idx], dim=-1)                       # disjoint for sparse rows
    dense = torch.arange(budget, device=dev, dtype=torch.int64).expand(*lead, m, budget)
    dense = torch.where(dense <= i, dense, torch.full_like(dense, BIG))
    entries = torch.where(dense_rows.unsqueeze(-1), dense, sparse).sort(dim=-1).values
    cnt = torch.where(dense_rows, rows + 1, torch.full_like(rows, budget)).expand(*lead, m)

    max_kept = max_kept_for(n_b, budget, dense_last)
    if dense_last > 0:
        width = max(budget, max_kept)
        entries = F.pad(entries, (0, width - budget), value=BIG)
        full = torch.where(j <= i, j, torch.full_like(j, BIG))                      # (m, n_b): row i dense
        full = F.pad(full, (0, width - n_b), value=BIG) if width > n_b else full[..., :width]
        entries = torch.where(last_rows.unsqueeze(-1), full.expand(*lead, m, width), entries)
        cnt = torch.where(last_rows, rows + 1, cnt)
    entries = entries[..., :max_kept]
    idx = torch.where(entries >= BIG, torch.full_like(entries, -1), entries).to(torch.int32)
    return idx.contiguous(), cnt.to(torch.int32).contiguous()


@dataclasses.dataclass(frozen=True)
class RowRule:
    """Which blocks a query-block row keeps, for one context length (block counts, from shapes only).

    Row i always keeps the sink {0..sink_keep-1} and the local blocks {i-local_keep+1..i} (the forced blocks).
    Its budget then adds blocks from its candidates: the causal blocks outside {0..sink_skip-1} and
    {i-local_skip+1..i}:
    * ``fixed``: the ``top_k`` best candidates; a row with no more causal blocks than sink_keep + local_keep + top_k
      is dense;
    * ``fraction``: every causal block scoring above the (1 - ``fraction``) quantile of the candidates' scores
      (torch.nanquantile's linear interpolation; no candidates: none), and, when set, at least the ``min_blocks`` best
      candidates and at most the ``max_blocks`` best;
    * ``mass``: the best candidates, fewest first, until the forced and chosen blocks hold ``mass`` of the row's
      estimated attention (scores clamped at 0 and normalised over the causal blocks), at least ``min_blocks`` and
      at most ``max_blocks`` (0: no cap) of them.
    """

    mode: str = "fixed"
    sink_keep: int = 1
    local_keep: int = 1
    sink_skip: int = 1
    local_skip: int = 1
    top_k: int = 16
    fraction: float = 0.125
    mass: float = 0.9
    min_blocks: int = 0
    max_blocks: int = 0

    @property
    def plain(self) -> bool:
        """A fixed budget whose candidates are exactly the blocks not forced: :func:`select_blocks` (and the kernels)."""
        return (self.mode == "fixed" and self.sink_skip == self.sink_keep and self.local_skip == self.local_keep)

    def width(self, n_b: int, dense_last: int = 0) -> int:
        """The list width for n_b key blocks, from shapes only: enough for every row this rule can keep."""
        forced = self.sink_keep + self.local_keep
        if self.mode == "fixed":
            most = forced + self.top_k
        elif self.mode == "fraction":
            # above a linear-interpolated quantile of c candidates: at most ceil((c - 1) f) + 1 of them, plus the
            # causal blocks that are neither forced nor candidates (skip ranges wider than the kept ones)
            gaps = max(0, self.sink_skip - self.sink_keep) + max(0, self.local_skip - self.local_keep)
            above = math.ceil((n_b - 1) * self.fraction) + 1
            most = forced + gaps + max(min(above, self.max_blocks or above), self.min_blocks)
        else:
            most = forced + (self.max_blocks or n_b)
        return max_kept_for(n_b, most, dense_last)

    def widened(self, factor: int) -> "RowRule":
        """The shortlist rule of decode_rerank R: R times the budget (top_k, fraction capped at 1, the floor and the
        cap; a mass budget leaves R times less mass out, 1 - (1 - p) / R)."""
        return dataclasses.replace(
            self, top_k=self.top_k * factor, fraction=min(1.0, self.fraction * factor),
            mass=1.0 - (1.0 - self.mass) / factor, min_blocks=self.min_blocks * factor,
            max_blocks=self.max_blocks * factor)


def row_rule(config, n_tokens: int, decode: bool) -> RowRule:
    """The :class:`RowRule` of a :class:`sketch_walk.config.SketchWalkConfig` for a context of ``n_tokens``.

    ``window_fraction`` f > 0 keeps a token sink and a token window of w = max(1, int(f n)) tokens each, rounded out
    to the blocks they touch: the sink is blocks 0..ceil(w/B)-1; in prefill, query block i's tokens reach back w - 1
    tokens, to block i - ceil((w-1)/B); in decode the window is the last ceil(w/B) blocks. Those window blocks are
    left out of the candidates, and so is a sink of max(1, int(sink_fraction n)) tokens when sink_fraction > 0 (the
    kept sink otherwise; in decode they are kept as well). n_sink / n_local stay lower bounds.
    """
    c = config
    bs = c.block_size
    sink_keep, local_keep, local_skip = c.n_sink, c.n_local, c.n_local
    if c.window_fraction > 0:
        w = max(1, int(c.window_fraction * n_tokens))
        sink_keep = max(sink_keep, -(-w // bs))
        local_keep = max(local_keep, -(-w // bs) if decode else -(-(w - 1) // bs) + 1)
        local_skip = max(local_skip, -(-w // bs))
    sink_skip = sink_keep
    if c.sink_fraction > 0:
        sink_skip = max(c.n_sink, -(-max(1, int(c.sink_fraction * n_tokens)) // bs))
        if decode:                                  # the authors' decode keeps those sink blocks too
            sink_keep = max(sink_keep, sink_skip)
    return RowRule(mode=c.budget_mode, sink_keep=sink_keep, local_keep=local_keep, sink_skip=sink_skip,
                   local_skip=local_skip, top_k=c.top_k_blocks, fraction=c.budget_fraction, mass=c.budget_mass,
                   min_blocks=c.budget_min_blocks, max_blocks=c.budget_max_blocks)


def select_by_rule(scores: torch.Tensor, row_ids: torch.Tensor, rule: RowRule, dense_last: int = 0,
                   extra: Optional[torch.Tensor] = None, extra_width: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 7 for any :class:`RowRule`: scores (..., m, n_b) -> kept-block lists, as :func:`select_blocks` returns.

    ``row_ids`` and ``dense_last`` as in :func:`select_blocks`. ``extra`` (..., m, n_b) bool: blocks kept besides the
    rule's (e.g. the question's prefill blocks in decode), at most ``extra_width`` per row. A plain fixed rule without
    extras is :func:`select_blocks` itself; the others build a keep mask and list it (one sort per row, no host sync).
    """
    if rule.plain and extra is None:
        return select_blocks(scores, row_ids, rule.sink_keep, rule.local_keep, rule.top_k, dense_last=dense_last)
    n_b = scores.shape[-1]
    dev = scores.device
    rows = row_ids.to(device=dev, dtype=torch.int64)
    i = rows.unsqueeze(-1)
    j = torch.arange(n_b, device=dev, dtype=torch.int64)
    causal = j <= i                                                          # (m, n_b)
    forced = causal & ((j < rule.sink_keep) | (j > i - rule.local_keep))
    cand = causal & (j >= rule.sink_skip) & (j <= i - rule.local_skip)
    s = scores.float()
    keys = torch.where(cand & ~forced, _score_keys(s), torch.full((), -1, dtype=torch.int64, device=dev))
    order = keys.sort(dim=-1, descending=True)                              # candidates best first, then the rest
    valid = order.values >= 0
    if rule.mode == "fraction":
        pool = s.masked_fill(~cand, float("nan"))
        th = torch.nanquantile(pool, 1.0 - rule.fraction, dim=-1, keepdim=True)   # NaN (no candidates): keeps none
        chosen = causal & (s > th)
        if rule.min_blocks or rule.max_blocks:                               # a floor / cap on the candidates
            rank = torch.empty_like(order.indices).scatter_(-1, order.indices, torch.arange(n_b, device=dev)
                                                            .expand_as(order.indices))
            ranked = cand & ~forced
            if rule.max_blocks:
                chosen = chosen & ~(ranked & (rank >= rule.max_blocks))
            chosen = chosen | (ranked & (rank < rule.min_blocks))
    else:
        if rule.mode == "fixed":
            take = torch.full(s.shape[:-1], rule.top_k, dtype=torch.int64, device=dev)
        else:
            est = s.clamp_min(0).masked_fill(~causal, 0.0)
            est = est / est.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            have = (est * forced).sum(-1, keepdim=True)
            sorted_mass = torch.gather(est, -1, order.indices) * valid
            before = sorted_mass.cumsum(-1) - sorted_mass                    # mass held before adding entry t
            take = ((have + before < rule.mass) & valid).sum(-1).clamp_min(rule.min_blocks)
            if rule.max_blocks:
                take = take.clamp_max(rule.max_blocks)
        pick = valid & (torch.arange(n_b, device=dev) < take.unsqueeze(-1))
        chosen = torch.zeros_like(pick).scatter(-1, order.indices, pick)
        if rule.mode == "fixed":                                             # short rows are dense
            chosen = chosen | (causal & (rows + 1 <= rule.sink_keep + rule.local_keep + rule.top_k).unsqueeze(-1))
    keep = forced | chosen
    if extra is not None:
        keep = keep | (extra & causal)
    if dense_last > 0:
        keep = keep | (causal & (rows >= n_b - dense_last).unsqueeze(-1))
    width = min(n_b, rule.width(n_b, dense_last) + extra_width)
    entries = torch.where(keep, j, torch.full_like(j, BIG)).sort(dim=-1).values[..., :width]
    idx = torch.where(entries >= BIG, torch.full_like(entries, -1), entries).to(torch.int32)
    return idx.contiguous(), keep.sum(-1).clamp_max(width).to(torch.int32).contiguous()


def expand_to_kv_heads(block_idx: torch.Tensor, block_cnt: torch.Tensor, n_kv: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lists with a group axis of size 1 (a per-layer selection) -> the same list for each of ``n_kv`` key heads."""
    if block_idx.shape[1] == n_kv:
        return block_idx, block_cnt
    idx = block_idx.expand(block_idx.shape[0], n_kv, *block_idx.shape[2:]).contiguous()
    cnt = block_cnt.expand(block_cnt.shape[0], n_kv, *block_cnt.shape[2:]).contiguous()
    return idx, cnt






# ----------------------------------------------------------------------------------------------
# Control selectors' scores
# ----------------------------------------------------------------------------------------------

def local_scores(n_b: int, m: int = 1, device=None) -> torch.Tensor:
    """The local floor: score = block index, so top-k keeps the most recent blocks. (1, 1, m, n_b).

    With :func:`select_blocks` this keeps the sink plus the last n_local + top_k_blocks blocks of each row
    (the last top_k_blocks + 1 blocks at the default n_local = 1): the same budget as Sketch&Walk.
    """
    return torch.arange(n_b, device=device, dtype=torch.float32).expand(1, 1, m, n_b)


def oracle_block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float, select_per: str = "layer",
                      causal: bool = True, budget_bytes: int = 1 << 28) -> torch.Tensor:
    """Exact block attention mass, the oracle's scores (evaluation only: O(m n) time per head).

    q (B, H, m, d) (prefill: m = n, positions 0..n-1; decode: m = 1 at position N-1), k (B, H_kv, N, d).
    For query block i and key block j: M_h[i, j] = mean over the real queries t of block i of
    sum_{s in block j, s <= t} softmax_s(q_t . k_s * scale); decode (``causal`` False, one query):
    M_h[j] = that sum for the query. Then the mean over heads (G' = 1) or over each key head's group
    (G' = H_kv). Returns (B, G', m_b, n_b) fp32, m_b = ceil(m / block_size) (1 in decode).
    Work runs per key head and per chunk of query blocks, so memory stays under ``budget_bytes``.
    """
    b, h, m, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    r = h // hkv
    bs = block_size
    nb = num_blocks(n, bs)
    pad_k = nb * bs - n
    qg = q.view(b, hkv, r, m, d)
    if causal:
        mb = num_blocks(m, bs)
        q_rows = (m - torch.arange(mb, device=q.device) * bs).clamp(max=bs).float()
    else:
        mb = 1
    out = torch.zeros(b, hkv, mb, nb, dtype=torch.float32, device=q.device)
    per_qblock = max(1, b * r * bs * (n + pad_k) * 4 * 3)
    chunk_blocks = max(1, budget_bytes // per_qblock)
    for g in range(hkv):
        kg = k[:, g].float()                                                # (B, N, d)
        if not causal:
            s = torch.einsum("brmd,bnd->brmn", qg[:, g].float(), kg) * scale
            p = torch.softmax(s, dim=-1)
            mass = F.pad(p, (0, pad_k)).view(b, r, m, nb, bs).sum(-1)        # (B, r, m, nb)
            out[:, g] = mass.mean(dim=(1, 2)).unsqueeze(1)
            continue
        for i0 in range(0, mb, chunk_blocks):
            i1 = min(mb, i0 + chunk_blocks)
            t0, t1 = i0 * bs, min(m, i1 * bs)
            s = torch.einsum("brmd,bnd->brmn", qg[:, g, :, t0:t1].float(), kg) * scale
            tpos = torch.arange(t0, t1, device=q.device).unsqueeze(-1)
            spos = torch.arange(n, device=q.device)
            s = s.masked_fill(spos > tpos, float("-inf"))
            p = torch.softmax(s, dim=-1)
            mass = F.pad(p, (0, pad_k)).view(b, r, t1 - t0, nb, bs).sum(-1)  # (B, r, t, nb)
            tp = (i1 - i0) * bs - (t1 - t0)
            mass = F.pad(mass, (0, 0, 0, tp)).view(b, r, i1 - i0, bs, nb).sum(-2)
            out[:, g, i0:i1] = mass.mean(dim=1) / q_rows[i0:i1].unsqueeze(-1)
    if select_per == "layer":
        return out.mean(dim=1, keepdim=True)
    return out


def shortlist_mass(query: torch.Tensor, key_cache: torch.Tensor, block_idx: torch.Tensor, block_size: int,
                   scale: float, select_per: str = "layer", n_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The exact attention mass of one decode query over the blocks of a shortlist (decode_rerank's scores).

    query (B, H, 1, d), key_cache (B, H_kv, N, d), block_idx (B, H_kv, W) int (-1 padded): the shortlisted blocks
    of each key head. For head h of key head g: M_h[j] = sum_{s in block j} softmax_s(q_h . k_s * scale), the
    softmax taken over the keys of g's shortlist only (the oracle's decode mass, restricted to the shortlist);
    then the mean over g's query group, and with select_per "layer" (every key head holds the same list) over all
    heads. Returns (B, G', W) fp32, entry by entry of the list (0 on padding). Reads W * block_size keys per key
    head (no values), no host sync. ``n_valid`` (a device scalar): the keys that count when key_cache is a static
    buffer longer than the cache (default: all N).
    """
    b, h, _, d = query.shape
    hkv, n = key_cache.shape[1], key_cache.shape[2]
    r, bs, w = h // hkv, block_size, block_idx.shape[-1]
    blk = block_idx.long()
    pos = blk.clamp_min(0).unsqueeze(-1) * bs + torch.arange(bs, device=query.device)        # (B, H_kv, W, bs)
    valid = (blk >= 0).unsqueeze(-1) & (pos < (n if n_valid is None else n_valid))
    pos = pos.clamp_max(n - 1).view(b * hkv, w * bs)
    rows = torch.arange(b * hkv, device=query.device).view(b * hkv, 1)
    # (B H_kv, N, d) is a view for a cache (or a static buffer sliced along N); only the shortlist's rows are read
    keys = key_cache.flatten(0, 1)[rows, pos].view(b, hkv, w * bs, d)
    logits = torch.matmul(query.view(b, hkv, r, d).float(), keys.float().transpose(-1, -2)) * scale
    logits = logits.masked_fill(~valid.view(b, hkv, 1, w * bs), float("-inf"))
    mass = torch.softmax(logits, dim=-1).view(b, hkv, r, w, bs).sum(-1).mean(dim=2)          # (B, H_kv, W)
    return mass.mean(dim=1, keepdim=True) if select_per == "layer" else mass


def spread_to_blocks(entry_scores: torch.Tensor, block_idx: torch.Tensor, n_b: int) -> torch.Tensor:
    """List-entry scores (B, G', W) of the lists block_idx (B, G', W) (-1 padded) -> block scores (B, G', n_b), 0 off
    the lists."""
    out = torch.zeros(*entry_scores.shape[:-1], n_b + 1, dtype=entry_scores.dtype, device=entry_scores.device)
    blk = block_idx.long()
    out.scatter_(-1, torch.where(blk < 0, n_b, blk), entry_scores)
    return out[..., :n_b]


def rerank_plain(entry_scores: torch.Tensor, block_idx: torch.Tensor, n_b: int, rule: RowRule
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A plain fixed rule applied to a shortlist's entries for the decode row (n_b - 1): the same lists as
    :func:`select_blocks` on :func:`spread_to_blocks` of the scores whenever the shortlist holds at least top_k
    candidates (it does: it is R >= 2 times the budget), at the cost of W entries instead of n_b blocks.

    entry_scores (B, G', W) >= 0, block_idx (B, G', W) ascending, -1 padded. Returns block_idx int32 (B, G', width)
    ascending and block_cnt int32 (B, G'), width = min(n_b, sink + local + top_k).
    """
    budget = rule.sink_keep + rule.local_keep + rule.top_k
    if n_b <= budget:                                           # a dense row: the shortlist holds every block
        idx = block_idx[..., :n_b]
        return idx.to(torch.int32).contiguous(), (idx >= 0).sum(-1).to(torch.int32)
    blk = block_idx.long()
    forced = (blk >= 0) & ((blk < rule.sink_keep) | (blk > n_b - 1 - rule.local_keep))
    high = torch.where(forced, torch.full_like(blk, 0x7FFFFFFF << 32), _score_keys(entry_scores) & ~0xFFFFFFFF)
    keys = high | blk.clamp_min(0)                              # forced first, then by score (ties: the later block)
    keys = torch.where(blk >= 0, keys, torch.full_like(keys, -1))
    top = keys.topk(budget, dim=-1, sorted=False).values
    idx = (top & 0xFFFFFFFF).sort(dim=-1).values
    return idx.to(torch.int32).contiguous(), torch.full(idx.shape[:-1], budget, dtype=torch.int32, device=idx.device)


__all__ = ["select_blocks", "select_by_rule", "row_rule", "RowRule", "max_kept_for", "expand_to_kv_heads", "local_scores", "oracle_block_mass",
           "shortlist_mass", "spread_to_blocks", "rerank_plain"]
