"""eval/ruler/run.sh, RULER's own flow: config_models.sh / config_tasks.sh, the results layout
{ROOT_DIR}/{MODEL}/{BENCHMARK}/{LENGTH}/{data,pred}, and compare_results.py on that layout. (A rerun resumes
through call_api.py, whose resumption tests/test_ruler_pred.py checks, and prepare.py, which writes the same
bytes again: tests/test_ruler_data.py.)

The end-to-end run takes config_models.sh's entries for a user's own model (my-model, my-model-sketchwalk)
with MODEL_DIR pointing at the tiny random Llama of tests/conftest.py (SmolLM2's tokenizer): the real
scripts and the real SketchWalk session, in seconds instead of the minutes SmolLM2's sparse path takes on
a CPU (plumbing, never a result). The embedded models' entries are checked by planning a run of each
(call_api.plan_run resolves the flags, the model and the gates checkpoint; no weights load).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.ruler.pred import call_api, compare_results

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "eval" / "ruler" / "run.sh"
CONFIG_MODELS = REPO / "eval" / "ruler" / "config_models.sh"


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PY=sys.executable, **extra)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TASKS", "NUM_SAMPLES", "SEQ_LENGTHS", "GPUS"):
        env.pop(name, None)
    env.update(extra)
    return env


def run_sh(model, env, benchmark="synthetic"):
    return subprocess.run(["bash", str(RUN_SH), model, benchmark], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def model_select(name):
    """config_models.sh's line for ``name``, split as run.sh reads it."""
    out = subprocess.run(["bash", "-c", f'REPO_DIR="{REPO}"; source "{CONFIG_MODELS}"; MODEL_SELECT "$1" models .',
                          "-", name], capture_output=True, text=True, check=True).stdout.strip()
    keys = ("path", "template", "server_type", "tokenizer_path", "tokenizer_type", "server_args")
    return dict(zip(keys, out.split(":", 5)))


def records(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_run_sh_end_to_end_and_compare(tiny_model, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "my-model").symlink_to(tiny_model)
    root = tmp_path / "root"
    env = _env(ROOT_DIR=str(root), MODEL_DIR=str(models), NUM_SAMPLES="2", SEQ_LENGTHS="1024",
               TASKS="niah_single_1 vt", MAX_NEW_TOKENS="4", SKETCHWALK_ARGS="--top_k_blocks 2 --dense_layers 0")
    for model in ("my-model", "my-model-sketchwalk"):
        res = run_sh(model, env)
        assert res.returncode == 0, res.stderr[-3000:]
        cell = root / model / "synthetic" / "1024"
        for task in ("niah_single_1", "vt"):
            data = records(cell / "data" / task / "validation.jsonl")
            preds = records(cell / "pred" / f"{task}.jsonl")
            assert len(data) == 2 and sorted(r["index"] for r in preds) == [0, 1]
            assert json.loads((cell / "data" / task / "validation.prepare.json").read_text())["max_seq_length"] == 1024
            manifest = json.loads((cell / "pred" / f"manifest-{task}.json").read_text())
            assert manifest["data"]["max_seq_length"] == 1024
            assert manifest["key"]["server_type"] == ("SketchWalk" if "sketchwalk" in model else "hf")
        with open(cell / "pred" / "summary.csv", newline="") as fh:
            rows = list(csv.reader(fh))
        assert rows[1] == ["Tasks", "niah_single_1", "vt"] and rows[2][0] == "Score"
    sparse = records(root / "my-model-sketchwalk" / "synthetic" / "1024" / "pred" / "niah_single_1.jsonl")
    assert all(r["others"]["density"]["prefill"] < 1.0 for r in sparse)
    assert json.loads((root / "my-model-sketchwalk/synthetic/1024/pred/manifest-vt.json").read_text()
                      )["key"]["knobs"]["top_k_blocks"] == 2

    # compare_results reads the layout: a {ROOT}/{MODEL}/{BENCHMARK} folder, or {ROOT}/{MODEL} with one benchmark
    out = tmp_path / "comparison"
    result = compare_results.run_comparison({"dense": str(root / "my-model" / "synthetic"),
                                             "sw": str(root / "my-model-sketchwalk")}, out, n_boot=200, plots=False)
    assert [(c["task"], c["length"], c["n"]) for c in result["cells"]] == [("niah_single_1", "1024", 2),
                                                                          ("vt", "1024", 2)]
    assert "### niah_single_1 @ 1024" in (out / "comparison_report.md").read_text()


@pytest.mark.parametrize("name,server_type,knob", [("smollm2", "hf", None),
                                                   ("smollm2-sketchwalk", "SketchWalk", ("top_k_blocks", 16)),
                                                   ("smollm2-seerattn", "SeerAttn", ("threshold", 5e-4))])
def test_embedded_model_entries_plan(name, server_type, knob, tmp_path):
    entry = model_select(name)
    assert entry["server_type"] == server_type and entry["tokenizer_path"] == "smollm2"
    task = tmp_path / "data" / "niah_single_1"
    task.mkdir(parents=True)
    (task / "validation.jsonl").write_text(json.dumps({"index": 0, "input": "x", "outputs": ["y"]}) + "\n")
    args = call_api.parse_args(["--data_dir", tmp_path / "data", "--save_dir", tmp_path / "pred", "--task",
                                "niah_single_1", "--server_type", entry["server_type"], "--model_name_or_path",
                                entry["path"], *entry["server_args"].split()])
    plan = call_api.plan_run(args)
    assert plan.model["model"] == "smollm2"
    if knob:
        assert plan.manifest_key["knobs"][knob[0]] == knob[1]
    assert model_select("gemma3")["path"] == "gemma3-270m" and model_select("gemma3")["template"] == "base"


@pytest.mark.parametrize("argv,env,message", [
    (["smolm2", "synthetic"], {}, "error: model smolm2 is not in "),
    (["smollm2", "synthetc"], {}, "error: benchmark synthetc has no task list"),
    (["smollm2", "synthetic"], {"GPUS": "two"}, "error: GPUS=two: must be a whole number >= 1"),
])
def test_bad_arguments_exit_2_one_line(argv, env, message, tmp_path):
    res = subprocess.run(["bash", str(RUN_SH), *argv], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=_env(ROOT_DIR=str(tmp_path / "root"), **env))
    assert res.returncode == 2 and res.stderr.startswith(message) and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "root").exists()
    if argv[0] == "smolm2":
        assert "did you mean smollm2?" in res.stderr
