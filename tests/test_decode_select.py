"""Triton decode selection (sketch_walk.kernels.decode_select) against float64 math and the torch path.

As in tests/test_kernels.py, on CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, fp32)
in a child process (this file run as a script with ``--worker``), which computes every case; each
pytest case checks its own numbers. On a CUDA machine the same cases run in-process (plus larger
ones, a CUDA-graph capture and replay of the selector's decode step).

Kernel cases: fresh random inputs (the seed is printed), outputs and scratch buffers poisoned (NaN /
-7) and W_cache's row n_b - 1 poisoned before the call. Checked: the walk row r against a float64
reference written here (fold, scores, softmax, head mean, a ** s, walk); the folded Kmax / Kmin /
counts exactly; W_cache's new row against float64 w and every other entry untouched; the lists
equal select_blocks on the kernel's own row (always) and on the float64 row and the torch path's
lists when the top-k boundary is well separated.
Selector cases: prefill (torch path) then decode steps that cross a block boundary, the same
selector state driven by the torch path and by the Triton path: equal lists at every step, equal
running summaries at the end, close walk rows and W_cache.
"""
from __future__ import annotations

import copy
import sys
import time
from typing import Dict, List

import pytest
import torch
from interpreter_child import child_results, fresh_seed, run_cases


R_BOUND = {"cpu": 1e-5, "cuda": 1e-4}         # ||r - r64|| / ||r64|| (sharpening by s=8 amplifies rounding 8x)
SEP = 1e-3                                     # relative gap at the top-k boundary that makes lists comparable

SMALL_TILES = dict(BLOCK_N=16, BLOCK_J=32, BLOCK_I=32, SUB_I=16, BLOCK_J2=32, BLOCK_T=2)

CASES: List[Dict] = [
    dict(name="nb5_dense", nb=5, h=4, hkv=2),
    dict(name="nb37_layer", nb=37, h=4, hkv=2),
    dict(name="nb37_kvhead", nb=37, h=4, hkv=2, select_per="kv_head"),
    dict(name="nb37_first_layer", nb=37, h=2, hkv=1, prev=False),
    dict(name="nb37_new_block", nb=37, h=4, hkv=2, new_block=True),
    dict(name="nb130_small_tiles", nb=130, h=4, hkv=2, tiles=SMALL_TILES),
    dict(name="nb130_kvhead_small_tiles_b2", nb=130, h=4, hkv=2, b=2, select_per="kv_head", tiles=SMALL_TILES),
    dict(name="nb130_g1", nb=130, h=2, hkv=1),
    dict(name="nb130_one_hop_s1", nb=130, h=4, hkv=2, beta=0.0, s=1.0),
    dict(name="nb130_s1_walk", nb=130, h=4, hkv=2, s=1.0),
    dict(name="nb37_mean", nb=37, h=4, hkv=2, mean=True),
    dict(name="nb130_mean_kvhead", nb=130, h=4, hkv=2, mean=True, select_per="kv_head", tiles=SMALL_TILES),
    dict(name="nb130_sink2_local2", nb=130, h=4, hkv=2, n_sink=2, n_local=2),
]

GPU_CASES: List[Dict] = [
    dict(name="llama_128k", nb=2048, h=32, hkv=8, d=128),
    dict(name="llama_128k_kvhead", nb=2048, h=32, hkv=8, d=128, select_per="kv_head"),
    dict(name="llama_odd_nb_new_block", nb=1999, h=32, hkv=8, d=128, new_block=True),
    dict(name="smollm_gqa3", nb=700, h=9, hkv=3, d=64),
]

SELECTOR_CASES: List[Dict] = [
    dict(name="minmax_layer"),
    dict(name="minmax_kvhead_window3", select_per="kv_head", decode_query_window=3),
    dict(name="mean_layer", key_summary="mean", sketch_dim=16),
    dict(name="minmax_one_hop", walk_damping=0.0),
    dict(name="minmax_kvhead_rerank2", select_per="kv_head", decode_rerank=2),   # the shortlist from the kernels
]


# ----------------------------------------------------------------------------------------------
# Inputs and the float64 reference
# ----------------------------------------------------------------------------------------------

def make_inputs(case: Dict, gen: torch.Generator):
    b, h, hkv, nb = case.get("b", 1), case["h"], case["hkv"], case["nb"]
    d = case.get("d", 64)
    dq = 32 if case.get("mean") else d
    cap = nb + 3
    g_w = 1 if case.get("select_per", "layer") == "layer" else hkv
    q = torch.randn(b, h, dq, generator=gen)
    ka = torch.randn(b, hkv, cap, dq, generator=gen)
    kb = None if case.get("mean") else ka - torch.rand(b, hkv, cap, dq, generator=gen) * 2
    k_new = None if case.get("mean") else torch.randn(b, hkv, dq, generator=gen)
    counts = torch.randint(1, 16, (cap,), generator=gen).double()
    # a causal, row-stochastic, sharpened transition like the prefill's (zeros above the diagonal)
    logits = torch.randn(b, g_w, cap, cap, generator=gen) * 2
    w_cache = logits.masked_fill(torch.ones(cap, cap, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    r_prev = torch.rand(b, 1, nb, generator=gen).pow(4)
    r_prev = r_prev / r_prev.sum(-1, keepdim=True)
    if g_w > 1:                                        # a kv_head walk state: one row per key head
        r_prev = torch.rand(b, g_w, nb, generator=gen).pow(4)
        r_prev = r_prev / r_prev.sum(-1, keepdim=True)
    return dict(q=q, summ_a=ka, summ_b=kb, k_new=k_new, counts=counts, w_cache=w_cache,
                r_prev=r_prev if case.get("prev", True) else None)


def reference64(inp: Dict, case: Dict, scale: float):
    """r (B, G', nb), w (B, G', nb), folded summaries and counts, in float64, written from the algorithm."""
    nb, hkv = case["nb"], case["hkv"]
    beta, s = case.get("beta", 0.25), case.get("s", 8.0)
    q = inp["q"].double()
    b, h, dq = q.shape
    r = h // hkv
    ka = inp["summ_a"].double().clone()
    kb = None if inp["summ_b"] is None else inp["summ_b"].double().clone()
    counts = inp["counts"].clone()
    if inp["k_new"] is not None:
        kn = inp["k_new"].double()
        if case.get("new_block"):
            ka[:, :, nb - 1], kb[:, :, nb - 1], counts[nb - 1] = kn, kn, 1
        else:
            ka[:, :, nb - 1] = torch.maximum(ka[:, :, nb - 1], kn)
            kb[:, :, nb - 1] = torch.minimum(kb[:, :, nb - 1], kn)
            counts[nb - 1] += 1
    kah = ka[:, :, :nb].repeat_interleave(r, dim=1)                  # (B, H, nb, dq)
    if kb is None:
        sc = torch.einsum("bhd,bhnd->bhn", q, kah) * scale
    else:
        kbh = kb[:, :, :nb].repeat_interleave(r, dim=1)
        sc = (torch.einsum("bhd,bhnd->bhn", q.clamp(min=0), kah) +
              torch.einsum("bhd,bhnd->bhn", q.clamp(max=0), kbh)) * scale
    p = sc.softmax(-1)
    a = p.mean(1, keepdim=True) if case.get("select_per", "layer") == "layer" else p.view(b, hkv, r, nb).mean(2)
    w = a ** s / (a ** s).sum(-1, keepdim=True)
    if beta > 0:
        wc = inp["w_cache"][:, :, :nb, :nb].double().clone()
        wc[:, :, nb - 1] = w
        if inp["r_prev"] is None:
            hop = w
        else:
            rp = inp["r_prev"].double()
            rp = rp.mean(1, keepdim=True) if rp.shape[1] > 1 else rp
            hop = torch.einsum("bgi,bgij->bgj", rp.expand(b, w.shape[1], nb), wc)
        v = (1 - beta) * w + beta * hop
        rr = v / v.sum(-1, keepdim=True)
    else:
        rr = w
    return rr, w, ka, kb, counts


def separated(row: torch.Tensor, nb: int, n_sink: int, n_local: int, k: int) -> bool:
    """Every row (..., nb) has a clear gap between its k-th and (k+1)-th largest candidate."""
    cand = row[..., n_sink:nb - n_local].double()
    if cand.shape[-1] <= k:
        return True
    v = cand.sort(-1, descending=True).values
    return bool(((v[..., k - 1] - v[..., k]) > SEP * v[..., k - 1]).all())


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    den = ref.norm().item()
    return (x.double() - ref).norm().item() / (den if den > 0 else 1.0)


def run_case(case: Dict, device: str, seed: int) -> Dict:
    from sketch_walk.kernels import decode_select as ds
    from sketch_walk.selection import expand_to_kv_heads, select_blocks
    gen = torch.Generator().manual_seed(seed)
    inp = make_inputs(case, gen)
    nb, hkv = case["nb"], case["hkv"]
    n_sink, n_local, top_k = case.get("n_sink", 1), case.get("n_local", 1), case.get("top_k", 4)
    scale = 0.125
    knobs = dict(select_per=case.get("select_per", "layer"), sparsity_exponent=case.get("s", 8.0),
                 walk_damping=case.get("beta", 0.25), n_sink=n_sink, n_local=n_local, top_k_blocks=top_k)
    r64, w64, ka64, kb64, counts64 = reference64(inp, case, scale)
    b = inp["q"].shape[0]
    g_w = r64.shape[1]
    max_kept = min(nb, n_sink + n_local + top_k)

    dev = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inp.items()}
    if dev["summ_b"] is not None:                              # summaries live in the state, fp32
        dev["summ_b"] = dev["summ_b"].contiguous()
    if knobs["walk_damping"] > 0:
        dev["w_cache"][:, :, nb - 1, :nb] = float("nan")       # poison: the kernel must write the new row
    w_before = dev["w_cache"].clone()
    out = (torch.full((b, hkv, max_kept), -7, dtype=torch.int32, device=device),
           torch.full((b, hkv), -7, dtype=torch.int32, device=device),
           torch.full((b, g_w, nb), float("nan"), device=device))
    ds.POISON_SCRATCH = True
    t0 = time.time()
    try:
        idx, cnt, rr = ds.decode_select_triton(dev["q"], dev["summ_a"], dev["summ_b"], nb, scale, **knobs,
                                               w_cache=dev["w_cache"], r_prev=dev["r_prev"], k_new=dev["k_new"],
                                               counts=dev["counts"], new_block=case.get("new_block", False),
                                               out=out, config=case.get("tiles"))
        if device == "cuda":
            torch.cuda.synchronize()
    finally:
        ds.POISON_SCRATCH = False
    secs = time.time() - t0
    idx, cnt, rr = idx.cpu(), cnt.cpu(), rr.cpu()
    wc = dev["w_cache"].cpu()
    res: Dict = dict(seed=seed, secs=secs, r_err=_rel(rr, r64), r_written=not bool(torch.isnan(rr).any()))
    if knobs["walk_damping"] > 0:
        res["w_row_err"] = _rel(wc[:, :, nb - 1, :nb], w64)
        keep = torch.ones_like(wc, dtype=torch.bool)
        keep[:, :, nb - 1, :nb] = False
        res["w_cache_rest_untouched"] = bool(torch.equal(wc[keep], w_before.cpu()[keep]))
    else:
        res["w_cache_untouched"] = bool(torch.equal(wc, w_before.cpu()))
    if inp["k_new"] is not None:
        res["fold_exact"] = bool(torch.equal(dev["summ_a"].cpu().double(), ka64) and
                                 torch.equal(dev["summ_b"].cpu().double(), kb64) and
                                 torch.equal(dev["counts"].cpu(), counts64))
    row = torch.full((1,), nb - 1, dtype=torch.long)
    own_i, own_c = expand_to_kv_heads(*select_blocks(rr.unsqueeze(-2), row, n_sink, n_local, top_k), hkv)
    res["lists_eq_own_row"] = bool(torch.equal(idx, own_i.squeeze(-2)) and torch.equal(cnt, own_c.squeeze(-1)))
    res["lists"] = idx[0, 0].tolist()
    sep = separated(r64, nb, n_sink, n_local, top_k)
    res["separated"] = sep
    if sep:
        ref_i, ref_c = expand_to_kv_heads(*select_blocks(r64.float().unsqueeze(-2), row, n_sink, n_local, top_k),
                                          hkv)
        res["lists_eq_ref_row"] = bool(torch.equal(idx, ref_i.squeeze(-2)) and torch.equal(cnt, ref_c.squeeze(-1)))
        # the torch path (decode_select_reference) on fresh copies of the same inputs
        t = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inp.items()}
        ti, tc, tr = ds.decode_select_reference(t["q"], t["summ_a"], t["summ_b"], nb, scale, **knobs,
                                                w_cache=t["w_cache"], r_prev=t["r_prev"], k_new=t["k_new"],
                                                counts=t["counts"], new_block=case.get("new_block", False))
        res["lists_eq_torch_path"] = bool(torch.equal(idx, ti) and torch.equal(cnt, tc))
        res["torch_path_r_err"] = _rel(tr, r64)
    return res


def check_case(res: Dict, device: str) -> None:
    assert "error" not in res, res.get("error")
    assert res["r_written"], f"r left unwritten: {res}"
    assert res["r_err"] <= R_BOUND[device], f"walk row error {res['r_err']:.2e} > {R_BOUND[device]}: {res}"
    if "w_row_err" in res:
        assert res["w_row_err"] <= R_BOUND[device], f"W_cache row error {res['w_row_err']:.2e}: {res}"
        assert res["w_cache_rest_untouched"], f"W_cache changed outside row n_b - 1: {res}"
    else:
        assert res["w_cache_untouched"], f"one-hop decode touched W_cache: {res}"
    if "fold_exact" in res:
        assert res["fold_exact"], f"Kmax / Kmin / counts after the fold differ from the reference: {res}"
    assert res["lists_eq_own_row"], f"lists differ from select_blocks on the kernel's own row: {res}"
    if res["separated"]:
        assert res["lists_eq_ref_row"], f"lists differ from select_blocks on the float64 row: {res}"
        assert res["lists_eq_torch_path"], f"lists differ from the torch path's: {res}"


# ----------------------------------------------------------------------------------------------
# Selector: torch path vs Triton path over decode steps that cross a block boundary
# ----------------------------------------------------------------------------------------------

def run_selector_case(case: Dict, device: str, seed: int) -> Dict:
    from sketch_walk import SketchWalkConfig, SketchWalkSelector
    gen = torch.Generator().manual_seed(seed)
    bs, n0, steps, h, hkv, d = 16, 16 * 6 - 3, 20, 4, 2, 32       # decode positions 93..112: blocks open at 96, 112
    q = torch.randn(1, h, n0 + steps, d, generator=gen)
    k = torch.randn(1, hkv, n0 + steps, d, generator=gen)
    q, k = q.to(device), k.to(device)
    knobs = {x: v for x, v in case.items() if x != "name"}
    cfg = SketchWalkConfig(block_size=bs, top_k_blocks=2, dense_layers=0, **knobs)
    sels = {}
    for backend in ("torch", "triton"):
        sel = SketchWalkSelector(cfg)
        sel.backend = backend
        sels[backend] = sel
    base = sels["torch"]
    base.reset(1)
    for layer in (0, 1):                    # one prefill (whatever its backend), the same state for both paths
        base.select_prefill(layer, None, q[:, :, :n0], k[:, :, :n0])
    sels["triton"].state = copy.deepcopy(base.state)
    assert sels["triton"]._fused_decode(q.device) and not sels["torch"]._fused_decode(q.device)
    res: Dict = dict(seed=seed, mismatches=[], r_err=0.0)
    t0 = time.time()
    for t in range(n0, n0 + steps):
        for layer in (0, 1):
            out = {bk: sel.select_decode(layer, None, q[:, :, t:t + 1], k[:, :, :t + 1]) for bk, sel in sels.items()}
            (i0, c0), (i1, c1) = out["torch"], out["triton"]
            if not (torch.equal(i0.cpu(), i1.cpu()) and torch.equal(c0.cpu(), c1.cpu())):
                res["mismatches"].append(dict(t=t, layer=layer, torch=i0.cpu().tolist(), triton=i1.cpu().tolist()))
            if cfg.walk_damping > 0:
                res["r_err"] = max(res["r_err"], _rel(sels["triton"].state.decode_r.cpu(),
                                                      sels["torch"].state.decode_r.cpu().double()))
    res["secs"] = time.time() - t0
    s0, s1 = sels["torch"].state.layers[1], sels["triton"].state.layers[1]
    nb = s0.keys.n_blocks
    res["n_equal"] = s0.keys.n == s1.keys.n == n0 + steps
    res["counts_exact"] = bool(torch.equal(s0.keys.counts[:nb].cpu(), s1.keys.counts[:nb].cpu()))
    if s0.keys.kmax is not None:
        res["minmax_exact"] = bool(torch.equal(s0.keys.kmax[:, :, :nb].cpu(), s1.keys.kmax[:, :, :nb].cpu()) and
                                   torch.equal(s0.keys.kmin[:, :, :nb].cpu(), s1.keys.kmin[:, :, :nb].cpu()))
    if s0.w_cache is not None:
        res["w_cache_err"] = _rel(s1.w_cache[:, :, :nb, :nb].cpu(), s0.w_cache[:, :, :nb, :nb].cpu().double())
    return res


def check_selector_case(res: Dict, device: str) -> None:
    assert "error" not in res, res.get("error")
    assert not res["mismatches"], f"Triton and torch decode paths chose different blocks: {res}"
    assert res["n_equal"] and res["counts_exact"], res
    assert res.get("minmax_exact", True), f"running Kmax / Kmin differ: {res}"
    assert res["r_err"] <= R_BOUND[device] and res.get("w_cache_err", 0.0) <= R_BOUND[device], res


_fresh_seed = fresh_seed


# ----------------------------------------------------------------------------------------------
# The interpreter child
# ----------------------------------------------------------------------------------------------

def _worker() -> None:
    run_cases([("kernel", CASES, lambda c, seed: run_case(c, "cpu", seed)),
               ("selector", SELECTOR_CASES, lambda c, seed: run_selector_case(c, "cpu", seed))])


@pytest.fixture(scope="module")
def interpreter_results() -> Dict[str, Dict]:
    return child_results(__file__)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_decode_select_interpreter(case, interpreter_results):
    res = interpreter_results[f"kernel/{case['name']}"]
    print(f"seed {res.get('seed')}")
    check_case(res, "cpu")


@pytest.mark.parametrize("case", SELECTOR_CASES, ids=lambda c: c["name"])
def test_selector_decode_triton_equals_torch_interpreter(case, interpreter_results):
    res = interpreter_results[f"selector/{case['name']}"]
    print(f"seed {res.get('seed')}")
    check_selector_case(res, "cpu")


# ----------------------------------------------------------------------------------------------
# GPU; skipped without CUDA
# ----------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize("case", CASES + GPU_CASES, ids=lambda c: c["name"])
def test_decode_select_gpu(case):
    seed = _fresh_seed()
    print(f"seed {seed}")
    check_case(run_case(case, "cuda", seed), "cuda")


@cuda_only
@pytest.mark.parametrize("case", SELECTOR_CASES, ids=lambda c: c["name"])
def test_selector_decode_triton_equals_torch_gpu(case):
    seed = _fresh_seed()
    print(f"seed {seed}")
    check_selector_case(run_selector_case(case, "cuda", seed), "cuda")


@cuda_only
def test_selector_decode_cuda_graph_replay():
    """The fused decode step of two sparse layers (Llama-3.1-8B heads, 2K blocks of 16 tokens; the second layer
    walks from the first's row) is captured in one CUDA graph, and its replay gives the eager lists."""
    from sketch_walk import SketchWalkConfig, SketchWalkSelector
    g = torch.Generator(device="cuda").manual_seed(_fresh_seed())
    n, h, hkv, d = 2048 * 16, 32, 8, 128
    q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    sel = SketchWalkSelector(SketchWalkConfig(block_size=16, top_k_blocks=16))
    sel.reset(1)
    for layer in (2, 3):
        sel.select_prefill(layer, None, q[:, :, :n - 1], k[:, :, :n - 1])
    assert sel._fused_decode(q.device)
    saved = {layer: (st.keys.kmax.clone(), st.keys.kmin.clone(), st.keys.counts.clone())
             for layer, st in sel.state.layers.items()}

    def rewind():                                   # the same step again: host counters and device summaries
        sel.state.decode_r_len = -1
        for layer, st in sel.state.layers.items():
            st.keys.n = n - 1
            for dst, src in zip((st.keys.kmax, st.keys.kmin, st.keys.counts), saved[layer]):
                dst.copy_(src)

    def step():
        out2 = sel.select_decode(2, None, q[:, :, n - 1:], k)
        return out2, sel.select_decode(3, None, q[:, :, n - 1:], k)
    rewind()
    eager = [x.clone() for pair in step() for x in pair]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            rewind()
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rewind()
        captured = [x for pair in step() for x in pair]
    for x in captured:
        x.fill_(-5)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
