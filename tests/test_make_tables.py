"""eval/ruler/make_tables.py --root: the README tables of a results folder other than SmolLM2's
(Gemma-3: no SeerAttn rows, density per layer type, end-to-end seconds), from compare_results.py's
own files made from small fake prediction files."""
from __future__ import annotations

import json
from pathlib import Path

from eval.ruler import make_tables as mt
from eval.ruler.pred import compare_results as cr


def write_run(folder: Path, task, length, correct, method="dense", density=None, prefill_s=1.0, decode_s=2.0):
    path = folder / str(length) / f"{task}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for i, ok in enumerate(correct):
            others = {"prefill_s": prefill_s, "decode_s": decode_s, "prompt_tokens": length, "new_tokens": 64,
                      "method": method, "batch_size": 1}
            if density is not None:
                others["density"] = {"prefill": density, "decode": 0.1, "overall": density}
                others["density_by_layer_type"] = {
                    "sparse": {"prefill": density / 2, "decode": 0.05, "overall": density / 2, "layers": [5, 11, 17]},
                    "sliding": {"prefill": 0.03, "decode": 0.02, "overall": 0.03, "layers": [0, 1, 2, 3]}}
            fh.write(json.dumps({"index": i, "input": f"prompt {i}", "outputs": [str(100 + i)], "others": others,
                                 "pred": str(100 + i) if ok else "no"}) + "\n")


def test_gemma_like_root(tmp_path, capsys):
    root = tmp_path / "ruler_gemma3"
    s1 = tmp_path / "s1"
    for length in (8192, 32768):
        for task, ok in (("niah_single_1", (1, 1, 1, 0)), ("vt", (0, 0, 0, 1))):
            write_run(s1 / "dense", task, length, ok)
    cr.run_comparison({"dense": str(s1 / "dense")}, root / "stage1" / "comparison")
    s2 = tmp_path / "s2"
    write_run(s2 / "dense", "niah_single_1", 8192, (1, 1, 1, 1))
    write_run(s2 / "sketchwalk", "niah_single_1", 8192, (1, 1, 0, 0), method="sketch_walk", density=0.4)
    cr.run_comparison({"dense": str(s2 / "dense"), "sketchwalk": str(s2 / "sketchwalk")},
                      root / "stage2" / "comparison")
    e = tmp_path / "e"
    write_run(e / "dense", "niah_single_1", 32768, (1, 1), prefill_s=0.4, decode_s=1.28)
    write_run(e / "sketchwalk", "niah_single_1", 32768, (1, 0), method="sketch_walk", density=0.1,
              prefill_s=0.3, decode_s=1.6)
    cr.run_comparison({"dense": str(e / "dense"), "sketchwalk": str(e / "sketchwalk")},
                      root / "e2e_32k" / "comparison")
    capsys.readouterr()
    mt.main(["--root", str(root)])
    out = capsys.readouterr().out
    assert "Stage 1, dense RULER score (n = 4 per cell" in out and "| task | 8K | 32K |" in out
    assert "| niah_single_1 | **75** | **75** |" in out and "| vt | 25 | 25 |" in out
    assert "SeerAttn" not in out
    assert "| SketchWalk, default (minmax, walk 0.25, top_k 16) | 50.0 | -50.0 | 0.400 | 3.00 |" in out
    assert "| niah_single_1 @ 8K (4) | 100 [51, 100] / 1.00 | 50 [15, 85] / 0.40 |" in out
    assert "sparse: layers 5, 11, 17; sliding: layers 0, 1, 2, 3" in out
    assert "| sketchwalk | 8K (1) | 0.200 | 0.030 | 0.400 |" in out
    assert "End to end, niah_single_1 @ 32K, one process alone, batch 1 (n = 2)" in out
    assert "| dense | 0.400 | 1.280 | 64.0 | 20.0 | 1.680 | - | 1.000 | 100 |" in out
    assert "| SketchWalk, default (minmax, walk 0.25, top_k 16) | 0.300 | 1.600 | 64.0 | 25.0 | 1.900 | 0.88x |" in out
    assert "The same, medians per sample" in out
    assert "| dense | 0.400 | 1.280 | 20.0 | 1.680 | - | 1.680 |" in out
    assert "| SketchWalk, default (minmax, walk 0.25, top_k 16) | 0.300 | 1.600 | 25.0 | 1.900 | 0.88x | 1.900 |" in out


def test_root_without_stage1_is_a_usage_error(tmp_path, capsys):
    try:
        mt.main(["--root", str(tmp_path)])
        raise AssertionError("accepted a root without stage 1")
    except SystemExit as exc:
        assert exc.code == 2
    err = capsys.readouterr().err
    assert f"--root {tmp_path}: no stage1/comparison/comparison.json" in err and "Traceback" not in err


def test_committed_gemma_selection_rows(capsys, monkeypatch):
    """The committed Gemma-3 selection rows (run without a same-run dense) read beside stage2_decode's on the same
    prompts: the default's mean and paired difference, the cut oracle's sample counts, the depth quartiles."""
    root = Path(__file__).resolve().parents[1] / "results" / "ruler_gemma3"
    monkeypatch.setattr(mt, "ROOT", str(root))
    mt.pooled_selection_table("selection_evidence")
    out = capsys.readouterr().out
    assert "| default | 66.0 | 60.0 | 100.0 | 50.0 | 58.0 | 92.0 | 32.0 | 42.0 | 62.5 | -14.5 [" in out
    assert "| oracle_dlb1 | 76.2 (n = 21) |" in out and "(321 samples)" in out
    assert "| niah_single_2 | 0-25% | 25-50% | 50-75% | 75-100% |" in out and "| default | 8 (12) | 33 (12) |" in out
