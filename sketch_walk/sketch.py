"""The sketch of Sketch&Walk (docs/ALGORITHM.md prefill steps 2-3b): the SRHT and the block scores.

Step 1 (block pooling) and the key summaries (block means, per-channel max / min) are the shared
:mod:`sketch_walk.core.block_summary`; SeerAttention's gate pools with the same functions.

Shapes: B batch, H query heads, H_kv key heads, r = H / H_kv, n tokens, d head dim,
bs tokens per block, n_b = ceil(n / bs) blocks (the last may be partial), k sketch dim.
All score math runs in fp32 whatever the model's dtype.
"""
from __future__ import annotations

import functools
import math

import torch


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
    Llama; docs/ALGORITHM.md writes 1/sqrt(d), a model with another attention scale uses its own).
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


def max_over_sub_blocks(scores: torch.Tensor, sub_blocks: int, n_b: int) -> torch.Tensor:
    """Scores of sub-blocks (..., n_sub) -> scores of blocks (..., n_b): the best of each block's ``sub_blocks``.

    With key_summary minmax on sub-blocks of B / sub_blocks tokens this bounds max_t q . k_t more tightly than one
    Kmax / Kmin per block (LServe's hierarchical paging); n_sub = ceil(n / (B / sub_blocks)) may end mid-block.
    """
    if sub_blocks == 1:
        return scores
    pad = n_b * sub_blocks - scores.shape[-1]
    if pad:
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    return scores.unflatten(-1, (n_b, sub_blocks)).amax(-1)


def authors_score_scale(d: int, sketch_dim: int) -> float:
    """The logit scale of the authors' block scores, on the exact inner product q . k (score_scale "authors").

    Their sketch is the unnormalised sign-randomised Walsh-Hadamard transform of the head vector padded to d_p (a
    power of two), divided by sqrt(d_p / m), keeping m = min(sketch_dim, d_p) coordinates, and their logits are
    <S q, S k> / sqrt(m) / 100. Since that S is (m / sqrt(d_p)) times :func:`srht_matrix`'s (same signs and
    coordinates), the logit is m^1.5 / (100 d_p) times this project's estimate of q . k: 0.113 for d = 128
    (1.28 x the attention's 1/sqrt(128)), 0.08 for d = 64 (0.64 x 1/8).
    """
    dp = 1 << max(0, (int(d) - 1).bit_length())
    m = min(int(sketch_dim), dp)
    return m ** 1.5 / (100.0 * dp)
