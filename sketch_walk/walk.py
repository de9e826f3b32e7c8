"""The walk of Sketch&Walk (docs/ALGORITHM.md prefill steps 4-6 and the decode row versions).

Shapes: B batch, H_kv key heads, r query heads per key head, m query rows (n_b in prefill, 1 in
decode), n_b key blocks, G' = 1 (select_per "layer") or H_kv (select_per "kv_head").
All math in fp32. Memory: the transition is accumulated over chunks of key heads, so a layer
holds O(n_b^2) (times G') plus one chunk of scores, never H * n_b^2 at once.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

ScoreFn = Callable[[int, int], torch.Tensor]     # (g0, g1) -> raw block scores (B, g1-g0, r, m, n_b)


def rownorm(x: torch.Tensor) -> torch.Tensor:
    """Rows (last axis) renormalised to sum 1 (rows summing to 0 stay 0)."""
    return x / x.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def causal_block_mask(row_ids: torch.Tensor, n_b: int) -> torch.Tensor:
    """(m, n_b) bool, True where key block j is NOT causal for query block row_ids[i] (j > i)."""
    return torch.arange(n_b, device=row_ids.device).unsqueeze(0) > row_ids.unsqueeze(1)


def kv_chunk_size(batch: int, n_kv: int, r: int, m: int, n_b: int, budget_bytes: int) -> int:
    """How many key heads of scores (B, g, r, m, n_b) fp32 (about 3 live copies) fit ``budget_bytes``."""
    per = max(1, batch * r * m * n_b * 4 * 3)
    return max(1, min(n_kv, budget_bytes // per))


def block_transition(score_fn: ScoreFn, n_kv: int, r: int, select_per: str = "layer",
                     not_causal: Optional[torch.Tensor] = None, kv_chunk: Optional[int] = None) -> torch.Tensor:
    """Step 4. A = head mean of P_h = row-softmax(Ahat_h), masked causally at block level.

    ``score_fn(g0, g1)`` returns raw scores Ahat (B, g1-g0, r, m, n_b) for key heads g0..g1-1 (each with
    its r query heads); ``not_causal`` (m, n_b) bool marks j > i (set to -inf before the softmax; None in
    decode, where every cached block is causal). Returns A (B, G', m, n_b): G' = 1, the mean over all H
    query heads ("layer"), or G' = H_kv, the mean over each key head's query group ("kv_head"). Rows are
    stochastic and, in prefill, lower triangular. Scores are computed ``kv_chunk`` key heads at a time and
    accumulated, so at most one chunk of per-head matrices is alive.
    """
    chunk = kv_chunk or n_kv
    acc: Optional[torch.Tensor] = None
    parts = []
    for g0 in range(0, n_kv, chunk):
        g1 = min(n_kv, g0 + chunk)
        s = score_fn(g0, g1).float()
        if not_causal is not None:
            s = s.masked_fill(not_causal, float("-inf"))
        p = torch.softmax(s, dim=-1)
        if select_per == "layer":
            part = p.sum(dim=(1, 2))
            acc = part if acc is None else acc + part
        else:
            parts.append(p.mean(dim=2))
    if select_per == "layer":
        return (acc / (n_kv * r)).unsqueeze(1)
    return torch.cat(parts, dim=1)


def sharpen(a: torch.Tensor, s: float) -> torch.Tensor:
    """Step 5. W = rownorm(A ** s), computed as softmax(s * log A) over each row so fp32 does not underflow to ties.

    Zero entries (non-causal blocks) stay exactly 0. s = 1 returns rownorm(A). Works on any (..., n_b).
    """
    if s == 1.0:
        return rownorm(a)
    return torch.softmax(torch.log(a) * s, dim=-1)


def _prev_for(r_prev: torch.Tensor, groups: int) -> torch.Tensor:
    """The previous layer's walk state as used by this layer: its mean over groups when it has several.

    With select_per "kv_head" the walk carries one R per key head, but key head g of layer l-1 and key
    head g of layer l are unrelated (heads are not aligned across layers; layer l's heads all read the
    residual stream that every head of l-1 wrote), so the multi-hop term uses the head-group mean of
    R_{l-1}. (A choice of this implementation; docs/ALGORITHM.md defines the walk for one R per layer.)
    """
    if r_prev.shape[1] > 1:
        return r_prev.mean(dim=1, keepdim=True)
    return r_prev


def walk_update(w: torch.Tensor, r_prev: Optional[torch.Tensor], beta: float, steps: int = 1,
                start: str = "identity") -> torch.Tensor:
    """Step 6. R_l = rownorm((1 - beta) W_l + beta R_{l-1} W_l), repeated ``steps`` times.

    w (B, G', n_b, n_b) this layer's sharpened transition; r_prev (B, G_prev, n_b, n_b) the previous sparse
    layer's R, or None before the first sparse layer: then R_{l-1} is the identity (``start`` "identity", so the
    first update gives W) or W itself ("transition", the authors' code). With steps > 1 each repetition replaces
    R_{l-1} by the R just computed (the authors' code composes 3 times). beta = 0 returns W (the one-hop baseline)
    without any matrix product. Cost O(n_b^3) per step (a batched matmul), memory O(n_b^2) per group.
    """
    if beta == 0.0:
        return w
    r = None if r_prev is None else _prev_for(r_prev, w.shape[1])
    if r is None and start == "transition":
        r = w
    for _ in range(steps):
        hop = w if r is None else torch.matmul(r, w)
        r = rownorm((1.0 - beta) * w + beta * hop)
    return r


def walk_row(w_row: torch.Tensor, r_prev: Optional[torch.Tensor], w_cache: torch.Tensor, beta: float,
             steps: int = 1, start: str = "identity") -> torch.Tensor:
    """Decode walk: r_l = rownorm((1 - beta) w_l + beta r_{l-1} W_l_cache), repeated ``steps`` times.

    w_row (B, G', n_b): this layer's sharpened row for the new query; r_prev (B, G_prev, n_b): the previous
    sparse layer's r at this step, or None: then r_{l-1} is the identity's row of the current block, e_{n_b-1}
    (``start`` "identity": the hop term is W_cache[n_b-1], which the caller has set to w_row), or w_row itself
    ("transition": the authors' decode walk, which starts from the layer's own row); w_cache (B, G', n_b, n_b): the
    layer's transition kept from prefill, extended as blocks open. Cost O(n_b^2) per step (a vector-matrix product).
    """
    if beta == 0.0:
        return w_row
    r = None if r_prev is None else _prev_for(r_prev, w_row.shape[1])
    if r is None and start == "transition":
        r = w_row
    for _ in range(steps):
        hop = w_cache[..., -1, :] if r is None else torch.matmul(r.unsqueeze(-2), w_cache).squeeze(-2)
        r = rownorm((1.0 - beta) * w_row + beta * hop)
    return r


def running_transition_update(w_cache: torch.Tensor, w_row: torch.Tensor, block: int, tokens_in_block: int) -> None:
    """The authors' decode transition (``decode_transition`` "running_mean"), updated in place for one new token.

    w_cache (B, G', n_b, n_b): the transition kept from prefill (a new block's row and column start at 0);
    w_row (B, G', n_b): this step's block distribution; ``block`` the current block, holding ``tokens_in_block``
    tokens with the new one (alpha = 1 / tokens_in_block, so a new block takes the row as it is). With
    u = (1 - alpha) u + alpha v written for a running mean: the current block's row is averaged with w_row and
    renormalised; its column is averaged entry by entry with w_row (entry r of the column with w_row[r], as the
    authors' code does); then every row is renormalised to sum 1.
    """
    alpha = 1.0 / tokens_in_block
    row = w_cache[..., block, :]
    row.mul_(1.0 - alpha).add_(w_row, alpha=alpha)
    row.div_(row.sum(-1, keepdim=True).clamp_min(1e-12))
    col = w_cache[..., :, block]
    col.mul_(1.0 - alpha).add_(w_row, alpha=alpha)
    w_cache.div_(w_cache.sum(-1, keepdim=True).clamp_min(1e-12))
