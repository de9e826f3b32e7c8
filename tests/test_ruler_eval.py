"""RULER scoring side: eval/ruler/eval/evaluate.py and eval/ruler/eval/synthetic/constants.py.

Prediction files are written by hand here (RULER's record format), so no model is needed.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.ruler.eval import evaluate
from eval.ruler.eval.synthetic import constants

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "eval" / "ruler" / "eval"



def rec(index, pred, outputs, **others):
    return {"index": index, "pred": pred, "input": f"prompt {index}", "outputs": outputs, "others": others,
            "truncation": -1, "length": 100}


def write(path: Path, records, tail: bytes = b""):
    path.write_bytes("".join(json.dumps(r) + "\n" for r in records).encode() + tail)


def rows_of(path: Path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def run_evaluate(data_dir: Path):
    return subprocess.run([sys.executable, "eval/ruler/eval/evaluate.py", "--data_dir", str(data_dir),
                           "--benchmark", "synthetic"], cwd=REPO, capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------- metrics
def test_string_match_all_and_part():
    preds = ["The numbers are 123 and 456.", "nothing here", "ABC"]
    refs = [["123", "456"], ["7"], ["abc", "zzz"]]
    # all: (2/2 + 0 + 1/2) / 3 ; part: (1 + 0 + 1) / 3
    assert constants.string_match_all(preds, refs) == round(150 / 3, 2) == 50.0
    assert constants.string_match_part(preds, refs) == 66.67
    assert constants.string_match_all(["x"], [["X"]]) == 100.0  # case-insensitive


def test_task_types_follow_the_metrics():
    tasks = evaluate.load_tasks("synthetic")
    assert len(tasks) == 13
    assert tasks["niah_single_1"]["metric_fn"] is not None
    assert tasks["qa_1"]["metric_fn"].__name__ == "string_match_part"
    for name in ("niah_multikey_3", "vt", "cwe", "fwe"):
        assert tasks[name]["metric_fn"].__name__ == "string_match_all"


def test_postprocess_strips_non_printable():
    assert evaluate.postprocess_pred("  42\x00\x07 and\t7\n", {}) == "42\n\n and\n7"
    assert evaluate.postprocess_pred("\x1b\x01", {}) == ""


# --------------------------------------------------------------------------- layouts
def test_single_task_summary_and_submission(tmp_path):
    write(tmp_path / "niah_single_1.jsonl", [rec(0, " 4821937.", ["4821937"]), rec(1, "", ["11"]),
                                             rec(2, "no\x02", ["5"], id="custom-id")])
    res = run_evaluate(tmp_path)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "summary.csv").exists()
    # RULER's transposed layout as pandas writes it: a header of column numbers, then the rows
    assert (tmp_path / "summary-niah_single_1.csv").read_text() == (
        "0,1\nTasks,niah_single_1\nScore,33.33\nNulls,1/3\n")
    assert rows_of(tmp_path / "submission.csv") == [["Task", "ID", "Prediction"], ["niah_single_1", "0", "4821937."],
                                                    ["niah_single_1", "1", ""], ["niah_single_1", "custom-id", "no"]]


def test_several_tasks_summary_in_yaml_order(tmp_path):
    write(tmp_path / "qa_1.jsonl", [rec(0, "Paris, France", ["paris", "lyon"]), rec(1, "Rome", ["Milan"])])
    write(tmp_path / "niah_single_1.jsonl", [rec(0, "1 and 2", ["1", "2"]), rec(1, "1", ["1", "2"])])
    write(tmp_path / "vt.jsonl", [rec(0, "X1 X2", ["X1", "X2", "X3", "X4"])])
    (tmp_path / "manifest-vt.json").write_text("{}")  # other files are ignored
    (tmp_path / "notes.jsonl").write_text('{"a": 1}\n')  # not a task of the yaml: ignored
    res = run_evaluate(tmp_path)
    assert res.returncode == 0, res.stderr
    rows = rows_of(tmp_path / "summary.csv")
    assert rows == [["0", "1", "2", "3"], ["Tasks", "niah_single_1", "vt", "qa_1"], ["Score", "75.0", "50.0", "50.0"],
                    ["Nulls", "0/2", "0/1", "0/2"]]
    sub = rows_of(tmp_path / "submission.csv")
    assert [r[0] for r in sub[1:]] == ["niah_single_1", "niah_single_1", "vt", "qa_1", "qa_1"]


def test_chunk_files_are_merged_in_chunk_order(tmp_path):
    write(tmp_path / "niah_single_1-10.jsonl", [rec(10, "x", ["y"])])
    write(tmp_path / "niah_single_1-2.jsonl", [rec(2, "x", ["x"])])
    write(tmp_path / "niah_single_1-0.jsonl", [rec(0, "x", ["x"])])
    write(tmp_path / "niah_single_1-1.jsonl", [rec(1, "x", ["x"])])
    res = run_evaluate(tmp_path)
    assert res.returncode == 0, res.stderr
    merged = [json.loads(x) for x in (tmp_path / "niah_single_1.jsonl").read_text().splitlines()]
    assert [r["index"] for r in merged] == [0, 1, 2, 10]
    assert (tmp_path / "summary-niah_single_1.csv").read_text().splitlines()[2] == "Score,75.0"
    assert "Total tasks: ['niah_single_1']" in res.stdout      # the tasks it scored, not all 13
    # chunk files are kept (a chunked run can still resume); merging again gives the same file
    assert (tmp_path / "niah_single_1-10.jsonl").exists()
    first = (tmp_path / "niah_single_1.jsonl").read_bytes()
    assert run_evaluate(tmp_path).returncode == 0
    assert (tmp_path / "niah_single_1.jsonl").read_bytes() == first
    # a sample in two chunk files (a stale chunk of another run) is refused, not counted twice or dropped
    write(tmp_path / "niah_single_1-2.jsonl", [rec(2, "x", ["x"]), rec(1, "x", ["x"])])
    summary = (tmp_path / "summary-niah_single_1.csv").read_bytes()
    res = run_evaluate(tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "niah_single_1-{0,1,2,10}.jsonl holds sample index 1" in res.stderr and "2 times" in res.stderr
    assert (tmp_path / "niah_single_1.jsonl").read_bytes() == first
    assert (tmp_path / "summary-niah_single_1.csv").read_bytes() == summary


def test_truncated_last_line_is_skipped(tmp_path):
    write(tmp_path / "niah_single_1.jsonl", [rec(0, "7", ["7"])], tail=b'{"index": 1, "pred": "7", "inp')
    res = run_evaluate(tmp_path)
    assert res.returncode == 0, res.stderr
    assert "truncated last line" in res.stderr
    assert (tmp_path / "summary-niah_single_1.csv").read_text().splitlines()[3] == "Nulls,0/1"


def test_broken_middle_line_is_an_error(tmp_path):
    (tmp_path / "niah_single_1.jsonl").write_text('{"index": 0\n' + json.dumps(rec(1, "7", ["7"])) + "\n")
    res = run_evaluate(tmp_path)
    assert res.returncode == 2 and "niah_single_1.jsonl:1" in res.stderr


@pytest.mark.parametrize("case", ["missing_dir", "no_predictions", "bad_benchmark"])
def test_bad_input_exit_2(case, tmp_path):
    argv = {"missing_dir": ["--data_dir", str(tmp_path / "nope")],
            "no_predictions": ["--data_dir", str(tmp_path)],
            "bad_benchmark": ["--data_dir", str(tmp_path), "--benchmark", "nosuch"]}[case]
    res = subprocess.run([sys.executable, "eval/ruler/eval/evaluate.py", *argv], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: ") and res.stderr.strip().count("\n") == 0
    assert not list(tmp_path.glob("*.csv"))
