#!/usr/bin/env python
"""RULER sweep driver: lengths x tasks x methods, in the spirit of RULER's run.sh.

    python eval/ruler/run_sketchwalk.py eval/ruler/sweeps/demo.yaml [--dry_run]
    bash eval/ruler/run_sketchwalk.sh eval/ruler/sweeps/stage1_dense.yaml

For every cell (task, length) it runs the project's real scripts as subprocesses, in order:

1. ``data/prepare.py`` once per cell (data is shared by all methods, so every method sees the
   same samples). Skipped when the data file exists and its stamp
   ``{task}/.prepare_stamp.json`` records the same prepare arguments and the file's sha256.
   Otherwise the old file is removed (RULER's prepare.py would keep a file of the right line
   count) and prepare.py runs; regenerating data under existing predictions is an error.
2. ``pred/call_api.py`` per method and cell. Skipped when the prediction files already hold
   every sample of the data file, keyed by (index, sha256 of input); otherwise it runs and
   resumes by itself.
3. ``eval/evaluate.py`` per method and length (RULER's summary.csv). Skipped when nothing was
   predicted for that folder in this run and its summary is newer than every prediction file.
4. ``pred/compare_results.py`` for every comparison of the config (always; cheap).

The sweep stops at the first failing step (with ``--jobs``, once the steps running beside it have
ended) and prints its command. Every step that ran is
appended to ``{root_dir}/sweep_log.jsonl`` (command, exit status, seconds), so GPU time can be
accounted for; ``--dry_run`` prints the plan (skipped steps as comments) and runs nothing.
``--jobs J`` runs the pending prepare, predict and evaluate steps J at a time, phase after phase;
``--gpus N`` spreads the predict jobs over N GPUs (one each, through CUDA_VISIBLE_DEVICES); steps
with a torchrun launcher run alone on every GPU.

Layout under ``root_dir`` (``pred/`` is git-ignored: everything that holds prompts lives there)::

    {root}/pred/_data/{length}/{task}/validation.jsonl   prepare.py --save_dir {root}/pred/_data/{length}
    {root}/pred/_data/{length}/{task}/.prepare_stamp.json
    {root}/pred/{method}/{length}/{task}.jsonl          call_api.py --save_dir {root}/pred/{method}/{length}
    {root}/pred/{method}/{length}/summary*.csv          evaluate.py --data_dir (same folder)
    {root}/{comparison}/comparison_report.md, comparison.json, samples.jsonl.gz, *.png
    {root}/sweep_log.jsonl

A method may instead be read from RULER run.sh's results (``predictions: {ROOT}/{MODEL}/{BENCHMARK}``, whose
``{length}/pred/{task}.jsonl`` eval/ruler/run.sh wrote): it is compared with the others and never predicted or
evaluated here. Its samples must be the sweep's (same tokenizer, template, seed and num_samples), which
compare_results.py checks sample by sample.

Config (yaml; every key optional except methods; flags override)::

    root_dir: results/ruler/stage2
    benchmark: synthetic
    subset: validation
    model: smollm2               # call_api --model_name_or_path unless a method sets its own
    tokenizer_path: smollm2      # prepare.py
    tokenizer_type: hf
    model_template_type: null    # null: prepare.py's default
    num_samples: 50
    random_seed: 42
    lengths: [2048, 4096, 8192]
    tasks: [niah_single_1, ...]
    cells: [{task: vt, length: 4096}, ...]          # instead of the lengths x tasks grid
    cells_from: {comparison: results/ruler/stage1/comparison/comparison.json,
                 run: dense, min_score: 50}         # keep grid cells whose RULER score >= min
    num_samples_overrides: [{task: niah_single_1, length: 8192, num_samples: 100}]
    prepare_args: {essay_file: .carry/PaulGrahamEssays.json}   # extra prepare.py flags
    call_api_args: {temperature: 0.0, batch_size: 8}          # flags for every method
    launcher: null               # e.g. [torchrun, --nproc_per_node, "2"] instead of python
    methods:                     # name: call_api flags, or {args: flags, tasks: [...], lengths: [...]}
      dense: {server_type: hf}   # or {predictions: benchmark_root/smollm2/synthetic}: read what
                                 # `bash eval/ruler/run.sh smollm2 synthetic` wrote, predict nothing
      sketchwalk: {server_type: SketchWalk, dense_last_blocks: 0}
      seerattn: {server_type: SeerAttn, model_name_or_path: seer_attn/checkpoints/smollm2}
    comparisons:                 # default: one "comparison" of the methods that cover every cell
      - {name: comparison, baseline: dense, methods: [dense, sketchwalk, seerattn]}

Flags as values: ``key: value`` -> ``--key value``; ``true`` -> ``--key``; ``false``/``null``
-> omitted; a list -> ``--key v1 v2``. Without a config file, give ``--method NAME="FLAGS"``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from eval.ruler.cli import OneLineParser, UsageError, cli_main
from eval.ruler.model_loader import sha256_file
from eval.ruler.pred import registry
from eval.ruler.pred.prediction_files import CHUNK_RE, data_keys, sample_key

RULER_DIR = Path(__file__).resolve().parent

PREPARE = RULER_DIR / "data" / "prepare.py"
CALL_API = RULER_DIR / "pred" / "call_api.py"
EVALUATE = RULER_DIR / "eval" / "evaluate.py"
COMPARE = RULER_DIR / "pred" / "compare_results.py"
DATA_DIR_NAME = "_data"
STAMP = ".prepare_stamp.json"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")

CONFIG_KEYS = {
    "root_dir", "benchmark", "subset", "model", "tokenizer_path", "tokenizer_type",
    "model_template_type", "num_samples", "random_seed", "lengths", "tasks", "cells", "cells_from",
    "num_samples_overrides", "prepare_args", "call_api_args", "launcher", "methods", "comparisons",
    "python",
}
DEFAULTS = {
    "root_dir": "results/ruler/sweep", "benchmark": "synthetic", "subset": "validation",
    "model": "smollm2", "tokenizer_path": "smollm2", "tokenizer_type": "hf",
    "model_template_type": None, "num_samples": 25, "random_seed": 42, "lengths": [4096],
    "tasks": ["niah_single_1"], "prepare_args": {}, "call_api_args": {"temperature": 0.0},
    "launcher": None, "comparisons": None,
}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

@dataclass
class Method:
    name: str
    args: list                       # call_api flags (already rendered)
    tasks: list | None = None        # restriction, None = every cell
    lengths: list | None = None
    launcher: list | None = None
    predictions: Path | None = None  # a RULER run.sh result folder ({ROOT}/{MODEL}/{BENCHMARK}) to read, not predict

    def covers(self, cell):
        task, length = cell
        return (self.tasks is None or task in self.tasks) and (self.lengths is None or length in self.lengths)


@dataclass
class Comparison:
    name: str
    methods: list
    baseline: str | None
    tasks: list | None = None
    lengths: list | None = None


@dataclass
class Sweep:
    root: Path
    benchmark: str
    subset: str
    model: str
    tokenizer_path: str
    tokenizer_type: str
    model_template_type: str | None
    random_seed: int
    cells: list                      # [(task, length)] in run order
    num_samples: dict                # (task, length) -> n
    prepare_args: list
    call_api_args: OrderedDict
    launcher: list | None
    methods: "OrderedDict[str, Method]"
    comparisons: list
    python: str
    notes: list = field(default_factory=list)


def render_flags(mapping, where):
    """{key: value} -> ['--key', 'value', ...] (true: bare flag; false/null: omitted)."""
    if isinstance(mapping, (list, tuple)):
        return [str(x) for x in mapping]
    if isinstance(mapping, str):
        return shlex.split(mapping)
    if not isinstance(mapping, dict):
        raise UsageError(f"{where}: expected a mapping of flags, got {mapping!r}")
    out = []
    for key, value in mapping.items():
        flag = key if str(key).startswith("--") else f"--{key}"
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out.append(flag)
            out.extend(str(v) for v in value)
        else:
            out.extend([flag, str(value)])
    return out


def _flag_map(mapping, where):
    """An ordered {--flag: [values]} view of flags, so a method's flags replace the common ones."""
    tokens = render_flags(mapping, where)
    out = OrderedDict()
    current = None
    for tok in tokens:
        if tok.startswith("--"):
            current = tok
            out[current] = []
        elif current is None:
            raise UsageError(f"{where}: value {tok!r} comes before any --flag")
        else:
            out[current].append(tok)
    return out


def _flatten(fmap):
    out = []
    for k, v in fmap.items():
        out.append(k)
        out.extend(v)
    return out


def _as_list(value, where, conv=str):
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        value = [value]
    try:
        return [conv(v) for v in value]
    except (TypeError, ValueError):
        raise UsageError(f"{where}: bad value in {value!r}")


def _int(value, where, minimum=1):
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: {value!r} is not an integer")
    if n < minimum or str(n) != str(value).strip():
        raise UsageError(f"{where}: {value!r} must be an integer >= {minimum}")
    return n


def load_config(path):
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {path} not found")
    import yaml
    try:
        with open(p, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid yaml ({exc})")
    if not isinstance(cfg, dict):
        raise UsageError(f"{path}: the top level must be a mapping")
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(CONFIG_KEYS))}")
    return cfg


def _parse_methods(raw, where):
    if not raw:
        raise UsageError(f"{where}: no methods (give `methods:` in the config or --method NAME=FLAGS)")
    if isinstance(raw, list):  # [{name: .., args: ..}] form
        items = []
        for m in raw:
            if not isinstance(m, dict) or "name" not in m:
                raise UsageError(f"{where}: each method of a list needs a name: {m!r}")
            items.append((m["name"], {k: v for k, v in m.items() if k != "name"}))
    elif isinstance(raw, dict):
        items = list(raw.items())
    else:
        raise UsageError(f"{where}: methods must be a mapping name -> flags")
    methods = OrderedDict()
    for name, spec in items:
        name = str(name)
        if not NAME_RE.fullmatch(name):
            raise UsageError(f"{where}: method name {name!r} must be letters, digits, _ . + - "
                             f"(and not start with _ or .)")
        if name in methods:
            raise UsageError(f"{where}: method {name} given twice")
        spec = spec if spec is not None else {}
        structured = isinstance(spec, dict) and ("args" in spec or "predictions" in spec)
        if structured:
            extra = set(spec) - {"args", "tasks", "lengths", "launcher", "predictions"}
            if extra:
                raise UsageError(f"{where}: method {name}: unknown key(s) {', '.join(sorted(extra))} "
                                 f"(known: args, tasks, lengths, launcher, predictions)")
            if "predictions" in spec and ("args" in spec or "launcher" in spec):
                raise UsageError(f"{where}: method {name}: predictions (read from a run.sh folder) takes no "
                                 f"args or launcher: nothing is predicted for it")
            args = spec.get("args") or {}
        else:
            args = spec
        fmap = _flag_map(args, f"{where}: method {name}")
        for reserved in ("--data_dir", "--save_dir", "--task", "--benchmark", "--subset"):
            if reserved in fmap:
                raise UsageError(f"{where}: method {name} sets {reserved}; the driver sets it per cell")
        for server_type in fmap.get("--server_type", []):      # a typo fails now, not at its first predict step
            try:
                registry.get(server_type)
            except UsageError as exc:
                raise UsageError(f"{where}: method {name}: {exc}") from None
        methods[name] = Method(
            name=name, args=fmap,
            tasks=_as_list(spec.get("tasks"), f"method {name} tasks") if structured else None,
            lengths=_as_list(spec.get("lengths"), f"method {name} lengths", lambda v: _int(v, "length")) if structured else None,
            launcher=_as_list(spec.get("launcher"), f"method {name} launcher") if structured else None,
            predictions=Path(spec["predictions"]) if structured and spec.get("predictions") else None,
        )
    return methods


def _cells_from(spec, grid, where):
    if not isinstance(spec, dict) or "comparison" not in spec:
        raise UsageError(f"{where}: cells_from needs {{comparison: PATH, run: NAME, min_score: X}}")
    path = Path(spec["comparison"])
    run = str(spec.get("run", "dense"))
    min_score = float(spec.get("min_score", 50))
    if not path.is_file():
        raise UsageError(f"cells_from: {path} not found: run the stage that writes it first "
                         f"(its comparison.json names the cells and their scores)")
    with open(path, encoding="utf-8") as f:
        comp = json.load(f)
    scores = {}
    for c in comp.get("cells", []):
        if run not in c.get("runs", {}):
            raise UsageError(f"cells_from: {path} has no run '{run}' (runs: {', '.join(c.get('runs', {}))})")
        length = str(c["length"])
        if not length.isdigit():
            raise UsageError(f"cells_from: {path} has a cell without a length folder ({c['task']}@{length})")
        scores[(c["task"], int(length))] = c["runs"][run]["score"]
    missing = [c for c in grid if c not in scores]
    if missing:
        raise UsageError(f"cells_from: {path} lacks {', '.join(f'{t}@{l}' for t, l in missing)} "
                         f"of this config's tasks x lengths")
    kept = [c for c in grid if scores[c] >= min_score]
    note = (f"judged cells ({run} RULER score >= {min_score:g} in {path}): "
            + (", ".join(f"{t}@{l} ({scores[(t, l)]:.1f})" for t, l in kept) or "none")
            + f"; {len(kept)} of {len(grid)}")
    if len(kept) < 6:
        note += " (fewer than 6)"
    if not kept:
        raise UsageError(note)
    return kept, note


def build_sweep(cfg, args):
    """Merge the config with the flags and validate everything before any step runs."""
    where = args.config or "flags"

    def get(key):
        flag = getattr(args, key, None)
        return flag if flag is not None else cfg.get(key, DEFAULTS.get(key))

    lengths = [_int(l, "length") for l in _as_list(get("lengths"), "lengths")]
    tasks = _as_list(get("tasks"), "tasks")
    num_samples = _int(get("num_samples"), "num_samples")
    notes = []
    if cfg.get("cells") and args.lengths is None and args.tasks is None:
        cells = []
        for c in cfg["cells"]:
            if not isinstance(c, dict) or "task" not in c or "length" not in c:
                raise UsageError(f"{where}: each of cells needs task and length: {c!r}")
            cells.append((str(c["task"]), _int(c["length"], "cells length")))
    else:
        cells = [(t, l) for l in lengths for t in tasks]
    cells_from = cfg.get("cells_from")
    if args.cells_from:
        cells_from = dict(cells_from or {}, comparison=args.cells_from)
    if cells_from and args.lengths is None and args.tasks is None:
        cells, note = _cells_from(cells_from, cells, where)
        notes.append(note)
    if len(set(cells)) != len(cells):
        raise UsageError(f"{where}: a cell is listed twice")
    counts = {c: num_samples for c in cells}
    if args.num_samples is None:
        for o in cfg.get("num_samples_overrides") or []:
            key = (str(o.get("task")), _int(o.get("length"), "num_samples_overrides length"))
            if key in counts:
                counts[key] = _int(o.get("num_samples"), "num_samples_overrides num_samples")

    methods = _parse_methods(cfg.get("methods"), where) if cfg.get("methods") else OrderedDict()
    for spec in args.method or []:
        if "=" not in spec:
            raise UsageError(f"--method {spec}: expected NAME=\"--flag value ...\"")
        name, flags = spec.split("=", 1)
        extra = _parse_methods({name: shlex.split(flags)}, "--method")
        methods[name] = extra[name]
    if not methods:
        _parse_methods(None, where)
    if args.methods:
        unknown = [m for m in args.methods if m not in methods]
        if unknown:
            raise UsageError(f"--methods: {', '.join(unknown)} not in the config ({', '.join(methods)})")
        methods = OrderedDict((m, methods[m]) for m in args.methods)
    for m in methods.values():
        if not any(m.covers(c) for c in cells):
            raise UsageError(f"method {m.name} is restricted to tasks {m.tasks} lengths {m.lengths}, "
                             f"which match no cell of this sweep")
        if m.predictions is not None:
            notes.append(f"method {m.name}: predictions read from {m.predictions} (RULER run.sh's layout), "
                         f"not predicted")

    comparisons = []
    raw_comps = cfg.get("comparisons")
    if raw_comps is None:
        full = [m for m in methods if all(methods[m].covers(c) for c in cells)]
        if full:
            raw_comps = [{"name": "comparison", "methods": full}]
        else:
            raw_comps = []
    seen = set()
    for rc in raw_comps:
        if not isinstance(rc, dict):
            raise UsageError(f"{where}: each comparison is a mapping {{name, methods, baseline, tasks, lengths}}")
        name = str(rc.get("name", "comparison"))
        if not NAME_RE.fullmatch(name) or name == "pred" or name in seen:
            raise UsageError(f"{where}: comparison name {name!r} is not a unique folder name (nor 'pred')")
        seen.add(name)
        cm = _as_list(rc.get("methods"), f"comparison {name} methods") or list(methods)
        if args.methods:
            cm = [m for m in cm if m in methods]
        unknown = [m for m in cm if m not in methods]
        if unknown:
            raise UsageError(f"comparison {name}: method(s) {', '.join(unknown)} not defined")
        if not cm:
            continue
        ctasks = _as_list(rc.get("tasks"), f"comparison {name} tasks")
        clengths = _as_list(rc.get("lengths"), f"comparison {name} lengths", lambda v: _int(v, "length"))
        ccells = [c for c in cells if (ctasks is None or c[0] in ctasks) and (clengths is None or c[1] in clengths)]
        if not ccells:
            raise UsageError(f"comparison {name}: its tasks/lengths match no cell of this sweep")
        for m in cm:
            lacking = [c for c in ccells if not methods[m].covers(c)]
            if lacking:
                raise UsageError(f"comparison {name}: method {m} does not run "
                                 f"{', '.join(f'{t}@{l}' for t, l in lacking)}; restrict the comparison's "
                                 f"tasks/lengths or drop the method")
        baseline = rc.get("baseline")
        if baseline is not None and baseline not in cm:
            if args.methods:
                baseline = None
            else:
                raise UsageError(f"comparison {name}: baseline {baseline} is not among its methods")
        comparisons.append(Comparison(name=name, methods=cm, baseline=baseline,
                                      tasks=sorted({c[0] for c in ccells}),
                                      lengths=sorted({c[1] for c in ccells})))

    launcher = _as_list(get("launcher"), "launcher")
    return Sweep(
        root=Path(get("root_dir")), benchmark=str(get("benchmark")), subset=str(get("subset")),
        model=str(get("model")), tokenizer_path=str(get("tokenizer_path")),
        tokenizer_type=str(get("tokenizer_type")), model_template_type=get("model_template_type"),
        random_seed=_int(get("random_seed"), "random_seed", 0), cells=cells, num_samples=counts,
        prepare_args=render_flags(cfg.get("prepare_args") or {}, "prepare_args"),
        call_api_args=_flag_map(cfg.get("call_api_args") if cfg.get("call_api_args") is not None
                                else DEFAULTS["call_api_args"], "call_api_args"),
        launcher=launcher, methods=methods, comparisons=comparisons,
        python=args.python or cfg.get("python") or sys.executable, notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------

@dataclass
class Step:
    kind: str                   # prepare | predict | evaluate | compare
    label: str
    cmd: list
    skip: str | None = None     # reason when skipped
    stamp: dict | None = None   # prepare: what to write after success
    data_file: Path | None = None
    expect_lines: int | None = None
    remove_first: Path | None = None


def _script(path: Path) -> str:
    rel = os.path.relpath(path, os.getcwd())
    return rel if not rel.startswith("..") else str(path)


def data_dir(sw: Sweep, length) -> Path:
    return sw.root / "pred" / DATA_DIR_NAME / str(length)


def pred_dir(sw: Sweep, method: str, length) -> Path:
    return sw.root / "pred" / method / str(length)


def _sample_keys(path: Path, data: bool):
    """Multiset of sample keys (index, sha256 of the prompt) of a data file or a prediction file, as call_api.py
    keys its resume (prediction_files.sample_key)."""
    if data:
        return data_keys(path)
    keys = Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                keys[sample_key(rec["index"], rec["input"])] += 1
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                continue  # a torn last line: call_api.py repairs it on resume
    return keys


def prediction_files(folder: Path, task: str):
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.glob(f"{task}*.jsonl")):
        m = CHUNK_RE.match(p.name)
        if p.name == f"{task}.jsonl" or (m and m.group("task") == task):
            out.append(p)
    return out


def predictions_complete(data_file: Path, files) -> tuple[bool, str]:
    """Whether the prediction files hold every sample of the data file. Chunk files, when there
    are any, are the record (evaluate.py's merged {task}.jsonl is derived from them)."""
    if not data_file.is_file():
        return False, "no data yet"
    want = _sample_keys(data_file, data=True)
    if not want:
        return False, "empty data file"
    chunks = [f for f in files if CHUNK_RE.match(f.name)]
    have = Counter()
    for f in chunks or files:
        have += _sample_keys(f, data=False)
    missing = sum((want - have).values())
    if missing:
        return False, f"{missing} of {sum(want.values())} samples to predict"
    return True, f"all {sum(want.values())} samples predicted"


def prepare_command(sw: Sweep, task, length, n):
    args = ["--save_dir", str(data_dir(sw, length)), "--benchmark", sw.benchmark, "--task", task,
            "--subset", sw.subset, "--tokenizer_path", sw.tokenizer_path,
            "--tokenizer_type", sw.tokenizer_type, "--max_seq_length", str(length),
            "--num_samples", str(n), "--random_seed", str(sw.random_seed)]
    if sw.model_template_type:
        args += ["--model_template_type", str(sw.model_template_type)]
    args += sw.prepare_args
    return [sw.python, _script(PREPARE)] + args, args[2:]  # the stamp leaves out --save_dir


def plan(sw: Sweep, phases=("prepare", "predict", "evaluate", "compare")):
    steps: list[Step] = []
    will_prepare = set()
    for task, length in sw.cells:
        n = sw.num_samples[(task, length)]
        cmd, stamp_args = prepare_command(sw, task, length, n)
        dfile = data_dir(sw, length) / task / f"{sw.subset}.jsonl"
        stamp_file = dfile.parent / STAMP
        reason = None
        if dfile.is_file() and stamp_file.is_file():
            try:
                stamp = json.loads(stamp_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                stamp = {}
            if stamp.get("args") != stamp_args:
                reason = "prepare arguments changed"
            elif stamp.get("sha256") != sha256_file(dfile):
                reason = "data file changed since it was prepared"
        elif dfile.is_file():
            reason = "data file has no stamp"
        else:
            reason = "no data yet"
        skip = None
        if reason is None:
            skip = f"data up to date ({dfile})"
        elif dfile.is_file():
            stale = [str(p) for m in _pred_method_dirs(sw) for p in prediction_files(m / str(length), task)]
            if stale and "prepare" in phases:
                raise UsageError(f"{task}@{length}: data would be regenerated ({reason}) but predictions "
                                 f"on the old data exist: {', '.join(stale[:4])}"
                                 f"{' ...' if len(stale) > 4 else ''}; remove them with the data "
                                 f"({dfile}) or use another root_dir")
        if skip is None and "prepare" in phases:
            will_prepare.add((task, length))
        if "prepare" in phases:
            steps.append(Step("prepare", f"prepare {task}@{length}", cmd, skip,
                              stamp={"args": stamp_args}, data_file=dfile, expect_lines=n,
                              remove_first=dfile if (skip is None and dfile.is_file()) else None))
    predicted = set()
    for m in sw.methods.values():
        for task, length in sw.cells:
            if not m.covers((task, length)):
                continue
            if m.predictions is not None:       # read from a run.sh folder: nothing to predict or evaluate
                folder = ruler_run_dir(sw, m) / str(length) / "pred"
                if not prediction_files(folder, task):
                    raise UsageError(f"method {m.name}: {folder} holds no {task}.jsonl; run `bash eval/ruler/run.sh "
                                     f"MODEL {sw.benchmark}` with SEQ_LENGTHS including {length} and TASKS {task} "
                                     f"first, or restrict the method's tasks/lengths")
                continue
            dfile = data_dir(sw, length) / task / f"{sw.subset}.jsonl"
            sdir = pred_dir(sw, m.name, length)
            fmap = OrderedDict(sw.call_api_args)
            fmap.update(m.args)
            if "--model_name_or_path" not in fmap:
                fmap["--model_name_or_path"] = [sw.model]
                fmap.move_to_end("--model_name_or_path", last=False)
            launcher = m.launcher or sw.launcher
            head = list(launcher) if launcher else [sw.python]
            cmd = head + [_script(CALL_API), "--data_dir", str(data_dir(sw, length)), "--save_dir",
                          str(sdir), "--benchmark", sw.benchmark, "--task", task, "--subset",
                          sw.subset] + _flatten(fmap)
            skip = None
            if (task, length) not in will_prepare:
                done, why = predictions_complete(dfile, prediction_files(sdir, task))
                if done:
                    skip = why
            if skip is None:
                predicted.add((m.name, length))
            if "predict" in phases:
                steps.append(Step("predict", f"predict {m.name} {task}@{length}", cmd, skip))
    if "evaluate" in phases:
        for m in sw.methods.values():
            if m.predictions is not None:
                continue
            for length in sorted({l for t, l in sw.cells if m.covers((t, l))}):
                sdir = pred_dir(sw, m.name, length)
                cmd = [sw.python, _script(EVALUATE), "--data_dir", str(sdir), "--benchmark", sw.benchmark]
                skip = None
                if (m.name, length) not in predicted:
                    preds = list(sdir.glob("*.jsonl")) if sdir.is_dir() else []
                    sums = list(sdir.glob("summary*.csv")) if sdir.is_dir() else []
                    if preds and sums and min(p.stat().st_mtime for p in sums) >= max(p.stat().st_mtime for p in preds):
                        skip = "summary newer than every prediction file"
                steps.append(Step("evaluate", f"evaluate {m.name}@{length}", cmd, skip))
    if "compare" in phases:
        for c in sw.comparisons:
            cmd = [sw.python, _script(COMPARE)]
            for m in c.methods:
                folder = sw.root / "pred" / m if sw.methods[m].predictions is None else ruler_run_dir(sw, sw.methods[m])
                cmd += ["--run", f"{m}={folder}"]
            if c.baseline:
                cmd += ["--baseline", c.baseline]
            cmd += ["--output_dir", str(sw.root / c.name), "--tasks", *c.tasks,
                    "--lengths", *[str(l) for l in c.lengths]]
            steps.append(Step("compare", f"compare {c.name}", cmd, None))
    return steps


def ruler_run_dir(sw: Sweep, method: Method) -> Path:
    """The {ROOT}/{MODEL}/{BENCHMARK} folder of a method read from RULER run.sh's results (its ``predictions``
    may also name {ROOT}/{MODEL}); it holds {length}/pred/{task}.jsonl."""
    folder = method.predictions
    return folder / sw.benchmark if (folder / sw.benchmark).is_dir() else folder


def _pred_method_dirs(sw: Sweep):
    base = sw.root / "pred"
    if not base.is_dir():
        return []
    return [d for d in sorted(base.iterdir()) if d.is_dir() and d.name != DATA_DIR_NAME]


# --------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------

def _log(sw: Sweep, entry):
    sw.root.mkdir(parents=True, exist_ok=True)
    with open(sw.root / "sweep_log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


class StepFailed(Exception):
    def __init__(self, step, rc, detail=""):
        self.step, self.rc, self.detail = step, rc, detail
        super().__init__(f"{step.label} failed (exit {rc}){detail}: {shlex.join(step.cmd)}")


_run_command = subprocess.run  # replaced in tests


def _length_of(step) -> int:
    """The cell length of a predict step (its label ends with ``@length``), for longest-first scheduling."""
    try:
        return int(step.label.rsplit("@", 1)[1])
    except (IndexError, ValueError):
        return 0


def gpu_devices(gpus: int, environ=None):
    """The CUDA_VISIBLE_DEVICES value of each of ``gpus`` GPUs, or None for 1 (nothing is set).

    They are the first ``gpus`` entries of the CUDA_VISIBLE_DEVICES the driver was given, else
    0 .. gpus-1.
    """
    if gpus < 1:
        raise UsageError(f"--gpus {gpus}: must be at least 1")
    if gpus == 1:
        return None
    environ = os.environ if environ is None else environ
    given = environ.get("CUDA_VISIBLE_DEVICES")
    if given is None:
        return [str(i) for i in range(gpus)]
    visible = [d.strip() for d in given.split(",") if d.strip()]
    if len(visible) < gpus:
        raise UsageError(f"--gpus {gpus}: CUDA_VISIBLE_DEVICES={given} names only {len(visible)} GPU(s)")
    return visible[:gpus]


class GpuSlots:
    """Which GPU a parallel predict job runs on: the one with the fewest running jobs, the lowest
    on a tie. Jobs started together therefore take GPU i mod N (job i of the first J); a job started
    when another ends takes the GPU that job freed, so no GPU is left idle while another holds
    more than its share."""

    def __init__(self, devices):
        import threading

        self.devices = list(devices)
        self.running = [0] * len(self.devices)
        self.lock = threading.Lock()

    def acquire(self) -> int:
        with self.lock:
            k = min(range(len(self.devices)), key=lambda j: (self.running[j], j))
            self.running[k] += 1
            return k

    def release(self, k: int) -> None:
        with self.lock:
            self.running[k] -= 1


def is_distributed(cmd) -> bool:
    """Whether a step is started by torchrun (``torchrun`` or ``python -m torch.distributed.run``):
    such a step spreads itself over every visible GPU, so it never runs beside other jobs."""
    head = cmd[:next((i for i, c in enumerate(cmd) if c.endswith(".py")), len(cmd))]
    return any(Path(c).name == "torchrun" or c == "torch.distributed.run" for c in head)


def _before(step):
    """A prepare step that regenerates data removes the old file and its stamp first."""
    if step.remove_first is not None and step.remove_first.exists():
        step.remove_first.unlink()
        stamp = step.remove_first.parent / STAMP
        if stamp.exists():
            stamp.unlink()


def _after(step):
    """A prepare step must have written its data file with the expected number of samples; then its
    stamp (arguments, sha256) is written. Raises StepFailed otherwise."""
    if step.kind != "prepare":
        return
    if not step.data_file.is_file():
        raise StepFailed(step, 1, f": it wrote no {step.data_file}")
    with open(step.data_file, encoding="utf-8") as f:
        lines = sum(1 for line in f if line.strip())
    if lines != step.expect_lines:
        raise StepFailed(step, 1, f": {step.data_file} has {lines} samples, expected {step.expect_lines}")
    stamp = dict(step.stamp, sha256=sha256_file(step.data_file), samples=lines,
                 prepared=_dt.datetime.now().isoformat(timespec="seconds"))
    (step.data_file.parent / STAMP).write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")


def _run_parallel(sw: Sweep, pending, total: int, jobs: int, runner, out, gpus: int = 1):
    """Run independent steps ``pending`` ([(number in the plan, step)], all of one kind) ``jobs`` at a
    time, longest cells first (``total``: steps in the plan, for the [i/total] lines).

    Each step's output goes to ``{root}/pred/_logs/<label>.log`` (git-ignored with the predictions);
    one line per start and end is printed. Every step runs to its end even if another fails (each
    resumes by itself next time); the first failure is raised afterwards. With ``gpus`` > 1 each
    step sees one GPU (CUDA_VISIBLE_DEVICES, chosen by :class:`GpuSlots`), named in its lines and
    its sweep_log entry.
    """
    import concurrent.futures as cf
    import threading

    log_dir = sw.root / "pred" / "_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    lock = threading.Lock()
    devices = gpu_devices(gpus)
    slots = GpuSlots(devices) if devices else None

    def say(line):
        with lock:                       # one line at a time: workers print concurrently
            out.write(line + "\n")
            out.flush()

    def one(item):
        i, step = item
        log = log_dir / (re.sub(r"[^A-Za-z0-9_.@-]+", "_", step.label) + ".log")
        slot = slots.acquire() if slots else None
        gpu = devices[slot] if slots else None
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu) if slots else None
        try:
            say(f"[{i}/{total}] start {step.label}" + (f" on GPU {gpu}" if slots else "") + f" (log {log})")
            _before(step)
            t0 = time.time()
            started = _dt.datetime.now().isoformat(timespec="seconds")
            with open(log, "a", encoding="utf-8") as fh:
                fh.write((f"+ CUDA_VISIBLE_DEVICES={gpu} " if slots else "+ ") + shlex.join(step.cmd) + "\n")
                fh.flush()
                kwargs = {"env": env} if slots else {}
                rc = runner(step.cmd, stdout=fh, stderr=subprocess.STDOUT, **kwargs).returncode
        finally:
            if slots:
                slots.release(slot)
        seconds = round(time.time() - t0, 3)
        entry = {"started": started, "step": step.kind, "label": step.label, "rc": rc,
                 "seconds": seconds, "cmd": step.cmd, "jobs": jobs}
        if slots:
            entry.update(gpus=gpus, cuda_visible_devices=gpu)
        with lock:
            _log(sw, entry)
        say(f"[{i}/{total}] done {step.label}: exit {rc} in {seconds:.0f} s")
        if rc != 0:
            failures.append(StepFailed(step, rc, f" (log {log})"))
            return
        try:
            _after(step)
        except StepFailed as exc:
            failures.append(exc)

    order = sorted(pending, key=lambda it: -_length_of(it[1]))
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, order))
    if failures:
        raise failures[0]


def _run_one(sw: Sweep, i: int, total: int, step, runner, out):
    """Run one step in the foreground (its output on ours); raise StepFailed when it fails."""
    if step.skip:
        print(f"[{i}/{total}] skip {step.label}: {step.skip}", file=out, flush=True)
        return
    print(f"[{i}/{total}] {step.label}\n+ {shlex.join(step.cmd)}", file=out, flush=True)
    _before(step)
    t0 = time.time()
    started = _dt.datetime.now().isoformat(timespec="seconds")
    rc = runner(step.cmd).returncode
    seconds = round(time.time() - t0, 3)
    _log(sw, {"started": started, "step": step.kind, "label": step.label, "rc": rc,
              "seconds": seconds, "cmd": step.cmd})
    if rc != 0:
        raise StepFailed(step, rc)
    _after(step)


POOLED_KINDS = ("prepare", "predict", "evaluate")   # steps of these kinds write files of their own cell


def execute(sw: Sweep, steps, runner=None, out=None, jobs: int = 1, gpus: int = 1):
    """Run the plan in order; with ``jobs`` > 1 the pending steps of each phase run that many at a time.

    Prepare steps (one data file per cell), predict steps (one method/length/task file each) and
    evaluate steps (one method/length folder each) are independent within their phase, so with
    ``jobs`` > 1 each phase runs as a pool, the phases one after another in the sequential order,
    and compare runs last. A small model that leaves the GPU idle at batch 1 can so serve several
    prompt streams at once, and the CPU-bound data generation and scoring use several cores. With
    ``gpus`` N > 1 the parallel predict jobs are spread over N GPUs, one GPU each (see
    :class:`GpuSlots`). Predict steps started by torchrun (:func:`is_distributed`) never run in
    parallel: they run alone, one after another, after the others, and see every GPU. A failure
    in a pool stops the sweep once that pool has finished.
    """
    runner = runner or _run_command
    out = out or sys.stdout
    numbered = list(enumerate(steps, 1))
    if jobs <= 1:
        for i, step in numbered:
            _run_one(sw, i, len(steps), step, runner, out)
        return
    for kind in ("prepare", "predict", "evaluate", "compare"):
        group = [(i, s) for i, s in numbered if s.kind == kind]
        pooled = [(i, s) for i, s in group if not s.skip and kind in POOLED_KINDS and not is_distributed(s.cmd)]
        if len(pooled) < 2:
            pooled = []
        for i, s in group:
            if s.skip:
                print(f"[{i}/{len(steps)}] skip {s.label}: {s.skip}", file=out, flush=True)
        if pooled:
            _run_parallel(sw, pooled, len(steps), jobs, runner, out, gpus=gpus if kind == "predict" else 1)
        in_pool = {i for i, _ in pooled}
        for i, s in group:
            if not s.skip and i not in in_pool:
                _run_one(sw, i, len(steps), s, runner, out)


def print_plan(sw: Sweep, steps, out=None):
    out = out or sys.stdout
    for note in sw.notes:
        print(f"# {note}", file=out)
    for step in steps:
        if step.skip:
            print(f"# skip ({step.skip}): {shlex.join(step.cmd)}", file=out)
        else:
            print(shlex.join(step.cmd), file=out)


def build_parser():
    p = OneLineParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("config_file", nargs="?", help="sweep yaml (same as --config)")
    p.add_argument("--config", help="sweep yaml, e.g. eval/ruler/sweeps/demo.yaml")
    p.add_argument("--root_dir", help="where data, predictions and comparisons go")
    p.add_argument("--lengths", nargs="+", help="max_seq_length values (replace the config's cells)")
    p.add_argument("--tasks", nargs="+", help="tasks (replace the config's cells)")
    p.add_argument("--cells_from", metavar="COMPARISON_JSON",
                   help="comparison.json whose run scores pick the cells (overrides the config's path)")
    p.add_argument("--num_samples", type=int, help="samples per cell (drops num_samples_overrides)")
    p.add_argument("--model", help="call_api --model_name_or_path for methods that set none")
    p.add_argument("--tokenizer_path", help="prepare.py --tokenizer_path")
    p.add_argument("--methods", nargs="+", help="run only these methods of the config")
    p.add_argument("--method", action="append", metavar='NAME="FLAGS"',
                   help='add a method: NAME="--server_type SketchWalk --top_k_blocks 8"; repeat')
    p.add_argument("--only", nargs="+", choices=["prepare", "predict", "evaluate", "compare"],
                   help="run only these phases")
    p.add_argument("--python", help="interpreter for the scripts (default: this one)")
    p.add_argument("--jobs", type=int, default=1,
                   help="prepare, predict and evaluate steps run at once, phase after phase (a small model at "
                        "batch 1 leaves the GPU idle; default 1)")
    p.add_argument("--gpus", type=int, default=1,
                   help="with --jobs > 1: spread the parallel predict steps over this many GPUs, one GPU "
                        "each (CUDA_VISIBLE_DEVICES; the fewest running jobs first, so job i of the first "
                        "J takes GPU i mod N); steps launched by torchrun run alone on every GPU. "
                        "Default 1: every job sees what the driver sees (call_api uses cuda:0)")
    p.add_argument("--dry_run", action="store_true", help="print the commands; run nothing")
    return p


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.config_file and args.config:
        raise UsageError("give the config once (positional or --config)")
    args.config = args.config or args.config_file
    cfg = load_config(args.config)
    sw = build_sweep(cfg, args)
    phases = tuple(args.only) if args.only else ("prepare", "predict", "evaluate", "compare")
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: must be at least 1")
    if args.gpus > 1 and args.jobs == 1:
        raise UsageError(f"--gpus {args.gpus} with --jobs 1: one predict step at a time runs on one GPU; give "
                         f"--jobs {args.gpus} or more to use {args.gpus} GPUs (or run call_api.py under torchrun)")
    gpu_devices(args.gpus)               # checks --gpus against CUDA_VISIBLE_DEVICES before any step
    steps = plan(sw, phases)
    if args.dry_run:
        print_plan(sw, steps)
        return 0
    for note in sw.notes:
        print(note, flush=True)
    try:
        execute(sw, steps, jobs=args.jobs, gpus=args.gpus)
    except StepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.rc if 0 < exc.rc < 256 else 1
    todo = sum(1 for s in steps if not s.skip)
    print(f"sweep done: {todo} step(s) ran, {len(steps) - todo} skipped; log in {sw.root / 'sweep_log.jsonl'}")
    for c in sw.comparisons:
        print(f"report: {sw.root / c.name / 'comparison_report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
