"""Host (CPU) cost of launching SketchWalk prefill attention, call by call (issue 5: the 8K eager figure).

At short prompts the selection is ~0.07 ms of GPU work but costs several times that in Python and launch
overhead, so an eager loop runs at the host's speed. This script measures, at Llama-3.1-8B geometry
(32 / 8 heads, d 128, bf16, block 64, top_k_blocks 16, random q/k, a middle layer so the walk runs):

  * host us per call: ``reps`` calls enqueued back to back without a sync, wall time / reps (the GPU is
    slower than the host only where "gpu_bound" is true: then the figure is the GPU's, not the host's);
  * the same for each selection stage, the attention kernel, an empty Triton kernel (plain and through
    an autotuner with one config) and a small torch.empty, so launches and allocations can be costed;
  * a cProfile table (tottime) of the selection calls.

Usage: python benchmarks/host_overhead.py [--lengths 8192 16384 32768] [--reps 100] [--repeat 5]
       [--code OTHER_CHECKOUT] [--out FILE]
Writes benchmarks/results/host_overhead_<gpu>.json: GPU, CPU, versions, command, date, every raw figure.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
import time

import torch

_code = argparse.ArgumentParser(add_help=False)
_code.add_argument("--code", default=None)
_CODE = _code.parse_known_args()[0].code
if _CODE and os.environ.get("HOST_OVERHEAD_CODE") != os.path.abspath(_CODE):
    # another checkout's code (an A/B of versions): run this script again with that folder first on PYTHONPATH,
    # before anything imports sketch_walk (the checkout must have this layout: sketch_walk/core/)
    if not os.path.isfile(os.path.join(_CODE, "sketch_walk", "__init__.py")):
        print(f"host_overhead.py: --code {_CODE}: no sketch_walk/__init__.py there; give the folder that holds "
              f"the other version's sketch_walk/", file=sys.stderr)
        sys.exit(2)
    code = os.path.abspath(_CODE)
    env = dict(os.environ, HOST_OVERHEAD_CODE=code,
               PYTHONPATH=os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH")) if p))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

from attention_speed import BS, D, H, HKV  # noqa: E402  (siblings: benchmarks/ is the script's folder)
from results_io import header, results_path, write_json  # noqa: E402


def host_us(fn, reps: int, repeat: int = 5) -> dict:
    """Host us per call: ``reps`` calls enqueued without a sync, wall time / reps; ``repeat`` such batches,
    median and min kept (the host's speed drifts between batches). wall_us: per call once the GPU caught up
    (median batch); gpu_bound: the GPU still had work queued after the host finished (then host_us is the
    GPU's pace, not the host's)."""
    fn()
    torch.cuda.synchronize()
    hosts, walls, bound = [], [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        hosts.append((t1 - t0) / reps * 1e6)
        walls.append((t2 - t0) / reps * 1e6)
        bound += (t2 - t1) > 0.2 * (t1 - t0)
    return {"host_us": round(statistics.median(hosts), 2), "host_us_min": round(min(hosts), 2),
            "wall_us": round(statistics.median(walls), 2), "gpu_bound": bound > repeat // 2}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def trivial_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _noop(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.zeros([BLOCK], tl.float32), mask=offs < n)

    # two configs: with one, Autotuner.run skips building its key, the per-call work TunedKernel avoids
    tuned = triton.autotune(configs=[triton.Config({"BLOCK": 16}, num_warps=1),
                                     triton.Config({"BLOCK": 16}, num_warps=2)], key=["n"])(triton.jit(_noop.fn))
    return _noop, tuned


def run_length(n: int, reps: int, repeat: int, res: dict) -> None:
    from sketch_walk import SketchWalkConfig, SketchWalkSelector
    from sketch_walk.core.kernels.block_sparse_prefill import block_sparse_attention_triton
    from sketch_walk.kernels.prefill_selection import stage_callables

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(n)
    q = torch.randn(1, H, n, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16, generator=g)
    cfg = SketchWalkConfig(top_k_blocks=16, block_size=BS)
    sel = SketchWalkSelector(cfg)
    sel.reset(1)
    sel.select_prefill(2, None, q, k)
    idx, cnt = sel.select_prefill(3, None, q, k)
    row = res.setdefault(str(n), {})
    calls = {}
    calls["select_prefill"] = lambda: sel.select_prefill(3, None, q, k)
    calls["attention_kernel"] = lambda: block_sparse_attention_triton(q, k, v, idx, cnt, BS, None)

    def sketchwalk():
        i2, c2 = sel.select_prefill(3, None, q, k)
        return block_sparse_attention_triton(q, k, v, i2, c2, BS, None)
    calls["sketchwalk (select + kernel)"] = sketchwalk
    scale = D ** -0.5
    stages = stage_callables(q, k, block_size=BS, scale=scale, key_summary=cfg.key_summary,
                             select_per=cfg.select_per, sparsity_exponent=cfg.sparsity_exponent,
                             walk_damping=cfg.walk_damping, r_prev=sel.state.walk_r, n_sink=cfg.n_sink,
                             n_local=cfg.n_local, top_k_blocks=cfg.top_k_blocks)
    for name, fn in stages.items():
        calls[f"stage {name}"] = fn
    buf = torch.empty(64, device=dev)
    noop, noop_tuned = trivial_kernels()
    calls["empty triton kernel"] = lambda: noop[(1,)](buf, 64, BLOCK=16)
    calls["empty triton kernel, autotuner (2 configs, tuned)"] = lambda: noop_tuned[(1,)](buf, 64)
    calls["torch.empty (4 KB)"] = lambda: torch.empty(1024, device=dev)
    calls["torch copy_ (4 KB)"] = lambda: buf.copy_(buf)
    row["host"] = {}
    for name, fn in calls.items():
        row["host"][name] = host_us(fn, reps, repeat)
        print(f"[{n}] {name:45s} {row['host'][name]}", flush=True)

    prof = cProfile.Profile()
    f_sel = calls["select_prefill"]
    f_sel()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(reps):
        f_sel()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    row["cprofile_select_prefill_tottime"] = s.getvalue()
    print(s.getvalue(), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[8192, 16384, 32768])
    ap.add_argument("--reps", type=int, default=100, help="calls enqueued per batch")
    ap.add_argument("--repeat", type=int, default=5, help="batches per figure (median and min reported)")
    ap.add_argument("--code", default=None, help="import sketch_walk from this folder (A/B of two versions)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("host_overhead.py: needs a CUDA GPU; none is visible", file=sys.stderr)
        sys.exit(2)
    res = header(cpu=cpu_name(), cpu_count=os.cpu_count(), method=host_us.__doc__, lengths={})
    import sketch_walk
    res["sketch_walk_from"] = os.path.dirname(os.path.dirname(os.path.abspath(sketch_walk.__file__)))
    out = results_path("host_overhead", res["gpu"], args.out)
    for n in args.lengths:
        run_length(n, args.reps, args.repeat, res["lengths"])
        write_json(res, out)
        print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
