"""Common words extraction (RULER's cwe): name the ``num_cw`` words that repeat most in a numbered list.

``num_cw`` common words appear ``freq_cw`` times each and the other words ``freq_ucw`` times, in
a shuffled list "1. word 2. word ...". Below 4096 tokens RULER uses 6 and 1 repeats instead. A
worked example (a short list and its answer) comes first: one earlier turn in the model template.

Words come from wonderwords' noun, adjective and verb lists (8,166 distinct words). RULER switches
to json/english_words.json (NVIDIA/RULER's scripts/data/synthetic/json/english_words.json, a
git-lfs file) for lists of more distinct words than that, which only the longest contexts need
(about 128K tokens); that file is read only then, and its absence is reported then.

Standalone, with RULER's flags::

    python eval/ruler/data/synthetic/common_words_extraction.py --save_dir ./ --save_name cwe \\
        --tokenizer_path smollm2 --max_seq_length 4096 --num_samples 10 --freq_cw 30 --freq_ucw 3 --num_cw 10
"""
from __future__ import annotations

import json
import os
import random
from typing import List

from eval.ruler.data.synthetic.common import (
    JSON_DIR,
    Settings,
    UsageError,
    fit_sample,
    make_record,
    non_negative_int,
    positive_int,
    run_generator_cli,
    search_size,
    shown,
    wonderwords_list,
)

ENGLISH_WORDS = os.path.join(JSON_DIR, "english_words.json")


def generate(settings: Settings, num_samples: int, pre_samples: int = 0, *, freq_cw: int = 30, freq_ucw: int = 3,
             num_cw: int = 10, num_fewshot: int = 1) -> List[dict]:
    """Records of the cwe task."""
    for name, value in (("freq_cw", freq_cw), ("freq_ucw", freq_ucw), ("num_cw", num_cw)):
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"task {settings.task}: {name} must be a positive integer, got {value!r}")
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise UsageError(f"task {settings.task}: num_fewshot must be a non-negative integer, got {num_fewshot!r}")
    rng, _ = settings.rng()
    seed = settings.random_seed
    words = sorted(set(wonderwords_list("nounlist.txt") + wonderwords_list("adjectivelist.txt")
                       + wonderwords_list("verblist.txt")))
    random.Random(seed).shuffle(words)
    more_words: List[str] = []
    task_template, prefix_template = settings.templates("common_words_extraction")
    user_template = lambda context: task_template.format(num_cw=num_cw, context=context, query="")  # noqa: E731
    answer_prefix = prefix_template.format(num_cw=num_cw, query="")

    def example(num_words: int, common_repeats: int, uncommon_repeats: int):
        if num_words <= len(words):
            chosen = rng.sample(words, num_words)
        else:
            if not more_words:
                if not os.path.isfile(ENGLISH_WORDS):
                    raise UsageError(
                        f"task {settings.task} at --max_seq_length {settings.max_seq_length} needs more than "
                        f"{len(words)} distinct words: put NVIDIA/RULER's english_words.json "
                        f"(scripts/data/synthetic/json/, a git-lfs file) at {shown(ENGLISH_WORDS)}")
                with open(ENGLISH_WORDS, encoding="utf-8") as f:
                    more_words.extend(json.load(f).values())
            chosen = rng.sample(more_words, num_words)
        common, uncommon = chosen[:num_cw], chosen[num_cw:]
        listed = common * common_repeats + uncommon * uncommon_repeats
        random.Random(seed).shuffle(listed)  # RULER: the same permutation for every list of this length
        return " ".join(f"{i + 1}. {word}" for i, word in enumerate(listed)), common

    def build(num_words: int):
        history = []
        if settings.max_seq_length < 4096:
            shots = [example(20, 3, 1) for _ in range(num_fewshot)]
            context, answer = example(num_words, 6, 1)
        else:
            shots = [example(40, 10, 3) for _ in range(num_fewshot)]
            context, answer = example(num_words, freq_cw, freq_ucw)
        for shot_context, shot_answer in shots:
            reply = answer_prefix + " " + " ".join(f"{i + 1}. {word}" for i, word in enumerate(shot_answer))
            history.append((user_template(shot_context), reply))
        return settings.prompt(user_template(context), answer_prefix, history), answer

    incremental = 10
    # RULER estimates tokens per word from a 4096-word list and searches up to twice the estimate
    num_words = search_size(settings, build, incremental, estimate_size=4096, slack=2.0, minimum=num_cw)
    records = []
    for i in settings.sample_numbers(num_samples):
        length, prompt, answer = fit_sample(settings, build, num_words, incremental, minimum=num_cw)
        records.append(make_record(pre_samples + i, prompt, answer, length))
    return records


def _add_task_arguments(parser) -> None:
    parser.add_argument("--freq_cw", type=positive_int, default=30)
    parser.add_argument("--freq_ucw", type=positive_int, default=3)
    parser.add_argument("--num_cw", type=positive_int, default=10)
    parser.add_argument("--num_fewshot", type=non_negative_int, default=1)


def main(argv=None) -> None:
    run_generator_cli("common_words_extraction", generate, _add_task_arguments,
                      ("freq_cw", "freq_ucw", "num_cw", "num_fewshot"), argv)


if __name__ == "__main__":
    from eval.ruler.cli import cli_main
    cli_main(main)()
