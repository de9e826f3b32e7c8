"""What a RULER prediction file is, in one place: its name, a sample's key, and how JSON files are written.

* ``{task}.jsonl``, or ``{task}-{chunk}.jsonl`` for one chunk of a split run (call_api.py ``--chunk_idx``,
  torchrun ranks): :data:`CHUNK_RE` matches the second form (RULER's evaluate.py rule: the task name does not
  end in ``_``).
* A sample is keyed by (index, sha256 of its prompt): the prompt is a data sample's ``input`` plus its
  ``answer_prefix`` (:func:`prompt_of`), which a prediction record stores as its ``input``. Keys form a
  multiset: a data set may repeat a sample (upstream generators can repeat niah's index).
* :func:`write_json_atomic`: written beside its name, flushed, then renamed, so a killed run leaves the
  previous file whole.
* One writer per prediction file (:func:`lock_for_writing`, an flock beside it), and no sample counted twice:
  :func:`check_no_extra_copies` compares a file's keys with its data file's (:func:`data_file_of` finds it
  through call_api.py's manifest or RULER run.sh's ``{length}/{data,pred}`` layout).
* prepare.py's record of how a data file was made (max_seq_length, tokenizer, seed), beside it:
  :func:`data_settings_path`, :func:`read_data_settings`.
"""
from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from eval.ruler.cli import UsageError, warn
from eval.ruler.model_loader import sha256_file

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


# --------------------------------------------------------------------------------------------- sample keys
def sample_key(index: Any, prompt: str) -> Tuple[Any, str]:
    """A sample's key: (index, sha256 of its prompt). A data sample's prompt is :func:`prompt_of` it, a
    prediction record's is its ``input``."""
    return index, input_sha(prompt)


def data_keys(data_file: Path) -> collections.Counter:
    """The multiset of sample keys of a data file (lines that are not data records are left to the reader
    that needs them whole: call_api.py's load_samples names them)."""
    keys: collections.Counter = collections.Counter()
    with open(data_file, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
                keys[sample_key(sample.get("index", lineno), prompt_of(sample))] += 1
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                continue
    return keys


def manifest_path(pred_file: Path) -> Path:
    """call_api.py's manifest of a prediction file: manifest-{task}.json or manifest-{task}-{chunk}.json."""
    pred_file = Path(pred_file)
    return pred_file.with_name(f"manifest-{pred_file.stem}.json")


def data_file_of(pred_file: Path) -> Optional[Path]:
    """The data file a prediction file was made from, or None when nothing says.

    Asked in order: the ``data.file`` that call_api.py records in the file's manifest (for evaluate.py's
    merged ``{task}.jsonl``, that of its chunk manifests), then RULER run.sh's layout, where predictions
    sit in ``{length}/pred/`` beside ``{length}/data/{task}/{subset}.jsonl``.
    """
    pred_file = Path(pred_file)
    m = CHUNK_RE.match(pred_file.name)
    task = m.group("task") if m else pred_file.stem
    manifests = [manifest_path(pred_file)] + sorted(pred_file.parent.glob(f"manifest-{task}-*.json"))
    subset = None
    for manifest in manifests:
        try:
            content = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(content, dict):
            continue
        data = content.get("data") or {}
        if isinstance(data, dict) and data.get("file") and Path(data["file"]).is_file():
            return Path(data["file"])
        subset = subset or (content.get("key") or {}).get("subset")
    if pred_file.parent.name == "pred":
        folder = pred_file.parent.parent / "data" / task
        candidates = [folder / f"{subset}.jsonl"] if subset else sorted(folder.glob("*.jsonl"))
        candidates = [c for c in candidates if c.is_file()]
        if len(candidates) == 1:
            return candidates[0]
    return None


def check_no_extra_copies(label: str, pred_keys: collections.Counter, data_file: Optional[Path]) -> None:
    """UsageError when prediction records (``label``: their file or files) hold a sample key more often than
    the data file does: a sample predicted twice (two processes on one file, a relaunch into a folder of
    another run) or a prediction of other data. Without a data file every key may appear once."""
    allowed = data_keys(data_file) if data_file is not None else None
    for key, count in pred_keys.items():
        limit = allowed[key] if allowed is not None else 1
        if count <= limit:
            continue
        index, sha = key
        where = (f"its data file {data_file} {limit} time(s)" if allowed is not None
                 else "and no data file is known to hold it more than once (no manifest names one)")
        raise UsageError(f"{label} holds sample index {index} (input sha256 {sha[:12]}) {count} times, {where}: "
                         f"it was written twice or holds predictions of other data; move it aside and run "
                         f"call_api.py again (it resumes)")


# --------------------------------------------------------------------------------------------- one writer
def lock_for_writing(pred_file: Path):
    """Take the advisory lock of a prediction file (``.{name}.lock`` beside it) and return its open handle;
    keep it open while writing. The folder is created here, so an unwritable ``--save_dir`` is reported
    before any model loads. The lock is ``flock``: the kernel drops it when its process dies, so a killed
    run never blocks its own resumption. A second writer gets a UsageError naming the file and the holder.
    """
    pred_file = Path(pred_file)
    lock_file = pred_file.with_name(f".{pred_file.name}.lock")
    try:
        pred_file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_file, "a+", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--save_dir {pred_file.parent} is not writable ({exc.strerror or exc}); "
                         f"pass a folder you can write to") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(f"{pred_file} is being written by process {holder} (lock {lock_file}); wait for it to "
                         f"end, or use another --save_dir") from None
    except OSError as exc:   # a file system without flock (some network mounts): write, unguarded
        warn(f"cannot lock {lock_file} ({exc.strerror or exc}); a second writer of {pred_file} would not be stopped")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


# --------------------------------------------------------------------------------------------- data settings
def data_settings_path(data_file: Path) -> Path:
    """Where prepare.py records how a data file was made: ``{task}/{subset}.prepare.json`` beside it."""
    data_file = Path(data_file)
    return data_file.with_name(f"{data_file.stem}.prepare.json")


def read_data_settings(data_file: Path) -> Optional[Dict[str, Any]]:
    """prepare.py's record of a data file (max_seq_length, tokenizer, seed, ...), or None when there is none
    or it describes other bytes (its sha256 differs: the data file was replaced or edited since)."""
    path = data_settings_path(data_file)
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(settings, dict) or settings.get("sha256") != sha256_file(data_file):
        return None
    return settings
