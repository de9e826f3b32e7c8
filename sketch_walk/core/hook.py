"""The shared sparse-attention hook: one attention function registered with transformers.

:func:`enable_sparse_attention` registers ``sketch_walk_block_sparse`` with transformers'
``AttentionInterface`` (and the SDPA mask builder under the same name, so padding masks still
reach us), switches the model to it (``model.set_attn_implementation``; on versions without it,
``config._attn_implementation``) and gives every attention module a reference to the returned
:class:`SparseAttentionSession`. No model code is copied: any Llama-family model whose attention
calls the interface (Llama, SmolLM2, Qwen2, Mistral, Gemma-3, ...) works.

What runs, per attention call (query (B, H, q_len, d), key / value (B, H_kv, k_len, d) after RoPE):
* a layer that is not sparse (``selector.is_sparse_layer`` False, e.g. the first ``dense_layers``)
  -> transformers' SDPA attention (causal, GQA), exactly what ``attn_implementation="sdpa"`` runs;
* a sliding-window layer (``module.sliding_window`` or a ``sliding_window`` argument set, as in
  Gemma-3) -> its own window, exactly: in prefill on the Triton backend through the block-sparse kernel
  with :func:`sketch_walk.core.block_sparse.window_block_lists` and a token-level window mask, otherwise (CPU,
  decode, a padded mask) the same SDPA call with the model's own sliding mask; it takes no part in
  selection or the walk, and its density counts the keys inside its window;
* a sparse layer, prefill (q_len == k_len) -> ``selector.select_prefill`` then
  :func:`sketch_walk.core.block_sparse.block_sparse_attention` (Triton on CUDA, torch's CPU flash attention on
  the gathered kept blocks on the CPU);
* a sparse layer, decode (q_len == 1 < k_len) -> dense SDPA when ``skip_decode``, else
  ``selector.select_decode`` then :func:`sketch_walk.core.block_sparse.block_sparse_decode`.
Refused with a :class:`UsageError`: attention masks that are neither plain causal nor a left-padded causal batch
(right padding, custom masks), and chunked prefill (1 < q_len < k_len) in sparse layers, logit soft-capping in
sparse layers. Batches of equal-length prompts run as one (every list is per sequence).

Padded batches. Prompts of different lengths arrive left-padded to the longest, T tokens (as
eval/ruler/pred/model_wrappers.py and ``generate`` pad them), with a mask that hides the padding and position ids
counted from each sequence's first real token, so every real token has its batch-1 position. No single block grid
fits every sequence of such a tensor: sequence i's tokens start at p_i = T - n_i, a multiple of the block size only
when all lengths agree modulo it. So the hook never selects on the padded grid. The model's forward stays one pass
over the batch (projections, MLPs, dense and sliding-window layers under the padding mask, exactly as a dense batch
runs); in a sparse layer the session takes each sequence's own tokens, views of q, k, v from p_i on (p_i read once
per prompt from the mask's diagonal), and runs the selector and the block-sparse kernel on them exactly as at batch
1: its own block grid, its own lists, its own selector state (:meth:`BlockSelector.row_state`, swapped in for it);
decode takes the sequence's cache from p_i on. Padded queries get zeros; padded keys and queries enter no block
summary, score, walk, kept list or attended set. Density is counted per sequence on its real tokens
(:meth:`SparseAttentionSession.report` ``row``), equal to its batch-1 report. The price: one selection and one kernel
call per sequence and sparse layer (everything else batched). Selectors without ``padded_batches`` are refused.

The selector's per-sequence state is reset automatically at each new prompt (a prefill call of the
first attention layer). Density (docs/ALGORITHM.md "Density, as reported") is measured from the lists the
kernel got: attended (query, key) pairs / causal pairs, per layer, dense layers counting 1.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional

import torch

from .block_sparse import (BACKENDS, attended_keys_decode, attended_pairs_prefill, block_sparse_attention,
                           block_sparse_decode, causal_pairs, resolve_backend, window_block_lists)
from .errors import UsageError
from .contract import BlockSelector

ATTN_NAME = "sketch_walk_block_sparse"
SESSION_ATTR = "_sparse_attention_session"
STATIC_STEP_ATTR = "_sketch_walk_static_step"      # sketch_walk.core.static_decode.STATIC_ATTR
_registered = False


def _sdpa_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward


def register_attention() -> str:
    """Register the attention function (and the SDPA mask builder) under :data:`ATTN_NAME`; idempotent."""
    global _registered
    if _registered:
        return ATTN_NAME
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_NAME, sparse_attention_forward)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    except ImportError:      # older transformers build masks from _attn_implementation != flash: nothing to do
        pass
    _registered = True
    return ATTN_NAME


def attention_modules(model) -> Dict[int, torch.nn.Module]:
    """{layer_idx: attention module} of a transformers model (modules with ``layer_idx`` and ``o_proj``)."""
    found: Dict[int, torch.nn.Module] = {}
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and hasattr(m, "o_proj") and hasattr(m, "num_key_value_groups"):
            found.setdefault(idx, m)
    return dict(sorted(found.items()))


def _window_pairs(n: int, w: int) -> float:
    """Causal (query, key) pairs within a sliding window of w keys (keys t-w+1..t) over n queries."""
    if n <= w:
        return causal_pairs(n)
    return w * (w + 1) / 2 + (n - w) * w


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """A bool or additive float attention mask -> bool (True: attended)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _is_plain_causal(mask: torch.Tensor, q_len: int, k_len: int, window: Optional[int] = None,
                     rows_per_chunk: int = 2048, starts: Optional[List[int]] = None) -> bool:
    """Whether a 4D attention mask (bool, or additive float) allows exactly the bottom-right causal pattern
    (with ``window``: only the keys t-w+1..t of query t, a sliding-window layer's pattern). ``starts``: a left-padded
    batch, sequence b's tokens from position starts[b] on: its real queries must see exactly the causal keys from
    starts[b] on (its padded queries are not looked at). Compared in chunks of query rows, so the check's temporaries
    stay at rows_per_chunk x k_len (a 32K-token prompt's whole pattern would be 1 GiB of bools)."""
    mask = mask[..., -q_len:, -k_len:]
    kpos = torch.arange(k_len, device=mask.device)
    first = None if starts is None else torch.tensor(starts, device=mask.device).view(-1, 1, 1, 1)
    for r0 in range(0, q_len, rows_per_chunk):
        part = mask[..., r0:r0 + rows_per_chunk, :]
        allowed = _allowed(part)
        qpos = torch.arange(k_len - q_len + r0, k_len - q_len + r0 + part.shape[-2], device=mask.device).unsqueeze(-1)
        pattern = kpos <= qpos
        if window:
            pattern &= kpos > qpos - window
        if first is not None:
            if allowed.dim() != 4 or allowed.shape[0] not in (1, first.shape[0]):
                return False
            same = (allowed == (pattern & (kpos >= first))) | (qpos < first)      # padded query rows: anything
            if not bool(same.all()):
                return False
        elif not torch.equal(allowed, pattern.expand_as(allowed)):
            return False
    return True


def _left_pads(mask: Optional[torch.Tensor], batch: int, n: int) -> Optional[List[int]]:
    """A prompt's mask (queries = keys = n) -> the padding before each sequence's first real token, or None when no
    sequence is padded. A real query always sees itself and a padded one nothing, so the mask's diagonal marks the
    real tokens, for full-attention and sliding-window masks alike; whether they are really one run at the end of each
    row (left padding) is checked against the whole mask at the sparse layers (:func:`_is_plain_causal`)."""
    if mask is None or mask.dim() != 4:
        return None
    real = _allowed(mask[:, 0, -n:, -n:].diagonal(dim1=-2, dim2=-1))          # (B or 1, n)
    pads = (~real).int().cumprod(dim=-1).sum(-1).expand(batch).tolist()    # leading padded positions
    return pads if any(pads) else None


class SparseAttentionSession:
    """A model running the shared sparse attention with one :class:`BlockSelector`.

    ``reset()`` forgets the selector's state and the density counters (call it before each sample);
    ``report()`` returns the measured density; ``describe()`` the knobs; ``disable()`` restores the
    model's previous attention implementation.
    """

    def __init__(self, model, selector: BlockSelector, skip_decode: bool = False, backend: Optional[str] = None):
        self.model = model
        self.selector = selector
        self.skip_decode = bool(skip_decode)
        self.backend = backend
        self.modules = attention_modules(model)
        if not self.modules:
            raise UsageError(f"{type(model).__name__}: no attention modules with layer_idx found; the sparse "
                             f"attention hook supports transformers decoder models (Llama, Qwen2, Mistral, Gemma-3...)")
        self.layer_ids: List[int] = list(self.modules)
        self.first_layer = self.layer_ids[0]
        self.previous_implementation = getattr(model.config, "_attn_implementation", None)
        self._seq_len = 0
        self._per_forward: Dict[tuple, Any] = {}
        self.reset()

    @property
    def padded_batches(self) -> bool:
        """Whether left-padded batches run (the selector's :attr:`BlockSelector.padded_batches`)."""
        return bool(self.selector.padded_batches)

    # -- bookkeeping ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the selector's per-sequence state and every density counter."""
        self.selector.reset(0)
        self._seq_len = 0
        self._pads: Optional[List[int]] = None    # a left-padded batch: each sequence's padding (None: no padding)
        self._row_states: List[Dict[str, Any]] = []
        # layer -> [attended, causal], each (B,) float64 per sequence of the batch (attended on its device: no sync)
        self._pre: Dict[int, List[torch.Tensor]] = {}
        self._dec: Dict[int, List[torch.Tensor]] = {}
        self.prefill_tokens = 0
        self.decode_steps = 0
        self.prompts = 0

    @staticmethod
    def _add(table: Dict[int, List[torch.Tensor]], layer: int, attended, causal: List[float]) -> None:
        """Add one call's pairs, per sequence of the batch: ``attended`` a (B,) float64 tensor (left on its device) or B
        floats, ``causal`` B floats. A batch of another size since the last reset adds row by row."""
        if not torch.is_tensor(attended):
            attended = torch.tensor(attended, dtype=torch.float64)
        causal = torch.tensor(causal, dtype=torch.float64)
        row = table.get(layer)
        if row is None:
            table[layer] = [attended, causal]
            return
        for k, new in enumerate((attended, causal)):
            old = row[k]
            if old.shape != new.shape:
                n = max(old.shape[0], new.shape[0])
                old = torch.nn.functional.pad(old, (0, n - old.shape[0]))
                new = torch.nn.functional.pad(new.to(old.device), (0, n - new.shape[0]))
            row[k] = old + new

    @staticmethod
    def _ratio(att, cau) -> Optional[float]:
        return None if not cau else float(att) / cau

    def report(self, row: Optional[int] = None) -> Dict[str, Any]:
        """Measured density since the last reset: attended (query, key) pairs / causal pairs; ``row``: of that sequence
        of the batch alone (equal to its batch-1 report), else of every sequence together.

        prefill: over every layer of every prompt; decode: over every layer of every decode step;
        overall: both together; density_per_layer (prefill) and density_per_layer_decode: one value per
        model layer (None where nothing ran). Dense layers and dense (sliding-window: in-window) keys count.
        layer_types: the hook's kind of each layer ("sparse", "dense" or "sliding"); density_by_layer_type:
        {kind: {prefill, decode, overall, layers}} over the layers of that kind (a sliding-window layer's
        density is its window's pairs / causal pairs, e.g. Gemma-3's 512-token window at 4K: 0.23).
        """
        def cell(v):
            if row is None:
                return float(v[0].sum()), float(v[1].sum())
            return tuple(float(t[row]) if row < t.shape[0] else 0.0 for t in v)

        pre = {l: cell(v) for l, v in self._pre.items()}
        dec = {l: cell(v) for l, v in self._dec.items()}

        def totals(table, layers=None):
            rows = [v for l, v in table.items() if layers is None or l in layers]
            att = sum(v[0] for v in rows)
            cau = sum(v[1] for v in rows)
            return att, cau

        pa, pc = totals(pre)
        da, dc = totals(dec)
        kinds = {l: self._layer_kind(l) for l in self.layer_ids}
        by_kind = {}
        for kind in ("sparse", "dense", "sliding"):
            layers = {l for l, k in kinds.items() if k == kind}
            if not layers:
                continue
            kpa, kpc = totals(pre, layers)
            kda, kdc = totals(dec, layers)
            by_kind[kind] = {"prefill": self._ratio(kpa, kpc), "decode": self._ratio(kda, kdc),
                             "overall": self._ratio(kpa + kda, kpc + kdc), "layers": sorted(layers)}
        return {
            "prefill": self._ratio(pa, pc),
            "decode": self._ratio(da, dc),
            "overall": self._ratio(pa + da, pc + dc),
            "density_per_layer": [self._ratio(*pre[l]) if l in pre else None for l in self.layer_ids],
            "density_per_layer_decode": [self._ratio(*dec[l]) if l in dec else None for l in self.layer_ids],
            "prompts": self.prompts,
            "prefill_tokens": self.prefill_tokens,
            "decode_steps": self.decode_steps,
            "sparse_layers": [l for l in self.layer_ids if kinds[l] == "sparse"],
            "layer_types": [kinds[l] for l in self.layer_ids],
            "density_by_layer_type": by_kind,
        }

    def add_static_decode_counts(self, layer: int, attended, causal: float) -> None:
        """A static-cache decode's pairs of one layer (batch 1; :class:`sketch_walk.core.static_decode.StaticDecoder`
        sums them on the device and adds them once the sample's decode ends)."""
        if not torch.is_tensor(attended):
            attended = torch.tensor(float(attended), dtype=torch.float64)
        if hasattr(self, "_pads"):      # per-sequence tables: (B,) attended, B causal floats
            self._add(self._dec, layer, attended.reshape(1).to(torch.float64), [float(causal)])
        else:
            self._add(self._dec, layer, attended, float(causal))

    def describe(self) -> Dict[str, Any]:
        """The selector's knobs plus the hook's (skip_decode, attention backend, implementation name)."""
        out = dict(self.selector.describe())
        out["skip_decode"] = self.skip_decode
        dev = next(self.model.parameters()).device
        out["attn_backend"] = self.backend or "auto"
        out["attn_backend_resolved"] = resolve_backend(dev, self.backend)
        out["attn_implementation"] = ATTN_NAME
        out["sliding_window_layers"] = [l for l in self.layer_ids if self._layer_kind(l) == "sliding"]
        return out

    def disable(self) -> None:
        """Restore the model's previous attention implementation and detach the selector."""
        prev = self.previous_implementation or "sdpa"
        set_attention_implementation(self.model, prev)
        for m in self.modules.values():
            if getattr(m, SESSION_ATTR, None) is self:
                delattr(m, SESSION_ATTR)
        if getattr(self.model, SESSION_ATTR, None) is self:
            delattr(self.model, SESSION_ATTR)
        self.selector.detach()

    # -- classification -----------------------------------------------------------------------------
    def _sliding(self, module, kwargs=None) -> Optional[int]:
        w = getattr(module, "sliding_window", None)
        if w is None and kwargs:
            w = kwargs.get("sliding_window")
        return int(w) if w else None

    def _layer_kind(self, layer: int) -> str:
        m = self.modules[layer]
        if self._sliding(m):
            return "sliding"
        return "sparse" if self.selector.is_sparse_layer(layer) else "dense"

    # -- the attention call ------------------------------------------------------------------------
    def forward(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = module.layer_idx
        b, h, q_len, d = query.shape
        hkv, k_len = key.shape[1], key.shape[2]
        if layer == self.first_layer:
            # masks and window lists are the same for every layer of one forward pass: computed once
            self._per_forward = {}
            if q_len == k_len:                             # a new prompt
                self._pads = _left_pads(attention_mask, b, q_len)
                self._row_states = []
                if self._pads is not None and self.selector.padded_batches:
                    for _ in range(b):                     # one fresh state per sequence
                        self.selector.reset(1)
                        self._row_states.append(self.selector.row_state())
                self.selector.reset(b)
                self._seq_len = q_len
                self.prompts += 1
                self.prefill_tokens += q_len * b - sum(self._pads or [])
            else:
                self._seq_len += q_len
                if q_len == 1:
                    self.decode_steps += 1
        window = self._sliding(module, kwargs)
        sparse = window is None and self.selector.is_sparse_layer(layer)
        decode = q_len == 1 and k_len > 1
        dense_decode = decode and self.skip_decode
        if not sparse or dense_decode:
            self._count_dense(layer, b, hkv, q_len, k_len, window)
            if window and q_len == k_len and self._window_kernel(query, attention_mask, q_len, window, kwargs):
                # the layer's own window through the block-sparse kernel: the same attention, without the
                # L x L work that SDPA does under a materialised sliding mask
                bs = self.selector.block_size
                idx, cnt = self._once(("window_lists", q_len, bs, window, b, hkv),
                                      lambda: window_block_lists(q_len, bs, window, b, hkv, device=query.device))
                out, _ = block_sparse_attention(query, key, value, idx, cnt, bs, sm_scale=scaling,
                                                backend=self.backend, window=window)
                return out.transpose(1, 2).contiguous(), None
            out, _ = _sdpa_forward()(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
            return out, None

        if q_len != k_len and not decode:
            raise UsageError(f"sparse attention (layer {layer}): {q_len} new queries against {k_len} keys: chunked "
                             f"prefill or a reused prompt cache is not supported; pass the whole prompt at once")
        if kwargs.get("softcap") is not None:
            raise UsageError(f"sparse attention (layer {layer}): attention logit soft-capping is not supported")
        if attention_mask is not None and not self._mask_is_causal(attention_mask, q_len, k_len, starts=self._pads):
            raise UsageError("sparse attention runs plain causal masks and left-padded batches only, not right padding "
                             "or a custom attention mask: pad prompts on the left (position ids from the first real "
                             "token), or run them one at a time")
        if self._pads is not None:
            return self._rows_forward(layer, module, query, key, value, scaling, decode)
        bs = self.selector.block_size
        if not decode:
            idx, cnt = self.selector.select_prefill(layer, module, query, key)
            out, _ = block_sparse_attention(query, key, value, idx, cnt, bs, sm_scale=scaling, backend=self.backend)
            self._add(self._pre, layer, attended_pairs_prefill(idx, cnt, q_len, bs).sum(-1),
                      [causal_pairs(q_len) * hkv] * b)
        else:
            idx, cnt = self.selector.select_decode(layer, module, query, key)
            out, _ = block_sparse_decode(query, key, value, idx, cnt, bs, sm_scale=scaling, backend=self.backend)
            self._add(self._dec, layer, attended_keys_decode(idx, cnt, k_len, bs).sum(-1), [float(k_len * hkv)] * b)
        return out.transpose(1, 2).contiguous(), None

    def _rows_forward(self, layer: int, module, query, key, value, scaling, decode: bool):
        """A sparse layer of a left-padded batch (module docstring, "Padded batches"): each sequence alone, on its own
        tokens (views from its first real position), with its own selector state, exactly as at batch 1. Returns the
        attention output (B, q_len, H, d); padded queries get zeros."""
        sel = self.selector
        b, h, q_len, d = query.shape
        hkv, k_len = key.shape[1], key.shape[2]
        if not sel.padded_batches:
            raise UsageError(f"selector '{sel.name}' does not run padded batches (BlockSelector.padded_batches): run "
                             f"prompts one at a time, or batch prompts of equal length")
        if len(self._pads) != b or len(self._row_states) != b:
            raise RuntimeError(f"sparse attention (layer {layer}): a batch of {b} after a prompt batch of "
                               f"{len(self._pads)}; a new prompt must go through the prefill first")
        bs = sel.block_size
        out = query.new_zeros(b, q_len, h, d)
        attended = []
        try:
            for i, pad in enumerate(self._pads):
                sel.set_row_state(self._row_states[i])
                sel.focus_row(i, b)
                k_i, v_i = key[i:i + 1, :, pad:], value[i:i + 1, :, pad:]
                n_i = k_len - pad
                if decode:
                    q_i = query[i:i + 1]
                    idx, cnt = sel.select_decode(layer, module, q_i, k_i)
                    o, _ = block_sparse_decode(q_i, k_i, v_i, idx, cnt, bs, sm_scale=scaling, backend=self.backend)
                    attended.append(attended_keys_decode(idx, cnt, n_i, bs).sum(-1))
                    out[i] = o[0].transpose(0, 1)
                else:
                    q_i = query[i:i + 1, :, pad:]
                    idx, cnt = sel.select_prefill(layer, module, q_i, k_i)
                    o, _ = block_sparse_attention(q_i, k_i, v_i, idx, cnt, bs, sm_scale=scaling, backend=self.backend)
                    attended.append(attended_pairs_prefill(idx, cnt, n_i, bs).sum(-1))
                    out[i, pad:] = o[0].transpose(0, 1)
                self._row_states[i] = sel.row_state()
        finally:
            sel.focus_row(None, b)
        if decode:
            self._add(self._dec, layer, torch.cat(attended), [float((k_len - p) * hkv) for p in self._pads])
        else:
            self._add(self._pre, layer, torch.cat(attended), [causal_pairs(k_len - p) * hkv for p in self._pads])
        return out, None

    def _window_kernel(self, query, attention_mask, q_len: int, window: int, kwargs) -> bool:
        """Whether a sliding-window layer's prefill goes through the Triton block-sparse kernel: on the Triton
        backend only (the CPU keeps SDPA), without soft-capping, and with no mask beyond the window's own.
        SKETCH_WALK_WINDOW_KERNEL=0 keeps SDPA for these layers everywhere."""
        if os.environ.get("SKETCH_WALK_WINDOW_KERNEL", "1") == "0":
            return False
        if resolve_backend(query.device, self.backend) != "triton" or kwargs.get("softcap") is not None:
            return False
        return attention_mask is None or self._mask_is_causal(attention_mask, q_len, q_len, window)

    def _once(self, key: tuple, make):
        """``make()`` once per forward pass and key (every layer of a pass sees the same masks and shapes)."""
        if key not in self._per_forward:
            self._per_forward[key] = make()
        return self._per_forward[key]

    def _mask_is_causal(self, mask: torch.Tensor, q_len: int, k_len: int, window: Optional[int] = None,
                        starts: Optional[List[int]] = None) -> bool:
        """:func:`_is_plain_causal` of this pass's mask, checked once per pass (a 32K prompt's mask is 1 GiB)."""
        key = ("causal", mask.data_ptr(), tuple(mask.shape), mask.dtype, q_len, k_len, window,
               None if starts is None else tuple(starts))
        return self._once(key, lambda: _is_plain_causal(mask, q_len, k_len, window, starts=starts))

    def _count_dense(self, layer: int, batch: int, units: int, q_len: int, k_len: int, window: Optional[int]) -> None:
        """Pairs of a layer that attends densely (or its window), per sequence of the batch (``units`` key heads
        each), on each sequence's real tokens (a padded batch's padding left out)."""
        att_rows, causal_rows = [], []
        for pad in (self._pads or [0] * batch):
            if q_len == k_len:
                n = q_len - pad
                causal = causal_pairs(n)
                att = _window_pairs(n, window) if window else causal
            else:   # decode (or chunked prefill in a dense layer): q_len queries at the end of the sequence
                total = max(self._seq_len, k_len) - pad
                causal = sum(total - q_len + 1 + t for t in range(q_len))
                att = sum(min(total - q_len + 1 + t, window) for t in range(q_len)) if window else causal
            att_rows.append(float(att * units))
            causal_rows.append(float(causal * units))
        table = self._pre if q_len == k_len or q_len > 1 else self._dec
        self._add(table, layer, att_rows, causal_rows)


def sparse_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function registered as :data:`ATTN_NAME`: dispatches to the module's session."""
    session = getattr(module, SESSION_ATTR, None)
    if session is None:
        raise UsageError(f"attn_implementation '{ATTN_NAME}' needs a session: call "
                         f"sketch_walk.enable_sketch_walk(model, config) or enable_sparse_attention(model, selector)")
    if scaling is None:
        scaling = getattr(module, "scaling", None) or 1.0 / math.sqrt(query.shape[-1])
    step = getattr(module, STATIC_STEP_ATTR, None)
    if step is not None:        # a decode step on a static cache (CUDA-graph decode): sketch_walk.core.static_decode
        return step.attention(module, query, key, value, scaling, kwargs)
    return session.forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def set_attention_implementation(model, name: str) -> None:
    """Point ``model`` (and every sub-config, for models whose sub-modules keep their own) at the attention
    implementation ``name`` of transformers' registry ("sdpa" gives transformers' own back)."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter(name)
        except (ValueError, KeyError, AttributeError):
            pass
    if getattr(model.config, "_attn_implementation", None) != name:
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                try:
                    cfg._attn_implementation = name
                except AttributeError:
                    cfg._attn_implementation_internal = name


def enable_sparse_attention(model, selector: BlockSelector, *, skip_decode: bool = False,
                            backend: Optional[str] = None) -> SparseAttentionSession:
    """Run ``model``'s attention through the shared block-sparse hook with ``selector``; returns the session.

    ``skip_decode``: decode steps run dense SDPA (prefill stays sparse). ``backend``: None / "auto"
    (Triton on CUDA, PyTorch elsewhere), "triton", "torch" or "reference" (the float references of
    :mod:`.block_sparse` instead of the CPU flash-attention path: tests). A session already enabled on the model
    is disabled first. The model is switched to attn_implementation :data:`ATTN_NAME`.
    """
    if not isinstance(selector, BlockSelector):
        raise UsageError(f"selector must be a sketch_walk.core.contract.BlockSelector, got {type(selector).__name__}")
    if backend is not None and backend not in BACKENDS:
        raise UsageError(f"--attn_backend {backend}: choose one of {', '.join(BACKENDS)}")
    old = getattr(model, SESSION_ATTR, None)
    if old is not None:
        old.disable()
    register_attention()
    session = SparseAttentionSession(model, selector, skip_decode=skip_decode, backend=backend)
    if hasattr(selector, "backend"):        # the selection follows the same backend as the kernels
        selector.backend = None if backend == "auto" else backend
    selector.attach(model)
    for m in session.modules.values():
        setattr(m, SESSION_ATTR, session)
    setattr(model, SESSION_ATTR, session)
    set_attention_implementation(model, ATTN_NAME)
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        raise UsageError(f"could not switch {type(model).__name__} to attn_implementation '{ATTN_NAME}'")
    return session
