"""decode_rerank: the estimate shortlists R x the budget, the new query's exact attention mass over the shortlist's
keys spends the budget (sketch_walk.selection.shortlist_mass and rerank_plain, SketchWalkSelector._rerank).

Checked against independent float64 computations on fresh random inputs: the restricted mass itself; the lists of
a decode step (forced blocks, then the best of the shortlist by that mass, the shortlist being the plain selector's
lists at R x top_k); with a shortlist of every block, the oracle's decode lists; and inside a small Llama (full
budget = dense, sparse runs cross block boundaries). The Triton shortlist is checked in tests/test_decode_select.py.
"""
from __future__ import annotations

import torch
import pytest

from sketch_walk import SketchWalkConfig, SketchWalkSelector
from sketch_walk.selection import shortlist_mass, spread_to_blocks
from interpreter_child import fresh_seed


def _mass64(q, k, lists, bs, scale):
    """(B, H_kv, nb) float64: per key head g, the mean over its query heads of the softmax mass of each listed block,
    the softmax over the listed blocks' keys only (a plain loop over heads and blocks)."""
    b, h, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    r, nb = h // hkv, -(-n // bs)
    out = torch.zeros(b, hkv, nb, dtype=torch.float64)
    for bi in range(b):
        for g in range(hkv):
            blocks = [int(j) for j in lists[bi, g] if j >= 0]
            pos = [t for j in blocks for t in range(j * bs, min(n, (j + 1) * bs))]
            for hh in range(g * r, (g + 1) * r):
                logit = (k[bi, g, pos].double() @ q[bi, hh, 0].double()) * scale
                p = torch.softmax(logit, 0)
                for t, pt in zip(pos, p):
                    out[bi, g, t // bs] += pt / r
    return out


@pytest.mark.parametrize("select_per", ["layer", "kv_head"])
def test_shortlist_mass_against_float64(select_per):
    gen = torch.Generator().manual_seed(fresh_seed())
    b, h, hkv, d, bs, n = 2, 6, 2, 16, 16, 150                     # partial last block, GQA groups of 3
    q = torch.randn(b, h, 1, d, generator=gen) * 2
    k = torch.randn(b, hkv, n, d, generator=gen)
    nb = -(-n // bs)
    lists = torch.stack([torch.stack([torch.randperm(nb, generator=gen)[:5].sort().values for _ in range(hkv)])
                         for _ in range(b)]).to(torch.int32)
    lists[0, 1, -2:] = -1                                          # padding entries
    lists[1, 0, -1] = nb - 1                                       # the partial block
    lists_g = lists if select_per == "kv_head" else lists[:, :1]
    if select_per == "layer":
        lists[:, 1] = lists[:, 0]                                  # a per-layer list is the same for every key head
    got = spread_to_blocks(shortlist_mass(q, k, lists, bs, 0.3, select_per), lists_g, nb).double()
    ref = _mass64(q, k, lists, bs, 0.3)
    if select_per == "layer":
        ref = ref.mean(dim=1, keepdim=True)
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-5), (got - ref).abs().max()
    assert torch.allclose(ref.sum(-1), torch.full_like(ref.sum(-1), 1.0))


def _prefilled(cfg, q, k, n0):
    sel = SketchWalkSelector(cfg)
    sel.backend = "torch"
    sel.reset(q.shape[0])
    for layer in (0, 1):
        sel.select_prefill(layer, None, q[:, :, :n0], k[:, :, :n0])
    return sel


@pytest.mark.parametrize("select_per", ["layer", "kv_head"])
def test_decode_lists_are_the_shortlist_reranked(select_per):
    """Over decode steps crossing a block boundary: rerank R=3 keeps sink + diagonal + the top_k blocks of the plain
    selector's R x top_k lists by the float64 restricted mass (ties aside), and differs from the plain lists."""
    gen = torch.Generator().manual_seed(fresh_seed())
    bs, n0, steps, h, hkv, d, top_k, rr = 16, 16 * 12 - 2, 6, 4, 2, 32, 2, 3
    q = torch.randn(1, h, n0 + steps, d, generator=gen) * 2
    k = torch.randn(1, hkv, n0 + steps, d, generator=gen)
    base = dict(block_size=bs, dense_layers=0, select_per=select_per)
    sel = _prefilled(SketchWalkConfig(top_k_blocks=top_k, decode_rerank=rr, **base), q, k, n0)
    wide = _prefilled(SketchWalkConfig(top_k_blocks=top_k * rr, **base), q, k, n0)
    plain = _prefilled(SketchWalkConfig(top_k_blocks=top_k, **base), q, k, n0)
    scale, differs = d ** -0.5, 0
    for t in range(n0, n0 + steps):
        for layer in (0, 1):
            qt, kt = q[:, :, t:t + 1], k[:, :, :t + 1]
            idx, cnt = sel.select_decode(layer, None, qt, kt)
            short, _ = wide.select_decode(layer, None, qt, kt)
            pidx, _ = plain.select_decode(layer, None, qt, kt)
            nb = -(-(t + 1) // bs)
            mass = _mass64(qt, kt, short, bs, scale)
            if select_per == "layer":
                mass = mass.mean(dim=1, keepdim=True).expand(-1, hkv, -1)
            for g in range(hkv):
                got = {int(j) for j in idx[0, g] if j >= 0}
                cands = [int(j) for j in short[0, g] if 0 < j < nb - 1]
                best = sorted(cands, key=lambda j: (-float(mass[0, g, j]), -j))[:top_k]
                assert got == {0, nb - 1, *best}, (t, layer, g, got, best)
                assert int(cnt[0, g]) == len(got) == 2 + top_k
                differs += got != {int(j) for j in pidx[0, g] if j >= 0}
    assert differs > 0                                              # the rerank changed some choices


def test_full_shortlist_is_the_oracle():
    """A shortlist of every block makes the restricted mass the exact one: the lists equal the oracle's in decode."""
    gen = torch.Generator().manual_seed(fresh_seed())
    bs, n0, h, hkv, d = 16, 16 * 8 - 5, 4, 2, 32
    q = torch.randn(1, h, n0 + 3, d, generator=gen) * 2
    k = torch.randn(1, hkv, n0 + 3, d, generator=gen)
    base = dict(block_size=bs, dense_layers=0, top_k_blocks=2, select_per="kv_head")
    sel = _prefilled(SketchWalkConfig(decode_rerank=64, **base), q, k, n0)
    oracle = SketchWalkSelector(SketchWalkConfig(selector="oracle", **base))
    for t in range(n0, n0 + 3):
        for layer in (0, 1):
            a = sel.select_decode(layer, None, q[:, :, t:t + 1], k[:, :, :t + 1])
            o = oracle.select_decode(layer, None, q[:, :, t:t + 1], k[:, :, :t + 1])
            assert torch.equal(a[0], o[0]) and torch.equal(a[1], o[1]), (t, layer, a, o)


def test_rerank_knob_validation():
    from sketch_walk.core.errors import UsageError
    with pytest.raises(UsageError, match="--decode_rerank 1"):
        SketchWalkConfig(decode_rerank=1)
    assert "decode_rerank" in SketchWalkConfig(decode_rerank=4, skip_decode=True).inactive_knobs()
