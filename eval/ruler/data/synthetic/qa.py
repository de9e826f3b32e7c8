"""Question answering (RULER's qa_1 on SQuAD, qa_2 on HotpotQA) with distracting documents.

Sample i asks question i of the file (after ``pre_samples``, in file order, as RULER does). Its
gold documents are mixed with others ("Document 1: ...") until the prompt fills the length:
first documents of the same SQuAD article, then random ones; when more documents are wanted than
the file has, the whole collection repeats (upstream RULER's rule).

Files: json/squad.json (SQuAD 2.0 dev; unanswerable questions are skipped) and json/hotpotqa.json
(HotpotQA dev, distractor setting), fetched by json/download_qa_dataset.sh, or any file of the same
shape given with ``--qa_file``.

Standalone, with RULER's flags::

    python eval/ruler/data/synthetic/qa.py --save_dir ./ --save_name qa_1 --dataset squad \\
        --tokenizer_path smollm2 --max_seq_length 4096 --num_samples 10
"""
from __future__ import annotations

import json
import os
import random
from typing import List, Optional

from eval.ruler.data.synthetic.common import (
    QA_FILES,
    QA_SCRIPT,
    Settings,
    UsageError,
    fit_sample,
    make_record,
    run_generator_cli,
    search_size,
    shown,
)

DOCUMENT_PROMPT = "Document {i}:\n{document}"
DATASETS = tuple(QA_FILES)


def read_squad(data) -> tuple:
    """SQuAD-format dict -> (questions, documents); a question knows its paragraph and its article's others."""
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    doc_index = {c: i for i, c in enumerate(docs)}
    qas = []
    for article in data["data"]:
        article_docs = [doc_index[p["context"]] for p in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            here = doc_index[paragraph["context"]]
            for qa in paragraph["qas"]:
                if not qa.get("is_impossible", False):
                    qas.append({
                        "query": qa["question"],
                        "outputs": [a["text"] for a in qa["answers"]],
                        "context": [here],
                        "more_context": [i for i in article_docs if i != here],
                    })
    return qas, docs


def read_hotpotqa(data) -> tuple:
    """HotpotQA-format list -> (questions, documents); a document is "title\\nsentences"."""
    docs = sorted({f"{title}\n{''.join(sentences)}" for d in data for title, sentences in d["context"]})
    doc_index = {c: i for i, c in enumerate(docs)}
    qas = [{
        "query": d["question"],
        "outputs": [d["answer"]],
        "context": [doc_index[f"{title}\n{''.join(sentences)}"] for title, sentences in d["context"]],
    } for d in data]
    return qas, docs


def load_qa(dataset: str, path: Optional[str]) -> tuple:
    path = path or QA_FILES[dataset]
    if not os.path.isfile(path):
        raise UsageError(f"QA file {shown(path)} ({dataset}) not found: download it with `{QA_SCRIPT}` "
                         f"or pass --qa_file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        qas, docs = read_squad(data) if dataset == "squad" else read_hotpotqa(data)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        shape = "SQuAD ({\"data\": [{\"paragraphs\": ...}]})" if dataset == "squad" else \
            "HotpotQA ([{\"question\", \"answer\", \"context\": [[title, sentences]]}])"
        raise UsageError(f"QA file {shown(path)} is not in {shape} format ({type(exc).__name__}: {exc})") from exc
    if not qas:
        raise UsageError(f"QA file {shown(path)} has no answerable question")
    return qas, docs, path


def generate(settings: Settings, num_samples: int, pre_samples: int = 0, *, dataset: str = "squad") -> List[dict]:
    """Records of a qa task: questions ``pre_samples .. pre_samples + num_samples - 1`` of the file."""
    if dataset not in DATASETS:
        raise UsageError(f"task {settings.task}: dataset {dataset!r} is not one of {DATASETS}")
    qas, docs, path = load_qa(dataset, settings.qa_file)
    if pre_samples + num_samples > len(qas):
        raise UsageError(f"QA file {shown(path)} has {len(qas)} answerable questions; task {settings.task} asks for "
                         f"{pre_samples + num_samples} (lower --num_samples)")
    rng, _ = settings.rng()
    seed = settings.random_seed
    task_template, prefix_template = settings.templates("qa")

    def build_for(index: int, num_docs: int):
        qa = qas[index]
        gold, more = qa["context"], qa.get("more_context", [])
        if num_docs < len(docs):
            if num_docs - len(gold) > len(more):
                taken = set(gold + more)
                others = [i for i in range(len(docs)) if i not in taken]
                chosen = gold + more + rng.sample(others, max(0, num_docs - len(gold) - len(more)))
            else:
                chosen = gold + rng.sample(more, max(0, num_docs - len(gold)))
            chosen_docs = [docs[i] for i in chosen]
        else:
            chosen_docs = (docs * ((num_docs + len(docs) - 1) // len(docs)))[:num_docs]
        random.Random(seed).shuffle(chosen_docs)  # RULER: the same permutation for every sample
        context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(chosen_docs))
        prompt = settings.prompt(task_template.format(context=context, query=qa["query"]),
                                 prefix_template.format(query=qa["query"]))
        return prompt, qa["outputs"]

    incremental = 10
    num_docs = search_size(settings, lambda n: build_for(0, n), incremental)  # RULER sizes on question 0
    records = []
    for i in settings.sample_numbers(num_samples):
        index = pre_samples + i
        length, prompt, answer = fit_sample(settings, lambda n: build_for(index, n), num_docs, incremental)
        records.append(make_record(index, prompt, answer, length))
    return records


def _add_task_arguments(parser) -> None:
    parser.add_argument("--dataset", type=str, required=True, choices=DATASETS, help="squad or hotpotqa")
    parser.add_argument("--qa_file", type=str, default=None, help="default: json/{dataset}.json")


def main(argv=None) -> None:
    run_generator_cli("qa", generate, _add_task_arguments, ("dataset",), argv)


if __name__ == "__main__":
    from eval.ruler.cli import cli_main
    cli_main(main)()
