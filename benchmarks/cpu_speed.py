"""CPU speed inside the model: SmolLM2 on a RULER prompt, dense vs SketchWalk vs SeerAttn, piece by piece.

What `make demo` runs on a CPU (docs/PERFORMANCE.md, "CPU"): the embedded SmolLM2-135M-Instruct in fp32,
one niah_single_1 prompt of --length tokens made by the repository's generator (the demo's task, so the
methods see natural text and select as they do there), and for each method one prefill forward
followed by --decode_steps greedy decode steps on the model's own cache, exactly as RULER's generation
loop runs them (inference mode, logits of the last position only). Methods:

* dense: ``attn_implementation="sdpa"`` (torch's CPU flash attention, causal);
* sketchwalk: ``enable_sketch_walk(model, SketchWalkConfig())`` (the demo's knobs: top_k_blocks 16, block 64);
* seerattn: ``enable_seer_attn(model, seer_attn/checkpoints/smollm2)`` (the committed gates, their threshold).

The methods take turns within each repetition (dense, sketchwalk, seerattn, dense, ...) on one model, so a
change in the machine's load hits them alike; the JSON keeps every repetition, and the ratios to dense are
of the medians. Beside wall time each measurement records the process's CPU time (on an idle machine
about threads x wall; less means the process waited for the CPU) and the load average around it.

Each forward is split by timers around the hook's calls (the benchmark wraps them; nothing in the
package is changed): ``select`` (the selector's select_prefill / select_decode: Sketch&Walk's steps 1-7,
SeerAttn's gate), ``sparse_attn`` (block_sparse_attention / block_sparse_decode), ``dense_attn`` (SDPA:
the dense model's layers, the methods' dense layers) and ``rest`` (everything else: projections, MLPs,
norms, RoPE, the cache, the hook's bookkeeping).

Beside the model it times the attention alone on the lists the methods chose in the last repetition for
one middle layer (--layer): the block-sparse prefill and decode on those lists against SDPA at the same
shapes (median of --kernel_reps), so the kernel's share is visible without the model around it.

Usage: python benchmarks/cpu_speed.py [--length 4096] [--reps 3] [--decode_steps 8] [--methods dense sketchwalk seerattn]
       [--label before] [--out PATH]
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
from typing import Dict, List

import torch

from results_io import header, results_path, write_json     # a sibling: benchmarks/ is the script's folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(REPO, "seer_attn", "checkpoints", "smollm2")
METHODS = ("dense", "sketchwalk", "seerattn")


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
    """Seconds spent in named calls; ``wrap`` times a function under a name (outermost call only)."""

    def __init__(self):
        self.acc: Dict[str, float] = {}
        self._depth = 0

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.acc[name] = self.acc.get(name, 0.0) + time.perf_counter() - t0
                self._depth -= 1
        return timed

    def take(self) -> Dict[str, float]:
        out, self.acc = self.acc, {}
        return out


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
    if method == "sketchwalk":
        from sketch_walk import SketchWalkConfig, enable_sketch_walk
        session = enable_sketch_walk(model, SketchWalkConfig())
    else:
        from seer_attn import enable_seer_attn
        session = enable_seer_attn(model, CHECKPOINT)
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
    parts = timers.take()
    parts["rest"] = wall - sum(parts.values())
    into.update(wall_s=wall, cpu_s=cpu, load_before=load0, load_after=os.getloadavg()[0],
                parts_s={k: round(v, 4) for k, v in parts.items()})


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
        "decode_step_ms": 1e3 * median_of([d["wall_s"] for d in dec]),
        "decode_step_cpu_ms": 1e3 * median_of([d["cpu_s"] for d in dec]),
        "decode_parts_ms": {k: 1e3 * median_of([d["parts_s"].get(k, 0.0) for d in dec]) for k in parts},
    }


def kernel_rows(q_shape, lists: Dict[str, tuple], reps: int) -> Dict:
    """The attention alone at one layer's shapes on random inputs, the method's lists of that layer against SDPA:
    prefill (causal SDPA with GQA vs block_sparse_attention) and one decode step (SDPA over the whole cache vs
    block_sparse_decode), median ms of ``reps`` after a warm-up."""
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
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        sparse = lambda: block_sparse_attention(q, k, v, idx, cnt, 64)  # noqa: E731
        out["prefill_sdpa_ms"], out["prefill_sparse_ms"] = med(sdpa), med(sparse)
    if "decode" in lists:
        idx, cnt, nk = lists["decode"]
        hkv = idx.shape[1]
        g = torch.Generator().manual_seed(1)
        q = torch.randn(b, 1, h, d, generator=g).transpose(1, 2)
        k = torch.randn(b, hkv, nk, d, generator=g)
        v = torch.randn(b, hkv, nk, d, generator=g)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        sparse = lambda: block_sparse_decode(q, k, v, idx, cnt, 64)  # noqa: E731
        out["decode_sdpa_ms"], out["decode_sparse_ms"] = med(sdpa), med(sparse)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=4096, help="prompt tokens (the demo's DEMO_LENGTH)")
    ap.add_argument("--reps", type=int, default=3, help="samples per method (methods take turns)")
    ap.add_argument("--decode_steps", type=int, default=8, help="decode steps timed after each prefill")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--layer", type=int, default=15, help="the layer whose lists the attention-alone rows use")
    ap.add_argument("--kernel_reps", type=int, default=5)
    ap.add_argument("--label", default="", help="a word saved in the JSON (e.g. before / after)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from eval.ruler.model_loader import load_model
    torch.manual_seed(0)
    model, tok = load_model("smollm2", dtype="float32", device="cpu")
    ids = make_prompt(args.length, tok)
    cfg = model.config
    timers, captured = Timers(), {}
    install_timers(timers, captured, args.layer)
    res = header(cpu=cpu_name(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                 label=args.label, model="smollm2 (SmolLM2-135M-Instruct, fp32)", prompt_tokens=ids.shape[1],
                 decode_steps=args.decode_steps, reps=args.reps, uptime=_uptime())
    print(f"{res['cpu']}, {res['torch_threads']} threads, torch {res['torch']}; prompt {ids.shape[1]} tokens; "
          f"load {res['uptime']}", flush=True)

    samples: Dict[str, List[Dict]] = {m: [] for m in args.methods}
    density: Dict[str, Dict] = {}
    lists: Dict[str, Dict] = {}
    for rep in range(args.reps + 1):                  # rep 0: a warm-up round, not kept
        for m in args.methods:
            session = enable(m, model, timers)
            captured.clear()
            s = run_sample(model, ids, args.decode_steps, timers)
            if session is not None:
                rpt = session.report()
                density[m] = {"prefill": rpt["prefill"], "decode": rpt["decode"]}
                session.disable()
            lists[m] = dict(captured)
            if rep:
                samples[m].append(s)
                print(f"rep {rep} {m:10s} prefill {s['prefill']['wall_s']:.2f} s (cpu {s['prefill']['cpu_s']:.2f}, "
                      f"{s['prefill']['parts_s']}), decode "
                      f"{1e3 * median_of([d['wall_s'] for d in s['decode']]):.1f} ms/step, load "
                      f"{s['prefill']['load_before']:.2f}", flush=True)

    q_shape = (1, cfg.num_attention_heads, ids.shape[1], cfg.hidden_size // cfg.num_attention_heads)
    res["methods"] = {}
    for m in args.methods:
        row = summarise(samples[m])
        row["density"] = density.get(m, {"prefill": 1.0, "decode": 1.0})
        row["tokens"] = samples[m][-1]["tokens"]
        row["samples"] = samples[m]
        if lists.get(m):
            row["attention_alone"] = dict(layer=args.layer, **kernel_rows(q_shape, lists[m], args.kernel_reps))
        res["methods"][m] = row
    base = res["methods"].get("dense")
    print(f"\n{'method':11s} {'prefill s':>9s} {'x dense':>8s} {'decode ms':>9s} {'x dense':>8s} {'density':>8s}  "
          f"prefill parts s")
    for m, row in res["methods"].items():
        if base:
            row["prefill_vs_dense"] = row["prefill_s"] / base["prefill_s"]
            row["decode_vs_dense"] = row["decode_step_ms"] / base["decode_step_ms"]
        print(f"{m:11s} {row['prefill_s']:9.2f} {row.get('prefill_vs_dense', float('nan')):8.2f} "
              f"{row['decode_step_ms']:9.1f} {row.get('decode_vs_dense', float('nan')):8.2f} "
              f"{row['density']['prefill']:8.3f}  {json.dumps({k: round(v, 2) for k, v in row['prefill_parts_s'].items()})}")
        if "attention_alone" in row:
            print(f"{'':11s} attention alone at layer {args.layer}: {json.dumps({k: round(v, 2) for k, v in row['attention_alone'].items()})}")
    res["uptime_end"] = _uptime()
    path = results_path("cpu_speed", res["cpu"], args.out)
    write_json(res, path)
    print("wrote", path)


def _uptime() -> str:
    """The load averages (1, 5, 15 min) as `uptime` prints them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
