#!/usr/bin/env python
"""Why does a block selector miss? Per layer, does it keep the needle for the question's query block?

    python eval/ruler/diagnose_selection.py --data_file DATA.jsonl --model smollm2 \
        --output results/ruler/diagnose/niah_multikey_1_8192.json [--num_samples 24] [--follow dense]

For every sample of a RULER data file (as prepare.py wrote it) the prompt is prefilled once (no
generation). At every sparse layer, each selector variant picks blocks from the same query / key
tensors; for the LAST query block of the prompt (it holds the question and the answer prefix, whose
attention decides the first answer token) we record, per variant:

* ``needle_kept``: whether every block that holds a token of the expected answer (``outputs``; found
  by character offsets in the prompt, so the needle's value, not the question) is in its kept list;
* ``mass``: the exact attention mass of that query block that the kept blocks carry (mean over heads
  and the block's queries; 1.0 = nothing lost);
* per layer, ``needle_mass_rank`` / ``needle_mass``: the needle blocks' best rank and total share in
  the exact mass (how much the dense model itself looks at the needle from the question).
The summary's ``needle_recall_vs_oracle``: of the (sample, layer) pairs where the oracle's top-k keeps
the needle, the share where the variant keeps it too.

``--follow dense`` (default) runs every layer dense, so all variants see the dense model's tensors
(a per-layer test of the selection alone); ``--follow NAME`` feeds the named variant's lists to the
kernel, so the later layers see the sparse run's tensors (what the real run sees). The variants:
sketchwalk (defaults), sketchwalk_onehop (walk_damping 0), sketchwalk_mean (key_summary mean),
sketchwalk_mean_onehop, oracle (exact block mass, top-k of it), local; all at the same budget.
Speed (same results): the oracle's last row is the top-k of that row's exact mass, computed alone unless
``--follow oracle`` needs every row; with ``--follow dense`` the (full) lists run through SDPA.

Probes (``--probes``, on by default; ``--no-probes`` turns them off): not selectors (no walk, nothing fed to
the kernel), just other block scores for the LAST query block only, computed from the layer's q / k and
turned into a kept set at the same budget by :func:`sketch_walk.selection.select_blocks` (sink + diagonal
+ top_k of the other causal blocks). Each ends in one score per key block, a mean over heads (and queries):
* (a) ``pooled_minmax_onehop``: Sketch&Walk's own minmax scores: the block's mean query Qbar against the
  per-channel bound of each key block (Kmax / Kmin), softmax over blocks per head, head mean. A check:
  it should keep what sketchwalk_onehop keeps (its summary's ``same_kept_as_sketchwalk_onehop``);
* (b) ``perquery_max_minmax``: the same bound, but for each query t of the block on its own: softmax over
  blocks per query and head, then the mean over queries and heads (pool AFTER the softmax, as the oracle
  does, but with the bound instead of the keys);
* (c) ``perquery_exact_blockmax``: per query, the exact max_{s in block, s <= t} q_t . k_s (the best key
  summary a one-score-per-block rule can have), softmax over blocks, mean over queries and heads;
* (d) ``pooled_exact``: Qbar against the exact keys (softmax over tokens, summed per block, head mean), i.e.
  pooling the query only;
* (e) ``pooled_exact_blockmax``: Qbar against the exact keys, max per block, softmax over blocks, head mean:
  with a, b, c the 2 x 2 of {pooled Qbar, per query} x {minmax bound, exact block max}.
Each probe's record also has ``needle_rank``: the needle block's rank among the top-k candidates (1 = best,
kept if <= top_k; worst block if several; 0 = a sink / local block), summarised as a median.
Reading: if b, c and d / e keep the needle where a does not, the query pooling is at fault; if c and e do
but b does not, the key bound is; if only c does, both are.

Output: one JSON with per-sample, per-layer records and a summary (per variant and probe: the share of
samples whose needle is kept at every sparse layer, per layer, and per needle depth).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import torch

from eval.ruler.cli import OneLineParser, UsageError, cli_main
from sketch_walk.config import SketchWalkConfig
from sketch_walk.core.block_summary import block_minmax
from sketch_walk.core.contract import BlockSelector
from sketch_walk.core.hook import enable_sparse_attention
from sketch_walk.selection import select_blocks
from sketch_walk.selector import SketchWalkSelector

VARIANTS = {
    "sketchwalk": {},
    "sketchwalk_onehop": {"walk_damping": 0.0},
    "sketchwalk_mean": {"key_summary": "mean"},
    "sketchwalk_mean_onehop": {"key_summary": "mean", "walk_damping": 0.0},
    "oracle": {"selector": "oracle"},
    "local": {"selector": "local"},
    # decode scorers and budgets (docs/ALGORITHM.md "Budgets and decode scorers"); the budget is --top_k_blocks
    # unless the variant sets another budget mode
    "sub4": {"key_sub_blocks": 4},
    "qwin32": {"decode_query_window": 32},
    "qwin32_each": {"decode_query_window": 32, "decode_window_scoring": "each_query"},
    "question": {"decode_keep_question": True},
    "sub4_question": {"key_sub_blocks": 4, "decode_keep_question": True},
    "fraction": {"budget_mode": "fraction"},
    "mass": {"budget_mode": "mass", "budget_mass": 0.99, "sparsity_exponent": 1.0, "budget_max_blocks": 16},
    "authors": {"preset": "authors", "dense_last_blocks": 0},
    # decode_rerank: the estimate shortlists R x the budget, the query's exact mass over its keys spends it
    "rerank2": {"decode_rerank": 2},
    "rerank4": {"decode_rerank": 4},
    "rerank8": {"decode_rerank": 8},
    "authors_rerank4": {"preset": "authors", "dense_last_blocks": 0, "decode_rerank": 4},
}
DEFAULT_VARIANTS = ["sketchwalk", "sketchwalk_onehop", "sketchwalk_mean", "sketchwalk_mean_onehop", "oracle", "local"]
PROBES = ["pooled_minmax_onehop", "perquery_max_minmax", "perquery_exact_blockmax", "pooled_exact",
          "pooled_exact_blockmax"]


def last_block_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Exact attention mass per key block of the prompt's last query block: (n_b,) fp32.

    q (B=1, H, n, d), k (1, H_kv, n, d); mean over heads and over the block's real queries.
    """
    _, h, n, d = q.shape
    hkv = k.shape[1]
    first = ((n - 1) // block_size) * block_size
    qq = q[0, :, first:].float()                                       # (H, t, d)
    kk = k[0].float().repeat_interleave(h // hkv, dim=0)               # (H, n, d)
    s = torch.einsum("htd,hnd->htn", qq, kk) * scale
    pos_q = torch.arange(first, n, device=q.device).unsqueeze(-1)
    s = s.masked_fill(torch.arange(n, device=q.device) > pos_q, float("-inf"))
    p = torch.softmax(s, dim=-1).mean(dim=(0, 1))                      # (n,)
    nb = (n + block_size - 1) // block_size
    return torch.nn.functional.pad(p, (0, nb * block_size - n)).view(nb, block_size).sum(-1)


def last_block_probe_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float) -> Dict[str, torch.Tensor]:
    """The probes' scores (module docstring) for the prompt's last query block: {name: (n_b,) fp32}."""
    _, h, n, _ = q.shape
    bs = block_size
    nb = (n + bs - 1) // bs
    first = (nb - 1) * bs
    qq = q[0, :, first:].float()                                       # (H, t, d): the block's queries
    kk = k[0].float().repeat_interleave(h // k.shape[1], dim=0)        # (H, n, d)
    kmax, kmin = block_minmax(kk, bs)                                  # (H, nb, d)

    def bound(x):                                                      # x (H, m, d) -> (H, m, nb)
        return (torch.einsum("hmd,hnd->hmn", x.clamp_min(0), kmax)
                + torch.einsum("hmd,hnd->hmn", x.clamp_max(0), kmin)) * scale

    q_bar = qq.mean(1, keepdim=True)                                   # (H, 1, d)
    s_tok = torch.einsum("htd,hnd->htn", qq, kk) * scale               # (H, t, n), exact
    causal = torch.arange(n, device=q.device) > torch.arange(first, n, device=q.device).unsqueeze(-1)
    s_tok = s_tok.masked_fill(causal, float("-inf"))
    pad = nb * bs - n
    blockmax = torch.nn.functional.pad(s_tok, (0, pad), value=float("-inf")).view(h, -1, nb, bs).amax(-1)
    s_pool = torch.nn.functional.pad(torch.einsum("hmd,hnd->hmn", q_bar, kk) * scale, (0, pad), value=float("-inf"))
    s_pool = s_pool.view(h, nb, bs)                                    # Qbar . k_s, (H, nb, bs)
    return {
        "pooled_minmax_onehop": torch.softmax(bound(q_bar), -1).mean(dim=(0, 1)),
        "perquery_max_minmax": torch.softmax(bound(qq), -1).mean(dim=(0, 1)),
        "perquery_exact_blockmax": torch.softmax(blockmax, -1).mean(dim=(0, 1)),
        "pooled_exact": torch.softmax(s_pool.view(h, -1), -1).view(h, nb, bs).sum(-1).mean(0),
        "pooled_exact_blockmax": torch.softmax(s_pool.amax(-1), -1).mean(0),
    }


def last_query_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Exact attention mass per key block of the prompt's last token alone (the decode view): (n_b,) fp32."""
    _, h, n, _ = q.shape
    kk = k[0].float().repeat_interleave(h // k.shape[1], dim=0)         # (H, n, d)
    p = torch.softmax(torch.einsum("hd,hnd->hn", q[0, :, -1].float(), kk) * scale, dim=-1).mean(0)
    nb = (n + block_size - 1) // block_size
    return torch.nn.functional.pad(p, (0, nb * block_size - n)).view(nb, block_size).sum(-1)


class ProbeSelector(BlockSelector):
    """Runs several selectors side by side on each sparse layer and records their last-row picks.

    With ``decode`` every variant also runs as decode would see the prompt's last token: a second selector of the
    same configuration prefills the first n - 1 tokens and takes token n as a decode step (its real decode path:
    summaries, query window, transition, walk, budget); its list is recorded as ``decode_needle_kept`` /
    ``decode_mass`` (the exact attention mass of that one query that the list keeps).
    """

    def __init__(self, configs: Dict[str, SketchWalkConfig], follow: str, probes: bool = True, decode: bool = False):
        # the oracle's last row is the top-k of last_block_mass (its definition): computed from it, in O(n), unless
        # the model follows the oracle (then every row is needed, O(n^2))
        self.oracle_from_mass = "oracle" in configs and follow != "oracle"
        self.selectors = {name: SketchWalkSelector(c) for name, c in configs.items()
                          if not (name == "oracle" and self.oracle_from_mass)}
        self.decode_selectors = {name: SketchWalkSelector(c) for name, c in configs.items()} if decode else {}
        base = next(iter(configs.values()))
        self.base = base
        self.probes = probes
        self.block_size = base.block_size
        self.dense_layers = base.dense_layers
        self.name = "probe"
        self.follow = follow
        self.needle_blocks: List[int] = []
        self.records: List[Dict] = []

    def reset(self, batch_size: int) -> None:
        for s in list(self.selectors.values()) + list(self.decode_selectors.values()):
            s.reset(batch_size)

    def is_sparse_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.dense_layers

    def select_prefill(self, layer_idx, module, query, key):
        n = query.shape[2]
        bs = self.block_size
        nb = (n + bs - 1) // bs
        scale = float(getattr(module, "scaling", query.shape[-1] ** -0.5))
        mass = last_block_mass(query, key, bs, scale)
        rec = {"layer": layer_idx}
        lists = {}
        needles = set(self.needle_blocks)
        for name, sel in self.selectors.items():
            idx, cnt = sel.select_prefill(layer_idx, module, query, key)
            lists[name] = (idx, cnt)
            row = idx[0, 0, nb - 1, : int(cnt[0, 0, nb - 1])].tolist()
            kept = set(row)
            rec[name] = {"needle_kept": bool(needles) and needles <= kept,
                         "mass": round(float(mass[row].sum()), 4)}
        if self.decode_selectors:
            one = last_query_mass(query, key, bs, scale)
            for name, sel in self.decode_selectors.items():
                sel.select_prefill(layer_idx, module, query[:, :, : n - 1], key[:, :, : n - 1])
                didx, dcnt = sel.select_decode(layer_idx, module, query[:, :, n - 1:], key)
                row = didx[0, 0, : int(dcnt[0, 0])].tolist()
                rec.setdefault(name, {}).update({"decode_needle_kept": bool(needles) and needles <= set(row),
                                                 "decode_mass": round(float(one[row].sum()), 4),
                                                 "decode_kept_blocks": len(row)})
        last_row_scores = {"oracle": mass} if self.oracle_from_mass else {}
        if self.probes:
            last_row_scores.update(last_block_probe_scores(query, key, bs, scale))
        c, last = self.base, torch.tensor([nb - 1], device=query.device)
        for name, sc in last_row_scores.items():                 # same budget, same tie rule as the selectors
            pidx, pcnt = select_blocks(sc.view(1, 1, 1, nb), last, c.n_sink, c.n_local, c.top_k_blocks)
            row = pidx[0, 0, 0, : int(pcnt[0, 0, 0])].tolist()
            rec.setdefault(name, {}).update({"needle_kept": bool(needles) and needles <= set(row),
                                             "mass": round(float(mass[row].sum()), 4)})
            cand = torch.argsort(sc[c.n_sink: nb - c.n_local], descending=True).tolist()      # top-k candidates
            ranks = [cand.index(j - c.n_sink) + 1 for j in needles if c.n_sink <= j < nb - c.n_local]
            rec[name]["needle_rank"] = max(ranks) if ranks else 0      # worst needle block; 0 = sink / local
            if name == "pooled_minmax_onehop" and "sketchwalk_onehop" in lists:
                oi, oc = lists["sketchwalk_onehop"]
                rec["probe_matches_onehop"] = row == oi[0, 0, nb - 1, : int(oc[0, 0, nb - 1])].tolist()
        # the oracle's ranking of the needle blocks (exact mass): where does the needle stand at all?
        order = torch.argsort(mass, descending=True).tolist()
        rec["needle_mass_rank"] = min((order.index(j) + 1 for j in needles), default=None)
        rec["needle_mass"] = round(float(mass[sorted(needles)].sum()), 4) if needles else None
        self.records.append(rec)
        if self.follow == "dense":
            full = torch.arange(nb, device=query.device, dtype=torch.int32)
            idx = torch.where(full.unsqueeze(0) <= full.unsqueeze(1), full.unsqueeze(0),
                              torch.full_like(full.unsqueeze(0), -1))
            cnt = (full + 1)
            hkv = key.shape[1]
            return (idx.expand(1, hkv, nb, nb).contiguous(), cnt.expand(1, hkv, nb).contiguous())
        return lists[self.follow]

    def select_decode(self, layer_idx, module, query, key_cache):
        raise UsageError("diagnose_selection.py runs prefill only")


def dense_prefill_attention(q, k, v, block_idx, block_cnt, block_size, sm_scale=None, backend=None):
    """``--follow dense`` stand-in for the hook's block_sparse_attention: full causal lists make it plain
    causal attention, so SDPA computes it (the PyTorch reference walks the lists: ~3 s a layer at 4K on CPU)."""
    r = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), is_causal=True, scale=sm_scale)
    return out, None


def needle_token_blocks(tokenizer, text: str, answers: List[str], block_size: int) -> List[int]:
    """Blocks of the prompt tokens that overlap the first occurrence of each answer string."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    blocks = set()
    for ans in answers:
        pos = text.find(ans)
        if pos < 0:
            continue
        end = pos + len(ans)
        for t, (a, b) in enumerate(enc["offset_mapping"]):
            if a < end and b > pos:
                blocks.add(t // block_size)
    return sorted(blocks)


def median_needle_rank(samples: List[Dict], name: str) -> Dict:
    """{"median_needle_rank_oracle_kept": ...}: the needle's median rank among the top-k candidates (probes and
    a from-mass oracle only), over the (sample, layer) pairs where the oracle keeps the needle and the needle is
    a candidate (not a sink / local block); {} if there are none."""
    r = sorted(x[name]["needle_rank"] for s in samples for x in s["layers"]
               if x[name].get("needle_rank") and x.get("oracle", {}).get("needle_kept"))
    return {"median_needle_rank_oracle_kept": r[len(r) // 2]} if r else {}


def summarise(samples: List[Dict], names: List[str]) -> Dict:
    out = {}
    for name in names:
        per_layer: Dict[int, List[bool]] = {}
        all_layers, by_depth = [], {}
        masses = []
        for s in samples:
            kept = [r[name]["needle_kept"] for r in s["layers"]]
            for r in s["layers"]:
                per_layer.setdefault(r["layer"], []).append(r[name]["needle_kept"])
                masses.append(r[name]["mass"])
            ok = all(kept)
            all_layers.append(ok)
            by_depth.setdefault(str(s.get("depth")), []).append(ok)
        # recall against the oracle: of the (sample, layer) pairs where the exact top-k keeps the needle,
        # the share where this variant keeps it too (early layers, where even the oracle drops it, don't count)
        both = [r[name]["needle_kept"] for s in samples for r in s["layers"]
                if "oracle" in r and r["oracle"]["needle_kept"]]
        out[name] = {
            "needle_recall_vs_oracle": round(sum(both) / len(both), 3) if both else None,
            "needle_kept_every_layer": round(sum(all_layers) / max(1, len(all_layers)), 3),
            "mean_mass_last_block": round(sum(masses) / max(1, len(masses)), 4),
            **median_needle_rank(samples, name),
            "needle_kept_per_layer": {str(k): round(sum(v) / len(v), 3) for k, v in sorted(per_layer.items())},
            "needle_kept_every_layer_by_depth": {k: f"{sum(v)}/{len(v)}" for k, v in sorted(by_depth.items())},
        }
        if any("decode_needle_kept" in r.get(name, {}) for s in samples for r in s["layers"]):
            # the decode view: of the (sample, layer) pairs where the oracle's decode list keeps the needle, the
            # share where this variant's does
            dboth = [r[name]["decode_needle_kept"] for s in samples for r in s["layers"]
                     if r.get("oracle", {}).get("decode_needle_kept")]
            out[name].update({
                "decode_needle_recall_vs_oracle": round(sum(dboth) / len(dboth), 3) if dboth else None,
                "decode_needle_kept_every_layer": round(sum(all(r[name]["decode_needle_kept"] for r in s["layers"])
                                                            for s in samples) / max(1, len(samples)), 3),
                "decode_mean_mass": round(sum(r[name]["decode_mass"] for s in samples for r in s["layers"])
                                          / max(1, sum(len(s["layers"]) for s in samples)), 4),
                "decode_mean_kept_blocks": round(sum(r[name]["decode_kept_blocks"] for s in samples
                                                     for r in s["layers"])
                                                 / max(1, sum(len(s["layers"]) for s in samples)), 1)})
    match = [r["probe_matches_onehop"] for s in samples for r in s["layers"] if "probe_matches_onehop" in r]
    if match and "pooled_minmax_onehop" in out:
        out["pooled_minmax_onehop"]["same_kept_as_sketchwalk_onehop"] = round(sum(match) / len(match), 3)
    return out


@cli_main
def main(argv=None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_file", required=True, help="a RULER data jsonl written by prepare.py")
    p.add_argument("--model", default="smollm2", help="model alias, .gguf, folder or hub name")
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--num_samples", type=int, default=None, help="first N samples (default: all)")
    p.add_argument("--follow", default="dense", help="dense, or a variant whose lists the model runs on")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=False,
                   help="also take the prompt's last token as a decode step of every variant (ProbeSelector)")
    p.add_argument("--probes", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the last query block with the probes of the module docstring")
    p.add_argument("--top_k_blocks", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)
    if not os.path.isfile(args.data_file):
        raise UsageError(f"--data_file {args.data_file}: no such file (make it with eval/ruler/data/prepare.py)")
    if args.follow != "dense" and args.follow not in args.variants:
        raise UsageError(f"--follow {args.follow}: choose dense or one of --variants")
    from eval.ruler.model_loader import load_model

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    # the budget: --top_k_blocks for the fixed-budget variants; a variant with its own budget mode keeps it
    configs = {v: SketchWalkConfig.from_dict({"dense_last_blocks": 0, **VARIANTS[v]} if "budget_mode" in VARIANTS[v]
                                             or "preset" in VARIANTS[v] else
                                             {"top_k_blocks": args.top_k_blocks, "dense_last_blocks": 0, **VARIANTS[v]})
               for v in args.variants}
    if args.decode and "oracle" not in configs:
        raise UsageError("--decode measures recall against the oracle: add oracle to --variants")
    probe = ProbeSelector(configs, args.follow, args.probes, decode=args.decode)
    names = args.variants + (PROBES if args.probes else [])
    enable_sparse_attention(model, probe)
    if args.follow == "dense":
        import sketch_walk.core.hook
        sketch_walk.core.hook.block_sparse_attention = dense_prefill_attention
    device = next(model.parameters()).device
    with open(args.data_file, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rows = rows[: args.num_samples] if args.num_samples else rows
    samples = []
    t0 = time.time()
    for r in rows:
        text = r["input"]
        probe.needle_blocks = needle_token_blocks(tok, text, r["outputs"], probe.block_size)
        probe.records = []
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        samples.append({"index": r["index"], "depth": r.get("depth"), "tokens": ids.shape[1],
                        "needle_blocks": probe.needle_blocks, "layers": probe.records})
        print(f"sample {r['index']}: depth {r.get('depth')} needle blocks {probe.needle_blocks} " +
              " ".join(f"{n}={sum(x[n]['needle_kept'] for x in probe.records)}/{len(probe.records)}"
                       for n in names), flush=True)
    result = {"data_file": args.data_file, "model": args.model, "follow": args.follow,
              "top_k_blocks": args.top_k_blocks, "variants": {v: VARIANTS[v] for v in args.variants},
              "decode": args.decode,
              "device": str(device), "seconds": round(time.time() - t0, 1),
              "probes": PROBES if args.probes else [], "summary": summarise(samples, names), "samples": samples}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, args.output)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
