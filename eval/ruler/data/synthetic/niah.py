"""Needle in a haystack (RULER's niah_* tasks).

Needles read "One of the special magic {type_needle_v} for {key} is: {value}." and hide in a
haystack of one of three kinds:

* ``repeat`` (``noise`` upstream): RULER's five sentences about grass, sky and sun, one line each;
* ``essay``: Paul Graham's essays (json/PaulGrahamEssays.json or ``--essay_file``), split into
  sentences; needles go at depths drawn from 40 evenly spaced percentages (RULER's rule);
* ``needle``: lines that are themselves needles with random keys and values (multikey_2/3).

Keys are ``words`` (adjective-noun pairs from wonderwords), ``numbers`` (7 digits) or ``uuids``;
values likewise. ``num_needle_k`` keys get ``num_needle_v`` values each; ``num_needle_q`` keys are
asked about and all their values are the expected outputs.

Every record carries ``depth``: the depth in percent of the needle that holds ``outputs[0]``
(the essay depth RULER drew, or 100 * line index / haystack lines). ``depth_cycle`` (used by
generate_niah_single_1.py) puts sample i's needles at ``depth_cycle[i % len(depth_cycle)]``
instead of a random depth.

Standalone, with RULER's flags::

    python eval/ruler/data/synthetic/niah.py --save_dir ./ --save_name niah_single_2 \\
        --tokenizer_path smollm2 --max_seq_length 4096 --num_samples 10 --type_haystack essay
"""
from __future__ import annotations

import random
import uuid
from typing import List, Optional, Sequence

from eval.ruler.data.synthetic.common import (
    DEPTHS,
    REPEAT_HAYSTACK,
    Settings,
    UsageError,
    answer_token_position,
    essay_text,
    fit_sample,
    insert_into_sentences,
    load_essay_words,
    make_record,
    positive_int,
    run_generator_cli,
    search_size,
    sent_tokenize,
    wonderwords_list,
)

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
HAYSTACK_TYPES = ("repeat", "noise", "essay", "needle")
NEEDLE_TYPES = ("numbers", "words", "uuids")


class _Words:
    """RULER's key words: every distinct "adjective-noun" pair of wonderwords' lists, drawn uniformly.

    RULER builds and sorts the 6.2 million strings; the pairs are all distinct, so drawing an
    adjective and a noun from the de-duplicated sorted lists is the same distribution, at no cost.
    """

    def __init__(self):
        self.adjs = sorted(set(wonderwords_list("adjectivelist.txt")))
        self.nouns = sorted(set(wonderwords_list("nounlist.txt")))

    def choice(self, rng) -> str:
        adj, noun = divmod(rng.randrange(len(self.adjs) * len(self.nouns)), len(self.nouns))
        return f"{self.adjs[adj]}-{self.nouns[noun]}"


def _random_value(kind: str, rng, words: _Words) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":
        return words.choice(rng)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def generate(settings: Settings, num_samples: int, pre_samples: int = 0, *, num_needle_k: int = 1,
             num_needle_v: int = 1, num_needle_q: int = 1, type_haystack: str = "essay",
             type_needle_k: str = "words", type_needle_v: str = "numbers",
             depth_cycle: Optional[Sequence[float]] = None) -> List[dict]:
    """Records of one niah task: ``num_samples`` prompts, each fitted to ``settings.max_seq_length``."""
    if type_haystack not in HAYSTACK_TYPES:
        raise UsageError(f"task {settings.task}: type_haystack {type_haystack!r} is not one of {HAYSTACK_TYPES}")
    for name, kind in (("type_needle_k", type_needle_k), ("type_needle_v", type_needle_v)):
        if kind not in NEEDLE_TYPES:
            raise UsageError(f"task {settings.task}: {name} {kind!r} is not one of {NEEDLE_TYPES}")
    for name, value in (("num_needle_k", num_needle_k), ("num_needle_v", num_needle_v),
                        ("num_needle_q", num_needle_q)):
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"task {settings.task}: {name} must be a positive integer, got {value!r}")
    num_needle_k = max(num_needle_k, num_needle_q)  # RULER: every queried key exists
    repeat_lines = type_haystack in ("repeat", "noise")

    rng, _ = settings.rng()
    seed = settings.random_seed
    words = _Words() if "words" in (type_needle_k, type_needle_v) else None
    essay_words = load_essay_words(settings.essay_file) if type_haystack == "essay" else None
    task_template, prefix_template = settings.templates("niah")
    value_kind = type_needle_v
    if num_needle_q * num_needle_v == 1:
        # RULER's singular wording for one expected answer (applied to the task's texts only, not to
        # the model template: a chat system prompt's "You are" must stay as it is).
        def singular(text: str) -> str:
            return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
        task_template, prefix_template = singular(task_template), singular(prefix_template)
        value_kind = type_needle_v[:-1]

    def build(num_haystack: int, depth: Optional[float] = None):
        keys, values, needles = [], [], []   # needles: (text, key index, value)
        for k in range(num_needle_k):
            keys.append(_random_value(type_needle_k, rng, words))
            values.append([])
            for _ in range(num_needle_v):
                values[-1].append(_random_value(type_needle_v, rng, words))
                needles.append((NEEDLE.format(type_needle_v=type_needle_v, key=keys[-1], value=values[-1][-1]),
                                k, values[-1][-1]))
        random.Random(seed).shuffle(needles)  # RULER: the same permutation for every sample

        if type_haystack == "essay":
            sentences = sent_tokenize(essay_text(essay_words, num_haystack).strip())
            depths = [depth] * len(needles) if depth is not None else sorted(rng.sample(DEPTHS, len(needles)))
            context = insert_into_sentences(sentences, [n[0] for n in needles], depths)
        else:
            if repeat_lines:
                lines = [REPEAT_HAYSTACK] * num_haystack
            else:
                lines = [NEEDLE.format(type_needle_v=type_needle_v, key=_random_value(type_needle_k, rng, words),
                                       value=_random_value(type_needle_v, rng, words))
                         for _ in range(num_haystack)]
            if depth is not None:
                indexes = [int(num_haystack * depth / 100)] * len(needles)
            else:
                indexes = sorted(rng.sample(range(num_haystack), len(needles)), reverse=True)
            for index, needle in zip(indexes, needles):
                lines.insert(index, needle[0])
            context = "\n".join(lines)
            depths = [depth if depth is not None else round(100 * index / num_haystack) for index in indexes]

        asked = rng.sample(range(num_needle_k), num_needle_q)
        queries = [keys[i] for i in asked]
        answers = [a for i in asked for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        prompt = settings.prompt(task_template.format(type_needle_v=value_kind, context=context, query=query),
                                 prefix_template.format(type_needle_v=value_kind, query=query))
        first = next(j for j, n in enumerate(needles) if n[1] == asked[0] and n[2] == answers[0])
        return prompt, answers, depths[first]

    # RULER's step sizes for the haystack search
    incremental = 500 if type_haystack == "essay" else 25
    if type_haystack != "essay" and settings.max_seq_length < 4096:
        incremental = 5
    minimum = 1 if type_haystack == "essay" else num_needle_k * num_needle_v  # a line for every needle
    num_haystack = search_size(settings, build, incremental, minimum=minimum)

    records = []
    for i in settings.sample_numbers(num_samples):
        index = pre_samples + i
        depth = depth_cycle[index % len(depth_cycle)] if depth_cycle else None
        length, prompt, answers, needle_depth = fit_sample(
            settings, lambda n: build(n, depth), num_haystack, incremental, minimum)
        records.append(make_record(index, prompt, answers, length,
                                   answer_token_position(settings, prompt, answers[0]), needle_depth))
    return records


def _add_task_arguments(parser) -> None:
    parser.add_argument("--num_needle_k", type=positive_int, default=1)
    parser.add_argument("--num_needle_v", type=positive_int, default=1)
    parser.add_argument("--num_needle_q", type=positive_int, default=1)
    parser.add_argument("--type_haystack", type=str, default="essay", choices=HAYSTACK_TYPES)
    parser.add_argument("--type_needle_k", type=str, default="words", choices=NEEDLE_TYPES)
    parser.add_argument("--type_needle_v", type=str, default="numbers", choices=NEEDLE_TYPES)
    parser.add_argument("--essay_file", type=str, default=None, help="default: json/PaulGrahamEssays.json")


TASK_ARGUMENTS = ("num_needle_k", "num_needle_v", "num_needle_q", "type_haystack", "type_needle_k", "type_needle_v")


def main(argv=None) -> None:
    run_generator_cli("niah", generate, _add_task_arguments, TASK_ARGUMENTS, argv)


if __name__ == "__main__":
    from eval.ruler.cli import cli_main
    cli_main(main)()
