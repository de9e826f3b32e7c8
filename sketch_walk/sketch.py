"""The sketch of Sketch&Walk (ALGORITHM.md prefill steps 1-3b): block pooling, SRHT, key summaries, block scores.

Shapes: B batch, H query heads, H_kv key heads, r = H / H_kv, n tokens, d head dim,
bs tokens per block, n_b = ceil(n / bs) blocks (the last may be partial), k sketch dim.
All score math runs in fp32 whatever the model's dtype.
"""
from __future__ import annotations

import functools
import math
from typing import Tuple

import torch

from .block_sparse import num_blocks


# ----------------------------------------------------------------------------------------------
# Step 1: token-space sketch (block pooling)
# ----------------------------------------------------------------------------------------------

def block_rows(n: int, block_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Real tokens per block: (n_b,) = [bs, ..., bs, n - (n_b - 1) bs]."""
    nb = num_blocks(n, block_size)
    starts = torch.arange(nb, device=device, dtype=torch.int64) * block_size
    return (n - starts).clamp(max=block_size).to(dtype)      # built on the device: no host-to-device copy


def _split_blocks(x: torch.Tensor, block_size: int):
    """x (..., n, d) -> (full blocks view (..., n_full, bs, d), partial last block (..., r, d) or None); no copy."""
    n, d = x.shape[-2:]
    n_full = n // block_size
    full = x[..., : n_full * block_size, :].reshape(*x.shape[:-2], n_full, block_size, d)
    rest = x[..., n_full * block_size:, :] if n % block_size else None
    return full, rest


def block_sum(x: torch.Tensor, block_size: int, dtype: torch.dtype = torch.float32,
              chunk_bytes: int = 1 << 27) -> torch.Tensor:
    """x (..., n, d) -> per-block sums (..., n_b, d) accumulated in ``dtype`` (a partial last block sums its real tokens).

    No padded copy is made, and a widening sum (bf16 -> fp64) runs over slices of blocks so that its
    temporary stays under ``chunk_bytes``.
    """
    full, rest = _split_blocks(x, block_size)
    if dtype == x.dtype or full.numel() * torch.finfo(dtype).bits // 8 <= chunk_bytes:
        out = full.sum(-2, dtype=dtype)
    else:   # a widening sum may cast its input first: do it a slice of blocks at a time
        per_block = max(1, full[..., :1, :, :].numel() * torch.finfo(dtype).bits // 8)
        step = max(1, chunk_bytes // per_block)
        out = torch.cat([full[..., i:i + step, :, :].sum(-2, dtype=dtype) for i in range(0, full.shape[-3], step)],
                        dim=-2)
    if rest is not None:
        out = torch.cat([out, rest.sum(-2, dtype=dtype).unsqueeze(-2)], dim=-2)
    return out


def block_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Step 1. x (..., n, d) -> Xbar (..., n_b, d) fp32: Xbar[i] = mean of x over the real tokens of block i."""
    rows = block_rows(x.shape[-2], block_size, device=x.device)
    return block_sum(x, block_size) / rows.unsqueeze(-1)


def block_minmax(k: torch.Tensor, block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 3b summary. k (..., n, d) -> (Kmax, Kmin), each (..., n_b, d) fp32, over each block's real tokens."""
    full, rest = _split_blocks(k, block_size)
    kmax, kmin = full.amax(-2).float(), full.amin(-2).float()          # max / min are exact in any dtype
    if rest is not None:
        kmax = torch.cat([kmax, rest.amax(-2, keepdim=True).float()], dim=-2)
        kmin = torch.cat([kmin, rest.amin(-2, keepdim=True).float()], dim=-2)
    return kmax, kmin


# ----------------------------------------------------------------------------------------------
# Step 2: feature-space sketch (subsampled randomized Hadamard transform)
# ----------------------------------------------------------------------------------------------

def layer_seed(hadamard_seed: int, layer_idx: int) -> int:
    """The fixed SRHT seed of a layer: ``hadamard_seed * 1_000_003 + layer_idx`` (reproducible runs)."""
    return int(hadamard_seed) * 1_000_003 + int(layer_idx)


def hadamard(m: int) -> torch.Tensor:
    """Sylvester Walsh-Hadamard matrix H_m (m a power of two), entries +-1, fp64; H_m H_m^T = m I."""
    if m < 1 or m & (m - 1):
        raise ValueError(f"hadamard size {m} is not a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=256)
def _srht_cpu(d: int, k: int, seed: int) -> torch.Tensor:
    dp = 1 << max(0, (d - 1).bit_length())                 # d padded to a power of two
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (dp,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
    perm = torch.randperm(dp, generator=g)
    hd = hadamard(dp) / math.sqrt(dp) * signs               # (H_dp / sqrt(dp)) D, columns scaled by the signs
    if k >= d:
        rows, scale = hd, 1.0                               # no subsampling: orthonormal, exact inner products
    else:
        rows, scale = hd[perm[:k]], math.sqrt(dp / k)       # P_k: the first k rows of a random permutation
    return (scale * rows[:, :d]).float().contiguous()       # columns beyond d act on the zero padding


def srht_matrix(d: int, k: int, seed: int, device=None) -> torch.Tensor:
    """Step 2. The SRHT S (k', d) fp32 with E[S^T S] = I_d, so E[<S x, S y>] = <x, y>.

    S = sqrt(d_p / k) P_k (H_{d_p} / sqrt(d_p)) D restricted to the first d columns, d_p = d padded to a
    power of two (the padding coordinates of x are zero), D = diag(random signs), P_k = the first k rows
    of a random permutation of d_p. k >= d means no subsampling: S = (H/sqrt(d_p)) D, k' = d_p, whose
    columns are orthonormal, so <S x, S y> = <x, y> (exact block scores). Otherwise k' = k.
    The signs and permutation come from ``torch.Generator().manual_seed(seed)`` on the CPU, so the
    matrix is the same on every device; see :func:`layer_seed` for the per-layer seed.
    """
    return _srht_cpu(int(d), int(k), int(seed)).to(device)


def srht(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x (..., d) -> S x (..., k') in fp32."""
    return torch.matmul(x.float(), s.t())


# ----------------------------------------------------------------------------------------------
# Step 3 / 3b: block scores
# ----------------------------------------------------------------------------------------------

def scores_mean(q_t: torch.Tensor, k_t: torch.Tensor, scale: float) -> torch.Tensor:
    """Step 3 (key_summary mean). Ahat[b, g, r, i, j] = <Qtil_{h}[i], Ktil_g[j]> * scale, h = g * r + r_idx.

    q_t (B, G, r, m, k'): sketched pooled queries, grouped by key head (a chunk of G key heads, each with
    its r query heads); k_t (B, G, n_b, k'): sketched pooled keys of those key heads. Returns
    (B, G, r, m, n_b) fp32, no causal mask (the caller masks). ``scale`` is the attention's (1/sqrt(d) for
    Llama; ALGORITHM.md writes 1/sqrt(d), a model with another attention scale uses its own).
    """
    return torch.einsum("bgrmc,bgnc->bgrmn", q_t, k_t) * scale


def scores_minmax(q_bar: torch.Tensor, k_max: torch.Tensor, k_min: torch.Tensor, scale: float) -> torch.Tensor:
    """Step 3b (key_summary minmax). Ahat[i, j] = (<Qbar[i]+, Kmax[j]> + <Qbar[i]-, Kmin[j]>) * scale.

    q+ = max(q, 0), q- = min(q, 0): per channel the largest value q_c k_c can take over the block's
    keys, summed over channels, i.e. an upper bound of max_{t in block j} q . k_t (Quest's page bound).
    q_bar (B, G, r, m, d); k_max, k_min (B, G, n_b, d). Returns (B, G, r, m, n_b) fp32.
    """
    qp = q_bar.clamp_min(0)
    qn = q_bar.clamp_max(0)
    return (torch.einsum("bgrmc,bgnc->bgrmn", qp, k_max) + torch.einsum("bgrmc,bgnc->bgrmn", qn, k_min)) * scale
