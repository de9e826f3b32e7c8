"""benchmarks/e2e_speed.py smoke-runs on the CPU (tiny random Llama) and writes its JSON phase by phase."""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "e2e_speed.py")


def _run(out, rows, capsys):
    """The script's main() in this process (its imports are shared: a subprocess would pay them twice)."""
    if os.path.dirname(SCRIPT) not in sys.path:
        sys.path.insert(0, os.path.dirname(SCRIPT))
    import e2e_speed
    e2e_speed.main(["--models", "tiny-llama", "--lengths", "512", "--new_tokens", "3", "--samples", "1",
                    "--top_k_blocks", "2", "--device", "cpu", "--out", str(out), "--rows", *rows])
    return capsys.readouterr().out


def test_e2e_speed_smoke(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    stdout = _run(out, ["dense", "sketchwalk_graph", "seerattn"], capsys)
    res = json.loads(out.read_text())
    for key in ("gpu", "torch", "triton", "python", "command", "date", "transformers"):
        assert key in res, key
    assert res["benchmark"] == "e2e_speed" and res["new_tokens"] == 3
    rows = res["runs"]["tiny-llama"]["512"]
    assert set(rows) == {"dense", "sketchwalk_graph", "seerattn"}
    for name, r in rows.items():
        assert "error" not in r, (name, r)
        assert r["prefill_s"] > 0 and r["decode_s"] > 0 and r["new_tokens"] == 3, (name, r)
        assert len(r["samples"]) == 1
    assert rows["sketchwalk_graph"]["graph_decode"] is False          # the CPU never captures graphs
    assert 0 < rows["sketchwalk_graph"]["density"]["prefill"] < 1     # top_k 2 of 8 blocks: really sparse
    assert "random" in rows["seerattn"]["note"]
    assert rows["sketchwalk_graph"]["rerank_path"] == "pytorch" and "rerank_path" not in rows["dense"]   # the CPU
    assert "tiny-llama @ 512" in stdout

    # a second slice merges into the same file
    _run(out, ["dense_graph"], capsys)
    res2 = json.loads(out.read_text())
    assert set(res2["runs"]["tiny-llama"]["512"]) == {"dense", "sketchwalk_graph", "seerattn", "dense_graph"}
    assert len(res2["commands"]) == 2
    # greedy tokens: dense with and without graph decode (off on the CPU: the same loop) agree
    assert res2["runs"]["tiny-llama"]["512"]["dense_graph"]["samples"][0]["tokens"] == \
        rows["dense"]["samples"][0]["tokens"]


def test_e2e_speed_merge(tmp_path, capsys):
    """Slices written to separate files merge into one (rows of one model and length side by side)."""
    import json as _json
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "all.json"
    row = {"prefill_s": 1.0, "decode_s": 1.0, "total_s": 2.0, "graph_decode": False, "density": {}}
    a.write_text(_json.dumps({"benchmark": "e2e_speed", "commands": ["a"], "runs": {"m": {"model": "M", "512": {"dense": row}}}}))
    b.write_text(_json.dumps({"benchmark": "e2e_speed", "commands": ["b"],
                              "runs": {"m": {"model": "M", "512": {"dense_graph": dict(row, total_s=1.0)}}}}))
    if os.path.dirname(SCRIPT) not in sys.path:
        sys.path.insert(0, os.path.dirname(SCRIPT))
    import e2e_speed
    e2e_speed.main(["--merge", str(a), str(b), "--out", str(out)])
    res = _json.loads(out.read_text())
    assert set(res["runs"]["m"]["512"]) == {"dense", "dense_graph"} and res["commands"] == ["a", "b"]
    assert "2.00x" in capsys.readouterr().out
