"""--preset authors against an independent float64 transcription of the authors' released code.

The reference below re-states, in float64 and at token level, the rules of the authors' code (the public
repository Escanord/SketchWalk: pipeline/sketchwalk/modeling/modeling_llama.py with
config/pipeline_config/SketchWalk/<model>/<model>-inference-both.json; docs/ALGORITHM.md "The authors' preset"
lists them): a zero-padded block mean of Q and K, the sign-randomised unnormalised Walsh-Hadamard transform (a
butterfly loop, not a matrix) divided by sqrt(d_p / m) keeping m coordinates, logits / sqrt(m) / 100 softmaxed over
all key blocks, summed over heads and row-normalised; the walk state = (1 - beta) A + beta state A three times from
the previous sparse layer's state (A itself at the first); each row keeps the blocks above the (1 - 0.125) quantile of
its causal blocks without the sink-fraction and window blocks, plus a token window and a token sink of 5% of the
context, and the last 4 query blocks dense; decode scores the last 32 queries (seeded with the prompt's) against the
zero-padded key block means, keeps a running-mean block transition, walks from its own row, and keeps sink blocks,
window blocks, a token sink and the blocks above the quantile. The reference's token masks are turned into blocks
(a block is kept when any of its (query, key) pairs is allowed) and compared with the lists SketchWalkSelector
returns. The only things shared with the code under test are the SRHT's random signs and permutation (the
authors draw theirs unseeded; this project seeds them per layer), regenerated here from the same seeds.
"""
import math
import types

import pytest
import torch

from sketch_walk.config import SketchWalkConfig
from sketch_walk.selector import SketchWalkSelector
from sketch_walk.sketch import layer_seed

torch.set_default_dtype(torch.float32)


# ------------------------------------------------------------------------------------------ the reference
def _signs_and_perm(d_pad: int, layer: int):
    g = torch.Generator().manual_seed(layer_seed(0, layer))
    signs = torch.randint(0, 2, (d_pad,), generator=g, dtype=torch.int64).double() * 2 - 1
    perm = torch.randperm(d_pad, generator=g)
    return signs, perm


def _fwht(x):
    """Unnormalised fast Walsh-Hadamard transform over the last axis (a power of two)."""
    n = x.shape[-1]
    y = x.clone()
    h = 1
    while h < n:
        y = y.view(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = y[..., 0, :].clone(), y[..., 1, :].clone()
        y[..., 0, :], y[..., 1, :] = a + b, a - b
        y = y.view(*x.shape)
        h *= 2
    return y


def _project(x, m_wanted, layer):
    d = x.shape[-1]
    dp = 1 << (d - 1).bit_length()
    x = torch.nn.functional.pad(x, (0, dp - d))
    signs, perm = _signs_and_perm(dp, layer)
    m = min(m_wanted, dp)
    y = _fwht(x * signs) / math.sqrt(dp / m)
    return y[..., perm[:m]]


def _pool(x, bs):
    """Zero-padded block mean: (..., T, d) -> (..., ceil(T / bs), d), a partial block's sum / bs."""
    t = x.shape[-2]
    nb = -(-t // bs)
    x = torch.nn.functional.pad(x, (0, 0, 0, nb * bs - t))
    return x.unflatten(-2, (nb, bs)).mean(-2)


def _block_probs(q, k, bs, m, layer, group):
    """(H, Tq, d), (H_kv, Tk, d) -> the head-summed, row-normalised block distribution (nq, nk), no causal mask."""
    k = k.repeat_interleave(group, dim=0)
    qs, ks = _project(_pool(q, bs), m, layer), _project(_pool(k, bs), m, layer)
    logits = qs @ ks.transpose(-1, -2) / math.sqrt(qs.shape[-1])
    p = torch.softmax(logits / 100, dim=-1).sum(0)
    return p / p.sum(-1, keepdim=True)


def _kept_above_quantile(rw, causal, sink_blocks, window_blocks, q_blk, frac):
    """Blocks j with rw[j] > the (1 - frac) quantile of the causal blocks outside the sink and the window."""
    nk = rw.shape[-1]
    j = torch.arange(nk)
    pool = causal & (j >= sink_blocks) & ~((j <= q_blk) & (j >= q_blk - (window_blocks - 1)))
    if not pool.any():
        return torch.zeros(nk, dtype=torch.bool)
    th = torch.quantile(rw[pool], 1 - frac)
    return rw > th


def reference_prefill(layers_qk, bs, *, frac=0.125, window=0.05, sink=0.025, steps=3, beta=0.25, m=128,
                      dense_last=4):
    """[(layer, q (H, T, d), k (H_kv, T, d))] -> per layer the kept (nb, nb) bool block mask, and the decode state."""
    out, states = {}, {}
    prev = None
    for layer, q, k in layers_qk:
        h, t, _ = q.shape
        a = _block_probs(q, k, bs, m, layer, h // k.shape[0])
        state = a if prev is None else prev
        for _ in range(steps):
            state = (1 - beta) * a + beta * state @ a
        prev = state
        nb = a.shape[-1]
        w_tok = max(1, int(window * t))
        wb = min(nb, max(1, -(-w_tok // bs)))
        sb = min(nb, max(1, -(-max(1, int(sink * t)) // bs)))
        keep = torch.zeros(nb, nb, dtype=torch.bool)
        for i in range(nb):
            causal = torch.arange(nb) <= i
            keep[i] = _kept_above_quantile(state[i], causal, sb, wb, i, frac) & causal
            if i >= nb - dense_last:
                keep[i] = causal
        # the token window and the token sink, as blocks: any allowed (query, key) pair
        tq = torch.arange(t).view(-1, 1)
        tk = torch.arange(t).view(1, -1)
        tok = (tk <= tq) & ((tk >= tq - w_tok + 1) | (tk < w_tok))
        nb_pad = nb * bs - t
        tok = torch.nn.functional.pad(tok, (0, nb_pad, 0, nb_pad)).view(nb, bs, nb, bs).any(3).any(1)
        out[layer] = keep | tok
        states[layer] = {"a": a.clone(), "q_window": q[:, -32:].clone()}
    return out, states


def reference_decode_step(state, layer, q_new, k_all, bs, *, frac=0.125, window=0.05, sink=0.025, steps=3,
                          beta=0.25, m=128, qwin=32):
    """One decode step of one layer: q_new (H, 1, d), k_all (H_kv, T, d) with the new key -> kept (nb,) bool."""
    h = q_new.shape[0]
    t = k_all.shape[-2]
    state["q_window"] = torch.cat([state["q_window"], q_new], dim=1)[:, -qwin:]
    k = k_all.repeat_interleave(h // k_all.shape[0], dim=0)
    qs, ks = _project(state["q_window"], m, layer), _project(_pool(k, bs), m, layer)
    logits = qs @ ks.transpose(-1, -2) / math.sqrt(qs.shape[-1])
    row = torch.softmax(logits / 100, dim=-1).sum((0, 1))
    row = row / row.sum()
    nb = row.shape[-1]
    a = state["a"]
    if nb > a.shape[-1]:
        grow = nb - a.shape[-1]
        a = torch.cat([torch.nn.functional.pad(a, (0, grow)), row.expand(grow, nb)], dim=0)
    cur, step_in = (t - 1) // bs, (t - 1) % bs
    alpha = 1.0 if step_in == 0 else 1.0 / (step_in + 1)
    a = a.clone()
    a[cur] = (1 - alpha) * a[cur] + alpha * row
    a[cur] = a[cur] / a[cur].sum()
    a[:, cur] = (1 - alpha) * a[:, cur] + alpha * row
    a = a / a.sum(-1, keepdim=True)
    state["a"] = a
    walk = row
    for _ in range(steps):
        walk = (1 - beta) * row + beta * walk @ a
    w_tok = max(1, int(window * t))
    wb = min(nb, max(1, -(-w_tok // bs)))
    sb = min(nb, max(1, -(-max(1, int(sink * t)) // bs)))
    keep = _kept_above_quantile(walk, torch.ones(nb, dtype=torch.bool), sb, wb, nb - 1, frac)
    keep[:sb] = True
    keep[max(0, cur - wb + 1):cur + 1] = True
    keep[: -(-w_tok // bs)] = True                                  # the token sink k < w_tok (k = 0 included)
    return keep


# ------------------------------------------------------------------------------------------ the code under test
SPREAD = 6.0
def _mask(idx, cnt, nb):
    """Lists (..., w) + counts -> (..., nb) bool, checking the padding and the order."""
    out = torch.zeros(*idx.shape[:-1], nb, dtype=torch.bool)
    for pos in torch.cartesian_prod(*[torch.arange(s) for s in idx.shape[:-1]]).view(-1, idx.dim() - 1):
        pos = tuple(pos.tolist())
        row = idx[pos][: cnt[pos]].long()
        assert bool((idx[pos][cnt[pos]:] == -1).all()) and bool((row[1:] > row[:-1]).all())
        out[pos + (row,)] = True
    return out


def _inputs(seed, h, hkv, t, d, bs):
    """Queries and keys with block structure (a random offset per query and key block) and large norms, so that the
    authors' temperature (logits / 100) still gives peaked block distributions and the walk changes the ranking."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-t // bs)
    q_off = torch.randn(1, h, nb, d, generator=g) * SPREAD
    k_off = torch.randn(1, hkv, nb, d, generator=g) * SPREAD
    q = torch.randn(1, h, t, d, generator=g) + q_off.repeat_interleave(bs, dim=2)[:, :, :t]
    k = torch.randn(1, hkv, t, d, generator=g) + k_off.repeat_interleave(bs, dim=2)[:, :, :t]
    return q, k


@pytest.mark.parametrize("seed, t, d, sketch_dim", [(0, 700, 32, 128), (1, 1000, 64, 32), (2, 330, 16, 128)])
def test_authors_preset_matches_float64_transcription(seed, t, d, sketch_dim):
    bs, h, hkv, layers, decode_steps = 16, 4, 2, (2, 3, 4), 40
    cfg = SketchWalkConfig.from_dict({"preset": "authors", "block_size": bs, "sketch_dim": sketch_dim})
    sel = SketchWalkSelector(cfg)
    sel.backend = "torch"
    sel.reset(1)
    module = types.SimpleNamespace(scaling=d ** -0.5)
    qk = {layer: _inputs(seed * 10 + layer, h, hkv, t + decode_steps, d, bs) for layer in layers}
    ref, ref_states = reference_prefill([(l, qk[l][0][0, :, :t].double(), qk[l][1][0, :, :t].double())
                                         for l in layers], bs, m=sketch_dim)
    nb = -(-t // bs)
    for layer in layers:
        q, k = qk[layer]
        idx, cnt = sel.select_prefill(layer, module, q[:, :, :t], k[:, :, :t])
        got = _mask(idx, cnt, nb)
        assert got.shape == (1, hkv, nb, nb)
        assert torch.equal(got[0, 0], got[0, 1]), "one selection per layer, shared by the key heads"
        diff = (got[0, 0] != ref[layer]).nonzero().tolist()
        assert not diff, f"prefill layer {layer}: blocks differ at (row, block) {diff[:8]}"
    for step in range(decode_steps):
        n = t + step + 1
        for layer in layers:
            q, k = qk[layer]
            idx, cnt = sel.select_decode(layer, module, q[:, :, n - 1:n], k[:, :, :n])
            got = _mask(idx, cnt, -(-n // bs))[0, 0]
            want = reference_decode_step(ref_states[layer], layer, q[0, :, n - 1:n].double(), k[0, :, :n].double(),
                                         bs, m=sketch_dim)
            diff = (got != want).nonzero().flatten().tolist()
            assert not diff, f"decode step {step} (n {n}) layer {layer}: blocks differ at {diff}"
