"""CUDA-graph decode (the generation loop's graph_decode, sketch_walk.core.static_decode) on the GPU: greedy tokens equal
to the eager loop's. Skipped without CUDA; the embedded models where they are installed / converted.

What "equal" means here. Sparse layers run the same selection and the same kernel in both loops (the static cache only
hands them a longer buffer and the length on the device), so they agree bit for bit; dense full-attention layers run
the flash-decoding kernel with every block kept instead of SDPA, and sliding-window layers SDPA under a mask over the
window's block instead of over the window's keys: the logits can then differ by an ulp or two (TF32 dots in fp32).
So the tokens must be equal up to the end, except from a step where the eager loop's own top two logits were within
``NEAR_TIE`` (two bf16 ulps at logit 16-32; 0.01 in fp32) of each other.
"""
from __future__ import annotations

import pytest
import torch

from greedy import NumberTokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NEAR_TIE = 0.25




def _tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to("cuda", dtype).eval()
    model.config._attn_implementation = "sdpa"
    return model, NumberTokenizer()


def _embedded(name):
    from eval.ruler.model_loader import load_model
    try:
        return load_model(name, dtype="bfloat16", device="cuda")
    except Exception as exc:          # not installed / not converted on this machine
        pytest.skip(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")


def _text_prompt(tok, n_tokens):
    """A haystack with a needle and a question, about n_tokens long in this tokenizer."""
    unit = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    needle = "The special magic number for the lake is 7342. "
    ids = tok(unit, add_special_tokens=False)["input_ids"]
    reps = max(1, n_tokens // max(len(ids), 1))
    body = [unit] * reps
    body.insert(reps // 3, needle)
    return "".join(body) + "What is the special magic number for the lake? The special magic number for the lake is"


def _generate(model, tok, prompt, graph, new_tokens, enable=None, **cfg_kw):
    from eval.ruler.pred.model_wrappers import HuggingFaceModel, SparseAttentionModel
    kw = dict(model=model, tokenizer=tok, max_new_tokens=new_tokens, graph_decode="on" if graph else "off")
    llm = HuggingFaceModel(**kw) if enable is None else SparseAttentionModel(method="m", enable=enable, **kw)
    llm.stop_ids = set()
    logits = []
    pick = llm._pick

    def keep(x):
        logits.append(x.float().cpu())
        return pick(x)
    llm._pick = keep
    try:
        llm.warmup(prompt)
        logits.clear()
        r = llm.process_batch([prompt])[0]
    finally:
        if llm.session is not None:
            llm.session.disable()
        llm.restore_model()
    return r, logits


def _check(eager, graph, exact=False, captures=True, near_tie=NEAR_TIE):
    (re, le), (rg, lg) = eager, graph
    assert rg["stats"]["graph_decode"] is True, rg["stats"]
    if captures:
        assert 1 <= rg["stats"]["graph_captures"] <= 3, rg["stats"]
    ids_e = [int(x.argmax()) for x in le]
    ids_g = [int(x.argmax()) for x in lg]
    if ids_e == ids_g:
        assert re["text"] == rg["text"]
        return
    assert not exact, f"tokens differ: eager {ids_e} graph {ids_g}"
    first = next(i for i, (a, b) in enumerate(zip(ids_e, ids_g)) if a != b)
    top2 = le[first].topk(2, dim=-1).values[0]
    gap = float(top2[0] - top2[1])
    assert gap <= near_tie, f"step {first}: eager {ids_e[first]} graph {ids_g[first]}, eager's top-2 gap {gap}"


def _sketch_walk(**kw):
    from sketch_walk import SketchWalkConfig, enable_sketch_walk
    cfg = SketchWalkConfig(**kw)
    return lambda m: enable_sketch_walk(m, cfg)


def test_tiny_dense_fp32():
    model, tok = _tiny_llama(torch.float32)
    g = torch.Generator().manual_seed(1)
    prompt = " ".join(str(int(x)) for x in torch.randint(3, 512, (1000,), generator=g))
    _check(_generate(model, tok, prompt, False, 64), _generate(model, tok, prompt, True, 64), near_tie=0.01)


@pytest.mark.parametrize("knobs", [dict(top_k_blocks=4), dict(top_k_blocks=4, key_summary="mean"),
                                   dict(top_k_blocks=4, dense_last_blocks=1, skip_decode=True),
                                   dict(top_k_blocks=1 << 20)])
def test_tiny_sketchwalk_bf16(knobs):
    model, tok = _tiny_llama(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    prompt = " ".join(str(int(x)) for x in torch.randint(3, 512, (1500,), generator=g))
    e = _generate(model, tok, prompt, False, 64, _sketch_walk(**knobs))
    gr = _generate(model, tok, prompt, True, 64, _sketch_walk(**knobs))
    _check(e, gr)
    if [int(x.argmax()) for x in e[1]] == [int(x.argmax()) for x in gr[1]]:
        de, dg = e[0]["stats"]["density"], gr[0]["stats"]["density"]
        assert abs(de["decode"] - dg["decode"]) < 1e-9 and de["prefill"] == dg["prefill"]


@pytest.mark.parametrize("name,n_tokens", [("smollm2", 4000), ("gemma3-270m", 8000)])
@pytest.mark.parametrize("method", ["dense", "sketchwalk", "sketchwalk_natural", "allkept"])
def test_embedded_models_bf16(name, n_tokens, method):
    model, tok = _embedded(name)
    prompt = _text_prompt(tok, n_tokens)
    enable = {"dense": None, "sketchwalk": _sketch_walk(), "allkept": _sketch_walk(top_k_blocks=1 << 20),
              "sketchwalk_natural": _sketch_walk(dense_last_blocks=1, skip_decode=True)}[method]
    _check(_generate(model, tok, prompt, False, 64, enable), _generate(model, tok, prompt, True, 64, enable))


@pytest.mark.parametrize("name,n_tokens", [("smollm2", 4000), ("gemma3-270m", 8000)])
def test_seerattn_bf16(name, n_tokens):
    """SeerAttn: SmolLM2's committed gates; Gemma-3 has none, so randomly initialised gates of its geometry (the
    selection is then meaningless, the equality of the two loops is not)."""
    from seer_attn import DEFAULT_CHECKPOINT, SeerAttnConfig, SeerAttnGates, enable_seer_attn
    model, tok = _embedded(name)
    if name == "smollm2":
        source = DEFAULT_CHECKPOINT
    else:
        torch.manual_seed(0)
        source = SeerAttnGates(SeerAttnConfig.for_model(model, "random gates"))
    prompt = _text_prompt(tok, n_tokens)
    enable = lambda m: enable_seer_attn(m, source)  # noqa: E731
    _check(_generate(model, tok, prompt, False, 64, enable), _generate(model, tok, prompt, True, 64, enable))


def test_oracle_falls_back_to_eager_on_the_gpu():
    """The oracle selector has no static-cache selection: graph_decode on runs its eager loop and says why."""
    model, tok = _tiny_llama(torch.bfloat16)
    prompt = " ".join(str(int(x)) for x in torch.randint(3, 512, (600,), generator=torch.Generator().manual_seed(3)))
    enable = _sketch_walk(selector="oracle", top_k_blocks=2)
    e, _ = _generate(model, tok, prompt, False, 16, enable)
    g, _ = _generate(model, tok, prompt, True, 16, enable)
    assert g["stats"]["graph_decode"] is False and "oracle" in g["stats"]["graph_decode_note"]
    assert e["text"] == g["text"]
