"""Decode on a static KV cache, replayed as CUDA graphs on the GPU (the generation loop's ``graph_decode``).

Why: an eager decode step is host-bound (docs/PERFORMANCE.md section 6: SketchWalk's step at 128K is ~40 us of GPU
work as a graph and ~290-500 us eagerly; SDPA's is ~130 us either way). A replayed graph runs no Python, so every
quantity that changes between the steps it serves must live on the device:

* the cache (:func:`make_static_cache`): after the prefill (which fills it as transformers' ``DynamicCache`` does)
  every layer's keys and values move into zero-initialised buffers of ``capacity`` tokens (prompt + new tokens,
  rounded up to whole blocks); a decode step writes its key / value at a device index (``index_copy_``) and hands
  attention the buffer up to the end of the current block;
* a shape bucket per block: steps whose new token falls in block nb - 1 see keys [0, nb * B) (B the block size),
  n_b = nb blocks, and the same kept-list widths, so one graph serves all of them; the true length is a device
  tensor. A bucket's first step runs eagerly (it compiles / autotunes what the graph will launch), its second is
  captured and replayed, the rest replay: 64 new tokens cross at most one block boundary, so at most two captures;
* attention (:meth:`StaticStep.attention`, every layer: the sparse hook's ``sparse_attention_forward`` and, for
  dense models, :data:`STATIC_SDPA_NAME` hand it the call): full-attention layers that run dense go through the
  block-sparse decode kernel with every block kept and the device length on the GPU (SDPA under a mask would copy
  K / V once per query head of a group); sliding-window layers, padded batches and the CPU run transformers' SDPA
  over the bucket's keys (a sliding-window layer over the window's part of them) under a mask built on the device
  from the new token's position and the batch's padding; sparse layers ask the selector
  (:meth:`sketch_walk.core.contract.BlockSelector.select_decode_static`: fixed shapes, device-side state) and run
  :func:`sketch_walk.core.block_sparse.block_sparse_decode` with the device length; their attended keys are summed on
  the device and, with the dense layers' counts, given to the session's density tables when the sample ends.

The same code runs without graphs (``use_graphs=False``; the CPU tests: static-cache decode equals dynamic-cache
decode). Covered: dense (any batch), Sketch&Walk's fused decode (the seed's rules; default and skip_decode) and SeerAttn
(its gate key caches folded in place, lists of width n_b). What is not covered falls back to the dynamic cache
(:func:`static_decode_support` says why): sparse batches of more than one prompt, selectors without
``select_decode_static`` (Sketch&Walk's oracle / local, its torch-only budgets and scorers, decode_rerank), logit
soft-capping.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

import torch

from .block_sparse import block_sparse_decode, resolve_backend

STATIC_ATTR = "_sketch_walk_static_step"          # on every attention module while a static decode runs
STATIC_SDPA_NAME = "sketch_walk_static_sdpa"      # a dense model's attention while graph decode is on
_registered = False
_graphs_broken: Optional[str] = None                # a capture failed in this process: eager static steps from then on


def _sdpa_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward


def static_sdpa_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A dense model's attention under graph decode: transformers' SDPA, except during a static decode step."""
    step = getattr(module, STATIC_ATTR, None)
    if step is not None:
        return step.attention(module, query, key, value, scaling, kwargs)
    return _sdpa_forward()(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def use_static_attention(model) -> bool:
    """Switch a dense model (no sparse session) to :data:`STATIC_SDPA_NAME` (SDPA, plus static decode steps).
    Returns whether it was switched now (False: already)."""
    global _registered
    from .hook import set_attention_implementation
    if getattr(model.config, "_attn_implementation", None) == STATIC_SDPA_NAME:
        return False
    if not _registered:
        from transformers import AttentionInterface
        AttentionInterface.register(STATIC_SDPA_NAME, static_sdpa_forward)
        try:
            from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
            AttentionMaskInterface.register(STATIC_SDPA_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        except ImportError:
            pass
        _registered = True
    set_attention_implementation(model, STATIC_SDPA_NAME)
    return True


_CACHE_CLASS = None


def make_static_cache(capacity: int):
    """A transformers ``DynamicCache`` (full-length layers) that :meth:`freeze` turns into static buffers of ``capacity``
    tokens after the prefill; decode steps then write at :attr:`step`'s device slot."""
    global _CACHE_CLASS
    if _CACHE_CLASS is None:
        from transformers import DynamicCache

        class StaticKVCache(DynamicCache):
            def __init__(self, capacity: int):
                super().__init__()
                self.capacity = int(capacity)
                self.buffers: Optional[List[Any]] = None
                self.step: Optional["StaticStep"] = None
                self.seen = 0

            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                if self.buffers is None:
                    return super().update(key_states, value_states, layer_idx, *args, **kwargs)
                kb, vb = self.buffers[layer_idx]
                st = self.step
                kb.index_copy_(2, st.slot, key_states)
                vb.index_copy_(2, st.slot, value_states)
                return kb[:, :, :st.kv_len], vb[:, :, :st.kv_len]

            def get_seq_length(self, *args, **kwargs) -> int:
                if self.buffers is None:
                    return super().get_seq_length(*args, **kwargs)
                return self.seen

            def freeze(self) -> int:
                """Move the prefill's keys / values into the static buffers; returns the tokens held."""
                bufs = []
                n = 0
                for layer in self.layers:
                    k, v = layer.keys, layer.values
                    n = k.shape[2]
                    if n > self.capacity:
                        raise ValueError(f"static cache: {n} tokens held, capacity {self.capacity}")
                    kb = k.new_zeros(*k.shape[:2], self.capacity, k.shape[3])
                    vb = v.new_zeros(*v.shape[:2], self.capacity, v.shape[3])
                    kb[:, :, :n].copy_(k)
                    vb[:, :, :n].copy_(v)
                    layer.keys, layer.values = kb[:, :, :n], vb[:, :, :n]
                    bufs.append((kb, vb))
                self.buffers = bufs
                self.seen = n
                return n

        _CACHE_CLASS = StaticKVCache
    return _CACHE_CLASS(capacity)


def static_decode_support(model, session, batch: int) -> Optional[str]:
    """None when a static decode (and so graph decode) covers this model, session and batch; else why not."""
    cfg = getattr(model.config, "text_config", None) or model.config
    if getattr(cfg, "attn_logit_softcapping", None):
        return "attention logit soft-capping"
    if session is None:
        return None
    if batch != 1:
        return "a sparse method with a batch of more than one prompt"
    if session.skip_decode:
        return None
    why = session.selector.static_decode_support()
    return None if why is None else f"{session.selector.name}: {why}"


def _sliding(module, kwargs) -> Optional[int]:
    w = getattr(module, "sliding_window", None)
    if w is None and kwargs:
        w = kwargs.get("sliding_window")
    return int(w) if w else None


def attended_keys_static(block_idx: torch.Tensor, block_cnt: torch.Tensor, n_keys: torch.Tensor, n_blocks: int,
                         block_size: int) -> torch.Tensor:
    """:func:`sketch_walk.core.block_sparse.attended_keys_decode` with the cache length a device tensor: keys one decode
    query attends per (batch, key head), float64."""
    last = n_blocks - 1
    last_rows = (n_keys - last * block_size).to(torch.float64)
    valid = torch.arange(block_idx.shape[-1], device=block_idx.device) < block_cnt.unsqueeze(-1)
    rows = torch.where(block_idx.long() == last, last_rows, torch.full_like(last_rows, float(block_size)))
    return torch.where(valid, rows, torch.zeros_like(rows)).sum(-1)


class StaticStep:
    """What a static decode step's attention calls read: the new token's slot and the cache length (device tensors),
    the bucket (host ints, fixed while a graph serves it), the batch's padding and the density accumulators."""

    def __init__(self, session, batch: int, capacity: int, block_size: int, valid: torch.Tensor, first_layer: int):
        dev = valid.device
        self.session = session
        self.block_size = block_size
        self.capacity = capacity
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)          # index of the new token in the buffers
        self.n_keys = torch.ones((), dtype=torch.long, device=dev)        # keys in the cache, the new one included
        self.valid = valid                                                # (B, capacity) bool: not padding
        self.padded = not bool(valid.all())
        self.positions = torch.arange(capacity, device=dev)
        self.nb = 1
        self.kv_len = block_size
        self.first_layer = first_layer
        self.masks: Dict[Any, torch.Tensor] = {}
        self.attended: Dict[int, torch.Tensor] = {}                      # sparse layer -> keys attended (device)

    def set_bucket(self, position: int) -> None:
        self.nb = position // self.block_size + 1
        self.kv_len = self.nb * self.block_size

    def _mask(self, start: int, window: Optional[int]) -> torch.Tensor:
        key = (start, window)
        m = self.masks.get(key)
        if m is None:
            pos = self.positions[start:self.kv_len]
            ok = self.valid[:, start:self.kv_len] & (pos <= self.slot)
            if window:
                ok = ok & (pos > self.slot - window)
            m = self.masks[key] = ok[:, None, None, :]
        return m

    def attention(self, module, query, key, value, scaling, kwargs):
        """One layer's attention for the new token (query (B, H, 1, d); key / value the buffers up to the bucket's
        end). Returns (output (B, 1, H, d), None) as transformers' attention functions do."""
        layer = module.layer_idx
        if layer == self.first_layer:
            self.masks = {}                 # built once per forward (inside the graph when captured)
        session = self.session
        bs = self.block_size
        window = _sliding(module, kwargs)
        if (session is not None and window is None and not session.skip_decode
                and session.selector.is_sparse_layer(layer)):
            k_new = key.index_select(2, self.slot).squeeze(2)              # (B, H_kv, d)
            idx, cnt = session.selector.select_decode_static(layer, module, query, k_new, self.nb, key_cache=key,
                                                             n_keys=self.n_keys)
            out, _ = block_sparse_decode(query, key, value, idx, cnt, bs, sm_scale=scaling, backend=session.backend,
                                         n_keys=self.n_keys)
            att = attended_keys_static(idx, cnt, self.n_keys, self.nb, bs).sum()
            acc = self.attended.get(layer)
            if acc is None:
                self.attended[layer] = acc = torch.zeros((), dtype=torch.float64, device=query.device)
            acc.add_(att)
            return out.transpose(1, 2).contiguous(), None
        backend = session.backend if session is not None else None
        if window is None and not self.padded and resolve_backend(query.device, backend) == "triton":
            # full attention: the flash-decoding kernel over every block, the length from the device (SDPA under a
            # mask would repeat K / V for the query groups: 2 GiB a layer at 128K)
            lists = self.masks.get("all")
            if lists is None:
                b, hkv = key.shape[0], key.shape[1]
                idx = torch.arange(self.nb, dtype=torch.int32, device=query.device).expand(b, hkv, self.nb)
                cnt = torch.full((b, hkv), self.nb, dtype=torch.int32, device=query.device)
                lists = self.masks["all"] = (idx, cnt)
            out, _ = block_sparse_decode(query, key, value, *lists, bs, sm_scale=scaling, backend=backend,
                                         n_keys=self.n_keys)
            return out.transpose(1, 2).contiguous(), None
        start = max(0, (self.nb - 1) * bs - window + 1) if window else 0
        mask = self._mask(start, window)
        kw = {k: v for k, v in kwargs.items() if k != "dropout"}
        out, _ = _sdpa_forward()(module, query, key[:, :, start:], value[:, :, start:], mask, scaling=scaling,
                                 dropout=0.0, **kw)
        return out, None


class StaticDecoder:
    """The decode steps of one generation on a static cache (module docstring), graphs when ``use_graphs``.

    ``cache`` from :func:`make_static_cache`, holding the prefill; ``valid`` (B, prompt) the prompt's attention mask
    (1 = a real token); ``positions`` (B, 1) the position ids of the prompt's last tokens. :meth:`step` takes the
    tokens just picked (B,) and returns the next logits (B, V) (a graph's output buffer: read it before the next
    step); :meth:`finish` hands the density counts to the session and the host counters to the selector.
    """

    def __init__(self, model, cache, session, valid: torch.Tensor, positions: torch.Tensor, *, block_size: int,
                 use_graphs: bool, cache_kw: str = "past_key_values"):
        from .hook import attention_modules
        self.model, self.cache, self.session = model, cache, session
        self.block_size = block_size
        self.use_graphs = bool(use_graphs) and _graphs_broken is None
        self.cache_kw = cache_kw
        n = cache.freeze()
        self.start = n
        b = valid.shape[0]
        dev = valid.device
        full = torch.ones(b, cache.capacity, dtype=torch.bool, device=dev)
        full[:, :n] = valid.bool()
        self.modules = attention_modules(model)
        self.step_ctx = StaticStep(session, b, cache.capacity, block_size, full, min(self.modules))
        cache.step = self.step_ctx
        for m in self.modules.values():
            setattr(m, STATIC_ATTR, self.step_ctx)
        if session is not None and not session.skip_decode:
            session.selector.prepare_static_decode(cache.capacity)
        self.tok = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.pos = positions.reshape(b, 1).clone()
        self.position = n                    # cache slot of the next new token
        self.lengths: List[int] = []         # keys in the cache at each step (density)
        self.graphs: Dict[int, Any] = {}
        self.outputs: Dict[int, torch.Tensor] = {}
        self.warm: set = set()
        self.captures = 0
        self.note: Optional[str] = _graphs_broken

    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.tok, position_ids=self.pos, use_cache=True, logits_to_keep=1,
                         **{self.cache_kw: self.cache})
        return out.logits[:, -1, :]

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        global _graphs_broken
        p = self.position
        if p + 1 > self.cache.capacity:
            raise RuntimeError(f"static cache full: {self.cache.capacity} tokens")
        ctx = self.step_ctx
        ctx.set_bucket(p)
        self.cache.seen = ctx.kv_len - 1
        self.tok.copy_(tok.view(-1, 1))
        self.pos.add_(1)
        ctx.slot.fill_(p)
        ctx.n_keys.fill_(p + 1)
        self.position = p + 1
        self.lengths.append(p + 1)
        nb = ctx.nb
        if not self.use_graphs:
            return self._forward()
        g = self.graphs.get(nb)
        if g is not None:
            g.replay()
            return self.outputs[nb]
        if nb not in self.warm:              # the bucket's first step: eager (compiles, autotunes, allocates)
            self.warm.add(nb)
            return self._forward()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):        # a private memory pool per graph (a bucket's graph is dropped below)
                out = self._forward()
        except Exception as exc:             # run on without graphs (capture records, it does not execute)
            _graphs_broken = f"CUDA graph capture failed ({type(exc).__name__}: {exc}); eager static steps"
            warnings.warn(_graphs_broken)
            self.note = _graphs_broken
            self.use_graphs = False
            return self._forward()
        self.graphs.clear()                  # earlier buckets never come back
        self.outputs.clear()
        self.graphs[nb], self.outputs[nb] = g, out
        self.captures += 1
        g.replay()
        return out

    def finish(self) -> None:
        """Density counts to the session, host counters to the selector; the modules and cache let go."""
        for m in self.modules.values():
            if getattr(m, STATIC_ATTR, None) is self.step_ctx:
                delattr(m, STATIC_ATTR)
        self.graphs.clear()
        self.outputs.clear()
        s = self.session
        if s is None or not self.lengths:
            return
        b = self.step_ctx.valid.shape[0]
        s._seq_len = self.lengths[-1]
        s.decode_steps += len(self.lengths)
        for layer, m in self.modules.items():
            hkv = key_heads(m)
            causal = float(sum(self.lengths)) * hkv * b
            if layer in self.step_ctx.attended:
                s.add_static_decode_counts(layer, self.step_ctx.attended[layer], causal)
                continue
            w = _sliding(m, None)
            att = float(sum(min(n, w) for n in self.lengths)) * hkv * b if w else causal
            s.add_static_decode_counts(layer, att, causal)
        if not s.skip_decode:
            s.selector.finish_static_decode(self.lengths[-1])


def key_heads(module) -> int:
    """Key heads of an attention module (transformers' config or its k_proj)."""
    cfg = getattr(module, "config", None)
    h = getattr(cfg, "num_key_value_heads", None)
    if h:
        return int(h)
    return int(module.k_proj.out_features // module.head_dim)
