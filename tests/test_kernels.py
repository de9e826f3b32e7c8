"""Triton block-sparse kernels (prefill and decode) against the float64 PyTorch references.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1) in fp16/fp32 (bf16 dots
are wrong under the interpreter). Triton reads TRITON_INTERPRET when a kernel is decorated, i.e.
when the kernel module is imported, so the interpreter runs in a child process (this file run as
a script with ``--worker``): the pytest process and the other test files stay untouched. One
child computes every case; each pytest case checks its own numbers.
On a CUDA machine the same cases run in-process in bf16 (and a few larger ones).

Every check: fresh random inputs (the seed is printed), outputs poisoned with NaN before the
call and passed in as ``out``/``lse`` (so an unwritten element fails), reference =
``block_sparse_*_reference`` on the inputs upcast to float64, relative error
||out - ref|| / ||ref|| within the usual bounds (fp32 far under 1e-3, fp16 ~1e-3, bf16
1e-3..1e-2), lse compared on finite entries with the -inf pattern identical.
"""
from __future__ import annotations

import sys
import time
from typing import Dict, List

import pytest
import torch
from interpreter_child import child_results, fresh_seed, run_cases


# out bound, lse bound, per input dtype (interpreter fp32 dots are exact fp32; GPU fp32 dots are tf32)
BOUNDS = {"float32": (1e-5, 1e-5), "float16": (2e-3, 1e-4), "bfloat16": (1e-2, 1e-3)}
GPU_BOUNDS = {"float32": (2e-3, 1e-3), "float16": (2e-3, 1e-3), "bfloat16": (1e-2, 1e-3)}

# name -> shape and list kind. lists: random (sink + diagonal + random others), diag, full,
# no_diag (random, diagonal left out, first row empty), sparse_k (sink + diag + top-k-like random k).
PREFILL_CASES: List[Dict] = [
    dict(name="gqa1_d64_partial", b=1, h=2, hkv=2, n=100, d=64, bs=16, lists="random", dtype="float32"),
    dict(name="gqa3_d64_partial", b=1, h=6, hkv=2, n=77, d=64, bs=16, lists="random", dtype="float16"),
    dict(name="gqa4_d128_batch2", b=2, h=8, hkv=2, n=150, d=128, bs=32, lists="random", dtype="float16"),
    dict(name="gqa4_d64_diag_only", b=1, h=8, hkv=2, n=96, d=64, bs=16, lists="diag", dtype="float32"),
    dict(name="gqa4_d128_full", b=1, h=4, hkv=1, n=130, d=128, bs=16, lists="full", dtype="float16"),
    dict(name="gqa2_d256", b=1, h=4, hkv=2, n=72, d=256, bs=16, lists="random", dtype="float16"),
    # Gemma-3-270M's full-attention geometry: 4 query heads on one key head, head dim 256
    dict(name="gemma_d256_hkv1", b=1, h=4, hkv=1, n=72, d=256, bs=16, lists="random", dtype="float16"),
    dict(name="gqa4_bs64_topk", b=2, h=8, hkv=2, n=300, d=64, bs=64, lists="sparse_k", dtype="float16"),
    dict(name="gqa3_no_diag_empty_rows", b=2, h=6, hkv=2, n=90, d=64, bs=16, lists="no_diag", dtype="float32"),
    dict(name="gqa4_d80_noncontig", b=1, h=4, hkv=1, n=70, d=80, bs=16, lists="random", dtype="float32",
         noncontig=True),
    dict(name="gqa4_hpp1_kpi1", b=1, h=8, hkv=2, n=120, d=64, bs=16, lists="random", dtype="float16",
         cfg=dict(HPP=1, KPI=1)),
    dict(name="gqa4_hpp2_kpi4", b=1, h=8, hkv=2, n=200, d=64, bs=16, lists="random", dtype="float16",
         cfg=dict(HPP=2, KPI=4)),
    # sliding-window layers (Gemma-3): window lists, token-level mask at the window's lower edge; with KPI 1
    # a step holds one block, so rows whose whole step is outside the window occur (no NaN allowed)
    dict(name="window_gemma_d256_hkv1", b=1, h=4, hkv=1, n=150, d=256, bs=16, lists="window", window=40,
         dtype="float16"),
    dict(name="window_33_batch2_kpi2", b=2, h=4, hkv=2, n=200, d=64, bs=16, lists="window", window=33,
         dtype="float32"),
    dict(name="window_32_kpi1", b=1, h=4, hkv=2, n=130, d=64, bs=16, lists="window", window=32, dtype="float32",
         cfg=dict(HPP=1, KPI=1)),
]

DECODE_CASES: List[Dict] = [
    dict(name="gqa4_d128_batch2", b=2, h=8, hkv=2, n=1000, d=128, bs=16, lists="random", dtype="float32"),
    dict(name="gqa3_d64_bps1", b=2, h=12, hkv=4, n=150, d=64, bs=32, lists="random", dtype="float16", bps=1),
    dict(name="gqa1_d256_bps2", b=1, h=2, hkv=2, n=100, d=256, bs=16, lists="random", dtype="float16", bps=2),
    dict(name="gemma_d256_hkv1", b=1, h=4, hkv=1, n=90, d=256, bs=16, lists="random", dtype="float32", bps=2),
    dict(name="gqa4_full", b=1, h=4, hkv=1, n=200, d=64, bs=16, lists="full", dtype="float32", bps=3),
    dict(name="gqa4_bs64_topk", b=2, h=8, hkv=2, n=700, d=64, bs=64, lists="sparse_k", dtype="float16"),
    dict(name="gqa2_empty_head", b=1, h=4, hkv=2, n=64, d=64, bs=16, lists="empty_head", dtype="float32"),
]

# larger ones for the GPU only (Llama-3.1-8B heads at small n; Gemma's head dim)
GPU_PREFILL_CASES: List[Dict] = [
    dict(name="llama_4k_topk16", b=1, h=32, hkv=8, n=4096 + 37, d=128, bs=64, lists="sparse_k", k=16,
         autotune=True),
    dict(name="llama_2k_full", b=2, h=32, hkv=8, n=2048, d=128, bs=64, lists="full", autotune=True),
    dict(name="gemma_sliding_512_4k", b=1, h=4, hkv=1, n=4096 + 37, d=256, bs=64, lists="window", window=512,
         autotune=True),
    dict(name="gemma_d256_3k", b=1, h=4, hkv=1, n=3000, d=256, bs=64, lists="sparse_k", k=8, autotune=True),
    dict(name="smollm_d64_2k", b=2, h=9, hkv=3, n=2000, d=64, bs=64, lists="random", autotune=True),
]


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def make_prefill_lists(b: int, hkv: int, nb: int, kind: str, gen: torch.Generator, k: int = 4):
    """(block_idx, block_cnt) per the format of sketch_walk.core.block_sparse; entries past the count hold junk."""
    tril = torch.ones(nb, nb, dtype=torch.bool).tril()
    eye = torch.eye(nb, dtype=torch.bool)
    if kind == "full":
        mask = tril.expand(b, hkv, nb, nb).clone()
    elif kind == "diag":
        mask = eye.expand(b, hkv, nb, nb).clone()
    elif kind in ("random", "no_diag"):
        dens = torch.rand(b, hkv, nb, 1, generator=gen)                 # a different density per row
        mask = (torch.rand(b, hkv, nb, nb, generator=gen) < dens) & tril
        mask[..., 0] |= True
        if kind == "random":
            mask |= eye
        else:
            mask &= ~eye
    elif kind == "sparse_k":
        score = torch.rand(b, hkv, nb, nb, generator=gen).masked_fill(~tril, -1.0)
        score[..., 0] = 2.0
        score = score + 3.0 * eye
        top = score.topk(min(nb, k + 2), dim=-1).indices
        mask = torch.zeros(b, hkv, nb, nb, dtype=torch.bool).scatter_(-1, top, True) & tril
    else:
        raise ValueError(kind)
    cnt = mask.sum(-1).to(torch.int32)
    max_kept = int(cnt.max()) + 2                                       # extra columns past every count
    ar = torch.arange(nb)
    order = torch.where(mask, ar, ar + nb).sort(-1).values[..., :max_kept] if max_kept <= nb else \
        torch.cat([torch.where(mask, ar, ar + nb).sort(-1).values,
                   torch.full((b, hkv, nb, max_kept - nb), 2 * nb)], -1)
    junk = torch.randint(-1, nb, order.shape, generator=gen)
    idx = torch.where(order < nb, order, junk).to(torch.int32)
    return idx.contiguous(), cnt.contiguous()


def make_decode_lists(b: int, hkv: int, nb: int, kind: str, gen: torch.Generator, k: int = 4):
    if kind == "full":
        mask = torch.ones(b, hkv, nb, dtype=torch.bool)
    elif kind == "random":
        mask = torch.rand(b, hkv, nb, generator=gen) < 0.4
        mask[..., -1] = True                                           # the partial last block
    elif kind == "sparse_k":
        score = torch.rand(b, hkv, nb, generator=gen)
        score[..., 0] = 2.0
        score[..., -1] = 3.0
        top = score.topk(min(nb, k + 2), dim=-1).indices
        mask = torch.zeros(b, hkv, nb, dtype=torch.bool).scatter_(-1, top, True)
    elif kind == "empty_head":
        mask = torch.rand(b, hkv, nb, generator=gen) < 0.5
        mask[:, 0] = False
        mask[:, 1:, -1] = True
    else:
        raise ValueError(kind)
    cnt = mask.sum(-1).to(torch.int32)
    max_kept = int(cnt.max()) + 1
    ar = torch.arange(nb)
    srt = torch.where(mask, ar, ar + nb).sort(-1).values
    if max_kept > nb:
        srt = torch.cat([srt, torch.full((b, hkv, max_kept - nb), 2 * nb)], -1)
    order = srt[..., :max_kept]
    junk = torch.randint(-1, nb, order.shape, generator=gen)
    return torch.where(order < nb, order, junk).to(torch.int32).contiguous(), cnt.contiguous()


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    den = ref.norm().item()
    return (x - ref).norm().item() / (den if den > 0 else 1.0)


def _lse_check(lse: torch.Tensor, ref: torch.Tensor):
    fin = torch.isfinite(ref)
    pattern = bool(torch.equal(fin, torch.isfinite(lse))) and not bool(torch.isnan(lse).any())
    err = _rel(lse.double()[fin], ref[fin]) if fin.any() else 0.0
    return err, pattern


def run_prefill_case(case: Dict, device: str, dtype: torch.dtype, seed: int) -> Dict:
    from sketch_walk.core.block_sparse import block_sparse_attention_reference
    from sketch_walk.core.kernels.block_sparse_prefill import block_sparse_attention_triton, default_hpp
    gen = torch.Generator().manual_seed(seed)
    b, h, hkv, n, d, bs = (case[x] for x in ("b", "h", "hkv", "n", "d", "bs"))
    nb = (n + bs - 1) // bs
    if case.get("noncontig"):
        q = torch.randn(b, n, h, d, generator=gen).transpose(1, 2)     # (B, H, n, d) view, as models pass it
    else:
        q = torch.randn(b, h, n, d, generator=gen)
    k = torch.randn(b, hkv, n, d, generator=gen)
    v = torch.randn(b, hkv, n, d, generator=gen)
    window = case.get("window")
    if case["lists"] == "window":
        from sketch_walk.core.block_sparse import window_block_lists
        idx, cnt = window_block_lists(n, bs, window, b, hkv)
    else:
        idx, cnt = make_prefill_lists(b, hkv, nb, case["lists"], gen, case.get("k", 4))
    q, k, v = (x.to(dtype) for x in (q, k, v))
    ref_o, ref_l = block_sparse_attention_reference(q.double(), k.double(), v.double(), idx, cnt, bs, window=window)
    out = torch.full((b, h, n, d), float("nan"), dtype=dtype, device=device)
    lse = torch.full((b, h, n), float("nan"), dtype=torch.float32, device=device)
    t0 = time.time()
    cfg = case.get("cfg")
    if cfg is None and device == "cuda" and not case.get("autotune"):
        # one pinned config per small case keeps GPU compile time down; autotuned cases run every config
        cfg = dict(HPP=default_hpp(h // hkv, bs, d), KPI=2, num_warps=4, num_stages=2)
    block_sparse_attention_triton(q.to(device), k.to(device), v.to(device), idx.to(device), cnt.to(device), bs,
                                  None, config=cfg, out=out, lse=lse, window=window)
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.time() - t0
    out, lse = out.cpu(), lse.cpu()
    lse_err, pattern = _lse_check(lse, ref_l)
    res = dict(err=_rel(out.double(), ref_o), lse_err=lse_err, lse_pattern=pattern,
               written=not bool(torch.isnan(out).any()), secs=secs, seed=seed)
    if case["lists"] in ("full", "window"):   # every block kept == dense causal (sliding-window) attention
        r = h // hkv
        t = torch.arange(n)
        allowed = t.unsqueeze(0) <= t.unsqueeze(1)
        if window:
            allowed &= t.unsqueeze(1) - t.unsqueeze(0) < window
        dense = torch.nn.functional.scaled_dot_product_attention(
            q.double(), k.double().repeat_interleave(r, 1), v.double().repeat_interleave(r, 1), attn_mask=allowed)
        res["dense_err"] = _rel(out.double(), dense)
    return res


def run_decode_case(case: Dict, device: str, dtype: torch.dtype, seed: int) -> Dict:
    from sketch_walk.core.block_sparse import block_sparse_decode_reference
    from sketch_walk.core.kernels.block_sparse_decode import block_sparse_decode_triton
    gen = torch.Generator().manual_seed(seed)
    b, h, hkv, n, d, bs = (case[x] for x in ("b", "h", "hkv", "n", "d", "bs"))
    nb = (n + bs - 1) // bs
    q = torch.randn(b, h, 1, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    idx, cnt = make_decode_lists(b, hkv, nb, case["lists"], gen, case.get("k", 4))
    ref_o, ref_l = block_sparse_decode_reference(q.double(), k.double(), v.double(), idx, cnt, bs)
    out = torch.full((b, h, 1, d), float("nan"), dtype=dtype, device=device)
    lse = torch.full((b, h, 1), float("nan"), dtype=torch.float32, device=device)
    t0 = time.time()
    block_sparse_decode_triton(q.to(device), k.to(device), v.to(device), idx.to(device), cnt.to(device), bs, None,
                               blocks_per_split=case.get("bps"), out=out, lse=lse)
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.time() - t0
    out, lse = out.cpu(), lse.cpu()
    lse_err, pattern = _lse_check(lse, ref_l)
    res = dict(err=_rel(out.double(), ref_o), lse_err=lse_err, lse_pattern=pattern,
               written=not bool(torch.isnan(out).any()), secs=secs, seed=seed)
    if case["lists"] == "full":
        r = h // hkv
        dense = torch.nn.functional.scaled_dot_product_attention(
            q.double(), k.double().repeat_interleave(r, 1), v.double().repeat_interleave(r, 1))
        res["dense_err"] = _rel(out.double(), dense)
    return res


def _check(res: Dict, bounds) -> None:
    assert "error" not in res, res.get("error")
    b_out, b_lse = bounds
    assert res["written"], f"output elements left unwritten (NaN poison survived): {res}"
    assert res["lse_pattern"], f"lse -inf/NaN pattern differs from the reference: {res}"
    assert res["err"] <= b_out, f"relative error {res['err']:.3e} > {b_out:g}: {res}"
    assert res["lse_err"] <= b_lse, f"lse relative error {res['lse_err']:.3e} > {b_lse:g}: {res}"
    if "dense_err" in res:
        assert res["dense_err"] <= b_out, f"full lists differ from dense causal attention: {res}"


_fresh_seed = fresh_seed


# ----------------------------------------------------------------------------------------------
# The interpreter child
# ----------------------------------------------------------------------------------------------

def _worker() -> None:
    run_cases([("prefill", PREFILL_CASES, lambda c, seed: run_prefill_case(c, "cpu", getattr(torch, c["dtype"]), seed)),
               ("decode", DECODE_CASES, lambda c, seed: run_decode_case(c, "cpu", getattr(torch, c["dtype"]), seed))])


@pytest.fixture(scope="module")
def interpreter_results() -> Dict[str, Dict]:
    return child_results(__file__)


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: c["name"])
def test_prefill_interpreter(case, interpreter_results):
    _check(interpreter_results[f"prefill/{case['name']}"], BOUNDS[case["dtype"]])


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c["name"])
def test_decode_interpreter(case, interpreter_results):
    _check(interpreter_results[f"decode/{case['name']}"], BOUNDS[case["dtype"]])


# ----------------------------------------------------------------------------------------------
# GPU (bf16); skipped without CUDA
# ----------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", PREFILL_CASES + GPU_PREFILL_CASES, ids=lambda c: c["name"])
def test_prefill_gpu(case, dtype):
    if dtype == "float16" and case in GPU_PREFILL_CASES:
        pytest.skip("large cases run in bf16 only")
    res = run_prefill_case(case, "cuda", getattr(torch, dtype), _fresh_seed())
    _check(res, GPU_BOUNDS[dtype])


@cuda_only
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c["name"])
def test_decode_gpu(case):
    res = run_decode_case(case, "cuda", torch.bfloat16, _fresh_seed())
    _check(res, GPU_BOUNDS["bfloat16"])


@cuda_only
def test_prefill_gpu_every_config():
    """Every configuration of the autotune space is right, not only the one autotuning picks."""
    from sketch_walk.core.kernels.block_sparse_prefill import candidate_configs
    base = dict(b=1, h=32, hkv=8, n=1000, d=128, bs=64, lists="random")
    for cfg in candidate_configs(4, 64, 128):
        c = dict(base, cfg=dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        _check(run_prefill_case(c, "cuda", torch.bfloat16, _fresh_seed()), GPU_BOUNDS["bfloat16"])


@cuda_only
def test_prefill_gpu_every_window_config():
    """The same for the windowed autotune space (Gemma-3's geometry: one key head, d 256, window 512)."""
    from sketch_walk.core.kernels.block_sparse_prefill import candidate_configs
    base = dict(b=1, h=4, hkv=1, n=1500, d=256, bs=64, lists="window", window=512)
    for cfg in candidate_configs(4, 64, 256, windowed=True):
        c = dict(base, cfg=dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        _check(run_prefill_case(c, "cuda", torch.bfloat16, _fresh_seed()), GPU_BOUNDS["bfloat16"])


@pytest.mark.parametrize("geometry", [(4, 64, 128), (4, 64, 256), (1, 64, 256), (4, 128, 64), (4, 256, 256),
                                      (1, 512, 64)])
def test_windowed_configs_are_unpipelined(geometry):
    """Windowed launches never pipeline the key loop (WINDOW_NUM_STAGES: Triton 3.6 miscompiled it on the
    H100), also where no tuned config fits and the fallback is used; unwindowed ones keep their stages."""
    from sketch_walk.core.kernels.block_sparse_prefill import WINDOW_NUM_STAGES, candidate_configs
    windowed = candidate_configs(*geometry, windowed=True)
    assert windowed and all(c.num_stages == WINDOW_NUM_STAGES == 1 for c in windowed)
    assert all(c.num_stages >= 2 for c in candidate_configs(*geometry))


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
