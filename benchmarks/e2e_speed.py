"""Whole-sample speed in the product's own generation loop: prefill + new tokens, as a RULER user runs them.

Each row builds the prediction wrapper exactly as call_api.py does for its server type
(eval/ruler/pred/model_wrappers.py: ``HuggingFaceModel`` for dense, ``SparseAttentionModel`` with the method's
``enable`` for the sparse ones) around one loaded model, runs the wrapper's own warm-up (on a GPU a whole
generation of the first prompt), then ``process_batch([prompt])`` for --samples prompts and records the
loop's own ``prefill_s`` / ``decode_s`` per sample (perf_counter around the prefill forward and the decode
steps, synchronised: what lands in every RULER record). Medians per sample, prefill and decode apart.
Generation always runs --new_tokens tokens (the stop ids are cleared: a random model would otherwise stop at
a random end-of-text token).

Prompts are random token ids (seeded per model, length and sample, the same for every row): speed does not
depend on the text. They reach the loop through a tokenizer wrapper that maps each prompt string to its ids.

Models (--models):
* ``gemma3-270m``: the embedded Gemma-3-270M (model_loader's alias; on the GPU machine the GGUF laid out as
  eval/ruler/device_setup.sh does with MODEL=gemma3-270m), bf16 on a GPU; lengths 8K / 16K / 32K;
* ``llama-8b``: a randomly initialised Llama-3.1-8B config (all 32 layers, bf16, built from a config dict here,
  nothing downloaded; benchmarks/model_speed.py's config); lengths 32K / 128K;
* ``tiny-llama``: a 4-layer random Llama (fp32 on the CPU): the smoke run, never a result; length 512.

Rows (--rows), each with and without graph decode (``_graph``: the wrapper's ``graph_decode="on"``, a static
KV cache and CUDA-graph decode steps; on the CPU graph decode is off and the row says so):
* ``dense``: transformers' SDPA, today's loop (``dense`` is the before row);
* ``allkept``: SketchWalk with top_k_blocks 2^20: every causal block kept, through our kernels (prefill and decode
  kernels, the selection still running; Gemma's sliding-window layers through the window kernel): the fair
  baseline for what selection itself buys;
* ``sketchwalk``: SketchWalk's defaults with top_k_blocks pinned (--top_k_blocks, default 16);
* ``sketchwalk_natural``: the same plus ``--dense_last_blocks 1 --skip_decode`` (the natural-text setting);
* ``seerattn``: SeerAttention with RANDOMLY INITIALISED gates of the model's geometry (no model here has committed
  gates; timing only: its choices are not a trained gate's), sparse decode, in nz_ratio mode with the ratio that gives
  a row SketchWalk's budget (n_sink + n_local + top_k_blocks blocks of n_b: nz = 1 - (1 - 18 / n_b)^2), so both
  methods run the kernels at about the same density (a random gate at the default threshold keeps nearly everything).

Every phase writes the results JSON when it ends (the model build, then each row), so a call cut by a time
limit keeps what it finished; an existing file of this benchmark at --out is merged into (rows of the same
model and length are replaced), so slices run in separate calls accumulate in one file.

Usage: python benchmarks/e2e_speed.py [--models gemma3-270m llama-8b] [--lengths 32768] [--rows dense sketchwalk_graph]
       [--samples 3] [--new_tokens 64] [--top_k_blocks 16] [--out PATH]
       python benchmarks/e2e_speed.py --models tiny-llama --lengths 512      # CPU smoke run
Writes benchmarks/results/e2e_speed_<gpu>.json (or --out) and prints one line per row and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Dict, List, Optional

import torch

from results_io import header, results_path, write_json     # a sibling: benchmarks/ is the script's folder

BENCHMARK = "e2e_speed"
MODELS = {"gemma3-270m": [8192, 16384, 32768], "llama-8b": [32768, 131072], "tiny-llama": [512]}
BASE_ROWS = ("dense", "allkept", "sketchwalk", "sketchwalk_natural", "seerattn")
ROWS = tuple(r + s for r in BASE_ROWS for s in ("", "_graph"))
ALL_KEPT_TOP_K = 1 << 20

TINY_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


class IdsTokenizer:
    """The loop's tokenizer: a registered prompt string -> its ids; everything else from ``base`` (or a minimal
    stand-in for models without a tokenizer: ids are decoded as numbers)."""

    def __init__(self, base=None, vocab_size: int = 0):
        self.base = base
        self.vocab_size = vocab_size
        self.prompts: Dict[str, List[int]] = {}
        self.pad_token_id = getattr(base, "pad_token_id", None) if base is not None else 0
        self.eos_token_id = getattr(base, "eos_token_id", None) if base is not None else None

    def register(self, ids: List[int]) -> str:
        key = f"<random prompt {len(self.prompts)}: {len(ids)} ids>"
        self.prompts[key] = list(ids)
        return key

    def __call__(self, text: str, add_special_tokens: bool = False, **kw):
        if text in self.prompts:
            return {"input_ids": list(self.prompts[text])}
        if self.base is None:
            raise KeyError(f"unregistered prompt {text[:40]!r}")
        return self.base(text, add_special_tokens=add_special_tokens, **kw)

    def get_vocab(self) -> Dict[str, int]:
        return self.base.get_vocab() if self.base is not None else {}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        # the ids themselves: two rows' texts are equal exactly when their tokens are
        return " ".join(str(int(i)) for i in ids)

    def __len__(self) -> int:
        return len(self.base) if self.base is not None else self.vocab_size


def build_llama(cfg_dict: Dict[str, Any], device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    kw = dict(cfg_dict)
    try:
        cfg = LlamaConfig(**kw)
    except Exception:
        kw.pop("rope_scaling", None)
        cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to(dtype).eval()
    from sketch_walk.core.hook import set_attention_implementation
    set_attention_implementation(model, "sdpa")
    return model, IdsTokenizer(None, cfg.vocab_size)


def build_model(name: str, device: str, dtype_name: str):
    """(model, IdsTokenizer, description)."""
    from eval.ruler.model_loader import pick_dtype
    dtype = pick_dtype(dtype_name, device)
    if name == "gemma3-270m":
        from eval.ruler.model_loader import load_model
        model, tok = load_model("gemma3-270m", dtype=dtype_name, device=device)
        return model, IdsTokenizer(tok), "Gemma-3-270M (embedded GGUF, de-quantised)"
    if name == "llama-8b":
        from model_speed import LLAMA_31_8B
        model, tok = build_llama(LLAMA_31_8B, device, dtype)
        return model, tok, "Llama-3.1-8B config, 32 layers, random init"
    if name == "tiny-llama":
        model, tok = build_llama(TINY_LLAMA, device, dtype)
        return model, tok, "tiny random Llama (4 layers, hidden 64): smoke run only"
    raise SystemExit(f"--models {name}: choose from {', '.join(MODELS)}")


def random_prompt_ids(model_name: str, n: int, sample: int, vocab: int) -> List[int]:
    g = torch.Generator().manual_seed(sum(map(ord, model_name)) * 1_000_003 + n * 101 + sample)
    low = min(1000, vocab // 4)           # away from the special tokens at the start of most vocabularies
    return torch.randint(low, vocab, (n,), generator=g).tolist()


def seer_nz_ratio(n: int, top_k: int, block_size: int = 64) -> float:
    """The nz_ratio whose row budget is SketchWalk's n_sink + n_local + top_k blocks (1 + 1 + top_k) at n tokens."""
    frac = min(1.0, (top_k + 2) / max(1, -(-n // block_size)))
    return 1.0 - (1.0 - frac) ** 2


def make_wrapper(row: str, model, tok, new_tokens: int, top_k: int, device: str, n: int = 0):
    """The wrapper call_api.py would build for this row's server type and knobs (on the loaded model)."""
    from eval.ruler.pred import model_wrappers as mw
    graph = row.endswith("_graph")
    base = row[: -len("_graph")] if graph else row
    gen = dict(model=model, tokenizer=tok, temperature=0.0, max_new_tokens=new_tokens, stop=())
    import inspect
    if "graph_decode" in inspect.signature(mw.HuggingFaceModel.__init__).parameters:
        gen["graph_decode"] = "on" if graph else "off"
    elif graph:
        raise RuntimeError("this checkout's generation loop has no graph_decode option")
    knobs: Optional[Dict[str, Any]] = None
    if base == "dense":
        llm = mw.HuggingFaceModel(**gen)
    elif base in ("allkept", "sketchwalk", "sketchwalk_natural"):
        from sketch_walk import SketchWalkConfig, enable_sketch_walk
        kw: Dict[str, Any] = {"top_k_blocks": ALL_KEPT_TOP_K if base == "allkept" else top_k}
        if base == "sketchwalk_natural":
            kw.update(dense_last_blocks=1, skip_decode=True)
        cfg = SketchWalkConfig(**kw)
        knobs = cfg.to_dict()
        llm = mw.SparseAttentionModel(method="sketch_walk", enable=lambda m: enable_sketch_walk(m, cfg), **gen)
    elif base == "seerattn":
        from seer_attn import SeerAttnConfig, enable_seer_attn
        cfg = SeerAttnConfig.for_model(model, base_model="random gates (timing only)")
        torch.manual_seed(0)
        nz = seer_nz_ratio(n, top_k)
        knobs = {"gates": "randomly initialised (timing only)", "nz_ratio": nz, "gated_layers": cfg.gated_layers}
        llm = mw.SparseAttentionModel(method="seer_attn", enable=lambda m: enable_seer_attn(m, cfg, nz_ratio=nz),
                                      **gen)
    else:
        raise SystemExit(f"--rows {row}: choose from {', '.join(ROWS)}")
    llm.stop_ids = set()          # always --new_tokens tokens
    return llm, knobs


def release(llm, model) -> None:
    """Give the model back as loaded: the sparse session off, SDPA attention."""
    session = getattr(llm, "session", None)
    if session is not None:
        session.disable()
    restore = getattr(llm, "restore_model", None)
    if restore is not None:
        restore()
    from sketch_walk.core.hook import set_attention_implementation
    set_attention_implementation(model, "sdpa")


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def run_row(row: str, model, tok, prompts: List[str], args, device: str, n: int) -> Dict[str, Any]:
    t0 = time.time()
    llm, knobs = make_wrapper(row, model, tok, args.new_tokens, args.top_k_blocks, device, n)
    selector = getattr(getattr(llm, "session", None), "selector", None)
    rerank_kernel = selector._rerank_kernel(torch.device(device)) if hasattr(selector, "_rerank_kernel") else None
    try:
        tw = time.time()
        llm.warmup(prompts[0])
        warm_s = time.time() - tw
        samples = []
        for p in prompts:
            r = llm.process_batch([p])[0]
            st = dict(r["stats"])
            st["total_s"] = (st.get("prefill_s") or 0.0) + (st.get("decode_s") or 0.0)
            st["tokens"] = r["text"][0]
            samples.append(st)
    finally:
        release(llm, model)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    med = {k: _median([s.get(k) for s in samples]) for k in ("prefill_s", "decode_s", "total_s")}
    new = _median([s.get("new_tokens") for s in samples]) or 0
    dens = samples[-1].get("density") or {}
    out = {
        "prefill_s": med["prefill_s"], "decode_s": med["decode_s"], "total_s": med["total_s"],
        "decode_ms_per_token": (1000 * med["decode_s"] / max(new - 1, 1)) if med["decode_s"] is not None else None,
        "new_tokens": new, "graph_decode": samples[-1].get("graph_decode"),
        "graph_decode_note": samples[-1].get("graph_decode_note"),
        "density": dens, "density_by_layer_type": samples[-1].get("density_by_layer_type"),
        "knobs": knobs, "warmup_s": round(warm_s, 3), "row_wall_s": round(time.time() - t0, 3),
        "samples": [{k: v for k, v in s.items() if k not in ("density_per_layer", "density_per_layer_decode")}
                    for s in samples],
    }
    if row.startswith("seerattn"):
        out["note"] = "randomly initialised gates of the model's geometry: timing only, not a trained gate's density"
    if knobs and knobs.get("decode_rerank") and not knobs.get("skip_decode") and not row.startswith("allkept"):
        # which re-ranking ran: the selector's own rule (the Triton one on the GPU unless turned off)
        out["rerank_path"] = "triton kernel" if rerank_kernel else "pytorch"
    return out


def load_existing(path: str) -> Optional[Dict[str, Any]]:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return old if old.get("benchmark") == BENCHMARK else None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["gemma3-270m", "llama-8b"], choices=list(MODELS))
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="prompt tokens (default per model: gemma3-270m 8K 16K 32K, llama-8b 32K 128K, tiny-llama 512); "
                         "a length a model has no default for runs too")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--samples", type=int, default=3, help="timed samples per row (after the wrapper's warm-up)")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--top_k_blocks", type=int, default=16, help="SketchWalk's pinned budget (rows sketchwalk*)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="run nothing: merge these results files (slices run in separate calls) into --out, print the table")
    args = ap.parse_args(argv)
    if args.merge:
        merged: Dict[str, Any] = {}
        for path in args.merge:
            with open(path) as f:
                part = json.load(f)
            runs = merged.get("runs", {})
            for model_name, mres in part.get("runs", {}).items():
                dst = runs.setdefault(model_name, {})
                for k, v in mres.items():
                    if isinstance(v, dict) and isinstance(dst.get(k), dict):
                        dst[k].update(v)
                    else:
                        dst[k] = v
            merged = {**merged, **{k: v for k, v in part.items() if k != "runs"}, "runs": runs,
                      "commands": merged.get("commands", []) + part.get("commands", [])}
        if not args.out:
            raise SystemExit("--merge needs --out")
        write_json(merged, args.out)
        print_table(merged)
        print(f"wrote {args.out}")
        return
    from eval.ruler.model_loader import pick_device
    device = pick_device(args.device)
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    out = results_path(BENCHMARK, gpu, args.out)
    import transformers
    res = load_existing(out) or {}
    runs = res.get("runs", {})
    commands = res.get("commands", [])
    res = header(transformers=transformers.__version__, benchmark=BENCHMARK, device=device,
                 timing="the generation loop's own prefill_s / decode_s (perf_counter, synchronised) per sample; "
                        "medians over --samples after the wrapper's warm-up; new tokens forced (stop ids cleared)",
                 samples=args.samples, new_tokens=args.new_tokens, top_k_blocks=args.top_k_blocks)
    res["commands"] = commands + [res["command"]]
    res["runs"] = runs

    def save():
        write_json(res, out)

    for model_name in args.models:
        lengths = args.lengths or MODELS[model_name]
        t0 = time.time()
        model, tok, desc = build_model(model_name, device, args.dtype)
        mres = runs.setdefault(model_name, {})
        mres["model"] = desc
        mres["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        mres["build_s"] = round(time.time() - t0, 2)
        save()
        print(f"{gpu}: {model_name} ({desc}) built in {mres['build_s']:.0f} s", flush=True)
        vocab = int(getattr(model.config, "vocab_size", None) or len(tok))
        for n in lengths:
            prompts = [tok.register(random_prompt_ids(model_name, n, i, vocab)) for i in range(args.samples)]
            lres = mres.setdefault(str(n), {})
            for row in args.rows:
                try:
                    r = run_row(row, model, tok, prompts, args, device, n)
                except Exception as exc:       # one row's failure (e.g. out of memory) must not lose the others
                    r = {"error": f"{type(exc).__name__}: {exc}"}
                    print(f"[{model_name} {n}] {row}: FAILED {r['error']}", flush=True)
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
                lres[row] = r
                save()
                if "error" not in r:
                    print(f"[{model_name} {n}] {row:<25} prefill {r['prefill_s'] * 1000:9.1f} ms  decode "
                          f"{r['decode_s'] * 1000:9.1f} ms ({r['decode_ms_per_token']:.2f} ms/token)  total "
                          f"{r['total_s'] * 1000:9.1f} ms  graph {r['graph_decode']}  density "
                          f"{(r['density'] or {}).get('overall')}", flush=True)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    save()
    print_table(res)
    print(f"wrote {out}")


def print_table(res: Dict[str, Any]) -> None:
    print(f"\n{res.get('gpu')}; {res.get('new_tokens')} new tokens; medians per sample, ms; x = dense eager total / row total")
    for model_name, mres in res.get("runs", {}).items():
        for n, lres in mres.items():
            if not isinstance(lres, dict) or not n.isdigit():
                continue
            base = (lres.get("dense") or {}).get("total_s")
            print(f"{model_name} @ {int(n) // 1024 if int(n) >= 1024 else n}{'K' if int(n) >= 1024 else ''}")
            print("  row                       | prefill  | decode   | total    | x dense | graph | density")
            for row, r in lres.items():
                if "error" in r:
                    print(f"  {row:<25} | error: {r['error'][:70]}")
                    continue
                x = f"{base / r['total_s']:6.2f}x" if base and r.get("total_s") else "   -   "
                print(f"  {row:<25} | {r['prefill_s'] * 1e3:8.1f} | {r['decode_s'] * 1e3:8.1f} | "
                      f"{r['total_s'] * 1e3:8.1f} | {x} | {str(r.get('graph_decode')):5} | "
                      f"{(r.get('density') or {}).get('overall')}")


if __name__ == "__main__":
    main()
