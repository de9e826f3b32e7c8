"""Attention speed at Llama-3.1-8B geometry (issue 5, item 6): SDPA vs FlexAttention vs our block-sparse kernels.

Geometry: 32 query heads, 8 key heads, head dim 128, bf16, batch 1, random inputs; lengths 8K..128K;
Sketch&Walk lists with top_k_blocks 8 / 16 / 32 at block 64 (sink + diagonal + top-k).
Times are medians of triton.testing.do_bench (CUDA events, L2 flushed between runs, warm-up first);
decode steps are timed as CUDA-graph replays (20 steps per graph) when capture works, else eagerly.

Rows, per length:
  prefill: SDPA causal (default dispatch, enable_gqa; the backend it picked is named, and each
  forced backend is timed too), our kernel at full density (every causal block; TFLOP/s beside
  the measured bf16 matmul rate), and per top_k: FlexAttention (compiled, BlockMask built from the
  very same lists, kernel_options BLOCK_M = BLOCK_N = 64), our kernel on those lists, Sketch&Walk's
  selection alone, and selection + kernel ("SketchWalk attention").
  decode (one query against an n-token cache): SDPA, our decode kernel on the selected lists,
  selection + kernel.
Peak memory: torch.cuda.max_memory_allocated during one call, minus what was allocated before.
Lists come from sketch_walk.SketchWalkSelector (default config but top_k_blocks) run on the random
q/k as a middle layer (layer 2, after one earlier call so the walk has a previous R).

Usage: python benchmarks/attention_speed.py [--quick] [--lengths 8192 32768] [--top_k 8 16 32]
       [--sweep] (also time every kernel config pinned) [--out FILE]
Writes benchmarks/results/attention_speed_<gpu>.json (or --out): GPU, versions, command, date, all figures.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback

import torch

from results_io import header, results_path, write_json     # a sibling: benchmarks/ is the script's folder
from sketch_walk.core.block_sparse import attended_keys_decode, attended_pairs_prefill, causal_pairs


H, HKV, D, BS = 32, 8, 128, 64


# ----------------------------------------------------------------------------------------------
# timing helpers
# ----------------------------------------------------------------------------------------------

def bench_ms(fn, min_reps: int = 5, rep_ms: float = 200.0) -> float:
    """Median ms of fn (do_bench: CUDA events, L2 flushed), at least ``min_reps`` timed runs."""
    import triton.testing as tt
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    rep = max(rep_ms, min_reps * est)
    return float(tt.do_bench(fn, warmup=max(est, 10.0), rep=rep, return_mode="median"))


def graph_step_ms(step, n_steps: int = 20, before=None):
    """Time of one call of ``step`` as a CUDA-graph replay (n_steps calls captured in one graph).

    ``before`` runs (host side) before every captured call. Returns (ms, True) or, when capture fails,
    the eager median (ms, False).
    """
    import triton.testing as tt
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                if before:
                    before()
                step()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n_steps):
                if before:
                    before()
                step()
        torch.cuda.synchronize()
        ms = float(tt.do_bench(lambda: g.replay(), warmup=25, rep=200, return_mode="median"))
        return ms / n_steps, True
    except Exception as e:  # e.g. a host sync inside the step
        torch.cuda.synchronize()
        print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:200]}; timing eagerly)")

        def eager():
            if before:
                before()
            step()
        return bench_ms(eager, min_reps=20, rep_ms=100.0), False


def peak_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def rel_err(x, ref) -> float:
    x, ref = x.float(), ref.float()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------

def sdpa_backend_name(q, k, v, causal: bool) -> str:
    """Which backend the default SDPA dispatch picks: torch's own choice function, and the kernel the
    profiler saw run (one call)."""
    from torch.nn.attention import SDPBackend
    names = {}
    for nm in ("ERROR", "MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "OVERRIDEABLE"):
        b = getattr(SDPBackend, nm, None)
        if b is not None:
            try:
                names[int(b.value) if hasattr(b, "value") else int(b)] = nm
            except Exception:
                pass
    choice = "?"
    try:
        try:
            c = torch._fused_sdp_choice(q, k, v, None, 0.0, causal, enable_gqa=True)
        except TypeError:
            r = q.shape[1] // k.shape[1]
            c = torch._fused_sdp_choice(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), None, 0.0, causal)
        choice = names.get(int(c), str(c))
    except Exception as e:
        choice = f"? ({type(e).__name__})"
    kern = "?"
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            torch.cuda.synchronize()
        evs = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0.0))
        kern = evs[0].key[:80] if evs else "?"
    except Exception as e:
        kern = f"? ({type(e).__name__})"
    return f"{choice} [{kern}]"


def sdpa_variants(q, k, v, causal: bool):
    """{name: fn} for the default dispatch and each forced backend that accepts these inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    fns = {"default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)}
    r = q.shape[1] // k.shape[1]
    for be in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        bk = getattr(SDPBackend, be, None)
        if bk is None:
            continue
        for gqa in (True, False):
            kk, vv = (k, v) if gqa else (k.repeat_interleave(r, 1), v.repeat_interleave(r, 1))

            def f(bk=bk, kk=kk, vv=vv, gqa=gqa):
                with sdpa_kernel([bk]):
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=gqa)
            try:
                f()
                torch.cuda.synchronize()
                fns[be + ("" if gqa else "_repeatkv")] = f
                break
            except Exception:
                torch.cuda.synchronize()
                continue
    return fns


def flex_block_mask(idx, cnt, n: int, bs: int):
    """BlockMask from kept-block lists: the diagonal as a partial (causal mask_mod) block, the rest full."""
    from torch.nn.attention.flex_attention import BlockMask
    if bool((idx == idx[:, :1]).all()) and bool((cnt == cnt[:, :1]).all()):
        idx, cnt = idx[:, :1], cnt[:, :1]                  # one list per layer: broadcast over heads
    else:
        r = H // idx.shape[1]
        idx, cnt = idx.repeat_interleave(r, 1), cnt.repeat_interleave(r, 1)
    b, g, nb, mk = idx.shape
    ar = torch.arange(mk, device=idx.device)
    valid = ar < cnt.unsqueeze(-1)
    rows = torch.arange(nb, device=idx.device).view(1, 1, nb, 1)
    diag = valid & (idx == rows)
    full = valid & ~diag
    full_cnt = full.sum(-1).to(torch.int32)
    full_idx = torch.where(full, idx, torch.zeros_like(idx)).to(torch.int32)   # diagonal is the last entry
    full_idx = torch.nn.functional.pad(full_idx, (0, nb - mk)) if nb > mk else full_idx
    part_cnt = diag.any(-1).to(torch.int32)
    part_idx = torch.zeros(b, g, nb, nb, dtype=torch.int32, device=idx.device)
    part_idx[..., 0] = torch.arange(nb, device=idx.device, dtype=torch.int32)

    def causal(b_, h_, q_idx, kv_idx):
        return q_idx >= kv_idx
    kw = dict(BLOCK_SIZE=bs, mask_mod=causal, seq_lengths=(n, n))
    try:
        return BlockMask.from_kv_blocks(part_cnt, part_idx, full_cnt, full_idx.contiguous(), compute_q_blocks=False,
                                        **kw)
    except TypeError:
        return BlockMask.from_kv_blocks(part_cnt, part_idx, full_cnt, full_idx.contiguous(), **kw)


_flex_compiled = None


def flex_fn(q, k, v, mask):
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: _flex_compiled(q, k, v, block_mask=mask, enable_gqa=True,
                                  kernel_options={"BLOCK_M": 64, "BLOCK_N": 64})


def random_lists(nb: int, top_k: int, device):
    """sink + diagonal + top_k random causal blocks per row (fallback when the selector is missing)."""
    from sketch_walk.core.block_sparse import mask_to_block_lists
    i = torch.arange(nb, device=device).view(nb, 1)
    j = torch.arange(nb, device=device).view(1, nb)
    score = torch.rand(nb, nb, device=device).masked_fill(j > i, -1.0)
    score[:, 0] = 2.0
    score = score + 3.0 * (i == j)
    top = score.topk(min(nb, top_k + 2), dim=-1).indices
    mask = torch.zeros(nb, nb, dtype=torch.bool, device=device).scatter_(-1, top, True) & (j <= i)
    idx, cnt = mask_to_block_lists(mask)
    return idx.view(1, 1, nb, -1).expand(1, HKV, nb, idx.shape[-1]).contiguous(), \
        cnt.view(1, 1, nb).expand(1, HKV, nb).contiguous()


def select_breakdown(sel, q, k) -> dict:
    """Each Triton launch of the prefill selection timed alone (sketch_walk.kernels.prefill_selection)."""
    from sketch_walk.kernels.prefill_selection import stage_callables
    c = sel.config
    s_mat = sel._srht(3, D, q.device) if c.key_summary == "mean" else None
    fns = stage_callables(q, k, block_size=c.block_size, scale=1.0 / math.sqrt(D), key_summary=c.key_summary,
                          select_per=c.select_per, srht_matrix=s_mat, sparsity_exponent=c.sparsity_exponent,
                          walk_damping=c.walk_damping, r_prev=sel.state.walk_r, n_sink=c.n_sink,
                          n_local=c.n_local, top_k_blocks=c.top_k_blocks, dense_last=c.dense_last_blocks,
                          other_precisions=("tf32", "fp16"))
    return {name: bench_ms(fn) for name, fn in fns.items()}


# ----------------------------------------------------------------------------------------------
# the measurements
# ----------------------------------------------------------------------------------------------

def rooflines() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b, min_reps=20)
    x = torch.randn(2 ** 29 // 2, device="cuda", dtype=torch.bfloat16)      # 512 MiB
    y = torch.empty_like(x)
    ms_c = bench_ms(lambda: y.copy_(x), min_reps=20)
    return {"bf16_matmul_8192_tflops": 2 * 8192 ** 3 / ms / 1e9,
            "d2d_copy_gbps_read_plus_write": 2 * x.numel() * 2 / ms_c / 1e6}


def prefill_rows(n: int, top_ks, sweep: bool, res: dict, quick: bool) -> None:
    from sketch_walk.core.kernels.block_sparse_prefill import block_sparse_attention_triton, candidate_configs
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(n)
    q = torch.randn(1, H, n, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16, generator=g)
    nb = (n + BS - 1) // BS
    row = res.setdefault("prefill", {}).setdefault(str(n), {})
    dense_flop = 4.0 * D * H * causal_pairs(n)
    row["dense_flop"] = dense_flop

    # SDPA
    row["sdpa_backend_default"] = sdpa_backend_name(q, k, v, True)
    sd = {}
    for name, fn in sdpa_variants(q, k, v, True).items():
        if quick and name != "default":
            continue
        sd[name] = bench_ms(fn)
    row["sdpa_ms"] = sd
    sdpa_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    row["sdpa_peak_mb"] = peak_mb(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True))
    print(f"[{n}] SDPA {sd} (default backend {row['sdpa_backend_default']})", flush=True)

    # our kernel, every causal block
    full_idx = torch.arange(nb, device=dev, dtype=torch.int32).view(1, 1, 1, nb).expand(1, HKV, nb, nb)
    full_cnt = torch.arange(1, nb + 1, device=dev, dtype=torch.int32).view(1, 1, nb).expand(1, HKV, nb)
    f_full = lambda: block_sparse_attention_triton(q, k, v, full_idx, full_cnt, BS, None)  # noqa: E731
    o_full, _ = f_full()
    row["ours_full_err_vs_sdpa"] = rel_err(o_full, sdpa_out)
    del o_full
    row["ours_full_ms"] = bench_ms(f_full)
    row["ours_full_tflops"] = dense_flop / row["ours_full_ms"] / 1e9
    row["ours_full_peak_mb"] = peak_mb(f_full)
    print(f"[{n}] ours full density {row['ours_full_ms']:.3f} ms ({row['ours_full_tflops']:.0f} TFLOP/s, "
          f"err vs SDPA {row['ours_full_err_vs_sdpa']:.2e})", flush=True)
    if sweep:
        row["sweep_full"] = {}
        for cfg in candidate_configs(H // HKV, BS, D):
            c = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            name = ",".join(f"{a}={b}" for a, b in c.items())
            row["sweep_full"][name] = bench_ms(
                lambda: block_sparse_attention_triton(q, k, v, full_idx, full_cnt, BS, None, config=c))
        print(f"[{n}] sweep full: {row['sweep_full']}", flush=True)

    # selected density
    try:
        from sketch_walk import SketchWalkConfig, SketchWalkSelector
        have_sel = True
    except Exception as e:  # colleague's module missing or broken
        have_sel = False
        row["selector_error"] = f"{type(e).__name__}: {e}"
    for tk in top_ks:
        t = row.setdefault(f"top_k_{tk}", {})
        try:
            sel = None
            if have_sel:
                sel = SketchWalkSelector(SketchWalkConfig(top_k_blocks=tk, block_size=BS))
                sel.reset(1)
                sel.select_prefill(2, None, q, k)                   # layer "2": first sparse layer
                idx, cnt = sel.select_prefill(3, None, q, k)        # a later one: the walk has a previous R
                t["lists"] = "SketchWalkSelector (default config, top_k_blocks=%d), layer 3 of random q/k" % tk
            else:
                idx, cnt = random_lists(nb, tk, dev)
                t["lists"] = "random: sink + diagonal + top_k random blocks"
            pairs = float(attended_pairs_prefill(idx, cnt, n, BS).sum()) / HKV
            t["density"] = pairs / causal_pairs(n)
            t["flop"] = 4.0 * D * H * pairs
            f_ours = lambda: block_sparse_attention_triton(q, k, v, idx, cnt, BS, None)  # noqa: E731
            o_ours, _ = f_ours()
            t["ours_ms"] = bench_ms(f_ours)
            t["ours_tflops"] = t["flop"] / t["ours_ms"] / 1e9
            t["ours_peak_mb"] = peak_mb(f_ours)
            if sweep:
                t["sweep"] = {}
                for cfg in candidate_configs(H // HKV, BS, D):
                    c = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                    name = ",".join(f"{a}={b}" for a, b in c.items())
                    t["sweep"][name] = bench_ms(
                        lambda: block_sparse_attention_triton(q, k, v, idx, cnt, BS, None, config=c))
            try:
                mask = flex_block_mask(idx, cnt, n, BS)
                f_flex = flex_fn(q, k, v, mask)
                o_flex = f_flex()
                t["flex_err_vs_ours"] = rel_err(o_ours, o_flex)
                t["flex_ms"] = bench_ms(f_flex)
                t["flex_peak_mb"] = peak_mb(f_flex)
                del o_flex
            except Exception as e:
                t["flex_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            del o_ours
            if sel is not None:
                f_sel = lambda: sel.select_prefill(3, None, q, k)  # noqa: E731
                t["select_ms"] = bench_ms(f_sel)
                try:
                    t["select_breakdown_ms"] = select_breakdown(sel, q, k)
                    print(f"[{n}] top_k {tk}: selection stages (ms) {t['select_breakdown_ms']}", flush=True)
                except Exception as e:
                    t["select_breakdown_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                t["select_peak_mb"] = peak_mb(f_sel)

                def f_sw():
                    i2, c2 = sel.select_prefill(3, None, q, k)
                    return block_sparse_attention_triton(q, k, v, i2, c2, BS, None)
                t["sketchwalk_ms"] = bench_ms(f_sw)
                t["sketchwalk_peak_mb"] = peak_mb(f_sw)
                if n <= 32768:
                    # the selection's launch cost dominates at these lengths (~0.5 ms of host time against
                    # 0.2-0.35 ms of GPU work): the same calls replayed from a CUDA graph give the host-free time
                    t["select_graph_ms"], t["select_graph_ok"] = graph_step_ms(f_sel, n_steps=5)
                    t["sketchwalk_graph_ms"], t["sketchwalk_graph_ok"] = graph_step_ms(f_sw, n_steps=5)
                    print(f"[{n}] top_k {tk}: as CUDA-graph replays: select {t['select_graph_ms']:.3f} ms, "
                          f"sketchwalk {t['sketchwalk_graph_ms']:.3f} ms", flush=True)
                del sel
            print(f"[{n}] top_k {tk}: density {t['density']:.4f} ours {t['ours_ms']:.3f} ms "
                  f"flex {t.get('flex_ms', float('nan')):.3f} ms select {t.get('select_ms', float('nan')):.3f} ms "
                  f"sketchwalk {t.get('sketchwalk_ms', float('nan')):.3f} ms "
                  f"{t.get('sweep', '')}", flush=True)
        except Exception as e:
            t["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        torch.cuda.empty_cache()


def decode_rows(n: int, top_ks, res: dict) -> None:
    from sketch_walk.core.kernels.block_sparse_decode import block_sparse_decode_triton
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(n + 1)
    kc = torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16, generator=g)
    vc = torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16, generator=g)
    q1 = torch.randn(1, H, 1, D, device=dev, dtype=torch.bfloat16, generator=g)
    nb = (n + BS - 1) // BS
    row = res.setdefault("decode", {}).setdefault(str(n), {})
    F = torch.nn.functional
    row["sdpa_backend_default"] = sdpa_backend_name(q1, kc, vc, False)
    f_sdpa = lambda: F.scaled_dot_product_attention(q1, kc, vc, enable_gqa=True)  # noqa: E731
    row["sdpa_ms"] = bench_ms(f_sdpa, min_reps=50)
    row["sdpa_graph_ms"], _ = graph_step_ms(f_sdpa)
    ref_full = f_sdpa()
    full_idx = torch.arange(nb, device=dev, dtype=torch.int32).view(1, 1, nb).expand(1, HKV, nb)
    full_cnt = torch.full((1, HKV), nb, device=dev, dtype=torch.int32)
    f_full = lambda: block_sparse_decode_triton(q1, kc, vc, full_idx, full_cnt, BS)  # noqa: E731
    row["ours_full_err_vs_sdpa"] = rel_err(f_full()[0], ref_full)
    row["ours_full_graph_ms"], _ = graph_step_ms(f_full)
    print(f"[{n}] decode SDPA {row['sdpa_ms'] * 1e3:.1f} us (graph {row['sdpa_graph_ms'] * 1e3:.1f} us), ours full "
          f"{row['ours_full_graph_ms'] * 1e3:.1f} us err {row['ours_full_err_vs_sdpa']:.1e}", flush=True)
    try:
        from sketch_walk import SketchWalkConfig, SketchWalkSelector
        have_sel = True
    except Exception as e:
        have_sel = False
        row["selector_error"] = f"{type(e).__name__}: {e}"
    for tk in top_ks:
        t = row.setdefault(f"top_k_{tk}", {})
        try:
            if have_sel:
                sel = SketchWalkSelector(SketchWalkConfig(top_k_blocks=tk, block_size=BS))
                sel.reset(1)
                qp = torch.randn(1, H, n - 1, D, device=dev, dtype=torch.bfloat16, generator=g)
                sel.select_prefill(2, None, qp, kc[:, :, :n - 1])
                sel.select_prefill(3, None, qp, kc[:, :, :n - 1])
                del qp
                st = sel.state.layers[3]

                def rewind():                                      # replay the same step: one token past the
                    st.keys.n = n - 1                              # prompt (counts drift; harmless for timing)
                rewind()
                idx, cnt = sel.select_decode(3, None, q1, kc)
                t["lists"] = "SketchWalkSelector.select_decode, layer 3"
                # "triton": the 3-launch fused selection of sketch_walk.kernels.decode_select; "torch": the op-by-op path
                t["select_path"] = "triton" if sel._fused_decode(q1.device) else "torch"
            else:
                sel, rewind = None, None
                m = torch.zeros(1, 1, nb, dtype=torch.bool, device=dev)
                m[..., 0] = True
                m[..., -1] = True
                m[..., torch.randperm(nb - 2, device=dev)[:tk] + 1] = True
                from sketch_walk.core.block_sparse import mask_to_block_lists
                idx, cnt = mask_to_block_lists(m.expand(1, HKV, nb).contiguous())
                t["lists"] = "random: sink + last + top_k random blocks"
            t["keys"] = float(attended_keys_decode(idx, cnt, n, BS).mean())
            f_k = lambda: block_sparse_decode_triton(q1, kc, vc, idx, cnt, BS)  # noqa: E731
            from sketch_walk.core.block_sparse import block_sparse_decode_reference
            t["ours_err_vs_ref"] = rel_err(f_k()[0], block_sparse_decode_reference(q1, kc, vc, idx, cnt, BS)[0])
            t["ours_ms"] = bench_ms(f_k, min_reps=50)
            t["ours_graph_ms"], _ = graph_step_ms(f_k)
            if sel is not None:
                def f_sel():
                    return sel.select_decode(3, None, q1, kc)
                t["select_ms"] = bench_ms(lambda: (rewind(), f_sel()), min_reps=20)
                t["select_graph_ms"], t["select_graph_ok"] = graph_step_ms(f_sel, before=rewind)

                def f_sw():
                    i2, c2 = sel.select_decode(3, None, q1, kc)
                    return block_sparse_decode_triton(q1, kc, vc, i2, c2, BS)
                t["sketchwalk_ms"] = bench_ms(lambda: (rewind(), f_sw()), min_reps=20)
                t["sketchwalk_graph_ms"], t["sketchwalk_graph_ok"] = graph_step_ms(f_sw, before=rewind)
                # one step per graph: do_bench flushes L2 before every replay, so the layer's Kmax / Kmin /
                # W_cache (~24 MB at 128K, which 20 replays of the same layer would keep in L2) come from HBM,
                # as in a real decode step where every layer has its own state
                t["select_graph1_ms"], _ = graph_step_ms(f_sel, n_steps=1, before=rewind)
                t["sketchwalk_graph1_ms"], _ = graph_step_ms(f_sw, n_steps=1, before=rewind)
            print(f"[{n}] decode top_k {tk}: ours {t['ours_ms'] * 1e3:.1f} us (graph {t['ours_graph_ms'] * 1e3:.1f}) "
                  f"select {t.get('select_ms', float('nan')) * 1e3:.1f} us (graph "
                  f"{t.get('select_graph_ms', float('nan')) * 1e3:.1f}) sketchwalk "
                  f"{t.get('sketchwalk_ms', float('nan')) * 1e3:.1f} us (graph "
                  f"{t.get('sketchwalk_graph_ms', float('nan')) * 1e3:.1f}; L2-cold 1-step graph: select "
                  f"{t.get('select_graph1_ms', float('nan')) * 1e3:.1f}, sketchwalk "
                  f"{t.get('sketchwalk_graph1_ms', float('nan')) * 1e3:.1f})", flush=True)
        except Exception as e:
            t["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        torch.cuda.empty_cache()


def table(res: dict) -> str:
    lines = []
    rf = res["rooflines"]
    lines.append(f"GPU {res['gpu']}; bf16 matmul {rf['bf16_matmul_8192_tflops']:.0f} TFLOP/s, copy "
                 f"{rf['d2d_copy_gbps_read_plus_write']:.0f} GB/s; SDPA = default dispatch "
                 f"(backend named per row); ratios = SDPA time / row time unless said")
    lines.append("PREFILL  n     | SDPA ms (backend)      | ours-full ms  x-SDPA TFLOP/s | top_k dens.  | "
                 "flex ms  ours ms  x-flex  | select ms  SW ms  x-SDPA sel%")
    for n, row in res.get("prefill", {}).items():
        sd = row["sdpa_ms"]["default"]
        best = min(row["sdpa_ms"].values())
        first = True
        for key in sorted((k for k in row if k.startswith("top_k_")), key=lambda s: int(s.split("_")[-1])):
            t = row[key]
            head = (f"{int(n) // 1024:>4}K | {sd:8.2f} ({row['sdpa_backend_default'][:12]:>12}) | "
                    f"{row.get('ours_full_ms', float('nan')):9.2f} {sd / row.get('ours_full_ms', float('nan')):5.2f}x "
                    f"{row.get('ours_full_tflops', float('nan')):5.0f}   |") if first else " " * 60 + "|"
            first = False
            fl, ou = t.get("flex_ms", float("nan")), t.get("ours_ms", float("nan"))
            se, sw = t.get("select_ms", float("nan")), t.get("sketchwalk_ms", float("nan"))
            lines.append(f"{head} {key[6:]:>3} {t.get('density', float('nan')):.4f} | {fl:7.3f} {ou:7.3f} "
                         f"{fl / ou:6.2f}x  | {se:7.3f} {sw:7.3f} {sd / sw:6.1f}x {100 * se / sw:4.0f}%")
        if best < sd * 0.98:
            lines.append(f"        (fastest forced SDPA backend: {min(row['sdpa_ms'], key=row['sdpa_ms'].get)} "
                         f"{best:.2f} ms)")
    lines.append("DECODE   n     | SDPA us (graph) | ours-full us | top_k keys | ours us (graph) | "
                 "select us (graph) | SW us (graph)  x-SDPA(graph)")
    for n, row in res.get("decode", {}).items():
        first = True
        for key in sorted((k for k in row if k.startswith("top_k_")), key=lambda s: int(s.split("_")[-1])):
            t = row[key]
            head = (f"{int(n) // 1024:>4}K | {row['sdpa_ms'] * 1e3:6.1f} ({row['sdpa_graph_ms'] * 1e3:6.1f}) | "
                    f"{row['ours_full_graph_ms'] * 1e3:10.1f}   |") if first else " " * 46 + "|"
            first = False
            swg = t.get("sketchwalk_graph_ms", float("nan"))
            lines.append(f"{head} {key[6:]:>3} {t.get('keys', float('nan')):6.0f} | "
                         f"{t.get('ours_ms', float('nan')) * 1e3:6.1f} ({t.get('ours_graph_ms', float('nan')) * 1e3:5.1f}) | "
                         f"{t.get('select_ms', float('nan')) * 1e3:7.1f} ({t.get('select_graph_ms', float('nan')) * 1e3:6.1f}) | "
                         f"{t.get('sketchwalk_ms', float('nan')) * 1e3:6.1f} ({swg * 1e3:6.1f}) "
                         f"{row['sdpa_graph_ms'] / swg:6.1f}x")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 8K and 32K, top_k 16, default SDPA only")
    ap.add_argument("--lengths", type=int, nargs="*", default=None)
    ap.add_argument("--top_k", type=int, nargs="*", default=None)
    ap.add_argument("--decode_lengths", type=int, nargs="*", default=None)
    ap.add_argument("--sweep", action="store_true", help="also time every prefill kernel config pinned")
    ap.add_argument("--sweep_lengths", type=int, nargs="*", default=None, help="lengths the sweep runs at (all)")
    ap.add_argument("--budget_s", type=float, default=1e9, help="skip the lengths left once this many s passed")
    ap.add_argument("--no_decode", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_speed.py needs a CUDA GPU")
    lengths = args.lengths or ([8192, 32768] if args.quick else [8192, 16384, 32768, 65536, 131072])
    top_ks = args.top_k or ([16] if args.quick else [8, 16, 32])
    dec_lengths = [] if args.no_decode else (args.decode_lengths or lengths)
    import triton
    res = header(geometry={"H": H, "H_kv": HKV, "d": D, "block_size": BS, "dtype": "bfloat16", "batch": 1},
                 timing="triton.testing.do_bench median (CUDA events, L2 flushed); decode *_graph_ms: CUDA-graph "
                        "replay of 20 steps / 20",
                 peak_mb="max_memory_allocated during one call minus memory allocated before it")
    gpu = res["gpu"]
    from sketch_walk.kernels.block_transition import dot_precision
    # block_transition's operands (SKETCH_WALK_SELECT_DOT; "auto": by the number of key blocks)
    res["select_dot_precision"] = {n: dot_precision(n // BS) for n in (8192, 16384, 32768, 65536, 131072)}
    res["rooflines"] = rooflines()
    print(f"{gpu} torch {torch.__version__} triton {triton.__version__}: {res['rooflines']}", flush=True)
    t0 = time.time()
    skipped = []
    # largest first: when --budget_s runs out, the small lengths are the ones left out
    for n in sorted(set(lengths) | set(dec_lengths), reverse=True):
        if time.time() - t0 > args.budget_s:
            skipped.append(n)
            continue
        if n in lengths:
            sweep = args.sweep and (args.sweep_lengths is None or n in args.sweep_lengths)
            try:
                prefill_rows(n, top_ks, sweep, res, args.quick)
            except Exception as e:
                res.setdefault("errors", []).append(f"prefill {n}: {type(e).__name__}: {str(e)[:300]}")
                traceback.print_exc()
            torch.cuda.empty_cache()
        if n in dec_lengths:
            try:
                decode_rows(n, top_ks, res)
            except Exception as e:
                res.setdefault("errors", []).append(f"decode {n}: {type(e).__name__}: {str(e)[:300]}")
                traceback.print_exc()
            torch.cuda.empty_cache()
    res["skipped_for_time"] = skipped
    res["wall_s"] = time.time() - t0
    out = results_path("attention_speed", gpu, args.out)
    write_json(res, out)
    try:
        print(table(res))
    except Exception:
        traceback.print_exc()
        print(json.dumps(res, indent=1)[-6000:])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
