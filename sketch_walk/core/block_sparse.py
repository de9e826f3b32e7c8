"""Block-sparse attention: the one attention that every block-selection method uses.

Methods (Sketch&Walk, SeerAttention, the oracle and local controls) differ only in how they
pick key blocks. They all hand the result to :func:`block_sparse_attention` (prefill) or
:func:`block_sparse_decode` (one new query per sequence), which run the Triton kernels on CUDA,
torch's CPU flash attention on the gathered kept blocks on the CPU
(:mod:`sketch_walk.core.kernels.block_sparse_cpu`), and the plain PyTorch references here
elsewhere or when forced (backend "reference": the float definition the tests compare against).

Kept-block lists (the format every selector returns and every kernel reads)
--------------------------------------------------------------------------
Prefill, sequence length n, block size B, n_b = ceil(n / B) blocks (the last may be partial):

* ``block_idx``: int32 (batch, H_kv, n_b, max_kept). Row i lists the key blocks that query
  block i attends to, ascending, unique, causal (j <= i). Entries at positions >= count are
  ignored (conventionally -1).
* ``block_cnt``: int32 (batch, H_kv, n_b), the number of valid entries of each row.

One list per key head: the query heads of a GQA group share it, so each K/V block is read
once for the whole group. A per-layer selection repeats the same list for every key head.
Inside the diagonal block (j == i) masking is token-level causal; blocks j < i are fully
visible. Decode uses the same layout without the query-block axis: ``block_idx`` (batch, H_kv,
max_kept), ``block_cnt`` (batch, H_kv), indexing blocks of the cache.

Math: for query t of head h (key head g = h // r, r = H / H_kv) with kept key set
K_t = {s : block(s) in S_{block(t)}, s <= t},
    out[h, t] = sum_{s in K_t} softmax_s(q_t . k_s * scale) v_s,   lse[h, t] = log sum_{s in K_t} exp(q_t . k_s * scale).
A query with no visible key (only possible when a list leaves out the diagonal block) gets
out = 0 and lse = -inf.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from .errors import UsageError

BACKENDS = ("auto", "triton", "torch", "reference")
_forced_backend: Optional[str] = None


def set_backend(backend: str) -> None:
    """Force the attention backend for this process: 'auto' (Triton on CUDA, else torch), 'triton', 'torch'
    (PyTorch: on the CPU the flash-attention path, elsewhere the references) or 'reference' (the float references)."""
    global _forced_backend
    if backend not in BACKENDS:
        raise UsageError(f"--attn_backend {backend}: choose one of {', '.join(BACKENDS)}")
    _forced_backend = backend


def resolve_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """Which implementation runs for tensors on ``device``: 'triton', 'torch' or 'reference' (selectors run their
    torch code for both of the last two)."""
    choice = backend or _forced_backend or os.environ.get("SKETCH_WALK_ATTN_BACKEND", "auto")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("--attn_backend triton needs a CUDA GPU (or TRITON_INTERPRET=1 for the slow CPU interpreter); "
                         "use --attn_backend torch or auto")
    return choice


# ----------------------------------------------------------------------------------------------
# Helpers shared by all selectors
# ----------------------------------------------------------------------------------------------

def num_blocks(n: int, block_size: int) -> int:
    return (n + block_size - 1) // block_size


def mask_to_block_lists(block_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Boolean block mask (..., n_q_blocks, n_k_blocks) -> (block_idx, block_cnt).

    block_idx (..., n_q_blocks, max_kept) int32, ascending, padded with -1; block_cnt (..., n_q_blocks) int32.
    max_kept is the largest row count (so no host sync beyond the one ``max`` needs), at least 1.
    """
    nk = block_mask.shape[-1]
    cnt = block_mask.sum(-1, dtype=torch.int32)
    max_kept = max(int(cnt.max().item()) if cnt.numel() else 1, 1)
    # Sort key: kept blocks first in ascending order, dropped ones after them.
    ar = torch.arange(nk, device=block_mask.device)
    key = torch.where(block_mask, ar, ar + nk)
    order = key.sort(dim=-1).values[..., :max_kept]
    idx = torch.where(order < nk, order, torch.full_like(order, -1)).to(torch.int32)
    return idx.contiguous(), cnt.contiguous()


def block_lists_to_mask(block_idx: torch.Tensor, block_cnt: torch.Tensor, n_k_blocks: int) -> torch.Tensor:
    """Inverse of :func:`mask_to_block_lists`: (..., max_kept) lists -> (..., n_k_blocks) bool mask."""
    valid = torch.arange(block_idx.shape[-1], device=block_idx.device) < block_cnt.unsqueeze(-1)
    idx = torch.where(valid, block_idx.long(), torch.full_like(block_idx, n_k_blocks, dtype=torch.long))
    mask = torch.zeros(*block_idx.shape[:-1], n_k_blocks + 1, dtype=torch.bool, device=block_idx.device)
    mask.scatter_(-1, idx, True)
    return mask[..., :n_k_blocks]


def attended_pairs_prefill(block_idx: torch.Tensor, block_cnt: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """Exact number of (query, key) pairs the kernel attends per (batch, key head), counting one query head.

    A kept block j < i contributes rows(i) * rows(j) pairs; the diagonal block contributes the causal
    triangle rows(i) * (rows(i) + 1) / 2. Divide by n (n + 1) / 2 for the density.
    """
    nb = num_blocks(n, block_size)
    # rows per block, built on the device without an indexed store (no host sync)
    starts = torch.arange(nb, device=block_idx.device, dtype=torch.float64) * block_size
    rows = (n - starts).clamp(max=block_size)
    valid = torch.arange(block_idx.shape[-1], device=block_idx.device) < block_cnt.unsqueeze(-1)
    j = block_idx.clamp(min=0).long()
    i = torch.arange(nb, device=block_idx.device).view(*([1] * (block_idx.dim() - 2)), nb, 1)
    rows_i = rows.view(*([1] * (block_idx.dim() - 2)), nb, 1)
    pairs = torch.where(j == i, rows_i * (rows_i + 1) / 2, rows_i * rows[j])
    return torch.where(valid, pairs, torch.zeros_like(pairs)).sum(dim=(-1, -2))


def causal_pairs(n: int) -> float:
    return n * (n + 1) / 2


def attended_keys_decode(block_idx: torch.Tensor, block_cnt: torch.Tensor, n_keys: int, block_size: int) -> torch.Tensor:
    """Keys one decode query attends per (batch, key head): full blocks count B, the last (partial) its real keys."""
    last = num_blocks(n_keys, block_size) - 1
    last_rows = n_keys - last * block_size
    valid = torch.arange(block_idx.shape[-1], device=block_idx.device) < block_cnt.unsqueeze(-1)
    rows = torch.where(block_idx.long() == last, last_rows, block_size).to(torch.float64)
    return torch.where(valid, rows, torch.zeros_like(rows)).sum(-1)


# ----------------------------------------------------------------------------------------------
# PyTorch references (exact softmax over the kept blocks)
# ----------------------------------------------------------------------------------------------

def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[int, int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B, H, n, d), k and v (B, H_kv, n, d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, n, d = q.shape
    h_kv = k.shape[1]
    if h % h_kv or k.shape[0] != b or k.shape[-1] != d:
        raise ValueError(f"query heads {h} must be a multiple of key heads {h_kv}, same batch and head dim")
    return b, h, n, d, h_kv


def _blocked(x: torch.Tensor, block_size: int, work: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (..., n, d) in ``work`` dtype, zero-padded to whole blocks and viewed as (..., n_b, block_size, d).
    ``out``: a contiguous (..., n_b * block_size, d) tensor of ``work`` dtype to write it into (the CPU path's
    kept buffers)."""
    n, d = x.shape[-2:]
    nb = num_blocks(n, block_size)
    if out is None:
        padded = torch.nn.functional.pad(x.to(work), (0, 0, 0, nb * block_size - n))
    else:
        padded = out
        out[..., :n, :].copy_(x)
        out[..., n:, :].zero_()
    return padded.view(*x.shape[:-2], nb, block_size, d)


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                                     block_cnt: torch.Tensor, block_size: int, sm_scale: Optional[float] = None,
                                     max_gather_bytes: int = 1 << 28,
                                     window: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prefill block-sparse attention in plain PyTorch.

    q (B, H, n, d); k, v (B, H_kv, n, d) (same n: queries are positions 0..n-1); block lists as in the
    module docstring. Returns out (B, H, n, d) in q's dtype and lse (B, H, n) in fp32 (fp64 for fp64
    inputs). Work is done per chunk of query blocks on gathered K/V, so memory stays bounded
    (``max_gather_bytes``) and time scales with the kept blocks, not n^2. ``window`` w (a sliding-window
    layer): query t also needs t - s < w (keys t-w+1..t), on top of the lists.
    """
    b, h, n, d, h_kv = _check_shapes(q, k, v)
    r = h // h_kv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    bs = block_size
    nb = num_blocks(n, bs)
    qb = _blocked(q, bs, work).view(b, h_kv, r, nb, bs, d)
    kb, vb = _blocked(k, bs, work), _blocked(v, bs, work)
    max_kept = block_idx.shape[-1]
    valid = torch.arange(max_kept, device=q.device) < block_cnt.unsqueeze(-1).long()     # (B, Hkv, nb, mk)
    idx = torch.where(valid, block_idx.long(), torch.zeros_like(block_idx, dtype=torch.long))
    out = torch.empty(b, h_kv, r, nb, bs, d, dtype=work, device=q.device)
    lse = torch.empty(b, h_kv, r, nb, bs, dtype=work, device=q.device)
    per_block = b * h_kv * max_kept * bs * d * (2 * torch.finfo(work).bits // 8) + b * h * max_kept * bs * bs * 8
    chunk = max(1, min(nb, max_gather_bytes // max(per_block, 1)))
    bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
    gi = torch.arange(h_kv, device=q.device).view(1, h_kv, 1, 1)
    tok = torch.arange(bs, device=q.device)
    for i0 in range(0, nb, chunk):
        i1 = min(nb, i0 + chunk)
        ic = idx[:, :, i0:i1]                                                  # (B, Hkv, c, mk)
        kc = kb[bi, gi, ic].reshape(b, h_kv, i1 - i0, max_kept * bs, d)        # gathered keys
        vc = vb[bi, gi, ic].reshape(b, h_kv, i1 - i0, max_kept * bs, d)
        kpos = (ic.unsqueeze(-1) * bs + tok).reshape(b, h_kv, i1 - i0, max_kept * bs)
        kval = valid[:, :, i0:i1].unsqueeze(-1).expand(-1, -1, -1, -1, bs).reshape(b, h_kv, i1 - i0, -1)
        qpos = (torch.arange(i0, i1, device=q.device).unsqueeze(-1) * bs + tok)  # (c, bs)
        allowed = kval.unsqueeze(-2) & (kpos.unsqueeze(-2) <= qpos.unsqueeze(-1)) & (kpos.unsqueeze(-2) < n)
        if window:
            allowed = allowed & (qpos.unsqueeze(-1) - kpos.unsqueeze(-2) < window)
        s = torch.einsum("bgrcqd,bgckd->bgrcqk", qb[:, :, :, i0:i1], kc) * scale
        s = s.masked_fill(~allowed.unsqueeze(2), float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        o = torch.einsum("bgrcqk,bgckd->bgrcqd", p, vc) / denom.clamp_min(torch.finfo(work).tiny)
        out[:, :, :, i0:i1] = torch.where(denom > 0, o, torch.zeros_like(o))
        lse[:, :, :, i0:i1] = (m + torch.log(denom)).squeeze(-1)
    out = out.view(b, h, nb * bs, d)[:, :, :n].to(q.dtype)
    lse = lse.view(b, h, nb * bs)[:, :, :n]
    return out, lse


def block_sparse_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_idx: torch.Tensor, block_cnt: torch.Tensor, block_size: int,
                                  sm_scale: Optional[float] = None, n_keys: Optional[torch.Tensor] = None
                                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One new query per sequence against the kept blocks of its cache, in plain PyTorch.

    q (B, H, 1, d) at position N-1; k_cache, v_cache (B, H_kv, N, d) (the new token's key included);
    block_idx (B, H_kv, max_kept), block_cnt (B, H_kv). Returns out (B, H, 1, d), lse (B, H, 1).
    ``n_keys``: a one-element tensor N' <= N, the cache's real length (keys from N' on are ignored).
    """
    b, h, one, d = q.shape
    if one != 1:
        raise ValueError(f"decode expects one query per sequence, got q_len {one}")
    h_kv, n = k_cache.shape[1], k_cache.shape[2]
    r = h // h_kv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    bs = block_size
    kb, vb = _blocked(k_cache, bs, work), _blocked(v_cache, bs, work)
    max_kept = block_idx.shape[-1]
    valid = torch.arange(max_kept, device=q.device) < block_cnt.unsqueeze(-1).long()       # (B, Hkv, mk)
    idx = torch.where(valid, block_idx.long(), torch.zeros_like(block_idx, dtype=torch.long))
    bi = torch.arange(b, device=q.device).view(b, 1, 1)
    gi = torch.arange(h_kv, device=q.device).view(1, h_kv, 1)
    kc = kb[bi, gi, idx].reshape(b, h_kv, max_kept * bs, d)
    vc = vb[bi, gi, idx].reshape(b, h_kv, max_kept * bs, d)
    kpos = (idx.unsqueeze(-1) * bs + torch.arange(bs, device=q.device)).reshape(b, h_kv, -1)
    allowed = valid.unsqueeze(-1).expand(-1, -1, -1, bs).reshape(b, h_kv, -1) & (kpos < n)
    if n_keys is not None:
        allowed = allowed & (kpos < n_keys.reshape(()))
    qg = q.to(work).view(b, h_kv, r, d)
    s = torch.einsum("bgrd,bgkd->bgrk", qg, kc) * scale
    s = s.masked_fill(~allowed.unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    o = torch.einsum("bgrk,bgkd->bgrd", p, vc)
    return o.reshape(b, h, 1, d).to(q.dtype), lse.reshape(b, h, 1)


# ----------------------------------------------------------------------------------------------
# Dispatch: the call sites never change when the kernels do
# ----------------------------------------------------------------------------------------------

def _cpu_path(q: torch.Tensor, backend: Optional[str], *tensors: torch.Tensor) -> bool:
    """Whether the 'torch' backend runs :mod:`.kernels.block_sparse_cpu`: CPU tensors, no gradient wanted (it gathers
    into reused buffers; the differentiable reference serves autograd), and a torch with its kernel."""
    if q.device.type != "cpu" or resolve_backend(q.device, backend) != "torch":
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q,) + tensors):
        return False
    from .kernels.block_sparse_cpu import available
    return available()


def block_sparse_attention(q, k, v, block_idx, block_cnt, block_size: int, sm_scale: Optional[float] = None,
                           backend: Optional[str] = None, window: Optional[int] = None):
    """Prefill block-sparse attention; Triton on CUDA, the CPU flash-attention path on the CPU, else the PyTorch
    reference. Returns (out, lse). ``window``: a sliding window of that many keys (keys t-w+1..t) on top of the
    lists (the reference's on the CPU: the hook sends sliding-window layers to SDPA there)."""
    if resolve_backend(q.device, backend) == "triton":
        from .kernels.block_sparse_prefill import block_sparse_attention_triton
        return block_sparse_attention_triton(q, k, v, block_idx, block_cnt, block_size, sm_scale, window=window)
    if window is None and _cpu_path(q, backend, k, v):
        from .kernels.block_sparse_cpu import block_sparse_attention_cpu
        return block_sparse_attention_cpu(q, k, v, block_idx, block_cnt, block_size, sm_scale)
    return block_sparse_attention_reference(q, k, v, block_idx, block_cnt, block_size, sm_scale, window=window)


def window_block_lists(n: int, block_size: int, window: int, batch: int, h_kv: int,
                       device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kept-block lists of a sliding-window layer: query block i keeps blocks
    max(0, floor((i B - w + 1) / B)) .. i, every block that holds a key t-w+1..t of one of its queries
    (the kernel masks the keys outside the window token by token). Returns block_idx
    (batch, h_kv, n_b, max_kept) int32 ascending and block_cnt (batch, h_kv, n_b) int32, built on
    ``device`` without a host sync."""
    if window < 1:
        raise ValueError(f"window {window} must be >= 1")
    nb = num_blocks(n, block_size)
    i = torch.arange(nb, device=device)
    first = torch.clamp(torch.div(i * block_size - window + 1, block_size, rounding_mode="floor"), min=0)
    cnt = (i - first + 1).to(torch.int32)
    max_kept = min(nb, (window - 1 + block_size - 1) // block_size + 1) if nb else 1
    idx = first.unsqueeze(-1) + torch.arange(max(max_kept, 1), device=device)
    idx = torch.minimum(idx, i.unsqueeze(-1)).to(torch.int32)          # entries past a row's count: ignored
    return (idx.expand(batch, h_kv, nb, idx.shape[-1]).contiguous(),
            cnt.expand(batch, h_kv, nb).contiguous())


def block_sparse_decode(q, k_cache, v_cache, block_idx, block_cnt, block_size: int,
                        sm_scale: Optional[float] = None, backend: Optional[str] = None,
                        n_keys: Optional[torch.Tensor] = None):
    """Decode block-sparse attention (one query per sequence); Triton on CUDA, the CPU flash-attention path on the
    CPU, else the reference. ``n_keys``: a device tensor (one element) holding the cache's length when k_cache /
    v_cache are longer (a static cache: keys from n_keys on are ignored; CUDA-graph decode,
    :mod:`sketch_walk.core.static_decode`); the CPU then takes the reference."""
    if resolve_backend(q.device, backend) == "triton":
        from .kernels.block_sparse_decode import block_sparse_decode_triton
        return block_sparse_decode_triton(q, k_cache, v_cache, block_idx, block_cnt, block_size, sm_scale,
                                          n_keys=n_keys)
    if n_keys is not None:
        return block_sparse_decode_reference(q, k_cache, v_cache, block_idx, block_cnt, block_size, sm_scale,
                                             n_keys=n_keys)
    if _cpu_path(q, backend, k_cache, v_cache):
        from .kernels.block_sparse_cpu import block_sparse_decode_cpu
        return block_sparse_decode_cpu(q, k_cache, v_cache, block_idx, block_cnt, block_size, sm_scale)
    return block_sparse_decode_reference(q, k_cache, v_cache, block_idx, block_cnt, block_size, sm_scale)
