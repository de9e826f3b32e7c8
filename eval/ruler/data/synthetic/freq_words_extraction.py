"""Frequent words extraction (RULER's fwe): name the three most frequent coded words of a text.

A vocabulary of random 6-letter "coded words" is drawn; word k (by rank) appears
``num_words * k**-alpha / zeta(alpha)`` times (a zeta distribution), and rank 1 is the noise
"..." that the question says to ignore, so the answer is ranks 2-4. As in RULER, the text length
is found by a linear search (not a binary one): grow the word count by 1/32 of the budget until
the prompt is too long, step back once; each sample then shrinks until it fits.

Standalone, with RULER's flags::

    python eval/ruler/data/synthetic/freq_words_extraction.py --save_dir ./ --save_name fwe \\
        --tokenizer_path smollm2 --max_seq_length 4096 --num_samples 10 --alpha 2.0
"""
from __future__ import annotations

import random
import string
from typing import List

import numpy as np

from eval.ruler.data.synthetic.common import (
    Settings,
    UsageError,
    make_record,
    positive_int,
    run_generator_cli,
    too_short,
    zeta,
)


def generate(settings: Settings, num_samples: int, pre_samples: int = 0, *, alpha: float = 2.0,
             coded_wordlen: int = 6, vocab_size: int = -1, add_fewshot: bool = False) -> List[dict]:
    """Records of the fwe task. ``add_fewshot`` is accepted and unused, as in RULER."""
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise UsageError(f"task {settings.task}: alpha must be a number, got {alpha!r}") from None
    if not alpha > 1:
        raise UsageError(f"task {settings.task}: alpha must be greater than 1, got {alpha}")
    if not isinstance(coded_wordlen, int) or coded_wordlen < 1:
        raise UsageError(f"task {settings.task}: coded_wordlen must be a positive integer, got {coded_wordlen!r}")
    rng, _ = settings.rng()
    seed = settings.random_seed
    z = zeta(alpha)
    task_template, prefix_template = settings.templates("freq_words_extraction")
    answer_prefix = prefix_template.format(query="")

    max_len = settings.max_seq_length - settings.tokens_to_generate  # budget of the prompt itself
    if vocab_size == -1:
        vocab_size = max_len // 50
    if vocab_size < 4:  # rank 1 is noise, ranks 2-4 the answer
        raise too_short(settings, settings.prompt(task_template.format(context="", query=""), answer_prefix))
    incremental = max(1, max_len // 32)

    def new_vocab() -> List[str]:
        vocab = ["".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)) for _ in range(vocab_size)]
        while len(set(vocab)) < vocab_size:
            vocab.append("".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)))
        vocab = sorted(set(vocab))
        random.Random(seed).shuffle(vocab)
        vocab[0] = "..."  # the top-ranked word is noise
        return vocab

    ranks = np.arange(1, vocab_size + 1)

    def text_for(vocab: List[str], num_words: int):
        counts = (num_words * (ranks ** -alpha) / z).astype(int)
        sampled = [word for word, count in zip(vocab, counts) for _ in range(count)]
        random.Random(seed).shuffle(sampled)
        prompt = settings.prompt(task_template.format(context=" ".join(sampled), query=""), answer_prefix)
        return prompt, vocab[1:4]

    def fit(num_words: int, grow: bool):
        """RULER's generate_input_output: grow (first call) or shrink (samples) the word count."""
        vocab = new_vocab()
        prompt, answer = text_for(vocab, num_words)
        if grow:
            while settings.count(prompt) < max_len:
                num_words += incremental
                prompt, answer = text_for(vocab, num_words)
            num_words -= incremental
            prompt, answer = text_for(vocab, num_words)
        while settings.count(prompt) > max_len:
            num_words -= incremental
            if num_words <= 0:
                raise too_short(settings, text_for(vocab, 0)[0])
            prompt, answer = text_for(vocab, num_words)
        return prompt, answer, num_words

    _, _, num_example_words = fit(max_len // coded_wordlen, grow=True)
    records = []
    for i in settings.sample_numbers(num_samples):
        prompt, answer, _ = fit(num_example_words, grow=False)
        length = settings.count(prompt) + settings.tokens_to_generate
        records.append(make_record(pre_samples + i, prompt, answer, length))
    return records


def _add_task_arguments(parser) -> None:
    parser.add_argument("--coded_wordlen", type=positive_int, default=6, help="length of synthetic word")
    parser.add_argument("--vocab_size", type=int, default=-1, help="synthetic vocab size to sample from")
    parser.add_argument("--alpha", type=float, default=2.0, help="zeta distribution alpha")
    parser.add_argument("--add_fewshot", action="store_true", default=False)


def main(argv=None) -> None:
    run_generator_cli("freq_words_extraction", generate, _add_task_arguments,
                      ("alpha", "coded_wordlen", "vocab_size", "add_fewshot"), argv)


if __name__ == "__main__":
    from eval.ruler.cli import cli_main
    cli_main(main)()
