"""Write RULER's jsonl manifests: one ``json.dumps`` record a line, as NVIDIA/RULER writes them.

The file is written next to its destination under a temporary name, flushed to disk and then
renamed over the destination, so a reader (or a run killed half-way) never sees a half-written
file, and a run that fails before writing leaves an existing file untouched.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable


def write_manifest(output_path, target_manifest: Iterable[dict], ensure_ascii: bool = True) -> None:
    output_path = os.fspath(output_path)
    folder = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(output_path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for record in target_manifest:
                out.write(json.dumps(record, ensure_ascii=ensure_ascii))
                out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it the mode open() would
        os.replace(tmp, output_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_manifest(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
