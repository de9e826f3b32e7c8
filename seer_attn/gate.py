"""AttnGate: SeerAttention's learned block-importance predictor (one per layer).

As published for Llama (microsoft/SeerAttention, ``prefill_sparse/attn_gate.py``), written anew:

1. Input: q and k straight from q_proj / k_proj, BEFORE RoPE: q (B, H, n, d), k (B, H_kv, n, d).
2. Pool along the sequence in blocks of ``block_size`` (a partial last block pools its real
   tokens only): q by the gate type's q pools (average for "Qavg_..."), k by its k pools (max,
   min and average for "..._Kmaxminavg"), concatenated on channels (k: 3d).
3. Project with per-head weights, no bias: W_k [heads, n_kpools*d, h_g]. With one q pool and
   h_g == d (the published Llama gates and the default model's) pooled q is used as is and W_k
   has one matrix per QUERY head (the key head's pooled k is repeated to its query group
   first); otherwise W_q [H, n_qpools*d, h_g] and W_k per KEY head, repeated to the group after
   projection. (The reference's rule, kept so that published gate files map one to one.)
4. RoPE of dimension h_g (the model's rope type, theta and scaling) at the position of each
   block's first token, on projected q and k.
5. Scores s[h, I, J] = q~_I . k~_J / sqrt(h_g) for J <= I, -inf above the block diagonal, in
   fp32 (the reference computes in bf16, which makes small thresholds coarse).

Pooling uses the shared block summaries (:mod:`sketch_walk.core.block_summary`), as Sketch&Walk does.
Decode (SeerAttention-R style, used by :mod:`seer_attn.selector`): :class:`GateKeyCache` keeps,
per layer, the running max / min / sum / count of each block's pre-RoPE keys (a
:class:`~sketch_walk.core.block_summary.RunningBlockSummary`) and the projected, rotated gate key of
every block; a new token updates only its own block from its own key.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from sketch_walk.core.block_summary import RunningBlockSummary

from .config import SeerAttnConfig, parse_gate_type


# ----------------------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------------------

def block_summary(x: torch.Tensor, block_size: int, pools: Sequence[str]) -> RunningBlockSummary:
    """The block summaries that ``pools`` need of x (B, heads, n, d): fp32 sums for 'avg', max / min for the others."""
    return RunningBlockSummary.from_keys(x, block_size, sum_dtype=torch.float32 if "avg" in pools else None,
                                         minmax=any(p in ("max", "min") for p in pools))


def pools_from_summary(summary: RunningBlockSummary, pools: Sequence[str], block: Optional[int] = None) -> torch.Tensor:
    """Concatenate the requested pools ('max', 'min', 'avg') on channels: (B, heads, n_b, len(pools)*d) fp32, or
    (B, heads, 1, len(pools)*d) for block ``block`` alone."""
    part = slice(0, summary.n_blocks) if block is None else slice(block, block + 1)
    out = []
    for p in pools:
        if p == "avg":
            out.append(summary.sums[:, :, part] / summary.counts[part].to(summary.sums.dtype).view(1, 1, -1, 1))
        else:
            out.append((summary.kmax if p == "max" else summary.kmin)[:, :, part])
    return torch.cat(out, dim=-1)


def pool_blocks(x: torch.Tensor, block_size: int, pools: Sequence[str]) -> torch.Tensor:
    """Pool x (B, heads, n, d) per block: (B, heads, n_b, len(pools)*d), fp32."""
    return pools_from_summary(block_summary(x, block_size, pools), pools)


# ----------------------------------------------------------------------------------------------
# Block RoPE
# ----------------------------------------------------------------------------------------------

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., m, h_g) rotated by cos/sin (m, h_g) (the rotate-half convention of Llama)."""
    return x * cos + rotate_half(x) * sin


class BlockRope:
    """cos/sin of dimension h_g at given positions, in fp32, for the gate's block RoPE.

    ``from_model`` reuses the model's own rotary embedding module (its rope type, theta and
    scaling); when h_g differs from the model's head dim, the same class is built on a copy of the
    config with head_dim = h_g (what the reference's block_rotary_emb does). ``plain`` is the
    default rope with a given theta, for models without a rotary module (tests).
    """

    def __init__(self, fn, dim: int):
        self._fn = fn
        self.dim = dim
        self._at: dict = {}

    @classmethod
    def from_model(cls, model, dim: int) -> "BlockRope":
        base = getattr(model, "model", model)
        rot = getattr(base, "rotary_emb", None)
        if rot is None:
            raise ValueError("the model has no rotary_emb module; SeerAttn gates need a RoPE model")
        cfg = rot.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if dim != head_dim:
            cfg = copy.deepcopy(cfg)
            cfg.head_dim = dim
            rot = type(rot)(config=cfg).to(next(model.parameters()).device)
        # Models with several layer types (Gemma-3: sliding and full attention, each with its own rope
        # theta) keep one rope per type; gates sit on full-attention layers only, so use that one.
        kw = {"layer_type": "full_attention"} if "full_attention" in (getattr(rot, "layer_types", None) or ()) else {}

        def fn(positions: torch.Tensor):
            dummy = torch.zeros(1, dtype=torch.float32, device=positions.device)
            cos, sin = rot(dummy, positions.view(1, -1).to(next(rot.buffers()).device), **kw)
            return cos[0].float(), sin[0].float()

        return cls(fn, dim)

    @classmethod
    def plain(cls, dim: int, theta: float = 10000.0) -> "BlockRope":
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))

        def fn(positions: torch.Tensor):
            f = positions.float().view(-1, 1) * inv.to(positions.device)
            emb = torch.cat((f, f), dim=-1)
            return emb.cos(), emb.sin()

        return cls(fn, dim)

    def __call__(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._fn(positions)
        return cos.to(positions.device), sin.to(positions.device)

    def blocks(self, n_blocks: int, block_size: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at each block's first token: positions 0, B, 2B, ..."""
        return self(torch.arange(n_blocks, device=device) * block_size)

    def at(self, position: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (1, h_g) at one position, computed once per position and device: every decode step of every
        layer asks for the start of the current block twice, and a call of the model's rotary module costs
        more on the CPU than the rest of the gate's step."""
        key = (int(position), str(device))
        if key not in self._at:
            self._at[key] = self(torch.tensor([int(position)], device=device))
        return self._at[key]


# ----------------------------------------------------------------------------------------------
# The gate
# ----------------------------------------------------------------------------------------------

class MultiHeadLinear(nn.Module):
    """Per-head linear map without bias: weight [heads, in, out]; x (B, heads, m, in) -> (B, heads, m, out)."""

    def __init__(self, num_heads: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, in_features, out_features))
        nn.init.normal_(self.weight, mean=0.0, std=0.02)     # the reference's initializer_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhmi,hio->bhmo", x, self.weight.float())


class AttnGate(nn.Module):
    """One layer's gate. Parameters: ``linear_k.weight`` and, when needed, ``linear_q.weight``."""

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, gate_hidden: int = 64,
                 block_size: int = 64, gate_type: str = "Qavg_Kmaxminavg"):
        super().__init__()
        self.q_pools, self.k_pools = parse_gate_type(gate_type)
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.group = num_q_heads // num_kv_heads
        self.gate_hidden, self.block_size, self.gate_type = gate_hidden, block_size, gate_type
        self.scale = gate_hidden ** -0.5
        if len(self.q_pools) > 1 or gate_hidden != head_dim:
            self.linear_q = MultiHeadLinear(num_q_heads, len(self.q_pools) * head_dim, gate_hidden)
            self.linear_k = MultiHeadLinear(num_kv_heads, len(self.k_pools) * head_dim, gate_hidden)
            self.k_per_query_head = False
        else:
            self.linear_q = None
            self.linear_k = MultiHeadLinear(num_q_heads, len(self.k_pools) * head_dim, gate_hidden)
            self.k_per_query_head = True

    @classmethod
    def from_config(cls, cfg: SeerAttnConfig) -> "AttnGate":
        return cls(cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.gate_hidden, cfg.block_size, cfg.gate_type)

    # -- projections ---------------------------------------------------------------------------
    def project_q(self, q_pooled: torch.Tensor) -> torch.Tensor:
        """(B, H, m, n_qpools*d) -> (B, H, m, h_g), fp32, before RoPE."""
        q_pooled = q_pooled.float()
        return q_pooled if self.linear_q is None else self.linear_q(q_pooled)

    def project_k(self, k_pooled: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, m, n_kpools*d) -> (B, H, m, h_g), fp32, before RoPE."""
        k_pooled = k_pooled.float()
        if self.k_per_query_head:
            return self.linear_k(k_pooled.repeat_interleave(self.group, dim=1))
        return self.linear_k(k_pooled).repeat_interleave(self.group, dim=1)

    # -- scores --------------------------------------------------------------------------------
    def scores_from_pooled(self, q_pooled: torch.Tensor, k_pooled: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """Block scores (B, H, n_b, n_b) fp32 from pooled q (B, H, n_b, .) and k (B, H_kv, n_b, .).

        cos/sin (n_b, h_g): block RoPE at each block's first token. -inf above the diagonal.
        """
        q = apply_rope(self.project_q(q_pooled), cos, sin)
        k = apply_rope(self.project_k(k_pooled), cos, sin)
        s = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if causal:
            nb = s.shape[-1]
            upper = torch.ones(nb, nb, dtype=torch.bool, device=s.device).triu_(1)
            s = s.masked_fill(upper, float("-inf"))
        return s

    def forward(self, q: torch.Tensor, k: torch.Tensor, rope: BlockRope) -> torch.Tensor:
        """Scores (B, H, n_b, n_b) from pre-RoPE q (B, H, n, d) and k (B, H_kv, n, d), positions 0..n-1."""
        bs = self.block_size
        qp = pool_blocks(q, bs, self.q_pools)
        kp = pool_blocks(k, bs, self.k_pools)
        cos, sin = rope.blocks(qp.shape[2], bs, q.device)
        return self.scores_from_pooled(qp, kp, cos, sin)

    def probs(self, q: torch.Tensor, k: torch.Tensor, rope: BlockRope) -> torch.Tensor:
        """Row softmax of :meth:`forward` (what the threshold compares against)."""
        return torch.softmax(self.forward(q, k, rope), dim=-1)

    # -- decode --------------------------------------------------------------------------------
    def query_decode(self, q_new: torch.Tensor, position: int, rope: BlockRope) -> torch.Tensor:
        """Gate query of one new token: q_new (B, H, d) pre-RoPE -> (B, H, h_g).

        Goes through the q path as a block of one token (every q pool of one token is the token),
        rotated at the first position of the token's block, as the prefill rows of that block are.
        """
        qp = torch.cat([q_new.float()] * len(self.q_pools), dim=-1).unsqueeze(2)        # (B, H, 1, .)
        start = (position // self.block_size) * self.block_size
        cos, sin = rope.at(start, q_new.device)
        return apply_rope(self.project_q(qp), cos, sin).squeeze(2)


class GateKeyCache:
    """Per-layer decode state: running pre-RoPE key summaries per block and projected gate keys.

    ``summary``: the :class:`RunningBlockSummary` (max, min, fp32 sum, count as the gate's k pools need);
    ``keys``: (B, H, n_b, h_g), the projected gate key of each block after block RoPE. :meth:`append` updates
    the current block from the new key only (O(d) statistics, one block's projection), never from the cache.
    """

    def __init__(self, gate: AttnGate, rope: BlockRope, k_pre: torch.Tensor):
        self.gate, self.rope = gate, rope
        self.bs = gate.block_size
        self.summary = block_summary(k_pre, self.bs, gate.k_pools)
        cos, sin = rope.blocks(self.summary.n_blocks, self.bs, k_pre.device)
        self.keys = apply_rope(gate.project_k(pools_from_summary(self.summary, gate.k_pools)), cos, sin)

    @property
    def n(self) -> int:
        """Keys summarised so far."""
        return self.summary.n

    @property
    def n_blocks(self) -> int:
        return self.summary.n_blocks

    def append(self, k_new: torch.Tensor) -> None:
        """Add the key of position ``self.n`` (k_new (B, H_kv, d), pre-RoPE)."""
        if self.n % self.bs == 0:                                        # a new block opens
            self.keys = torch.cat([self.keys, self.keys[:, :, -1:]], dim=2)   # placeholder, set below
        j = self.summary.append(k_new)
        cos, sin = self.rope.at(j * self.bs, k_new.device)
        pooled = pools_from_summary(self.summary, self.gate.k_pools, block=j)
        self.keys[:, :, -1:] = apply_rope(self.gate.project_k(pooled), cos, sin)

    def scores(self, q_gate: torch.Tensor) -> torch.Tensor:
        """q_gate (B, H, h_g) -> scores (B, H, n_b) over every block so far (all causal)."""
        return torch.einsum("bhd,bhnd->bhn", q_gate, self.keys) * self.gate.scale


class SeerAttnGates(nn.Module):
    """All gates of a model: ``layers.<i>`` for i in ``cfg.gated_layers``."""

    def __init__(self, cfg: SeerAttnConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleDict({str(i): AttnGate.from_config(cfg) for i in cfg.gated_layers})

    def __getitem__(self, layer_idx: int) -> AttnGate:
        return self.layers[str(layer_idx)]

    def __contains__(self, layer_idx: int) -> bool:
        return str(layer_idx) in self.layers

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
