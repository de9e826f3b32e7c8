"""
Prepare prediction jsonl with field `pred` (RULER's call_api.py, local models only).

dataset jsonl ({data_dir}/{task}/{subset}.jsonl):
{"index": int, "input": str, "outputs": [str], "answer_prefix": str, "length": int, ...}

prediction jsonl ({save_dir}/{task}.jsonl, or {task}-{chunk_idx}.jsonl when chunked):
{"index": int, "pred": str, "input": str (input + answer_prefix, the prompt given to the model),
 "outputs": [str], "others": {...}, "truncation": int, "length": int, "depth": ... (when the data has it)}

``others`` holds, per sample: prefill_s, decode_s, prompt_tokens, new_tokens, stop_reason,
batch_size, method, and for the sparse methods density {prefill, decode, overall} plus
density_per_layer (prefill), density_per_layer_decode and density_by_layer_type (sparse / dense /
sliding-window layers apart).

Server types: ``hf`` (dense), ``SketchWalk``, ``SeerAttn`` (case-insensitive), and any method added to
the registry (eval/ruler/pred/registry.py), which supplies each one's flags, knobs, checkpoints and
wrapper. Differences from NVIDIA/RULER, all deliberate:

* --temperature defaults to 0.0 (greedy); RULER's call_api defaults to 1.0 and its run.sh
  passes 0.0.
* --max_new_tokens overrides the task's tokens_to_generate.
* The run is resumable: records are appended one line at a time (flush + fsync); a restart
  skips the samples already written and removes a last line cut short by a kill. A small
  manifest next to the predictions (manifest-{task}.json, or manifest-{task}-{chunk_idx}.json)
  records the server type, model, dtype and every knob; resuming with a different one is an
  error (exit 2) unless --overwrite, which restarts this prediction file.
* --chunk_idx/--chunk_amount split the data file itself into contiguous chunks (sizes as in
  RULER's prepare.py) and name the output {task}-{chunk_idx}.jsonl; evaluate.py merges them.
  Under torchrun (WORLD_SIZE > 1) rank RANK predicts chunk RANK of WORLD_SIZE on
  cuda:LOCAL_RANK (CPU and gloo when there is no GPU).
* Flags of another server type are ignored with a one-line warning; --threads is accepted and
  ignored (RULER also forces 1 thread for hf).
* One writer per prediction file: an advisory lock (flock on .{file}.lock beside it, taken before
  anything is written; the kernel drops it when the process dies, so a killed run still resumes).
  A second process on the same file stops with one line naming the file and the holder's PID.
* Checked before the model loads: an empty data file, a --save_dir that cannot be written, and
  prompts that with max_new_tokens pass the model's positions (max_position_embeddings): an error
  naming the limit, unless --truncate_to_positions, which cuts such a prompt's middle (recorded in
  the manifest's key and each record's others.truncated_tokens). RULER sizes prompts when it
  prepares them and has no such cut; the middle cut is LongBench's.
* The manifest's ``data`` gives the data file and, from prepare.py's record beside it
  ({subset}.prepare.json), the max_seq_length it was made for (compare_results.py reports it).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import importlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from eval.ruler.cli import OneLineParser, UsageError, cli_main, warn
from eval.ruler.model_loader import sha256_file
from eval.ruler.pred import registry
from eval.ruler.pred.prediction_files import (lock_for_writing, prompt_of, read_data_settings, sample_key,
                                              write_json_atomic)
from eval.ruler.pred.servers import Server

RULER_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARSE_FLAGS = ["attn_backend"]          # flags every sparse server type takes

# tokens_to_generate of RULER's task types: used only when eval/ruler/data/{benchmark}/constants.py
# cannot be read.
_FALLBACK_TOKENS_TO_GENERATE = {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120,
                                "freq_words_extraction": 50, "qa": 32}

def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--attn_backend", default=None, choices=["auto", "triton", "torch"],
                        help="sparse attention kernels (sparse server types; default auto)")
    # off by default until tests/test_graph_decode.py has passed on a GPU (so far checked on the CPU and under
    # Triton's interpreter only: docs/PERFORMANCE.md); then the default becomes auto
    parser.add_argument("--graph_decode", default="off", choices=["auto", "on", "off"],
                        help="decode steps on a static KV cache, replayed as CUDA graphs (auto/on: on a GPU, for dense "
                             "and for the methods that support it; never on the CPU; off, the default for now: the "
                             "eager loop)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    parser.add_argument("--data_dir", type=Path, required=True, help="path to load the dataset jsonl files")
    parser.add_argument("--save_dir", type=Path, required=True, help="path to save the prediction jsonl files")
    parser.add_argument("--benchmark", type=str, default="synthetic", help="Options: [synthetic]")
    parser.add_argument("--task", type=str, required=True, help="Options: tasks in benchmark")
    parser.add_argument("--subset", type=str, default="validation", help="Options: validation or test")
    parser.add_argument("--chunk_idx", type=int, default=0, help="index of current split chunk")
    parser.add_argument("--chunk_amount", type=int, default=1, help="size of split chunk")
    # Server
    parser.add_argument("--server_type", default="hf",
                        help="; ".join(f"{s.server_type}: {s.help}" for s in registry.servers()))
    parser.add_argument("--model_name_or_path", type=str, default="smollm2",
                        help="alias smollm2, a .gguf file, a model folder, a hub name, or a checkpoint folder")
    add_model_flags(parser)
    # Inference
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (RULER's call_api default is 1.0)")
    parser.add_argument("--top_k", type=int, default=32)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--random_seed", type=int, default=0)
    parser.add_argument("--stop_words", type=str, default="", help="comma-separated stop strings")
    parser.add_argument("--threads", type=int, default=4, help="accepted for RULER compatibility; local models use 1")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="prompts per forward (left padded; sparse methods select per prompt, as at batch 1)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default: the task's tokens_to_generate")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="an untimed generation of the first prompt before timing: the whole of it on a GPU, its first 1,000 characters on the CPU (default on)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start this prediction file afresh even if it exists with another manifest")
    parser.add_argument("--truncate_to_positions", action="store_true",
                        help="cut the middle of a prompt that, with max_new_tokens, would pass the model's positions "
                             "(recorded in the manifest); without it such a prompt is an error before the model loads")
    registry.add_server_flags(parser)          # each method's own flags, in its own group
    return parser


# --------------------------------------------------------------------------- small helpers
def task_config(benchmark: str, task: str) -> Dict[str, Any]:
    """{'task': base type, 'args': ..., 'tokens_to_generate': int} from {benchmark}.yaml and
    data/{benchmark}/constants.py, as RULER reads them."""
    yaml_path = os.path.join(RULER_DIR, f"{benchmark}.yaml")
    eval_constants = os.path.join(RULER_DIR, "eval", benchmark, "constants.py")
    if os.path.isfile(yaml_path):
        import yaml

        with open(yaml_path, encoding="utf-8") as fh:
            tasks = yaml.safe_load(fh) or {}
        where = yaml_path
    elif os.path.isfile(eval_constants):
        types = getattr(importlib.import_module(f"eval.ruler.eval.{benchmark}.constants"), "DEFAULT_TASK_TYPES", {})
        tasks = {name: {"task": base, "args": {}} for name, base in types.items()}
        where = eval_constants
    else:
        raise UsageError(f"unknown --benchmark {benchmark!r}: no {yaml_path}")
    if task not in tasks:
        raise UsageError(f"unknown --task {task!r}: not in {where}; choose one of {', '.join(tasks)}")
    config = dict(tasks[task])
    base = config.get("task")
    data_constants = os.path.join(RULER_DIR, "data", benchmark, "constants.py")
    tokens = None
    if os.path.isfile(data_constants):
        base_tasks = getattr(importlib.import_module(f"eval.ruler.data.{benchmark}.constants"), "TASKS", {})
        tokens = (base_tasks.get(base) or {}).get("tokens_to_generate")
    if tokens is None:
        tokens = _FALLBACK_TOKENS_TO_GENERATE.get(base)
    if tokens is None:
        raise UsageError(f"task {task!r} has task type {base!r} with no tokens_to_generate; pass --max_new_tokens")
    config["tokens_to_generate"] = int(tokens)
    return config


def load_samples(task_file: Path) -> List[Dict[str, Any]]:
    if not task_file.is_file():
        raise UsageError(f"data file {task_file} not found; generate it first (eval/ruler/data/prepare.py or "
                         f"eval/ruler/data/synthetic/generate_niah_single_1.py)")
    samples = []
    with open(task_file, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(f"{task_file}:{lineno} is not a JSON line") from None
            if not isinstance(sample, dict) or "input" not in sample or "outputs" not in sample:
                raise UsageError(f"{task_file}:{lineno} has no 'input' and 'outputs' fields")
            sample.setdefault("index", lineno - 1)
            samples.append(sample)
    if not samples:
        raise UsageError(f"data file {task_file} holds no samples; generate it again (eval/ruler/data/prepare.py)")
    return samples


def chunk_bounds(n: int, chunk_idx: int, chunk_amount: int):
    """[start, stop) of chunk ``chunk_idx``: RULER's prepare.py sizes (the first n % k chunks get one more)."""
    sizes = [n // chunk_amount + (1 if i < n % chunk_amount else 0) for i in range(chunk_amount)]
    start = sum(sizes[:chunk_idx])
    return start, start + sizes[chunk_idx]


def _norm_model(name: str) -> str:
    expanded = os.path.expanduser(name)
    return os.path.realpath(expanded) if os.path.exists(expanded) else name


def resolve_model_arg(server: Server, name: Optional[str], base_model: Optional[str] = None) -> Dict[str, Any]:
    """What to load: {'model': base model argument, 'checkpoint': folder or None, 'ckpt': its config}."""
    from eval.ruler.model_loader import resolve_model

    server_type = server.server_type
    name = name or "smollm2"
    expanded = os.path.expanduser(name)
    ckpt = registry.read_checkpoint(expanded) if os.path.isdir(expanded) else None
    if ckpt is not None:
        method = ckpt.get("method")
        if server.checkpoint and method != server.checkpoint:
            raise UsageError(f"{name} is a {method} checkpoint, not one for --server_type {server_type}")
        base = ckpt.get("base_model")
        if base_model and base and _norm_model(base_model) != _norm_model(base):
            warn(f"--base_model {base_model} replaces the checkpoint's base_model {base}")
        base = base_model or base
        if not base:
            raise UsageError(f"checkpoint {name} names no base_model in its config.json")
        if not server.sparse:
            warn(f"{name} is a {method} checkpoint: --server_type {server_type} runs its base model {base} densely")
        resolve_model(base)
        return {"model": base, "checkpoint": os.path.realpath(expanded), "ckpt": ckpt}
    if server.needs_checkpoint:
        if not os.path.exists(expanded):
            raise UsageError(f"{server_type} checkpoint {name} does not exist; pass a folder whose config.json has "
                             f"\"method\": \"{server.checkpoint}\" (trained weights and base_model)")
        raise UsageError(f"{name} is not a {server_type} checkpoint (no config.json with "
                         f"\"method\": \"{server.checkpoint}\")")
    try:
        resolve_model(name)
    except UsageError as exc:
        if server.model_hint and not os.path.exists(expanded) and "does not exist" in str(exc):
            raise UsageError(f"{exc}; {server.model_hint}") from None
        raise
    if base_model:
        warn(f"--base_model {base_model} ignored: {name} is a model, not a checkpoint folder")
    return {"model": name, "checkpoint": None, "ckpt": None}


VOLATILE_CHECKPOINT_KEYS = {"created", "inactive_knobs"}


def checkpoint_fingerprint(folder: Optional[str]) -> Optional[Dict[str, str]]:
    """sha256 of each file of a checkpoint folder but config.json (e.g. SeerAttn's trained gates),
    so that retrained weights cannot be resumed into an old run."""
    if not folder:
        return None
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name == "config.json" or name.startswith(".") or not os.path.isfile(path):
            continue
        out[name] = sha256_file(path)
    return out


def versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# --------------------------------------------------------------------------- prediction file
def read_done(pred_file: Path, repair: bool) -> collections.Counter:
    """Keys of the records already in ``pred_file``; with ``repair``, cut a partial last line.

    Resumption is keyed on (index, sha256 of the prompt), a multiset, not on index alone: an
    upstream generator can repeat niah's index (RULER's own call_api skips by index and would
    drop such samples), and line order breaks when chunks or batches change. A sample that
    appears twice in the data is predicted twice, each once.
    """
    done: collections.Counter = collections.Counter()
    if not pred_file.exists():
        return done
    data = pred_file.read_bytes()
    if data and not data.endswith(b"\n"):
        # Each record is written as one line ending in '\n' and then fsync'ed, so bytes after the
        # last '\n' are a record cut short by a kill: drop them.
        cut = data.rfind(b"\n") + 1
        data = data[:cut]
        if repair:
            with open(pred_file, "r+b") as fh:
                fh.truncate(cut)
                fh.flush()
                os.fsync(fh.fileno())
            warn(f"{pred_file}: removed a truncated last line (a killed run)")
    for lineno, line in enumerate(data.split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            done[sample_key(rec["index"], rec["input"])] += 1
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"{pred_file}:{lineno} is not a prediction record; remove it or pass --overwrite") from None
    return done


class PredictionWriter:
    """Appends one JSON record a line; each line is flushed and fsync'ed before the next sample."""

    def __init__(self, path: Path):
        self.fh = open(path, "ab")

    def write(self, record: Dict[str, Any]) -> None:
        self.fh.write((json.dumps(record) + "\n").encode("utf-8"))
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


# --------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Plan:
    args: argparse.Namespace
    server: Server
    task: Dict[str, Any]
    task_file: Path
    pred_file: Path
    manifest_file: Path
    samples: List[Dict[str, Any]]     # this chunk's samples
    model: Dict[str, Any]             # resolve_model_arg's answer
    knobs: Any                        # the server's resolved knobs (SketchWalkConfig, a dict, ...)
    max_new_tokens: int
    device: str
    dtype_name: str
    manifest_key: Dict[str, Any]
    data: Dict[str, Any] = dataclasses.field(default_factory=dict)   # the manifest's "data": file, prepare settings
    rank: int = 0
    world_size: int = 1

    @property
    def server_type(self) -> str:
        return self.server.server_type


def dist_env():
    """(world_size, rank, local_rank) from torchrun's environment; (1, 0, 0) without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError("WORLD_SIZE, RANK and LOCAL_RANK must be integers") from None
    return world, rank, local


def plan_run(args: argparse.Namespace, limit: Optional[int] = None, base_model: Optional[str] = None) -> Plan:
    """Validate everything and decide what to run; writes nothing and loads no weights."""
    server = registry.get(args.server_type)
    server_type = server.server_type
    for name, ok, rule in (("temperature", args.temperature >= 0, ">= 0"),
                           ("top_k", args.top_k >= 0, ">= 0"),
                           ("top_p", 0 < args.top_p <= 1, "in (0, 1]"),
                           ("batch_size", args.batch_size >= 1, ">= 1"),
                           ("threads", args.threads >= 1, ">= 1"),
                           ("chunk_amount", args.chunk_amount >= 1, ">= 1"),
                           ("chunk_idx", 0 <= args.chunk_idx < max(args.chunk_amount, 1), "in [0, chunk_amount)"),
                           ("max_new_tokens", args.max_new_tokens is None or args.max_new_tokens >= 1, ">= 1"),
                           ("threshold", args.threshold is None or args.threshold >= 0, ">= 0"),
                           ("nz_ratio", args.nz_ratio is None or 0 < args.nz_ratio <= 1, "in (0, 1]")):
        if not ok:
            raise UsageError(f"--{name} {getattr(args, name)}: must be {rule}")
    if limit is not None and limit < 1:
        raise UsageError(f"--num_samples {limit}: must be >= 1")
    server.preflight()            # checked now, not after the model has loaded

    ignored = [f for other in registry.servers() if other is not server for f in other.flags
               if f not in server.flags and getattr(args, f, None) is not None]
    if not server.sparse:
        ignored += [f for f in SPARSE_FLAGS if getattr(args, f, None) is not None]
    if ignored:
        warn(f"--server_type {server_type} ignores {' '.join('--' + f for f in ignored)}")

    world, rank, local = dist_env()
    chunk_idx, chunk_amount = args.chunk_idx, args.chunk_amount
    if world > 1:
        if chunk_amount > 1:
            raise UsageError("under torchrun each rank takes its own chunk: drop --chunk_idx/--chunk_amount")
        chunk_idx, chunk_amount = rank, world

    task = task_config(args.benchmark, args.task)
    task_file = Path(args.data_dir) / args.task / f"{args.subset}.jsonl"
    samples = all_samples = load_samples(task_file)
    if limit is not None:
        samples = samples[:limit]
    start, stop = chunk_bounds(len(samples), chunk_idx, chunk_amount)
    samples = samples[start:stop]

    model = resolve_model_arg(server, args.model_name_or_path, base_model)
    knobs = server.knobs(args, model["ckpt"])

    from eval.ruler.model_loader import pick_device, pick_dtype

    device = pick_device(args.device)
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{local}"
    dtype_name = str(pick_dtype(args.dtype, device)).replace("torch.", "")
    max_new_tokens = args.max_new_tokens or task["tokens_to_generate"]

    save_dir = Path(args.save_dir)
    stem = f"{args.task}-{chunk_idx}" if chunk_amount > 1 else args.task
    sampling = args.temperature > 0
    key = {
        "server_type": server_type,
        "model": _norm_model(model["model"]),
        "checkpoint": model["checkpoint"],
        # what the checkpoint holds; its time stamp and derived notes do not change the run
        "checkpoint_config": ({k: v for k, v in model["ckpt"].items() if k not in VOLATILE_CHECKPOINT_KEYS}
                              if model["ckpt"] else None),
        "checkpoint_files": checkpoint_fingerprint(model["checkpoint"]),
        "dtype": dtype_name,
        "device_type": device.split(":")[0],
        "benchmark": args.benchmark,
        "task": args.task,
        "subset": args.subset,
        "chunk_idx": chunk_idx,
        "chunk_amount": chunk_amount,
        "max_new_tokens": max_new_tokens,
        "temperature": args.temperature,
        # no effect when greedy: left out so that they cannot block a resume
        "top_k": args.top_k if sampling else None,
        "top_p": args.top_p if sampling else None,
        "random_seed": args.random_seed if sampling else None,
        "stop_words": list(args.stop_words_list),
        "attn_backend": (args.attn_backend or "auto") if server.sparse else None,
        "knobs": server.knobs_dict(knobs),
    }
    if args.truncate_to_positions:       # only when asked: manifests of runs without it stay as they were
        key["truncate_to_positions"] = True
    prepared = read_data_settings(task_file) or {}
    data = {"file": str(task_file.resolve()), "samples_in_file": len(all_samples),
            "max_seq_length": prepared.get("max_seq_length"), "prepared": prepared or None}
    return Plan(args=args, server=server, task=task, task_file=task_file,
                pred_file=save_dir / f"{stem}.jsonl", manifest_file=save_dir / f"manifest-{stem}.json",
                samples=samples, model=model, knobs=knobs, max_new_tokens=max_new_tokens,
                device=device, dtype_name=dtype_name, manifest_key=key, data=data, rank=rank, world_size=world)


def check_manifest(plan: Plan) -> None:
    """Error (exit 2) when this prediction file belongs to another run, unless --overwrite."""
    if plan.args.overwrite:
        return
    if plan.manifest_file.exists():
        try:
            old = json.loads(plan.manifest_file.read_text(encoding="utf-8")).get("key")
        except (json.JSONDecodeError, AttributeError):
            raise UsageError(f"{plan.manifest_file} is unreadable; pass --overwrite to start afresh") from None
        new = json.loads(json.dumps(plan.manifest_key))  # tuples -> lists, as read back
        if old != new:
            diff = sorted(k for k in set(old or {}) | set(new) if (old or {}).get(k) != new.get(k))
            raise UsageError(f"{plan.pred_file} belongs to a run with other settings ({', '.join(diff)} differ, "
                             f"see {plan.manifest_file}); use another --save_dir or pass --overwrite")
    elif plan.pred_file.exists() and plan.pred_file.stat().st_size > 0:
        raise UsageError(f"{plan.pred_file} exists without its manifest {plan.manifest_file.name}; "
                         f"use another --save_dir or pass --overwrite")



def make_llm(plan: Plan):
    """Build the wrapper of the plan's server type (loads the model)."""
    args = plan.args
    return plan.server.make_wrapper(plan.model["model"], plan.knobs, plan.model["checkpoint"],
                                    args.attn_backend or "auto", temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, stop=args.stop_words_list, max_new_tokens=plan.max_new_tokens,
                                    random_seed=args.random_seed, dtype=args.dtype, device=plan.device,
                                    graph_decode=getattr(args, "graph_decode", "off"))


def check_positions(plan: Plan, pending: List[Dict[str, Any]], llm=None) -> Optional[int]:
    """Refuse, before the model runs, prompts that with max_new_tokens pass the model's positions (their answers
    are not meaningful, dense and sparse alike); with --truncate_to_positions return how many prompt tokens a
    prompt may keep instead (its middle is cut). The tokenizer and config come from ``llm`` when given, else
    they are loaded without the weights."""
    from eval.ruler.model_loader import config_positions, load_tokenizer, max_positions

    if llm is not None:
        tokenizer, limit = llm.tokenizer, config_positions(llm.model.config)
    else:
        tokenizer, limit = load_tokenizer(plan.model["model"]), max_positions(plan.model["model"])
    if limit is None:
        return None
    room = limit - plan.max_new_tokens
    if plan.args.truncate_to_positions:
        if room < 1:
            raise UsageError(f"--max_new_tokens {plan.max_new_tokens} leaves no room for a prompt in "
                             f"{plan.model['model']}'s {limit} positions; lower it")
        return room
    over = []
    for sample in pending:
        tokens = len(tokenizer(prompt_of(sample), add_special_tokens=False)["input_ids"])
        if tokens > room:
            over.append((sample["index"], tokens))
    if over:
        index, tokens = over[0]
        raise UsageError(
            f"{plan.task_file}: {len(over)} of {len(pending)} prompts pass {plan.model['model']}'s {limit} positions "
            f"(index {index}: {tokens} prompt tokens + {plan.max_new_tokens} to generate); prepare the data with "
            f"--max_seq_length {limit} or less, lower --max_new_tokens, or pass --truncate_to_positions to cut the "
            f"middle of such prompts")
    return None


def execute(plan: Plan, llm=None) -> Path:
    """Predict the plan's pending samples into its prediction file; returns that file.

    The file's lock is taken first (one writer; an unwritable --save_dir is reported here), then everything
    that can be checked without the weights (the manifest, the samples left, their lengths), then the model
    loads and records are appended.
    """
    lock = lock_for_writing(plan.pred_file)
    try:
        return _execute_locked(plan, llm)
    finally:
        lock.close()


def _execute_locked(plan: Plan, llm) -> Path:
    from tqdm import tqdm

    args = plan.args
    check_manifest(plan)
    done = read_done(plan.pred_file, repair=False) if not args.overwrite else collections.Counter()
    pending = []
    for sample in plan.samples:
        key = sample_key(sample["index"], prompt_of(sample))
        if done[key] > 0:
            done[key] -= 1
        else:
            pending.append(sample)
    if not plan.samples:
        print(f"chunk {plan.manifest_key['chunk_idx']} of {plan.manifest_key['chunk_amount']} holds no sample of "
              f"{plan.task_file}; nothing to predict", file=sys.stderr)
        return plan.pred_file
    if not pending and plan.manifest_file.exists() and not args.overwrite:
        read_done(plan.pred_file, repair=True)
        print(f"all {len(plan.samples)} samples already predicted", file=sys.stderr)
        return plan.pred_file
    keep_tokens = check_positions(plan, pending, llm)

    if llm is None:
        llm = make_llm(plan)
    else:
        llm.max_new_tokens = plan.max_new_tokens
    llm.max_prompt_tokens = keep_tokens
    batches = getattr(getattr(llm, "session", None), "padded_batches", False)   # sparse sessions that select per row
    if plan.server.sparse and args.batch_size > 1 and not batches:
        warn(f"--server_type {plan.server_type} runs one prompt at a time (per-sample state and density); "
             f"--batch_size {args.batch_size} only groups them")

    # Model loaded: from here on files are written.
    if args.overwrite and plan.pred_file.exists():
        plan.pred_file.unlink()
    manifest = {"key": plan.manifest_key, "session": llm.describe(), "versions": versions(),
                "inactive_knobs": plan.server.inactive_knobs(plan.knobs), "data": plan.data,
                "created": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(shlex.quote(a) for a in sys.argv)}
    if args.overwrite or not plan.manifest_file.exists():
        write_json_atomic(plan.manifest_file, manifest)
    read_done(plan.pred_file, repair=True)

    print(f"Predict {args.task} \nfrom {plan.task_file}\nto {plan.pred_file}", file=sys.stderr)
    if args.warmup and pending and hasattr(llm, "warmup"):
        llm.warmup(prompt_of(pending[0]))
    start = time.time()
    writer = PredictionWriter(plan.pred_file)
    bar = tqdm(total=len(plan.samples), initial=len(plan.samples) - len(pending), desc=f"{args.task}"
               + (f" rank {plan.rank}" if plan.world_size > 1 else ""), position=plan.rank if plan.world_size > 1 else None,
               file=sys.stderr)
    try:
        for b in range(0, len(pending), args.batch_size):
            batch = pending[b:b + args.batch_size]
            preds = llm.process_batch([prompt_of(s) for s in batch])
            for sample, pred in zip(batch, preds):
                text = pred["text"]
                text = text if isinstance(text, str) else (text[0] if len(text) > 0 else "")
                others = dict(sample.get("others") or {})
                others.update(pred.get("stats") or {})
                record = {"index": sample["index"], "pred": text, "input": prompt_of(sample),
                          "outputs": sample["outputs"], "others": others,
                          "truncation": sample.get("truncation", -1), "length": sample.get("length", -1)}
                if "depth" in sample:
                    record["depth"] = sample["depth"]
                writer.write(record)
                bar.update(1)
    finally:
        writer.close()
        bar.close()
    print(f"Used time: {round((time.time() - start) / 60, 1)} minutes", file=sys.stderr)
    return plan.pred_file


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(None if argv is None else [str(a) for a in argv])
    args.stop_words_list = [s for s in args.stop_words.split(",") if s]
    return args


def run(args: argparse.Namespace, limit: Optional[int] = None, base_model: Optional[str] = None, llm=None) -> Plan:
    """Plan, then predict; under torchrun, one chunk per rank and a barrier at the end."""
    plan = plan_run(args, limit=limit, base_model=base_model)
    if plan.world_size > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            # A rank that finishes early waits at the final barrier for the slowest: a long timeout.
            kwargs = {"timeout": datetime.timedelta(hours=12)}
            if plan.device.startswith("cuda"):
                torch.cuda.set_device(torch.device(plan.device))
                kwargs["device_id"] = torch.device(plan.device)
            dist.init_process_group(backend="nccl" if plan.device.startswith("cuda") else "gloo", **kwargs)
        try:
            execute(plan, llm=llm)
            dist.barrier()
        finally:
            dist.destroy_process_group()
    else:
        execute(plan, llm=llm)
    return plan


@cli_main
def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
