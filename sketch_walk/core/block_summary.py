"""Per-block summaries of keys (or queries) that every selection method reads: counts, sums, means, max, min.

Shapes: x (..., n, d) with the sequence on the second-last axis; n_b = ceil(n / B) blocks of B tokens, the last
one possibly partial (its summaries cover its real tokens only). Used by Sketch&Walk (block means for the
mean sketch, per-channel max / min for the minmax bound: docs/ALGORITHM.md steps 1 and 3b) and by SeerAttention's
gate (q pooled by mean, k by max, min and mean).

Prefill: :func:`block_rows`, :func:`block_sum`, :func:`block_mean` and :func:`block_minmax` summarise a whole
prompt. Decode: :class:`RunningBlockSummary` keeps the same summaries for a sequence that grows one token a
step and folds each new key into its block in O(d), never recomputing from the cache; sums kept in float64
equal a recomputation exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .block_sparse import num_blocks


# ----------------------------------------------------------------------------------------------
# Whole-sequence summaries
# ----------------------------------------------------------------------------------------------

def block_rows(n: int, block_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Real tokens per block: (n_b,) = [B, ..., B, n - (n_b - 1) B]."""
    nb = num_blocks(n, block_size)
    starts = torch.arange(nb, device=device, dtype=torch.int64) * block_size
    return (n - starts).clamp(max=block_size).to(dtype)      # built on the device: no host-to-device copy


def _split_blocks(x: torch.Tensor, block_size: int):
    """x (..., n, d) -> (full blocks view (..., n_full, B, d), partial last block (..., r, d) or None); no copy."""
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


def block_mean(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x (..., n, d) -> Xbar (..., n_b, d) fp32: Xbar[i] = mean of x over the real tokens of block i."""
    rows = block_rows(x.shape[-2], block_size, device=x.device)
    return block_sum(x, block_size) / rows.unsqueeze(-1)


def block_minmax(x: torch.Tensor, block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (..., n, d) -> (Xmax, Xmin), each (..., n_b, d) fp32: per channel, over each block's real tokens."""
    full, rest = _split_blocks(x, block_size)
    xmax, xmin = full.amax(-2).float(), full.amin(-2).float()          # max / min are exact in any dtype
    if rest is not None:
        xmax = torch.cat([xmax, rest.amax(-2, keepdim=True).float()], dim=-2)
        xmin = torch.cat([xmin, rest.amin(-2, keepdim=True).float()], dim=-2)
    return xmax, xmin


# ----------------------------------------------------------------------------------------------
# Running summaries (decode)
# ----------------------------------------------------------------------------------------------

def grow_blocks(x: Optional[torch.Tensor], capacity: int, dims: Sequence[int], fill: float = 0.0
                ) -> Optional[torch.Tensor]:
    """A copy of ``x`` whose axes ``dims`` have size ``capacity`` (new entries ``fill``); None stays None."""
    if x is None:
        return None
    shape = list(x.shape)
    for d in dims:
        shape[d] = capacity
    out = torch.full(shape, fill, dtype=x.dtype, device=x.device)
    out[tuple(slice(0, s) for s in x.shape)] = x
    return out


@dataclass
class RunningBlockSummary:
    """Block summaries of a growing key sequence: ``n`` tokens summarised, blocks of ``block_size``.

    ``counts`` (cap,) fp64 tokens per block; ``sums`` (B, H_kv, cap, d) in the dtype it was made with (None if
    not kept); ``kmax`` / ``kmin`` (B, H_kv, cap, d) fp32 (None if not kept). The block axis has a capacity
    ``cap`` >= n_b that grows by doubling, so appending is amortised O(d); only the first n_b entries mean
    anything. :meth:`append` folds one new key into its block and opens a new block when the position is a
    multiple of ``block_size`` (count 0, sum 0, max -inf, min +inf).
    """

    block_size: int
    n: int
    counts: torch.Tensor
    sums: Optional[torch.Tensor] = None
    kmax: Optional[torch.Tensor] = None
    kmin: Optional[torch.Tensor] = None

    @classmethod
    def from_keys(cls, keys: torch.Tensor, block_size: int, *, sum_dtype: Optional[torch.dtype] = None,
                  minmax: bool = False) -> "RunningBlockSummary":
        """Summaries of keys (B, H_kv, n, d): sums in ``sum_dtype`` (None: no sums) and, with ``minmax``, max / min."""
        n = keys.shape[-2]
        counts = block_rows(n, block_size, device=keys.device, dtype=torch.float64)
        sums = block_sum(keys, block_size, dtype=sum_dtype) if sum_dtype is not None else None
        kmax, kmin = block_minmax(keys, block_size) if minmax else (None, None)
        return cls(block_size=block_size, n=n, counts=counts, sums=sums, kmax=kmax, kmin=kmin)

    @property
    def n_blocks(self) -> int:
        return num_blocks(self.n, self.block_size)

    @property
    def capacity(self) -> int:
        return self.counts.shape[0]

    def mean(self, block: Optional[int] = None, padded: bool = False) -> torch.Tensor:
        """Block means from the running sums, in the sums' dtype: every block (B, H_kv, n_b, d), or block
        ``block`` alone (B, H_kv, d). ``padded``: divide by ``block_size`` instead of the block's token count (the
        mean of a block zero-padded to full size, as the authors' code pools)."""
        if block is None:
            nb = self.n_blocks
            if padded:
                return self.sums[:, :, :nb] / self.block_size
            return self.sums[:, :, :nb] / self.counts[:nb].to(self.sums.dtype).unsqueeze(-1)
        if padded:
            return self.sums[:, :, block] / self.block_size
        return self.sums[:, :, block] / self.counts[block].to(self.sums.dtype)

    def ensure_capacity(self, need: int) -> None:
        """Grow the block axes to at least ``need`` blocks (doubling, so growth is amortised O(1))."""
        if need <= self.capacity:
            return
        new = max(need, 2 * self.capacity, 8)
        self.counts = grow_blocks(self.counts, new, [0])
        self.sums = grow_blocks(self.sums, new, [2])
        self.kmax = grow_blocks(self.kmax, new, [2], float("-inf"))
        self.kmin = grow_blocks(self.kmin, new, [2], float("inf"))

    def append(self, k_new: torch.Tensor, *, minmax_elsewhere: bool = False) -> int:
        """Fold the key of position ``n`` (k_new (B, H_kv, d)) into its block, in O(d); returns the block's index.

        ``minmax_elsewhere``: the caller's kernel updates this block's count and max / min itself (Sketch&Walk's
        Triton decode selection); only the capacity, a new block's sum and ``n`` are handled here.
        """
        pos = self.n
        i = pos // self.block_size
        if pos % self.block_size == 0:                                   # a new block opens
            self.ensure_capacity(i + 1)
            # fill_ with a Python number launches a kernel; `x[i] = v` would copy a CPU scalar (a host sync)
            if not minmax_elsewhere:
                self.counts[i].fill_(0)
            if self.sums is not None:
                self.sums[:, :, i].fill_(0)
            if self.kmax is not None and not minmax_elsewhere:
                self.kmax[:, :, i].fill_(float("-inf"))
                self.kmin[:, :, i].fill_(float("inf"))
        self.n = pos + 1
        if minmax_elsewhere:
            return i
        self.fold(k_new, i)
        return i

    def fold(self, k_new: torch.Tensor, block: int) -> None:
        """Add k_new (B, H_kv, d) to block ``block``'s count, sum and max / min (those kept), in place, no host sync
        (``n`` is the caller's: a static decode step folds without moving it)."""
        self.counts[block] += 1
        if self.sums is not None:
            self.sums[:, :, block] += k_new.to(self.sums.dtype)
        if self.kmax is not None:
            kf = k_new.float()
            self.kmax[:, :, block] = torch.maximum(self.kmax[:, :, block], kf)
            self.kmin[:, :, block] = torch.minimum(self.kmin[:, :, block], kf)

    def empty_from(self, capacity_blocks: int) -> None:
        """Grow to ``capacity_blocks`` and make every block past the first n_b empty (count 0, sum 0, max -inf,
        min +inf): folding a key into such a block then equals opening it (static decode opens none on the host)."""
        now = self.n_blocks
        self.ensure_capacity(capacity_blocks)
        self.counts[now:].zero_()
        if self.sums is not None:
            self.sums[:, :, now:].zero_()
        if self.kmax is not None:
            self.kmax[:, :, now:].fill_(float("-inf"))
            self.kmin[:, :, now:].fill_(float("inf"))
