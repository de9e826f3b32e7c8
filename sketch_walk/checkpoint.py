"""SketchWalk checkpoints: a folder with one config.json naming the base model and every knob.

Sketch&Walk is training-free, so a "checkpoint" is configuration only::

    {"method": "sketch_walk", "base_model": "smollm2", "block_size": 64, "sketch_dim": 64, ...}

``python -m sketch_walk.checkpoint --output ./checkpoints/sketchwalk_llama --base_model smollm2
[--block_size 64 --top_k_blocks 16 ...]`` writes one (the seed's ``--model_path`` folder; the command is the
harness's, eval/ruler/make_checkpoint.py, run by this name). :func:`read_checkpoint` returns a SketchWalk
checkpoint's config and None for anything else (another method's checkpoint, a Hugging Face model folder), so
callers can tell a checkpoint from a model; the harness's registry tells every method's checkpoints apart.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any, Dict, Optional

from .config import SketchWalkConfig
from .core.checkpoint import CONFIG_NAME, read_config_json
from .core.errors import UsageError

METHOD = "sketch_walk"


def read_checkpoint(path: str) -> Optional[Dict[str, Any]]:
    """The config.json of a SketchWalk checkpoint folder (``"method": "sketch_walk"``), or None.

    None when ``path`` is not a folder, has no config.json, or its config.json names another method or
    none (e.g. a Hugging Face model folder). A config.json that is not valid JSON is a :class:`UsageError`;
    so are unknown knobs and bad values.
    """
    data = read_config_json(path)
    if not isinstance(data, dict) or data.get("method") != METHOD:
        return None
    cfg_path = os.path.join(os.path.expanduser(path), CONFIG_NAME)
    knobs = {k: v for k, v in data.items() if k in SketchWalkConfig.field_names()}
    try:
        SketchWalkConfig.from_dict(knobs)
    except UsageError as exc:
        raise UsageError(f"{cfg_path}: {exc}") from None
    return data


def checkpoint_config(data: Dict[str, Any]) -> SketchWalkConfig:
    """The :class:`SketchWalkConfig` of a SketchWalk checkpoint dict (other keys ignored)."""
    if data.get("method") != METHOD:
        raise UsageError(f"not a SketchWalk checkpoint (method {data.get('method')!r})")
    return SketchWalkConfig.from_dict({k: v for k, v in data.items() if k in SketchWalkConfig.field_names()})


def write_sketchwalk_checkpoint(output: str, base_model: str, config: Optional[SketchWalkConfig] = None) -> str:
    """Write ``output/config.json`` (folder created): method, base_model, every knob. Returns its path."""
    if not base_model:
        raise UsageError("--base_model is required: the model the checkpoint runs (e.g. smollm2 or a model folder)")
    config = config or SketchWalkConfig()
    output = os.path.expanduser(output)
    if os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f"--output {output} exists and is not a folder")
    existing = os.path.join(output, CONFIG_NAME)
    if os.path.isfile(existing) and read_checkpoint(output) is None:
        raise UsageError(f"--output {output} already holds a config.json that is not a SketchWalk checkpoint "
                         f"(a model folder?); choose another folder")
    os.makedirs(output, exist_ok=True)
    data: Dict[str, Any] = {"method": METHOD, "base_model": base_model}
    data.update(config.to_dict())
    data["inactive_knobs"] = config.inactive_knobs()
    data["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    tmp = existing + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, existing)
    return existing


if __name__ == "__main__":
    from eval.ruler.make_checkpoint import main

    main()
