"""Prepare RULER's synthetic tasks: jsonl files of templated prompts and their expected outputs.

    python eval/ruler/data/prepare.py --config_file eval/ruler/synthetic.yaml        # all 13 tasks
    python eval/ruler/data/prepare.py \\
        --save_dir ./eval/ruler/data --benchmark synthetic --task niah_single_1 \\
        --tokenizer_path smollm2 --tokenizer_type hf --max_seq_length 4096 \\
        --model_template_type chat --num_samples 10

Writes {save_dir}/{task}/{subset}.jsonl, one sample a line, in NVIDIA/RULER's format:
{index, input, outputs, length, length_w_model_temp, answer_prefix, token_position_answer} plus
``depth`` (needle depth in %, niah tasks; null otherwise). ``input`` is the prompt in the model
template; the server appends ``answer_prefix`` and tokenizes the text without adding special
tokens; ``length`` (that prompt + the task's tokens_to_generate) is at most --max_seq_length.

Flags are RULER's, with this project's defaults (--save_dir: this folder; --tokenizer_type hf;
--tokenizer_path smollm2; --max_seq_length 4096; --num_samples 5; --model_template_type: chat when
the tokenizer has a chat template, else base) and four additions:

* --config_file: the task yaml (default ../{benchmark}.yaml, as RULER); without --task every task
  in it is prepared in one run. --task also takes a comma-separated list.
* --essay_file: the essay haystack (default synthetic/json/PaulGrahamEssays.json).
* --qa_file: a QA file, ``PATH`` (every qa task) or ``squad=PATH`` / ``hotpotqa=PATH``; repeatable
  (defaults synthetic/json/squad.json and hotpotqa.json).

Unlike RULER's prepare.py, which runs each generator script in a shell, the generators run in
this process (the tokenizer loads once) and a failing task is reported, not swallowed: a task
whose data file is missing, or whose prompt cannot fit --max_seq_length, prints one
``error: {task}: ...`` line and writes nothing; the other tasks still run, and the exit status is 2.
Beside each data file, ``{subset}.prepare.json`` records how it was made (max_seq_length,
tokens_to_generate, tokenizer, template, seed, task arguments, the file's sha256): call_api.py's
manifest and the comparison report give the length from it. A --max_seq_length past the
positions of the tokenizer's model (max_position_embeddings; SmolLM2 8,192) is refused before
anything is generated, unless --ignore_position_limit (then a warning).

Files are replaced atomically and always regenerated (as SeerAttention's fork does; NVIDIA's
skips a file that already has --num_samples lines, whatever length it was made for).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time

import yaml

from eval.ruler.cli import OneLineParser, UsageError, cli_main, int_at_least
from eval.ruler.data.synthetic.common import add_position_limit_flag, check_position_limit
from eval.ruler.data.template import TEMPLATE_TYPES, select_template
from eval.ruler.data.tokenizer import TOKENIZER_TYPES, select_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULTS = {"max_seq_length": 4096, "num_samples": 5, "tokenizer_type": "hf"}




def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Prepare RULER synthetic task data (jsonl).")
    p.add_argument("--save_dir", type=str, default=HERE, help="dataset folder to save dataset (default: this folder)")
    p.add_argument("--benchmark", type=str, default="synthetic", help="Options: [synthetic]")
    p.add_argument("--task", type=str, default=None,
                   help="task(s) of the config, comma-separated; default with --config_file: all of them")
    p.add_argument("--subset", type=str, default="validation", help="Options: validation or test")
    p.add_argument("--tokenizer_path", type=str, default=None,
                   help="hf: smollm2 (default), a .gguf file, a model folder or a hub name; openai: an encoding; "
                        "nemo: the tokenizer model file")
    p.add_argument("--tokenizer_type", type=str, default=DEFAULTS["tokenizer_type"], choices=TOKENIZER_TYPES)
    p.add_argument("--max_seq_length", type=int_at_least(1), default=DEFAULTS["max_seq_length"],
                   help="max sequence length including all input tokens and generated tokens.")
    p.add_argument("--num_samples", type=int_at_least(1), default=DEFAULTS["num_samples"],
                   help="number of samples of each task")
    p.add_argument("--random_seed", type=int, default=42)
    p.add_argument("--model_template_type", type=str, default=None, choices=TEMPLATE_TYPES,
                   help="default: chat when the tokenizer has a chat template, else base")
    p.add_argument("--remove_newline_tab", action="store_true", help="remove `\\n` and `\\t` in all strings.")
    p.add_argument("--chunk_idx", type=int_at_least(0), default=0, help="index of current split chunk")
    p.add_argument("--chunk_amount", type=int_at_least(1), default=1, help="size of split chunk")
    p.add_argument("--config_file", type=str, default=None, help="task yaml (default: ../{benchmark}.yaml)")
    p.add_argument("--essay_file", type=str, default=None, help="essay haystack (PaulGrahamEssays.json format)")
    p.add_argument("--qa_file", type=str, action="append", default=[],
                   help="QA data: PATH, or squad=PATH / hotpotqa=PATH; repeatable")
    add_position_limit_flag(p)
    return p


def load_config(path: str, tasks_base: dict) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"--config_file {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config_file {path} is not valid yaml ({str(exc).splitlines()[0]})") from exc
    if not isinstance(config, dict) or not config:
        raise UsageError(f"--config_file {path} holds no tasks (expected: task name -> {{task: ..., args: ...}})")
    for name, entry in config.items():
        if not isinstance(entry, dict) or entry.get("task") not in tasks_base:
            raise UsageError(f"--config_file {path}: task {name} needs 'task:' one of {', '.join(tasks_base)}")
        if not isinstance(entry.get("args", {}) or {}, dict):
            raise UsageError(f"--config_file {path}: task {name}: 'args' must be a mapping")
    return config


def parse_qa_files(values, datasets) -> dict:
    """--qa_file values -> {dataset or '*': path}."""
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if sep and name in datasets:
            out[name] = path
        else:
            out["*"] = value
    return out


def chunk_sizes(num_samples: int, chunk_amount: int) -> list:
    """RULER's split of num_samples into chunk_amount nearly equal chunks."""
    return [num_samples // chunk_amount + (1 if i < num_samples % chunk_amount else 0) for i in range(chunk_amount)]


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()

    benchmark_dir = os.path.join(HERE, args.benchmark)
    if not os.path.isfile(os.path.join(benchmark_dir, "constants.py")):
        raise UsageError(f"--benchmark {args.benchmark} is unknown; the benchmark here is: synthetic")
    common = importlib.import_module(f"eval.ruler.data.{args.benchmark}.common")
    tasks_base = importlib.import_module(f"eval.ruler.data.{args.benchmark}.constants").TASKS

    config_file = args.config_file or os.path.join(os.path.dirname(HERE), f"{args.benchmark}.yaml")
    config = load_config(config_file, tasks_base)
    if args.task is None and args.config_file is None:
        raise UsageError("give --task (one or more tasks, comma-separated) or --config_file (every task in it)")
    tasks = list(config) if args.task is None else [t.strip() for t in args.task.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in config]
    if unknown or not tasks:
        raise UsageError(f"--task {','.join(unknown) or args.task}: unknown task; the tasks of {config_file} are: "
                         f"{', '.join(config)}")
    if args.chunk_idx >= args.chunk_amount:
        raise UsageError(f"--chunk_idx {args.chunk_idx} must be below --chunk_amount {args.chunk_amount}")
    chunks = chunk_sizes(args.num_samples, args.chunk_amount)
    num_samples, pre_samples = chunks[args.chunk_idx], sum(chunks[:args.chunk_idx])
    if num_samples == 0:
        raise UsageError(f"--chunk_idx {args.chunk_idx} of {args.chunk_amount} gets no sample of --num_samples "
                         f"{args.num_samples}")
    qa_files = parse_qa_files(args.qa_file, ("squad", "hotpotqa"))

    # every task's generator and arguments, checked before anything runs
    plans = []
    for task in tasks:
        kind, task_args = config[task]["task"], dict(config[task].get("args") or {})
        module = importlib.import_module(f"eval.ruler.data.{args.benchmark}.{kind}")
        accepted = inspect.signature(module.generate).parameters
        bad = [k for k in task_args if k not in accepted or k in ("settings", "num_samples", "pre_samples")]
        if bad:
            raise UsageError(f"{config_file}: task {task}: unknown argument(s) {', '.join(bad)} for generator {kind}")
        plans.append((task, kind, module, task_args))

    tokenizer = select_tokenizer(args.tokenizer_type, args.tokenizer_path)
    check_position_limit(args.tokenizer_type, tokenizer, args.max_seq_length, args.ignore_position_limit)
    model_template = select_template(args.model_template_type, tokenizer)
    print(f"tokenizer {tokenizer.name} ({args.tokenizer_type}), model template {model_template.template_type}, "
          f"max_seq_length {args.max_seq_length}, {num_samples} samples"
          + (f" (chunk {args.chunk_idx} of {args.chunk_amount})" if args.chunk_amount > 1 else "")
          + f", seed {args.random_seed + args.chunk_idx}", flush=True)

    failed = []
    for task, kind, module, task_args in plans:
        task_started = time.time()
        settings = common.Settings(
            task=task, tokenizer=tokenizer, model_template=model_template, max_seq_length=args.max_seq_length,
            tokens_to_generate=tasks_base[kind]["tokens_to_generate"],
            random_seed=args.random_seed + args.chunk_idx,  # RULER: each chunk its own seed
            remove_newline_tab=args.remove_newline_tab, essay_file=args.essay_file,
            qa_file=qa_files.get(task_args.get("dataset", "squad"), qa_files.get("*")) if kind == "qa" else None)
        try:
            records = module.generate(settings, num_samples, pre_samples=pre_samples, **task_args)
        except UsageError as exc:
            print(f"error: {task}: {exc}", file=sys.stderr, flush=True)
            failed.append(task)
            continue
        save_file = os.path.join(args.save_dir, task, f"{args.subset}.jsonl")
        common.save_task_file(save_file, records, settings, tokenizer_type=args.tokenizer_type,
                              benchmark=args.benchmark, task_args=task_args)
        print(f"Prepare {task} with lines: {len(records)} to {save_file} ({time.time() - task_started:.1f} s)",
              flush=True)

    print(f"Used time: {(time.time() - started) / 60:.1f} minutes")
    if failed:
        if len(plans) > 1:
            print(f"error: {len(failed)} of {len(plans)} tasks failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(2)
    return 0


if __name__ == "__main__":
    main()
