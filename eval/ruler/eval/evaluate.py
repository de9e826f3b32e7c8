"""
Get summary.csv with score and null predictions amount (RULER's scripts/eval/evaluate.py).

Running
```
python eval/ruler/eval/evaluate.py \
    --data_dir /path/to/your/prediction_jsonl_folder \
    --benchmark synthetic
```

Reads every {task}.jsonl of the folder whose task is in eval/ruler/{benchmark}.yaml, after
merging chunk files {task}-{N}.jsonl into {task}.jsonl (in chunk order). Writes, like RULER:

* summary.csv (several tasks) or summary-{task}.csv (one task), RULER's transposed layout as
  pandas writes it: a header row of column numbers, then rows Tasks / Score / Nulls, one column
  per task; Nulls = "n_empty/n_total";
* submission.csv: Task, ID, Prediction.

Differences from RULER: chunk files are kept after merging (RULER deletes them) so that a
chunked call_api.py run can still resume, and merging again is idempotent; a last line cut short
by a killed run is skipped with a warning; no nltk, pandas or nemo is needed. A prediction file
(or a task's chunk files together) holding a sample, keyed by (index, sha256 of its input), more
often than its data file does is refused (exit 2, the file named) instead of scored twice; the
data file is the one call_api.py's manifest names, or RULER run.sh's {length}/data/{task}/ beside
{length}/pred/ (without one, each sample may appear once). An empty prediction file is refused too.
"""
from __future__ import annotations

import argparse
import collections
import csv
import importlib
import json
import os
import re
import sys
from typing import Any, Dict, List, Tuple

from eval.ruler.cli import OneLineParser, UsageError, cli_main
from eval.ruler.pred.prediction_files import CHUNK_RE, check_no_extra_copies, data_file_of, sample_key

EVAL_DIR = os.path.dirname(os.path.abspath(__file__))
RULER_DIR = os.path.dirname(EVAL_DIR)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description="Score RULER prediction files: summary.csv and submission.csv.")
    parser.add_argument("--data_dir", type=str, required=True, help="path to the prediction jsonl files")
    parser.add_argument("--benchmark", type=str, default="synthetic", help="Options: [synthetic]")
    parser.add_argument("--verbose", type=int, default=0, help="how many lines you want to display.")
    return parser


def load_constants(benchmark: str):
    path = os.path.join(EVAL_DIR, benchmark, "constants.py")
    if not os.path.isfile(path):
        raise UsageError(f"unknown --benchmark {benchmark!r}: no {path}")
    return importlib.import_module(f"eval.ruler.eval.{benchmark}.constants")


def load_tasks(benchmark: str) -> Dict[str, Dict[str, Any]]:
    """Task name -> {'task': type, 'metric_fn': ...}: eval/ruler/{benchmark}.yaml, as in RULER,
    or the constants' DEFAULT_TASK_TYPES when the yaml is absent."""
    module = load_constants(benchmark)
    yaml_path = os.path.join(RULER_DIR, f"{benchmark}.yaml")
    if os.path.isfile(yaml_path):
        import yaml

        with open(yaml_path, encoding="utf-8") as fh:
            custom = yaml.safe_load(fh) or {}
    else:
        custom = {name: {"task": base} for name, base in getattr(module, "DEFAULT_TASK_TYPES", {}).items()}
    tasks = {}
    for name, config in custom.items():
        config = dict(config)
        if config.get("task") not in module.TASKS:
            raise UsageError(f"task {name!r} has unknown task type {config.get('task')!r} in {yaml_path}")
        config.update(module.TASKS[config["task"]])
        tasks[name] = config
    return tasks


def postprocess_pred(predict_str: str, task_config: dict) -> str:
    predict_str = predict_str.strip()
    # Remove all non-printable characters
    np_pattern = re.compile(r"[\x00-\x1f]")
    predict_str = np_pattern.sub("\n", predict_str).strip()
    return predict_str


def read_records(path: str) -> List[Dict[str, Any]]:
    """Records of a prediction jsonl; a partial last line (a killed run) is skipped with a warning."""
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno == len(lines):  # no newline after it: cut short by a kill
                print(f"warning: {path}: skipped a truncated last line", file=sys.stderr)
                continue
            raise UsageError(f"{path}:{lineno} is not a JSON line") from None
    return records


def check_copies(label: str, records: List[Dict[str, Any]], pred_file: str) -> None:
    """Refuse records (of ``label``: a file or a task's chunk files) that hold a sample more often than the
    data file of ``pred_file`` does, instead of scoring it twice (prediction_files.check_no_extra_copies)."""
    keys = collections.Counter(sample_key(rec.get("index"), rec.get("input") or "") for rec in records)
    check_no_extra_copies(label, keys, data_file_of(pred_file))


def aggregate_chunk(folder: str) -> None:
    """Merge {task}-{N}.jsonl into {task}.jsonl (chunk order, then line order), written atomically. Chunk files
    that together hold a sample more often than the data file does are an error (nothing is merged)."""
    groups: Dict[str, List[Tuple[int, str]]] = {}
    for name in os.listdir(folder):
        m = CHUNK_RE.match(name)
        if m:
            groups.setdefault(m.group("task"), []).append((int(m.group("chunk")), name))
    for task, files in groups.items():
        records = []
        for _, name in sorted(files):
            records += read_records(os.path.join(folder, name))
        chunks = ",".join(str(chunk) for chunk, _ in sorted(files))
        check_copies(f"{os.path.join(folder, task)}-{{{chunks}}}.jsonl", records,
                     os.path.join(folder, sorted(files)[0][1]))
        lines = [json.dumps(rec) for rec in records]
        out = os.path.join(folder, f"{task}.jsonl")
        tmp = os.path.join(folder, f".{task}.jsonl.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))
        os.replace(tmp, out)


def get_pred_and_ref(predictions_file: str, task_config: dict, input_field: str = "input",
                     references_field: str = "outputs", prediction_field: str = "pred",
                     metadata_field: str = "others"):
    records = read_records(predictions_file)
    if not records:
        raise UsageError(f"{predictions_file} holds no predictions; run call_api.py into its folder first")
    check_copies(predictions_file, records, predictions_file)
    inputs, predicts, references, indices = [], [], [], []
    for line in records:
        predict = postprocess_pred(line[prediction_field], task_config)
        reference = line.get(references_field, [line.get("output", "")])
        index = (line.get(metadata_field) or {}).get("id", line["index"])
        inputs.append(line[input_field])
        predicts.append(predict)
        references.append(reference)
        indices.append(index)
    return inputs, predicts, references, indices


def run_evaluation_per_task(task_config: dict, predictions_file: str, verbose: int = 0):
    inputs, predicts, references, indices = get_pred_and_ref(predictions_file, task_config)
    task_nulls = f"{sum([len(x) == 0 for x in predicts])}/{len(predicts)}"
    if len(references) > 0 and references[0][0] is not None:
        task_score = task_config["metric_fn"](predicts, references)
    else:
        task_score = 0.0
    if verbose != 0:
        print("=" * 40)
        for i, (input_, reference, predict) in enumerate(zip(inputs, references, predicts)):
            print(f"Input     : {input_}")
            print(f"Reference : {reference}")
            print(f"Prediction: {predict}")
            print("=" * 40)
            if i > verbose:
                break
    return task_score, task_nulls, predicts, indices


def write_csv(path: str, rows: List[List[Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)


def summary_rows(results: Dict[str, Dict[str, Any]], extra_rows=()) -> List[List[Any]]:
    """RULER's transposed summary as pandas.DataFrame(rows).to_csv(index=False) writes it."""
    tasks = list(results)
    rows = [["Tasks"] + tasks,
            ["Score"] + [results[t]["score"] for t in tasks],
            ["Nulls"] + [results[t]["nulls"] for t in tasks]]
    rows += [list(r) for r in extra_rows]
    return [list(range(len(rows[0])))] + rows


def write_evaluation(data_dir: str, results: Dict[str, Dict[str, Any]]) -> str:
    tasks = list(results)
    output_file = os.path.join(data_dir, "summary.csv" if len(tasks) > 1 else f"summary-{tasks[0]}.csv")
    rows = summary_rows(results)
    write_csv(output_file, rows)
    print("\n=============================================\n")
    for row in rows[1:]:
        print("  ".join(str(x) for x in row))
    print(f"\nSaved eval results to {output_file}")
    return output_file


def write_submission(data_dir: str, results: Dict[str, Dict[str, Any]]) -> str:
    rows: List[List[Any]] = [["Task", "ID", "Prediction"]]
    for task, result in results.items():
        rows += [[task, i, p] for i, p in zip(result["indices"], result["predicts"])]
    output_file = os.path.join(data_dir, "submission.csv")
    write_csv(output_file, rows)
    print(f"\nSaved submission results to {output_file}")
    return output_file


def evaluate(data_dir: str, benchmark: str = "synthetic", verbose: int = 0) -> Dict[str, Dict[str, Any]]:
    if not os.path.isdir(data_dir):
        raise UsageError(f"--data_dir {data_dir} is not a folder of prediction files")
    tasks = load_tasks(benchmark)
    aggregate_chunk(data_dir)
    jsonl_files = {f for f in os.listdir(data_dir) if f.endswith(".jsonl")}
    print(f"Total tasks: {[task for task in tasks if f'{task}.jsonl' in jsonl_files]}")
    eval_results, subm_results = {}, {}
    for task, config in tasks.items():
        if f"{task}.jsonl" not in jsonl_files:
            continue
        print(f"Evaluate task {task}...")
        score, nulls, predicts, indices = run_evaluation_per_task(config, os.path.join(data_dir, f"{task}.jsonl"),
                                                                  verbose)
        eval_results[task] = {"score": score, "nulls": nulls}
        subm_results[task] = {"predicts": predicts, "indices": indices}
    if not eval_results:
        raise UsageError(f"no prediction file of a {benchmark} task ({{task}}.jsonl) in {data_dir}")
    write_evaluation(data_dir, eval_results)
    write_submission(data_dir, subm_results)
    return eval_results


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    evaluate(args.data_dir, args.benchmark, args.verbose)


if __name__ == "__main__":
    main()
