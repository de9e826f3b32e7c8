"""Triton kernels of Sketch&Walk's prefill selection against their PyTorch references.

Kernels (sketch_walk/kernels): block_pool (step 1 / 3b), block_transition (step 4, two passes),
row_select (step 5 sharpening / rownorm and step 7 lists), walk_step (step 6), and their composition
prefill_selection (SketchWalkSelector.select_prefill on the "triton" backend).

As in tests/test_kernels.py: on CPU the kernels run under Triton's interpreter in a child process (this
file run with ``--worker``; TRITON_INTERPRET is read when a kernel module is imported), fp32/fp16 inputs
(bf16 dots are wrong under the interpreter), small sizes; on a CUDA machine the same cases run in-process
(plus Llama-3.1-8B-sized ones and every autotune configuration). Every check draws fresh random inputs (the
seed is printed with each result), poisons the outputs with NaN before the call (so an unwritten element
fails), and compares with a float64 reference by relative error ||x - ref|| / ||ref||:
  * interpreter: fp32 dots are exact, so 1e-5 (pooled vectors: 1e-6; maxima, fp64 sums, counts: exact);
  * GPU: block_transition uses TF32 dots, or fp16 operands from 1536 key blocks on, walk_step TF32 (see
    block_transition's docstring): 5e-3.
The interpreter runs the kernel logic with exact fp32 dots (SKETCH_WALK_SELECT_DOT=tf32 in the child) and,
in the cases marked prec "fp16", with the fp16 operands the GPU takes from 1536 key blocks on, at the GPU's
tolerances.
Lists from row_select are compared exactly with sketch_walk.selection.select_blocks on the same fp32 scores
(ties included). The whole select_prefill (Triton path vs torch path, several layers, so the walk carries R)
must give identical lists, or -- where sums in another order move a near-tie -- lists whose kept candidate
blocks hold the same walk mass under the torch path's R (relative 1e-4 interpreter, 3e-2 GPU).
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Dict, List

import pytest
import torch
from interpreter_child import child_results, fresh_seed, run_cases


INTERP = dict(pool=1e-6, transition=1e-5, rows=1e-5, walk=1e-5, mass=1e-4, state=1e-4)
GPU = dict(pool=1e-6, transition=5e-3, rows=1e-4, walk=5e-3, mass=3e-2, state=5e-2,
           walk_bf16=1e-2)           # bf16 tiles: 2^-9 rounding of both factors


def _interp_tol(case: Dict) -> Dict:
    """fp16-operand cases get the GPU's tolerances under the interpreter too (the rounding is the same)."""
    return GPU if case.get("prec") == "fp16" else INTERP

POOL_CASES: List[Dict] = [
    dict(name="minmax_gqa2_partial", b=1, h=4, hkv=2, n=100, d=64, bs=16, summary="minmax", dtype="float32"),
    dict(name="mean_gqa1_fp16_b2", b=2, h=2, hkv=1, n=300, d=64, bs=16, summary="mean", dtype="float16"),
    dict(name="minmax_d80_noncontig_bs32", b=1, h=4, hkv=2, n=77, d=80, bs=32, summary="minmax", dtype="float16",
         noncontig=True),
    dict(name="mean_d256_bs64", b=1, h=2, hkv=1, n=150, d=256, bs=64, summary="mean", dtype="float32"),
    # the fp16 transition operands written by the pooling itself (keys past fp16's range: clamped)
    dict(name="minmax_half_partial_big", b=2, h=4, hkv=2, n=100, d=64, bs=16, summary="minmax", dtype="float32",
         half_scale=0.18, big=True),
    dict(name="minmax_half_bf16_2blocks", b=1, h=4, hkv=1, n=200, d=128, bs=32, summary="minmax", dtype="bfloat16",
         half_scale=0.13, blocks_per_prog=2),
]

TRANSITION_CASES: List[Dict] = [
    dict(name="minmax_layer_nb7", b=1, h=4, hkv=2, nb=7, dim=64, summary="minmax", per="layer"),
    dict(name="minmax_kvhead_nb19_b2_split2", b=2, h=4, hkv=2, nb=19, dim=64, summary="minmax", per="kv_head",
         split=2),
    dict(name="mean_layer_nb38_split1", b=1, h=2, hkv=1, nb=38, dim=64, summary="mean", per="layer", split=1),
    dict(name="mean_kvhead_k32", b=1, h=4, hkv=2, nb=19, dim=32, summary="mean", per="kv_head"),
    dict(name="minmax_d128_layer_split4", b=1, h=4, hkv=1, nb=20, dim=128, summary="minmax", per="layer", split=4),
    dict(name="minmax_d256_kvhead_nb9", b=1, h=4, hkv=2, nb=9, dim=256, summary="minmax", per="kv_head"),
    # the GPU's choice from 1536 key blocks on: scaled, fp16-rounded operands (the interpreter does fp16 products too)
    dict(name="fp16_minmax_layer_nb37", b=1, h=4, hkv=2, nb=37, dim=64, summary="minmax", per="layer", prec="fp16"),
    dict(name="fp16_mean_kvhead_b2", b=2, h=4, hkv=2, nb=21, dim=32, summary="mean", per="kv_head", prec="fp16"),
    # operands already scaled and rounded (as the pooling writes them at fp16 precision)
    dict(name="fp16_prescaled_minmax_nb37", b=1, h=4, hkv=2, nb=37, dim=64, summary="minmax", per="layer",
         prec="fp16", prescaled=True),
]

# row_select: lists vs select_blocks on the same scores, plus the row transform (sharpen / rownorm / partials)
ROW_CASES: List[Dict] = [
    dict(name="rand_k4_layer", b=1, gp=1, hkv=2, nb=19, sink=1, local=1, k=4, dense_last=0, kind="rand"),
    dict(name="ties_k3_kvhead_b2_dense_last", b=2, gp=2, hkv=2, nb=24, sink=2, local=1, k=3, dense_last=3,
         kind="ties"),
    dict(name="zeros_k5_sink0_local2", b=1, gp=1, hkv=4, nb=33, sink=0, local=2, k=5, dense_last=0, kind="zeros"),
    dict(name="special_values", b=1, gp=1, hkv=1, nb=40, sink=1, local=1, k=8, dense_last=0, kind="special"),
    dict(name="special_values_k16_bisection", b=1, gp=1, hkv=1, nb=60, sink=1, local=1, k=16, dense_last=0,
         kind="special"),
    dict(name="bisection_k40_ties", b=1, gp=1, hkv=2, nb=60, sink=1, local=1, k=40, dense_last=0, kind="ties"),
    dict(name="all_dense_k16", b=1, gp=1, hkv=1, nb=7, sink=1, local=1, k=16, dense_last=0, kind="rand"),
    dict(name="sharpen8_split3", b=2, gp=1, hkv=2, nb=21, sink=1, local=1, k=4, dense_last=0, kind="rand", mode=2,
         s=8.0, split=3),
    dict(name="rownorm_kvhead", b=1, gp=2, hkv=2, nb=21, sink=1, local=1, k=4, dense_last=0, kind="rand", mode=1),
    # n_b a power of two (one row fills the BLOCK_N lanes)
    dict(name="pow2_nb32_sharpen_split2", b=1, gp=1, hkv=2, nb=32, sink=1, local=1, k=4, dense_last=0,
         kind="rand", mode=2, s=8.0, split=2),
    dict(name="pow2_nb64_ties_kvhead", b=1, gp=2, hkv=2, nb=64, sink=1, local=2, k=6, dense_last=2, kind="ties",
         mode=1),
]

WALK_CASES: List[Dict] = [
    dict(name="layer_nb19", b=1, gp=1, gr=1, nb=19, beta=0.25),
    dict(name="kvhead_broadcast_b2_nb40", b=2, gp=2, gr=1, nb=40, beta=0.5),
    dict(name="kvhead_per_group_nb33", b=1, gp=2, gr=2, nb=33, beta=0.25),
    dict(name="even_nb128", b=1, gp=1, gr=1, nb=128, beta=0.25),          # no bounds masks
]

# whole select_prefill, Triton vs torch, `layers` consecutive sparse layers
PIPELINE_CASES: List[Dict] = [
    dict(name="default_minmax", b=1, h=4, hkv=2, n=300, d=64, dtype="float32", layers=2, cfg=dict(top_k_blocks=4)),
    dict(name="mean_sketch32_b2", b=2, h=2, hkv=1, n=200, d=64, dtype="float32", layers=2,
         cfg=dict(top_k_blocks=3, key_summary="mean", sketch_dim=32)),
    dict(name="kvhead_fp16", b=1, h=4, hkv=2, n=250, d=64, dtype="float16", layers=2,
         cfg=dict(top_k_blocks=4, select_per="kv_head")),
    dict(name="onehop_dense_last", b=1, h=2, hkv=1, n=300, d=64, dtype="float32", layers=1,
         cfg=dict(top_k_blocks=5, walk_damping=0.0, dense_last_blocks=2)),
    dict(name="walk_steps2_s1", b=1, h=4, hkv=2, n=180, d=64, dtype="float32", layers=2,
         cfg=dict(top_k_blocks=3, walk_steps=2, sparsity_exponent=1.0)),
    dict(name="fp16_dots_default_minmax", b=1, h=4, hkv=2, n=400, d=64, dtype="float16", layers=2,
         cfg=dict(top_k_blocks=4), prec="fp16"),
]

# GPU only: Llama-3.1-8B attention geometry (32 / 8 heads, d 128, block 64), bf16
GPU_PIPELINE_CASES: List[Dict] = [
    dict(name="llama_8k", b=1, h=32, hkv=8, n=8192 + 37, d=128, dtype="bfloat16", layers=2, bs=64,
         cfg=dict(top_k_blocks=16)),
    dict(name="llama_32k_kvhead", b=1, h=32, hkv=8, n=32768, d=128, dtype="bfloat16", layers=2, bs=64,
         cfg=dict(top_k_blocks=16, select_per="kv_head")),
    dict(name="gemma_d256_mean", b=1, h=8, hkv=4, n=4000, d=256, dtype="bfloat16", layers=2, bs=64,
         cfg=dict(top_k_blocks=8, key_summary="mean")),
    # 1563 key blocks: "auto" takes fp16 operands, written by the pooling kernel
    dict(name="llama_100k_fp16_auto", b=1, h=32, hkv=8, n=100000, d=128, dtype="bfloat16", layers=2, bs=64,
         cfg=dict(top_k_blocks=16)),
]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    den = ref.norm().item()
    return (x - ref).norm().item() / (den if den > 0 else 1.0)


def _nan(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


_fresh_seed = fresh_seed


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _tril_rows(x: torch.Tensor) -> torch.Tensor:
    """Lower-triangular, row-stochastic version of non-negative x (..., n, n)."""
    x = x.tril()
    return x / x.sum(-1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------

def run_pool_case(case: Dict, device: str, seed: int) -> Dict:
    from sketch_walk.kernels.block_pool import PooledBlocks, block_pool_reference, block_pool_triton
    gen = torch.Generator().manual_seed(seed)
    b, h, hkv, n, d, bs = (case[x] for x in ("b", "h", "hkv", "n", "d", "bs"))
    dtype = getattr(torch, case["dtype"])
    nb = (n + bs - 1) // bs
    if case.get("noncontig"):
        q = torch.randn(b, n, h, d, generator=gen).transpose(1, 2)
    else:
        q = torch.randn(b, h, n, d, generator=gen)
    k = torch.randn(b, hkv, n, d, generator=gen) * 3
    if case.get("big"):
        k[..., ::7, 3] *= 1e5                            # some maxima / minima beyond fp16's +-65504
    q, k = q.to(dtype), k.to(dtype)
    mean = case["summary"] == "mean"
    half = case.get("half_scale")
    ref = block_pool_reference(q.double(), k.double(), bs, case["summary"])
    out = PooledBlocks(_nan((b, h, nb, d), torch.float16 if half else torch.float32, device),
                       _nan((nb,), torch.float64, device),
                       _nan((b, hkv, nb, d), torch.float64 if mean else torch.float32, device),
                       _nan((b, hkv, nb, d), torch.float32, device),
                       *([_nan((b, hkv, nb, d), torch.float16, device) for _ in range(2)] if half else []))
    t0 = time.time()
    block_pool_triton(q.to(device), k.to(device), bs, case["summary"], out=out, half_scale=half,
                      blocks_per_prog=case.get("blocks_per_prog", 1))
    _sync(device)
    written = [t for t in out if t is not None]
    res = dict(seed=seed, secs=time.time() - t0, written=not any(bool(torch.isnan(t).any()) for t in written),
               counts_exact=bool(torch.equal(out.counts.cpu(), ref.counts.cpu())))
    if half:   # q_bar: fp16 of the scaled mean (rounding: ~5e-4 relative); ka16 / kb16: fp16 of the exact extrema
        res["q_bar"] = _rel(out.q_bar, (ref.q_bar * half).clamp(-65504, 65504))
        for name, ref_t in (("ka16", ref.ka), ("kb16", ref.kb)):
            want = ref_t.float().clamp(-65504, 65504).half()
            res[f"{name}_exact"] = bool(torch.equal(getattr(out, name).cpu(), want.cpu()))
    else:
        res["q_bar"] = _rel(out.q_bar, ref.q_bar)
    if mean:   # fp64 sums of fp16 / fp32 values are exact in any order; kbar = float32(sum / count) then too
        res["ka_exact"] = bool(torch.equal(out.ka.cpu(), ref.ka.cpu()))
        res["kb_exact"] = bool(torch.equal(out.kb.cpu(), ref.kb.float().cpu()))
    else:      # maxima / minima are exact
        res["ka_exact"] = bool(torch.equal(out.ka.cpu(), ref.ka.float().cpu()))
        res["kb_exact"] = bool(torch.equal(out.kb.cpu(), ref.kb.float().cpu()))
    return res


def run_transition_case(case: Dict, device: str, seed: int, config=None) -> Dict:
    from sketch_walk.kernels.block_transition import (block_transition_partials, block_transition_reference,
                                                      default_head_split)
    gen = torch.Generator().manual_seed(seed)
    b, h, hkv, nb, dim = (case[x] for x in ("b", "h", "hkv", "nb", "dim"))
    qp = torch.randn(b, h, nb, dim, generator=gen)
    ka = torch.randn(b, hkv, nb, dim, generator=gen)
    kb = ka - 2 * torch.rand(b, hkv, nb, dim, generator=gen) if case["summary"] == "minmax" else None
    scale = case.get("scale", 1.0 / math.sqrt(dim))
    ref = block_transition_reference(qp.double(), ka.double(), None if kb is None else kb.double(), scale,
                                     case["per"])
    if case.get("prescaled"):       # what block_pool_triton(..., half_scale=scale * LOG2E) writes
        from sketch_walk.kernels.block_transition import LOG2E
        qp, ka = (qp * (scale * LOG2E)).clamp(-65504, 65504).half(), ka.half()
        kb = None if kb is None else kb.half()
    gp = 1 if case["per"] == "layer" else hkv
    split = case.get("split") or default_head_split(nb, b, gp, h // gp)
    split = max(1, min(split, h // gp))
    out = _nan((split, b, gp, nb, nb), torch.float32, device)
    t0 = time.time()
    block_transition_partials(qp.to(device), ka.to(device), None if kb is None else kb.to(device), scale,
                              case["per"], head_split=split, config=config, precision=case.get("prec"), out=out,
                              prescaled=bool(case.get("prescaled")))
    _sync(device)
    a = out.sum(0)
    return dict(seed=seed, secs=time.time() - t0, written=not bool(torch.isnan(out).any()), err=_rel(a, ref),
                upper_zero=bool((a.cpu().triu(1) == 0).all()), split=split)


def _row_scores(case: Dict, gen: torch.Generator) -> torch.Tensor:
    b, gp, nb = case["b"], case["gp"], case["nb"]
    s = torch.rand(b, gp, nb, nb, generator=gen)
    kind = case["kind"]
    if kind == "ties":
        s = (s * 4).floor() / 4                          # 4 distinct values: ties everywhere
    elif kind == "zeros":
        s = torch.where(s < 0.7, torch.zeros_like(s), s)  # many exact zeros (sharpening underflow)
    elif kind == "special":                              # NaN -> 0, +inf -> max, -inf and negatives -> 0
        s[..., ::7] = float("nan")
        s[..., 3::11] = float("inf")
        s[..., 5::13] = -1.0
        s[..., 4::17] = float("-inf")
    return s.tril()


def run_row_case(case: Dict, device: str, seed: int) -> Dict:
    from sketch_walk.kernels.row_select import row_pass_triton, select_blocks_reference
    from sketch_walk.selection import max_kept_for
    from sketch_walk.walk import rownorm, sharpen
    gen = torch.Generator().manual_seed(seed)
    b, gp, hkv, nb = (case[x] for x in ("b", "gp", "hkv", "nb"))
    mode, split = case.get("mode", 0), case.get("split", 1)
    if mode == 0:
        parts = _row_scores(case, gen).unsqueeze(0)
    else:
        parts = torch.rand(split, b, gp, nb, nb, generator=gen).tril() / split
    x64 = parts.double().sum(0)
    if mode == 2:
        row_ref = sharpen(x64, case["s"])
    elif mode == 1:
        row_ref = rownorm(x64)
    else:
        row_ref = x64
    # lists from the transformed fp32 rows, as the kernel sees them (ties decided on identical inputs)
    sel_in = row_ref.float() if mode else parts[0]
    ref_idx, ref_cnt = select_blocks_reference(sel_in, case["sink"], case["local"], case["k"], case["dense_last"], hkv)
    width = max_kept_for(nb, case["sink"] + case["local"] + case["k"], case["dense_last"])
    idx = torch.full((b, hkv, nb, width), -7, dtype=torch.int32, device=device)
    cnt = torch.full((b, hkv, nb), -7, dtype=torch.int32, device=device)
    out = _nan((b, gp, nb, nb), torch.float32, device) if mode else None
    t0 = time.time()
    row_pass_triton(parts.to(device), mode, case.get("s", 1.0), out=out, lists=(idx, cnt), n_sink=case["sink"],
                    n_local=case["local"], top_k_blocks=case["k"], dense_last=case["dense_last"])
    _sync(device)
    written = not bool((idx == -7).any()) and not bool((cnt == -7).any())
    if out is not None:
        written = written and not bool(torch.isnan(out).any())
    res = dict(seed=seed, secs=time.time() - t0, written=written, cnt_equal=bool(torch.equal(cnt.cpu(), ref_cnt.cpu())),
               idx_equal=bool(torch.equal(idx.cpu(), ref_idx.cpu())), row_err=0.0)
    if mode:
        res["row_err"] = _rel(out, row_ref)
        if not res["idx_equal"]:
            # the kernel's own fp32 rows may differ from the float64 reference by an ulp: check the lists on them
            i2, c2 = select_blocks_reference(out.cpu(), case["sink"], case["local"], case["k"], case["dense_last"], hkv)
            res["idx_equal_on_own_rows"] = bool(torch.equal(idx.cpu(), i2)) and bool(torch.equal(cnt.cpu(), c2))
    return res


def run_walk_case(case: Dict, device: str, seed: int, config=None) -> Dict:
    from sketch_walk.kernels.walk_step import walk_step_reference, walk_step_triton
    gen = torch.Generator().manual_seed(seed)
    b, gp, gr, nb = (case[x] for x in ("b", "gp", "gr", "nb"))
    w = _tril_rows(torch.rand(b, gp, nb, nb, generator=gen) ** 8)   # sharpened-like: wide dynamic range
    r = _tril_rows(torch.rand(b, gr, nb, nb, generator=gen))
    ref = walk_step_reference(r.double(), w.double(), case["beta"])
    out = _nan((b, gp, nb, nb), torch.float32, device)
    t0 = time.time()
    walk_step_triton(r.to(device), w.to(device), case["beta"], out=out, config=config, precision=case.get("prec"))
    _sync(device)
    return dict(seed=seed, secs=time.time() - t0, written=not bool(torch.isnan(out).any()), err=_rel(out, ref),
                upper_zero=bool((out.cpu().triu(1) == 0).all()), prec=case.get("prec"))


def _captured(r: torch.Tensor, idx: torch.Tensor, cnt: torch.Tensor) -> torch.Tensor:
    """Per (b, g, row): the sum of r[b, g', row, j] over the kept blocks j of the row (g' = g or 0)."""
    nb = r.shape[-1]
    valid = torch.arange(idx.shape[-1]) < cnt.unsqueeze(-1)
    j = torch.where(valid, idx.long(), torch.zeros_like(idx, dtype=torch.long))
    rr = r.expand(idx.shape[0], idx.shape[1], nb, nb) if r.shape[1] == 1 else r
    vals = torch.gather(rr.double(), -1, j)
    return torch.where(valid, vals, torch.zeros_like(vals)).sum(-1)


def run_pipeline_case(case: Dict, device: str, seed: int) -> Dict:
    """:func:`_run_pipeline_case` with the case's dot precision (if it names one) for its duration."""
    if not case.get("prec"):
        return _run_pipeline_case(case, device, seed)
    old = os.environ.get("SKETCH_WALK_SELECT_DOT")
    os.environ["SKETCH_WALK_SELECT_DOT"] = case["prec"]               # read at each call (block_transition)
    try:
        return _run_pipeline_case(case, device, seed)
    finally:
        if old is None:
            os.environ.pop("SKETCH_WALK_SELECT_DOT")
        else:
            os.environ["SKETCH_WALK_SELECT_DOT"] = old


def _run_pipeline_case(case: Dict, device: str, seed: int) -> Dict:
    from sketch_walk import SketchWalkConfig, SketchWalkSelector
    gen = torch.Generator().manual_seed(seed)
    b, h, hkv, n, d = (case[x] for x in ("b", "h", "hkv", "n", "d"))
    bs = case.get("bs", 16)
    dtype = getattr(torch, case["dtype"])
    cfg = SketchWalkConfig(block_size=bs, **case["cfg"])
    qs = [torch.randn(b, h, n, d, generator=gen).to(dtype).to(device) for _ in range(case["layers"])]
    ks = [(torch.randn(b, hkv, n, d, generator=gen) * 2).to(dtype).to(device) for _ in range(case["layers"])]
    sels = {}
    for backend in ("torch", "triton"):
        sel = SketchWalkSelector(cfg)
        sel.backend = backend
        sel.reset(b)
        sels[backend] = sel
    res = dict(seed=seed, layers=[])
    t_tri = 0.0
    for layer, (q, k) in enumerate(zip(qs, ks)):
        li = cfg.dense_layers + layer
        ref_idx, ref_cnt = sels["torch"].select_prefill(li, None, q, k)
        r_ref = sels["torch"].state.walk_r.cpu()
        t0 = time.time()
        idx, cnt = sels["triton"].select_prefill(li, None, q, k)
        _sync(device)
        t_tri += time.time() - t0
        idx, cnt, ref_idx, ref_cnt = idx.cpu(), cnt.cpu(), ref_idx.cpu(), ref_cnt.cpu()
        same_rows = (cnt == ref_cnt) & (idx == ref_idx).all(-1)
        mass_tri = _captured(r_ref, idx, cnt)
        mass_ref = _captured(r_ref, ref_idx, ref_cnt)
        st_t, st_r = sels["triton"].state, sels["torch"].state
        lay = dict(identical=bool(same_rows.all()), rows_differing=int((~same_rows).sum()),
                   rows=int(same_rows.numel()), cnt_equal=bool(torch.equal(cnt, ref_cnt)),
                   mass_shortfall=float(((mass_ref - mass_tri) / mass_ref.clamp_min(1e-30)).max()),
                   walk_err=_rel(st_t.walk_r, r_ref), shape_equal=idx.shape == ref_idx.shape)
        ls_t, ls_r = st_t.layers.get(li), st_r.layers.get(li)
        if ls_r is not None:
            lay["counts_exact"] = bool(torch.equal(ls_t.keys.counts.cpu(), ls_r.keys.counts.cpu()))
            for name in ("kmax", "kmin", "sums"):
                if getattr(ls_r.keys, name) is not None:
                    lay[f"{name}_exact"] = bool(torch.equal(getattr(ls_t.keys, name).cpu(),
                                                            getattr(ls_r.keys, name).cpu()))
            if ls_r.k_t is not None:
                lay["k_t_err"] = _rel(ls_t.k_t, ls_r.k_t)
            if ls_r.w_cache is not None:
                lay["w_cache_err"] = _rel(ls_t.w_cache, ls_r.w_cache)
        res["layers"].append(lay)
    res["secs"] = t_tri
    return res


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------

def _check_pool(res: Dict, tol: Dict) -> None:
    assert "error" not in res, res.get("error")
    assert res["written"], f"unwritten outputs (NaN poison survived): {res}"
    q_tol = max(tol["pool"], 1e-3) if "ka16_exact" in res else tol["pool"]      # fp16 output: 2^-11 rounding
    assert res["q_bar"] <= q_tol, f"q_bar relative error {res['q_bar']:.2e}: {res}"
    assert res["counts_exact"] and res["ka_exact"] and res["kb_exact"], f"key summaries / counts not exact: {res}"
    assert res.get("ka16_exact", True) and res.get("kb16_exact", True), f"fp16 key copies not exact: {res}"


def _check_transition(res: Dict, tol: Dict) -> None:
    assert "error" not in res, res.get("error")
    assert res["written"], f"unwritten outputs (NaN poison survived): {res}"
    assert res["upper_zero"], f"entries above the diagonal are not zero: {res}"
    assert res["err"] <= tol["transition"], f"A relative error {res['err']:.2e} > {tol['transition']:g}: {res}"


def _check_row(res: Dict, tol: Dict) -> None:
    assert "error" not in res, res.get("error")
    assert res["written"], f"unwritten rows (NaN poison survived): {res}"
    assert res["row_err"] <= tol["rows"], f"row transform relative error {res['row_err']:.2e}: {res}"
    assert res["cnt_equal"], f"counts differ from select_blocks: {res}"
    assert res["idx_equal"] or res.get("idx_equal_on_own_rows"), f"lists differ from select_blocks: {res}"


def _check_walk(res: Dict, tol: Dict) -> None:
    assert "error" not in res, res.get("error")
    assert res["written"], f"unwritten outputs (NaN poison survived): {res}"
    assert res["upper_zero"], f"entries above the diagonal are not zero: {res}"
    t = tol["walk_bf16"] if res.get("prec") == "bf16" else tol["walk"]
    assert res["err"] <= t, f"walk relative error {res['err']:.2e} > {t:g}: {res}"


def _check_pipeline(res: Dict, tol: Dict, exact_state: bool = True) -> None:
    assert "error" not in res, res.get("error")
    for li, lay in enumerate(res["layers"]):
        ctx = f"layer {li}: {lay} (seed {res['seed']})"
        assert lay["shape_equal"] and lay["cnt_equal"], f"list shapes / counts differ: {ctx}"
        assert lay["identical"] or lay["mass_shortfall"] <= tol["mass"], f"selections differ beyond near-ties: {ctx}"
        assert lay["walk_err"] <= tol["state"], f"walk R differs: {ctx}"
        if exact_state:
            for key in ("counts_exact", "kmax_exact", "kmin_exact", "sums_exact"):
                assert lay.get(key, True), f"{key} fails: {ctx}"
        else:
            assert lay.get("counts_exact", True), f"counts differ: {ctx}"
        for key in ("k_t_err", "w_cache_err"):
            assert lay.get(key, 0.0) <= tol["state"], f"{key} too large: {ctx}"


# ----------------------------------------------------------------------------------------------
# The interpreter child
# ----------------------------------------------------------------------------------------------

KINDS = (("pool", POOL_CASES, run_pool_case), ("transition", TRANSITION_CASES, run_transition_case),
         ("row", ROW_CASES, run_row_case), ("walk", WALK_CASES, run_walk_case),
         ("pipeline", PIPELINE_CASES, run_pipeline_case))


def _worker() -> None:
    os.environ["SKETCH_WALK_SELECT_DOT"] = "tf32"      # exact fp32 dots under the interpreter; cases may override
    run_cases([(kind, cases, lambda c, seed, fn=fn: fn(c, "cpu", seed)) for kind, cases, fn in KINDS])


@pytest.fixture(scope="module")
def interpreter_results() -> Dict[str, Dict]:
    return child_results(__file__)


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: c["name"])
def test_pool_interpreter(case, interpreter_results):
    _check_pool(interpreter_results[f"pool/{case['name']}"], INTERP)


@pytest.mark.parametrize("case", TRANSITION_CASES, ids=lambda c: c["name"])
def test_transition_interpreter(case, interpreter_results):
    _check_transition(interpreter_results[f"transition/{case['name']}"], _interp_tol(case))


@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: c["name"])
def test_row_select_interpreter(case, interpreter_results):
    _check_row(interpreter_results[f"row/{case['name']}"], INTERP)


@pytest.mark.parametrize("case", WALK_CASES, ids=lambda c: c["name"])
def test_walk_step_interpreter(case, interpreter_results):
    _check_walk(interpreter_results[f"walk/{case['name']}"], INTERP)


@pytest.mark.parametrize("case", PIPELINE_CASES, ids=lambda c: c["name"])
def test_select_prefill_triton_vs_torch_interpreter(case, interpreter_results):
    _check_pipeline(interpreter_results[f"pipeline/{case['name']}"], _interp_tol(case))


def test_dot_precision_auto_and_override(monkeypatch):
    """auto: fp16 operands only for long rows (where they were measured faster), TF32 otherwise; the env
    var forces either; a bad value is an error naming the variable."""
    from sketch_walk.kernels.block_transition import FP16_MIN_BLOCKS, dot_precision
    monkeypatch.delenv("SKETCH_WALK_SELECT_DOT", raising=False)
    assert dot_precision() == "tf32" and dot_precision(FP16_MIN_BLOCKS - 1) == "tf32"
    assert dot_precision(FP16_MIN_BLOCKS) == "fp16"
    monkeypatch.setenv("SKETCH_WALK_SELECT_DOT", "tf32")
    assert dot_precision(10 * FP16_MIN_BLOCKS) == "tf32"
    monkeypatch.setenv("SKETCH_WALK_SELECT_DOT", "fp16")
    assert dot_precision(4) == "fp16"
    monkeypatch.setenv("SKETCH_WALK_SELECT_DOT", "bf16")
    with pytest.raises(ValueError, match="SKETCH_WALK_SELECT_DOT"):
        dot_precision(4)


def test_cpu_default_keeps_torch_path(monkeypatch):
    """On CPU, with no backend forced, select_prefill never takes the Triton path (its lists stay the torch path's)."""
    from sketch_walk import SketchWalkConfig, SketchWalkSelector
    from sketch_walk.core.block_sparse import set_backend
    monkeypatch.delenv("SKETCH_WALK_ATTN_BACKEND", raising=False)
    set_backend("auto")

    def boom(*a, **k):
        raise AssertionError("the Triton prefill path ran on CPU")
    monkeypatch.setattr(SketchWalkSelector, "_select_prefill_triton", boom)
    sel = SketchWalkSelector(SketchWalkConfig(block_size=16, top_k_blocks=2, dense_last_blocks=0))
    sel.reset(1)
    idx, cnt = sel.select_prefill(2, None, torch.randn(1, 2, 100, 16), torch.randn(1, 1, 100, 16))
    assert idx.shape[:3] == (1, 1, 7) and int(cnt.max()) == 4


# ----------------------------------------------------------------------------------------------
# GPU; skipped without CUDA
# ----------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda_only
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: c["name"])
def test_pool_gpu(case):
    _check_pool(run_pool_case(case, "cuda", _fresh_seed()), GPU)


@cuda_only
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: c["name"])
def test_pool_gpu_bf16(case):
    _check_pool(run_pool_case(dict(case, dtype="bfloat16"), "cuda", _fresh_seed()), GPU)


@cuda_only
@pytest.mark.parametrize("case", TRANSITION_CASES + [
    dict(name="llama_nb128_layer", b=1, h=32, hkv=8, nb=128, dim=128, summary="minmax", per="layer"),
    dict(name="llama_nb517_kvhead", b=1, h=32, hkv=8, nb=517, dim=128, summary="minmax", per="kv_head"),
    dict(name="mean_nb300_k64", b=2, h=8, hkv=2, nb=300, dim=64, summary="mean", per="layer"),
    dict(name="gemma_d256_nb100", b=1, h=8, hkv=4, nb=100, dim=256, summary="minmax", per="layer"),
    dict(name="llama_nb700_prescaled", b=1, h=32, hkv=8, nb=700, dim=128, summary="minmax", per="layer",
         prec="fp16", prescaled=True),
], ids=lambda c: c["name"])
def test_transition_gpu(case):
    _check_transition(run_transition_case(case, "cuda", _fresh_seed()), GPU)


@cuda_only
def test_transition_gpu_every_config():
    """Every configuration of the autotune space is right, not only the one autotuning picks (fp16 operands
    have configs of their own, run here on prescaled operands)."""
    from sketch_walk.kernels.block_transition import candidate_configs
    for summary, dim, half in (("minmax", 128, False), ("mean", 64, False), ("minmax", 128, True)):
        case = dict(name="cfg", b=1, h=8, hkv=2, nb=300, dim=dim, summary=summary, per="layer", split=2)
        if half:
            case.update(prec="fp16", prescaled=True)
        for cfg in candidate_configs(dim, summary == "minmax", half):
            c = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            res = run_transition_case(case, "cuda", _fresh_seed(), config=c)
            _check_transition(res, GPU)


@cuda_only
@pytest.mark.parametrize("case", ROW_CASES + [
    dict(name="llama_nb2048_k16", b=1, gp=1, hkv=8, nb=2048, sink=1, local=1, k=16, dense_last=0, kind="zeros"),
    dict(name="nb4100_k64_bisection", b=1, gp=1, hkv=1, nb=4100, sink=1, local=1, k=64, dense_last=4, kind="ties"),
], ids=lambda c: c["name"])
def test_row_select_gpu(case):
    _check_row(run_row_case(case, "cuda", _fresh_seed()), GPU)


@cuda_only
@pytest.mark.parametrize("case", WALK_CASES + [dict(name="nb2048", b=1, gp=1, gr=1, nb=2048, beta=0.25),
                                               dict(name="nb2048_bf16", b=1, gp=1, gr=1, nb=2048, beta=0.25,
                                                    prec="bf16"),
                                               dict(name="nb300_bf16", b=1, gp=2, gr=1, nb=300, beta=0.25,
                                                    prec="bf16")],
                         ids=lambda c: c["name"])
def test_walk_step_gpu(case):
    _check_walk(run_walk_case(case, "cuda", _fresh_seed()), GPU)


@cuda_only
def test_walk_step_gpu_every_config():
    from sketch_walk.kernels.walk_step import candidate_configs
    for nb in (300, 384):                       # 384: a multiple of 128, no bounds masks
        case = dict(name="cfg", b=1, gp=2, gr=1, nb=nb, beta=0.25)
        for cfg in candidate_configs():
            c = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            _check_walk(run_walk_case(case, "cuda", _fresh_seed(), config=c), GPU)


@cuda_only
@pytest.mark.parametrize("case", PIPELINE_CASES + GPU_PIPELINE_CASES, ids=lambda c: c["name"])
def test_select_prefill_triton_vs_torch_gpu(case):
    """On the GPU both paths run on CUDA (the torch one forced); TF32 scores move near-ties, so the kept blocks
    must hold the torch path's walk mass to 3e-2; fp64 sums / maxima / counts stay exact."""
    _check_pipeline(run_pipeline_case(case, "cuda", _fresh_seed()), GPU, exact_state=True)


@cuda_only
def test_tuned_kernel_second_launch_skips_autotuner(monkeypatch):
    """TunedKernel (sketch_walk.core.kernels._launch): the first launch of a key goes through the Autotuner, later
    ones call the kernel with the chosen config directly: the Autotuner is not entered again and the output
    equals a launch pinned to that config."""
    from sketch_walk.kernels import walk_step as ws
    g = torch.Generator(device="cuda").manual_seed(_fresh_seed())
    nb = 200 + int(torch.randint(0, 56, (1,), generator=g, device="cuda"))
    r = torch.rand(1, 1, nb, nb, device="cuda", generator=g).tril()
    w = torch.rand(1, 2, nb, nb, device="cuda", generator=g).tril()
    tuned = ws._tuned_kernel()
    monkeypatch.setattr(tuned, "chosen", {})          # a key never seen, whatever ran before
    entered = []
    tuner_run = tuned.tuner.run
    monkeypatch.setattr(tuned.tuner, "run", lambda *a, **k: (entered.append(1), tuner_run(*a, **k))[1])
    first = ws.walk_step_triton(r, w, 0.25)
    assert len(entered) == 1 and len(tuned.chosen) == 1
    key = next(iter(tuned.chosen))
    assert key[0] == ws.pow2(nb)

    def no_autotune(*a, **k):
        raise AssertionError("the Autotuner ran for a key it had tuned")
    monkeypatch.setattr(tuned.tuner, "run", no_autotune)
    again = ws.walk_step_triton(r, w, 0.25)
    pinned = ws.walk_step_triton(r, w, 0.25, config=tuned.chosen[key])
    assert torch.equal(again, first) and torch.equal(again, pinned)
    ref = ws.walk_step_reference(r.double(), w.double(), 0.25)
    assert float((again.double() - ref).norm() / ref.norm()) <= GPU["walk"]


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()

