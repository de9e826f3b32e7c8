"""Greedy generation on a model's own KV cache, for tests that compare attention paths token by token."""
from __future__ import annotations

import inspect
from typing import List, Tuple

import torch


def cache_kw(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` in newer transformers (``past_key_values`` is
    deprecated there), ``past_key_values`` before (as eval/ruler/pred/model_wrappers.py decides). The model's
    output carries the cache under the same name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_run(model, ids: torch.Tensor, steps: int) -> Tuple[torch.Tensor, List[int]]:
    """Prefill ``ids`` (1, n), then ``steps`` greedy decode steps on the model's cache (sliding-window
    layers keep their window-sized cache). Returns (logits of every prompt position and of each step,
    (n + steps, vocab); the generated tokens)."""
    toks: List[int] = []
    kw = cache_kw(model)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        logits = [out.logits[0]]
        cache = getattr(out, kw)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            toks.append(int(nxt))
            out = model(input_ids=nxt, **{kw: cache}, use_cache=True)
            cache = getattr(out, kw)
            logits.append(out.logits[0])
            nxt = out.logits[:, -1:].argmax(-1)
    return torch.cat(logits, 0), toks


class NumberTokenizer:
    """Prompts are space-separated ids; text is ids (the generation loop's tests, no vocabulary)."""
    pad_token_id = 0
    eos_token_id = None

    def __call__(self, text, add_special_tokens=False, **kw):
        return {"input_ids": [int(x) for x in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)

    def get_vocab(self):
        return {}
