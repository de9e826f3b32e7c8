"""Machinery shared by RULER's synthetic task generators (niah, variable_tracking, ...).

Each generator module exposes ``generate(settings, num_samples, pre_samples=0, **task_args)``,
which returns the records of one task, and a RULER-compatible command line (``python niah.py
--save_dir ... --save_name ... --template ...``) built by :func:`run_generator_cli`.
prepare.py calls ``generate`` in-process for every task it is asked for.

What is shared:

* :class:`Settings`: tokenizer, model template, lengths, seed and data files of one task;
  ``settings.prompt(user, prefix)`` builds a :class:`Prompt` (input + answer prefix) and
  ``settings.count(prompt)`` counts its tokens as the server will (input + answer prefix, no
  special tokens added).
* :func:`search_size` / :func:`fit_sample`: RULER's binary search for the largest haystack whose
  prompt plus ``tokens_to_generate`` fits ``max_seq_length``, and its per-sample shrink loop.
* :func:`make_record`: RULER's record ``{index, input, outputs, length, length_w_model_temp,
  answer_prefix, token_position_answer}`` plus this project's ``depth``.
* essay haystack and sentence splitting (with the offline punkt fallback), zeta, word lists.

Randomness: each ``generate`` call draws from its own ``random.Random(seed)`` and
``numpy.random.RandomState(seed)``, so the same seed gives the same file, byte for byte.
Where RULER shuffles with a fresh ``random.Random(seed)`` (the same permutation every sample)
the generators do the same.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from eval.ruler.cli import OneLineParser, UsageError, int_at_least
from eval.ruler.data.manifest_utils import write_manifest
from eval.ruler.data.synthetic.constants import TASKS
from eval.ruler.data.template import CHAT, ModelTemplate, TEMPLATE_TYPES, select_template
from eval.ruler.data.tokenizer import TOKENIZER_TYPES, select_tokenizer

_HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.dirname(_HERE)                  # eval/ruler/data: where generated task folders go

JSON_DIR = os.path.join(_HERE, "json")
ESSAY_FILE = os.path.join(JSON_DIR, "PaulGrahamEssays.json")
ESSAY_SCRIPT = "python eval/ruler/data/synthetic/json/download_paulgraham_essay.py"
QA_FILES = {"squad": os.path.join(JSON_DIR, "squad.json"), "hotpotqa": os.path.join(JSON_DIR, "hotpotqa.json")}
QA_SCRIPT = "bash eval/ruler/data/synthetic/json/download_qa_dataset.sh"

# RULER's haystack of repeated sentences (niah 'repeat' in SeerAttention's fork, 'noise' upstream).
REPEAT_HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# RULER's needle depths for essay haystacks: 40 evenly spaced percentages from 0 to 100.
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]


def shown(path: str) -> str:
    """A path as the user would type it: relative to the working folder when it lies inside it."""
    path = os.fspath(path)
    absolute = os.path.abspath(path)
    rel = os.path.relpath(absolute)
    return rel if not rel.startswith("..") else absolute


# --------------------------------------------------------------------------------------------
# Prompts and token counts
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Prompt:
    """``input`` is the model's templated input; the server appends ``answer_prefix`` to it."""

    input: str
    answer_prefix: str


def squash_whitespace(text: str) -> str:
    """RULER's --remove_newline_tab: newlines and tabs become spaces, runs of whitespace one space."""
    return " ".join(text.replace("\n", " ").replace("\t", " ").strip().split())


def _squash_keep_lead(text: str) -> str:
    """squash_whitespace for text that follows other text: one leading space survives, as in RULER's
    squashing of the whole prompt."""
    if not text.strip():
        return ""
    return (" " if text[:1].isspace() else "") + squash_whitespace(text)


@dataclasses.dataclass
class Settings:
    """Everything a generator needs besides its task arguments."""

    task: str                      # the task's name (save name), for messages
    tokenizer: object              # a tokenizer.py wrapper
    model_template: ModelTemplate
    max_seq_length: int
    tokens_to_generate: int
    random_seed: int = 42
    remove_newline_tab: bool = False
    task_template: Optional[str] = None   # None: constants.TASKS[kind]['template']
    answer_prefix: Optional[str] = None   # None: constants.TASKS[kind]['answer_prefix']
    essay_file: Optional[str] = None      # None: json/PaulGrahamEssays.json
    qa_file: Optional[str] = None         # None: json/{dataset}.json

    def templates(self, kind: str) -> Tuple[str, str]:
        base = TASKS[kind]
        task_template = base["template"] if self.task_template is None else self.task_template
        answer_prefix = base.get("answer_prefix", "") if self.answer_prefix is None else self.answer_prefix
        return task_template, answer_prefix

    def prompt(self, user: str, answer_prefix: str, history: Sequence[Tuple[str, str]] = ()) -> Prompt:
        """Wrap the task text ``user`` (after ``history`` turns) in the model template.

        --remove_newline_tab squashes whitespace as RULER does, over the whole templated input with a
        fixed template (the answer prefix keeps one leading space, as it does there); with ``chat``
        it squashes the turns' contents and keeps the chat template's own newlines (turn markers).
        """
        if not self.remove_newline_tab:
            return Prompt(self.model_template.render(user, history), answer_prefix)
        user = squash_whitespace(user)
        history = [(squash_whitespace(q), _squash_keep_lead(a)) for q, a in history]
        text = self.model_template.render(user, history)
        if self.model_template.template_type != CHAT:
            text = squash_whitespace(text)
        return Prompt(text, _squash_keep_lead(answer_prefix))

    def count(self, prompt: Prompt) -> int:
        """Tokens of ``input + answer_prefix``, tokenized as one text with no special tokens added."""
        return len(self.tokenizer.text_to_tokens(prompt.input + prompt.answer_prefix))

    def sample_numbers(self, num_samples: int):
        """``range(num_samples)`` with a progress bar on a terminal (stderr): one task of hundreds of long
        samples takes minutes."""
        from tqdm import tqdm

        return tqdm(range(num_samples), desc=f"prepare {self.task}", unit="sample", file=sys.stderr,
                    leave=False, disable=None, mininterval=2.0)

    def rng(self):
        import random

        return random.Random(self.random_seed), np.random.RandomState(self.random_seed % (2 ** 32))


def too_short(settings: Settings, smallest: Prompt) -> UsageError:
    tokens = settings.count(smallest)
    return UsageError(
        f"--max_seq_length {settings.max_seq_length} is too short for task {settings.task}: its smallest prompt "
        f"takes {tokens} tokens plus {settings.tokens_to_generate} to generate ({tokens + settings.tokens_to_generate})")


Build = Callable[[int], tuple]  # size -> (Prompt, *extra)


def search_size(settings: Settings, build: Build, incremental: int, estimate_size: Optional[int] = None,
                slack: float = 3.0, minimum: int = 1) -> int:
    """RULER's binary search for the largest haystack size whose prompt fits.

    ``build(n)`` makes a prompt with a haystack of size ``n`` (sentences, words, documents...).
    The tokens per unit are estimated from ``build(estimate_size or incremental)`` and the search
    runs over ``[incremental, slack * max_seq_length / tokens_per_unit]``, as RULER's does. Two
    additions: when the largest size fits, the range doubles until one does not (RULER's estimate
    spreads the prompt's fixed part, e.g. vt's 500-token worked example, over the units and can
    cap the search too low); when not even ``incremental`` units fit, the search goes on over
    ``[minimum, incremental - 1]`` (RULER would loop forever). Raises :class:`UsageError` when
    ``minimum`` units do not fit either.
    """
    budget = settings.max_seq_length - settings.tokens_to_generate
    estimate_size = max(estimate_size or incremental, minimum)
    tokens_per_unit = max(settings.count(build(estimate_size)[0]) / estimate_size, 1e-6)
    upper = max(int(settings.max_seq_length / tokens_per_unit * slack), incremental * 2, minimum)

    def fits(n: int) -> bool:
        return settings.count(build(n)[0]) <= budget

    def largest_fit(lo: int, hi: int) -> Optional[int]:
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            if fits(mid):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return best

    lo = max(incremental, minimum)
    best = largest_fit(lo, upper)
    while best == upper:          # the whole range fits: look further
        lo, upper = upper + 1, upper * 2
        found = largest_fit(lo, upper)
        best = found if found is not None else best
        if found is None:
            break
    if best is None and incremental > minimum:
        best = largest_fit(minimum, incremental - 1)
    if best is None:
        raise too_short(settings, build(minimum)[0])
    return best


def fit_sample(settings: Settings, build: Build, size: int, incremental: int, minimum: int = 1):
    """RULER's per-sample loop: build at ``size`` (the searched size); while too long, shrink and rebuild.

    Samples differ by a few tokens (their needles, keys and values are drawn anew), so one can
    overflow the searched size slightly. RULER then steps back a whole search increment (500 essay
    words, about 650 tokens: a 1K essay sample falls to half its length); this loop steps back
    1/25 of it (at least one unit), which keeps every sample close to --max_seq_length.
    Returns ``(length, prompt, *extra)`` where ``length`` = prompt tokens + tokens_to_generate.
    """
    step = max(1, incremental // 25)
    while True:
        built = build(size)
        length = settings.count(built[0]) + settings.tokens_to_generate
        if length <= settings.max_seq_length:
            return (length,) + tuple(built)
        if size <= minimum:
            raise too_short(settings, built[0])
        size = max(minimum, size - step)


def answer_token_position(settings: Settings, prompt: Prompt, answer: str) -> Optional[int]:
    """Tokens before the first occurrence of ``answer`` in the input (RULER's niah field); None if absent."""
    at = prompt.input.find(answer)
    if at < 0:
        return None
    return len(settings.tokenizer.text_to_tokens(prompt.input[:at]))


def make_record(index: int, prompt: Prompt, outputs: List[str], length: int,
                token_position_answer: Optional[int] = None, depth=None) -> dict:
    """One jsonl line in NVIDIA/RULER's format, plus ``depth`` (needle depth in %, niah only).

    ``length`` counts input + answer_prefix + tokens_to_generate, the model template included (it is
    applied here, at prepare time), so ``length_w_model_temp`` equals it (RULER adds template tokens
    only in its NeMo-Skills mode, where the template is applied later).
    """
    return {
        "index": index,
        "input": prompt.input,
        "outputs": list(outputs),
        "length": length,
        "length_w_model_temp": length,
        "answer_prefix": prompt.answer_prefix,
        "token_position_answer": token_position_answer,
        "depth": depth,
    }


def save_task_file(save_file: str, records: List[dict], settings: Settings, **made_with) -> None:
    """Write a task's data file (atomically) and, beside it, how it was made (``{subset}.prepare.json``:
    max_seq_length, tokens_to_generate, tokenizer, template, seed, sample count and the data file's sha256),
    so that call_api.py's manifest and the comparison report can give the length a run was prepared for."""
    from eval.ruler.model_loader import sha256_file
    from eval.ruler.pred.prediction_files import data_settings_path, write_json_atomic

    write_manifest(save_file, records)
    write_json_atomic(data_settings_path(save_file), {
        "task": settings.task, "max_seq_length": settings.max_seq_length,
        "tokens_to_generate": settings.tokens_to_generate, "tokenizer": getattr(settings.tokenizer, "name", None),
        "model_template_type": settings.model_template.template_type, "random_seed": settings.random_seed,
        "samples": len(records), **made_with, "sha256": sha256_file(save_file)})


def check_position_limit(tokenizer_type: str, tokenizer, max_seq_length: int, ignore: bool) -> None:
    """Refuse a --max_seq_length past the positions of the tokenizer's model (prompts that long give wrong
    answers, dense and sparse alike), or only warn when ``ignore`` (--ignore_position_limit) says the user
    knows. Only ``hf`` tokenizers name a model whose config can be read."""
    if tokenizer_type != "hf":
        return
    from eval.ruler.model_loader import max_positions

    limit = max_positions(tokenizer.name)
    if limit is None or max_seq_length <= limit:
        return
    what = (f"--max_seq_length {max_seq_length} is past the {limit} positions of {tokenizer.name} "
            f"(max_position_embeddings in its config)")
    if ignore:
        print(f"warning: {what}; going on as --ignore_position_limit asks", file=sys.stderr, flush=True)
        return
    raise UsageError(f"{what}: its answers past them are not meaningful; use --max_seq_length {limit} or less, "
                     f"or pass --ignore_position_limit if the model is meant to run past them")


# --------------------------------------------------------------------------------------------
# Haystacks
# --------------------------------------------------------------------------------------------

_ESSAY_CACHE: dict = {}


def load_essay_words(path: Optional[str]) -> List[str]:
    """Words of the essay haystack (RULER: whitespace runs become one space, then split on spaces)."""
    path = path or ESSAY_FILE
    key = os.path.abspath(path)
    if key not in _ESSAY_CACHE:
        if not os.path.isfile(path):
            raise UsageError(f"essay file {shown(path)} not found: download it with `{ESSAY_SCRIPT}` "
                             f"or pass --essay_file")
        try:
            with open(path, encoding="utf-8") as f:
                text = json.load(f)["text"]
            if not isinstance(text, str) or not text.strip():
                raise ValueError("empty text")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise UsageError(f"essay file {shown(path)} is not in PaulGrahamEssays.json's format "
                             f"({{\"text\": \"...\"}}): {type(exc).__name__}") from exc
        _ESSAY_CACHE[key] = re.sub(r"\s+", " ", text).split(" ")
    return _ESSAY_CACHE[key]


def essay_text(words: List[str], num_words: int) -> str:
    """The first ``num_words`` words; the essay repeats when it is shorter (as upstream RULER does)."""
    if num_words > len(words):
        words = words * ((num_words + len(words) - 1) // len(words))
    return " ".join(words[:num_words])


_SENTENCE_SPLITTER = None


def sent_tokenize(text: str) -> List[str]:
    """nltk's sent_tokenize; offline without the punkt data, nltk's untrained PunktSentenceTokenizer.

    The fallback splits at sentence punctuation without punkt's learned abbreviations, so a few
    boundaries differ from RULER's; it warns once per process and never needs the network.
    """
    global _SENTENCE_SPLITTER
    if _SENTENCE_SPLITTER is None:
        from nltk.tokenize import PunktSentenceTokenizer
        from nltk.tokenize import sent_tokenize as punkt_sent_tokenize

        try:
            punkt_sent_tokenize("One sentence. Another one.")
            _SENTENCE_SPLITTER = punkt_sent_tokenize
        except LookupError:
            print("warning: nltk's punkt sentence model is not installed (it downloads with "
                  "`python -m nltk.downloader punkt_tab`); splitting essay haystacks with nltk's untrained "
                  "PunktSentenceTokenizer instead, so some sentence boundaries differ from RULER's",
                  file=sys.stderr)
            _SENTENCE_SPLITTER = PunktSentenceTokenizer().tokenize
    return _SENTENCE_SPLITTER(text)


def insert_into_sentences(sentences: List[str], items: List[str], depths: Sequence[int]) -> str:
    """RULER's essay insertion: item i goes after ``int(len(sentences) * depths[i] / 100)`` sentences.

    ``depths`` must be sorted; the pieces are joined with single spaces.
    """
    cuts = [0] + [int(len(sentences) * (depth / 100)) for depth in depths] + [len(sentences)]
    pieces = []
    for i in range(1, len(cuts)):
        pieces.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
        if i - 1 < len(items):
            pieces.append(items[i - 1])
    return " ".join(pieces)


# --------------------------------------------------------------------------------------------
# Words and numbers
# --------------------------------------------------------------------------------------------

_WORDS: dict = {}


def wonderwords_list(name: str) -> List[str]:
    """A word list shipped with wonderwords (nounlist.txt, adjectivelist.txt, verblist.txt)."""
    if name not in _WORDS:
        import wonderwords

        _WORDS[name] = list(wonderwords.random_word._get_words_from_text_file(name))
    return _WORDS[name]


def zeta(s: float) -> float:
    """Riemann zeta(s) for s > 1 (Euler-Maclaurin with 10 terms; error far below 1e-12).

    Used by fwe in place of scipy.special.zeta, so scipy is not needed.
    """
    if s <= 1:
        raise UsageError(f"alpha {s}: the zeta distribution needs alpha > 1")
    n = 10
    total = sum(k ** -s for k in range(1, n)) + n ** (1 - s) / (s - 1) + 0.5 * n ** -s
    bernoulli = [1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66, -691 / 2730]
    rising = s            # s (s+1) ... (s + 2k - 2)
    for k, b2k in enumerate(bernoulli, start=1):
        total += b2k / math.factorial(2 * k) * rising * n ** (-s - 2 * k + 1)
        rising *= (s + 2 * k - 1) * (s + 2 * k)
    return total


# --------------------------------------------------------------------------------------------
# RULER-compatible command line of a generator script
# --------------------------------------------------------------------------------------------

positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags RULER's generator scripts share (prepare.py passes them)."""
    parser.add_argument("--save_dir", type=str, required=True, help="dataset folder to save dataset")
    parser.add_argument("--save_name", type=str, required=True, help="name of the save dataset jsonl file")
    parser.add_argument("--subset", type=str, default="validation", help="Options: validation or test")
    parser.add_argument("--tokenizer_path", type=str, default=None,
                        help="tokenizer (hf: smollm2 by default, a .gguf file, a model folder or a hub name)")
    parser.add_argument("--tokenizer_type", type=str, default="hf", choices=TOKENIZER_TYPES)
    parser.add_argument("--max_seq_length", type=positive_int, required=True,
                        help="max sequence length including all input tokens and generated tokens.")
    parser.add_argument("--tokens_to_generate", type=non_negative_int, default=None,
                        help="expected generated token amount (default: the task's)")
    parser.add_argument("--num_samples", type=positive_int, required=True, help="number of samples to generate")
    parser.add_argument("--pre_samples", type=non_negative_int, default=0,
                        help="number of samples already generated (earlier chunks)")
    parser.add_argument("--random_seed", type=int, default=42)
    parser.add_argument("--template", type=str, default="",
                        help="full prompt template (model template + task template + answer prefix), as prepare.py "
                             "of RULER passes it; empty: the task's template in --model_template_type")
    parser.add_argument("--model_template_type", type=str, default=None, choices=TEMPLATE_TYPES,
                        help="used when --template is empty (default: chat if the tokenizer has one, else base)")
    parser.add_argument("--remove_newline_tab", action="store_true", help="remove `\\n` and `\\t` in all strings.")
    parser.add_argument("--model_template_token", type=non_negative_int, default=0,
                        help="accepted for RULER compatibility (NeMo-Skills mode); must be 0 here")
    add_position_limit_flag(parser)


def add_position_limit_flag(parser: argparse.ArgumentParser) -> None:
    """--ignore_position_limit, for every script that prepares data (see :func:`check_position_limit`)."""
    parser.add_argument("--ignore_position_limit", action="store_true",
                        help="prepare a --max_seq_length past the model's positions (a warning instead of an error)")


def split_full_template(template: str, kind: str) -> Tuple[str, str]:
    """Split RULER's ``--template`` (model template + task template + answer prefix) at the answer prefix.

    RULER locates the prefix in the generated text by the first 10 characters of the task's answer
    prefix (``rfind``); doing it on the template gives the same split.
    """
    prefix = TASKS[kind].get("answer_prefix", "")
    at = template.rfind(prefix[:10]) if prefix else -1
    if at < 0:
        return template, ""
    return template[:at], template[at:]


def run_generator_cli(kind: str, generate: Callable, add_task_arguments: Callable, task_argument_names: Sequence[str],
                      argv=None) -> None:
    """``python {kind}.py`` with RULER's flags: generate one task and write {save_dir}/{save_name}/{subset}.jsonl."""
    parser = OneLineParser(description=f"Generate a RULER '{kind}' task (jsonl).")
    add_common_arguments(parser)
    add_task_arguments(parser)
    args = parser.parse_args(argv)
    if args.model_template_token:
        raise UsageError("--model_template_token is NeMo-Skills' mode, which this project does not implement; "
                         "leave it at 0")
    started = time.time()
    tokenizer = select_tokenizer(args.tokenizer_type, args.tokenizer_path)
    check_position_limit(args.tokenizer_type, tokenizer, args.max_seq_length, args.ignore_position_limit)
    task_template = answer_prefix = None
    if args.template:
        # RULER's prepare.py passes the full template; the model template is already inside it.
        task_template, answer_prefix = split_full_template(args.template.replace("\\n", "\n"), kind)
        model_template = ModelTemplate("base")
    else:
        model_template = select_template(args.model_template_type, tokenizer)
    settings = Settings(
        task=args.save_name, tokenizer=tokenizer, model_template=model_template,
        max_seq_length=args.max_seq_length,
        tokens_to_generate=TASKS[kind]["tokens_to_generate"] if args.tokens_to_generate is None
        else args.tokens_to_generate,
        random_seed=args.random_seed, remove_newline_tab=args.remove_newline_tab,
        task_template=task_template, answer_prefix=answer_prefix,
        essay_file=getattr(args, "essay_file", None), qa_file=getattr(args, "qa_file", None))
    task_args = {name: getattr(args, name) for name in task_argument_names}
    records = generate(settings, args.num_samples, pre_samples=args.pre_samples, **task_args)
    save_file = os.path.join(args.save_dir, args.save_name, f"{args.subset}.jsonl")
    save_task_file(save_file, records, settings, tokenizer_type=args.tokenizer_type)
    print(f"Prepare {args.save_name} with lines: {len(records)} to {save_file} "
          f"({time.time() - started:.1f} s)")
