"""decode_rerank: the estimate shortlists R x the budget, the new query's exact attention mass over the shortlist's
keys spends the budget (sketch_walk.selection.shortlist_mass and rerank_plain, SketchWalkSelector._rerank).

Checked against independent float64 computations on fresh random inputs: the restricted mass itself; the lists of
a decode step (forced blocks, then the best of the shortlist by that mass, the shortlist being the plain selector's
lists at R x top_k); with a shortlist of every block, the oracle's decode lists; and inside a small Llama (full
budget = dense, sparse runs cross block boundaries). The Triton shortlist is checked in tests/test_decode_select.py.
"""
from __future__ import annotations

import sys

import pytest
import torch

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
    base = dict(block_size=bs, dense_layers=0, select_per=select_per, dense_last_blocks=0)
    sel = _prefilled(SketchWalkConfig(top_k_blocks=top_k, decode_rerank=rr, **base), q, k, n0)
    wide = _prefilled(SketchWalkConfig(top_k_blocks=top_k * rr, decode_rerank=0, **base), q, k, n0)
    plain = _prefilled(SketchWalkConfig(top_k_blocks=top_k, decode_rerank=0, **base), q, k, n0)
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


def test_rerank_kernel_is_the_gpu_default(monkeypatch):
    """The Triton re-ranking runs wherever the selector's backend is Triton (the GPU's: 'auto' on CUDA) unless
    SKETCH_WALK_RERANK_KERNEL=0; the torch backend (the CPU's) never runs it."""
    sel = SketchWalkSelector(SketchWalkConfig(decode_rerank=4))
    cuda = torch.device("cuda")
    monkeypatch.delenv("SKETCH_WALK_RERANK_KERNEL", raising=False)
    monkeypatch.delenv("SKETCH_WALK_ATTN_BACKEND", raising=False)
    assert sel._rerank_kernel(cuda) and not sel._rerank_kernel(torch.device("cpu"))
    monkeypatch.setenv("SKETCH_WALK_RERANK_KERNEL", "0")
    assert not sel._rerank_kernel(cuda)
    monkeypatch.setenv("SKETCH_WALK_RERANK_KERNEL", "1")
    sel.backend = "torch"
    assert not sel._rerank_kernel(cuda)


# ----------------------------------------------------------------------------------------------
# The Triton re-ranking (sketch_walk.kernels.rerank_select) under the interpreter, and on a GPU
# ----------------------------------------------------------------------------------------------

KERNEL_CASES = [dict(name="layer", select_per="layer"), dict(name="kv_head", select_per="kv_head"),
                dict(name="kv_head_static", select_per="kv_head", static=True)]


def run_kernel_case(case, device, seed):
    """Random inputs; the kernel's entry masses against the float64 restricted mass, its lists against
    rerank_plain on its own masses (exactly) and on the torch masses (where the budget's edge is separated)."""
    from sketch_walk.kernels.rerank_select import rerank_select_triton
    from sketch_walk.selection import RowRule, rerank_plain
    gen = torch.Generator().manual_seed(seed)
    b, h, hkv, d, bs, n, w, top_k = 2, 6, 2, 48, 16, 300, 9, 3             # d not a power of two; partial last block
    nb = -(-n // bs)
    q = torch.randn(b, h, 1, d, generator=gen) * 2
    k = torch.randn(b, hkv, n, d, generator=gen)
    if case["select_per"] == "layer":
        one = torch.cat([torch.tensor([0]), 1 + torch.randperm(nb - 2, generator=gen)[:w - 3].sort().values,
                         torch.tensor([nb - 1])])
        lists = one.expand(b, hkv, w - 1).clone()
    else:
        lists = torch.stack([torch.stack([torch.cat([torch.tensor([0]), 1 + torch.randperm(nb - 2, generator=gen)
                                                     [:w - 3].sort().values, torch.tensor([nb - 1])])
                                          for _ in range(hkv)]) for _ in range(b)])
    lists = torch.cat([lists, torch.full((b, hkv, 1), -1)], dim=-1).to(torch.int32)   # one padded entry
    scale = d ** -0.5
    cache, n_valid = k, None
    if case.get("static"):                                  # a longer buffer holding garbage past the cache
        cache = torch.cat([k, torch.randn(b, hkv, 40, d, generator=gen) * 50], dim=2)
        n_valid = torch.tensor(n)
    dev = lambda x: None if x is None else x.to(device)     # noqa: E731
    idx, cnt, sc = rerank_select_triton(dev(q), dev(cache), dev(lists), nb, scale, block_size=bs,
                                        select_per=case["select_per"], n_sink=1, n_local=1, top_k=top_k,
                                        n_valid=dev(n_valid), return_scores=True)
    idx, cnt, sc = idx.cpu(), cnt.cpu(), sc.cpu()
    g_lists = lists if case["select_per"] == "kv_head" else lists[:, :1]
    ref = _mass64(q, k, lists, bs, scale)                  # (B, H_kv, nb)
    if case["select_per"] == "layer":
        ref = ref.mean(dim=1, keepdim=True)
    ref_w = torch.gather(ref, -1, g_lists.long().clamp_min(0)) * (g_lists >= 0)
    rule = RowRule(top_k=top_k)
    own = rerank_plain(sc, g_lists, nb, rule)
    torch_sc = shortlist_mass(q, k, lists, bs, scale, case["select_per"])
    via_torch = rerank_plain(torch_sc, g_lists, nb, rule)
    expand = (lambda x: x.expand(b, hkv, *x.shape[2:])) if case["select_per"] == "layer" else (lambda x: x)
    srt = ref_w.sort(dim=-1, descending=True).values       # entries' masses, best first (forced ones included)
    gap = float((srt[..., 2 + top_k - 1] - srt[..., 2 + top_k]).abs().min()) if srt.shape[-1] > 2 + top_k else 1.0
    return dict(seed=seed, score_err=float((sc.double() - ref_w).abs().max()),
                own=bool(torch.equal(idx, expand(own[0])) and torch.equal(cnt, expand(own[1]))),
                torch_equal=bool(torch.equal(idx, expand(via_torch[0]))), separated=gap > 1e-4)


def check_kernel_case(res):
    assert "error" not in res, res.get("error")
    assert res["score_err"] < 1e-5, res
    assert res["own"], f"lists differ from rerank_plain on the kernel's own masses: {res}"
    if res["separated"]:
        assert res["torch_equal"], f"lists differ from the torch path's: {res}"


def run_selector_case(case, device, seed):
    """The selector with SKETCH_WALK_RERANK_KERNEL=1 on the Triton backend against the torch path, decode steps across
    a block boundary: mismatching steps, if any, and whether their budget edges were near ties."""
    import os
    gen = torch.Generator().manual_seed(seed)
    bs, n0, steps, h, hkv, d = 16, 16 * 10 - 2, 4, 4, 2, 32
    q = (torch.randn(1, h, n0 + steps, d, generator=gen) * 2).to(device)
    k = torch.randn(1, hkv, n0 + steps, d, generator=gen).to(device)
    cfg = SketchWalkConfig(block_size=bs, top_k_blocks=2, dense_layers=0, decode_rerank=3,
                           select_per=case["select_per"])
    sels = {bk: _prefilled(cfg, q, k, n0) for bk in ("torch", "triton")}
    sels["triton"].backend = "triton"
    os.environ["SKETCH_WALK_RERANK_KERNEL"] = "1"
    try:
        assert sels["triton"]._rerank_kernel(q.device) and not sels["torch"]._rerank_kernel(q.device)
        bad = []
        for t in range(n0, n0 + steps):
            for layer in (0, 1):
                a, b_ = (sels[bk].select_decode(layer, None, q[:, :, t:t + 1], k[:, :, :t + 1]) for bk in ("torch", "triton"))
                if not (torch.equal(a[0].cpu(), b_[0].cpu()) and torch.equal(a[1].cpu(), b_[1].cpu())):
                    bad.append(dict(t=t, layer=layer, torch=a[0].cpu().tolist(), triton=b_[0].cpu().tolist()))
    finally:
        os.environ.pop("SKETCH_WALK_RERANK_KERNEL", None)
    return dict(seed=seed, mismatches=bad)


def _worker():
    from interpreter_child import run_cases
    run_cases([("kernel", KERNEL_CASES, lambda c, seed: run_kernel_case(c, "cpu", seed)),
               ("selector", KERNEL_CASES[:2], lambda c, seed: run_selector_case(c, "cpu", seed))])


@pytest.fixture(scope="module")
def interpreter_results():
    from interpreter_child import child_results
    return child_results(__file__)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c["name"])
def test_rerank_kernel_interpreter(case, interpreter_results):
    check_kernel_case(interpreter_results[f"kernel/{case['name']}"])


@pytest.mark.parametrize("case", KERNEL_CASES[:2], ids=lambda c: c["name"])
def test_selector_with_rerank_kernel_interpreter(case, interpreter_results):
    res = interpreter_results[f"selector/{case['name']}"]
    assert "error" not in res, res.get("error")
    assert not res["mismatches"], f"the kernel's re-ranking chose other blocks than the torch path's: {res}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", KERNEL_CASES[:2], ids=lambda c: c["name"])
def test_selector_with_rerank_kernel_gpu(case):
    res = run_selector_case(case, "cuda", fresh_seed())
    assert not res["mismatches"], res


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c["name"])
def test_rerank_kernel_gpu(case):
    check_kernel_case(run_kernel_case(case, "cuda", fresh_seed()))


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
