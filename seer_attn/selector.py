"""SeerAttnSelector: the learned AttnGate as a :class:`sketch_walk.core.contract.BlockSelector`.

It plugs into the shared sparse-attention hook (:func:`sketch_walk.core.hook.enable_sparse_attention`)
exactly like Sketch&Walk, so both methods run the same kernel and decode path and differ only in
how blocks are picked.

Inputs. The gate reads q and k BEFORE RoPE; the hook hands selectors post-RoPE tensors, so
:meth:`SeerAttnSelector.attach` registers forward hooks on every gated layer's ``q_proj`` and
``k_proj`` that keep their outputs on the attention module for that call (attributes
``_seer_attn_q`` / ``_seer_attn_k``, dropped once used). Models that normalise q and k per head
before RoPE (``q_norm`` / ``k_norm``: Gemma-3, Qwen3, OLMo2) are hooked on those norms instead, so
the gate sees exactly what RoPE rotates (:func:`rope_input_modules`, :func:`heads_first`).
Only full-attention layers carry gates (``SeerAttnConfig.for_model``); sliding-window layers
(Gemma-3) keep their own windowed attention in the hook and are never gated.

Prefill masks (per query head, as the published gate makes them):
* ``threshold``: keep (I, J) when softmax_J(s)[I, J] > threshold;
* ``nz_ratio``: keep the top-k causal blocks of each row with k = max(1, int(t * n_b)),
  t = 1 - sqrt(1 - nz_ratio) (the reference's rule: a causal mask of that row budget has density
  ~nz_ratio);
then, because the shared kernel takes one kept-block list per KEY head (each K/V block read once
for the GQA group), the masks of a key head's query group are merged by UNION, and density is
counted on that union. This is the one deviation from the published per-query-head masks.
The diagonal block is kept in every row (``keep_diagonal``, default) or at least in rows that
would otherwise be empty (the reference leaves them empty and its kernel returns NaN there).
``last_block_dense`` makes the last two query-block rows dense, as the reference does.

Decode (default: sparse, the fair comparison; SeerAttention-R decides decode blocks this way):
the new token's pre-RoPE query goes through the gate's q path (rotated at its block's first
position) and is scored against the cached gate keys of every block (:class:`GateKeyCache`:
running max / min / sum / count of the current block, updated from the new pre-RoPE key only);
the same threshold / nz_ratio rule, union per key head and current-block rule apply.
``dense_decode=True`` is the published SeerAttention (prefill-only sparsity): the hook then
runs decode dense (``skip_decode``) and reports say "dense decode (published SeerAttention)".
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

from sketch_walk.core.block_sparse import mask_to_block_lists
from sketch_walk.core.contract import BlockLists, BlockSelector, check_decode_step
from sketch_walk.core.errors import UsageError
from sketch_walk.core.hook import attention_modules

from .config import SeerAttnConfig
from .gate import BlockRope, GateKeyCache, SeerAttnGates

Q_ATTR, K_ATTR = "_seer_attn_q", "_seer_attn_k"


def gated_attention(model, layers) -> Dict[int, Any]:
    """{layer index: attention module} of the gated layers (the hook's own lookup of attention modules)."""
    found = attention_modules(model)
    missing = [i for i in layers if i not in found]
    if missing:
        raise UsageError(f"{type(model).__name__}: no attention module for layers {missing} (modules with layer_idx "
                         f"and o_proj); SeerAttn supports Llama-family models")
    return {i: found[i] for i in layers}


def rope_input_modules(attn):
    """(q module, k module) whose outputs are the q and k that RoPE rotates: ``q_norm`` / ``k_norm``
    when the attention module has them (Gemma-3, Qwen3, OLMo2), else ``q_proj`` / ``k_proj`` (Llama)."""
    qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if isinstance(qn, torch.nn.Module) and isinstance(kn, torch.nn.Module):
        return qn, kn
    return attn.q_proj, attn.k_proj


def heads_first(x: torch.Tensor, heads: int, d: int, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A captured q or k in any layout the models use -> (B, heads, n, d).

    Layouts: (B, n, heads*d) (q_proj, OLMo2's q_norm), (B, n, heads, d) (Qwen3's q_norm) or
    (B, heads, n, d) (Gemma-3's q_norm, fed a transposed view). When n == heads the shape cannot tell
    the last two apart; the strides of ``like`` (the module's input, a view of the projection's
    (B, n, heads*d) output) can: the head axis is the one with the smaller stride.
    """
    if x.dim() == 3:
        b, n = x.shape[:2]
        return x.reshape(b, n, heads, d).transpose(1, 2)
    if x.dim() != 4 or x.shape[-1] != d or heads not in x.shape[1:3]:
        raise RuntimeError(f"SeerAttn: captured q/k of shape {tuple(x.shape)} does not hold {heads} heads of {d}")
    ref = like if like is not None and like.shape == x.shape else x
    seq_first = x.shape[2] == heads and (x.shape[1] != heads or ref.stride(2) < ref.stride(1))
    return x.transpose(1, 2) if seq_first else x


# ----------------------------------------------------------------------------------------------
# Masks (pure functions, shared by the selector, training evaluation and tests)
# ----------------------------------------------------------------------------------------------

def topk_per_row(nz_ratio: float, n_blocks: int) -> int:
    """Row budget of the nz_ratio mode: int((1 - sqrt(1 - nz_ratio)) * n_blocks), at least 1."""
    return max(1, int((1.0 - math.sqrt(max(0.0, 1.0 - nz_ratio))) * n_blocks))


def head_masks(scores: torch.Tensor, cfg: SeerAttnConfig, n_blocks: Optional[int] = None) -> torch.Tensor:
    """Per-query-head keep mask from gate scores (..., rows, n_kb) with -inf at non-causal entries.

    ``n_blocks`` is the sequence's block count for the nz_ratio budget (default n_kb).
    """
    causal = torch.isfinite(scores)
    if cfg.sparsity_method == "threshold":
        return (torch.softmax(scores, dim=-1) > cfg.threshold) & causal
    k = min(topk_per_row(cfg.nz_ratio, n_blocks or scores.shape[-1]), scores.shape[-1])
    idx = scores.topk(k, dim=-1).indices
    m = torch.zeros_like(causal).scatter_(-1, idx, True)
    return m & causal


def group_union(mask: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, H, ...) -> (B, H_kv, ...): union over each key head's query group (head h -> h // r)."""
    b, h = mask.shape[:2]
    return mask.view(b, num_kv_heads, h // num_kv_heads, *mask.shape[2:]).any(dim=2)


def prefill_mask(scores: torch.Tensor, cfg: SeerAttnConfig) -> torch.Tensor:
    """Gate scores (B, H, n_b, n_b) -> kept-block mask (B, H_kv, n_b, n_b) the kernel attends."""
    nb = scores.shape[-1]
    m = group_union(head_masks(scores, cfg), cfg.num_kv_heads)
    diag = torch.eye(nb, dtype=torch.bool, device=m.device)
    if cfg.keep_diagonal:
        m = m | diag
    else:
        m = m | (diag & ~m.any(-1, keepdim=True))
    if cfg.last_block_dense:
        m[..., -2:, :] = True
    return m & torch.ones(nb, nb, dtype=torch.bool, device=m.device).tril_()


def decode_mask(scores: torch.Tensor, cfg: SeerAttnConfig) -> torch.Tensor:
    """Decode gate scores (B, H, n_b) over all blocks so far -> kept mask (B, H_kv, n_b)."""
    m = group_union(head_masks(scores.unsqueeze(-2), cfg).squeeze(-2), cfg.num_kv_heads)
    if cfg.keep_diagonal:
        m[..., -1] = True
    else:
        m[..., -1] |= ~m.any(-1)
    return m


# ----------------------------------------------------------------------------------------------
# The selector
# ----------------------------------------------------------------------------------------------

class SeerAttnSelector(BlockSelector):
    name = "seer_attn"
    #: padded batches: the hook runs each sequence alone, with its own gate key caches and its row of the captured
    #: pre-RoPE q / k (:meth:`focus_row`)
    padded_batches = True
    row_state_attrs = ("_cache",)

    def __init__(self, cfg: SeerAttnConfig, gates: SeerAttnGates, checkpoint: Optional[str] = None):
        self.cfg = cfg
        self.gates = gates
        self.block_size = cfg.block_size
        self.checkpoint = checkpoint
        self.rope: Optional[BlockRope] = None
        self._handles: List[Any] = []
        self._attn_modules: Dict[int, Any] = {}
        self._cache: Dict[int, GateKeyCache] = {}
        self._diag_t: Optional[torch.Tensor] = None
        self._free_cfg = cfg.with_knobs(keep_diagonal=False, last_block_dense=False)
        self._row: Optional[int] = None          # padded batches: the batch row selected for (focus_row)
        self._rows = 1

    # -- set-up --------------------------------------------------------------------------------
    def attach(self, model) -> None:
        self.detach()
        self.cfg.check_model(model)
        param = next(model.parameters())
        self.gates.to(device=param.device, dtype=torch.float32).eval()
        for p in self.gates.parameters():
            p.requires_grad_(False)
        self.rope = BlockRope.from_model(model, self.cfg.gate_hidden)
        c = self.cfg
        for i, attn in gated_attention(model, c.gated_layers).items():
            self._attn_modules[i] = attn
            q_mod, k_mod = rope_input_modules(attn)
            self._handles.append(q_mod.register_forward_hook(_keep_output(attn, Q_ATTR, c.num_q_heads, c.head_dim)))
            self._handles.append(k_mod.register_forward_hook(_keep_output(attn, K_ATTR, c.num_kv_heads, c.head_dim)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for attn in self._attn_modules.values():
            for a in (Q_ATTR, K_ATTR):
                if hasattr(attn, a):
                    delattr(attn, a)
        self._attn_modules = {}
        self._cache = {}

    def reset(self, batch_size: int) -> None:
        self._cache = {}

    def is_sparse_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.gates

    def focus_row(self, row: Optional[int], rows: int) -> None:
        self._row, self._rows = row, rows

    # -- captured inputs -----------------------------------------------------------------------
    def _pre_rope(self, layer_idx: int, module, q_len: int):
        attn = self._attn_modules.get(layer_idx, module)
        q = getattr(attn, Q_ATTR, None)
        k = getattr(attn, K_ATTR, None)
        if q is None or k is None:
            raise RuntimeError(f"SeerAttn layer {layer_idx}: no pre-RoPE q/k captured from q_proj/k_proj; "
                               f"was the selector attached to this model (enable_seer_attn)?")
        if self._row is None or self._row == self._rows - 1:       # the batch's last use of them
            for a in (Q_ATTR, K_ATTR):
                delattr(attn, a)
        if self._row is not None:            # a padded batch: this row's own tokens, the last q_len (left padding)
            q, k = (x[self._row:self._row + 1, :, x.shape[2] - q_len:] for x in (q, k))
        n = q.shape[2]                                   # (B, H, n, d), see _keep_output
        if n != q_len:
            raise RuntimeError(f"SeerAttn layer {layer_idx}: captured {n} pre-RoPE queries, attention got {q_len}")
        return q, k

    # -- prefill -------------------------------------------------------------------------------
    @torch.no_grad()
    def select_prefill(self, layer_idx: int, module, query: torch.Tensor, key: torch.Tensor) -> BlockLists:
        n = query.shape[2]
        if key.shape[2] != n:
            raise UsageError(f"SeerAttn prefill expects the whole prompt in one call (queries 0..n-1); got "
                             f"{n} queries against {key.shape[2]} keys (chunked prefill is not supported)")
        q, k = self._pre_rope(layer_idx, module, n)
        gate = self.gates[layer_idx]
        scores = gate(q, k, self.rope)                                   # (B, H, n_b, n_b) fp32
        mask = prefill_mask(scores, self.cfg)
        self._count_diag(scores, mask)
        if not self.cfg.dense_decode:
            self._cache[layer_idx] = GateKeyCache(gate, self.rope, k)
        return mask_to_block_lists(mask)

    def _count_diag(self, scores: torch.Tensor, mask: torch.Tensor) -> None:
        """Accumulate (on the device, no host sync) how often the gate itself left out the diagonal."""
        raw = group_union(head_masks(scores, self._free_cfg), self.cfg.num_kv_heads)
        diag = raw.diagonal(dim1=-2, dim2=-1)
        t = torch.stack([torch.tensor(diag.numel(), device=diag.device), (~diag).sum(), (~raw.any(-1)).sum()])
        self._diag_t = t if self._diag_t is None else self._diag_t + t

    # -- decode --------------------------------------------------------------------------------
    @torch.no_grad()
    def select_decode(self, layer_idx: int, module, query: torch.Tensor, key_cache: torch.Tensor) -> BlockLists:
        n_keys = key_cache.shape[2]
        q, k = self._pre_rope(layer_idx, module, query.shape[2])
        if self.cfg.dense_decode:   # the hook normally skips decode selection then; keep everything
            nb = (n_keys + self.block_size - 1) // self.block_size
            mask = torch.ones(query.shape[0], self.cfg.num_kv_heads, nb, dtype=torch.bool, device=query.device)
            return mask_to_block_lists(mask)
        cache = self._cache.get(layer_idx)
        check_decode_step("SeerAttn", layer_idx, None if cache is None else cache.n, n_keys, "gate key cache",
                          "reset() was called or the prompt bypassed the hook")
        cache.append(k[:, :, -1])
        q_gate = self.gates[layer_idx].query_decode(q[:, :, -1], n_keys - 1, self.rope)
        scores = cache.scores(q_gate)                                   # (B, H, n_b)
        return mask_to_block_lists(decode_mask(scores, self.cfg))

    # -- static-cache decode (CUDA graphs: sketch_walk.core.static_decode) -----------------------------
    def static_decode_support(self) -> Optional[str]:
        return None

    def prepare_static_decode(self, capacity_tokens: int) -> None:
        """Every gate key cache grown to the capacity, the blocks not yet opened empty (count 0, sum 0, max -inf,
        min +inf): folding a key into an empty block then equals opening it."""
        cap = -(-capacity_tokens // self.block_size)
        for cache in self._cache.values():
            cache.summary.empty_from(cap)
            if cache.keys.shape[2] < cap:
                pad = cache.keys.new_zeros(*cache.keys.shape[:2], cap - cache.keys.shape[2], cache.keys.shape[3])
                cache.keys = torch.cat([cache.keys, pad], dim=2)

    @torch.no_grad()
    def select_decode_static(self, layer_idx: int, module, query: torch.Tensor, k_new: torch.Tensor,
                             n_blocks: int, key_cache: Optional[torch.Tensor] = None,
                             n_keys: Optional[torch.Tensor] = None) -> BlockLists:
        """:meth:`select_decode` on device-side state: the new pre-RoPE key folded into block n_blocks - 1 in place, that
        block's gate key re-projected, the scores over the first n_blocks gate keys, and lists of width n_blocks (every
        block a row may keep; -1 padded) instead of the widest row's (a host sync)."""
        from .gate import apply_rope, pools_from_summary
        q, k = self._pre_rope(layer_idx, module, query.shape[2])
        cache = self._cache[layer_idx]
        gate = self.gates[layer_idx]
        summ = cache.summary
        j = n_blocks - 1
        summ.fold(k[:, :, -1], j)
        cos, sin = self.rope.at(j * self.block_size, query.device)
        pooled = pools_from_summary(summ, gate.k_pools, block=j)
        cache.keys[:, :, j:j + 1] = apply_rope(gate.project_k(pooled), cos, sin)
        q_gate = gate.query_decode(q[:, :, -1], j * self.block_size, self.rope)
        scores = torch.einsum("bhd,bhnd->bhn", q_gate, cache.keys[:, :, :n_blocks]) * gate.scale
        mask = decode_mask(scores, self.cfg)                           # (B, H_kv, n_blocks)
        ar = torch.arange(n_blocks, device=mask.device)
        order = torch.where(mask, ar, ar + n_blocks).sort(dim=-1).values
        idx = torch.where(order < n_blocks, order, torch.full_like(order, -1)).to(torch.int32)
        return idx.contiguous(), mask.sum(-1, dtype=torch.int32)

    def finish_static_decode(self, n_keys: int) -> None:
        for cache in self._cache.values():
            cache.summary.n = n_keys

    # -- reports -------------------------------------------------------------------------------
    def describe(self) -> Dict[str, Any]:
        c = self.cfg
        return {
            "selector": self.name,
            "method": "seer_attn",
            "checkpoint": self.checkpoint,
            "base_model": c.base_model,
            "block_size": c.block_size,
            "gate_type": c.gate_type,
            "gate_hidden": c.gate_hidden,
            "gated_layers": len(c.gated_layers),
            "sparsity_method": c.sparsity_method,
            "threshold": c.threshold if c.sparsity_method == "threshold" else None,
            "nz_ratio": c.nz_ratio if c.sparsity_method == "nz_ratio" else None,
            "last_block_dense": c.last_block_dense,
            "keep_diagonal": c.keep_diagonal,
            "mask_merge": "union over each key head's query group",
            "decode": ("dense decode (published SeerAttention)" if c.dense_decode
                       else "sparse decode (gate scores each new query against cached block keys)"),
            "dense_decode": c.dense_decode,
        }

    def diagnostics(self) -> Dict[str, Any]:
        """Since attach: prefill rows (x key heads), rows whose diagonal the gate did not choose itself
        (kept anyway), rows where it chose nothing (the reference's NaN rows)."""
        vals = [0, 0, 0] if self._diag_t is None else [int(x) for x in self._diag_t.tolist()]
        return dict(zip(("rows", "diag_not_chosen", "empty_rows"), vals))


def _keep_output(attn, attr, heads: int, d: int):
    def hook(_mod, inp, out):
        setattr(attn, attr, heads_first(out, heads, d, like=inp[0] if inp else None))
    return hook
