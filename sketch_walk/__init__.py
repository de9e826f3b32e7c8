"""Sketch&Walk sparse attention for transformers models (ICML 2026), the reference implementation.

Quick use::

    from sketch_walk import SketchWalkConfig, enable_sketch_walk
    session = enable_sketch_walk(model, SketchWalkConfig(top_k_blocks=16))
    session.reset(); model.generate(...); print(session.report()["overall"])

The package holds the shared sparse-attention core (:mod:`sketch_walk.core`: selector contract, attention
hook, block-sparse kernels, block summaries), which SeerAttention (``seer_attn``) uses too, and the Sketch&Walk
method beside it (config, sketch, walk, selection, :class:`SketchWalkSelector`, its selection kernels).
docs/ALGORITHM.md states the algorithm, docs/ARCHITECTURE.md the layout.

Names are imported on first use, so ``import sketch_walk.core`` (what SeerAttention does) loads no Sketch&Walk module.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "SketchWalkConfig": ".config",
    "SketchWalkSelector": ".selector",
    "enable_sketch_walk": ".selector",
    "ATTN_NAME": ".core",
    "BlockSelector": ".core",
    "SparseAttentionSession": ".core",
    "UsageError": ".core",
    "enable_sparse_attention": ".core",
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sketch_walk' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


__all__ = list(_EXPORTS)
