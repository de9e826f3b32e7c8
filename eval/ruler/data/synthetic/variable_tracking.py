"""Variable tracking (RULER's vt): follow chains of assignments hidden in a haystack.

A chain is ``VAR AAAAA = 12345``, ``VAR BBBBB = VAR AAAAA``, ... (``num_hops`` hops, 5-letter
names); the model must list every variable that ends up holding the value. The haystack is
RULER's repeated sentences (``noise``, the default; ``repeat`` is accepted as its other name) or
the essay. As in RULER, every prompt starts with one worked example (an in-context example of
about 500 tokens with 3-letter names and value 12345, re-randomized for each sample).

Standalone, with RULER's flags::

    python eval/ruler/data/synthetic/variable_tracking.py --save_dir ./ --save_name vt \\
        --tokenizer_path smollm2 --max_seq_length 4096 --num_samples 10 --num_chains 1 --num_hops 4
"""
from __future__ import annotations

import dataclasses
import heapq
import string
from typing import List

from eval.ruler.data.synthetic.common import (
    DEPTHS,
    REPEAT_HAYSTACK,
    ModelTemplate,
    Settings,
    UsageError,
    essay_text,
    fit_sample,
    insert_into_sentences,
    load_essay_words,
    make_record,
    positive_int,
    run_generator_cli,
    search_size,
    sent_tokenize,
)

HAYSTACK_TYPES = ("noise", "repeat", "essay")
ICL_MAX_SEQ_LENGTH = 500  # RULER's budget for the in-context example


def _shuffle_sublists_heap(lists, rng):
    """RULER's interleaving of several chains: a random order that keeps each chain's own order."""
    heap = [(rng.random(), i, 0) for i in range(len(lists))]
    heapq.heapify(heap)
    out = []
    while heap:
        _, i, j = heapq.heappop(heap)
        out.append(lists[i][j])
        if j + 1 < len(lists[i]):
            heapq.heappush(heap, (rng.random(), i, j + 1))
    return out


def generate(settings: Settings, num_samples: int, pre_samples: int = 0, *, type_haystack: str = "noise",
             num_chains: int = 1, num_hops: int = 4, add_fewshot: bool = True) -> List[dict]:
    """Records of the vt task, each prompt led by a re-randomized in-context example."""
    if type_haystack not in HAYSTACK_TYPES:
        raise UsageError(f"task {settings.task}: type_haystack {type_haystack!r} is not one of {HAYSTACK_TYPES}")
    for name, value in (("num_chains", num_chains), ("num_hops", num_hops)):
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"task {settings.task}: {name} must be a positive integer, got {value!r}")
    rng, np_rng = settings.rng()
    essay_words = load_essay_words(settings.essay_file) if type_haystack == "essay" else None
    task_template, prefix_template = settings.templates("variable_tracking")

    def chains_of(is_icl: bool):
        letters = 3 if is_icl else 5
        hops = min(10, num_hops) if is_icl else num_hops
        needed = (hops + 1) * num_chains
        names: List[str] = []
        while len(names) < needed:  # distinct names (RULER appends until distinct, keeping duplicates)
            name = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if name not in names:
                names.append(name)
        var_lists, chains = [], []
        for start in range(0, needed, hops + 1):
            names_here = names[start:start + hops + 1]
            value = "12345" if is_icl else str(np_rng.randint(10000, 99999))
            chain = [f"VAR {names_here[0]} = {value}"]
            chain += [f"VAR {names_here[j + 1]} = VAR {names_here[j]} " for j in range(hops)]
            var_lists.append(names_here)
            chains.append(chain)
        return var_lists, chains, hops

    def task_text(num_noises: int, is_icl: bool):
        var_lists, chains, hops = chains_of(is_icl)
        value = chains[0][0].split("=")[-1].strip()
        if type_haystack == "essay":
            sentences = sent_tokenize(essay_text(essay_words, num_noises).strip())
            flat = _shuffle_sublists_heap(chains, rng)
            depths = sorted(rng.sample(DEPTHS, len(flat)))
            context = insert_into_sentences(sentences, [c.strip() + "." for c in flat], depths)
        else:
            lines = [REPEAT_HAYSTACK] * num_noises
            for chain in chains:
                positions = sorted(rng.sample(range(len(lines)), len(chain)))
                for j, (position, statement) in enumerate(zip(positions, chain)):
                    lines.insert(position + j, statement)
            context = "\n".join(lines)
        context = context.replace(". \n", ".\n")
        user = task_template.format(context=context, query=value, num_v=hops + 1)
        prefix = prefix_template.format(context=context, query=value, num_v=hops + 1)
        return user, prefix, var_lists[0]

    # 1. the in-context example: task text and answer prefix without model template, ~500 tokens
    icl = ""
    if add_fewshot:
        icl_settings = dataclasses.replace(settings, max_seq_length=ICL_MAX_SEQ_LENGTH, tokens_to_generate=0,
                                           model_template=ModelTemplate("base"))

        def build_icl(n):
            user, prefix, answer = task_text(n, True)
            return icl_settings.prompt(user, prefix), answer

        icl_step = 50 if type_haystack == "essay" else 5
        icl_min = 1 if type_haystack == "essay" else min(10, num_hops) + 1  # a line for every statement
        size = search_size(icl_settings, build_icl, icl_step, minimum=icl_min)
        _, icl_prompt, icl_answer = fit_sample(icl_settings, build_icl, size, icl_step, minimum=icl_min)
        icl = icl_prompt.input + icl_prompt.answer_prefix + " " + " ".join(icl_answer) + "\n"

    def randomized_icl() -> str:
        """RULER's randomize_icl: fresh names for the example's answer variables, a fresh value."""
        text = icl
        for name in text.strip().split()[-(min(10, num_hops) + 1):]:
            text = text.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
        return text.replace("12345", str(np_rng.randint(10000, 99999)))

    def build(n):
        user, prefix, answer = task_text(n, False)
        if icl:
            user = randomized_icl() + "\n" + user
        return settings.prompt(user, prefix), answer

    # 2. the task, RULER's step sizes
    incremental = 500 if type_haystack == "essay" else 10
    if type_haystack != "essay" and settings.max_seq_length < 4096:
        incremental = 5
    minimum = 1 if type_haystack == "essay" else num_hops + 1
    num_noises = search_size(settings, build, incremental, minimum=minimum)
    records = []
    for i in settings.sample_numbers(num_samples):
        length, prompt, answer = fit_sample(settings, build, num_noises, incremental, minimum=minimum)
        records.append(make_record(pre_samples + i, prompt, answer, length))
    return records


def _add_task_arguments(parser) -> None:
    parser.add_argument("--type_haystack", type=str, default="noise", choices=HAYSTACK_TYPES)
    parser.add_argument("--num_chains", type=positive_int, default=1, help="number of inserted variable chains")
    parser.add_argument("--num_hops", type=positive_int, default=4, help="number of hops in each chain")
    parser.add_argument("--essay_file", type=str, default=None, help="default: json/PaulGrahamEssays.json")


def main(argv=None) -> None:
    run_generator_cli("variable_tracking", generate, _add_task_arguments, ("type_haystack", "num_chains", "num_hops"),
                      argv)


if __name__ == "__main__":
    from eval.ruler.cli import cli_main
    cli_main(main)()
