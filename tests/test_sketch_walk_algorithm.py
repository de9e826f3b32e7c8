"""Sketch&Walk math on small random inputs: sketch, walk, selection and decode state vs brute force.

The brute-force references below are written independently of sketch_walk (plain loops, float64).
"""
import math

import pytest
import torch

from sketch_walk import SketchWalkConfig as _Config, SketchWalkSelector


def SketchWalkConfig(**knobs):
    """These tests check the seed's rules against brute force: its dense_last_blocks 0 and no decode re-ranking
    unless a test says otherwise (the defaults since docs/EVIDENCE.md 2.10 are 1 and 8)."""
    return _Config(**{"dense_last_blocks": 0, "decode_rerank": 0, **knobs})
from sketch_walk.core.block_sparse import block_lists_to_mask
from sketch_walk.selection import oracle_block_mass, select_blocks
from sketch_walk.core.block_summary import block_mean, block_minmax
from sketch_walk.sketch import srht, srht_matrix
from sketch_walk.walk import sharpen, walk_update


# ----------------------------------------------------------------------------------------------
# brute-force references (independent of the package)
# ----------------------------------------------------------------------------------------------

def bf_blocks(n, bs):
    return [list(range(s, min(n, s + bs))) for s in range(0, n, bs)]


def bf_transition(q, k, bs, key_summary, heads=None):
    """Head-mean block transition A (n_b, n_b) of one sequence; q (H, n, d), k (H_kv, n, d); float64."""
    q, k = q.double(), k.double()
    h, n, d = q.shape
    r = h // k.shape[0]
    blocks = bf_blocks(n, bs)
    nb = len(blocks)
    heads = range(h) if heads is None else heads
    a = torch.zeros(nb, nb, dtype=torch.float64)
    for hh in heads:
        g = hh // r
        for i, bi in enumerate(blocks):
            qbar = sum(q[hh, t] for t in bi) / len(bi)
            row = []
            for j in range(i + 1):
                bj = blocks[j]
                if key_summary == "mean":
                    kbar = sum(k[g, t] for t in bj) / len(bj)
                    row.append(float(qbar @ kbar) / math.sqrt(d))
                else:
                    s = 0.0
                    for c in range(d):
                        vals = [float(k[g, t, c]) for t in bj]
                        s += float(qbar[c]) * (max(vals) if qbar[c] > 0 else min(vals))
                    row.append(s / math.sqrt(d))
            m = max(row)
            e = [math.exp(x - m) for x in row]
            for j in range(i + 1):
                a[i, j] += e[j] / sum(e)
    return a / len(heads)


def bf_select_row(scores_row, i, n_sink, n_local, top_k):
    """Kept blocks of query block i: sink U local U top-k of the others (ties: the later block)."""
    budget = n_sink + n_local + top_k
    if i + 1 <= budget:
        return set(range(i + 1))
    keep = set(range(n_sink)) | set(range(i - n_local + 1, i + 1))
    others = [j for j in range(i + 1) if j not in keep]
    others.sort(key=lambda j: (-float(scores_row[j]), -j))
    return keep | set(others[:top_k])


def lists_as_sets(idx, cnt):
    return [set(idx[i, :cnt[i]].tolist()) for i in range(idx.shape[0])]


def rand_qk(seed, b, h, hkv, n, d):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)


# ----------------------------------------------------------------------------------------------
# sketch
# ----------------------------------------------------------------------------------------------

def test_block_pool_partial_last_block():
    x = torch.arange(2 * 21 * 3, dtype=torch.float32).view(1, 2, 21, 3)
    p = block_mean(x, 8)
    assert p.shape == (1, 2, 3, 3)
    assert torch.allclose(p[0, 1, 2], x[0, 1, 16:21].mean(0))       # 5 real tokens, not 8
    kmax, kmin = block_minmax(x, 8)
    assert torch.equal(kmax[0, 0, 2], x[0, 0, 16:21].amax(0)) and torch.equal(kmin[0, 1, 1], x[0, 1, 8:16].amin(0))


@pytest.mark.parametrize("d", [64, 48])
def test_srht_exact_when_sketch_dim_at_least_head_dim(d):
    x, y = torch.randn(20, d, dtype=torch.float64), torch.randn(20, d, dtype=torch.float64)
    for k in (d, 128):
        s = srht_matrix(d, k, seed=3)
        got = srht(x, s) @ srht(y, s).t()
        assert torch.allclose(got, (x @ y.t()).float(), rtol=1e-4, atol=1e-4)


def test_srht_inner_products_unbiased_over_seeds():
    d, k, seeds = 64, 8, 3000
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(d, generator=g), torch.randn(d, generator=g)
    vals = torch.tensor([float(srht(x, srht_matrix(d, k, s)) @ srht(y, srht_matrix(d, k, s))) for s in range(seeds)],
                        dtype=torch.float64)
    true = float(x.double() @ y.double())
    sem = float(vals.std()) / math.sqrt(seeds)
    assert abs(float(vals.mean()) - true) < 4 * sem
    assert float(vals.std()) > 0.1                                    # really a random sketch at k < d
    # E[S^T S] = I also for a head dim that is not a power of two (zero padding)
    mean = sum(srht_matrix(48, 8, s).double().t() @ srht_matrix(48, 8, s).double() for s in range(400)) / 400
    assert torch.allclose(mean, torch.eye(48, dtype=torch.float64), atol=0.35)
    assert abs(float(mean.diagonal().mean()) - 1.0) < 0.02


def test_same_seed_same_sketch_and_selection():
    assert torch.equal(srht_matrix(64, 16, 7), srht_matrix(64, 16, 7))
    assert not torch.equal(srht_matrix(64, 16, 7), srht_matrix(64, 16, 8))
    q, k = rand_qk(1, 1, 6, 2, 200, 64)
    cfg = SketchWalkConfig(block_size=16, top_k_blocks=3, key_summary="mean", sketch_dim=8, dense_layers=0)
    out = []
    for _ in range(2):
        sel = SketchWalkSelector(cfg)
        sel.reset(1)
        out.append([sel.select_prefill(l, None, q, k) for l in range(3)])
    for (i1, c1), (i2, c2) in zip(*out):
        assert torch.equal(i1, i2) and torch.equal(c1, c2)


# ----------------------------------------------------------------------------------------------
# transition, sharpening, walk, selection
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h, hkv", [(4, 4), (6, 2), (8, 2)])          # GQA groups of 1, 3 and 4
@pytest.mark.parametrize("key_summary", ["minmax", "mean"])
@pytest.mark.parametrize("n", [150, 160])                             # partial and full last block
def test_one_hop_selection_equals_brute_force(h, hkv, key_summary, n):
    d, bs = 16, 16
    q, k = rand_qk(10 + h + n, 1, h, hkv, n, d)
    cfg = SketchWalkConfig(block_size=bs, top_k_blocks=3, n_sink=1, n_local=2, walk_damping=0.0,
                           key_summary=key_summary, sketch_dim=d, dense_layers=0)
    sel = SketchWalkSelector(cfg)
    sel.reset(1)
    idx, cnt = sel.select_prefill(5, None, q, k)
    nb = math.ceil(n / bs)
    assert idx.shape == (1, hkv, nb, 6) and cnt.shape == (1, hkv, nb)
    a = bf_transition(q[0], k[0], bs, key_summary)
    want = [bf_select_row(a[i], i, 1, 2, 3) for i in range(nb)]
    for g in range(hkv):                                              # per-layer selection: same list per key head
        assert lists_as_sets(idx[0, g], cnt[0, g]) == want
        for i in range(nb):                                           # ascending, padded with -1
            row = idx[0, g, i].tolist()
            assert row[:cnt[0, g, i]] == sorted(want[i]) and all(v == -1 for v in row[cnt[0, g, i]:])


def test_kv_head_selection_equals_brute_force():
    q, k = rand_qk(5, 1, 6, 2, 120, 16)
    cfg = SketchWalkConfig(block_size=16, top_k_blocks=2, walk_damping=0.0, select_per="kv_head", dense_layers=0)
    sel = SketchWalkSelector(cfg)
    sel.reset(1)
    idx, cnt = sel.select_prefill(0, None, q, k)
    for g in range(2):
        a = bf_transition(q[0], k[0], 16, "minmax", heads=range(3 * g, 3 * g + 3))
        assert lists_as_sets(idx[0, g], cnt[0, g]) == [bf_select_row(a[i], i, 1, 1, 2) for i in range(8)]


def test_walk_over_two_layers_equals_brute_force():
    bs, s, beta = 16, 2.0, 0.25
    cfg = SketchWalkConfig(block_size=bs, top_k_blocks=2, sparsity_exponent=s, walk_damping=beta, dense_layers=0)
    sel = SketchWalkSelector(cfg)
    sel.reset(1)
    qs = [rand_qk(20 + l, 1, 4, 2, 130, 16) for l in range(2)]
    got = [sel.select_prefill(l, None, q, k) for l, (q, k) in enumerate(qs)]

    def bf_sharpen(a):
        w = a ** s
        return w / w.sum(-1, keepdim=True)

    w1 = bf_sharpen(bf_transition(qs[0][0][0], qs[0][1][0], bs, "minmax"))
    w2 = bf_sharpen(bf_transition(qs[1][0][0], qs[1][1][0], bs, "minmax"))
    r2 = (1 - beta) * w2 + beta * (w1 @ w2)
    r2 = r2 / r2.sum(-1, keepdim=True)
    for (idx, cnt), r in zip(got, (w1, r2)):
        assert lists_as_sets(idx[0, 0], cnt[0, 0]) == [bf_select_row(r[i], i, 1, 1, 2) for i in range(9)]


def test_sharpen_and_walk_properties():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.7, 0.0], [1e-30, 0.5, 0.5]])
    w = sharpen(a, 8.0)
    assert torch.allclose(w.sum(-1), torch.ones(3)) and w[0, 1] == 0 and w[1, 2] == 0
    assert torch.allclose(sharpen(a, 1.0), a)
    ref = a.double() ** 8
    assert torch.allclose(w.double(), ref / ref.sum(-1, keepdim=True), atol=1e-7)
    w4 = w.view(1, 1, 3, 3)
    assert torch.allclose(walk_update(w4, None, 0.25), w4)
    assert walk_update(w4, torch.eye(3).view(1, 1, 3, 3), 0.0) is w4
    r = walk_update(w4, w4, 0.5, steps=3)
    assert torch.allclose(r.sum(-1), torch.ones(1, 1, 3)) and torch.all(r.triu(1) == 0)


def test_select_blocks_rules():
    nb = 10
    scores = torch.zeros(1, 1, nb, nb)                                # all ties: the later blocks win
    idx, cnt = select_blocks(scores, torch.arange(nb), n_sink=1, n_local=1, top_k_blocks=2)
    assert idx.shape[-1] == 4 and cnt[0, 0].tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    assert lists_as_sets(idx[0, 0], cnt[0, 0])[9] == {0, 7, 8, 9}
    # a high score far away is taken; non-causal scores are never taken
    scores[0, 0, 9, 3] = 5.0
    scores[0, 0, 5, 8] = 9.0
    idx, cnt = select_blocks(scores, torch.arange(nb), 1, 1, 2)
    sets = lists_as_sets(idx[0, 0], cnt[0, 0])
    assert sets[9] == {0, 3, 8, 9} and 8 not in sets[5]
    # dense_last_blocks: the last rows are dense and the list widens to n_b
    idx, cnt = select_blocks(scores, torch.arange(nb), 1, 1, 2, dense_last=2)
    assert idx.shape[-1] == nb and cnt[0, 0, 8:].tolist() == [9, 10] and cnt[0, 0, 7] == 4
    assert lists_as_sets(idx[0, 0], cnt[0, 0])[9] == set(range(10))
    # fewer blocks than the budget: every row dense
    idx, cnt = select_blocks(torch.rand(2, 3, 3, 3), torch.arange(3), 1, 1, 16)
    assert idx.shape == (2, 3, 3, 3) and cnt[1, 2].tolist() == [1, 2, 3]


def test_oracle_block_mass_equals_brute_force():
    q, k = rand_qk(3, 1, 6, 2, 70, 8)
    m = oracle_block_mass(q, k, 16, 1 / math.sqrt(8), "layer", budget_bytes=4096)   # tiny chunks
    nb = 5
    want = torch.zeros(nb, nb, dtype=torch.float64)
    blocks = bf_blocks(70, 16)
    for h in range(6):
        s = (q[0, h].double() @ k[0, h // 3].double().t()) / math.sqrt(8)
        s = s.masked_fill(torch.ones(70, 70).triu(1).bool(), float("-inf")).softmax(-1)
        for i, bi in enumerate(blocks):
            for j, bj in enumerate(blocks):
                want[i, j] += s[bi][:, bj].sum(-1).mean() / 6
    assert torch.allclose(m[0, 0].double(), want, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# decode state
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key_summary", ["minmax", "mean"])
def test_running_block_summaries_equal_recomputation_exactly(key_summary):
    bs, n0, steps, d = 16, 37, 30, 16
    q, k = rand_qk(7, 2, 6, 2, n0 + steps, d)
    cfg = SketchWalkConfig(block_size=bs, top_k_blocks=2, key_summary=key_summary, sketch_dim=8, dense_layers=0)
    sel = SketchWalkSelector(cfg)
    sel.reset(2)
    sel.select_prefill(3, None, q[:, :, :n0], k[:, :, :n0])
    for t in range(n0, n0 + steps):                                   # opens blocks at 48 and 64
        sel.select_decode(3, None, q[:, :, t:t + 1], k[:, :, :t + 1])
    st = sel.state.layers[3]
    keys = st.keys
    n = n0 + steps
    nb = math.ceil(n / bs)
    assert keys.n == n and keys.n_blocks == nb
    kc = k
    rows = torch.tensor([len(b) for b in bf_blocks(n, bs)], dtype=torch.float64)
    assert torch.equal(keys.counts[:nb], rows)
    if key_summary == "mean":
        want = torch.stack([kc[:, :, b].double().sum(2) for b in bf_blocks(n, bs)], dim=2)
        assert torch.equal(keys.sums[:, :, :nb], want)
        ks = srht(keys.mean().float(), srht_matrix(d, 8, cfg.hadamard_seed * 1_000_003 + 3))
        assert torch.allclose(st.k_t[:, :, :nb], ks, atol=1e-6)
    else:
        want_max = torch.stack([kc[:, :, b].amax(2) for b in bf_blocks(n, bs)], dim=2)
        want_min = torch.stack([kc[:, :, b].amin(2) for b in bf_blocks(n, bs)], dim=2)
        assert torch.equal(keys.kmax[:, :, :nb], want_max) and torch.equal(keys.kmin[:, :, :nb], want_min)


@pytest.mark.parametrize("key_summary", ["minmax", "mean"])
def test_one_hop_decode_selection_equals_brute_force(key_summary):
    bs, n0, d = 16, 100, 16
    q, k = rand_qk(11, 1, 6, 3, n0 + 20, d)
    cfg = SketchWalkConfig(block_size=bs, top_k_blocks=2, walk_damping=0.0, key_summary=key_summary,
                           sketch_dim=d, dense_layers=0)
    sel = SketchWalkSelector(cfg)
    sel.reset(1)
    sel.select_prefill(0, None, q[:, :, :n0], k[:, :, :n0])
    for t in range(n0, n0 + 20):
        idx, cnt = sel.select_decode(0, None, q[:, :, t:t + 1], k[:, :, :t + 1])
        n = t + 1
        nb = math.ceil(n / bs)
        # brute force: the new query as a one-token "block" against the cache's blocks
        p = torch.zeros(nb, dtype=torch.float64)
        for h in range(6):
            a_row = []
            for j, bj in enumerate(bf_blocks(n, bs)):
                if key_summary == "mean":
                    kbar = k[0, h // 2, bj].double().mean(0)
                    a_row.append(float(q[0, h, t].double() @ kbar) / math.sqrt(d))
                else:
                    kb = k[0, h // 2, bj].double()
                    qd = q[0, h, t].double()
                    a_row.append(float((qd.clamp(min=0) * kb.amax(0) + qd.clamp(max=0) * kb.amin(0)).sum())
                                 / math.sqrt(d))
            p += torch.tensor(a_row, dtype=torch.float64).softmax(0) / 6
        assert idx.shape == (1, 3, min(nb, 4)) and cnt.shape == (1, 3)
        for g in range(3):
            assert set(idx[0, g, :cnt[0, g]].tolist()) == bf_select_row(p, nb - 1, 1, 1, 2)


def test_decode_with_walk_window_and_capacity_growth():
    bs = 16
    q, k = rand_qk(12, 1, 4, 2, 200, 16)
    cfg = SketchWalkConfig(block_size=bs, top_k_blocks=2, decode_query_window=4, walk_steps=2, dense_layers=0)
    sel = SketchWalkSelector(cfg)
    sel.reset(1)
    for layer in (0, 1):
        sel.select_prefill(layer, None, q[:, :, :64], k[:, :, :64])
    for t in range(64, 200):
        for layer in (0, 1):
            idx, cnt = sel.select_decode(layer, None, q[:, :, t:t + 1], k[:, :, :t + 1])
            nb = t // bs + 1
            kept = set(idx[0, 0, :cnt[0, 0]].tolist())
            assert {0, nb - 1} <= kept and all(0 <= j < nb for j in kept) and len(kept) == min(nb, 4)
    st = sel.state.layers[1]
    assert st.keys.capacity >= 13 and st.q_recent.shape[2] == 3
    w = st.w_cache[0, 0, :13, :13]
    assert torch.allclose(w.sum(-1), torch.ones(13)) and torch.all(w.triu(1) == 0)
    with pytest.raises(RuntimeError, match="one token per decode step"):
        sel.select_decode(0, None, q[:, :, :1], k[:, :, :150])


def test_block_lists_to_mask_consistency():
    q, k = rand_qk(2, 1, 4, 4, 256, 16)
    sel = SketchWalkSelector(SketchWalkConfig(block_size=16, top_k_blocks=3, n_sink=2, n_local=2, dense_layers=0))
    sel.reset(1)
    idx, cnt = sel.select_prefill(0, None, q, k)
    mask = block_lists_to_mask(idx, cnt, 16)
    assert torch.equal(mask.sum(-1).int(), cnt)
    assert torch.all(mask & torch.ones(16, 16).triu(1).bool() == False)  # noqa: E712
    assert torch.all(mask[..., :2].tril() | torch.ones(16, 2).triu(1).bool())
    assert torch.all(mask.diagonal(dim1=-2, dim2=-1))
