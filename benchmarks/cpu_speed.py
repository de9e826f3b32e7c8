"""CPU speed inside the model: SmolLM2 on a RULER prompt, dense vs SketchWalk vs SeerAttn, piece by piece.

What `make demo` runs on a CPU (docs/PERFORMANCE.md, "CPU"): the embedded SmolLM2-135M-Instruct in fp32,
one niah_single_1 prompt of --length tokens made by the repository's generator (the demo's task, so the
methods see natural text and select as they do there), and for each method one prefill forward
followed by --decode_steps greedy decode steps on the model's own cache, exactly as RULER's generation
loop runs them (inference mode, logits of the last position only). Methods:

* dense: ``attn_implementation="sdpa"`` (torch's CPU flash attention, causal);
* sketchwalk: ``enable_sketch_walk(model, SketchWalkConfig())`` (the demo's knobs: top_k_blocks 16, block 64);
* seerattn: ``enable_seer_attn(model, seer_attn/checkpoints/smollm2)`` (the committed gates, their threshold);
* sketchwalk_reference, seerattn_reference (on request): the same on the float references (backend "reference").

The methods take turns within each repetition (dense, sketchwalk, seerattn, dense, ...) on one model, so a
slow change in the machine's load hits them alike; the JSON keeps every repetition with the load average
before it, and gives the ratios to dense of the medians, of the least disturbed repetitions (other jobs on a
shared machine only add time, and they add more to calls made of many small parallel operations) and of each
repetition. Beside wall time each measurement records the process's CPU time (with --threads 1 the work itself,
whatever else runs; with more threads it also counts the threads' spinning).

Each forward is split by timers around the hook's calls (the benchmark wraps them; nothing in the
package is changed): ``select`` (the selector's select_prefill / select_decode: Sketch&Walk's steps 1-7,
SeerAttn's gate), ``sparse_attn`` (block_sparse_attention / block_sparse_decode), ``dense_attn`` (SDPA:
the dense model's layers, the methods' dense layers) and ``rest`` (everything else: projections, MLPs,
norms, RoPE, the cache, the hook's bookkeeping).

Beside the model it times the attention alone on the lists the methods chose in the last repetition for
one middle layer (--layer): the block-sparse prefill and decode on those lists against SDPA at the same
shapes (median of --kernel_reps), so the kernel's share is visible without the model around it.

Usage: python benchmarks/cpu_speed.py [--length 4096] [--reps 3] [--decode_steps 8] [--threads N]
       [--methods dense sketchwalk seerattn] [--label before] [--before EARLIER.json] [--out PATH]
Writes benchmarks/results/cpu_speed_<cpu>.json (or --out) and prints a table.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Dict, List, Tuple

import torch

from results_io import header, results_path, write_json     # a sibling: benchmarks/ is the script's folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(REPO, "seer_attn", "checkpoints", "smollm2")
# "<method>_reference": the same method on the float references (backend "reference"), the attention the CPU ran
# before sketch_walk/core/kernels/block_sparse_cpu.py; with them the before / after ratio is measured in one process
METHODS = ("dense", "sketchwalk", "seerattn", "sketchwalk_reference", "seerattn_reference")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_prompt(length: int, tokenizer) -> torch.Tensor:
    """Token ids (1, n) of the first niah_single_1 sample of ``length`` tokens, as `make demo` generates it."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, os.path.join(REPO, "eval/ruler/data/synthetic/generate_niah_single_1.py"),
                        "--save_dir", tmp, "--num_samples", "1", "--max_seq_length", str(length),
                        "--tokens_to_generate", "32", "--tokenizer_path", "smollm2", "--tokenizer_type", "hf"],
                       check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(tmp, "niah_single_1", "validation.jsonl")) as f:
            prompt = json.loads(f.readline())["input"]
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids


class Timers:
    """Wall and process CPU seconds spent in named calls; ``wrap`` times a function under a name (outermost call
    only). With --threads 1 the CPU seconds are the work itself, whatever else runs on the machine."""

    def __init__(self):
        self.acc: Dict[str, float] = {}
        self.cpu: Dict[str, float] = {}
        self._depth = 0

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.acc[name] = self.acc.get(name, 0.0) + time.perf_counter() - t0
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0
                self._depth -= 1
        return timed

    def take(self) -> Tuple[Dict[str, float], Dict[str, float]]:
        out, cpu, self.acc, self.cpu = self.acc, self.cpu, {}, {}
        return out, cpu


def install_timers(timers: Timers, captured: Dict[str, tuple], layer: int) -> None:
    """Wrap SDPA (transformers' and the hook's dense path) and the hook's block-sparse calls with timers; keep
    the lists of ``layer``'s last prefill and decode call in ``captured``."""
    import transformers.integrations.sdpa_attention as sdpa_mod
    from transformers import AttentionInterface

    import sketch_walk.core.hook as hook

    sdpa = timers.wrap("dense_attn", sdpa_mod.sdpa_attention_forward)
    sdpa_mod.sdpa_attention_forward = sdpa
    AttentionInterface.register("sdpa", sdpa)

    def capture(kind, fn):
        def call(q, k, v, idx, cnt, bs, **kw):
            if getattr(call, "layer", None) == layer:
                captured[kind] = (idx.clone(), cnt.clone(), k.shape[2])
            return fn(q, k, v, idx, cnt, bs, **kw)
        return timers.wrap("sparse_attn", call), call

    hook.block_sparse_attention, prefill_call = capture("prefill", hook.block_sparse_attention)
    hook.block_sparse_decode, decode_call = capture("decode", hook.block_sparse_decode)
    forward = hook.SparseAttentionSession.forward

    def session_forward(self, module, *args, **kwargs):
        prefill_call.layer = decode_call.layer = module.layer_idx
        return forward(self, module, *args, **kwargs)

    hook.SparseAttentionSession.forward = session_forward


def enable(method: str, model, timers: Timers):
    """Switch ``model`` to ``method``; returns the session (None for dense) with its selector's calls timed."""
    if method == "dense":
        return None
    name, _, backend = method.partition("_")
    if name == "sketchwalk":
        from sketch_walk import SketchWalkConfig, enable_sketch_walk
        session = enable_sketch_walk(model, SketchWalkConfig(), backend=backend or None)
    else:
        from seer_attn import enable_seer_attn
        session = enable_seer_attn(model, CHECKPOINT, backend=backend or None)
    sel = session.selector
    sel.select_prefill = timers.wrap("select", sel.select_prefill)
    sel.select_decode = timers.wrap("select", sel.select_decode)
    return session


@contextmanager
def clock(into: dict, timers: Timers):
    """Wall and process CPU seconds of the block, the load average before and after, and the timers' split."""
    timers.take()
    load0, w0, c0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
    yield
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    parts, parts_cpu = timers.take()
    parts["rest"] = wall - sum(parts.values())
    parts_cpu["rest"] = cpu - sum(parts_cpu.values())
    into.update(wall_s=wall, cpu_s=cpu, load_before=load0, load_after=os.getloadavg()[0],
                parts_s={k: round(v, 4) for k, v in parts.items()},
                parts_cpu_s={k: round(v, 4) for k, v in parts_cpu.items()})


def run_sample(model, ids: torch.Tensor, decode_steps: int, timers: Timers) -> Dict:
    """One prefill and ``decode_steps`` greedy steps on a fresh DynamicCache, as RULER's loop runs them."""
    from transformers import DynamicCache

    res: Dict = {"prefill": {}, "decode": []}
    cache = DynamicCache()
    # the forward argument that takes the cache: "cache" in newer transformers, "past_key_values" before
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    n = ids.shape[1]
    with torch.inference_mode():
        with clock(res["prefill"], timers):
            logits = model(input_ids=ids, position_ids=torch.arange(n).unsqueeze(0), use_cache=True,
                           logits_to_keep=1, **{kw: cache}).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        tokens = [int(tok)]
        for step in range(decode_steps):
            one: Dict = {}
            with clock(one, timers):
                logits = model(input_ids=tok, position_ids=torch.tensor([[n + step]]), use_cache=True,
                               logits_to_keep=1, **{kw: cache}).logits[:, -1]
            tok = logits.argmax(-1, keepdim=True)
            tokens.append(int(tok))
            res["decode"].append(one)
    res["tokens"] = tokens
    return res


def median_of(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(samples: List[Dict]) -> Dict:
    """Medians over repetitions: prefill wall / cpu and its parts; decode per step (median over every step)."""
    pre = [s["prefill"] for s in samples]
    dec = [d for s in samples for d in s["decode"]]
    parts = sorted({k for p in pre + dec for k in p["parts_s"]})
    return {
        "prefill_s": median_of([p["wall_s"] for p in pre]),
        "prefill_cpu_s": median_of([p["cpu_s"] for p in pre]),
        "prefill_parts_s": {k: median_of([p["parts_s"].get(k, 0.0) for p in pre]) for k in parts},
        "prefill_parts_cpu_s": {k: median_of([p["parts_cpu_s"].get(k, 0.0) for p in pre]) for k in parts},
        "decode_step_ms": 1e3 * median_of([d["wall_s"] for d in dec]),
        "decode_step_cpu_ms": 1e3 * median_of([d["cpu_s"] for d in dec]),
        "decode_parts_ms": {k: 1e3 * median_of([d["parts_s"].get(k, 0.0) for d in dec]) for k in parts},
        "decode_parts_cpu_ms": {k: 1e3 * median_of([d["parts_cpu_s"].get(k, 0.0) for d in dec]) for k in parts},
        # the least disturbed repetition: on a shared machine other jobs only ever add time
        "prefill_min_s": min(p["wall_s"] for p in pre),
        "decode_step_min_ms": 1e3 * min(median_of([d["wall_s"] for d in s["decode"]]) for s in samples),
    }


def kernel_rows(q_shape, lists: Dict[str, tuple], reps: int, backend=None) -> Dict:
    """The attention alone at one layer's shapes on random inputs, the method's lists of that layer against SDPA:
    prefill (causal SDPA with GQA vs block_sparse_attention) and one decode step (SDPA over the whole cache vs
    block_sparse_decode) on the method's attention ``backend``, median ms of ``reps`` after a warm-up."""
    import torch.nn.functional as F

    from sketch_walk.core.block_sparse import block_sparse_attention, block_sparse_decode

    def med(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(ts)

    b, h, n, d = q_shape
    out = {}
    if "prefill" in lists:
        idx, cnt, _ = lists["prefill"]
        hkv = idx.shape[1]
        g = torch.Generator().manual_seed(0)
        # the model's layout: (B, n, H, d) projections viewed as (B, H, n, d)
        q = torch.randn(b, n, h, d, generator=g).transpose(1, 2)
        k = torch.randn(b, n, hkv, d, generator=g).transpose(1, 2)
        v = torch.randn(b, n, hkv, d, generator=g).transpose(1, 2)
        out["prefill_sdpa_ms"] = med(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        out["prefill_sparse_ms"] = med(lambda: block_sparse_attention(q, k, v, idx, cnt, 64, backend=backend))
    if "decode" in lists:
        idx, cnt, nk = lists["decode"]
        hkv = idx.shape[1]
        g = torch.Generator().manual_seed(1)
        q = torch.randn(b, 1, h, d, generator=g).transpose(1, 2)
        k = torch.randn(b, hkv, nk, d, generator=g)
        v = torch.randn(b, hkv, nk, d, generator=g)
        out["decode_sdpa_ms"] = med(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        out["decode_sparse_ms"] = med(lambda: block_sparse_decode(q, k, v, idx, cnt, 64, backend=backend))
    return out


def kernel_tiles(reps: int, keys: int = 3072, d: int = 64) -> Dict:
    """ns per query-key pair of torch's CPU flash-attention kernel (no mask) by query length L, the same number of
    pairs each time: L = 64 (one block of one head), 192 (SmolLM2's r = 3 heads of a block, as the CPU path calls
    it), 768 and 2304, against ``keys`` keys of dimension d."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out = {}
    for L in (64, 192, 768, 2304):
        n = 2304 // L
        q, k, v = torch.randn(n, 1, L, d), torch.randn(n, 1, keys, d), torch.randn(n, 1, keys, d)
        op(q, k, v)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            op(q, k, v)
            ts.append(time.perf_counter() - t0)
        out[str(L)] = 1e9 * statistics.median(ts) / (n * L * keys)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=4096, help="prompt tokens (the demo's DEMO_LENGTH)")
    ap.add_argument("--reps", type=int, default=3, help="samples per method (methods take turns)")
    ap.add_argument("--decode_steps", type=int, default=8, help="decode steps timed after each prefill")
    ap.add_argument("--methods", nargs="+", default=list(METHODS[:3]), choices=METHODS)
    ap.add_argument("--layer", type=int, default=15, help="the layer whose lists the attention-alone rows use")
    ap.add_argument("--kernel_reps", type=int, default=5)
    ap.add_argument("--warmup_length", type=int, default=1024, help="tokens of the untimed warm-up sample")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--label", default="", help="a word saved in the JSON (e.g. before / after)")
    ap.add_argument("--before", default=None, help="an earlier cpu_speed JSON whose medians are copied in as the before")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from eval.ruler.model_loader import load_model
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model("smollm2", dtype="float32", device="cpu")
    ids = make_prompt(args.length, tok)
    cfg = model.config
    timers, captured = Timers(), {}
    install_timers(timers, captured, args.layer)
    from sketch_walk import SketchWalkConfig
    sw = SketchWalkConfig()
    res = header(sketchwalk_knobs={k: getattr(sw, k) for k in ("block_size", "top_k_blocks", "dense_layers",
                                                              "dense_last_blocks", "decode_rerank")},
                 cpu=cpu_name(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                 label=args.label, model="smollm2 (SmolLM2-135M-Instruct, fp32)", prompt_tokens=ids.shape[1],
                 decode_steps=args.decode_steps, reps=args.reps, warmup_length=args.warmup_length, uptime=_uptime())
    print(f"{res['cpu']}, {res['torch_threads']} threads, torch {res['torch']}; prompt {ids.shape[1]} tokens; "
          f"load {res['uptime']}", flush=True)

    samples: Dict[str, List[Dict]] = {m: [] for m in args.methods}
    density: Dict[str, Dict] = {}
    lists: Dict[str, Dict] = {}
    for rep in range(args.reps + 1):
        for m in args.methods:
            session = enable(m, model, timers)
            captured.clear()
            # rep 0 warms each method up on the prompt's first --warmup_length tokens (one-time costs: thread pool,
            # allocator, lazy imports, first-call paths), not kept
            s = run_sample(model, ids if rep else ids[:, :args.warmup_length], args.decode_steps if rep else 2, timers)
            if session is not None:
                rpt = session.report()
                density[m] = {"prefill": rpt["prefill"], "decode": rpt["decode"]}
                session.disable()
            lists[m] = dict(captured)
            if rep:
                samples[m].append(s)
                print(f"rep {rep} {m:10s} prefill {s['prefill']['wall_s']:.2f} s (cpu {s['prefill']['cpu_s']:.2f}: "
                      f"{s['prefill']['parts_cpu_s']}), decode "
                      f"{1e3 * median_of([d['wall_s'] for d in s['decode']]):.1f} ms/step (cpu "
                      f"{1e3 * median_of([d['cpu_s'] for d in s['decode']]):.1f}), load "
                      f"{s['prefill']['load_before']:.2f}", flush=True)

    q_shape = (1, cfg.num_attention_heads, ids.shape[1], cfg.hidden_size // cfg.num_attention_heads)
    res["methods"] = {}
    for m in args.methods:
        row = summarise(samples[m])
        row["density"] = density.get(m, {"prefill": 1.0, "decode": 1.0})
        row["tokens"] = samples[m][-1]["tokens"]
        # each repetition: the prefill whole, the decode steps as their median (the JSON stays small)
        row["samples"] = [dict(prefill=s["prefill"], decode_median_ms=1e3 * median_of([d["wall_s"] for d in s["decode"]]),
                               decode_median_cpu_ms=1e3 * median_of([d["cpu_s"] for d in s["decode"]]),
                               decode_load_before=s["decode"][0]["load_before"] if s["decode"] else None)
                          for s in samples[m]]
        if lists.get(m):
            backend = m.partition("_")[2] or None
            row["attention_alone"] = dict(layer=args.layer, **kernel_rows(q_shape, lists[m], args.kernel_reps, backend))
        res["methods"][m] = row
    res["kernel_ns_per_pair_by_query_length"] = kernel_tiles(args.kernel_reps)
    print("flash kernel, ns per query-key pair by query length:",
          json.dumps({k: round(v, 2) for k, v in res["kernel_ns_per_pair_by_query_length"].items()}))
    base = res["methods"].get("dense")
    print(f"\n{'method':20s} {'prefill s':>9s} {'x dense':>8s} {'decode ms':>9s} {'x dense':>8s} {'density':>8s}  "
          f"prefill parts s (wall; cpu)")
    for m, row in res["methods"].items():
        if base:
            row["prefill_vs_dense"] = row["prefill_s"] / base["prefill_s"]
            row["decode_vs_dense"] = row["decode_step_ms"] / base["decode_step_ms"]
            row["prefill_cpu_vs_dense"] = row["prefill_cpu_s"] / base["prefill_cpu_s"]
            row["decode_cpu_vs_dense"] = row["decode_step_cpu_ms"] / base["decode_step_cpu_ms"]
            row["prefill_min_vs_dense"] = row["prefill_min_s"] / base["prefill_min_s"]
            row["decode_min_vs_dense"] = row["decode_step_min_ms"] / base["decode_step_min_ms"]
            # each repetition's ratio (the methods of one repetition ran back to back, under about the same load)
            row["prefill_vs_dense_by_rep"] = [s["prefill"]["wall_s"] / d["prefill"]["wall_s"]
                                              for s, d in zip(row["samples"], base["samples"])]
        nan = float("nan")
        parts = {k: round(v, 2) for k, v in row["prefill_parts_s"].items()}
        parts_cpu = {k: round(v, 2) for k, v in row["prefill_parts_cpu_s"].items()}
        print(f"{m:20s} {row['prefill_s']:9.2f} {row.get('prefill_vs_dense', float('nan')):8.2f} "
              f"{row['decode_step_ms']:9.1f} {row.get('decode_vs_dense', float('nan')):8.2f} "
              f"{row['density']['prefill']:8.3f}  {json.dumps(parts)}; {json.dumps(parts_cpu)}")
        print(f"{'':20s} least disturbed repetition: prefill {row['prefill_min_s']:.2f} s "
              f"({row.get('prefill_min_vs_dense', nan):.2f}x), decode {row['decode_step_min_ms']:.1f} ms "
              f"({row.get('decode_min_vs_dense', nan):.2f}x); by repetition "
              f"{[round(x, 2) for x in row.get('prefill_vs_dense_by_rep', [])]}")
        dec = {k: round(v, 1) for k, v in row["decode_parts_cpu_ms"].items()}
        print(f"{'':20s} cpu: prefill {row['prefill_cpu_s']:.2f} s ({row.get('prefill_cpu_vs_dense', nan):.2f}x "
              f"dense), decode {row['decode_step_cpu_ms']:.1f} ms ({row.get('decode_cpu_vs_dense', nan):.2f}x): "
              f"{json.dumps(dec)}")
        if "attention_alone" in row:
            alone = {k: round(v, 2) for k, v in row["attention_alone"].items()}
            print(f"{'':20s} attention alone: {json.dumps(alone)}")
    res["uptime_end"] = _uptime()
    if args.before:
        res["before"] = before_summary(args.before)
    path = results_path("cpu_speed", res["cpu"], args.out)
    write_json(res, path)
    print("wrote", path)


def before_summary(path: str) -> Dict:
    """An earlier run's medians (prefill s, decode ms per step, densities, ratios to dense), its code, date and load."""
    with open(path) as f:
        old = json.load(f)
    keys = ("prefill_s", "decode_step_ms", "prefill_cpu_s", "decode_step_cpu_ms", "density", "prefill_vs_dense",
            "decode_vs_dense", "prefill_min_s", "decode_step_min_ms")
    return {"file": os.path.relpath(path, REPO), "date": old.get("date"), "code": old.get("code"),
            "torch_threads": old.get("torch_threads"), "uptime": old.get("uptime"), "uptime_end": old.get("uptime_end"),
            "note": old.get("note"), "label": old.get("label"),
            "methods": {m: {k: row[k] for k in keys if k in row} for m, row in old.get("methods", {}).items()}}


def _uptime() -> str:
    """The load averages (1, 5, 15 min) as `uptime` prints them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
