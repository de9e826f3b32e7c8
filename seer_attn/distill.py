"""Distillation of SeerAttention gates from a frozen model (self-distillation, docs/ALGORITHM.md "SeerAttention").

The training step as functions; the command that loads a model, reads a corpus and writes a checkpoint is
``python -m seer_attn.train_gates`` (eval/ruler/train_gates.py).

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

Corpus helpers (:func:`read_corpus`, :func:`split_heldout`): a plain-text file, a .jsonl file (one JSON object
per line, its "text" field; or one JSON string per line) or a .json file ({"text": ...} as RULER's
PaulGrahamEssays.json, or a list of such objects / strings); the HEAD of the text is held out, because RULER
builds its essay haystack from the first words of PaulGrahamEssays.json.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from sketch_walk.core.block_sparse import attended_pairs_prefill, causal_pairs, mask_to_block_lists
from sketch_walk.core.errors import UsageError

from .config import SeerAttnConfig
from .gate import SeerAttnGates, pool_blocks
from .selector import gated_attention, group_union, head_masks, heads_first, prefill_mask, rope_input_modules

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
        for i, attn in gated_attention(model, cfg.gated_layers).items():
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
