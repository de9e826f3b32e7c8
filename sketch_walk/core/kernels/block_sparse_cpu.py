"""Block-sparse attention on the CPU: torch's CPU flash attention on the kept blocks, gathered.

The math is the module docstring's of :mod:`sketch_walk.core.block_sparse` (the float references there
define it): for query t of head h (key head g = h // r) with kept key set K_t = {s : block(s) in S_{block(t)},
s <= t}, out[h, t] = sum_{s in K_t} softmax_s(scale q_t . k_s) v_s and lse = log sum_{s in K_t} exp(scale q_t . k_s);
an empty list gives out = 0, lse = -inf.

Why not the references: they materialise every score, mask, exponential and product as a separate tensor
(five or more memory passes over n x kept keys per head) and copy the whole cache at every decode step, which
on two cores made SketchWalk's 4K prefill slower than dense SDPA although it attends half the pairs. Here each
set of queries that shares a key set runs through ``aten::_scaled_dot_product_flash_attention_for_cpu`` (the
kernel behind ``F.scaled_dot_product_attention`` on the CPU: tiled, fused online softmax, threaded over batch x
heads x query tiles, and it returns the log-sum-exp) on exactly its kept keys:

* a unit is one list, (sequence, key head, query block); its r query heads share it, so the kernel sees them as one
  head of r B queries (one after the other) against the key head's keys: each kept block is gathered and read once
  for the group, and the kernel, which tiles longer query axes more coarsely, reuses each key tile for more queries
  (the cost per query-key pair by query length: docs/PERFORMANCE.md, "CPU");
* a run of query blocks i0..i1-1 over which a group's lists keep every causal block (Sketch&Walk's first top_k + 2
  rows; most of a dense SeerAttn layer) is causal attention over the prompt's prefix, without a gather: the run's
  own keys with the kernel's causal mask (top-left aligned, query l sees keys <= l, which is right for the run
  against itself) and, unmasked, the keys before the run, the two merged by their log-sum-exps; the groups that
  share a run share the calls (all of them: views of q, K and V);
* every other unit goes to the bucket of its width W and of whether its list ends with its own block (a list is
  ascending and causal, so only the last entry can be the diagonal): a bucket is one call (in chunks under
  ``max_gather_bytes``) on its units' kept blocks, gathered with ``index_select``, under one shared (r B, W B) mask
  (zero, then the causal triangle in the last B columns) or none. Splitting rows into units keeps SeerAttn's
  per-key-head unions of different widths exact without a mask per unit, and no unit computes a key it does not
  keep.

Decode (:func:`block_sparse_decode_cpu`): one call per step and layer, the key heads as the kernel's heads and their
r query heads as its queries, on the gathered kept tokens when they are at most half the cache, else on the whole
cache under a token mask of the kept blocks.

Rounding: fp32 inputs accumulate in fp32 (bf16 / fp16 inputs too, as the kernel does), fp64 in fp64; results
equal the float64 reference to fp32 rounding (tests/test_kernels.py). Needs the CPU flash kernel
(torch >= 2.2); :func:`available` says whether this torch has it, and the dispatch in
:mod:`sketch_walk.core.block_sparse` falls back to the reference where it does not.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from ..block_sparse import _blocked, _check_shapes, block_lists_to_mask, num_blocks

#: bytes of gathered K and V at once in prefill (a bucket's units run in chunks under it)
MAX_GATHER_BYTES = 64 << 20
#: decode gathers the kept tokens when the widest list covers at most this fraction of the cache, else masks it
DECODE_GATHER_MAX = 0.5

# Buffers kept between calls, by (name, dtype), each grown to the largest need: the blocked q / k / v, the
# gathered K / V (at most MAX_GATHER_BYTES of them), the output by unit, the mask. A fresh tensor of several MB can
# be a fresh mapping whose every page faults on first touch, at every layer of every prefill and decode step (on the
# 2-core VM of docs/PERFORMANCE.md, gathering 56 MB took 69 ms into a new tensor, 15 ms into a kept one). The
# result returned is always a fresh tensor; :func:`release_workspace` frees the rest.
_workspace: Dict[Tuple[str, torch.dtype], torch.Tensor] = {}


def _buffer(name: str, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous tensor of ``shape`` from the kept buffer ``name``; its contents are whatever was left there."""
    numel = math.prod(shape)
    buf = _workspace.get((name, dtype))
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):     # a normal tensor: an inference tensor could not be written outside it
            buf = _workspace[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def release_workspace() -> None:
    """Free the buffers the CPU path keeps between calls (the next call allocates them again)."""
    _workspace.clear()


def available() -> bool:
    """Whether this torch has the CPU flash attention kernel that returns the log-sum-exp."""
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
           causal: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """q (N, heads, L, d), k / v (N, heads, S, d) (any strides, e.g. expanded over heads), mask additive, broadcast
    to (N, heads, L, S), in q's dtype. Returns out (N, heads, L, d) in q's dtype and lse (N, heads, L) (fp32; fp64
    for fp64). ``causal``: query l sees keys s <= l (top-left, as SDPA's is_causal)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                      scale=scale)


def _diag_mask(out: torch.Tensor, block_size: int) -> torch.Tensor:
    """Fill ``out`` (..., B, W*B) with the additive mask of a width-W list ending with its diagonal block: zero, but
    -inf on the strictly upper triangle of the last B columns (keys after the query). Its last w*B columns are the
    mask of width w."""
    out.zero_()
    out[..., -block_size:].masked_fill_(torch.ones(block_size, block_size, dtype=torch.bool).triu_(1), float("-inf"))
    return out


def _runs(flags: List[bool]) -> List[Tuple[int, int]]:
    """Maximal runs [i0, i1) of consecutive True entries."""
    runs, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention over two disjoint key sets, each non-empty, into attention over their union: out (..., L, d) and lse
    (..., L) of each -> the softmax-weighted mean of the outputs and log(e^l1 + e^l2)."""
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    den = w1 + w2
    out = (o1 * (w1 / den).unsqueeze(-1)).add_(o2 * (w2 / den).unsqueeze(-1))
    return out.to(o1.dtype), m + torch.log(den)


def block_sparse_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                               block_cnt: torch.Tensor, block_size: int, sm_scale: Optional[float] = None,
                               max_gather_bytes: int = MAX_GATHER_BYTES) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prefill block-sparse attention on the CPU.

    q (B, H, n, d); k, v (B, H_kv, n, d) (any strides); block_idx int (B, H_kv, n_b, max_kept), block_cnt
    (B, H_kv, n_b), as in :mod:`sketch_walk.core.block_sparse`. Returns out (B, H, n, d) in q's dtype (a view
    of a (B, n, H, d) tensor, the layout the model's o_proj takes) and lse (B, H, n) fp32 (fp64 for fp64).

    Routes (module docstring): runs of query blocks over which a group's lists keep every causal block, on the
    prompt's keys; every other non-empty unit (sequence, key head, query block) in a (width, ends with its diagonal)
    bucket, gathered in chunks of at most ``max_gather_bytes`` of K and V. Empty lists give out 0, lse -inf.
    """
    b, h, n, d, hkv = _check_shapes(q, k, v)
    r = h // hkv
    bs = block_size
    nb = num_blocks(n, bs)
    g = b * hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    dt = q.dtype
    lse_dt = torch.float64 if dt == torch.float64 else torch.float32
    cnt = block_cnt.to(device="cpu", dtype=torch.int64).reshape(g, nb)
    idx = block_idx.to(device="cpu", dtype=torch.int64).reshape(g, nb, -1)

    # query blocks (G, r, n_b B, d) and contiguous keys / values (G, n_b B, d), zero-padded to whole blocks
    # (the model's K / V are (B, n, H_kv, d) views: one copy here makes every later gather a run of whole blocks)
    qb = _blocked(q, bs, dt, out=_buffer("q", (b, h, nb * bs, d), dt)).view(g, r, nb * bs, d)
    kb = _blocked(k, bs, dt, out=_buffer("k", (b, hkv, nb * bs, d), dt)).view(g, nb * bs, d)
    vb = _blocked(v, bs, dt, out=_buffer("v", (b, hkv, nb * bs, d), dt)).view(g, nb * bs, d)
    out = _buffer("out", (g, nb, r, bs, d), dt)               # every unit is written below, empty ones too
    lse = _buffer("lse", (g, nb, r, bs), lse_dt)

    rows = torch.arange(nb)
    dense = cnt == rows + 1                   # ascending causal lists of i + 1 entries: blocks 0..i
    runs: Dict[Tuple[int, int], List[int]] = {}                  # (i0, i1) -> the groups with that dense run
    for gi, flags in enumerate(dense.tolist()):
        for run in _runs(flags):
            runs.setdefault(run, []).append(gi)
    for (i0, i1), groups in runs.items():
        sel = torch.tensor(groups) if len(groups) < g else None  # all groups: views; some: copies of what is used
        o, l = _dense_run(qb, kb, vb, i0 * bs, i1 * bs, r, scale, sel)
        o, l = o.view(-1, r, i1 - i0, bs, d).transpose(1, 2), l.view(-1, r, i1 - i0, bs).transpose(1, 2)
        if sel is None:
            out[:, i0:i1], lse[:, i0:i1] = o, l
        else:
            out[sel, i0:i1], lse[sel, i0:i1] = o, l

    # every other unit u = group * n_b + i with a non-empty list, bucketed by (width, ends with its diagonal); the
    # kernel sees a unit as one head of r B queries (the r query heads one after the other: longer query tiles
    # than r heads of B, so each gathered key tile is reused by more queries)
    out_u, lse_u = out.view(g * nb, 1, r * bs, d), lse.view(g * nb, 1, r * bs)
    unit_ids = torch.arange(g).view(g, 1) * nb + rows
    empty = unit_ids[(cnt == 0) & ~dense]     # out 0, lse -inf
    if empty.numel():
        out_u.index_fill_(0, empty, 0.0)
        lse_u.index_fill_(0, empty, float("-inf"))
    todo = (cnt > 0) & ~dense
    if not bool(todo.any()):
        return _layout(out, lse, b, hkv, n)
    last = idx.gather(-1, (cnt - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    units = unit_ids[todo]
    keys = (cnt * 2 + (last == rows).long())[todo]
    order = torch.argsort(keys, stable=True)
    units, keys = units[order], keys[order]
    q5 = qb.view(g, r, nb, bs, d)
    diag = _diag_mask(_buffer("mask", (r, bs, nb * bs), dt), bs).view(1, 1, r * bs, nb * bs)   # r heads of queries
    flat_idx = idx.view(g * nb, -1)
    first = (units // nb) * nb                                   # block 0 of each unit's group in the flat K / V
    kflat, vflat = kb.view(g * nb, bs * d), vb.view(g * nb, bs * d)
    budget = max(max_gather_bytes // (2 * bs * d * dt.itemsize), int(keys.max()) // 2)   # blocks gathered at once
    kv = _buffer("kv", (2, min(budget, int((keys // 2).sum())), bs * d), dt)
    kbuf, vbuf = kv[0], kv[1]
    u0 = 0
    for key, count in zip(*(t.tolist() for t in torch.unique_consecutive(keys, return_counts=True))):
        width, has_diag = key // 2, bool(key % 2)
        step = max(1, budget // width)
        for c0 in range(u0, u0 + count, step):
            sel = units[c0:min(c0 + step, u0 + count)]
            m = sel.numel()
            entries = (flat_idx[sel, :width] + first[c0:c0 + m].unsqueeze(-1)).reshape(-1)
            kc = torch.index_select(kflat, 0, entries, out=kbuf[:m * width]).view(m, 1, width * bs, d)
            vc = torch.index_select(vflat, 0, entries, out=vbuf[:m * width]).view(m, 1, width * bs, d)
            qu = q5[sel // nb, :, sel % nb].view(m, 1, r * bs, d)  # the units' r query blocks, one after the other
            o, l = _flash(qu, kc, vc, diag[..., -width * bs:] if has_diag else None, scale)
            out_u.index_copy_(0, sel, o)
            lse_u.index_copy_(0, sel, l)
        u0 += count
    return _layout(out, lse, b, hkv, n)


def _dense_run(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, t0: int, t1: int, r: int, scale: float,
               groups: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Queries t0..t1-1 attending every key up to their own position (causal attention, bottom-right aligned):
    qb (G, r, n_b B, d), kb / vb (G, n_b B, d) -> out (G', r, t1 - t0, d), lse (G', r, t1 - t0) for the G' groups
    ``groups`` (default all).

    The kernel's causal mask is top-left (query l sees keys <= l), so the keys split in two: t0..t1-1, causal as
    the kernel has it, and 0..t0-1, all visible, no mask, with the r heads as one long query axis (r (t1 - t0)
    queries per key tile); the two parts are merged by their log-sum-exps. For all groups both are views of the
    prompt (no gather); for some, the slices used are copied."""
    q, k, v = qb[:, :, t0:t1], kb[:, :t1], vb[:, :t1]
    if groups is not None:
        q, k, v = q.index_select(0, groups), k.index_select(0, groups), v.index_select(0, groups)
    g, _, L, d = q.shape
    o, l = _flash(q, k[:, None, t0:].expand(-1, r, -1, -1), v[:, None, t0:].expand(-1, r, -1, -1), None, scale,
                  causal=True)
    if t0 == 0:
        return o, l
    o0, l0 = _flash(q.reshape(g, 1, r * L, d), k[:, None, :t0], v[:, None, :t0], None, scale)
    return _merge(o, l, o0.view(g, r, L, d), l0.view(g, r, L))


def _layout(out: torch.Tensor, lse: torch.Tensor, b: int, hkv: int, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """out (G, n_b, r, B, d), lse (G, n_b, r, B) by unit -> out (B, H, n, d) as a view of (B, n, H, d) (o_proj's
    layout, so the hook's transpose back is free) and lse (B, H, n)."""
    g, nb, r, bs, d = out.shape
    out = out.view(b, hkv, nb, r, bs, d).permute(0, 2, 4, 1, 3, 5).reshape(b, nb * bs, hkv * r, d)[:, :n]
    lse = lse.permute(0, 2, 1, 3).reshape(b, hkv * r, nb * bs)[:, :, :n]
    return out.transpose(1, 2), lse


def block_sparse_decode_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_idx: torch.Tensor,
                            block_cnt: torch.Tensor, block_size: int,
                            sm_scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One new query per sequence against the kept blocks of its cache, on the CPU.

    q (B, H, 1, d) at position N-1; k_cache, v_cache (B, H_kv, N, d) (the new token's key included);
    block_idx (B, H_kv, max_kept), block_cnt (B, H_kv). Returns out (B, H, 1, d) in q's dtype and lse (B, H, 1)
    fp32 (fp64 for fp64). One kernel call, the key heads as its heads and their r query heads as its queries, on
    * the kept tokens gathered (W B per key head, W the widest count; a mask where a list is shorter or the last
      block partial) when they are at most ``DECODE_GATHER_MAX`` of the cache, or else
    * the whole cache under a token mask of the kept blocks: a step is a pass over K and V either way, and copying
      most of them first would cost more than the keys it saves.
    """
    b, h, one, d = q.shape
    if one != 1:
        raise ValueError(f"decode expects one query per sequence, got q_len {one}")
    hkv, n = k_cache.shape[1], k_cache.shape[2]
    r = h // hkv
    bs = block_size
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    dt = q.dtype
    lse_dt = torch.float64 if dt == torch.float64 else torch.float32
    cnt = block_cnt.to(device="cpu", dtype=torch.int64)
    width = int(cnt.max()) if cnt.numel() else 0
    if width == 0:
        return torch.zeros_like(q), torch.full((b, h, 1), float("-inf"), dtype=lse_dt)
    k_cache, v_cache = k_cache.to(dt), v_cache.to(dt)
    if width * bs > DECODE_GATHER_MAX * n:
        blocks = block_lists_to_mask(block_idx.to("cpu"), cnt, num_blocks(n, bs))       # (B, H_kv, n_b)
        mask = torch.where(blocks, 0.0, float("-inf")).to(dt).repeat_interleave(bs, -1)[..., :n].unsqueeze(2)
        kc, vc = k_cache, v_cache
    else:
        sel = block_idx[..., :width].to(device="cpu", dtype=torch.int64).clamp(min=0)
        pos = (sel.unsqueeze(-1) * bs + torch.arange(bs)).reshape(b, hkv, width * bs)   # token positions
        ok = (torch.arange(width) < cnt.unsqueeze(-1)).repeat_interleave(bs, -1) & (pos < n)
        mask = None if bool(ok.all()) else torch.where(ok, 0.0, float("-inf")).to(dt).unsqueeze(2)
        rows = (torch.arange(b * hkv).view(b, hkv, 1) * n + pos.clamp(max=n - 1)).reshape(-1)
        kv = _buffer("kv", (2, rows.numel(), d), dt)
        kc = torch.index_select(k_cache.reshape(b * hkv * n, d), 0, rows, out=kv[0]).view(b, hkv, width * bs, d)
        vc = torch.index_select(v_cache.reshape(b * hkv * n, d), 0, rows, out=kv[1]).view(b, hkv, width * bs, d)
    o, l = _flash(q.reshape(b, hkv, r, d), kc, vc, mask, scale)
    empty = cnt == 0
    if bool(empty.any()):                     # as in prefill: an empty list is lse -inf, not the kernel's 0
        l[empty] = float("-inf")
    return o.reshape(b, h, 1, d), l.reshape(b, h, 1).to(lse_dt)
