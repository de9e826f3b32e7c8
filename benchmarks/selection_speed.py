"""Sketch&Walk prefill selection on the GPU, stage by stage and launch choice by launch choice (issue 5).

attention_speed.py reports the selection as one figure (and its stages once); this script explains it:
at Llama-3.1-8B geometry (32 / 8 heads, d 128, bf16, block 64, top_k_blocks 16, random q/k, the
selector run as a middle layer so the walk has a previous R) it times

  * the whole selection (SketchWalkSelector.select_prefill, eager and as a CUDA-graph replay), and the
    kernel it feeds (block_sparse_attention_triton on its lists), so the selection's share is in the file;
  * every stage (sketch_walk.kernels.prefill_selection.stage_callables) at its defaults;
  * per stage, the launch choices beside the default: pooling tokens per load / warps / blocks per
    program, every transition config pinned, the walk with and without bounds masks, TF32 vs bf16 tiles,
    every walk config pinned, the row pass's warps and top-k method;
  * a profiler table of one selection (every GPU kernel with its time);
  * the bf16 walk's agreement with the TF32 walk: kept sets identical per row, and the walk mass the
    bf16 lists keep relative to the TF32 lists.
Times are medians of triton.testing.do_bench (CUDA events, L2 flushed before each run).

Usage: python benchmarks/selection_speed.py [--lengths 65536 131072] [--out FILE]
Writes benchmarks/results/selection_speed_<gpu>.json: GPU, versions, command, date, every raw figure.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import traceback

import torch

from attention_speed import BS, D, H, HKV, bench_ms, graph_step_ms     # siblings: benchmarks/ is the script's folder
from results_io import header, results_path, write_json  # noqa: E402


def _cfg_name(cfg) -> str:
    c = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return ",".join(f"{a}={b}" for a, b in c.items()), c


def _timed(table: dict, name: str, fn) -> None:
    try:
        table[name] = bench_ms(fn)
    except Exception as e:  # one failing variant must not lose the others
        table[name] = f"{type(e).__name__}: {str(e)[:200]}"
    print(f"    {name}: {table[name] if isinstance(table[name], str) else f'{table[name]:.4f} ms'}", flush=True)


def profile_kernels(fn, reps: int = 5) -> list:
    """[(kernel name, mean GPU us per call, calls per selection)] from torch.profiler over ``reps`` calls."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", None)
        if dev_us is None:
            dev_us = getattr(ev, "cuda_time_total", 0.0)
        if dev_us and ev.count:
            rows.append((ev.key[:120], dev_us / reps, ev.count / reps))
    rows.sort(key=lambda r: -r[1])
    return rows


def walk_agreement(cfg, w, r_prev) -> dict:
    """Lists from the TF32 walk and the bf16 walk on the same W (B, G', n_b, n_b) and R_prev: identical kept sets
    per row, and the TF32 walk mass that the bf16 lists keep, relative to what the TF32 lists keep."""
    from sketch_walk.kernels.row_select import row_pass_triton
    from sketch_walk.kernels.walk_step import walk_step_triton
    from sketch_walk.selection import max_kept_for
    nb = w.shape[-1]
    dev = w.device
    out = {}
    for prec in ("tf32", "bf16"):
        cmat = walk_step_triton(r_prev, w, cfg.walk_damping, precision=prec)
        idx = torch.empty(1, HKV, nb, max_kept_for(nb, cfg.n_sink + cfg.n_local + cfg.top_k_blocks, 0),
                          dtype=torch.int32, device=dev)
        cnt = torch.empty(1, HKV, nb, dtype=torch.int32, device=dev)
        row_pass_triton(cmat, 1, out=cmat, lists=(idx, cnt), n_sink=cfg.n_sink, n_local=cfg.n_local,
                        top_k_blocks=cfg.top_k_blocks)
        out[prec] = (cmat, idx[:, :1], cnt[:, :1])
    r32, i32, c32 = out["tf32"]
    _, i16, c16 = out["bf16"]
    same = (torch.equal(c32, c16), (i32 == i16).all(-1))
    valid32 = torch.arange(i32.shape[-1], device=dev) < c32.unsqueeze(-1)
    valid16 = torch.arange(i16.shape[-1], device=dev) < c16.unsqueeze(-1)

    def mass(idx, valid):
        vals = torch.gather(r32[:, :1].double(), -1, torch.where(valid, idx, 0).long())
        return torch.where(valid, vals, 0.0).sum(-1)
    m32, m16 = mass(i32, valid32), mass(i16, valid16)
    return {"rows_identical_fraction": float(same[1].float().mean()), "counts_equal": bool(same[0]),
            "kept_mass_ratio_min": float((m16 / m32.clamp_min(1e-30)).min()),
            "kept_mass_ratio_mean": float((m16 / m32.clamp_min(1e-30)).mean())}


def run_length(n: int, top_k: int, res: dict, dev: str = "cuda") -> None:
    from sketch_walk import SketchWalkConfig, SketchWalkSelector
    from sketch_walk.kernels.block_pool import block_pool_triton
    from sketch_walk.core.kernels.block_sparse_prefill import block_sparse_attention_triton
    from sketch_walk.kernels.block_transition import LOG2E, candidate_configs as transition_configs, dot_precision
    from sketch_walk.kernels.prefill_selection import _pool_operands, _transition, stage_callables
    from sketch_walk.kernels.row_select import row_pass_triton
    from sketch_walk.kernels.walk_step import candidate_configs as walk_configs, walk_step_triton
    from sketch_walk.selection import max_kept_for
    g = torch.Generator(device=dev).manual_seed(n)
    q = torch.randn(1, H, n, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16, generator=g)
    nb = (n + BS - 1) // BS
    row = res.setdefault(str(n), {})
    cfg = SketchWalkConfig(top_k_blocks=top_k, block_size=BS)
    sel = SketchWalkSelector(cfg)
    sel.reset(1)
    sel.select_prefill(2, None, q, k)
    idx, cnt = sel.select_prefill(3, None, q, k)
    scale = 1.0 / math.sqrt(D)
    prec = dot_precision(nb)
    row["dot_precision"] = prec

    print(f"[{n}] whole selection and kernel", flush=True)
    f_sel = lambda: sel.select_prefill(3, None, q, k)  # noqa: E731
    row["select_ms"] = bench_ms(f_sel)
    row["select_graph_ms"], row["select_graph_ok"] = graph_step_ms(f_sel, n_steps=3)
    row["kernel_ms"] = bench_ms(lambda: block_sparse_attention_triton(q, k, v, idx, cnt, BS, None))
    row["share"] = row["select_ms"] / (row["select_ms"] + row["kernel_ms"])
    row["share_graph"] = row["select_graph_ms"] / (row["select_graph_ms"] + row["kernel_ms"])
    print(f"[{n}] select {row['select_ms']:.4f} ms (graph {row['select_graph_ms']:.4f}), kernel "
          f"{row['kernel_ms']:.4f} ms, share {100 * row['share']:.1f}% (graph {100 * row['share_graph']:.1f}%)",
          flush=True)

    print(f"[{n}] stages", flush=True)
    r_prev = sel.state.walk_r
    fns = stage_callables(q, k, block_size=BS, scale=scale, select_per=cfg.select_per,
                          sparsity_exponent=cfg.sparsity_exponent, walk_damping=cfg.walk_damping, r_prev=r_prev,
                          n_sink=cfg.n_sink, n_local=cfg.n_local, top_k_blocks=top_k, other_precisions=("tf32", "fp16"))
    stages = row.setdefault("stages_ms", {})
    for name, fn in fns.items():
        _timed(stages, name, fn)

    print(f"[{n}] pooling launch choices", flush=True)
    half = scale * LOG2E if prec == "fp16" else None
    pool = row.setdefault("pool_ms", {})
    for bt in (16, 32, 64):
        for w in (1, 2, 4):
            for bpp in (1, 2):
                _timed(pool, f"block_t={bt},num_warps={w},blocks_per_prog={bpp}",
                       lambda bt=bt, w=w, bpp=bpp: block_pool_triton(q, k, BS, "minmax", block_t=bt, num_warps=w,
                                                                     half_scale=half, blocks_per_prog=bpp))
    pool_bytes = (q.numel() + k.numel()) * q.element_size()
    row["pool_bytes"] = pool_bytes

    print(f"[{n}] transition configs pinned", flush=True)
    ops = _pool_operands(q, k, BS, scale, "minmax", None)
    part = _transition(ops, scale, cfg.select_per)
    scratch = part.clone()
    trans = row.setdefault("transition_ms", {})
    for c in transition_configs(128, True, ops.prescaled):
        name, kw = _cfg_name(c)
        _timed(trans, name, lambda kw=kw: _transition(ops, scale, cfg.select_per, config=kw, out=scratch))

    print(f"[{n}] walk", flush=True)
    w_mat = torch.empty(part.shape[1:], dtype=torch.float32, device=dev)
    row_pass_triton(part, 2, cfg.sparsity_exponent, out=w_mat)
    c_buf = torch.empty_like(w_mat)
    walk = row.setdefault("walk_ms", {})
    for wp in ("tf32", "bf16"):
        for unmasked in (True, False):
            _timed(walk, f"{wp},unmasked={unmasked},autotuned",
                   lambda wp=wp, um=unmasked: walk_step_triton(r_prev, w_mat, cfg.walk_damping, out=c_buf,
                                                               precision=wp, unmasked=um))
        for c in walk_configs():
            name, kw = _cfg_name(c)
            _timed(walk, f"{wp},{name}", lambda wp=wp, kw=kw: walk_step_triton(
                r_prev, w_mat, cfg.walk_damping, out=c_buf, precision=wp, config=kw))
    try:
        row["walk_bf16_agreement"] = walk_agreement(cfg, w_mat, r_prev)
        print(f"    bf16 walk agreement: {row['walk_bf16_agreement']}", flush=True)
    except Exception as e:
        row["walk_bf16_agreement"] = f"{type(e).__name__}: {str(e)[:200]}"
        traceback.print_exc()

    print(f"[{n}] row passes", flush=True)
    lists = (torch.empty(1, HKV, nb, max_kept_for(nb, cfg.n_sink + cfg.n_local + top_k, 0), dtype=torch.int32,
                         device=dev), torch.empty(1, HKV, nb, dtype=torch.int32, device=dev))
    sel_kw = dict(lists=lists, n_sink=cfg.n_sink, n_local=cfg.n_local, top_k_blocks=top_k)
    rows_t = row.setdefault("row_pass_ms", {})
    for nw in (2, 4, 8):
        tag = f"num_warps={nw}"
        _timed(rows_t, f"sharpen,{tag}", lambda nw=nw: row_pass_triton(
            part, 2, cfg.sparsity_exponent, out=w_mat, num_warps=nw))
        _timed(rows_t, f"rownorm,{tag}", lambda nw=nw: row_pass_triton(c_buf, 1, out=c_buf, num_warps=nw))
        for it in (True, False):
            _timed(rows_t, f"rownorm_select,iterative={it},{tag}", lambda nw=nw, it=it:
                   row_pass_triton(c_buf, 1, out=c_buf, num_warps=nw, iterative=it, **sel_kw))

    print(f"[{n}] profile of one selection", flush=True)
    try:
        row["profile_us"] = [{"kernel": a, "us": b, "calls": c} for a, b, c in profile_kernels(f_sel)]
        for r in row["profile_us"][:20]:
            print(f"    {r['us']:9.1f} us  x{r['calls']:.0f}  {r['kernel']}", flush=True)
    except Exception as e:
        row["profile_us"] = f"{type(e).__name__}: {str(e)[:200]}"
        traceback.print_exc()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[65536, 131072], help="prompt lengths (tokens)")
    ap.add_argument("--top_k", type=int, default=16, help="top_k_blocks of the selection")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/selection_speed_<gpu>.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("selection_speed.py: needs a CUDA GPU (the Triton selection kernels); none is visible", file=sys.stderr)
        sys.exit(2)
    res = header(geometry={"heads": H, "kv_heads": HKV, "head_dim": D, "block": BS, "dtype": "bfloat16",
                           "top_k_blocks": args.top_k},
                 timing="triton.testing.do_bench median, L2 flushed before each run", lengths={})
    out = results_path("selection_speed", res["gpu"], args.out)
    t0 = time.time()
    for n in args.lengths:
        try:
            run_length(n, args.top_k, res["lengths"])
            torch.cuda.empty_cache()
        except Exception as e:
            res["lengths"].setdefault(str(n), {})["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        res["wall_s"] = time.time() - t0
        write_json(res, out)                # after every length: a run cut short keeps what it measured
        print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
