"""Cost of one Sketch&Walk decode selection per candidate scorer, at Llama-3.1-8B geometry (issue 17, item 3).

Geometry: 32 query heads, 8 key heads, head dim 128, bf16, batch 1, random inputs, block 64; the cache holds n
tokens (default 128K) and the new token lands mid-block (no block opens during timing). Each candidate is a
:class:`sketch_walk.SketchWalkConfig` (``CANDIDATES``); its selector prefills layers 2 and 3 on n - 1 tokens, layer
2 takes the decode step (so layer 3's chained walk has a previous row), and layer 3's
``SketchWalkSelector.select_decode`` is timed:
  * eagerly (triton.testing.do_bench median, CUDA events), the step's state rewound host-side before every call;
  * as a CUDA-graph replay (20 steps in one graph), when capture works (a host sync inside the step makes it fail:
    then the eager figure is repeated and ``graph_ok`` is false);
beside SDPA's decode (one query against the n-token cache, enable_gqa) timed the same two ways, and the floor:
the bytes of block summaries a step must read (key summaries of every block, plus the walk's transition row reads
when the walk is on), at the GPU's measured copy bandwidth. The selection path (Triton kernels or torch) is named.

Usage: python benchmarks/decode_scorer_speed.py [--length 131072] [--candidates seed sub4 ...] [--out FILE]
Writes benchmarks/results/decode_scorer_speed_<gpu>.json: GPU, versions, command, date, every figure.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import types

import torch

from attention_speed import BS, D, H, HKV, bench_ms, graph_step_ms     # siblings: benchmarks/ is the script's folder
from results_io import header, results_path, write_json

#: candidate decode scorers / budgets (issue 17): every knob not named is the seed's (``--preset seed``; the
#: project's defaults gained --dense_last_blocks 1 --decode_rerank 8 later, so ``{}`` would time the re-ranking)
_CANDIDATE_KNOBS = {
    "seed": {},
    "seed_torch": {},                                       # the same, on the torch path (the kernels' reference)
    "sub4": {"key_sub_blocks": 4},                          # Kmax / Kmin of 16-token sub-blocks (LServe)
    "qwin32": {"decode_query_window": 32},                  # the mean of the last 32 queries, seeded by the prompt
    "qwin32_each": {"decode_query_window": 32, "decode_window_scoring": "each_query"},
    "question": {"decode_keep_question": True},             # + the blocks the question chose at prefill
    "sub4_question": {"key_sub_blocks": 4, "decode_keep_question": True},
    "fraction": {"budget_mode": "fraction", "budget_fraction": 0.0078},     # ~16 of 2048 blocks
    "mass": {"budget_mode": "mass", "budget_mass": 0.99, "sparsity_exponent": 1.0, "budget_max_blocks": 16},
    "authors": {"preset": "authors"},
    "rerank4": {"decode_rerank": 4},                        # Triton shortlist of 64, exact mass over its keys
    "rerank8": {"decode_rerank": 8},                        # a shortlist of 128, re-ranked by ~25 PyTorch ops
    "rerank8_kernel": {"decode_rerank": 8},                 # the same, re-ranked by kernels/rerank_select.py
    "rerank4_kernel": {"decode_rerank": 4},
}
CANDIDATES = {name: knobs if "preset" in knobs else {"preset": "seed", **knobs}
              for name, knobs in _CANDIDATE_KNOBS.items()}


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (GB/s, read + write counted) of a 1 GiB buffer."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3) / 1e9


def summary_bytes(cfg, n: int) -> int:
    """Bytes a decode step must read of block summaries: the keys' (minmax: Kmax and Kmin of every (sub-)block;
    mean: the sketched block means) and, with the walk on, one transition row per walk step."""
    nb = -(-n // cfg.block_size)
    if cfg.key_summary == "minmax":
        keys = 2 * HKV * nb * cfg.key_sub_blocks * D * 4
    else:
        k_sketch = D if cfg.sketch_dim >= D else cfg.sketch_dim
        keys = HKV * nb * k_sketch * 4
    walk = cfg.walk_steps * nb * nb * 4 if cfg.walk_damping > 0 else 0    # r W reads the whole W per step
    rerank = HKV * cfg.decode_rerank * cfg.top_k_blocks * cfg.block_size * D * 2   # bf16 keys of the shortlist
    return keys + walk + rerank


def run_candidate(name: str, knobs: dict, n: int) -> dict:
    from sketch_walk import SketchWalkConfig, SketchWalkSelector

    cfg = SketchWalkConfig.from_dict(dict(knobs))
    sel = SketchWalkSelector(cfg)
    if name.endswith("_kernel"):                # the Triton re-ranking (SketchWalkSelector._rerank_kernel)
        os.environ["SKETCH_WALK_RERANK_KERNEL"] = "1"
    else:                                       # the PyTorch re-ranking (the kernel is the default on the GPU)
        os.environ["SKETCH_WALK_RERANK_KERNEL"] = "0"
    if name.endswith("_torch"):
        sel.backend = "torch"
    sel.reset(1)
    torch.manual_seed(0)
    module = types.SimpleNamespace(scaling=D ** -0.5)
    layers = (2, 3)
    qs = {l: torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16) for l in layers}
    ks = {l: torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16) for l in layers}
    with torch.no_grad():
        for l in layers:
            sel.select_prefill(l, module, qs[l][:, :, : n - 1], ks[l][:, :, : n - 1])
        sel.select_decode(2, module, qs[2][:, :, n - 1:], ks[2])
    st = sel.state.layers[3]
    q_new, k_cache = qs[3][:, :, n - 1:], ks[3]

    def rewind():                       # host side: the step sees the same cache length every time
        st.keys.n = n - 1

    def step():
        rewind()
        with torch.no_grad():
            return sel.select_decode(3, module, q_new, k_cache)

    idx, cnt = step()
    torch.cuda.synchronize()
    row = {"knobs": cfg.to_dict(), "path": "triton" if sel._fused_decode(q_new.device) else "torch",
           "kept_blocks": int(cnt[0, 0]), "n_blocks": -(-n // cfg.block_size),
           "eager_us": 1e3 * bench_ms(step, min_reps=20, rep_ms=100.0)}

    def captured():
        with torch.no_grad():
            sel.select_decode(3, module, q_new, k_cache)
    ms, ok = graph_step_ms(captured, n_steps=20, before=rewind)
    row["graph_us"], row["graph_ok"] = 1e3 * ms, ok
    row["summary_bytes"] = summary_bytes(cfg, n)
    return row


def sdpa_decode(n: int) -> dict:
    q = torch.randn(1, H, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    ms, ok = graph_step_ms(f, n_steps=20)
    return {"eager_us": 1e3 * bench_ms(f, min_reps=20, rep_ms=100.0), "graph_us": 1e3 * ms, "graph_ok": ok}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=131072, help="cache length n (the new token is the n-th)")
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_scorer_speed.py needs a CUDA GPU")
    n = args.length - 20 if args.length % BS == 0 else args.length      # mid-block: no block opens while timing
    res = header(length=n, geometry={"heads": H, "kv_heads": HKV, "head_dim": D, "block_size": BS,
                                     "dtype": "bfloat16"}, candidates={}, sdpa=None)
    path = results_path("decode_scorer_speed", res["gpu"], args.out)
    res["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    res["sdpa"] = sdpa_decode(n)
    print(f"n {n}: SDPA decode {res['sdpa']['eager_us']:.1f} us eager, {res['sdpa']['graph_us']:.1f} us graph; "
          f"copy bandwidth {res['copy_bandwidth_gbs']:.0f} GB/s", flush=True)
    for name in args.candidates:
        try:
            row = run_candidate(name, CANDIDATES[name], n)
            row["floor_us"] = row["summary_bytes"] / (res["copy_bandwidth_gbs"] * 1e9 / 2) * 1e6   # reads only
        except Exception as e:  # one failing candidate must not lose the others
            traceback.print_exc()
            row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        res["candidates"][name] = row
        write_json(res, path)
        if "error" not in row:
            print(f"{name:14s} {row['path']:6s} kept {row['kept_blocks']:4d}/{row['n_blocks']}  eager "
                  f"{row['eager_us']:8.1f} us  graph {row['graph_us']:8.1f} us ({'ok' if row['graph_ok'] else 'FAILED'})"
                  f"  floor {row['floor_us']:6.1f} us", flush=True)
        else:
            print(f"{name}: {row['error']}", flush=True)
    write_json(res, path)
    print("wrote", path)


if __name__ == "__main__":
    main()
