"""Sketch&Walk inside transformers models: SmolLM2 (the embedded model) and small random Llama / Gemma-3 configs.

fp32 on CPU, short prompts and block sizes 16 / 32 so the whole file stays fast.
"""
import math

import pytest
import torch

import sketch_walk.core.hook as hook_mod
from sketch_walk import ATTN_NAME, SketchWalkConfig, enable_sketch_walk, enable_sparse_attention
from sketch_walk.core.errors import UsageError
from sketch_walk.core.hook import sparse_attention_forward

from greedy import cache_kw

NEEDLE_TEXT = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 6
               + "One of the special magic numbers for quiet-lake is: 4817263. "
               + "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 3
               + "What is the special magic number for quiet-lake? Answer: The special magic number for quiet-lake is")


@pytest.fixture(scope="module")
def smol():
    from eval.ruler.model_loader import load_model
    model, tok = load_model("smollm2", dtype="float32", device="cpu")
    return model, tok


@pytest.fixture()
def smol_clean(smol):
    model, tok = smol
    yield model, tok
    sess = getattr(model, hook_mod.SESSION_ATTR, None)
    if sess is not None:
        sess.disable()
    assert model.config._attn_implementation == "sdpa"


def greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              min_new_tokens=n, pad_token_id=0)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def tiny_llama(h, hkv, head_dim=16, layers=2, hidden=None, vocab=128, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden or 16 * h, intermediate_size=64, num_attention_heads=h, num_key_value_heads=hkv,
                      head_dim=head_dim, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


# ----------------------------------------------------------------------------------------------
# SmolLM2
# ----------------------------------------------------------------------------------------------

def test_full_budget_equals_dense_smollm2(smol_clean):
    model, tok = smol_clean
    ids = tok(NEEDLE_TEXT, return_tensors="pt").input_ids
    assert 200 < ids.shape[1] < 320 and ids.shape[1] % 32 != 0            # a partial last block
    with torch.no_grad():
        ref = model(ids).logits
    ref_tokens = greedy(model, ids, 20)
    sess = enable_sketch_walk(model, SketchWalkConfig(block_size=32, top_k_blocks=64))
    assert model.config._attn_implementation == ATTN_NAME
    with torch.no_grad():
        out = model(ids).logits
    assert rel_err(out, ref) < 1e-4
    sess.reset()
    tokens = greedy(model, ids, 20)
    assert torch.equal(tokens, ref_tokens)
    rep = sess.report()
    assert rep["decode_steps"] == 19 and rep["decode"] == 1.0 and rep["prefill"] == 1.0
    assert rep["density_per_layer_decode"][29] == 1.0 and len(rep["density_per_layer"]) == 30
    # the mean key summary at full budget, too (prefill only)
    enable_sketch_walk(model, SketchWalkConfig(block_size=32, top_k_blocks=64, key_summary="mean", sketch_dim=16))
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) < 1e-4


def _recording(monkeypatch):
    """Record the lists each sparse kernel call got: [(kind, layer, idx, cnt, n)]."""
    calls = []
    pre, dec = hook_mod.block_sparse_attention, hook_mod.block_sparse_decode

    def rec_pre(q, k, v, idx, cnt, bs, **kw):
        calls.append(("prefill", idx.clone(), cnt.clone(), q.shape[2]))
        return pre(q, k, v, idx, cnt, bs, **kw)

    def rec_dec(q, k, v, idx, cnt, bs, **kw):
        calls.append(("decode", idx.clone(), cnt.clone(), k.shape[2]))
        return dec(q, k, v, idx, cnt, bs, **kw)

    monkeypatch.setattr(hook_mod, "block_sparse_attention", rec_pre)
    monkeypatch.setattr(hook_mod, "block_sparse_decode", rec_dec)
    return calls


def test_density_accounting_against_brute_force(smol_clean, monkeypatch):
    model, tok = smol_clean
    ids = tok(NEEDLE_TEXT, return_tensors="pt").input_ids[:, :150]
    bs = 16
    sess = enable_sketch_walk(model, SketchWalkConfig(block_size=bs, top_k_blocks=2, dense_layers=2, n_sink=1))
    calls = _recording(monkeypatch)
    greedy(model, ids, 4)
    rep = sess.report()
    n = ids.shape[1]
    pre = [c for c in calls if c[0] == "prefill"]
    dec = [c for c in calls if c[0] == "decode"]
    assert len(pre) == 28 and len(dec) == 28 * 3

    def bf_prefill(idx, cnt):                                         # count token pairs by brute force
        att = 0
        for g in range(idx.shape[1]):
            for t in range(n):
                kept = set(idx[0, g, t // bs, :cnt[0, g, t // bs]].tolist())
                att += sum(1 for s in range(t + 1) if s // bs in kept)
        return att / (idx.shape[1] * n * (n + 1) / 2)

    want_layers = [1.0, 1.0] + [bf_prefill(c[1], c[2]) for c in pre]
    assert rep["density_per_layer"] == pytest.approx(want_layers, abs=1e-12)
    assert rep["prefill"] == pytest.approx(sum(want_layers) / 30, abs=1e-12)
    assert 0.2 < rep["prefill"] < 0.8
    # decode: keys attended per step; dense layers attend all N
    dec_att, dec_cau = 2 * sum(n + s for s in range(1, 4)), 2 * sum(n + s for s in range(1, 4))
    for _, idx, cnt, nk in dec:
        kept = set(idx[0, 0, :cnt[0, 0]].tolist())
        assert all(set(idx[0, g, :cnt[0, g]].tolist()) == kept for g in range(3))
        dec_att += sum(1 for s in range(nk) if s // bs in kept)
        dec_cau += nk
    assert rep["decode"] == pytest.approx(dec_att / dec_cau, abs=1e-12)
    total_pre = sum(want_layers) * n * (n + 1) / 2
    assert rep["overall"] == pytest.approx((total_pre + dec_att) / (30 * n * (n + 1) / 2 + dec_cau), abs=1e-12)
    sess.reset()
    assert sess.report()["prefill"] is None and sess.report()["density_per_layer"][5] is None


def test_batch_of_two_equals_one_by_one(smol_clean):
    model, tok = smol_clean
    torch.manual_seed(1)
    ids = torch.randint(100, 5000, (2, 100))
    enable_sketch_walk(model, SketchWalkConfig(block_size=16, top_k_blocks=2))
    with torch.no_grad():
        both = model(ids).logits
        one = torch.cat([model(ids[i:i + 1]).logits for i in range(2)])
    assert rel_err(both, one) < 1e-4
    g_both = greedy(model, ids, 4)
    g_one = torch.cat([greedy(model, ids[i:i + 1], 4) for i in range(2)])
    assert torch.equal(g_both, g_one)


def test_refusals(smol_clean):
    model, tok = smol_clean
    enable_sketch_walk(model, SketchWalkConfig(block_size=16, top_k_blocks=2))
    tok.padding_side = "right"        # left padding runs (tests/test_sparse_batches.py); right padding is refused
    batch = tok(["short prompt", "a much longer prompt than the other one, with padding"], return_tensors="pt",
                padding=True)
    tok.padding_side = "left"
    with pytest.raises(UsageError, match="left-padded batches only"), torch.no_grad():
        model(**batch)
    ids = torch.randint(100, 5000, (1, 60))
    with torch.no_grad():
        out = model(ids[:, :40], use_cache=True)
        with pytest.raises(UsageError, match="chunked prefill"):
            kw = cache_kw(model)
            model(ids[:, 40:], **{kw: getattr(out, kw)})


def test_prompt_shorter_than_one_block_and_block_crossing(smol_clean):
    model, tok = smol_clean
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    assert 8 < ids.shape[1] < 16
    with torch.no_grad():
        ref = model(ids).logits
    ref_tokens = greedy(model, ids, 8)
    sess = enable_sketch_walk(model, SketchWalkConfig(block_size=16, top_k_blocks=1, dense_layers=0))
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) < 1e-4           # one block: necessarily dense
    sess.reset()
    assert torch.equal(greedy(model, ids, 8), ref_tokens)        # decode crosses into the second block
    assert sess.report()["prefill"] == 1.0


# ----------------------------------------------------------------------------------------------
# random models
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dense_layers", [0, 1])
def test_llama31_8b_attention_geometry_full_budget_equals_dense(dense_layers):
    model = tiny_llama(32, 8, head_dim=128, layers=2, hidden=256, vocab=256)
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (1, 100))
    with torch.no_grad():
        ref = model(ids).logits
    ref_tokens = greedy(model, ids, 6)
    sess = enable_sketch_walk(model, SketchWalkConfig(block_size=16, top_k_blocks=64, dense_layers=dense_layers))
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) < 1e-4
    assert torch.equal(greedy(model, ids, 6), ref_tokens)
    assert sess.report()["sparse_layers"] == ([1] if dense_layers else [0, 1])
    # and a real sparse budget runs, with density below 1 in the sparse layers
    sess = enable_sketch_walk(model, SketchWalkConfig(block_size=16, top_k_blocks=1, dense_layers=dense_layers))
    greedy(model, ids, 3)
    rep = sess.report()
    assert rep["density_per_layer"][1] < 0.7 and rep["decode"] < 1.0


@pytest.mark.parametrize("h, hkv", [(4, 4), (6, 2), (8, 2)])
@pytest.mark.parametrize("selector, key_summary", [("sketchwalk", "minmax"), ("sketchwalk", "mean"),
                                                   ("oracle", "minmax"), ("local", "minmax")])
def test_gqa_groups_and_selectors_full_budget(h, hkv, selector, key_summary):
    model = tiny_llama(h, hkv)
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (1, 90))
    with torch.no_grad():
        ref = model(ids).logits
    ref_tokens = greedy(model, ids, 8)
    cfg = SketchWalkConfig(block_size=16, top_k_blocks=16, dense_layers=0, selector=selector,
                           key_summary=key_summary, sketch_dim=4, decode_query_window=3)
    enable_sketch_walk(model, cfg)
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) < 1e-4
    assert torch.equal(greedy(model, ids, 8), ref_tokens)
    sess = enable_sketch_walk(model, cfg.replace(top_k_blocks=1, select_per="kv_head"))
    greedy(model, ids, 8)                                           # sparse prefill and decode run
    assert sess.report()["decode"] < 1.0


def test_same_seed_same_output():
    model = tiny_llama(6, 2, layers=3)
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(4))
    cfg = SketchWalkConfig(block_size=16, top_k_blocks=2, key_summary="mean", sketch_dim=4, dense_layers=0)
    outs = []
    for _ in range(2):
        enable_sketch_walk(model, cfg)
        with torch.no_grad():
            outs.append((model(ids).logits, greedy(model, ids, 6)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_sliding_window_layers_keep_their_attention():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(5)
    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=32, num_hidden_layers=4, vocab_size=128, sliding_window=24,
                           layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=512)
    model = Gemma3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 100))
    with torch.no_grad():
        ref = model(ids).logits
    ref_tokens = greedy(model, ids, 6)
    sess = enable_sketch_walk(model, SketchWalkConfig(block_size=16, top_k_blocks=64, dense_layers=0))
    with torch.no_grad():
        assert rel_err(model(ids).logits, ref) < 1e-4
    sess.reset()
    assert torch.equal(greedy(model, ids, 6), ref_tokens)
    rep = sess.report()
    assert rep["sparse_layers"] == [1, 3] and sess.describe()["sliding_window_layers"] == [0, 2]
    n, w = 100, 24
    assert rep["density_per_layer"][0] == pytest.approx((w * (w + 1) / 2 + (n - w) * w) / (n * (n + 1) / 2))
    assert rep["density_per_layer_decode"][2] == pytest.approx(5 * w / sum(range(101, 106)))


def test_session_api_and_errors():
    model = tiny_llama(4, 2)
    sess = enable_sketch_walk(model, {"block_size": 16, "top_k_blocks": 2, "key_summary": "mean"})
    d = sess.describe()
    assert d["method"] == "sketch_walk" and d["top_k_blocks"] == 2 and d["attn_backend_resolved"] == "torch"
    assert "sketch_dim" not in d["inactive_knobs"] and "key_sub_blocks" in d["inactive_knobs"]
    assert d["skip_decode"] is False
    with pytest.raises(UsageError, match="BlockSelector"):
        enable_sparse_attention(model, object())
    with pytest.raises(UsageError, match="unknown Sketch&Walk knob"):
        enable_sketch_walk(model, {"topk": 3})
    sess2 = enable_sketch_walk(model, SketchWalkConfig(block_size=16, skip_decode=True, top_k_blocks=1,
                                                       dense_layers=0))
    assert getattr(model.model.layers[0].self_attn, hook_mod.SESSION_ATTR) is sess2
    ids = torch.randint(0, 128, (1, 80))
    greedy(model, ids, 4)
    rep = sess2.report()
    assert rep["decode"] == 1.0 and rep["prefill"] < 1.0 and rep["density_per_layer_decode"] == [1.0, 1.0]
    sess2.disable()
    assert model.config._attn_implementation == "sdpa"
    attn = model.model.layers[0].self_attn
    q = torch.zeros(1, 4, 3, 16)
    with pytest.raises(UsageError, match="needs a session"):
        sparse_attention_forward(attn, q, q[:, :2], q[:, :2], None)
    assert math.isfinite(float(greedy(model, ids, 2).sum()))
