"""compare_results.py on small fake prediction files with known contents (no model runs)."""
from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from eval.ruler.pred import compare_results as cr

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "ruler" / "pred" / "compare_results.py"



def rec(index, pred, outputs, prefill_s=1.0, decode_s=0.5, density=None, method="dense", depth=None,
        batch_size=1, prompt=None):
    others = {"prefill_s": prefill_s, "decode_s": decode_s, "prompt_tokens": 1000, "new_tokens": 8,
              "method": method, "batch_size": batch_size}
    if density is not None:
        others["density"] = {"prefill": density[0], "decode": density[1], "overall": density[0]}
        others["density_per_layer"] = [1.0, density[0]]
    r = {"index": index, "pred": pred, "input": prompt if prompt is not None else f"prompt {index}",
         "outputs": outputs, "others": others, "truncation": -1, "length": 1000}
    if depth is not None:
        r["depth"] = depth
    return r


def write(path: Path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def dense_run(d: Path, task="niah_single_1", correct=(1, 1, 1, 1, 0), sub=""):
    write(d / sub / f"{task}.jsonl",
          [rec(i, f"The number is {100 + i}." if ok else "no idea", [str(100 + i)], prefill_s=2.0, decode_s=1.0,
               depth=[10, 30, 50, 70, 90][i % 5])
           for i, ok in enumerate(correct)])


def sparse_run(d: Path, task="niah_single_1", correct=(1, 1, 1, 0, 0), dens=(0.2, 0.3, 0.4, 0.3, 0.3),
               method="sketch_walk", sub=""):
    write(d / sub / f"{task}.jsonl",
          [rec(i, f"{100 + i}" if ok else "wrong", [str(100 + i)], prefill_s=1.0, decode_s=0.5,
               density=(dn, 0.5), method=method, depth=[10, 30, 50, 70, 90][i % 5])
           for i, (ok, dn) in enumerate(zip(correct, dens))])


def run_main(argv, capsys):
    try:
        code = cr.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------ math
def test_wilson_known_values():
    lo, hi = cr.wilson_interval(4, 5)
    assert lo == pytest.approx(0.3755, abs=1e-4) and hi == pytest.approx(0.9638, abs=1e-4)
    lo, hi = cr.wilson_interval(5, 5)
    assert hi == 1.0 and lo == pytest.approx(0.5655, abs=1e-4)
    lo, hi = cr.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)


def test_density_by_layer_type(tmp_path):
    """Gemma-3's records give the density per layer type; the comparison keeps its per-kind means."""
    dense_run(tmp_path / "dense")
    recs = []
    for i, dn in enumerate((0.2, 0.4, 0.3, 0.3, 0.3)):
        r = rec(i, f"{100 + i}", [str(100 + i)], density=(dn, 0.5), method="sketch_walk")
        r["others"]["density_by_layer_type"] = {
            "sparse": {"prefill": dn, "decode": 0.1, "overall": dn, "layers": [5, 11, 17]},
            "sliding": {"prefill": 0.03, "decode": 0.02, "overall": 0.03, "layers": [0, 1, 2]}}
        recs.append(r)
    write(tmp_path / "sw" / "niah_single_1.jsonl", recs)
    res = cr.run_comparison({"dense": str(tmp_path / "dense"), "sketchwalk": str(tmp_path / "sw")}, tmp_path / "c")
    [cell] = res["cells"]
    by = cell["runs"]["sketchwalk"]["density_by_layer_type"]
    assert list(by) == ["sparse", "sliding"] and by["sparse"]["layers"] == [5, 11, 17]
    assert by["sparse"]["prefill"] == pytest.approx(0.3) and by["sparse"]["decode"] == pytest.approx(0.1)
    assert by["sliding"]["prefill"] == pytest.approx(0.03)
    assert cell["runs"]["dense"]["density_by_layer_type"] is None
    saved = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert saved["cells"][0]["runs"]["sketchwalk"]["density_by_layer_type"]["sliding"]["layers"] == [0, 1, 2]


def test_report_math(tmp_path):
    dense_run(tmp_path / "dense")
    sparse_run(tmp_path / "sw")
    out = tmp_path / "cmp"
    res = cr.run_comparison({"dense": str(tmp_path / "dense"), "sketchwalk": str(tmp_path / "sw")}, out)
    assert res["baseline"] == "dense"
    [cell] = res["cells"]
    assert (cell["task"], cell["length"], cell["n"], cell["metric"]) == ("niah_single_1", "all", 5, "string_match_all")
    d, s = cell["runs"]["dense"], cell["runs"]["sketchwalk"]
    assert d["acc_all"] == pytest.approx(80.0) and d["score"] == pytest.approx(80.0)
    assert d["acc_all_interval"] == "wilson"
    assert d["acc_all_ci"] == pytest.approx([37.55, 96.38], abs=0.01)
    assert d["density_prefill"] == 1.0 and d["density_source"] == "dense server"
    assert s["acc_all"] == pytest.approx(60.0) and s["acc_part"] == pytest.approx(60.0)
    assert s["density_prefill"] == pytest.approx(0.3) and s["density_decode"] == pytest.approx(0.5)
    assert s["density_per_layer"] == pytest.approx([1.0, 0.3])
    assert (d["prefill_s"], d["decode_s"], d["total_s"]) == (2.0, 1.0, 3.0)
    assert (s["prefill_s"], s["decode_s"], s["total_s"]) == (1.0, 0.5, 1.5)
    vs = s["vs_baseline"]
    assert vs["speedup_total"] == pytest.approx(2.0) and vs["speedup_prefill"] == pytest.approx(2.0)
    assert vs["diff_acc_all"] == pytest.approx(-20.0)
    assert vs["lost"] == 1 and vs["gained"] == 0
    lo, hi = vs["diff_acc_all_ci"]
    assert lo <= -20.0 <= hi and hi <= 0.0
    assert vs["diff_density_prefill"] == pytest.approx(-0.7)
    assert s["by_depth"]["70"] == {"n": 1, "acc_all": 0.0} and d["by_depth"]["90"]["acc_all"] == 0.0
    assert res["summary"]["sketchwalk"]["speedup_total"] == pytest.approx(2.0)
    # outputs
    for f in ("comparison_report.md", "comparison.json", "samples.jsonl.gz", "time_per_sample.png",
              "accuracy_vs_density_niah_single_1.png", "accuracy_vs_density_mean.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert not list(out.glob("*.tmp")), "a temporary file was left behind"
    assert (out / "time_per_sample.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "comparison_report.md").read_text()
    assert "80.0 [37.6, 96.4] W" in report and "2.00x" in report and "-20.0" in report
    assert "Wilson" in report
    samples = [json.loads(l) for l in gzip.decompress((out / "samples.jsonl.gz").read_bytes()).decode().splitlines()]
    assert len(samples) == 10 and all("input" not in r for r in samples)
    assert json.loads((out / "comparison.json").read_text())["cells"][0]["n"] == 5


def test_fractional_scores_use_bootstrap(tmp_path):
    # two references per sample: string_match_all gives halves, part gives 0/1
    recs = [rec(0, "a b", ["a", "b"]), rec(1, "a", ["a", "b"]), rec(2, "", ["a", "b"]), rec(3, "b", ["a", "b"])]
    write(tmp_path / "dense" / "niah_multivalue.jsonl", recs)
    res = cr.run_comparison({"dense": str(tmp_path / "dense")}, tmp_path / "out", plots=False)
    st = res["cells"][0]["runs"]["dense"]
    assert st["acc_all"] == pytest.approx(50.0) and st["acc_part"] == pytest.approx(75.0)
    assert st["acc_all_interval"] == "bootstrap" and st["acc_part_interval"] == "wilson"
    lo, hi = st["acc_all_ci"]
    assert 0.0 <= lo < 50.0 < hi <= 100.0
    assert st["empty_preds"] == 1
    assert res["baseline"] is None and st.get("vs_baseline") is None


def test_batch_share_and_qa_metric(tmp_path):
    write(tmp_path / "dense" / "qa_1.jsonl",
          [rec(i, "x", ["x", "y"], prefill_s=4.0, decode_s=2.0, batch_size=4) for i in range(4)])
    res = cr.run_comparison({"dense": str(tmp_path / "dense")}, tmp_path / "out", plots=False)
    cell = res["cells"][0]
    assert cell["metric"] == "string_match_part"
    st = cell["runs"]["dense"]
    assert st["score"] == pytest.approx(100.0) and st["acc_all"] == pytest.approx(50.0)
    assert (st["prefill_s"], st["decode_s"]) == (1.0, 0.5)


def test_per_length_layout_chunks_and_filters(tmp_path):
    for L in ("1024", "2048"):
        dense_run(tmp_path / "dense", sub=L)
        sparse_run(tmp_path / "sw", sub=L)
        dense_run(tmp_path / "dense", task="vt", sub=L)
        sparse_run(tmp_path / "sw", task="vt", sub=L)
    # the sparse 2048 niah file as two chunks, next to evaluate.py's merged copy
    lines = (tmp_path / "sw" / "2048" / "niah_single_1.jsonl").read_text().splitlines(True)
    (tmp_path / "sw" / "2048" / "niah_single_1-0.jsonl").write_text("".join(lines[:3]))
    (tmp_path / "sw" / "2048" / "niah_single_1-1.jsonl").write_text("".join(lines[3:]))
    runs = {"dense": str(tmp_path / "dense"), "sw": str(tmp_path / "sw")}
    res = cr.run_comparison(runs, tmp_path / "out", plots=False)
    assert [(c["task"], c["length"]) for c in res["cells"]] == [
        ("niah_single_1", "1024"), ("vt", "1024"), ("niah_single_1", "2048"), ("vt", "2048")]
    assert res["cells"][2]["runs"]["sw"]["n"] == 5
    res = cr.run_comparison(runs, tmp_path / "out2", tasks=["vt"], lengths=["2048"], plots=False)
    assert [(c["task"], c["length"]) for c in res["cells"]] == [("vt", "2048")]
    # a merged file holding a sample that no chunk has: two runs mixed in one folder
    with open(tmp_path / "sw" / "2048" / "niah_single_1.jsonl", "a") as f:
        f.write(json.dumps(rec(99, "x", ["y"], density=(0.1, 0.1), method="sketch_walk")) + "\n")
    with pytest.raises(cr.UsageError, match="none of the chunk files"):
        cr.run_comparison(runs, tmp_path / "out3", plots=False)


def test_repeated_sample_is_matched_by_count(tmp_path):
    """RULER run.sh's layout ({length}/pred beside {length}/data): a sample the data file holds twice may be
    predicted twice; predicted more often than the data holds it (two writers), it is refused."""
    same = dict(prompt="identical prompt")
    for run in ("a", "b"):
        write(tmp_path / run / "1024" / "data" / "niah_single_1" / "validation.jsonl",
              [{"index": 0, "input": "identical prompt", "outputs": ["1"], "answer_prefix": ""}] * 2)
    write(tmp_path / "a" / "1024" / "pred" / "niah_single_1.jsonl", [rec(0, "1", ["1"], **same)] * 2)
    write(tmp_path / "b" / "1024" / "pred" / "niah_single_1.jsonl", [rec(0, "1", ["1"], **same)])
    runs = {"dense": str(tmp_path / "a"), "hf": str(tmp_path / "b")}
    with pytest.raises(cr.UsageError, match=r"copy 2"):
        cr.run_comparison(runs, tmp_path / "o", plots=False)
    write(tmp_path / "b" / "1024" / "pred" / "niah_single_1.jsonl", [rec(0, "1", ["1"], **same)] * 3)
    with pytest.raises(cr.UsageError, match=r"niah_single_1.jsonl holds sample index 0 .* 3 times, its data file "
                                            r".*validation.jsonl 2 time"):
        cr.run_comparison(runs, tmp_path / "o", plots=False)


# ------------------------------------------------------------------------------ mismatches
def test_mismatched_samples(tmp_path, capsys):
    dense_run(tmp_path / "dense")
    sparse_run(tmp_path / "sw", correct=(1, 1, 1), dens=(0.2, 0.3, 0.4))
    code, err = run_main(["--run", f"dense={tmp_path / 'dense'}", "--run", f"sw={tmp_path / 'sw'}",
                          "--output_dir", str(tmp_path / "o"), "--no_plots"], capsys)
    assert code == 2
    assert err.startswith("error: sample sets differ: niah_single_1@all: run 'sw' has 3 samples, 'dense' 5")
    assert "only in 'dense': index 3" in err and "index 4" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "comparison.json").exists()


def test_same_index_different_input(tmp_path, capsys):
    dense_run(tmp_path / "dense")
    recs = [json.loads(l) for l in (tmp_path / "dense" / "niah_single_1.jsonl").read_text().splitlines()]
    recs[2]["input"] = "another prompt"
    write(tmp_path / "other" / "niah_single_1.jsonl", recs)
    code, err = run_main(["--run", f"dense={tmp_path / 'dense'}", "--run", f"other={tmp_path / 'other'}",
                          "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "index 2" in err and "same index, different input" in err


def test_mismatched_tasks_and_lengths(tmp_path, capsys):
    dense_run(tmp_path / "dense", sub="4096")
    dense_run(tmp_path / "dense", task="vt", sub="4096")
    sparse_run(tmp_path / "sw", sub="4096")
    sparse_run(tmp_path / "sw", sub="8192")
    code, err = run_main(["--run", f"dense={tmp_path / 'dense'}", "--run", f"sw={tmp_path / 'sw'}",
                          "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "run 'dense' lacks niah_single_1@8192" in err and "run 'sw' lacks vt@4096" in err
    code, err = run_main(["--run", f"dense={tmp_path / 'dense'}", "--run", f"sw={tmp_path / 'sw'}",
                          "--lengths", "8192", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "run 'dense'" in err and "has no length 8192" in err
    code, err = run_main(["--run", f"dense={tmp_path / 'dense'}", "--run", f"sw={tmp_path / 'sw'}",
                          "--lengths", "4096", "--tasks", "niah_single_1", "--output_dir", str(tmp_path / "o"),
                          "--no_plots"], capsys)
    assert code == 0
    # flat vs per-length folders
    sparse_run(tmp_path / "flat")
    code, err = run_main(["--run", f"dense={tmp_path / 'dense'}", "--run", f"flat={tmp_path / 'flat'}",
                          "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "lacks niah_single_1@all" in err


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["others"].pop("density"), "lack others.density"),
    (lambda r: r["others"].pop("prefill_s"), "others.prefill_s is missing"),
    (lambda r: r["others"].update(decode_s="fast"), "others.decode_s is 'fast', not a number"),
    (lambda r: r.pop("outputs"), "record has no 'outputs'"),
])
def test_bad_records(tmp_path, capsys, mutate, message):
    sparse_run(tmp_path / "sw")
    recs = [json.loads(l) for l in (tmp_path / "sw" / "niah_single_1.jsonl").read_text().splitlines()]
    mutate(recs[1])
    write(tmp_path / "sw" / "niah_single_1.jsonl", recs)
    code, err = run_main(["--run", f"sw={tmp_path / 'sw'}", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err, err


def test_sparse_without_density_is_an_error(tmp_path, capsys):
    write(tmp_path / "sw" / "niah_single_1.jsonl", [rec(0, "1", ["1"], method="sketch_walk")])
    code, err = run_main(["--sketchwalk_dir", str(tmp_path / "sw"), "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "carry no others.density" in err and "sketch_walk" in err


def test_missing_and_torn_inputs(tmp_path, capsys):
    code, err = run_main(["--seerattn_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "is not a folder" in err
    (tmp_path / "empty").mkdir()
    code, err = run_main(["--run", f"x={tmp_path / 'empty'}", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "no prediction files" in err
    dense_run(tmp_path / "torn")
    with open(tmp_path / "torn" / "niah_single_1.jsonl", "a") as f:
        f.write('{"index": 5, "pred": "12')
    code, err = run_main(["--run", f"x={tmp_path / 'torn'}", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "niah_single_1.jsonl:6: not valid JSON" in err
    code, err = run_main(["--run", "nodir", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "expected NAME=DIR" in err
    dense_run(tmp_path / "d")
    code, err = run_main(["--run", f"d={tmp_path / 'd'}", "--baseline", "zzz", "--output_dir", str(tmp_path / "o")],
                         capsys)
    assert code == 2 and "--baseline zzz" in err


def test_manifests_must_agree_within_a_run(tmp_path, capsys):
    sparse_run(tmp_path / "sw", sub="1024")
    sparse_run(tmp_path / "sw", sub="2048")
    key = {"server_type": "SketchWalk", "model": "smollm2", "checkpoint": None, "dtype": "float32",
           "device_type": "cpu", "temperature": 0.0, "knobs": {"key_summary": "minmax", "top_k_blocks": 16}}
    (tmp_path / "sw" / "1024" / "manifest-niah_single_1.json").write_text(json.dumps({"key": key}))
    res = cr.run_comparison({"sw": str(tmp_path / "sw")}, tmp_path / "o", plots=False)
    assert res["runs"]["sw"]["settings"]["knobs"]["key_summary"] == "minmax"
    assert "key_summary=minmax" in (tmp_path / "o" / "comparison_report.md").read_text()
    key2 = dict(key, knobs={"key_summary": "mean", "top_k_blocks": 16})
    (tmp_path / "sw" / "2048" / "manifest-niah_single_1.json").write_text(json.dumps({"key": key2}))
    code, err = run_main(["--run", f"sw={tmp_path / 'sw'}", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "mixes settings: knobs.key_summary differ" in err


def test_seed_command_as_written(tmp_path):
    """README Step 4, run from a folder holding ./results/{seerattn,sketchwalk}."""
    sparse_run(tmp_path / "results" / "seerattn", correct=(1, 0, 1, 0, 1), method="seer_attn",
               dens=(0.25, 0.25, 0.25, 0.25, 0.25))
    sparse_run(tmp_path / "results" / "sketchwalk")
    # call_api.py's manifests: the data's max_seq_length (prepare.py's record) and, for SeerAttn, a threshold left
    # to the gates checkpoint (None in the key, the value used in the session)
    for run, server, knobs, session in (("seerattn", "SeerAttn", {"threshold": None, "nz_ratio": None},
                                         {"threshold": 0.0005, "nz_ratio": None}),
                                        ("sketchwalk", "SketchWalk", {"top_k_blocks": 16}, {"top_k_blocks": 16})):
        key = {"server_type": server, "model": "smollm2", "dtype": "float32", "device_type": "cpu", "knobs": knobs}
        (tmp_path / "results" / run / "manifest-niah_single_1.json").write_text(json.dumps(
            {"key": key, "session": session, "data": {"max_seq_length": 4096}}))
    cmd = [sys.executable, str(SCRIPT), "--seerattn_dir", "./results/seerattn",
           "--sketchwalk_dir", "./results/sketchwalk", "--output_dir", "./results/comparison"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "results" / "comparison"
    data = json.loads((out / "comparison.json").read_text())
    assert data["baseline"] == "seerattn" and list(data["runs"]) == ["seerattn", "sketchwalk"]
    vs = data["cells"][0]["runs"]["sketchwalk"]["vs_baseline"]
    assert vs["speedup_total"] == pytest.approx(1.0) and vs["diff_acc_all"] == pytest.approx(0.0)
    assert vs["lost"] == 1 and vs["gained"] == 1
    assert (out / "comparison_report.md").is_file() and (out / "accuracy_vs_density_niah_single_1.png").is_file()
    report = (out / "comparison_report.md").read_text()
    assert data["cells"][0]["length"] == "4096" and "### niah_single_1 @ 4096" in report
    assert "threshold=0.0005" in report and "None" not in report
    assert math.isclose(data["cells"][0]["runs"]["seerattn"]["density_prefill"], 0.25)


def test_wilson_interval_contains_the_point_estimate():
    # 100% of 10 once gave an upper bound of 0.9999999999999999 and broke the error-bar plot
    for n in range(1, 80):
        for k in range(n + 1):
            lo, hi = cr.wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)
