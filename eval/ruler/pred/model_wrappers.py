"""Model wrappers for RULER's call_api.py: :class:`HuggingFaceModel` (dense) and :class:`SparseAttentionModel`.

As in RULER, a wrapper is built once and then called with prompts; ``process_batch(prompts)``
returns one dict per prompt, ``{'text': [generated_text], 'stats': {...}}`` (RULER reads
``text``; call_api.py puts ``stats`` into the record's ``others``). Which wrapper a server type gets
is the method registry's business (eval/ruler/pred/registry.py).

Both share one generation loop; a sparse method only differs by enabling an attention *session* on
the loaded model (``enable_sketch_walk``, ``enable_seer_attn``, ...), resetting it before each prompt
and reading its measured density after.

Why a hand-written loop rather than ``model.generate``: the prefill (the first forward over the
whole prompt) and the decode steps must be timed separately and exactly, per sample. The loop
is a plain prefill forward with ``logits_to_keep=1`` (no full-vocabulary logits for every
prompt position) into a ``DynamicCache``, then one forward per new token. Token ids go to the
CPU after every step to test the stop conditions, which synchronises the device anyway, so the
``perf_counter`` stamps are the device's times (``torch.cuda.synchronize`` is called at the
stamps as well). Greedy at temperature 0, else temperature / top-k / top-p sampling with a
generator seeded per batch from the seed and the prompts (resumption does not change what is
drawn). Prompts are tokenized WITHOUT special tokens: the chat template (BOS
included) was applied when the data were prepared, and the answer prefix is already appended.
"""
from __future__ import annotations

import hashlib
import inspect
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from sketch_walk.core.errors import UsageError

# End-of-turn markers of common chat templates; those present in a tokenizer's vocabulary stop
# generation in addition to its eos ids (SmolLM2/ChatML <|im_end|>, Llama-3 <|eot_id|>, ...).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>",
                      "<end_of_turn>", "</s>", "<|eom_id|>")

# The CPU's warm-up generates from the prompt's first characters only (about 250 tokens): on the CPU a first sample
# is not slower than the others with or without a warm-up of the whole prompt (docs/PERFORMANCE.md section 9), so the
# warm-up only runs the loop's code paths once, for about a second instead of a whole prefill.
CPU_WARMUP_CHARS = 1000


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def _as_list(x) -> List[int]:
    if x is None:
        return []
    if isinstance(x, (list, tuple, set)):
        return [int(v) for v in x if v is not None]
    return [int(x)]


class HuggingFaceModel:
    """Dense generation with a transformers causal LM (server type ``hf``).

    ``name_or_path``: any model form of :func:`eval.ruler.model_loader.load_model` (the alias
    ``smollm2``, a .gguf file, a local folder, a hub name). ``model``/``tokenizer`` may be passed
    instead to reuse a loaded model. ``stop``: stop strings (the text is cut at the first one).
    ``repetition_penalty`` and ``do_sample`` are accepted for RULER compatibility; sampling is
    decided by ``temperature > 0`` alone.
    """

    method = "dense"
    supports_padded_batches = True

    def __init__(self, name_or_path: Optional[str] = None, *, temperature: float = 0.0, top_k: int = 32,
                 top_p: float = 1.0, stop: Sequence[str] = (), max_new_tokens: int = 128,
                 random_seed: int = 0, dtype: str = "auto", device: str = "auto",
                 repetition_penalty: float = 1.0, do_sample: Optional[bool] = None,
                 model=None, tokenizer=None, graph_decode: str = "off") -> None:
        import torch

        if repetition_penalty not in (None, 1, 1.0):
            raise UsageError(f"repetition_penalty {repetition_penalty}: only 1 (none) is supported")
        if model is None:
            from eval.ruler.model_loader import load_model

            model, tokenizer = load_model(name_or_path, dtype=dtype, device=device)
        elif tokenizer is None:
            raise ValueError("pass the tokenizer with the model")
        self.model = model
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path
        self.device = next(model.parameters()).device
        self.temperature = float(temperature or 0.0)
        self.top_k = int(top_k or 0)
        self.top_p = float(top_p if top_p is not None else 1.0)
        self.stop = [s for s in (stop or []) if s]
        self.max_new_tokens = int(max_new_tokens)
        self.random_seed = int(random_seed or 0)
        self.generator = torch.Generator(device=self.device).manual_seed(self.random_seed)
        self.stop_ids = self._stop_token_ids()
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = (_as_list(tokenizer.eos_token_id) or [0])[0]
        self.pad_id = int(pad)
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.x names the cache argument ``cache``; older releases ``past_key_values``.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.session = None
        # call_api.py --truncate_to_positions: prompts longer than this lose their middle (None: never cut)
        self.max_prompt_tokens: Optional[int] = None
        # Decode on a static KV cache as CUDA graphs (sketch_walk.core.static_decode): "auto" / "on" on a GPU, never
        # on the CPU. static_decode: the static cache without graphs (the CPU tests set it).
        if graph_decode not in ("auto", "on", "off"):
            raise UsageError(f"--graph_decode {graph_decode}: choose auto, on or off")
        self.graph_decode = graph_decode != "off" and self.device.type == "cuda"
        self.static_decode = self.graph_decode
        self._static_attention = False

    # ------------------------------------------------------------------ helpers
    def _stop_token_ids(self) -> set:
        ids = set(_as_list(getattr(self.tokenizer, "eos_token_id", None)))
        gen_cfg = getattr(self.model, "generation_config", None)
        if gen_cfg is not None:
            ids.update(_as_list(getattr(gen_cfg, "eos_token_id", None)))
        vocab = self.tokenizer.get_vocab()
        for tok in END_OF_TURN_TOKENS:
            if tok in vocab:
                ids.add(int(vocab[tok]))
        return ids

    def _pick(self, logits):
        """Next token ids (B,) from last-position logits (B, V)."""
        import torch

        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        if self.top_k > 0:
            k = min(self.top_k, logits.shape[-1])
            kth = torch.topk(logits, k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if 0 < self.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the tokens ranked above it already reach top_p
            drop = (probs.cumsum(dim=-1) - probs) >= self.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def _text(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _hit_stop_word(self, ids: List[int]) -> bool:
        if not self.stop:
            return False
        text = self._text(ids)
        return any(s in text for s in self.stop)

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def _static_decode_plan(self, bsz: int) -> Optional[str]:
        """None when this generation decodes on a static cache (graphs when graph_decode), else why not (None also
        when nothing asked for it: then "off")."""
        if not self.static_decode:
            return "off"
        from sketch_walk.core.static_decode import static_decode_support, use_static_attention
        why = static_decode_support(self.model, self.session, bsz)
        if why is None and self.session is None and not self._static_attention:
            use_static_attention(self.model)          # a dense model: SDPA, plus the static decode steps
            self._static_attention = True
        return why

    def restore_model(self) -> None:
        """A dense model switched to the static-decode attention goes back to SDPA (the session's own disable()
        restores a sparse one)."""
        if self._static_attention:
            from sketch_walk.core.hook import set_attention_implementation
            set_attention_implementation(self.model, "sdpa")
            self._static_attention = False

    # ------------------------------------------------------------------ generation
    def _generate(self, prompts: List[str]) -> List[Dict[str, Any]]:
        """One prefill + decode loop over a (left-padded) batch; returns per-prompt results."""
        import torch

        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        for p, ids in zip(prompts, encoded):
            if not ids:
                raise UsageError("an empty prompt cannot be generated from")
        cut = [0] * len(encoded)
        if self.max_prompt_tokens is not None:
            for i, ids in enumerate(encoded):
                encoded[i], cut[i] = cut_middle(ids, self.max_prompt_tokens)
        bsz, longest = len(encoded), max(len(e) for e in encoded)
        input_ids = torch.full((bsz, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((bsz, longest), dtype=torch.long)
        for i, ids in enumerate(encoded):
            input_ids[i, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[i, longest - len(ids):] = 1
        padded = bool((mask == 0).any())
        input_ids = input_ids.to(self.device)
        mask = mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        static_note = self._static_decode_plan(bsz)
        static = static_note is None
        if static:
            from sketch_walk.core.static_decode import make_static_cache
            bs = self.session.selector.block_size if self.session is not None else 64
            cache = make_static_cache(-(-(longest + self.max_new_tokens) // bs) * bs)
        else:
            cache = self._new_cache()
        decoder = None

        def forward(ids, pos, attn):
            kwargs = {self._cache_kw: cache, "use_cache": True, "logits_to_keep": 1, "position_ids": pos}
            if padded:
                kwargs["attention_mask"] = attn
            return self.model(input_ids=ids, **kwargs).logits[:, -1, :]

        generated: List[List[int]] = [[] for _ in range(bsz)]
        reason: List[Optional[str]] = [None] * bsz
        done_at = [0.0] * bsz

        with torch.inference_mode():
            _sync(self.device)
            t0 = time.perf_counter()
            tok = self._pick(forward(input_ids, position_ids, mask))
            toks = tok.tolist()
            _sync(self.device)
            t1 = time.perf_counter()
            if static:
                from sketch_walk.core.static_decode import StaticDecoder
                decoder = StaticDecoder(self.model, cache, self.session, mask, position_ids[:, -1:], block_size=bs,
                                        use_graphs=self.graph_decode, cache_kw=self._cache_kw)
            try:
                while True:
                    now = time.perf_counter()
                    for i, t in enumerate(toks):
                        if reason[i] is not None:
                            continue
                        if t in self.stop_ids:
                            reason[i] = "eos"
                        else:
                            generated[i].append(t)
                            if self._hit_stop_word(generated[i]):
                                reason[i] = "stop_word"
                            elif len(generated[i]) >= self.max_new_tokens:
                                reason[i] = "length"
                        if reason[i] is not None:
                            done_at[i] = now
                    if all(r is not None for r in reason):
                        break
                    # finished rows keep feeding their last token; their outputs are ignored
                    if decoder is not None:
                        tok = self._pick(decoder.step(tok))
                    else:
                        mask = torch.cat([mask, mask.new_ones((bsz, 1))], dim=1)
                        position_ids = position_ids[:, -1:] + 1
                        tok = self._pick(forward(tok[:, None], position_ids, mask))
                    toks = tok.tolist()
                _sync(self.device)
            finally:
                if decoder is not None:
                    decoder.finish()      # the density counts; the model's attention modules let go of its step

        results = []
        for i in range(bsz):
            text = self._text(generated[i])
            for s in self.stop:
                text = text.split(s)[0]
            results.append({
                "text": [text],
                "stats": {
                    "prefill_s": round(t1 - t0, 6),
                    "decode_s": round(max(done_at[i] - t1, 0.0), 6),
                    "prompt_tokens": len(encoded[i]),
                    **({"truncated_tokens": cut[i]} if self.max_prompt_tokens is not None else {}),
                    # tokens produced, an end-of-sequence token included
                    "new_tokens": len(generated[i]) + (1 if reason[i] == "eos" else 0),
                    "stop_reason": reason[i],
                    "batch_size": bsz,
                    "method": self.method,
                    "graph_decode": bool(decoder is not None and decoder.use_graphs),
                    "static_cache": decoder is not None,
                    **({"graph_captures": decoder.captures} if decoder is not None and decoder.use_graphs else {}),
                    **({"graph_decode_note": (decoder.note if decoder is not None else static_note)}
                       if self.graph_decode and (decoder is None or decoder.note) else {}),
                },
            })
        return results

    # ------------------------------------------------------------------ RULER interface
    def __call__(self, prompt: str, **kwargs) -> Dict[str, Any]:
        return self.process_batch([prompt], **kwargs)[0]

    def process_batch(self, prompts: List[str], **kwargs) -> List[Dict[str, Any]]:
        if not prompts:
            return []
        if self.session is None or len(prompts) == 1 or getattr(self.session, "padded_batches", False):
            # one left-padded batch; a sparse session selects and counts density per sequence (its own state and
            # block grid: sketch_walk.core.hook, "Padded batches"), so each prompt gets what it gets alone
            return self._run_session_batch(prompts)
        # A session that keeps one state for the whole batch: one prompt at a time.
        out: List[Dict[str, Any]] = []
        for p in prompts:
            out.extend(self._run_session_batch([p]))
        return out

    def _run_session_batch(self, prompts: List[str]) -> List[Dict[str, Any]]:
        if self.temperature > 0:
            # Sampling is seeded per batch from --random_seed and the prompts, so a sample's text
            # does not depend on what ran before it (a resumed run draws what a whole run draws).
            digest = hashlib.sha256("\x00".join(prompts).encode("utf-8")).digest()
            self.generator.manual_seed((self.random_seed * 1_000_003 + int.from_bytes(digest[:7], "big")) % (1 << 62))
        if self.session is not None:
            self.session.reset()
        results = self._generate(prompts)
        if self.session is not None:
            if len(results) == 1:
                density = density_stats(self.session.report())
                for r in results:
                    r["stats"].update(density)
            else:                        # each sequence's own density, on its real tokens
                for i, r in enumerate(results):
                    r["stats"].update(density_stats(self.session.report(row=i)))
        return results

    def warmup(self, prompt: str) -> None:
        """An untimed generation of ``prompt``, so that one-time costs (allocator growth, CUDA context,
        kernel compilation and autotuning, per-shape library plans) do not land in the first sample's
        times. On a GPU the whole generation (``max_new_tokens``), so that every decode length of the
        first prompt has run once: with a prefill and 2 decode steps only, the first of 10 Gemma-3
        samples at 32K still took up to 3.5x the median (H100). On the CPU the prompt's first
        ``CPU_WARMUP_CHARS`` characters only (nothing to compile or plan there)."""
        if self.device.type != "cuda":
            prompt = prompt[:CPU_WARMUP_CHARS]
        self._run_session_batch([prompt])

    def describe(self) -> Dict[str, Any]:
        """The session's knobs (empty for dense), for the run manifest."""
        return dict(self.session.describe()) if self.session is not None else {}


def cut_middle(ids: List[int], keep: int):
    """(ids, 0) when they fit ``keep`` tokens, else (their first keep // 2 and last keep - keep // 2 tokens, the
    number dropped): a long prompt keeps its instructions and its question, as LongBench truncates."""
    if len(ids) <= keep:
        return ids, 0
    head = keep // 2
    return ids[:head] + ids[len(ids) - (keep - head):], len(ids) - keep


def _round(x, nd=6):
    return None if x is None else round(float(x), nd)


def density_stats(report: Dict[str, Any]) -> Dict[str, Any]:
    """A session report -> the ``others`` fields: density {prefill, decode, overall}, per layer."""
    out = {"density": {k: _round(report.get(k)) for k in ("prefill", "decode", "overall")},
           "density_per_layer": [_round(v) for v in (report.get("density_per_layer") or [])]}
    if report.get("density_per_layer_decode"):
        out["density_per_layer_decode"] = [_round(v) for v in report["density_per_layer_decode"]]
    if report.get("density_by_layer_type"):   # {sparse, dense, sliding: {prefill, decode, overall, layers}}
        out["density_by_layer_type"] = {
            kind: {**{k: _round(v.get(k)) for k in ("prefill", "decode", "overall")}, "layers": v.get("layers")}
            for kind, v in report["density_by_layer_type"].items()}
    return out


class SparseAttentionModel(HuggingFaceModel):
    """A sparse-attention method on the loaded model (every server type but ``hf``).

    ``enable(model)`` switches the model to the method and returns the hook's session
    (:class:`sketch_walk.core.hook.SparseAttentionSession`); ``method`` names it in every record.
    The generation loop resets the session before each prompt and reads its density after.
    """

    def __init__(self, name_or_path: Optional[str] = None, *, method: str, enable: Callable[[Any], Any],
                 **kwargs) -> None:
        super().__init__(name_or_path, **kwargs)
        self.method = method
        self.session = enable(self.model)
