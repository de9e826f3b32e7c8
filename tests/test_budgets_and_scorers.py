"""Budget modes (fixed / fraction / mass, token sink and window fractions) and the decode scorers (sub-block bounds,
the question-seeded query window, the question's prefill blocks): their rules on random scores, and every candidate
inside a small Llama (full budgets equal dense; sparse ones run prefill and decode across block boundaries)."""
import types

import pytest
import torch

from sketch_walk import SketchWalkConfig, enable_sketch_walk
from sketch_walk.selection import RowRule, row_rule, select_by_rule
from sketch_walk.selector import SketchWalkSelector
from sketch_walk.sketch import max_over_sub_blocks, scores_minmax
from sketch_walk.core.block_summary import block_minmax

from test_sketch_walk_model import greedy, tiny_llama


def _kept(idx, cnt):
    return [set(r[: c].tolist()) for r, c in zip(idx.reshape(-1, idx.shape[-1]), cnt.reshape(-1))]


@pytest.mark.parametrize("rule", [
    RowRule("fraction", sink_keep=2, local_keep=3, sink_skip=1, local_skip=2, fraction=0.2),
    RowRule("fraction", sink_keep=1, local_keep=1, sink_skip=3, local_skip=1, fraction=0.5),
    RowRule("fraction", sink_keep=1, local_keep=2, sink_skip=1, local_skip=2, fraction=0.25, min_blocks=3, max_blocks=6),
    RowRule("mass", sink_keep=1, local_keep=2, sink_skip=1, local_skip=2, mass=0.7, min_blocks=1, max_blocks=5),
    RowRule("mass", sink_keep=1, local_keep=1, sink_skip=1, local_skip=1, mass=0.9),
    RowRule("fixed", sink_keep=2, local_keep=3, sink_skip=1, local_skip=2, top_k=4),
])
def test_rules_on_random_scores(rule):
    g = torch.Generator().manual_seed(0)
    for nb in (1, 5, 17, 40):
        scores = torch.rand(2, 3, nb, nb, generator=g) ** 4
        rows = torch.arange(nb)
        idx, cnt = select_by_rule(scores, rows, rule, dense_last=1)
        wide_idx, wide_cnt = select_by_rule(scores, rows, rule, dense_last=1, extra=torch.zeros(nb, nb, dtype=bool),
                                            extra_width=nb)
        assert torch.equal(cnt, wide_cnt), "the width from shapes cut a list short"
        assert idx.shape[-1] <= nb and int(cnt.max()) <= idx.shape[-1]
        for flat, row_set in enumerate(_kept(idx, cnt)):
            i, s = flat % nb, scores.reshape(-1, nb)[flat]
            causal = set(range(i + 1))
            forced = {j for j in causal if j < rule.sink_keep or j > i - rule.local_keep}
            cand = [j for j in causal if j >= rule.sink_skip and j <= i - rule.local_skip]
            assert row_set <= causal and forced <= row_set
            if i == nb - 1:
                assert row_set == causal                                 # dense_last
                continue
            if rule.mode == "fraction":
                want = set(forced)
                if cand:
                    th = torch.quantile(s[cand].double(), 1 - rule.fraction)
                    above = {j for j in causal if float(s[j]) > float(th)}
                    ranked = sorted((j for j in cand if j not in forced), key=lambda j: (-float(s[j]), -j))
                    if rule.max_blocks:
                        above -= set(ranked[rule.max_blocks:])
                    want |= above | set(ranked[: rule.min_blocks])
                assert row_set == want
            elif rule.mode == "mass":
                est = s[: i + 1].double() / s[: i + 1].double().sum()
                held = float(est[sorted(row_set)].sum())
                chosen = row_set - forced
                cap = rule.max_blocks or nb
                assert len(chosen) >= min(rule.min_blocks, len([j for j in cand if j not in forced]))
                if len(chosen) < cap and len(chosen) < len([j for j in cand if j not in forced]):
                    assert held >= rule.mass - 1e-6                         # reached p ...
                if len(chosen) > max(rule.min_blocks, 0):
                    weakest = min(chosen, key=lambda j: float(est[j]))
                    assert held - float(est[weakest]) < rule.mass + 1e-6     # ... with the fewest blocks
            else:
                if i + 1 <= rule.sink_keep + rule.local_keep + rule.top_k:
                    assert row_set == causal
                else:
                    best = sorted((j for j in cand if j not in forced), key=lambda j: (-float(s[j]), -j))[: rule.top_k]
                    assert row_set == forced | set(best)


def test_row_rule_from_fractions():
    cfg = SketchWalkConfig(block_size=16, window_fraction=0.05, sink_fraction=0.025, budget_mode="fraction")
    r = row_rule(cfg, 1000, decode=False)           # w = 50 tokens: 4 sink blocks; a query reaches back 49 tokens
    assert (r.sink_keep, r.local_keep, r.local_skip, r.sink_skip) == (4, 5, 4, 2)
    d = row_rule(cfg, 1000, decode=True)
    assert (d.sink_keep, d.local_keep, d.local_skip) == (4, 4, 4)
    plain = row_rule(SketchWalkConfig(), 5000, decode=False)
    assert plain.plain and (plain.sink_keep, plain.local_keep, plain.top_k) == (1, 1, 16)


def test_sub_block_bound_is_tighter_and_still_an_upper_bound():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 1, 3, 32, generator=g)
    k = torch.randn(1, 1, 100, 32, generator=g)
    exact = torch.nn.functional.pad(torch.einsum("md,nd->mn", q[0, 0, 0], k[0, 0]), (0, 28), value=-1e30)
    exact = exact.view(3, 8, 16).amax(-1)
    whole = scores_minmax(q, *block_minmax(k, 16), 1.0)[0, 0, 0]
    kmax4, kmin4 = block_minmax(k, 4)
    sub = max_over_sub_blocks(scores_minmax(q, kmax4, kmin4, 1.0), 4, 7)[0, 0, 0]
    assert bool((sub >= exact[:, :7] - 1e-4).all()) and bool((sub <= whole + 1e-4).all())
    assert float((sub - exact[:, :7]).mean()) < float((whole - exact[:, :7]).mean())


def test_question_blocks_stay_in_decode():
    cfg = SketchWalkConfig(block_size=16, top_k_blocks=2, dense_layers=0, decode_keep_question=True, dense_last_blocks=0,
                           decode_rerank=0)              # the question blocks alone: the last prefill row sparse
    sel = SketchWalkSelector(cfg)
    sel.reset(1)
    module = types.SimpleNamespace(scaling=0.25)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 200, 16, generator=g), torch.randn(1, 2, 200, 16, generator=g)
    idx, cnt = sel.select_prefill(0, module, q[:, :, :160], k[:, :, :160])
    question = set(idx[0, 0, -1, : cnt[0, 0, -1]].tolist())
    for n in range(161, 200):
        didx, dcnt = sel.select_decode(0, module, q[:, :, n - 1:n], k[:, :, :n])
        assert question <= set(didx[0, 0, : dcnt[0, 0]].tolist())


CANDIDATES = {
    "authors": {"preset": "authors", "block_size": 16},
    "sub4": {"key_sub_blocks": 4},
    "qwin_each": {"decode_query_window": 5, "decode_window_scoring": "each_query"},
    "question": {"decode_keep_question": True},
    "fraction_kv_head": {"budget_mode": "fraction", "select_per": "kv_head", "window_fraction": 0.1},
    "mass": {"budget_mode": "mass", "budget_mass": 0.8, "budget_max_blocks": 3, "sink_fraction": 0.05},
    "rerank": {"decode_rerank": 3},
    "rerank_authors": {"preset": "authors", "block_size": 16, "decode_rerank": 2},
}


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_candidates_in_a_model(name):
    model = tiny_llama(6, 2, layers=3)
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(5))
    ref_tokens = greedy(model, ids, 30)
    base = {"block_size": 16, "dense_layers": 0, **CANDIDATES[name]}
    if "preset" not in base:
        base["top_k_blocks"] = 2
    full = dict(base, budget_mode="mass", budget_mass=1.0, budget_max_blocks=0, dense_last_blocks=0)
    enable_sketch_walk(model, full)                              # mass 1.0 keeps every block: dense
    assert torch.equal(greedy(model, ids, 30), ref_tokens)
    sess = enable_sketch_walk(model, base)
    greedy(model, ids, 30)                                       # 150 -> 180 tokens: two blocks open in decode
    rep = sess.report()
    assert rep["decode"] < 1.0
