#!/usr/bin/env python
"""Compare RULER prediction runs: accuracy with 95% intervals, density, time, speedup.

Seed form (Step 4 of README_SKETCHWALK.md)::

    python eval/ruler/pred/compare_results.py --seerattn_dir ./results/seerattn \\
        --sketchwalk_dir ./results/sketchwalk --output_dir ./results/comparison

General form, any number of named runs::

    python eval/ruler/pred/compare_results.py --run dense=DIR --run sketchwalk=DIR \\
        --run oracle=DIR --baseline dense --output_dir DIR [--tasks T ...] [--lengths L ...]

``--seerattn_dir D`` is ``--run seerattn=D`` and ``--sketchwalk_dir D`` is ``--run sketchwalk=D``.
``--baseline`` (for speedup and differences) defaults to ``dense`` when present, else
``seerattn``, else the first run.

Run folder layouts (chosen per run, by what is on disk):

* flat: ``DIR/{task}.jsonl`` as call_api.py / eval_sketchwalk.py write them. The cell's length is
  the max_seq_length the data was prepared for, as call_api.py's manifest records it (from
  prepare.py's record of the data file); ``all`` when no manifest says.
* per length: ``DIR/{length}/{task}.jsonl`` (what eval/ruler/run_sketchwalk.py writes), or
  RULER run.sh's ``DIR/{length}/pred/{task}.jsonl`` (DIR = {ROOT}/{MODEL}/{BENCHMARK}, or
  {ROOT}/{MODEL} when it holds one benchmark); ``{length}`` is a folder named by digits
  (the max_seq_length the data was prepared for). A folder with both layouts is an error.

Chunk files ``{task}-{i}.jsonl`` (call_api --chunk_idx, torchrun ranks) are read in chunk
order when present; evaluate.py's merged ``{task}.jsonl`` next to them is then only checked to
hold nothing the chunks lack. A jsonl whose first record has no ``pred``/``outputs`` (not a
prediction file) is ignored. Samples are matched across runs by (index, sha256 of ``input``,
copy number), as call_api.py keys its resume (a data set may repeat a sample). Any difference
between runs in tasks, lengths or sample sets is an error (exit 2) that names what differs;
``--tasks``/``--lengths`` restrict all runs to a common subset first. call_api.py's manifests
(``manifest-{task}.json``) give each run's settings for the report; a run whose manifests
disagree (say key_summary) is an error; a knob left to a checkpoint (SeerAttn's threshold) is
reported with the value the session used. A cell's files holding a sample more often than their
data file does (two writers, another run's predictions) are an error, as in evaluate.py.

Metrics: RULER's own ``string_match_all`` / ``string_match_part`` from
eval/ruler/eval/synthetic/constants.py (one definition), on predictions cleaned by
evaluate.py's ``postprocess_pred``. "acc all" and "acc part" are both given; the RULER score
of a task is the one its metric names (qa: part, the rest: all). 95% intervals: Wilson score
interval when every per-sample score is 0 or 1, else a percentile bootstrap of the mean
(10,000 resamples, fixed seed); differences vs the baseline use a paired bootstrap over the
same resamples. Density is the per-sample mean of ``others.density.{prefill,decode}``;
a run whose records carry no density is counted as 1.0 only when its ``others.method`` is a
dense server (hf/dense), otherwise it is an error. Seconds per sample are means of
``others.prefill_s`` and ``others.decode_s``, each divided by ``others.batch_size`` (the rows of a
batch share its wall time); speedup = baseline mean seconds / run mean seconds.

Writes to --output_dir: comparison_report.md, comparison.json, samples.jsonl.gz (compact per-sample
records without prompts: run, length, task, index, input_sha256, depth, pred, outputs, scores,
density, times) and PNG plots: accuracy_vs_density_{task}.png, accuracy_vs_density_mean.png,
time_per_sample.png.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import math
import re
import sys
from collections import OrderedDict
from pathlib import Path

from eval.ruler.cli import OneLineParser, UsageError, cli_main
from eval.ruler.eval import evaluate
from eval.ruler.eval.synthetic import constants as ruler_constants
from eval.ruler.pred import registry
from eval.ruler.pred.prediction_files import CHUNK_RE, check_no_extra_copies, data_file_of, input_sha, manifest_path

RULER_DIR = Path(__file__).resolve().parents[1]
# RULER's own servers that run dense attention, beside the registry's dense methods
RULER_DENSE_SERVERS = {"vllm", "trtllm", "sglang", "openai", "gemini", "mamba"}
SAMPLES_FILE = "samples.jsonl.gz"
CONFIDENCE = 0.95
Z95 = 1.959963984540054
FLAT = "all"
MAX_LISTED = 5


def dense_methods() -> set:
    """``others.method`` values (lower case) of servers that run dense attention."""
    return registry.dense_names() | RULER_DENSE_SERVERS


# --------------------------------------------------------------------------------------------
# Scoring: RULER's metrics (eval/ruler/eval/synthetic/constants.py) and evaluate.py's clean-up
# --------------------------------------------------------------------------------------------

class Scorer:
    """string_match_all / string_match_part and postprocess_pred of the harness, per sample."""

    def __init__(self):
        self.match_all = ruler_constants.string_match_all
        self.match_part = ruler_constants.string_match_part
        self.task_types = getattr(ruler_constants, "TASKS", {})
        # RULER returns a fraction, the SeerAttention fork a percentage: find out which.
        self.scale = float(self.match_all(["x"], [["x"]]))  # 1.0 or 100.0
        self.yaml_tasks = {}
        yaml_path = RULER_DIR / "synthetic.yaml"
        if yaml_path.is_file():
            import yaml
            with open(yaml_path, encoding="utf-8") as f:
                self.yaml_tasks = yaml.safe_load(f) or {}

    def clean(self, pred: str) -> str:
        return evaluate.postprocess_pred(pred, {})

    def metric_name(self, task: str) -> str:
        """RULER's metric for a task: from synthetic.yaml's task type, else qa_* -> part."""
        ttype = (self.yaml_tasks.get(task) or {}).get("task")
        fn = (self.task_types.get(ttype) or {}).get("metric_fn") if ttype else None
        if fn is not None:
            return fn.__name__
        return "string_match_part" if task.startswith("qa") else "string_match_all"

    def per_sample(self, preds, refs):
        """Per-sample scores in [0, 1] for all and part."""
        s_all = [self.match_all([p], [r]) / self.scale for p, r in zip(preds, refs)]
        s_part = [self.match_part([p], [r]) / self.scale for p, r in zip(preds, refs)]
        return s_all, s_part

    def cell_score(self, fn_name: str, preds, refs) -> float:
        """RULER's number for a list of samples, in percent."""
        fn = self.match_all if fn_name == "string_match_all" else self.match_part
        return float(fn(preds, refs)) * 100.0 / self.scale


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

def wilson_interval(successes: float, n: int, z: float = Z95):
    """Wilson score interval for a binomial proportion, as fractions in [0, 1]."""
    if n <= 0:
        raise ValueError("n must be positive")
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At p = 0 or 1 the bounds equal p exactly in real arithmetic; in floats they can miss it by
    # one rounding (100% of 10 gave hi 0.9999999999999999), so keep p inside the interval.
    return max(0.0, min(p, center - half)), min(1.0, max(p, center + half))


def bootstrap_interval(values, idx):
    """Percentile interval of the mean of ``values`` over the resample index matrix ``idx``."""
    import numpy as np
    v = np.asarray(values, dtype=float)
    means = v[idx].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2])
    return float(lo), float(hi)


def accuracy_interval(values, idx):
    """(lo, hi, method) in percent: Wilson when every value is 0 or 1, else bootstrap."""
    if all(v in (0.0, 1.0) for v in values):
        lo, hi = wilson_interval(sum(values), len(values))
        return 100 * lo, 100 * hi, "wilson"
    lo, hi = bootstrap_interval(values, idx)
    return 100 * lo, 100 * hi, "bootstrap"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------

def _length_sort_key(length: str):
    return (0, int(length), "") if length.isdigit() else (1, 0, length)


def _is_prediction_file(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    return True  # let the reader report the bad line
                return isinstance(rec, dict) and "pred" in rec and "outputs" in rec
    return True  # empty {task}.jsonl: a run that has not written anything yet -> reported


def _task_files(folder: Path):
    tasks: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.jsonl")):
        if path.name.startswith(".") or not path.is_file() or not _is_prediction_file(path):
            continue
        m = CHUNK_RE.match(path.name)
        task = m.group("task") if m else path.stem
        tasks.setdefault(task, []).append(path)
    return tasks


def _length_dirs(folder: Path):
    return sorted((c for c in folder.iterdir() if c.is_dir() and c.name.isdigit()), key=lambda c: int(c.name))


def _prepared_length(files) -> str:
    """The max_seq_length a flat folder's task was prepared for, from call_api.py's manifests (prepare.py's
    record of the data file), or ``all`` when they do not say or disagree. Chunk files, when there are any,
    carry the manifests (evaluate.py's merged file has none of its own)."""
    found = set()
    for path in _cell_files(files)[0]:
        try:
            data = json.loads(manifest_path(path).read_text(encoding="utf-8")).get("data") or {}
        except (OSError, json.JSONDecodeError, AttributeError):
            return FLAT
        found.add(data.get("max_seq_length") if isinstance(data, dict) else None)
    length = found.pop() if len(found) == 1 else None
    return str(length) if isinstance(length, int) and not isinstance(length, bool) else FLAT


def find_prediction_files(name: str, run_dir: Path):
    """{length: {task: [files]}} for one run folder (layouts in the module docstring)."""
    if not run_dir.is_dir():
        raise UsageError(f"run '{name}': {run_dir} is not a folder")
    top = _task_files(run_dir)
    length_dirs = _length_dirs(run_dir)
    if not top and not length_dirs:
        # RULER run.sh's {ROOT}/{MODEL}: the benchmark folder below it holds the length folders
        benchmarks = [c for c in sorted(run_dir.iterdir()) if c.is_dir() and _length_dirs(c)]
        if len(benchmarks) > 1:
            raise UsageError(f"run '{name}': {run_dir} holds several benchmarks "
                             f"({', '.join(c.name for c in benchmarks)}); pass one of them, e.g. {benchmarks[0]}")
        if benchmarks:
            return find_prediction_files(name, benchmarks[0])
    if length_dirs and top:
        raise UsageError(
            f"run '{name}': {run_dir} holds both prediction files ({', '.join(sorted(top))}) and "
            f"length folders ({', '.join(c.name for c in length_dirs)}); use one layout")
    if not length_dirs:
        if not top:
            raise UsageError(f"run '{name}': no prediction files ({{task}}.jsonl) in {run_dir} "
                             f"nor in length folders {run_dir}/<length>/")
        out = {}
        for task, files in top.items():
            out.setdefault(_prepared_length(files), {})[task] = files
        return out
    out = {}
    for ld in length_dirs:
        pdir = ld / "pred" if (ld / "pred").is_dir() else ld
        files = _task_files(pdir)
        if not files:
            raise UsageError(f"run '{name}': length folder {pdir} holds no prediction files "
                             f"({{task}}.jsonl)")
        out[ld.name] = files
    return out


def _fail(path, lineno, msg):
    raise UsageError(f"{path}:{lineno}: {msg}")


def _number(value, path, lineno, field):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(path, lineno, f"{field} is {value!r}, not a number")
    return float(value)


def _read_jsonl(path: Path):
    """(lineno, record) of a prediction file; a torn or bad line is an error naming it."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                _fail(path, lineno, f"not valid JSON ({exc.msg}); a run killed mid-write? rerun "
                                    f"call_api.py on it (it repairs and completes the file)")
    return out


def _cell_files(files):
    """Chunk files when there are any (evaluate.py's merged {task}.jsonl is then derived from
    them and must hold nothing else), else the single {task}.jsonl."""
    chunks = sorted((f for f in files if CHUNK_RE.match(f.name)),
                    key=lambda f: int(CHUNK_RE.match(f.name).group("chunk")))
    plain = [f for f in files if not CHUNK_RE.match(f.name)]
    if not chunks:
        return plain, []
    return chunks, plain


def read_samples(name: str, task: str, length: str, files):
    """Records of one cell, validated, keyed by (index, input sha256, occurrence).

    The occurrence number (0 for the first record with that index and input, 1 for a second
    ...) lets a data set repeat a sample, as call_api.py allows; the copies then match across
    runs by count."""
    use, merged = _cell_files(files)
    samples = OrderedDict()
    for path in use:
        for lineno, rec in _read_jsonl(path):
            for fld in ("index", "pred", "input", "outputs"):
                if fld not in rec:
                    _fail(path, lineno, f"record has no '{fld}'")
            if not isinstance(rec["pred"], str):
                _fail(path, lineno, "'pred' is not a string")
            if not isinstance(rec["input"], str):
                _fail(path, lineno, "'input' is not a string")
            outputs = rec["outputs"]
            if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
                _fail(path, lineno, "'outputs' is not a non-empty list of strings")
            others = rec.get("others")
            if not isinstance(others, dict):
                _fail(path, lineno, "record has no 'others' object (timings, density)")
            for fld in ("prefill_s", "decode_s"):
                if fld not in others:
                    _fail(path, lineno, f"others.{fld} is missing")
            sha = input_sha(rec["input"])
            occ = 0
            while (rec["index"], sha, occ) in samples:
                occ += 1
            key = (rec["index"], sha, occ)
            density = others.get("density")
            if density is not None and not isinstance(density, dict):
                _fail(path, lineno, "others.density is not an object {prefill, decode, overall}")
            batch = others.get("batch_size", 1)
            if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
                _fail(path, lineno, f"others.batch_size is {batch!r}, not a positive integer")
            samples[key] = {
                "index": rec["index"],
                "sha": sha,
                "pred": rec["pred"],
                "outputs": outputs,
                "depth": rec.get("depth"),
                "tokens": rec.get("length"),
                "method": others.get("method"),
                "prefill_s": _number(others["prefill_s"], path, lineno, "others.prefill_s"),
                "decode_s": _number(others["decode_s"], path, lineno, "others.decode_s"),
                "batch_size": batch,
                "prompt_tokens": others.get("prompt_tokens"),
                "new_tokens": others.get("new_tokens"),
                "density": density,
                "density_per_layer": others.get("density_per_layer"),
                "density_by_layer_type": others.get("density_by_layer_type"),
                "where": f"{path}:{lineno}",
            }
    if not samples:
        raise UsageError(f"run '{name}' {task}@{length}: {', '.join(map(str, use))} hold no records")
    keys = collections.Counter((s["index"], s["sha"]) for s in samples.values())   # prediction_files.sample_key
    check_no_extra_copies(", ".join(map(str, use)), keys, data_file_of(use[0]))
    for path in merged:
        counts = {}
        for lineno, rec in _read_jsonl(path):
            k = (rec.get("index"), input_sha(rec.get("input") or ""))
            counts[k] = counts.get(k, 0) + 1
            if (k[0], k[1], counts[k] - 1) not in samples:
                _fail(path, lineno, f"sample index {k[0]} (input sha256 {k[1][:12]}) is in none of the "
                                    f"chunk files {', '.join(p.name for p in use)} next to it; the folder "
                                    f"mixes two runs: move one aside")
    return samples


MANIFEST_FIELDS = ("server_type", "model", "checkpoint", "dtype", "device_type", "temperature", "knobs")


def read_manifests(name: str, run_dir: Path):
    """call_api.py's manifest-{task}[-{chunk}].json files of a run: the settings that must agree
    across its cells. Returns (settings or None, [paths]); disagreement is an error.

    A knob left unset on the command line (None in the manifest's key, e.g. SeerAttn's --threshold) is given
    the value the method actually used, from the manifest's ``session`` (the gates checkpoint's threshold)."""
    paths = sorted(run_dir.glob("manifest-*.json")) + sorted(run_dir.glob("*/manifest-*.json")) \
        + sorted(run_dir.glob("*/pred/manifest-*.json")) + sorted(run_dir.glob("*/*/pred/manifest-*.json"))
    settings, first = None, None
    for p in paths:
        try:
            manifest = json.loads(p.read_text(encoding="utf-8"))
            key = manifest.get("key") or {}
            session = manifest.get("session") or {}
        except (OSError, json.JSONDecodeError, AttributeError):
            raise UsageError(f"run '{name}': manifest {p} is unreadable")
        these = OrderedDict((f, key.get(f)) for f in MANIFEST_FIELDS)
        if isinstance(these["knobs"], dict) and isinstance(session, dict):
            these["knobs"] = OrderedDict((k, session.get(k) if v is None else v) for k, v in these["knobs"].items())
        if settings is None:
            settings, first = these, p
        elif these != settings:
            diff = [f for f in MANIFEST_FIELDS if these[f] != settings[f]]
            if "knobs" in diff and isinstance(these["knobs"], dict) and isinstance(settings["knobs"], dict):
                kd = sorted(k for k in set(these["knobs"]) | set(settings["knobs"])
                            if these["knobs"].get(k) != settings["knobs"].get(k))
                diff = [f for f in diff if f != "knobs"] + [f"knobs.{k}" for k in kd]
            raise UsageError(f"run '{name}' mixes settings: {', '.join(diff)} differ between {first} and {p}")
    return settings, [str(p) for p in paths]


def _settings_line(settings):
    if not settings:
        return "no call_api manifest"
    parts = [f"{settings['server_type']}", f"model {settings['model']}"]
    if settings.get("checkpoint"):
        parts.append(f"checkpoint {settings['checkpoint']}")
    parts.append(f"{settings['dtype']} on {settings['device_type']}")
    knobs = {k: v for k, v in (settings.get("knobs") or {}).items() if v is not None}
    if knobs:
        parts.append(" ".join(f"{k}={v}" for k, v in knobs.items()))
    return "; ".join(str(p) for p in parts)


def load_runs(runs, tasks=None, lengths=None):
    """{name: {(length, task): samples}} after the layout scan and the --tasks/--lengths filter."""
    loaded = OrderedDict()
    for name, run_dir in runs.items():
        layout = find_prediction_files(name, Path(run_dir))
        cells = {}
        for length, by_task in layout.items():
            for task, files in by_task.items():
                cells[(length, task)] = files
        if lengths:
            have = {l for l, _ in cells}
            missing = [l for l in lengths if l not in have]
            if missing:
                raise UsageError(f"run '{name}' ({run_dir}) has no length {', '.join(missing)}; "
                                 f"it has {', '.join(sorted(have, key=_length_sort_key))}")
            cells = {k: v for k, v in cells.items() if k[0] in lengths}
        if tasks:
            have = {t for _, t in cells}
            missing = [t for t in tasks if t not in have]
            if missing:
                raise UsageError(f"run '{name}' ({run_dir}) has no predictions for task "
                                 f"{', '.join(missing)}; it has {', '.join(sorted(have))}")
            cells = {k: v for k, v in cells.items() if k[1] in tasks}
        loaded[name] = {k: read_samples(name, k[1], k[0], v) for k, v in cells.items()}
    return loaded


def _cell_label(cell):
    length, task = cell
    return f"{task}@{length}"


def check_consistent(loaded):
    """Same cells and the same samples in every run; the error says exactly what differs."""
    names = list(loaded)
    union = set()
    for cells in loaded.values():
        union |= set(cells)
    problems = []
    for name in names:
        missing = sorted(union - set(loaded[name]), key=lambda c: (_length_sort_key(c[0]), c[1]))
        if missing:
            shown = ", ".join(_cell_label(c) for c in missing[:MAX_LISTED * 2])
            more = f" and {len(missing) - MAX_LISTED * 2} more" if len(missing) > MAX_LISTED * 2 else ""
            problems.append(f"run '{name}' lacks {shown}{more}")
    if problems:
        raise UsageError("runs differ in tasks/lengths: " + "; ".join(problems) +
                         " (compare a common subset with --tasks/--lengths)")
    ref = names[0]
    for cell in sorted(union, key=lambda c: (_length_sort_key(c[0]), c[1])):
        ref_keys = set(loaded[ref][cell])
        for name in names[1:]:
            keys = set(loaded[name][cell])
            if keys == ref_keys:
                continue
            only_ref = sorted(ref_keys - keys, key=str)
            only_run = sorted(keys - ref_keys, key=str)
            ref_idx = {k[0] for k in ref_keys}
            parts = [f"{_cell_label(cell)}: run '{name}' has {len(keys)} samples, '{ref}' {len(ref_keys)}"]

            def describe(ks, owner, other_idx):
                out = []
                for k in ks[:MAX_LISTED]:
                    tag = " (same index, different input)" if k[0] in other_idx and k[2] == 0 else ""
                    copy = f" (copy {k[2] + 1})" if k[2] else ""
                    out.append(f"index {k[0]} sha256 {k[1][:12]}{copy}{tag}")
                more = f" and {len(ks) - MAX_LISTED} more" if len(ks) > MAX_LISTED else ""
                return f"only in '{owner}': " + ", ".join(out) + more

            if only_ref:
                parts.append(describe(only_ref, ref, {k[0] for k in keys}))
            if only_run:
                parts.append(describe(only_run, name, ref_idx))
            raise UsageError("sample sets differ: " + "; ".join(parts))


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------

def _density_stats(name, cell, samples):
    have = [s for s in samples if s["density"] is not None]
    methods = sorted({str(s["method"]) for s in samples})
    if not have:
        if all(str(s["method"]).lower() in dense_methods() for s in samples):
            return {"prefill": 1.0, "decode": 1.0, "overall": 1.0, "per_layer": None, "source": "dense server"}
        raise UsageError(f"run '{name}' {_cell_label(cell)}: records carry no others.density and "
                         f"others.method is {', '.join(methods)} (not a dense server); first record at "
                         f"{samples[0]['where']}")
    if len(have) != len(samples):
        lacking = next(s for s in samples if s["density"] is None)
        raise UsageError(f"run '{name}' {_cell_label(cell)}: {len(samples) - len(have)} of "
                         f"{len(samples)} records lack others.density, e.g. {lacking['where']}")
    out = {"source": "records"}
    for part in ("prefill", "decode", "overall"):
        vals = []
        for s in have:
            v = s["density"].get(part)
            if v is not None:
                vals.append(_number(v, *s["where"].rsplit(":", 1), f"others.density.{part}"))
        if part == "prefill" and len(vals) != len(have):
            lacking = next(s for s in have if s["density"].get("prefill") is None)
            raise UsageError(f"run '{name}' {_cell_label(cell)}: others.density.prefill missing at "
                             f"{lacking['where']}")
        out[part] = _mean(vals)
    layers = [s["density_per_layer"] for s in have if isinstance(s["density_per_layer"], list)]
    if layers and len({len(l) for l in layers}) == 1:
        out["per_layer"] = [sum(col) / len(col) for col in zip(*layers)]
    else:
        out["per_layer"] = None
    out["by_layer_type"] = _by_layer_type([s.get("density_by_layer_type") for s in have])
    return out


def _by_layer_type(reports):
    """Per-sample ``others.density_by_layer_type`` ({kind: {prefill, decode, overall, layers}}) -> the
    per-kind means over the samples, when every sample has the same kinds and layers; else None."""
    if not reports or not all(isinstance(r, dict) and r for r in reports):
        return None
    kinds = list(reports[0])
    if any(list(r) != kinds or any(r[k].get("layers") != reports[0][k].get("layers") for k in kinds)
           for r in reports):
        return None
    out = OrderedDict()
    for k in kinds:
        row = OrderedDict()
        for part in ("prefill", "decode", "overall"):
            vals = [r[k].get(part) for r in reports if isinstance(r[k].get(part), (int, float))]
            row[part] = _mean(vals) if vals else None
        row["layers"] = reports[0][k].get("layers")
        out[k] = row
    return out


def compare(loaded, baseline, scorer, n_boot=10000, seed=0):
    import numpy as np
    names = list(loaded)
    cells = sorted(loaded[names[0]], key=lambda c: (_length_sort_key(c[0]), c[1]))
    rng = np.random.default_rng(seed)
    out_cells = []
    records = []
    for cell in cells:
        length, task = cell
        keys = sorted(loaded[names[0]][cell], key=lambda k: (str(type(k[0])), k[0], k[1], k[2]))
        n = len(keys)
        idx = rng.integers(0, n, size=(n_boot, n))
        metric = scorer.metric_name(task)
        per_run = OrderedDict()
        scores = {}
        for name in names:
            samples = [loaded[name][cell][k] for k in keys]
            preds = [scorer.clean(s["pred"]) for s in samples]
            refs = [s["outputs"] for s in samples]
            s_all, s_part = scorer.per_sample(preds, refs)
            scores[name] = (s_all, s_part)
            lo_a, hi_a, how_a = accuracy_interval(s_all, idx)
            lo_p, hi_p, how_p = accuracy_interval(s_part, idx)
            dens = _density_stats(name, cell, samples)
            # A batch's rows share its wall time: each sample is charged its share of it.
            prefill = _mean([s["prefill_s"] / s["batch_size"] for s in samples])
            decode = _mean([s["decode_s"] / s["batch_size"] for s in samples])
            depth_groups = OrderedDict()
            if all(isinstance(s["depth"], (int, float)) and not isinstance(s["depth"], bool) for s in samples):
                for s, a in sorted(zip(samples, s_all), key=lambda t: t[0]["depth"]):
                    depth_groups.setdefault(s["depth"], []).append(a)
            stats = OrderedDict(
                n=n,
                score=scorer.cell_score(metric, preds, refs),
                acc_all=100 * _mean(s_all), acc_all_ci=[lo_a, hi_a], acc_all_interval=how_a,
                acc_part=100 * _mean(s_part), acc_part_ci=[lo_p, hi_p], acc_part_interval=how_p,
                empty_preds=sum(1 for p in preds if not p),
                density_prefill=dens["prefill"], density_decode=dens["decode"],
                density_overall=dens["overall"], density_source=dens["source"],
                density_per_layer=dens["per_layer"],
                density_by_layer_type=dens.get("by_layer_type"),
                prefill_s=prefill, decode_s=decode, total_s=prefill + decode,
                prompt_tokens=_mean([s["prompt_tokens"] for s in samples
                                     if isinstance(s["prompt_tokens"], (int, float))]),
                new_tokens=_mean([s["new_tokens"] for s in samples
                                  if isinstance(s["new_tokens"], (int, float))]),
                methods=sorted({str(s["method"]) for s in samples}),
                batch_sizes=sorted({s["batch_size"] for s in samples}),
                by_depth=OrderedDict((str(d), {"n": len(v), "acc_all": 100 * _mean(v)})
                                     for d, v in depth_groups.items()),
            )
            per_run[name] = stats
            for s, a, p in zip(samples, s_all, s_part):
                records.append(OrderedDict(
                    run=name, length=length, task=task, index=s["index"], input_sha256=s["sha"],
                    depth=s["depth"], pred=s["pred"], outputs=s["outputs"], score_all=a, score_part=p,
                    density=s["density"], prefill_s=s["prefill_s"], decode_s=s["decode_s"],
                    batch_size=s["batch_size"], prompt_tokens=s["prompt_tokens"],
                    new_tokens=s["new_tokens"]))
        if baseline is not None:
            base = per_run[baseline]
            b_all, b_part = (np.asarray(x, dtype=float) for x in scores[baseline])
            for name in names:
                st = per_run[name]
                if name == baseline:
                    st["vs_baseline"] = None
                    continue
                r_all, r_part = (np.asarray(x, dtype=float) for x in scores[name])
                d_all, d_part = r_all - b_all, r_part - b_part
                st["vs_baseline"] = OrderedDict(
                    baseline=baseline,
                    diff_acc_all=100 * float(d_all.mean()),
                    diff_acc_all_ci=[100 * x for x in bootstrap_interval(d_all, idx)],
                    diff_acc_part=100 * float(d_part.mean()),
                    diff_acc_part_ci=[100 * x for x in bootstrap_interval(d_part, idx)],
                    lost=int((r_all < b_all).sum()), gained=int((r_all > b_all).sum()),
                    diff_density_prefill=st["density_prefill"] - base["density_prefill"],
                    speedup_total=_ratio(base["total_s"], st["total_s"]),
                    speedup_prefill=_ratio(base["prefill_s"], st["prefill_s"]),
                    speedup_decode=_ratio(base["decode_s"], st["decode_s"]),
                )
        out_cells.append(OrderedDict(task=task, length=length, n=n, metric=metric, runs=per_run))
    summary = OrderedDict()
    for name in names:
        rows = [c["runs"][name] for c in out_cells]
        s = OrderedDict(
            cells=len(rows), samples=sum(r["n"] for r in rows),
            score_mean=_mean([r["score"] for r in rows]),
            acc_all_mean=_mean([r["acc_all"] for r in rows]),
            acc_part_mean=_mean([r["acc_part"] for r in rows]),
            density_prefill_mean=_mean([r["density_prefill"] for r in rows]),
            density_decode_mean=_mean([r["density_decode"] for r in rows]),
            prefill_s_mean=_mean([r["prefill_s"] for r in rows]),
            decode_s_mean=_mean([r["decode_s"] for r in rows]),
            total_s_mean=_mean([r["total_s"] for r in rows]),
        )
        if baseline is not None and name != baseline:
            s["diff_acc_all_mean"] = _mean([r["vs_baseline"]["diff_acc_all"] for r in rows])
            s["diff_acc_part_mean"] = _mean([r["vs_baseline"]["diff_acc_part"] for r in rows])
            s["speedup_total"] = _ratio(summary_total(out_cells, baseline), summary_total(out_cells, name))
        summary[name] = s
    return out_cells, summary, records


def summary_total(cells, name):
    return _mean([c["runs"][name]["total_s"] for c in cells])


def _ratio(num, den):
    if num is None or den is None or den <= 0:
        return None
    return num / den


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def _f(x, fmt="{:.1f}", none="n/a"):
    return none if x is None else fmt.format(x)


def _acc(st, key):
    lo, hi = st[f"{key}_ci"]
    return f"{st[key]:.1f} [{lo:.1f}, {hi:.1f}]"


def _signed_ci(vs, key):
    lo, hi = vs[f"{key}_ci"]
    return f"{vs[key]:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def write_report(path, runs, settings, baseline, cells, summary, plots, n_boot, seed):
    L = []
    L.append("# RULER comparison\n")
    L.append("Written by `eval/ruler/pred/compare_results.py`. Accuracy in percent with the sample "
             "count n and a 95% interval: Wilson score interval where every per-sample score is 0 "
             f"or 1 (marked W), else a percentile bootstrap of the mean ({n_boot} resamples, seed "
             f"{seed}; marked B). Differences vs the baseline are paired over the same samples "
             "(paired bootstrap 95% interval); lost/gained = samples scoring lower/higher than the "
             "baseline. Density = attended (query, key) pairs / causal pairs over all layers, mean "
             "over samples (prefill and decode). Seconds are means per sample; speedup = baseline "
             "seconds / run seconds (total = prefill + decode); a sample predicted in a batch of b "
             "is charged 1/b of the batch's recorded seconds (the batch column), so batched and "
             "single-prompt runs are compared by throughput, not latency.\n")
    L.append("## Runs\n")
    L.append("| run | folder | method | batch | settings (call_api manifest) |")
    L.append("|---|---|---|---|---|")
    for name, d in runs.items():
        methods = sorted({m for c in cells for m in c["runs"][name]["methods"]})
        batches = sorted({b for c in cells for b in c["runs"][name]["batch_sizes"]})
        base = " (baseline)" if name == baseline else ""
        L.append(f"| {name}{base} | `{d}` | {', '.join(methods)} | {', '.join(map(str, batches))} | "
                 f"{_settings_line(settings.get(name))} |")
    L.append("")
    L.append("## Mean over cells\n")
    L.append("Unweighted mean over the task x length cells below (as RULER averages tasks).\n")
    hdr = "| run | cells | samples | RULER score | acc all | acc part | prefill density | decode density | s/sample | speedup | Δ acc all | Δ acc part |"
    L.append(hdr)
    L.append("|" + "---|" * (hdr.count("|") - 1))
    for name, s in summary.items():
        L.append(f"| {name} | {s['cells']} | {s['samples']} | {_f(s['score_mean'])} | {_f(s['acc_all_mean'])} | "
                 f"{_f(s['acc_part_mean'])} | {_f(s['density_prefill_mean'], '{:.3f}')} | "
                 f"{_f(s['density_decode_mean'], '{:.3f}')} | {_f(s['total_s_mean'], '{:.3f}')} | "
                 f"{_f(s.get('speedup_total'), '{:.2f}x', '-')} | {_f(s.get('diff_acc_all_mean'), '{:+.1f}', '-')} | "
                 f"{_f(s.get('diff_acc_part_mean'), '{:+.1f}', '-')} |")
    L.append("")
    L.append("## Per task and length\n")
    for c in cells:
        first = next(iter(c["runs"].values()))
        tok = first["prompt_tokens"]
        tok_s = f", mean prompt tokens {tok:.0f}" if tok is not None else ""
        L.append(f"### {c['task']} @ {c['length']} (n = {c['n']}, RULER metric {c['metric']}{tok_s})\n")
        hdr = ("| run | n | acc all [95%] | acc part [95%] | empty | prefill density | decode density | "
               "prefill s | decode s | total s | speedup | Δ acc all [95%] | Δ acc part [95%] | lost/gained | Δ prefill density |")
        L.append(hdr)
        L.append("|" + "---|" * (hdr.count("|") - 1))
        for name, st in c["runs"].items():
            vs = st.get("vs_baseline")
            mark_a = "W" if st["acc_all_interval"] == "wilson" else "B"
            mark_p = "W" if st["acc_part_interval"] == "wilson" else "B"
            dens_note = " (dense)" if st["density_source"] == "dense server" else ""
            if vs:
                tail = (f"{_f(vs['speedup_total'], '{:.2f}x')} | {_signed_ci(vs, 'diff_acc_all')} | "
                        f"{_signed_ci(vs, 'diff_acc_part')} | {vs['lost']}/{vs['gained']} | "
                        f"{vs['diff_density_prefill']:+.3f} |")
            else:
                tail = "baseline | - | - | - | - |" if name == baseline else "- | - | - | - | - |"
            L.append(f"| {name} | {st['n']} | {_acc(st, 'acc_all')} {mark_a} | {_acc(st, 'acc_part')} {mark_p} | "
                     f"{st['empty_preds']} | {_f(st['density_prefill'], '{:.3f}')}{dens_note} | "
                     f"{_f(st['density_decode'], '{:.3f}')} | {st['prefill_s']:.3f} | {st['decode_s']:.3f} | "
                     f"{st['total_s']:.3f} | {tail}")
        L.append("")
    depth_cells = [c for c in cells if all(st["by_depth"] for st in c["runs"].values())]
    if depth_cells:
        L.append("## Accuracy (all) by needle depth\n")
        for c in depth_cells:
            depths = list(next(iter(c["runs"].values()))["by_depth"])
            L.append(f"### {c['task']} @ {c['length']}\n")
            L.append("| run | " + " | ".join(f"depth {d} (n)" for d in depths) + " |")
            L.append("|" + "---|" * (len(depths) + 1))
            for name, st in c["runs"].items():
                vals = [f"{st['by_depth'][d]['acc_all']:.1f} ({st['by_depth'][d]['n']})" if d in st["by_depth"] else "-"
                        for d in depths]
                L.append(f"| {name} | " + " | ".join(vals) + " |")
            L.append("")
    L.append("## Files\n")
    L.append("- `comparison.json`: every number above, plus per-layer prefill density (`density_per_layer`) "
             "and, for models whose layers differ (Gemma-3), the density per layer type "
             "(`density_by_layer_type`: sparse, dense and sliding-window layers apart).")
    L.append(f"- `{SAMPLES_FILE}`: compact per-sample records (no prompts; `zcat` reads it).")
    for p in plots:
        L.append(f"- `{p}`")
    L.append("")
    Path(path).write_text("\n".join(L), encoding="utf-8")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_plots(out_dir: Path, names, cells):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {n: colors[i % len(colors)] for i, n in enumerate(names)}
    lengths = sorted({c["length"] for c in cells}, key=_length_sort_key)
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    marker = {l: markers[i % len(markers)] for i, l in enumerate(lengths)}
    written = []

    def acc_density_plot(fname, title, points):
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        for name in names:
            first = True
            for length, dens, acc, lo, hi in points[name]:
                ax.errorbar([dens], [acc], yerr=[[acc - lo], [hi - acc]], fmt=marker[length],
                            color=color[name], capsize=3, label=name if first else None)
                first = False
        for length in lengths:
            ax.scatter([], [], marker=marker[length], color="gray", label=f"length {length}")
        ax.set_xlabel("prefill density (attended / causal pairs)")
        ax.set_ylabel("accuracy, string_match_all (%)")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(-5, 105)
        ax.grid(True, alpha=0.3)
        ax.set_title(title)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(fname)

    for task in sorted({c["task"] for c in cells}):
        pts = {n: [] for n in names}
        for c in cells:
            if c["task"] != task:
                continue
            for n in names:
                st = c["runs"][n]
                pts[n].append((c["length"], st["density_prefill"], st["acc_all"], *st["acc_all_ci"]))
        acc_density_plot(f"accuracy_vs_density_{_safe(task)}.png",
                         f"{task}: accuracy vs prefill density (95% CI)", pts)

    pts = {n: [] for n in names}
    for length in lengths:
        sub = [c for c in cells if c["length"] == length]
        for n in names:
            acc = _mean([c["runs"][n]["acc_all"] for c in sub])
            dens = _mean([c["runs"][n]["density_prefill"] for c in sub])
            pts[n].append((length, dens, acc, acc, acc))
    acc_density_plot("accuracy_vs_density_mean.png", "mean over tasks: accuracy vs prefill density", pts)

    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(lengths) * max(1, len(names)) * 0.5 + 2), 4.6))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(lengths))]
        pre = [_mean([c["runs"][n]["prefill_s"] for c in cells if c["length"] == l]) for l in lengths]
        dec = [_mean([c["runs"][n]["decode_s"] for c in cells if c["length"] == l]) for l in lengths]
        ax.bar(xs, pre, width, color=color[n], label=f"{n} prefill")
        ax.bar(xs, dec, width, bottom=pre, color=color[n], alpha=0.45, hatch="//", label=f"{n} decode")
    ax.set_xticks(range(len(lengths)))
    ax.set_xticklabels([f"length {l}" for l in lengths])
    ax.set_ylabel("seconds per sample (mean over tasks)")
    ax.set_title("time per sample: prefill (solid) + decode (hatched)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(out_dir / "time_per_sample.png", dpi=110)
    plt.close(fig)
    written.append("time_per_sample.png")
    return written


def run_comparison(runs, output_dir, baseline=None, tasks=None, lengths=None, n_boot=10000, seed=0,
                   plots=True):
    """Library entry point: returns the comparison.json object."""
    if not runs:
        raise UsageError("no runs given: pass --seerattn_dir/--sketchwalk_dir or --run NAME=DIR")
    if baseline is None:
        baseline = "dense" if "dense" in runs else ("seerattn" if "seerattn" in runs else next(iter(runs)))
    elif baseline not in runs:
        raise UsageError(f"--baseline {baseline} is not one of the runs ({', '.join(runs)})")
    if n_boot < 100:
        raise UsageError(f"--bootstrap {n_boot}: use at least 100 resamples")
    scorer = Scorer()
    manifests = {n: read_manifests(n, Path(d)) for n, d in runs.items()}
    loaded = load_runs(runs, tasks, lengths)
    check_consistent(loaded)
    cells, summary, records = compare(loaded, baseline if len(runs) > 1 else None, scorer, n_boot, seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_files = write_plots(out, list(runs), cells) if plots else []
    result = OrderedDict(
        generated_by="eval/ruler/pred/compare_results.py",
        baseline=baseline if len(runs) > 1 else None,
        runs=OrderedDict((n, {"dir": str(d), "settings": manifests[n][0], "manifests": manifests[n][1]})
                         for n, d in runs.items()),
        intervals={"level": CONFIDENCE, "binary": "wilson",
                   "fractional": f"percentile bootstrap of the mean, {n_boot} resamples, seed {seed}",
                   "differences": "paired percentile bootstrap over the same resamples"},
        summary=summary,
        cells=cells,
        plots=plot_files,
    )
    # each file written beside its final name and renamed: a killed compare leaves the previous files whole
    tmp = out / "comparison.json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, out / "comparison.json")
    # gzip (no file name, mtime 0: the same records give the same bytes): ~9x smaller, and these files are committed
    tmp = out / (SAMPLES_FILE + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
        for rec in records:
            gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    os.replace(tmp, out / SAMPLES_FILE)
    write_report(out / "comparison_report.md", runs, {n: m[0] for n, m in manifests.items()}, result["baseline"],
                 cells, summary,
                 plot_files, n_boot, seed)
    return result


def parse_runs(args):
    runs = OrderedDict()
    if args.seerattn_dir:
        runs["seerattn"] = args.seerattn_dir
    if args.sketchwalk_dir:
        runs["sketchwalk"] = args.sketchwalk_dir
    for spec in args.run or []:
        if "=" not in spec:
            raise UsageError(f"--run {spec}: expected NAME=DIR")
        name, d = spec.split("=", 1)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
            raise UsageError(f"--run {spec}: run name {name!r} must be letters, digits, _ . + -")
        if not d:
            raise UsageError(f"--run {spec}: empty folder")
        if name in runs:
            raise UsageError(f"run name '{name}' given twice")
        runs[name] = d
    return runs


def build_parser():
    p = OneLineParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seerattn_dir", help="run folder of the SeerAttention baseline (= --run seerattn=DIR)")
    p.add_argument("--sketchwalk_dir", help="run folder of SketchWalk (= --run sketchwalk=DIR)")
    p.add_argument("--run", action="append", metavar="NAME=DIR", help="a named run folder; repeat")
    p.add_argument("--baseline", help="run for speedup and differences (default: dense, else seerattn, else the first)")
    p.add_argument("--output_dir", default="./results/comparison")
    p.add_argument("--tasks", nargs="+", help="compare only these tasks (each run must have them)")
    p.add_argument("--lengths", nargs="+", help="compare only these length folders")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    return p


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    runs = parse_runs(args)
    result = run_comparison(runs, args.output_dir, args.baseline, args.tasks, args.lengths,
                            args.bootstrap, args.seed, plots=not args.no_plots)
    out = Path(args.output_dir)
    print(f"compared {len(runs)} run(s) over {len(result['cells'])} cell(s); baseline: {result['baseline']}")
    for name, s in result["summary"].items():
        print(f"  {name:24s} acc all {s['acc_all_mean']:6.1f}  prefill density {_f(s['density_prefill_mean'], '{:.3f}')}"
              f"  s/sample {s['total_s_mean']:.3f}")
    print(f"report: {out / 'comparison_report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
