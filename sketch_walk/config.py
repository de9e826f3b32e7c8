"""SketchWalkConfig: every knob of Sketch&Walk (docs/ALGORITHM.md), its default and validation.

The seed's five user-facing knobs come first (block_size, sketch_dim, top_k_blocks,
sparsity_exponent, skip_decode); the others are the specification's "Knobs" section. Every field
is a command-line flag of the same name (``--block_size 64``); :func:`add_arguments` and
:meth:`SketchWalkConfig.from_namespace` do the plumbing for scripts.

Bad values raise :class:`sketch_walk.core.errors.UsageError` with a message that names the flag and
says what is allowed. :meth:`SketchWalkConfig.inactive_knobs` lists the knobs that have no effect
in the chosen configuration (e.g. ``sketch_dim`` with ``key_summary minmax``), for run manifests.

Choices where docs/ALGORITHM.md is silent (made here, documented where they act):
* ``n_local >= 1``: the diagonal block is always kept, so every query sees at least itself
  (a list without the diagonal would leave the block's first query with no key at all).
* ``dense_last_blocks`` acts on prefill only; decode steps stay sparse (docs/EVIDENCE.md
  judges selection with sparse decode; the question blocks are prompt blocks).
* Defaults: the seed's knobs (``--preset seed``) but ``dense_last_blocks`` 1 and ``decode_rerank`` 8, the setting that
  held SmolLM2's RULER score at its budget (docs/EVIDENCE.md "Selection evidence"); ``--preset authors`` is the
  authors' released configuration.
* ``hadamard_seed``: the SRHT of layer l uses the seed ``hadamard_seed * 1_000_003 + l``
  (:func:`sketch_walk.sketch.layer_seed`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Dict, List, Optional

from .core.errors import UsageError

KEY_SUMMARIES = ("minmax", "mean")
SELECTORS = ("sketchwalk", "oracle", "local")
SELECT_PER = ("layer", "kv_head")
BUDGET_MODES = ("fixed", "fraction", "mass")
SCORE_SCALES = ("attention", "authors")
WALK_STARTS = ("identity", "transition")
DECODE_WALKS = ("chain", "own")
DECODE_WINDOW_SCORINGS = ("mean_query", "each_query")
DECODE_TRANSITIONS = ("latest_row", "running_mean")
POOL_PARTIALS = ("exact", "padded")
PRESET_NAMES = ("none", "seed", "authors")
#: choice-valued knobs and their allowed values (flags get ``choices``; the config validates them)
CHOICES = {"key_summary": KEY_SUMMARIES, "selector": SELECTORS, "select_per": SELECT_PER,
           "budget_mode": BUDGET_MODES, "score_scale": SCORE_SCALES, "walk_start": WALK_STARTS,
           "decode_walk": DECODE_WALKS, "decode_window_scoring": DECODE_WINDOW_SCORINGS,
           "decode_transition": DECODE_TRANSITIONS, "pool_partial": POOL_PARTIALS, "preset": PRESET_NAMES}
#: boolean knobs (flags ``--name`` / ``--no-name``)
BOOL_KNOBS = ("skip_decode", "causal_scores", "decode_keep_question")

#: Named configurations; ``--preset NAME`` applies one under the explicitly given knobs.
#: "seed": the seed README's knobs. The defaults differ from them in two knobs, chosen by docs/EVIDENCE.md "Selection
#: evidence" (SmolLM2's judged cells and fresh prompts): dense_last_blocks 1 (the question's query block attends
#: densely in prefill) and decode_rerank 8 (decode spends the budget by the exact mass over a shortlist).
#: "authors": the authors' released configuration (Escanord/SketchWalk, config/pipeline_config/SketchWalk/
#: <model>/<model>-inference-both.json with pipeline/sketchwalk/modeling/modeling_llama.py); how each rule
#: maps onto these knobs and where this implementation differs is in docs/ALGORITHM.md "The authors' preset".
_SEED_KNOBS: Dict[str, Any] = {
    "block_size": 64, "sketch_dim": 64, "top_k_blocks": 16, "sparsity_exponent": 8.0, "skip_decode": False,
    "key_summary": "minmax", "select_per": "layer", "dense_layers": 2, "n_sink": 1, "n_local": 1,
    "dense_last_blocks": 0, "walk_damping": 0.25, "walk_steps": 1, "decode_query_window": 1, "hadamard_seed": 0,
    "budget_mode": "fixed", "budget_fraction": 0.125, "budget_mass": 0.9, "budget_min_blocks": 0,
    "budget_max_blocks": 0, "window_fraction": 0.0, "sink_fraction": 0.0, "causal_scores": True,
    "score_scale": "attention", "walk_start": "identity", "decode_walk": "chain",
    "decode_window_scoring": "mean_query", "decode_transition": "latest_row", "pool_partial": "exact",
    "key_sub_blocks": 1, "decode_keep_question": False, "decode_rerank": 0}
PRESETS: Dict[str, Dict[str, Any]] = {
    "none": {},
    "seed": dict(_SEED_KNOBS),
    "authors": dict(_SEED_KNOBS, sketch_dim=128, key_summary="mean", sparsity_exponent=1.0, dense_last_blocks=4,
                    walk_steps=3, walk_start="transition", budget_mode="fraction", budget_fraction=0.125,
                    window_fraction=0.05, sink_fraction=0.025, causal_scores=False, score_scale="authors",
                    decode_query_window=32, decode_window_scoring="each_query", decode_transition="running_mean",
                    decode_walk="own", pool_partial="padded"),
}
"""Every knob but ``selector`` and ``preset`` (so ``--preset authors --selector oracle`` composes)."""

HELP = {
    "block_size": "tokens per block B (power of two, >= 16)",
    "sketch_dim": "SRHT sketch dimension k (key_summary mean only; k >= head dim means exact block scores)",
    "top_k_blocks": "blocks kept per query block besides sink and local blocks (fewer is more aggressive)",
    "sparsity_exponent": "sharpening exponent s: W = rownorm(A ** s); changes selection only through the walk",
    "skip_decode": "run decode steps with dense attention (prefill stays sparse)",
    "key_summary": "block key summary: minmax (per-channel upper bound, default) or mean (the paper)",
    "selector": "block selector: sketchwalk, oracle (exact block attention mass, O(n^2), evaluation only) "
                "or local (sink + the last top_k_blocks + n_local blocks)",
    "select_per": "one selection per layer (shared by all heads) or per kv_head (its query group)",
    "dense_layers": "the first N model layers stay dense",
    "n_sink": "sink blocks {0..n_sink-1} always kept",
    "n_local": "local blocks {i-n_local+1..i} always kept (>= 1: the diagonal)",
    "dense_last_blocks": "the last N query blocks of the prompt attend densely (prefill only)",
    "walk_damping": "beta in R_l = rownorm((1-beta) W_l + beta R_{l-1} W_l); 0 = one-hop",
    "walk_steps": "how many times the walk update is applied per layer",
    "decode_query_window": "decode scores the mean of the last N queries (1 = the new query only)",
    "hadamard_seed": "base seed of the per-layer SRHT (random signs and row subset)",
    "budget_mode": "how many blocks a row keeps besides the forced ones: fixed (top_k_blocks), fraction (the "
                   "blocks scoring above the row's (1 - budget_fraction) quantile) or mass (the fewest blocks "
                   "whose estimated attention mass reaches budget_mass)",
    "budget_fraction": "budget_mode fraction: the kept share of each row's candidate blocks (0 < f <= 1)",
    "budget_mass": "budget_mode mass: estimated attention mass to reach per row (0 < p <= 1)",
    "budget_min_blocks": "budget_mode fraction / mass: at least this many blocks besides the forced ones",
    "budget_max_blocks": "budget_mode fraction / mass: at most this many blocks besides the forced ones (0 = no cap)",
    "window_fraction": "a token sink and a token window of max(1, int(f * n)) tokens each are kept, rounded out "
                       "to whole blocks (0 = off: n_sink / n_local only)",
    "sink_fraction": "fraction and mass budgets: the blocks of the first max(1, int(f * n)) tokens are left out "
                     "of the row's candidates (0 = the kept sink blocks are)",
    "causal_scores": "prefill block softmax over causal key blocks only; --no-causal_scores: over all blocks "
                     "(the authors'; causality is then enforced at selection)",
    "score_scale": "logit scale of the block scores: attention (the model's 1/sqrt(d)) or authors "
                   "(m^1.5 / (100 d_p) on the exact inner product, m = min(sketch_dim, d_p))",
    "walk_start": "the walk's state before the first sparse layer: identity (R_0 = I) or transition (R_0 = W)",
    "decode_walk": "decode walk starts from the previous sparse layer's row (chain) or this layer's own row (own)",
    "decode_window_scoring": "decode_query_window > 1: score the window's mean query (mean_query) or each "
                             "query and average their block distributions (each_query)",
    "decode_transition": "decode's block transition: the current block's row is the latest decode row "
                         "(latest_row) or a running mean of its rows and column (running_mean, the authors')",
    "pool_partial": "a partial block's pooled mean divides by its token count (exact) or by block_size (padded)",
    "key_sub_blocks": "key_summary minmax: bound each block by its best of this many sub-blocks' Kmax / Kmin "
                      "(1 = the whole block)",
    "decode_keep_question": "decode also keeps the blocks the prompt's last query block chose at prefill",
    "decode_rerank": "decode: shortlist R times the budget by the estimate, then spend the budget on the shortlist "
                     "by the new query's exact attention mass over its keys (0 = off)",
    "preset": "apply a named configuration under the given flags: seed (the seed README's knobs), authors "
              "(the authors' released configuration) or none",
}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(float(x))


@dataclasses.dataclass
class SketchWalkConfig:
    """Every knob of Sketch&Walk with its default (docs/ALGORITHM.md "Knobs")."""

    block_size: int = 64
    sketch_dim: int = 64
    top_k_blocks: int = 16
    sparsity_exponent: float = 8.0
    skip_decode: bool = False
    key_summary: str = "minmax"
    selector: str = "sketchwalk"
    select_per: str = "layer"
    dense_layers: int = 2
    n_sink: int = 1
    n_local: int = 1
    dense_last_blocks: int = 1
    walk_damping: float = 0.25
    walk_steps: int = 1
    decode_query_window: int = 1
    hadamard_seed: int = 0
    budget_mode: str = "fixed"
    budget_fraction: float = 0.125
    budget_mass: float = 0.9
    budget_min_blocks: int = 0
    budget_max_blocks: int = 0
    window_fraction: float = 0.0
    sink_fraction: float = 0.0
    causal_scores: bool = True
    score_scale: str = "attention"
    walk_start: str = "identity"
    decode_walk: str = "chain"
    decode_window_scoring: str = "mean_query"
    decode_transition: str = "latest_row"
    pool_partial: str = "exact"
    key_sub_blocks: int = 1
    decode_keep_question: bool = False
    decode_rerank: int = 8
    preset: str = "none"

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> UsageError:
            return UsageError(f"--{name} {getattr(self, name)!r}: {allowed}")

        bs = self.block_size
        if not _is_int(bs) or bs < 16 or bs & (bs - 1):
            raise bad("block_size", "must be a power of two >= 16 (e.g. 16, 32, 64, 128)")
        for name, low in (("sketch_dim", 1), ("top_k_blocks", 1), ("walk_steps", 1), ("decode_query_window", 1),
                          ("n_local", 1), ("dense_layers", 0), ("n_sink", 0), ("dense_last_blocks", 0),
                          ("hadamard_seed", 0), ("budget_min_blocks", 0), ("budget_max_blocks", 0),
                          ("key_sub_blocks", 1), ("decode_rerank", 0)):
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                extra = " (the diagonal block is always kept)" if name == "n_local" else ""
                raise bad(name, f"must be an integer >= {low}{extra}")
        if not _is_number(self.sparsity_exponent) or self.sparsity_exponent <= 0:
            raise bad("sparsity_exponent", "must be a number > 0 (1 = no sharpening)")
        self.sparsity_exponent = float(self.sparsity_exponent)
        if not _is_number(self.walk_damping) or not 0.0 <= self.walk_damping <= 1.0:
            raise bad("walk_damping", "must be a number in [0, 1] (0 = one-hop, no walk)")
        self.walk_damping = float(self.walk_damping)
        for name, low_open, high in (("budget_fraction", True, 1.0), ("budget_mass", True, 1.0),
                                     ("window_fraction", False, 1.0), ("sink_fraction", False, 1.0)):
            v = getattr(self, name)
            ok = _is_number(v) and (v > 0 if low_open else v >= 0) and (v <= high if low_open else v < high)
            if not ok:
                raise bad(name, "must be a number in (0, 1]" if low_open else "must be a number in [0, 1) (0 = off)")
            setattr(self, name, float(v))
        if self.budget_max_blocks and self.budget_max_blocks < self.budget_min_blocks:
            raise bad("budget_max_blocks", f"must be 0 (no cap) or >= --budget_min_blocks {self.budget_min_blocks}")
        if self.decode_rerank == 1:
            raise bad("decode_rerank", "must be 0 (off) or an integer >= 2 (a shortlist of 1 x the budget is the "
                                       "budget itself)")
        sub = self.key_sub_blocks
        if sub & (sub - 1) or self.block_size // sub < 1 or self.block_size % sub:
            raise bad("key_sub_blocks", f"must be a power of two dividing --block_size {self.block_size}")
        for name in BOOL_KNOBS:
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"choose one of {', '.join(allowed)}")

    # ------------------------------------------------------------------------------------------
    @property
    def budget(self) -> int:
        """Blocks a sparse query-block row keeps: n_sink + n_local + top_k_blocks."""
        return self.n_sink + self.n_local + self.top_k_blocks

    def inactive_knob_reasons(self, head_dim: Optional[int] = None) -> Dict[str, str]:
        """{knob: why it has no effect} in this configuration (``head_dim`` makes the sketch_dim check exact)."""
        out: Dict[str, str] = {}
        walk_knobs = ("key_summary", "sparsity_exponent", "walk_damping", "walk_steps", "decode_query_window",
                      "sketch_dim", "hadamard_seed", "decode_rerank")
        if self.selector != "sketchwalk":
            for k in walk_knobs:
                out[k] = f"selector {self.selector} uses no sketch or walk"
            if self.selector == "local":
                out["select_per"] = "selector local picks the same blocks for every head"
            return out
        if self.key_summary == "minmax":
            out["sketch_dim"] = "key_summary minmax scores in head space (no SRHT)"
            out["hadamard_seed"] = "key_summary minmax uses no SRHT"
        elif head_dim is not None and self.sketch_dim >= head_dim:
            out["hadamard_seed"] = f"sketch_dim {self.sketch_dim} >= head dim {head_dim}: the SRHT is exact"
        if self.walk_damping == 0.0:
            out["walk_steps"] = "walk_damping 0 (one-hop): no walk"
            out["sparsity_exponent"] = "walk_damping 0: top-k of rownorm(A ** s) equals top-k of A"
        if self.key_summary == "minmax":
            out["score_scale"] = "key_summary minmax scores with the attention's scale"
        else:
            out["key_sub_blocks"] = "key_summary mean has no sub-block bounds"
        if self.walk_damping == 0.0:
            out["walk_start"] = "walk_damping 0 (one-hop): no walk"
            out["decode_walk"] = "walk_damping 0 (one-hop): no walk"
            out["decode_transition"] = "walk_damping 0 (one-hop): no transition kept for decode"
        for knob, modes in (("top_k_blocks", ("fixed",)), ("budget_fraction", ("fraction",)), ("budget_mass", ("mass",)),
                            ("budget_min_blocks", ("fraction", "mass")), ("budget_max_blocks", ("fraction", "mass"))):
            if self.budget_mode not in modes:
                out[knob] = f"budget_mode {self.budget_mode}"
        if self.budget_mode == "fixed":
            out["sink_fraction"] = "budget_mode fixed: the candidates are every block not kept anyway"
        if self.decode_query_window == 1:
            out["decode_window_scoring"] = "decode_query_window 1: one query"
        if self.skip_decode:
            for knob in ("decode_query_window", "decode_walk", "decode_window_scoring", "decode_transition",
                         "decode_keep_question", "decode_rerank"):
                out[knob] = "skip_decode: decode is dense"
        return out

    def inactive_knobs(self, head_dim: Optional[int] = None) -> List[str]:
        """Names of the knobs with no effect in this configuration (see :meth:`inactive_knob_reasons`)."""
        return list(self.inactive_knob_reasons(head_dim))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: Dict[str, Any], *, strict: bool = True) -> "SketchWalkConfig":
        """Build from a dict of knobs (a ``preset`` in it applies under the others); unknown keys raise (``strict``)
        or are ignored."""
        names = set(cls.field_names())
        unknown = sorted(set(d) - names)
        if unknown and strict:
            raise UsageError(f"unknown Sketch&Walk knob(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**_resolve(cls().to_dict(), {k: v for k, v in d.items() if k in names}))

    def replace(self, **changes: Any) -> "SketchWalkConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_namespace(cls, ns: Any, base: Optional["SketchWalkConfig"] = None) -> "SketchWalkConfig":
        """From argparse results made by :func:`add_arguments`: flags left at None keep ``base``'s value
        (``--preset`` applies over ``base`` and under the other flags)."""
        given = {name: getattr(ns, name) for name in cls.field_names() if getattr(ns, name, None) is not None}
        return cls(**_resolve((base or cls()).to_dict(), given))


def _resolve(base: Dict[str, Any], given: Dict[str, Any]) -> Dict[str, Any]:
    """``base`` <- the preset named in ``given`` (if any) <- ``given``.

    An explicit ``top_k_blocks`` without an explicit ``budget_mode`` means a fixed budget (the seed's commands pass
    --top_k_blocks; with --preset authors it replaces the preset's fractional budget).
    """
    cfg = dict(base)
    name = given.get("preset")
    if name is not None:
        if name not in PRESETS:
            raise UsageError(f"--preset {name!r}: choose one of {', '.join(PRESETS)}")
        cfg.update(PRESETS[name])
    cfg.update(given)
    if "top_k_blocks" in given and "budget_mode" not in given:
        cfg["budget_mode"] = "fixed"
    return cfg


def add_arguments(parser, defaults_none: bool = True) -> None:
    """Add one flag per knob (``--block_size`` ...) to an argparse parser.

    With ``defaults_none`` every flag defaults to None, so :meth:`SketchWalkConfig.from_namespace`
    can tell "not given" from "given" (a checkpoint's knobs then stay unless overridden).
    """
    defaults = SketchWalkConfig()
    for f in dataclasses.fields(SketchWalkConfig):
        default = getattr(defaults, f.name)
        help_ = f"{HELP[f.name]} (default {default})"
        if f.name in BOOL_KNOBS:
            # --no-skip_decode (etc.) turns off a checkpoint's or a preset's value from the command line
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                                default=None if defaults_none else default, help=help_)
            continue
        kw: Dict[str, Any] = {"default": None if defaults_none else default, "help": help_}
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        else:
            kw["type"] = float if isinstance(default, float) else int
        parser.add_argument(f"--{f.name}", **kw)
