"""Distil SeerAttention gates from a frozen model: ``python -m seer_attn.train_gates`` (this file, run by that name).

    # the committed checkpoint (CPU, 2 cores, ~16 min wall with its evaluation):
    python -m seer_attn.train_gates --base_model smollm2 --corpus PaulGrahamEssays.json \
        --seq_len 4096 --steps 250 --batch_size 4 --num_train_seqs 24 --eval_seq_len 4096 \
        --heldout_seqs 2 --eval_every 10 --output seer_attn/checkpoints/smollm2
    # then the 8K evaluation merged into its eval.json (~10 min on CPU):
    python -m seer_attn.train_gates --eval_only --corpus PaulGrahamEssays.json \
        --eval_seq_len 8192 --heldout_seqs 2 --output seer_attn/checkpoints/smollm2
    # on a GPU (bf16 model, fp32 gates; same code), at the model's full 8K context:
    python -m seer_attn.train_gates --base_model smollm2 --corpus PaulGrahamEssays.json --seq_len 8192 \
        --stride 4096 --steps 400 --batch_size 8 --eval_seq_len 4096,8192 --heldout_seqs 8 --eval_every 20 \
        --output seer_attn/checkpoints/smollm2

The training step is :mod:`seer_attn.distill` (ground truth, loss, held-out evaluation); this command loads
the base model, reads the corpus, runs the optimiser and writes the files.

Corpus (``--corpus``): a plain-text file, a .jsonl file (one JSON object per line, its "text"
field; or one JSON string per line) or a .json file ({"text": ...} as RULER's
PaulGrahamEssays.json, or a list of such objects / strings). The HEAD of the text
(``--heldout_frac``, default 10%) is held out: RULER builds its essay haystack from the first
words of PaulGrahamEssays.json, so the head is where a haystack of up to ~60K tokens lives.
The overlap of the training part with RULER's essay haystacks at the eval lengths is measured
and saved in eval.json.

At the end: a checkpoint (config.json, gates.safetensors), train_log.jsonl (one line per step)
and eval.json in ``--output``: held-out KL and held-out recall of the oracle's blocks (exact
block attention mass, per row the same number of blocks as the gate keeps, so at the gate's
measured density) at the default threshold, an nz_ratio sweep, and the threshold that gives a
target density (``--target_density``, 0.3) at each eval length.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, Optional

import torch

from eval.ruler.cli import OneLineParser, UsageError, cli_main
from eval.ruler.model_loader import sha256_file
from seer_attn.checkpoint import save_checkpoint
from seer_attn.config import SeerAttnConfig
from seer_attn.distill import (FeatureExtractor, evaluate, gate_loss, lr_at, read_corpus, ruler_haystack_overlap,
                               split_heldout, windows)
from seer_attn.gate import BlockRope, SeerAttnGates


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m seer_attn.train_gates", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_model", default=None,
                   help="alias, .gguf, local folder or hub name (default smollm2; with --eval_only the checkpoint's)")
    p.add_argument("--corpus", required=True, help="plain text, .jsonl or .json ({'text': ...}) file")
    p.add_argument("--seq_len", type=int, default=None, help="training sequence length in tokens (required to train)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (required to train)")
    p.add_argument("--output", required=True, help="checkpoint folder to write")
    p.add_argument("--stride", type=int, default=None,
                   help="offset between training windows (default seq_len: no overlap; seq_len/2 doubles the windows)")
    p.add_argument("--batch_size", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--num_train_seqs", type=int, default=None,
                   help="distinct training sequences (default steps * batch_size, capped by the corpus)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--warmup_steps", type=int, default=None, help="default min(20, steps // 10)")
    p.add_argument("--gate_hidden", type=int, default=64)
    p.add_argument("--gate_type", default="Qavg_Kmaxminavg")
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--threshold", type=float, default=5e-4, help="the checkpoint's default threshold (5e-4)")
    p.add_argument("--heldout_frac", type=float, default=0.1, help="head of the corpus kept out of training")
    p.add_argument("--heldout_seqs", type=int, default=4, help="held-out sequences per eval length")
    p.add_argument("--eval_seq_len", default=None, help="comma-separated eval lengths (default: seq_len)")
    p.add_argument("--target_density", type=_target_densities, default={None: 0.3},
                   help="held-out density to find a threshold for: 0.3 (every eval length) or per length, "
                        "e.g. 2048:0.8,4096:0.52,8192:0.31 (e.g. SketchWalk's measured densities)")
    p.add_argument("--eval_every", type=int, default=0,
                   help="every N steps log the held-out KL (first eval length; its features are extracted once)")
    p.add_argument("--no_eval", action="store_true", help="skip the held-out evaluation")
    p.add_argument("--eval_only", action="store_true",
                   help="no training: evaluate the checkpoint in --output at --eval_seq_len and merge into its eval.json")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="base model dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--save_dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--max_chunk_mb", type=int, default=None,
                   help="logit chunk size of the ground truth in MB (default 64 on CPU, 1024 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=1)
    return p


def train(args) -> Dict[str, Any]:
    from tqdm import tqdm

    from eval.ruler.model_loader import load_model

    if args.seq_len < 2 * args.block_size:
        raise UsageError(f"--seq_len {args.seq_len}: needs at least two blocks of {args.block_size}")
    if args.steps < 1 or args.batch_size < 1:
        raise UsageError("--steps and --batch_size must be >= 1")
    eval_lens = [int(x) for x in (args.eval_seq_len or str(args.seq_len)).split(",") if x.strip()]
    torch.manual_seed(args.seed)
    args.base_model = args.base_model or "smollm2"
    t_start = time.time()
    text = read_corpus(args.corpus)
    model, tok = load_model(args.base_model, dtype=args.dtype, device=args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    max_pos = getattr(model.config, "max_position_embeddings", None)
    for L in [args.seq_len, *eval_lens]:
        if max_pos and L > max_pos:
            raise UsageError(f"sequence length {L} exceeds the model's {max_pos} positions")
    cfg = SeerAttnConfig.for_model(model, args.base_model, gate_type=args.gate_type, block_size=args.block_size,
                                   gate_hidden=args.gate_hidden, threshold=args.threshold)

    held_text, train_text = split_heldout(text, args.heldout_frac)
    train_ids = torch.tensor(tok(train_text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    held_ids = torch.tensor(tok(held_text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    stride = args.stride or args.seq_len
    if stride < 1 or stride > args.seq_len:
        raise UsageError(f"--stride {stride}: must be in [1, seq_len]")
    n_avail = max(0, (train_ids.numel() - args.seq_len) // stride + 1)
    n_train = min(args.num_train_seqs or args.steps * args.batch_size, n_avail)
    if n_train < 1:
        raise UsageError(f"--corpus {args.corpus}: its training part has {train_ids.numel()} tokens, "
                         f"less than one sequence of {args.seq_len}")
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(n_avail, generator=g)[:n_train].tolist()
    train_seqs = [train_ids[i * stride:i * stride + args.seq_len] for i in order]
    held = {}
    if not args.no_eval:
        for L in eval_lens:
            held[L] = windows(held_ids, L, args.heldout_seqs)
            if len(held[L]) < args.heldout_seqs:
                raise UsageError(f"held-out part has {held_ids.numel()} tokens: fewer than {args.heldout_seqs} "
                                 f"sequences of {L}; raise --heldout_frac or lower --heldout_seqs")

    gates = SeerAttnGates(cfg).to(device=device, dtype=torch.float32)
    opt = torch.optim.AdamW(gates.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, min(20, args.steps // 10))
    rope = BlockRope.from_model(model, cfg.gate_hidden)
    cs_cache: Dict[int, Any] = {}

    def rope_cs(nb):
        if nb not in cs_cache:
            cs_cache[nb] = rope.blocks(nb, cfg.block_size, device)
        return cs_cache[nb]

    extractor = FeatureExtractor(model, cfg, _chunk_bytes(args, device))
    cache: Dict[int, Any] = {}
    curve_feats = []
    if args.eval_every and held:
        curve_feats = [extractor(s) for s in held[eval_lens[0]]]

    def heldout_kl() -> float:
        with torch.no_grad():
            return sum(float(gate_loss(gates, f, rope_cs)) for f in curve_feats) / len(curve_feats)

    os.makedirs(args.output, exist_ok=True)
    log_path = os.path.join(args.output, "train_log.jsonl")
    log = open(log_path, "w")
    losses = []
    t_train = time.time()
    extract_s = 0.0
    bar = tqdm(range(args.steps), desc="gate distillation", dynamic_ncols=True)
    for step in bar:
        batch = [(step * args.batch_size + j) % n_train for j in range(args.batch_size)]
        for j in batch:
            if j not in cache:
                t0 = time.time()
                cache[j] = extractor(train_seqs[j])
                extract_s += time.time() - t0
        lr = lr_at(step, args.steps, warmup, args.lr)
        for grp in opt.param_groups:
            grp["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss = sum(gate_loss(gates, cache[j], rope_cs) for j in batch) / len(batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", seqs=len(cache))
        if step % args.log_every == 0 or step == args.steps - 1:
            row = {"step": step, "loss": round(losses[-1], 6), "lr": lr, "distinct_seqs_seen": len(cache),
                   "elapsed_s": round(time.time() - t_train, 2)}
            if curve_feats and (step % args.eval_every == 0 or step == args.steps - 1):
                row[f"heldout_kl_{eval_lens[0]}"] = round(heldout_kl(), 6)
            log.write(json.dumps(row) + "\n")
            log.flush()
    train_s = time.time() - t_train
    del cache, curve_feats

    extra = {"corpus": os.path.basename(args.corpus), "seq_len": args.seq_len, "steps": args.steps}
    save_checkpoint(args.output, gates, cfg, dtype=getattr(torch, args.save_dtype), extra_metadata=extra)
    summary: Dict[str, Any] = {
        "base_model": args.base_model, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "corpus": {"path": os.path.basename(args.corpus), "sha256": sha256_file(args.corpus), "chars": len(text),
                   "heldout": f"first {args.heldout_frac:.0%} of the text ({len(held_text)} chars, "
                              f"{held_ids.numel()} tokens)",
                   "train_tokens": int(train_ids.numel())},
        "training": {"seq_len": args.seq_len, "steps": args.steps, "batch_size": args.batch_size,
                     "distinct_sequences": n_train, "window_stride": stride, "tokens_seen": args.steps * args.batch_size * args.seq_len,
                     "lr": args.lr, "warmup_steps": warmup, "schedule": "linear warm-up, cosine to 0",
                     "weight_decay": args.weight_decay, "optimizer": "AdamW",
                     "loss": "sum over layers of mean row KL(GT || softmax(gate)), rows >= n_b/4",
                     "loss_first": round(losses[0], 5), "loss_last": round(losses[-1], 5),
                     "loss_last10_mean": round(sum(losses[-10:]) / len(losses[-10:]), 5),
                     "seconds_total": round(train_s, 1), "seconds_feature_extraction": round(extract_s, 1),
                     "torch_threads": torch.get_num_threads()},
        "gate": {"gate_type": cfg.gate_type, "gate_hidden": cfg.gate_hidden, "block_size": cfg.block_size,
                 "parameters": gates.num_parameters(),
                 "file_bytes": os.path.getsize(os.path.join(args.output, "gates.safetensors")),
                 "save_dtype": args.save_dtype},
        "command": "python -m seer_attn.train_gates " + " ".join(sys.argv[1:]),
    }
    if not args.no_eval:
        t0 = time.time()
        summary["ruler_essay_haystack_overlap"] = ruler_haystack_overlap(text, train_text, len(held_text), tok,
                                                                         sorted(set([4096, 8192] + eval_lens)))
        summary["heldout"] = {}
        # evaluate the gates as saved (rounded to the save dtype)
        from seer_attn.checkpoint import load_checkpoint
        _, saved = load_checkpoint(args.output, map_location=str(device))
        for L, seqs in held.items():
            feats = [extractor(s, want_mass=True) for s in seqs]
            summary["heldout"][str(L)] = evaluate(saved, cfg, feats, L, rope_cs, _target_for(args, L))
            del feats
        summary["eval_seconds"] = round(time.time() - t0, 1)
    extractor.close()
    summary["seconds_wall"] = round(time.time() - t_start, 1)
    with open(os.path.join(args.output, "eval.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")
    log.close()
    return summary


def evaluate_checkpoint(args) -> Dict[str, Any]:
    """--eval_only: held-out evaluation of an existing checkpoint, merged into its eval.json."""
    from eval.ruler.model_loader import load_model

    from seer_attn.checkpoint import load_checkpoint

    if not args.eval_seq_len:
        raise UsageError("--eval_only needs --eval_seq_len")
    eval_lens = [int(x) for x in args.eval_seq_len.split(",") if x.strip()]
    cfg, gates = load_checkpoint(args.output)
    cfg = cfg.with_knobs(threshold=args.threshold)
    t0 = time.time()
    model, tok = load_model(cfg.base_model if args.base_model is None else args.base_model,
                            dtype=args.dtype, device=args.device)
    cfg.check_model(model)
    device = next(model.parameters()).device
    gates.to(device)
    text = read_corpus(args.corpus)
    held_text, train_text = split_heldout(text, args.heldout_frac)
    held_ids = torch.tensor(tok(held_text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    rope = BlockRope.from_model(model, cfg.gate_hidden)
    extractor = FeatureExtractor(model, cfg, _chunk_bytes(args, device))
    path = os.path.join(args.output, "eval.json")
    summary = json.load(open(path)) if os.path.isfile(path) else {}
    summary.setdefault("heldout", {})
    overlap = ruler_haystack_overlap(text, train_text, len(held_text), tok, eval_lens)
    summary.setdefault("ruler_essay_haystack_overlap", {}).update(overlap)
    for L in eval_lens:
        seqs = windows(held_ids, L, args.heldout_seqs)
        if len(seqs) < args.heldout_seqs:
            raise UsageError(f"held-out part has {held_ids.numel()} tokens: fewer than {args.heldout_seqs} "
                             f"sequences of {L}")
        feats = [extractor(s, want_mass=True) for s in seqs]
        summary["heldout"][str(L)] = evaluate(gates, cfg, feats, L,
                                              lambda nb: rope.blocks(nb, cfg.block_size, device), _target_for(args, L))
        summary["heldout"][str(L)]["eval_seconds"] = round(time.time() - t0, 1)
        del feats
    extractor.close()
    with open(path, "w") as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")
    return summary


def _target_densities(text: str) -> Dict[Optional[int], float]:
    """'0.3' -> {None: 0.3}; '2048:0.8,8192:0.31' -> {2048: 0.8, 8192: 0.31} (argparse type)."""
    out: Dict[Optional[int], float] = {}
    try:
        for part in text.split(","):
            if ":" in part:
                n, d = part.split(":")
                out[int(n)] = float(d)
            else:
                out[None] = float(part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': give a density (0.3) or length:density pairs (4096:0.5,8192:0.3)")
    if not out or any(not 0 < d <= 1 for d in out.values()):
        raise argparse.ArgumentTypeError(f"'{text}': densities must lie in (0, 1]")
    return out


def _target_for(args, length: int) -> float:
    t = args.target_density
    return t.get(length, t.get(None, 0.3))


def _chunk_bytes(args, device) -> int:
    mb = args.max_chunk_mb or (1024 if device.type == "cuda" else 64)
    return mb << 20



@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.eval_only:
        summary = evaluate_checkpoint(args)
        for L, ev in summary["heldout"].items():
            print(f"held-out {L}: " + json.dumps(ev))
        return
    if args.seq_len is None or args.steps is None:
        raise UsageError("training needs --seq_len and --steps (or pass --eval_only)")
    summary = train(args)
    t = summary["training"]
    print(f"trained {args.steps} steps at {args.seq_len} tokens on {summary['device']} in {t['seconds_total']} s; "
          f"loss {t['loss_first']} -> {t['loss_last']}; checkpoint {args.output}")
    for L, ev in summary.get("heldout", {}).items():
        d = ev[f"threshold_{args.threshold:g}"]
        print(f"held-out {L}: KL {ev['heldout_kl_sum_over_layers']}, threshold {args.threshold:g}: density "
              f"{d['density']}, oracle-block recall {d['oracle_block_recall']}; density "
              f"{ev['threshold_for_target_density']['density']} at threshold {ev['threshold_for_target_density']['threshold']}")


if __name__ == "__main__":
    main()
