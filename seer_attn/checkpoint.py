"""SeerAttn checkpoints: a folder with config.json and gates.safetensors, loaded strictly.

config.json = ``{"method": "seer_attn", "base_model": ..., <every SeerAttnConfig field>}``.
gates.safetensors holds ``layers.<i>.linear_k.weight`` (and ``layers.<i>.linear_q.weight`` when
the gate type needs W_q) for every gated layer i, in bf16 by default (fp32 on request); they are
used in fp32. Loading is strict: a missing or unexpected config field or tensor, or a tensor of
the wrong shape, is an error (UsageError), never silently ignored. A folder whose config says
"method": "sketch_walk", or a Hugging Face model folder, is rejected with a message that says so.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch

from sketch_walk.core.checkpoint import CONFIG_NAME, read_config_json
from sketch_walk.core.errors import UsageError

from .config import METHOD, SeerAttnConfig
from .gate import SeerAttnGates

WEIGHTS_NAME = "gates.safetensors"


def save_checkpoint(folder: str, gates: SeerAttnGates, cfg: Optional[SeerAttnConfig] = None,
                    dtype: torch.dtype = torch.bfloat16, extra_metadata: Optional[Dict[str, str]] = None) -> str:
    """Write config.json and gates.safetensors into ``folder`` (created); returns the folder."""
    from safetensors.torch import save_file

    cfg = cfg or gates.cfg
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in gates.state_dict().items()}
    meta = {"format": "pt", "method": METHOD, "base_model": cfg.base_model}
    meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata=meta)
    with open(os.path.join(folder, CONFIG_NAME), "w") as fh:
        json.dump(cfg.to_json(), fh, indent=2)
        fh.write("\n")
    return folder


def read_config(folder: str) -> SeerAttnConfig:
    """Strictly parse ``folder/config.json`` as a SeerAttn config."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isdir(folder):
        raise UsageError(f"SeerAttn checkpoint {folder} is not a folder: pass a folder with {CONFIG_NAME} and "
                         f"{WEIGHTS_NAME} (make one with python -m seer_attn.train_gates)")
    if not os.path.isfile(path):
        raise UsageError(f"SeerAttn checkpoint {folder} has no {CONFIG_NAME}")
    d = read_config_json(folder)
    if not isinstance(d, dict):
        raise UsageError(f"{path}: expected a JSON object")
    method = d.get("method")
    if method == "sketch_walk":
        raise UsageError(f"{folder} is a SketchWalk checkpoint (\"method\": \"sketch_walk\"), not SeerAttn gates")
    if method is None and ("model_type" in d or "architectures" in d):
        raise UsageError(f"{folder} is a Hugging Face model folder, not SeerAttn gates (its config.json has no "
                         f"\"method\": \"seer_attn\"); pass it as the base model and the gates folder separately")
    return SeerAttnConfig.from_dict(d, where=path)


def load_checkpoint(folder: str, map_location: str = "cpu") -> Tuple[SeerAttnConfig, SeerAttnGates]:
    """Load config and gates strictly; gates come back in fp32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = read_config(folder)
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise UsageError(f"SeerAttn checkpoint {folder} has no {WEIGHTS_NAME}")
    try:
        tensors = load_file(path, device=map_location)
    except (SafetensorError, OSError) as exc:
        raise UsageError(f"{path}: cannot read safetensors ({exc})") from exc
    gates = SeerAttnGates(cfg)
    expected = gates.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        raise UsageError(f"{path} does not match its config.json: " + "; ".join(parts))
    bad = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if tuple(tensors[k].shape) != tuple(v.shape)]
    if bad:
        raise UsageError(f"{path}: tensor shapes differ from config.json: {_short(bad)}")
    gates.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    # load_state_dict copies into the (CPU) parameters: move them to where the tensors were loaded
    return cfg, gates.to(map_location)


def _short(items, n: int = 6) -> str:
    items = list(items)
    return str(items[:n])[:-1] + (f", ... {len(items) - n} more]" if len(items) > n else "]")
