"""eval/ruler/mean_difference.py: the paired interval of the mean-over-cells difference, on records it reads."""
import gzip
import json

from eval.ruler.mean_difference import main, paired_mean_difference


def _write(path, rows):
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _rows(run, cell, scores):
    task, length = cell
    return [{"run": run, "task": task, "length": length, "index": i, "input_sha256": f"h{i}", "score_all": s}
            for i, s in enumerate(scores)]


def test_mean_over_cells_and_its_interval(tmp_path, capsys):
    a, b = ("t1", "2048"), ("t2", "4096")
    base = _rows("dense", a, [1] * 10) + _rows("dense", b, [1, 0] * 5)
    run = _rows("x", a, [1] * 8 + [0, 0]) + _rows("x", b, [1, 0] * 5)        # cell means -0.2 and 0: mean -0.1
    path = tmp_path / "samples.jsonl.gz"
    _write(path, base + run)
    assert main([str(path), "--resamples", "2000"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("x") and "-10.0" in out and "2 cells, 20 paired samples" in out
    # a run that equals the baseline on every sample has a zero-width interval
    same = {c: {(i, f"h{i}"): 1.0 for i in range(5)} for c in (a,)}
    assert paired_mean_difference(same, same, 100) == (0.0, (0.0, 0.0), 1, 5)


def test_unknown_run_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "samples.jsonl.gz"
    _write(path, _rows("dense", ("t", "1024"), [1, 0]))
    assert main([str(path), "--runs", "nope"]) == 2
    assert "--runs 'nope'" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.jsonl.gz")]) == 2
