"""SketchWalk checkpoints: a folder with one config.json naming the base model and every knob.

Sketch&Walk is training-free, so a "checkpoint" is configuration only::

    {"method": "sketch_walk", "base_model": "smollm2", "block_size": 64, "sketch_dim": 64, ...}

``python -m sketch_walk.checkpoint --output ./checkpoints/sketchwalk_llama --base_model smollm2
[--block_size 64 --top_k_blocks 16 ...]`` writes one (the seed's ``--model_path`` folder).
:func:`read_checkpoint` recognises both methods' folders ("sketch_walk" and "seer_attn") and returns
None for anything else (a Hugging Face model folder, for instance), so callers can tell a checkpoint
from a model.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any, Dict, Optional

from .config import SketchWalkConfig, add_arguments
from .errors import UsageError, cli_main

CONFIG_NAME = "config.json"
METHODS = ("sketch_walk", "seer_attn")


def read_checkpoint(path: str) -> Optional[Dict[str, Any]]:
    """The config.json of a checkpoint folder (a dict with "method" in {sketch_walk, seer_attn}), or None.

    None when ``path`` is not a folder, has no config.json, or its config.json names no such method
    (e.g. a Hugging Face model folder). A config.json that is not valid JSON is a :class:`UsageError`.
    For "sketch_walk" the knobs are validated (unknown knobs and bad values raise UsageError).
    """
    path = os.path.expanduser(path)
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isdir(path) or not os.path.isfile(cfg_path):
        return None
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("method") not in METHODS:
        return None
    if data["method"] == "sketch_walk":
        knobs = {k: v for k, v in data.items() if k in SketchWalkConfig.field_names()}
        try:
            SketchWalkConfig.from_dict(knobs)
        except UsageError as exc:
            raise UsageError(f"{cfg_path}: {exc}") from None
    return data


def checkpoint_config(data: Dict[str, Any]) -> SketchWalkConfig:
    """The :class:`SketchWalkConfig` of a SketchWalk checkpoint dict (other keys ignored)."""
    if data.get("method") != "sketch_walk":
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
    data: Dict[str, Any] = {"method": "sketch_walk", "base_model": base_model}
    data.update(config.to_dict())
    data["inactive_knobs"] = config.inactive_knobs()
    data["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    tmp = existing + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, existing)
    return existing


@cli_main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sketch_walk.checkpoint",
                                     description="Write a SketchWalk checkpoint folder (config.json: base model "
                                                 "and every Sketch&Walk knob).")
    parser.add_argument("--output", required=True, help="checkpoint folder to write (created)")
    parser.add_argument("--base_model", default="smollm2",
                        help="base model: alias smollm2, a .gguf file, a model folder or a hub name (default smollm2)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    config = SketchWalkConfig.from_namespace(args)
    path = write_sketchwalk_checkpoint(args.output, args.base_model, config)
    print(f"wrote {path} (base_model {args.base_model}; "
          + ", ".join(f"{k} {v}" for k, v in config.to_dict().items()) + ")")


if __name__ == "__main__":
    main(sys.argv[1:])
