"""Whole-model prefill speed: a randomly initialised Llama-3.1-8B (bf16), dense SDPA vs Sketch&Walk.

The model is built from Llama-3.1-8B's config (no weights are downloaded: random init is enough for
speed), with all 32 layers unless --layers says fewer. For each length (32K, 64K, 128K by default) it
times one prefill forward (use_cache=False, logits for the last position only) with
attn_implementation "sdpa" and with ``sketch_walk.enable_sketch_walk(model, SketchWalkConfig())``
(default knobs: top_k_blocks 16, block 64, 2 dense layers), median of --reps runs after one warm-up
(CUDA events). Beside the ratio it prints the ceiling the dense parts leave: with T_attn the time of
one causal SDPA call at that length (measured here), sparse attention that cost nothing would give
T_dense / (T_dense - (L - dense_layers) * T_attn).

Usage: python benchmarks/model_speed.py [--lengths 32768 65536 131072] [--layers 32] [--reps 2] [--quick]
Writes benchmarks/results/model_speed_<gpu>.json (or --out).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from results_io import header, results_path, write_json     # a sibling: benchmarks/ is the script's folder

LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                   max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                   tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    kw = dict(LLAMA_31_8B, num_hidden_layers=layers)
    try:
        cfg = LlamaConfig(**kw)
    except Exception:
        kw.pop("rope_scaling")
        cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to(torch.bfloat16).eval()
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter("sdpa")
        except Exception:
            pass
    return model, cfg


def timed_forward(model, ids, reps: int):
    """(median ms of ``reps`` runs after one warm-up, last-position logits, peak MB)."""
    times = []
    logits = None
    peak = 0.0
    for i in range(reps + 1):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.no_grad():
            s.record()
            out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
            e.record()
        torch.cuda.synchronize()
        if i > 0:
            times.append(s.elapsed_time(e))
        peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2 ** 20)
        logits = out.logits[:, -1].float()
        del out
    import statistics
    return statistics.median(times), logits, peak


def sdpa_ms(n: int, heads: int, kv: int, d: int) -> float:
    import triton.testing as tt
    q = torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, kv, n, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, kv, n, d, device="cuda", dtype=torch.bfloat16)
    f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa
    f()
    return float(tt.do_bench(f, warmup=50, rep=300, return_mode="median"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=None)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 layers at 8K")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("model_speed.py needs a CUDA GPU")
    if args.quick:
        args.layers, lengths = 4, args.lengths or [8192]
    else:
        lengths = args.lengths or [32768, 65536, 131072]
    import transformers
    from sketch_walk import SketchWalkConfig, enable_sketch_walk
    gpu = torch.cuda.get_device_name()
    t_start = time.time()
    model, cfg = build_model(args.layers)
    sw_cfg = SketchWalkConfig()
    res = header(transformers=transformers.__version__, model="Llama-3.1-8B config, random init, bf16",
                 layers=args.layers, layers_note=f"{args.layers} of Llama-3.1-8B's 32 layers",
                 sketch_walk_config=sw_cfg.to_dict(), reps=args.reps,
                 timing="CUDA events around model(input_ids, use_cache=False, logits_to_keep=1); median after 1 "
                        "warm-up",
                 rows={})
    print(f"{gpu}: model with {args.layers} layers built in {time.time() - t_start:.0f} s", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    n_sparse = max(0, args.layers - sw_cfg.dense_layers)
    for n in lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda", generator=g)
        row = {}
        row["dense_ms"], ld, row["dense_peak_mb"] = timed_forward(model, ids, args.reps)
        session = enable_sketch_walk(model, sw_cfg)
        try:
            row["sketchwalk_ms"], ls, row["sketchwalk_peak_mb"] = timed_forward(model, ids, args.reps)
            try:
                row["density"] = session.report().get("overall")
            except Exception:
                pass
        finally:
            session.disable()
            from sketch_walk.core.hook import set_attention_implementation
            set_attention_implementation(model, "sdpa")
        row["last_logits_rel_diff"] = float((ls - ld).norm() / ld.norm())
        row["sdpa_one_layer_ms"] = sdpa_ms(n, cfg.num_attention_heads, cfg.num_key_value_heads, 128)
        rest = row["dense_ms"] - args.layers * row["sdpa_one_layer_ms"]
        row["dense_minus_attention_ms"] = rest
        row["speedup"] = row["dense_ms"] / row["sketchwalk_ms"]
        row["ceiling"] = row["dense_ms"] / (row["dense_ms"] - n_sparse * row["sdpa_one_layer_ms"])
        res["rows"][str(n)] = row
        print(f"[{n}] dense {row['dense_ms']:.0f} ms  sketchwalk {row['sketchwalk_ms']:.0f} ms  "
              f"speedup {row['speedup']:.2f}x  ceiling {row['ceiling']:.2f}x  (one SDPA layer "
              f"{row['sdpa_one_layer_ms']:.1f} ms; non-attention {rest:.0f} ms)", flush=True)
        del ids
        torch.cuda.empty_cache()
    res["wall_s"] = time.time() - t_start
    out = results_path("model_speed", gpu, args.out)
    write_json(res, out)
    print(f"\nGPU {gpu}; Llama-3.1-8B config, {args.layers} layers, random init, bf16, prefill, last-position logits")
    print("  n    | dense ms | SketchWalk ms | speedup | ceiling (dense layers + matmuls) | density")
    for n, r in res["rows"].items():
        print(f"{int(n) // 1024:>4}K | {r['dense_ms']:8.0f} | {r['sketchwalk_ms']:13.0f} | {r['speedup']:6.2f}x | "
              f"{r['ceiling']:6.2f}x{'':27}| {r.get('density')}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
