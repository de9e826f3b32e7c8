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
    dense_last_blocks: int = 0
    walk_damping: float = 0.25
    walk_steps: int = 1
    decode_query_window: int = 1
    hadamard_seed: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> UsageError:
            return UsageError(f"--{name} {getattr(self, name)!r}: {allowed}")

        bs = self.block_size
        if not _is_int(bs) or bs < 16 or bs & (bs - 1):
            raise bad("block_size", "must be a power of two >= 16 (e.g. 16, 32, 64, 128)")
        for name, low in (("sketch_dim", 1), ("top_k_blocks", 1), ("walk_steps", 1), ("decode_query_window", 1),
                          ("n_local", 1), ("dense_layers", 0), ("n_sink", 0), ("dense_last_blocks", 0),
                          ("hadamard_seed", 0)):
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
        if not isinstance(self.skip_decode, bool):
            raise bad("skip_decode", "must be true or false")
        for name, allowed in (("key_summary", KEY_SUMMARIES), ("selector", SELECTORS), ("select_per", SELECT_PER)):
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
                      "sketch_dim", "hadamard_seed")
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
        if self.skip_decode:
            out["decode_query_window"] = "skip_decode: decode is dense"
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
        """Build from a dict of knobs; unknown keys raise (``strict``) or are ignored."""
        names = set(cls.field_names())
        unknown = sorted(set(d) - names)
        if unknown and strict:
            raise UsageError(f"unknown Sketch&Walk knob(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes: Any) -> "SketchWalkConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_namespace(cls, ns: Any, base: Optional["SketchWalkConfig"] = None) -> "SketchWalkConfig":
        """From argparse results made by :func:`add_arguments`: flags left at None keep ``base``'s value."""
        cfg = dict((base or cls()).to_dict())
        for name in cls.field_names():
            v = getattr(ns, name, None)
            if v is not None:
                cfg[name] = v
        return cls(**cfg)


def add_arguments(parser, defaults_none: bool = True) -> None:
    """Add one flag per knob (``--block_size`` ...) to an argparse parser.

    With ``defaults_none`` every flag defaults to None, so :meth:`SketchWalkConfig.from_namespace`
    can tell "not given" from "given" (a checkpoint's knobs then stay unless overridden).
    """
    defaults = SketchWalkConfig()
    for f in dataclasses.fields(SketchWalkConfig):
        default = getattr(defaults, f.name)
        help_ = f"{HELP[f.name]} (default {default})"
        if f.name == "skip_decode":
            # --no-skip_decode turns off a checkpoint's skip_decode from the command line
            parser.add_argument("--skip_decode", action=argparse.BooleanOptionalAction,
                                default=None if defaults_none else False, help=help_)
            continue
        kw: Dict[str, Any] = {"default": None if defaults_none else default, "help": help_}
        if f.name == "key_summary":
            kw["choices"] = KEY_SUMMARIES
        elif f.name == "selector":
            kw["choices"] = SELECTORS
        elif f.name == "select_per":
            kw["choices"] = SELECT_PER
        else:
            kw["type"] = float if isinstance(default, float) else int
        parser.add_argument(f"--{f.name}", **kw)
