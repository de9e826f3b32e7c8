"""Decode on a static KV cache (sketch_walk.core.static_decode) equals decode on the dynamic cache, on the CPU in fp32.

The static path is what CUDA-graph decode captures and replays on the GPU (there: graphs, tests/test_graph_decode.py);
here the same steps run eagerly: the cache's buffers, the device-side slot and length, the bucketed key views and
masks, Sketch&Walk's static selection with every block's state prepared empty. Greedy tokens must be equal, the
last logits close, and the density reports equal.
"""
from __future__ import annotations

import pytest
import torch

from greedy import NumberTokenizer

from eval.ruler.pred.model_wrappers import HuggingFaceModel, SparseAttentionModel




def _llama(layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    return model


def _gemma():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                           sliding_window=24, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                           max_position_embeddings=2048)
    model = Gemma3ForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    return model


def _prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return " ".join(str(int(x)) for x in torch.randint(3, 256, (n,), generator=g))


def _run(model, prompts, static, new_tokens, enable=None):
    kw = dict(model=model, tokenizer=NumberTokenizer(), max_new_tokens=new_tokens)
    llm = HuggingFaceModel(**kw) if enable is None else SparseAttentionModel(method="m", enable=enable, **kw)
    llm.stop_ids = set()
    llm.static_decode = static
    logits = []
    pick = llm._pick

    def keep(x):
        logits.append(x.detach().clone())
        return pick(x)
    llm._pick = keep
    try:
        out = llm.process_batch(prompts)
    finally:
        if llm.session is not None:
            llm.session.disable()
        llm.restore_model()
    return out, logits


def _same(a, b, tol=1e-4):
    (ra, la), (rb, lb) = a, b
    assert [r["text"] for r in ra] == [r["text"] for r in rb]
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert torch.allclose(x, y, atol=tol, rtol=tol), (x - y).abs().max()
    assert all(r["stats"]["static_cache"] for r in rb) and not any(r["stats"]["graph_decode"] for r in rb)


def _densities(results):
    return [r["stats"].get("density") for r in results], [r["stats"].get("density_per_layer_decode") for r in results]


@pytest.mark.parametrize("lengths", [[120], [100, 130]])
def test_dense_static_equals_dynamic(lengths):
    model = _llama()
    prompts = [_prompt(n, i) for i, n in enumerate(lengths)]
    dyn = _run(model, prompts, False, 14)            # 120 + 14 crosses the block boundary at 128
    sta = _run(model, prompts, True, 14)
    _same(dyn, sta)
    assert model.config._attn_implementation == "sdpa"           # restored


def test_dense_gemma_sliding_static_equals_dynamic():
    model = _gemma()
    prompts = [_prompt(100, 7)]
    _same(_run(model, prompts, False, 40), _run(model, prompts, True, 40))


@pytest.mark.parametrize("knobs", [dict(), dict(key_summary="mean"), dict(walk_damping=0.0),
                                   dict(select_per="kv_head"), dict(skip_decode=True, dense_last_blocks=1),
                                   dict(decode_rerank=3, dense_last_blocks=1),
                                   dict(decode_rerank=2, select_per="kv_head")])
def test_sketchwalk_static_equals_dynamic(knobs):
    from sketch_walk import SketchWalkConfig, enable_sketch_walk
    model = _llama()
    cfg = SketchWalkConfig(block_size=16, top_k_blocks=2, **knobs)
    prompts = [_prompt(200, 3)]                      # 13 blocks, 4 kept a row: really sparse; decode opens block 14
    dyn = _run(model, prompts, False, 20, enable=lambda m: enable_sketch_walk(m, cfg))
    sta = _run(model, prompts, True, 20, enable=lambda m: enable_sketch_walk(m, cfg))
    _same(dyn, sta)
    (dd, dl), (sd, sl) = _densities(dyn[0]), _densities(sta[0])
    assert dd[0]["decode"] is not None and abs(dd[0]["decode"] - sd[0]["decode"]) < 1e-9
    assert dd[0]["decode"] < 1 or knobs.get("skip_decode")
    assert dl == sl and dd[0]["prefill"] == sd[0]["prefill"]


def test_sketchwalk_gemma_static_equals_dynamic():
    from sketch_walk import SketchWalkConfig, enable_sketch_walk
    model = _gemma()
    cfg = SketchWalkConfig(block_size=16, top_k_blocks=2, dense_layers=0)
    prompts = [_prompt(150, 5)]
    dyn = _run(model, prompts, False, 20, enable=lambda m: enable_sketch_walk(m, cfg))
    sta = _run(model, prompts, True, 20, enable=lambda m: enable_sketch_walk(m, cfg))
    _same(dyn, sta)
    assert _densities(dyn[0]) == _densities(sta[0])


@pytest.mark.parametrize("model_fn", [_llama, _gemma])
@pytest.mark.parametrize("knobs", [dict(nz_ratio=0.3), dict(threshold=0.08)])
def test_seerattn_static_equals_dynamic(model_fn, knobs):
    """SeerAttn with random gates (block 16, a budget that keeps some blocks out) on the static cache."""
    from seer_attn import SeerAttnConfig, enable_seer_attn
    model = model_fn()
    torch.manual_seed(1)
    from seer_attn import SeerAttnGates
    gates = SeerAttnGates(SeerAttnConfig.for_model(model, "random", block_size=16))

    def enable(m):
        return enable_seer_attn(m, gates, **knobs)
    prompts = [_prompt(200, 11)]
    dyn = _run(model, prompts, False, 20, enable=enable)
    sta = _run(model, prompts, True, 20, enable=enable)
    _same(dyn, sta)
    (dd, dl), (sd, sl) = _densities(dyn[0]), _densities(sta[0])
    assert dd[0]["decode"] < 1 and abs(dd[0]["decode"] - sd[0]["decode"]) < 1e-9 and dl == sl


def test_static_decode_falls_back_where_not_covered():
    from sketch_walk import SketchWalkConfig, enable_sketch_walk
    model = _llama(2)
    llm = HuggingFaceModel(model=model, tokenizer=NumberTokenizer(), max_new_tokens=3)
    assert llm.graph_decode is False                  # never on the CPU
    llm.static_decode = True
    llm.session = enable_sketch_walk(model, SketchWalkConfig(selector="oracle"))
    assert "oracle" in llm._static_decode_plan(1)
    llm.session.disable()
    llm.session = enable_sketch_walk(model, SketchWalkConfig())
    assert "batch" in llm._static_decode_plan(2) and llm._static_decode_plan(1) is None
    llm.session.disable()


_CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason=(
    "an interpreter check for CPU machines (triton 3.6's interpreter on the H200 rejects the device length); "
    "on a GPU tests/test_graph_decode.py runs the compiled route"))


_KERNEL_CHECK = r"""
import torch
from sketch_walk.core.kernels.block_sparse_decode import block_sparse_decode_triton
torch.manual_seed(0)
b, h, hkv, d, bs, n, cap = 2, 4, 2, 32, 16, 70, 96
q, k, v = torch.randn(b, h, 1, d), torch.randn(b, hkv, cap, d), torch.randn(b, hkv, cap, d)
idx = torch.tensor([[[0, 2, 4], [1, 3, 4]]] * b, dtype=torch.int32)
cnt = torch.tensor([[3, 3]] * b, dtype=torch.int32)
o1, l1 = block_sparse_decode_triton(q, k[:, :, :n], v[:, :, :n], idx, cnt, bs)
o2, l2 = block_sparse_decode_triton(q, k, v, idx, cnt, bs, n_keys=torch.tensor([n]))
assert torch.equal(o1, o2) and torch.equal(l1, l2), ((o1 - o2).abs().max(), (l1 - l2).abs().max())
print("OK")
"""


@_CPU_ONLY
def test_decode_kernel_reads_the_length_from_the_device():
    """The Triton decode kernel (interpreter) over a longer static cache with n_keys on the device equals it over the
    cache cut to n keys, bit for bit."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


_TRITON_ROUTE = r"""
import sys, torch
sys.path.insert(0, "tests")
import test_static_decode as t
from sketch_walk import SketchWalkConfig, enable_sketch_walk
model = t._llama(3)
prompts = [t._prompt(150, 4)]
t._same(t._run(model, prompts, False, 12), t._run(model, prompts, True, 12), tol=2e-3)
cfg = SketchWalkConfig(block_size=16, top_k_blocks=2, dense_layers=1)
dyn = t._run(model, prompts, False, 12, enable=lambda m: enable_sketch_walk(m, cfg))
sta = t._run(model, prompts, True, 12, enable=lambda m: enable_sketch_walk(m, cfg))
t._same(dyn, sta, tol=2e-3)
assert t._densities(dyn[0]) == t._densities(sta[0]), (t._densities(dyn[0]), t._densities(sta[0]))
cfg = SketchWalkConfig(block_size=16, top_k_blocks=2, dense_layers=1, decode_rerank=2)   # the Triton shortlist
dyn = t._run(model, prompts, False, 12, enable=lambda m: enable_sketch_walk(m, cfg))
sta = t._run(model, prompts, True, 12, enable=lambda m: enable_sketch_walk(m, cfg))
t._same(dyn, sta, tol=2e-3)
assert t._densities(dyn[0]) == t._densities(sta[0]), (t._densities(dyn[0]), t._densities(sta[0]))
print("OK")
"""


@_CPU_ONLY
def test_static_decode_on_the_triton_route():
    """The GPU's route under the Triton interpreter: dense layers through the decode kernel with every block kept and
    the device length, Sketch&Walk's static selection through the Triton decode selection (against the eager fused
    path: the same kernels, so the same lists and densities)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="1", SKETCH_WALK_ATTN_BACKEND="triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _TRITON_ROUTE], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
