"""Sketch&Walk sparse attention for transformers models (ICML 2026), the reference implementation.

Quick use::

    from sketch_walk import SketchWalkConfig, enable_sketch_walk
    session = enable_sketch_walk(model, SketchWalkConfig(top_k_blocks=16))
    session.reset(); model.generate(...); print(session.report()["overall"])

See shared/design/ALGORITHM.md for the algorithm and :mod:`sketch_walk.hook` for the integration.
"""
from __future__ import annotations

from typing import Optional

from .config import SketchWalkConfig
from .errors import UsageError
from .hook import ATTN_NAME, SparseAttentionSession, enable_sparse_attention
from .selector import BlockSelector
from .sketch_walk_selector import SketchWalkSelector


def enable_sketch_walk(model, config: Optional[SketchWalkConfig] = None, backend: Optional[str] = None
                       ) -> SparseAttentionSession:
    """Run ``model`` with Sketch&Walk (or its oracle / local controls, ``config.selector``); returns the session.

    ``config`` may be a :class:`SketchWalkConfig` or a dict of its knobs (default: every default).
    ``backend``: None / "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
    """
    if config is None:
        config = SketchWalkConfig()
    elif isinstance(config, dict):
        config = SketchWalkConfig.from_dict(config)
    elif not isinstance(config, SketchWalkConfig):
        raise UsageError(f"config must be a SketchWalkConfig or a dict of its knobs, got {type(config).__name__}")
    return enable_sparse_attention(model, SketchWalkSelector(config), skip_decode=config.skip_decode,
                                   backend=backend)


__all__ = ["SketchWalkConfig", "SketchWalkSelector", "enable_sketch_walk", "enable_sparse_attention",
           "SparseAttentionSession", "BlockSelector", "UsageError", "ATTN_NAME"]
