"""Distil SeerAttention gates from a frozen model (self-distillation, SEERATTN.md).

    # the committed checkpoint (CPU, 2 cores, ~16 min wall with its evaluation):
    python -m seer_attn.train_gates --base_model smollm2 --corpus ../shared/data/PaulGrahamEssays.json \
        --seq_len 4096 --steps 250 --batch_size 4 --num_train_seqs 24 --eval_seq_len 4096 \
        --heldout_seqs 2 --eval_every 10 --output seer_attn/checkpoints/smollm2
    # then the 8K evaluation merged into its eval.json (~10 min on CPU):
    python -m seer_attn.train_gates --eval_only --corpus ../shared/data/PaulGrahamEssays.json \
        --eval_seq_len 8192 --heldout_seqs 2 --output seer_attn/checkpoints/smollm2
    # on a GPU (bf16 model, fp32 gates; same code), at the model's full 8K context:
    python -m seer_attn.train_gates --base_model smollm2 --corpus PaulGrahamEssays.json --seq_len 8192 \
        --stride 4096 --steps 400 --batch_size 8 --eval_seq_len 4096,8192 --heldout_seqs 8 --eval_every 20 \
        --output seer_attn/checkpoints/smollm2

Per training sequence and gated layer, the frozen model gives (forward hooks on q_proj/k_proj,
or q_norm/k_norm where the model has them (Gemma-3, Qwen3), for the pre-RoPE q/k the gate reads,
and the layer's own RoPE on them for the ground truth):

* ground truth: exact causal softmax attention P of the post-RoPE q/k (GQA: each query head
  against its key head), GT[I, J] = max of P over the B x B tile, each row normalised to 1;
  computed per chunk of query rows in two passes over the chunk's logits (row log-sum-exp,
  then tile maxima of logit - lse), so memory stays O(rows_per_chunk * n + n_b^2), never O(n^2);
* loss: KL(GT || softmax(s)) per query-block row (sum over key blocks), averaged over batch,
  heads and rows, skipping the first quarter of query-block rows (as the reference does),
  summed over layers. (The reference's KLDivLoss(reduction="mean") also divides by n_b.)

Only the gates train (fp32, AdamW, lr 1e-3, no weight decay, linear warm-up then cosine to 0,
as the authors' script). The base model never changes and the gates do not feed back into it,
so the per-sequence gate inputs (pooled q, pooled k) and ground truth are computed once per
sequence and kept (in memory, on the device): after the first pass over the distinct
sequences, a step costs only the gates' forward and backward. ``--num_train_seqs`` bounds the
distinct sequences (default: steps * batch_size, as many as the corpus holds).

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
import math
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from sketch_walk.block_sparse import attended_pairs_prefill, causal_pairs, mask_to_block_lists
from sketch_walk.errors import UsageError, cli_main
from sketch_walk.model_loader import sha256_file

from .checkpoint import save_checkpoint
from .config import SeerAttnConfig
from .gate import BlockRope, SeerAttnGates, pool_blocks
from .selector import decoder_layers, group_union, head_masks, heads_first, prefill_mask, rope_input_modules

SKIP_ROWS_FRAC = 4          # the loss skips the first n_b // 4 query-block rows


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------

def _texts_from_json(obj, where: str) -> List[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        if isinstance(obj.get("text"), str):
            return [obj["text"]]
        raise UsageError(f"{where}: a JSON object without a string \"text\" field")
    if isinstance(obj, list):
        out: List[str] = []
        for x in obj:
            out.extend(_texts_from_json(x, where))
        return out
    raise UsageError(f"{where}: expected text, an object with \"text\" or a list of them")


def read_corpus(path: str) -> str:
    """The corpus as one string (documents joined by blank lines)."""
    if not os.path.isfile(path):
        raise UsageError(f"--corpus {path}: no such file (plain text, .jsonl or .json)")
    with open(path, encoding="utf-8") as fh:
        raw = fh.read()
    low = path.lower()
    if low.endswith(".jsonl"):
        docs: List[str] = []
        for no, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    docs.extend(_texts_from_json(json.loads(line), f"{path}:{no}"))
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{path}:{no}: not JSON ({exc})") from exc
        text = "\n\n".join(docs)
    elif low.endswith(".json"):
        try:
            text = "\n\n".join(_texts_from_json(json.loads(raw), path))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not JSON ({exc}); plain-text corpora need another extension") from exc
    else:
        text = raw
    if not text.strip():
        raise UsageError(f"--corpus {path}: no text")
    return text


def split_heldout(text: str, frac: float):
    """(heldout_head, train_tail): the first ``frac`` of the characters, cut at whitespace."""
    if not 0.0 < frac < 1.0:
        raise UsageError(f"--heldout_frac {frac}: must be in (0, 1)")
    cut = int(len(text) * frac)
    m = re.search(r"\s", text[cut:])
    cut = cut + (m.start() if m else 0)
    return text[:cut], text[cut:]


def ruler_haystack_overlap(text: str, train_text: str, heldout_chars: int, tokenizer,
                           lengths: Sequence[int], ngram: int = 13) -> Dict[str, Any]:
    """How much of RULER's essay haystack at each length lies in the training text.

    RULER's niah (essay haystack) uses the first W words of re.sub(r"\\s+", " ", text).split(" "),
    W found so that the prompt fits the length; here W is the largest word count whose text has
    at most ``length`` tokens (an upper bound of the haystack). Reported per length: the share of
    the haystack's characters that come from the training part (by position in the file), and the
    share of its word 13-grams that occur anywhere in the training text (repeated passages).
    """
    words = re.sub(r"\s+", " ", text).split(" ")
    train_grams = set()
    tw = re.sub(r"\s+", " ", train_text).split(" ")
    for i in range(len(tw) - ngram + 1):
        train_grams.add(hash(tuple(tw[i:i + ngram])))
    # character offset in the normalised text where the training part starts
    head_norm_len = len(re.sub(r"\s+", " ", text[:heldout_chars]))
    out = {}
    for L in lengths:
        lo, hi = 1, len(words)
        while lo < hi:                                   # largest W with <= L tokens
            mid = (lo + hi + 1) // 2
            if len(tokenizer(" ".join(words[:mid]), add_special_tokens=False)["input_ids"]) <= L:
                lo = mid
            else:
                hi = mid - 1
        hay = " ".join(words[:lo])
        grams = [hash(tuple(words[i:i + ngram])) for i in range(max(0, lo - ngram + 1))]
        shared = sum(g in train_grams for g in grams)
        out[str(L)] = {"haystack_words": lo, "haystack_chars": len(hay),
                       "chars_from_training_part": max(0, len(hay) - head_norm_len),
                       "share_chars_from_training_part": round(max(0, len(hay) - head_norm_len) / max(1, len(hay)), 4),
                       f"share_{ngram}grams_in_training_text": round(shared / max(1, len(grams)), 4)}
    return out


def windows(ids: torch.Tensor, seq_len: int, count: Optional[int] = None) -> List[torch.Tensor]:
    n = ids.numel() // seq_len
    if count is not None:
        n = min(n, count)
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Ground truth
# ----------------------------------------------------------------------------------------------

def block_ground_truth(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, want_mass: bool = False,
                       max_chunk_bytes: int = 64 << 20):
    """GT (B, H, n_b, n_b) fp32 and optionally the block attention mass, from post-RoPE q/k.

    q (B, H, n, d), k (B, H_kv, n, d) (queries at positions 0..n-1, causal). GT[I, J] = max over
    the tile (I, J) of the exact softmax probability, rows normalised to 1; mass[I, J] = sum of P
    over the tile / rows(I) (the average attention share of key block J for the queries of I).
    Per chunk of query rows: pass 1 the row log-sum-exp, pass 2 tile maxima of (logit - lse).
    """
    b, h, n, d = q.shape
    hkv = k.shape[1]
    r = h // hkv
    bs = block_size
    nb = (n + bs - 1) // bs
    gt = torch.zeros(b, h, nb, nb, dtype=torch.float32, device=q.device)
    mass = torch.zeros_like(gt) if want_mass else None
    rows = max(bs, (max_chunk_bytes // max(1, b * h * n * 4)) // bs * bs)
    qg = q.view(b, hkv, r, n, d)
    ninf = float("-inf")
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        c, kend = r1 - r0, r1
        s = torch.matmul(qg[:, :, :, r0:r1].float().reshape(b, hkv, r * c, d),
                         k[:, :, :kend].float().transpose(-1, -2)).view(b, hkv, r, c, kend)
        s.mul_(scale)
        future = torch.ones(c, c, dtype=torch.bool, device=q.device).triu_(1)   # keys r0..r1-1 vs rows
        s[..., r0:].masked_fill_(future, ninf)
        lse = torch.logsumexp(s, dim=-1, keepdim=True)                          # pass 1: row LSE
        cb, nkb = (c + bs - 1) // bs, (kend + bs - 1) // bs
        sk = s if kend == nkb * bs else torch.nn.functional.pad(s, (0, nkb * bs - kend), value=ninf)
        bm = sk.view(b, hkv, r, c, nkb, bs).amax(-1) - lse                      # pass 2: row max per key block
        bm = torch.nn.functional.pad(bm, (0, 0, 0, cb * bs - c), value=ninf)
        i0 = r0 // bs
        gt[:, :, i0:i0 + cb, :nkb] = bm.view(b, hkv, r, cb, bs, nkb).amax(4).exp().reshape(b, h, cb, nkb)
        if want_mass:
            sk.sub_(lse).exp_()                                                 # probabilities, 0 off-causal
            p = sk.view(b, hkv, r, c, nkb, bs).sum(-1)
            p = torch.nn.functional.pad(p, (0, 0, 0, cb * bs - c)).view(b, hkv, r, cb, bs, nkb).sum(4)
            nrows = torch.full((cb,), float(bs), device=q.device)
            nrows[-1] = c - (cb - 1) * bs
            mass[:, :, i0:i0 + cb, :nkb] = (p / nrows.view(-1, 1)).reshape(b, h, cb, nkb)
        del s, sk, bm
    gt = gt / gt.sum(-1, keepdim=True)
    return gt, mass


class FeatureExtractor:
    """Runs the frozen model on token ids and returns per-layer gate inputs and targets.

    Forward hooks: a pre-hook on each gated layer's attention module keeps position_embeddings;
    q_proj's hook keeps the pre-RoPE queries; k_proj's hook then has both, computes the pooled
    gate inputs, applies the model's own ``apply_rotary_pos_emb`` (from the attention module's
    transformers module) for the post-RoPE ground truth, and stores everything for the layer.
    The LM head is skipped (the base model's ``model.model`` runs).
    """

    def __init__(self, model, cfg: SeerAttnConfig, max_chunk_bytes: int = 64 << 20):
        self.model, self.cfg, self.max_chunk_bytes = model, cfg, max_chunk_bytes
        self.want_mass = False
        self.out: Dict[int, Dict[str, torch.Tensor]] = {}
        self._handles = []
        layers = decoder_layers(model)
        for i in cfg.gated_layers:
            attn = layers[i].self_attn
            rope_fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
            if rope_fn is None:
                raise UsageError(f"{type(attn).__name__}: its module has no apply_rotary_pos_emb; "
                                 f"gate distillation supports Llama-family models")
            q_mod, k_mod = rope_input_modules(attn)      # q_norm / k_norm where the model has them
            self._handles.append(attn.register_forward_pre_hook(self._pre_hook(attn), with_kwargs=True))
            self._handles.append(q_mod.register_forward_hook(self._q_hook(attn)))
            self._handles.append(k_mod.register_forward_hook(self._k_hook(i, attn, rope_fn)))

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre_hook(self, attn):
        def hook(_mod, args, kwargs):
            pe = kwargs.get("position_embeddings")
            if pe is None and len(args) > 1:
                pe = args[1]
            attn._seer_train_pe = pe
        return hook

    def _q_hook(self, attn):
        cfg = self.cfg

        def hook(_mod, inp, out):
            attn._seer_train_q = heads_first(out, cfg.num_q_heads, cfg.head_dim, like=inp[0] if inp else None)
        return hook

    def _k_hook(self, layer_idx, attn, rope_fn):
        cfg = self.cfg

        def hook(_mod, inp, out):
            q, pe = attn._seer_train_q, attn._seer_train_pe       # q: (B, H, n, d)
            del attn._seer_train_q, attn._seer_train_pe
            d = cfg.head_dim
            k = heads_first(out, cfg.num_kv_heads, d, like=inp[0] if inp else None)
            feats = {"qp": pool_blocks(q, cfg.block_size, cfg.q_pools),
                     "kp": pool_blocks(k, cfg.block_size, cfg.k_pools)}
            cos, sin = pe
            q_rot, k_rot = rope_fn(q, k, cos, sin)
            scale = getattr(attn, "scaling", None) or d ** -0.5
            feats["gt"], mass = block_ground_truth(q_rot, k_rot, scale, cfg.block_size, self.want_mass,
                                                   self.max_chunk_bytes)
            if mass is not None:
                feats["mass"] = mass
            self.out[layer_idx] = feats
        return hook

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, want_mass: bool = False) -> Dict[int, Dict[str, torch.Tensor]]:
        self.out, self.want_mass = {}, want_mass
        base = getattr(self.model, "model", self.model)
        device = next(self.model.parameters()).device
        base(input_ids=ids.view(1, -1).to(device), use_cache=False)
        out, self.out = self.out, {}
        missing = [i for i in self.cfg.gated_layers if i not in out]
        if missing:
            raise RuntimeError(f"no features captured for layers {missing}")
        return out


# ----------------------------------------------------------------------------------------------
# Loss and evaluation
# ----------------------------------------------------------------------------------------------

def kl_rows(scores: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """KL(GT || softmax(scores)) per row (..., rows); scores -inf at non-causal entries, GT 0 there."""
    logq = torch.log_softmax(scores, dim=-1)
    logq = logq.masked_fill(~torch.isfinite(scores), 0.0)
    return (torch.xlogy(gt, gt) - gt * logq).sum(-1)


def gate_loss(gates: SeerAttnGates, feats: Dict[int, Dict[str, torch.Tensor]], rope_cs) -> torch.Tensor:
    """Sum over layers of the mean row KL over rows >= n_b // 4."""
    total = 0.0
    for i, f in feats.items():
        nb = f["gt"].shape[-1]
        cos, sin = rope_cs(nb)
        s = gates[i].scores_from_pooled(f["qp"], f["kp"], cos, sin)
        r0 = nb // SKIP_ROWS_FRAC
        total = total + kl_rows(s[:, :, r0:], f["gt"][:, :, r0:]).mean()
    return total


def _density(mask: torch.Tensor, n: int, bs: int) -> torch.Tensor:
    idx, cnt = mask_to_block_lists(mask)
    return attended_pairs_prefill(idx, cnt, n, bs) / causal_pairs(n)       # (B, H_kv)


@torch.no_grad()
def evaluate_masks(scores_by_seq, feats_by_seq, cfg: SeerAttnConfig, n: int) -> Dict[str, float]:
    """Density and oracle-block recall of cfg's masks over held-out sequences (all gated layers)."""
    bs = cfg.block_size
    dens, rec, rec_all, rec_sparse, m_gate, m_orc, diag_miss, rec_local = [], [], [], [], [], [], [], []
    for scores_l, feats in zip(scores_by_seq, feats_by_seq):
        for i, s in scores_l.items():
            mask = prefill_mask(s, cfg)                                          # (B, Hkv, nb, nb)
            nb = mask.shape[-1]
            dens.append(_density(mask, n, bs).mean())
            mass = feats[i]["mass"]
            mkv = mass.view(mass.shape[0], cfg.num_kv_heads, -1, nb, nb).mean(2)  # group mean
            causal = torch.ones(nb, nb, dtype=torch.bool, device=mask.device).tril_()
            ranked = mkv.masked_fill(~causal, -1.0).argsort(dim=-1, descending=True, stable=True)
            rank = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(nb, device=mask.device).expand_as(ranked))
            cnt = mask.sum(-1, keepdim=True)
            oracle = (rank < cnt) & causal
            hit = (mask & oracle).sum(-1).float() / cnt.squeeze(-1).float()      # (B, Hkv, nb)
            r0 = nb // SKIP_ROWS_FRAC
            rec.append(hit[..., r0:].mean())
            rec_all.append(hit.mean())
            sparse = (cnt.squeeze(-1) < causal.sum(-1))[..., r0:]
            sp = hit[..., r0:][sparse]
            if sp.numel():
                rec_sparse.append(sp.mean())
            # floor: sink + the most recent blocks, same count per row
            ii = torch.arange(nb, device=mask.device).view(-1, 1)
            jj = torch.arange(nb, device=mask.device).view(1, -1)
            local = ((jj >= ii - cnt + 2) | ((jj == 0) & (cnt >= 2)) | (jj == ii)) & causal
            rec_local.append(((local & oracle).sum(-1).float() / cnt.squeeze(-1).float())[..., r0:].mean())
            m_gate.append((mkv * mask).sum(-1)[..., r0:].mean())
            m_orc.append((mkv * oracle).sum(-1)[..., r0:].mean())
            free = cfg.with_knobs(keep_diagonal=False, last_block_dense=False)
            raw = group_union(head_masks(s, free), cfg.num_kv_heads)
            diag_miss.append((~raw.diagonal(dim1=-2, dim2=-1)).float().mean())
    mean = lambda xs: float(torch.stack(xs).mean()) if xs else None
    rnd = lambda x, k=4: None if x is None else round(x, k)
    return {"density": rnd(mean(dens)), "oracle_block_recall": rnd(mean(rec)),
            "oracle_block_recall_all_rows": rnd(mean(rec_all)),
            "oracle_block_recall_sparse_rows": rnd(mean(rec_sparse)),
            "oracle_block_recall_local_baseline": rnd(mean(rec_local)),
            "attention_mass_kept_gate": rnd(mean(m_gate)),
            "attention_mass_kept_oracle": rnd(mean(m_orc)),
            "share_rows_diagonal_not_chosen": rnd(mean(diag_miss), 5)}


@torch.no_grad()
def evaluate(gates: SeerAttnGates, cfg: SeerAttnConfig, feats_by_seq, n: int, rope_cs,
             target_density: float = 0.3, nz_ratios=(0.1, 0.2, 0.3, 0.5)) -> Dict[str, Any]:
    scores_by_seq, kls = [], []
    for feats in feats_by_seq:
        sl = {}
        for i, f in feats.items():
            nb = f["gt"].shape[-1]
            cos, sin = rope_cs(nb)
            sl[i] = gates[i].scores_from_pooled(f["qp"], f["kp"], cos, sin)
        scores_by_seq.append(sl)
        kls.append(float(sum(kl_rows(s[:, :, s.shape[-1] // SKIP_ROWS_FRAC:],
                                     feats[i]["gt"][:, :, s.shape[-1] // SKIP_ROWS_FRAC:]).mean()
                             for i, s in sl.items())))
    out: Dict[str, Any] = {"seq_len": n, "sequences": len(feats_by_seq),
                           "heldout_kl_sum_over_layers": round(sum(kls) / len(kls), 4),
                           "heldout_kl_per_layer": round(sum(kls) / len(kls) / len(cfg.gated_layers), 5)}
    base = cfg.with_knobs(threshold=cfg.threshold)
    out[f"threshold_{cfg.threshold:g}"] = evaluate_masks(scores_by_seq, feats_by_seq, base, n)
    out["nz_ratio"] = {f"{z:g}": evaluate_masks(scores_by_seq, feats_by_seq, cfg.with_knobs(nz_ratio=z), n)
                       for z in nz_ratios}
    # threshold whose density is closest to target_density (bisection on log10 threshold)
    lo, hi = -9.0, -0.05
    best = None
    for _ in range(14):
        mid = (lo + hi) / 2
        res = evaluate_masks(scores_by_seq, feats_by_seq, cfg.with_knobs(threshold=10 ** mid), n)
        if best is None or abs(res["density"] - target_density) < abs(best[1]["density"] - target_density):
            best = (10 ** mid, res)
        if res["density"] > target_density:
            lo = mid
        else:
            hi = mid
    out["threshold_for_target_density"] = {"target_density": target_density,
                                           "threshold": float(f"{best[0]:.3g}"), **best[1]}
    return out


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m seer_attn.train_gates", description=__doc__.split("\n\n")[0],
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

    from sketch_walk.model_loader import load_model

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
        from .checkpoint import load_checkpoint
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
    from sketch_walk.model_loader import load_model

    from .checkpoint import load_checkpoint

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
