"""Generate niah_single_1 test data with needles at fixed depths (README_SKETCHWALK.md, Step 1).

    python eval/ruler/data/synthetic/generate_niah_single_1.py \\
        --save_dir ./eval/ruler/data --num_samples 5 --max_seq_length 4096 \\
        --tokens_to_generate 128 --tokenizer_path smollm2 --tokenizer_type hf

Writes {save_dir}/niah_single_1/validation.jsonl in the format of prepare.py. The task's
arguments come from niah_single_1 in eval/ruler/synthetic.yaml (haystack ``repeat``, key
``words``, value ``numbers``, one needle) and the prompts from the same generator (niah.py);
only the needle depths differ: sample i puts its needle at 10, 30, 50, 70 or 90% of the
haystack (depth i mod 5), where prepare.py draws a random depth. Each record's ``depth`` says
which.
"""
from __future__ import annotations

import argparse
import os
import time

import yaml

from eval.ruler.cli import OneLineParser, UsageError, cli_main
from eval.ruler.data.synthetic import niah
from eval.ruler.data.synthetic.common import (
    DATA_DIR,
    TASKS,
    Settings,
    TEMPLATE_TYPES,
    TOKENIZER_TYPES,
    non_negative_int,
    positive_int,
    select_template,
    select_tokenizer,
    add_position_limit_flag,
    check_position_limit,
    save_task_file,
)

TASK = "niah_single_1"
DEPTH_CYCLE = (10, 30, 50, 70, 90)
CONFIG_FILE = os.path.join(os.path.dirname(DATA_DIR), "synthetic.yaml")


def task_arguments() -> dict:
    """niah_single_1's generator arguments from eval/ruler/synthetic.yaml."""
    try:
        with open(CONFIG_FILE, encoding="utf-8") as f:
            entry = yaml.safe_load(f)[TASK]
        assert entry["task"] == "niah"
        return dict(entry.get("args") or {})
    except (OSError, yaml.YAMLError, KeyError, TypeError, AssertionError) as exc:
        raise UsageError(f"{CONFIG_FILE} has no usable '{TASK}' entry ({type(exc).__name__})") from exc


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Generate niah_single_1 data with needle depths 10/30/50/70/90%.")
    p.add_argument("--save_dir", type=str, default=DATA_DIR, help="dataset folder (default: eval/ruler/data)")
    p.add_argument("--num_samples", type=positive_int, default=5)
    p.add_argument("--max_seq_length", type=positive_int, default=4096,
                   help="max sequence length including all input tokens and generated tokens")
    p.add_argument("--tokens_to_generate", type=non_negative_int, default=TASKS["niah"]["tokens_to_generate"])
    p.add_argument("--tokenizer_path", type=str, default=None,
                   help="smollm2 (default), a .gguf file, a model folder or a hub name (hf); see prepare.py")
    p.add_argument("--tokenizer_type", type=str, default="hf", choices=TOKENIZER_TYPES)
    p.add_argument("--model_template_type", type=str, default=None, choices=TEMPLATE_TYPES,
                   help="default: chat when the tokenizer has a chat template, else base")
    p.add_argument("--random_seed", type=int, default=42)
    add_position_limit_flag(p)
    return p


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    started = time.time()
    task_args = task_arguments()
    tokenizer = select_tokenizer(args.tokenizer_type, args.tokenizer_path)
    check_position_limit(args.tokenizer_type, tokenizer, args.max_seq_length, args.ignore_position_limit)
    settings = Settings(task=TASK, tokenizer=tokenizer,
                        model_template=select_template(args.model_template_type, tokenizer),
                        max_seq_length=args.max_seq_length, tokens_to_generate=args.tokens_to_generate,
                        random_seed=args.random_seed)
    records = niah.generate(settings, args.num_samples, depth_cycle=DEPTH_CYCLE, **task_args)
    save_file = os.path.join(args.save_dir, TASK, "validation.jsonl")
    save_task_file(save_file, records, settings, tokenizer_type=args.tokenizer_type)
    print(f"Prepare {TASK} with lines: {len(records)} to {save_file} (depths "
          f"{', '.join(str(r['depth']) for r in records)}%; model template {settings.model_template.template_type}; "
          f"{time.time() - started:.1f} s)")


if __name__ == "__main__":
    main()
