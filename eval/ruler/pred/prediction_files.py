"""What a RULER prediction file is, in one place: its name, a sample's key, and how JSON files are written.

* ``{task}.jsonl``, or ``{task}-{chunk}.jsonl`` for one chunk of a split run (call_api.py ``--chunk_idx``,
  torchrun ranks): :data:`CHUNK_RE` matches the second form (RULER's evaluate.py rule: the task name does not
  end in ``_``).
* A sample is keyed by (index, sha256 of its prompt): the prompt is a data sample's ``input`` plus its
  ``answer_prefix`` (:func:`prompt_of`), which a prediction record stores as its ``input``. Keys form a
  multiset: a data set may repeat a sample (upstream generators can repeat niah's index).
* :func:`write_json_atomic`: written beside its name, flushed, then renamed, so a killed run leaves the
  previous file whole.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict

CHUNK_RE = re.compile(r"^(?P<task>.*[^_])-(?P<chunk>\d+)\.jsonl$")


def input_sha(text: str) -> str:
    """sha256 (hex) of a prompt: the second half of a sample's key."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_of(sample: Dict[str, Any]) -> str:
    """The text given to the model for a data sample: its input and answer prefix."""
    return sample["input"] + (sample.get("answer_prefix") or "")


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, whole or not at all (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
