"""The built-in methods as the harness sees them: dense ``hf``, ``SketchWalk`` and ``SeerAttn``.

Each is a :class:`Server` (registered in eval/ruler/pred/registry.py). The method code itself lives in its
package (``sketch_walk``, ``seer_attn``): this module only says how the harness resolves its knobs, reads its
checkpoints and switches it on in a loaded model. The method packages are imported inside the functions that
use them; only SketchWalk's flag names (its config's fields) are read when this module loads.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple


def _no_knobs(args: argparse.Namespace, ckpt: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class Server:
    """What the harness needs of one method.

    * ``server_type``: the ``--server_type`` value (matched ignoring case, ``_`` and ``-``); ``method``: the name
      written into every record's ``others.method`` and, for methods with checkpoints, the ``"method"`` of a
      checkpoint folder's config.json (``checkpoint``); ``help``: one line for ``--help``.
    * ``add_flags(group)`` adds the method's own flags to an argparse group; ``flags`` are their dest names
      (given to another server type they are ignored with a warning).
    * ``knobs(args, checkpoint_config)`` resolves the method's settings from defaults, a checkpoint's config and
      the flags (raising :class:`UsageError` on a bad value); ``knobs_dict(knobs)`` is what the run manifest
      records (resuming with other knobs is refused); ``inactive_knobs(knobs)`` lists knobs without effect.
    * ``check_checkpoint(folder)`` validates a checkpoint folder of this method (UsageError naming the file);
      ``needs_checkpoint``: the model argument must be such a folder (trained weights); ``model_hint`` is added
      to a "model does not exist" error.
    * ``enable(model, knobs, checkpoint_folder, backend)`` switches a loaded transformers model to the method and
      returns the sparse-attention session (None: dense, the model runs as loaded).
    * ``preflight()`` checks the environment before any model loads.
    """

    server_type: str
    method: str
    help: str
    add_flags: Optional[Callable[[Any], None]] = None
    flags: Tuple[str, ...] = ()
    knobs: Callable[[argparse.Namespace, Optional[Dict[str, Any]]], Any] = _no_knobs
    knobs_dict: Callable[[Any], Dict[str, Any]] = dict
    inactive_knobs: Callable[[Any], Dict[str, str]] = lambda knobs: {}
    checkpoint: Optional[str] = None
    check_checkpoint: Optional[Callable[[str], Any]] = None
    needs_checkpoint: bool = False
    model_hint: str = ""
    enable: Optional[Callable[..., Any]] = None
    preflight: Callable[[], None] = lambda: None

    @property
    def sparse(self) -> bool:
        """Whether the method runs through the shared sparse-attention hook (density, --attn_backend)."""
        return self.enable is not None

    def make_wrapper(self, model_name: str, knobs: Any, checkpoint: Optional[str], backend: str, **generation):
        """The prediction wrapper (eval/ruler/pred/model_wrappers.py) with the method switched on; loads the model."""
        from eval.ruler.pred import model_wrappers as mw

        if self.enable is None:
            return mw.HuggingFaceModel(model_name, **generation)
        enable = self.enable
        return mw.SparseAttentionModel(model_name, method=self.method,
                                       enable=lambda model: enable(model, knobs, checkpoint, backend), **generation)


# --------------------------------------------------------------------------------------------- hf (dense)
DENSE = Server(server_type="hf", method="dense",
               help="dense attention (transformers' SDPA): the baseline")


# --------------------------------------------------------------------------------------------- SketchWalk
def _sketch_walk_flags(group) -> None:
    from sketch_walk.config import add_arguments

    add_arguments(group, defaults_none=True)


def _sketch_walk_knobs(args: argparse.Namespace, ckpt: Optional[Dict[str, Any]]):
    """SketchWalkConfig from defaults <- checkpoint knobs <- explicit flags (validated by the config)."""
    from sketch_walk.config import SketchWalkConfig

    knobs: Dict[str, Any] = {}
    if ckpt:
        for source in (ckpt, ckpt.get("config"), ckpt.get("knobs")):
            if isinstance(source, dict):
                knobs.update(source)
    base = SketchWalkConfig.from_dict(knobs, strict=False)
    return SketchWalkConfig.from_namespace(args, base=base)


def _sketch_walk_checkpoint(folder: str) -> None:
    from sketch_walk.checkpoint import read_checkpoint

    read_checkpoint(folder)


def _sketch_walk_enable(model, config, checkpoint: Optional[str], backend: str):
    from sketch_walk import enable_sketch_walk

    return enable_sketch_walk(model, config, backend=backend)


def _sketch_walk_preflight() -> None:
    from sketch_walk.kernels.block_transition import dot_precision

    dot_precision()          # SKETCH_WALK_DOT_PRECISION checked now, not after the model has loaded


def _sketch_walk_flag_names() -> Tuple[str, ...]:
    from sketch_walk.config import SketchWalkConfig

    return tuple(SketchWalkConfig.field_names())


SKETCH_WALK = Server(
    server_type="SketchWalk", method="sketch_walk",
    help="Sketch&Walk block selection (training-free); --selector oracle / local for the ceiling and the floor",
    add_flags=_sketch_walk_flags, flags=_sketch_walk_flag_names(), knobs=_sketch_walk_knobs,
    knobs_dict=lambda config: dataclasses.asdict(config),
    inactive_knobs=lambda config: config.inactive_knob_reasons(),
    checkpoint="sketch_walk", check_checkpoint=_sketch_walk_checkpoint,
    model_hint="for a SketchWalk checkpoint folder, make one with: python -m sketch_walk.checkpoint "
               "--output ./checkpoints/sketchwalk_llama --base_model smollm2",
    enable=_sketch_walk_enable, preflight=_sketch_walk_preflight)


# --------------------------------------------------------------------------------------------- SeerAttn
def _seer_attn_flags(group) -> None:
    group.add_argument("--threshold", type=float, default=None, help="gate threshold (SeerAttention fork)")
    group.add_argument("--nz_ratio", type=float, default=None, help="kept-block ratio instead of a threshold")


def _seer_attn_knobs(args: argparse.Namespace, ckpt: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The flags as given (None: the checkpoint's own value, applied when the gates load)."""
    return {"threshold": args.threshold, "nz_ratio": args.nz_ratio}


def _seer_attn_checkpoint(folder: str) -> None:
    from seer_attn.checkpoint import read_config

    read_config(folder)


def _seer_attn_enable(model, knobs: Dict[str, Any], checkpoint: Optional[str], backend: str):
    from seer_attn import enable_seer_attn

    given = {k: v for k, v in knobs.items() if v is not None}
    return enable_seer_attn(model, checkpoint, dense_decode=False, backend=backend, **given)


SEER_ATTN = Server(
    server_type="SeerAttn", method="seer_attn",
    help="SeerAttention's learned gates (trained): --model_name_or_path is a gates checkpoint folder",
    add_flags=_seer_attn_flags, flags=("threshold", "nz_ratio"), knobs=_seer_attn_knobs,
    checkpoint="seer_attn", check_checkpoint=_seer_attn_checkpoint, needs_checkpoint=True,
    enable=_seer_attn_enable)
