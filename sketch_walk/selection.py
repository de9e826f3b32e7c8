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


__all__ = ["select_blocks", "max_kept_for", "expand_to_kv_heads", "local_scores", "oracle_block_mass"]
