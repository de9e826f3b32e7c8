"""What every benchmark's results JSON starts with and how it is written (benchmarks/*.py share it).

header(): GPU, versions, command, date, the code's commit. results_path(): benchmarks/results/<name>_<gpu>.json
unless --out names a file. write_json(): whole or not at all (a temporary file, then a rename), so a run killed
while writing never leaves a truncated JSON where the last good one was.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
from typing import Optional

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def code_state() -> dict:
    """The commit the repository is at and the files of the measured packages that differ from it (the code a
    result belongs to); {} where git cannot tell."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "sketch_walk", "seer_attn", "eval",
                                  "benchmarks"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": commit, "uncommitted": [line[3:] for line in changed]}


def header(**extra) -> dict:
    """{gpu, torch, triton, cuda, python, command, date, code} plus ``extra`` (e.g. transformers' version)."""
    import triton
    res = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
           "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "code": code_state()}
    res.update(extra)
    return res


def results_path(name: str, gpu: str, out: Optional[str] = None) -> str:
    """``out`` if given, else benchmarks/results/<name>_<gpu name, non-alphanumerics as _>.json."""
    path = out or os.path.join(RESULTS, "%s_%s.json" % (name, re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_")))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def write_json(res: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)
