"""SeerAttention baseline: learned AttnGates on the shared block-sparse attention hook.

Public API::

    from seer_attn import SeerAttnConfig, AttnGate, enable_seer_attn
    session = enable_seer_attn(model, "seer_attn/checkpoints/smollm2", threshold=5e-4)
    ... model.generate(...) ...;  session.report();  session.reset()

docs/ALGORITHM.md ("SeerAttention gate") states the method: gates per layer (seer_attn.gate), masks and
sparse decode (seer_attn.selector), strict checkpoints (seer_attn.checkpoint) and distillation
(``python -m seer_attn.train_gates``).
"""
from __future__ import annotations

import os
from typing import Optional, Union

from .config import SeerAttnConfig
from .gate import AttnGate, SeerAttnGates

__all__ = ["SeerAttnConfig", "AttnGate", "SeerAttnGates", "enable_seer_attn", "load_checkpoint",
           "save_checkpoint", "SeerAttnSelector", "DEFAULT_CHECKPOINT"]

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "smollm2")


def load_checkpoint(folder: str, map_location: str = "cpu"):
    from .checkpoint import load_checkpoint as _load
    return _load(folder, map_location)


def save_checkpoint(folder: str, gates: SeerAttnGates, cfg: Optional[SeerAttnConfig] = None, **kw):
    from .checkpoint import save_checkpoint as _save
    return _save(folder, gates, cfg, **kw)


def __getattr__(name):
    if name == "SeerAttnSelector":
        from .selector import SeerAttnSelector
        return SeerAttnSelector
    raise AttributeError(name)


def enable_seer_attn(model, checkpoint_dir_or_config: Union[str, os.PathLike, SeerAttnConfig, SeerAttnGates],
                     threshold: Optional[float] = None, nz_ratio: Optional[float] = None,
                     dense_decode: bool = False, backend: Optional[str] = None):
    """Run ``model`` with SeerAttention block selection through the shared sparse-attention hook.

    ``checkpoint_dir_or_config``: a checkpoint folder (strict load), a :class:`SeerAttnGates`
    (its own config), or a :class:`SeerAttnConfig` (freshly initialised, untrained gates: for
    tests). ``threshold`` / ``nz_ratio`` override the checkpoint's selection (at most one);
    ``dense_decode=True`` is the published prefill-only method (decode dense, labelled so in
    ``describe()``); the default is sparse decode by the gate. ``backend`` is the kernel backend
    of :mod:`sketch_walk.core.block_sparse` ('auto', 'triton', 'torch'). Returns the hook's
    SparseAttentionSession (``reset()``, ``report()``, ``describe()``); ``session.selector`` is
    the :class:`~seer_attn.selector.SeerAttnSelector`.
    """
    from sketch_walk.core.hook import enable_sparse_attention

    from .selector import SeerAttnSelector

    source = None
    if isinstance(checkpoint_dir_or_config, SeerAttnGates):
        cfg, gates = checkpoint_dir_or_config.cfg, checkpoint_dir_or_config
    elif isinstance(checkpoint_dir_or_config, SeerAttnConfig):
        cfg = checkpoint_dir_or_config
        gates = SeerAttnGates(cfg)
    else:
        source = os.fspath(checkpoint_dir_or_config)
        cfg, gates = load_checkpoint(source)
    cfg = cfg.with_knobs(threshold=threshold, nz_ratio=nz_ratio, dense_decode=dense_decode)
    selector = SeerAttnSelector(cfg, gates, checkpoint=source)
    return enable_sparse_attention(model, selector, skip_decode=cfg.dense_decode, backend=backend)
