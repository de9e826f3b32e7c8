"""SeerAttnConfig: every field of a SeerAttention gate checkpoint and its selection knobs.

A checkpoint's config.json is ``{"method": "seer_attn", **SeerAttnConfig.to_dict()}``. Fields
fall in three groups:

* model geometry, checked against the model at load time: ``base_model`` (alias, local path or
  hub name the gates were trained for), ``num_layers``, ``num_q_heads``, ``num_kv_heads``,
  ``head_dim``, ``gated_layers`` (the layer indices that carry a gate: every full-attention
  layer; SeerAttention gates every layer of a Llama);
* the gate: ``gate_type`` ("Qavg_Kmaxminavg" as published for Llama: q pooled by average, k by
  max, min and average), ``block_size`` (64), ``gate_hidden`` (h_g; 64 for the default model);
* selection knobs (overridable at load): ``sparsity_method`` ("threshold" or "nz_ratio"),
  ``threshold`` (default 5e-4, what the authors use for RULER), ``nz_ratio`` (target density
  of the top-k mode), ``last_block_dense`` (dense last query-block rows, default off; the
  reference makes the last 2 rows dense when on), ``keep_diagonal`` (see below) and
  ``dense_decode`` (the published method: decode stays dense).

``keep_diagonal`` (default True): the diagonal block of every query-block row (the current
block in decode) is always kept. The reference keeps only what passes the threshold; a row that
keeps nothing then makes its block-sparse kernel return NaN (softmax over an empty set).
With keep_diagonal=False the diagonal is still added to a row that would be empty, so no row is
ever empty; with True (default) it is added to every row, as the Sketch&Walk selector and
SeerAttention-R's decode gate (which always keeps the last block) do. At threshold 5e-4 the
gate keeps the diagonal on its own in nearly every row, so the two differ little; the training
evaluation reports how often.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Dict, List, Optional

from sketch_walk.core.errors import UsageError

POOL_TYPES = ("max", "min", "avg")
SPARSITY_METHODS = ("threshold", "nz_ratio")
METHOD = "seer_attn"


def parse_gate_type(gate_type: str):
    """'Qavg_Kmaxminavg' -> (['avg'], ['max', 'min', 'avg']). Pools are max, min, avg, each at most once."""
    m = re.fullmatch(r"Q((?:max|min|avg)+)_K((?:max|min|avg)+)", gate_type or "")
    if not m:
        raise UsageError(f"gate_type {gate_type!r}: expected Q<pools>_K<pools> with pools from max, min, avg "
                         f"(e.g. Qavg_Kmaxminavg)")
    q = re.findall(r"max|min|avg", m.group(1))
    k = re.findall(r"max|min|avg", m.group(2))
    if len(set(q)) != len(q) or len(set(k)) != len(k):
        raise UsageError(f"gate_type {gate_type!r}: a pool appears twice")
    return q, k


@dataclasses.dataclass
class SeerAttnConfig:
    base_model: str = "smollm2"
    num_layers: int = 30
    num_q_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    gated_layers: Optional[List[int]] = None      # None: every layer
    gate_type: str = "Qavg_Kmaxminavg"
    block_size: int = 64
    gate_hidden: int = 64
    sparsity_method: str = "threshold"
    threshold: float = 5e-4
    nz_ratio: Optional[float] = None
    last_block_dense: bool = False
    keep_diagonal: bool = True
    dense_decode: bool = False

    def __post_init__(self):
        if self.gated_layers is None:
            self.gated_layers = list(range(self.num_layers))
        self.gated_layers = [int(i) for i in self.gated_layers]
        self.validate()

    # -- checks --------------------------------------------------------------------------------
    def validate(self) -> None:
        parse_gate_type(self.gate_type)
        bs = self.block_size
        if not isinstance(bs, int) or bs < 16 or bs & (bs - 1):
            raise UsageError(f"block_size {bs}: must be a power of two >= 16")
        for name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "gate_hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise UsageError(f"{name} {v!r}: must be a positive integer")
        if self.num_q_heads % self.num_kv_heads:
            raise UsageError(f"num_q_heads {self.num_q_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if not self.gated_layers or any(i < 0 or i >= self.num_layers for i in self.gated_layers) \
                or len(set(self.gated_layers)) != len(self.gated_layers):
            raise UsageError(f"gated_layers {self.gated_layers}: distinct layer indices in [0, {self.num_layers})")
        if self.sparsity_method not in SPARSITY_METHODS:
            raise UsageError(f"sparsity_method {self.sparsity_method!r}: choose one of {', '.join(SPARSITY_METHODS)}")
        if not (0.0 <= float(self.threshold) < 1.0):
            raise UsageError(f"threshold {self.threshold}: must be in [0, 1)")
        if self.sparsity_method == "nz_ratio":
            if self.nz_ratio is None or not (0.0 < float(self.nz_ratio) <= 1.0):
                raise UsageError(f"nz_ratio {self.nz_ratio}: must be in (0, 1] when sparsity_method is nz_ratio")
        elif self.nz_ratio is not None and not (0.0 < float(self.nz_ratio) <= 1.0):
            raise UsageError(f"nz_ratio {self.nz_ratio}: must be in (0, 1]")

    @property
    def q_pools(self) -> List[str]:
        return parse_gate_type(self.gate_type)[0]

    @property
    def k_pools(self) -> List[str]:
        return parse_gate_type(self.gate_type)[1]

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    # -- knobs ---------------------------------------------------------------------------------
    def with_knobs(self, threshold: Optional[float] = None, nz_ratio: Optional[float] = None,
                   dense_decode: Optional[bool] = None, last_block_dense: Optional[bool] = None,
                   keep_diagonal: Optional[bool] = None) -> "SeerAttnConfig":
        """A copy with selection knobs overridden (None keeps the checkpoint's value).

        nz_ratio given -> top-k mode; threshold given (and no nz_ratio) -> threshold mode.
        """
        if threshold is not None and nz_ratio is not None:
            raise UsageError("give --threshold or --nz_ratio, not both")
        d = self.to_dict()
        if nz_ratio is not None:
            d.update(sparsity_method="nz_ratio", nz_ratio=float(nz_ratio))
        elif threshold is not None:
            d.update(sparsity_method="threshold", threshold=float(threshold))
        if dense_decode is not None:
            d["dense_decode"] = bool(dense_decode)
        if last_block_dense is not None:
            d["last_block_dense"] = bool(last_block_dense)
        if keep_diagonal is not None:
            d["keep_diagonal"] = bool(keep_diagonal)
        return SeerAttnConfig(**d)

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> Dict[str, Any]:
        return {"method": METHOD, **self.to_dict()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any], *, where: str = "config") -> "SeerAttnConfig":
        """Strict: every field must be present and no other key (besides "method") allowed."""
        d = dict(d)
        method = d.pop("method", None)
        if method != METHOD:
            raise UsageError(f"{where}: \"method\" is {method!r}, expected \"{METHOD}\"")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(d))
        unexpected = sorted(set(d) - names)
        if missing or unexpected:
            raise UsageError(f"{where}: " + "; ".join(
                x for x in (f"missing fields {missing}" if missing else "",
                            f"unexpected fields {unexpected}" if unexpected else "") if x))
        try:
            return cls(**d)
        except TypeError as exc:
            raise UsageError(f"{where}: {exc}") from exc

    @classmethod
    def for_model(cls, model, base_model: str, **kw) -> "SeerAttnConfig":
        """Geometry from a transformers model config; gates on every full-attention layer."""
        c = model.config
        c = getattr(c, "text_config", None) or c
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        n_layers = c.num_hidden_layers
        layer_types = getattr(c, "layer_types", None)
        gated = [i for i in range(n_layers) if not layer_types or layer_types[i] == "full_attention"]
        return cls(base_model=base_model, num_layers=n_layers, num_q_heads=c.num_attention_heads,
                   num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                   head_dim=head_dim, gated_layers=gated, **kw)

    def check_model(self, model) -> None:
        """Raise UsageError when ``model``'s geometry differs from the gates'."""
        other = SeerAttnConfig.for_model(model, self.base_model)
        diffs = [f"{k}: gates {getattr(self, k)} vs model {getattr(other, k)}"
                 for k in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim")
                 if getattr(self, k) != getattr(other, k)]
        bad = [i for i in self.gated_layers if i not in other.gated_layers]
        if bad:
            diffs.append(f"gated_layers {bad} are not full-attention layers of the model")
        if diffs:
            raise UsageError(f"SeerAttn gates (base_model {self.base_model!r}) do not fit this model: " + "; ".join(diffs))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)
