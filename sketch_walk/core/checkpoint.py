"""Method checkpoint folders: a ``config.json`` whose ``"method"`` names the method, with its knobs and base
model, and for trained methods the weights beside it. Each method validates its own config
(:mod:`sketch_walk.checkpoint`, :mod:`seer_attn.checkpoint`); this reads the file for all of them.
"""
from __future__ import annotations

import json
import os
from typing import Any

from .errors import UsageError

CONFIG_NAME = "config.json"


def read_config_json(folder: str) -> Any:
    """The parsed ``folder/config.json``; None when ``folder`` is not a folder or has no config.json.

    A config.json that is not valid JSON is a :class:`UsageError` naming the file.
    """
    folder = os.path.expanduser(folder)
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isdir(folder) or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from exc
