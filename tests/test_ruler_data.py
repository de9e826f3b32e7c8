"""RULER data generation: eval/ruler/data/prepare.py, the generators and generate_niah_single_1.py.

The scripts run as a user runs them: ``python eval/ruler/...`` from the repository root, in a
subprocess, with no PYTHONPATH. Prompt lengths are re-counted here with the smollm2 tokenizer the
way the server tokenizes them (input + answer_prefix, no special tokens added). Essay tasks use
the project's own small fixture (tests/fixtures/essays_small.json), qa tasks tiny SQuAD- and
HotpotQA-shaped files; nothing here touches the network.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from eval.ruler.data.synthetic import constants as data_constants

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
ESSAY = FIXTURES / "essays_small.json"
SQUAD = FIXTURES / "squad_small.json"
HOTPOT = FIXTURES / "hotpotqa_small.json"
PREPARE = "eval/ruler/data/prepare.py"
NIAH_SINGLE_1 = "eval/ruler/data/synthetic/generate_niah_single_1.py"
CONFIG = "eval/ruler/synthetic.yaml"

NIAH = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
        "niah_multikey_3", "niah_multivalue", "niah_multiquery"]
NON_QA = NIAH + ["vt", "cwe", "fwe"]
ESSAY_TASKS = ["niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery"]
FIELDS = ["index", "input", "outputs", "length", "length_w_model_temp", "answer_prefix", "token_position_answer",
          "depth"]

TASKS = data_constants.TASKS
CONFIG_TASKS = yaml.safe_load((REPO / CONFIG).read_text())


def tokens_to_generate(task: str) -> int:
    return TASKS[CONFIG_TASKS[task]["task"]]["tokens_to_generate"]


def run(*args, cwd=REPO, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def error_lines(proc) -> list:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def read(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tokenizer():
    from eval.ruler.model_loader import load_tokenizer

    return load_tokenizer("smollm2")


def _prepare_all(root: Path, length: int, num_samples: int):
    out = root / f"len{length}"
    proc = run(PREPARE, "--config_file", CONFIG, "--task", ",".join(NON_QA), "--save_dir", out,
               "--max_seq_length", length, "--num_samples", num_samples, "--essay_file", ESSAY)
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The 11 non-QA tasks at 1024 and 4096 tokens (smollm2, chat template, essay fixture)."""
    root = tmp_path_factory.mktemp("ruler_data")
    return {1024: _prepare_all(root, 1024, 4), 4096: _prepare_all(root, 4096, 3)}


# --------------------------------------------------------------------------------------------

def test_config_holds_the_forks_13_tasks():
    niah = lambda hay, k, v, nk=1, nv=1, nq=1: {"task": "niah", "args": {  # noqa: E731
        "type_haystack": hay, "type_needle_k": k, "type_needle_v": v,
        "num_needle_k": nk, "num_needle_v": nv, "num_needle_q": nq}}
    assert CONFIG_TASKS == {
        "niah_single_1": niah("repeat", "words", "numbers"),
        "niah_single_2": niah("essay", "words", "numbers"),
        "niah_single_3": niah("essay", "words", "uuids"),
        "niah_multikey_1": niah("essay", "words", "numbers", nk=4),
        "niah_multikey_2": niah("needle", "words", "numbers"),
        "niah_multikey_3": niah("needle", "uuids", "uuids"),
        "niah_multivalue": niah("essay", "words", "numbers", nv=4),
        "niah_multiquery": niah("essay", "words", "numbers", nq=4),
        "vt": {"task": "variable_tracking", "args": {"num_chains": 1, "num_hops": 4}},
        "cwe": {"task": "common_words_extraction", "args": {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}},
        "fwe": {"task": "freq_words_extraction", "args": {"alpha": 2.0}},
        "qa_1": {"task": "qa", "args": {"dataset": "squad"}},
        "qa_2": {"task": "qa", "args": {"dataset": "hotpotqa"}},
    }
    assert list(CONFIG_TASKS) == NIAH + ["vt", "cwe", "fwe", "qa_1", "qa_2"]


@pytest.mark.parametrize("length", [1024, 4096])
def test_every_prompt_fits_max_seq_length(prepared, tokenizer, length):
    out, _ = prepared[length]
    for task in NON_QA:
        records = read(out / task / "validation.jsonl")
        assert len(records) == (4 if length == 1024 else 3), task
        ttg = tokens_to_generate(task)
        for i, r in enumerate(records):
            assert list(r) == FIELDS, task
            assert r["index"] == i
            tokens = len(tokenizer.encode(r["input"] + r["answer_prefix"], add_special_tokens=False))
            assert r["length"] == r["length_w_model_temp"] == tokens + ttg, task
            assert tokens + ttg <= length, (task, tokens, ttg)
            # the search fills the context (fwe's linear search steps by 1/32 of it, as RULER's does)
            assert tokens + ttg >= (0.75 if task == "fwe" else 0.9) * length, (task, tokens + ttg)
            assert r["outputs"] and all(isinstance(o, str) and o for o in r["outputs"]), task
            for answer in r["outputs"]:
                assert answer in r["input"], (task, answer)


@pytest.mark.parametrize("length", [1024, 4096])
def test_record_contents(prepared, length):
    out, _ = prepared[length]
    for task in NON_QA:
        for r in read(out / task / "validation.jsonl"):
            # chat template (SmolLM2 has one): question in the user turn, answer prefix after the
            # generation prompt, as its own field
            assert r["input"].startswith("<|im_start|>system\n"), task
            assert r["input"].endswith("<|im_end|>\n<|im_start|>assistant\n"), task
            assert "<|im_start|>user\n" in r["input"]
            if task in NIAH:
                assert isinstance(r["depth"], int) and 0 <= r["depth"] <= 100, task
                assert isinstance(r["token_position_answer"], int) and r["token_position_answer"] > 0
                assert r["answer_prefix"].startswith(" The special magic ")
            else:
                assert r["depth"] is None and r["token_position_answer"] is None, task
    single = read(out / "niah_single_1" / "validation.jsonl")[0]
    assert "A special magic number is hidden" in single["input"]
    assert single["answer_prefix"].endswith("mentioned in the provided text is")
    multi = read(out / "niah_multivalue" / "validation.jsonl")[0]
    assert len(multi["outputs"]) == 4 and multi["answer_prefix"].endswith("are")
    assert len(read(out / "niah_multiquery" / "validation.jsonl")[0]["outputs"]) == 4
    assert len(read(out / "vt" / "validation.jsonl")[0]["outputs"]) == 5
    assert len(read(out / "cwe" / "validation.jsonl")[0]["outputs"]) == 10
    assert len(read(out / "fwe" / "validation.jsonl")[0]["outputs"]) == 3
    # beside each data file, how it was made (call_api.py's manifest and the comparison report read it)
    made = json.loads((out / "cwe" / "validation.prepare.json").read_text())
    assert made["max_seq_length"] == length and made["tokenizer"] == "smollm2" and made["task_args"]["num_cw"] == 10
    assert made["sha256"] == hashlib.sha256((out / "cwe" / "validation.jsonl").read_bytes()).hexdigest()


def test_length_past_the_models_positions_is_refused(tmp_path):
    proc = run(PREPARE, "--task", "niah_single_1", "--save_dir", tmp_path / "out", "--max_seq_length", 9000)
    assert proc.returncode == 2
    assert error_lines(proc) == ["error: --max_seq_length 9000 is past the 8192 positions of smollm2 "
                                 "(max_position_embeddings in its config): its answers past them are not meaningful; "
                                 "use --max_seq_length 8192 or less, or pass --ignore_position_limit if the model "
                                 "is meant to run past them"]
    assert not (tmp_path / "out").exists()


def test_punkt_fallback_warns_once(prepared):
    """Offline, nltk's punkt data is missing: one warning for the five essay tasks, no crash."""
    import nltk

    try:
        nltk.tokenize.sent_tokenize("One. Two.")
        punkt = True
    except LookupError:
        punkt = False
    _, proc = prepared[1024]
    warnings = [line for line in proc.stderr.splitlines() if "punkt" in line]
    assert len(warnings) == (0 if punkt else 1), proc.stderr


def test_qa_tasks_on_small_fixtures(tmp_path, tokenizer):
    squad_questions = [qa for article in json.loads(SQUAD.read_text())["data"] for p in article["paragraphs"]
                       for qa in p["qas"] if not qa["is_impossible"]]
    hotpot = json.loads(HOTPOT.read_text())
    for length in (1024, 4096):
        out = tmp_path / str(length)
        proc = run(PREPARE, "--task", "qa_1,qa_2", "--save_dir", out, "--max_seq_length", length, "--num_samples", 5,
                   "--qa_file", f"squad={SQUAD}", "--qa_file", f"hotpotqa={HOTPOT}")
        assert proc.returncode == 0, proc.stderr
        for task, questions in (("qa_1", [(q["question"], [a["text"] for a in q["answers"]]) for q in squad_questions]),
                                ("qa_2", [(d["question"], [d["answer"]]) for d in hotpot])):
            records = read(out / task / "validation.jsonl")
            assert len(records) == 5
            for i, r in enumerate(records):
                question, answers = questions[i]  # question i of the file, as RULER takes them
                assert r["outputs"] == answers
                assert f"Question: {question}<|im_end|>" in r["input"]
                assert r["answer_prefix"] == " Answer:"
                assert "Document 1:\n" in r["input"]
                assert all(a in r["input"] for a in answers)
                tokens = len(tokenizer.encode(r["input"] + r["answer_prefix"], add_special_tokens=False))
                assert r["length"] == tokens + 32 <= length


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.jsonl"))}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    tasks = "niah_single_1,niah_single_2,niah_multikey_3,vt,cwe,fwe,qa_1"
    digests = []
    for name, seed in (("a", 42), ("b", 42), ("c", 7)):
        proc = run(PREPARE, "--task", tasks, "--save_dir", tmp_path / name, "--max_seq_length", 1024,
                   "--num_samples", 3, "--random_seed", seed, "--essay_file", ESSAY, "--qa_file", SQUAD)
        assert proc.returncode == 0, proc.stderr
        digests.append(_digest(tmp_path / name))
    assert len(digests[0]) == 7
    assert digests[0] == digests[1]
    for task_file in digests[0]:
        assert digests[0][task_file] != digests[2][task_file], task_file


def test_seed_step1_command_cycles_depths(tmp_path, tokenizer):
    """README Step 1, from the repository root, with smollm2 for the Llama hub name."""
    proc = run(NIAH_SINGLE_1, "--save_dir", tmp_path / "data", "--num_samples", 7, "--max_seq_length", 4096,
               "--tokens_to_generate", 128, "--tokenizer_path", "smollm2", "--tokenizer_type", "hf")
    assert proc.returncode == 0, proc.stderr
    records = read(tmp_path / "data" / "niah_single_1" / "validation.jsonl")
    assert [r["depth"] for r in records] == [10, 30, 50, 70, 90, 10, 30]
    for i, r in enumerate(records):
        assert list(r) == FIELDS and r["index"] == i
        tokens = len(tokenizer.encode(r["input"] + r["answer_prefix"], add_special_tokens=False))
        assert r["length"] == tokens + 128 <= 4096
        lines = r["input"].split("\n")
        needle = next(j for j, line in enumerate(lines) if line.startswith("One of the special magic"))
        haystack = [j for j, line in enumerate(lines) if line.startswith("The grass is green.")]
        before = sum(1 for j in haystack if j < needle) / len(haystack)
        assert abs(100 * before - r["depth"]) <= 1.0, (r["depth"], before)
        assert r["outputs"][0] in lines[needle]


def test_generate_niah_single_1_defaults_and_template_flag(tmp_path):
    proc = run(NIAH_SINGLE_1, "--save_dir", tmp_path, "--num_samples", 2, "--max_seq_length", 1024,
               "--model_template_type", "base")
    assert proc.returncode == 0, proc.stderr
    records = read(tmp_path / "niah_single_1" / "validation.jsonl")
    assert [r["depth"] for r in records] == [10, 30]
    assert records[0]["input"].startswith("A special magic number is hidden")
    assert all(r["length"] <= 1024 for r in records)


def test_base_template_newline_removal_and_chunks(tmp_path):
    proc = run(PREPARE, "--task", "niah_single_1,vt,cwe", "--save_dir", tmp_path, "--max_seq_length", 1024,
               "--num_samples", 5, "--chunk_idx", 1, "--chunk_amount", 2, "--model_template_type", "base",
               "--remove_newline_tab")
    assert proc.returncode == 0, proc.stderr
    for task in ("niah_single_1", "vt", "cwe"):
        records = read(tmp_path / task / "validation.jsonl")
        assert [r["index"] for r in records] == [3, 4]  # RULER's chunks of 5: 3 + 2
        for r in records:
            assert "\n" not in r["input"] and "\t" not in r["input"] and "<|im_start|>" not in r["input"]
            assert r["answer_prefix"].startswith(" ") and r["length"] <= 1024


def test_standalone_generator_takes_rulers_flags(tmp_path):
    """RULER's prepare.py runs each generator with the full template (here meta-chat's wrapping)."""
    proc = run("eval/ruler/data/synthetic/niah.py", "--save_dir", tmp_path, "--save_name", "niah_single_2",
               "--subset", "validation", "--tokenizer_path", "smollm2", "--tokenizer_type", "hf",
               "--max_seq_length", 1024, "--tokens_to_generate", 128, "--num_samples", 2, "--random_seed", 42,
               "--type_haystack", "essay", "--type_needle_k", "words", "--type_needle_v", "numbers",
               "--num_needle_k", 1, "--num_needle_v", 1, "--num_needle_q", 1, "--essay_file", ESSAY,
               "--template", "[INST] " + TASKS["niah"]["template"] + " [/INST]" + TASKS["niah"]["answer_prefix"])
    assert proc.returncode == 0, proc.stderr
    records = read(tmp_path / "niah_single_2" / "validation.jsonl")
    assert records[0]["input"].startswith("[INST] A special magic number")
    assert records[0]["input"].endswith("mentioned in the provided text? [/INST]")
    assert records[0]["answer_prefix"].startswith(" The special magic number for ")
    assert all(r["length"] <= 1024 for r in records)


# ------------------------------------------------------------------------- bad input ---------

def test_missing_essay_file_fails_that_task_only(tmp_path):
    missing = tmp_path / "nowhere" / "PaulGrahamEssays.json"
    proc = run(PREPARE, "--task", "niah_single_1,niah_single_2", "--save_dir", tmp_path / "out",
               "--max_seq_length", 1024, "--num_samples", 2, "--essay_file", missing)
    assert proc.returncode == 2
    task_errors = [line for line in error_lines(proc) if line.startswith("error: niah_single_2:")]
    assert len(task_errors) == 1
    assert str(missing) in task_errors[0] and "download_paulgraham_essay.py" in task_errors[0]
    assert len(read(tmp_path / "out" / "niah_single_1" / "validation.jsonl")) == 2
    assert not (tmp_path / "out" / "niah_single_2").exists()
    # one task alone: exactly one line
    proc = run(PREPARE, "--task", "niah_multivalue", "--save_dir", tmp_path / "out2", "--essay_file", missing)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert not (tmp_path / "out2").exists()


def test_missing_qa_file_names_the_download_script(tmp_path):
    proc = run(PREPARE, "--task", "qa_2", "--save_dir", tmp_path, "--qa_file", tmp_path / "hotpotqa.json")
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "hotpotqa.json" in lines[0] and "download_qa_dataset.sh" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_unknown_task(tmp_path):
    proc = run(PREPARE, "--task", "niah_single_9", "--save_dir", tmp_path / "out")
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "niah_single_9" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_max_seq_length_too_short_overwrites_nothing(tmp_path):
    existing = tmp_path / "niah_single_1" / "validation.jsonl"
    existing.parent.mkdir()
    existing.write_text("previous data\n")
    proc = run(PREPARE, "--task", "niah_single_1", "--save_dir", tmp_path, "--max_seq_length", 200)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "--max_seq_length 200" in lines[0] and "too short" in lines[0], lines
    assert existing.read_text() == "previous data\n"
    assert sorted(p.name for p in existing.parent.iterdir()) == ["validation.jsonl"]  # no temporary left


@pytest.mark.parametrize("script,flags,named", [
    (PREPARE, ["--num_samples", "abc"], "--num_samples"),
    (PREPARE, ["--max_seq_length", "-5"], "--max_seq_length"),
    (PREPARE, ["--num_samples", "0"], "--num_samples"),
    (PREPARE, ["--random_seed", "1.5"], "--random_seed"),
    (PREPARE, ["--chunk_idx", "3", "--chunk_amount", "2"], "--chunk_idx"),
    (PREPARE, ["--model_template_type", "no-such-template"], "--model_template_type"),
    (NIAH_SINGLE_1, ["--max_seq_length", "4k"], "--max_seq_length"),
    (NIAH_SINGLE_1, ["--num_samples", "-1"], "--num_samples"),
])
def test_bad_numbers_and_flags(tmp_path, script, flags, named):
    extra = ["--task", "niah_single_1"] if script == PREPARE else []
    proc = run(script, *extra, "--save_dir", tmp_path / "out", *flags)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], lines
    assert not (tmp_path / "out").exists()


def _fake_module(folder: Path, name: str, body: str) -> dict:
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").write_text(body)
    return {"PYTHONPATH": str(folder)}


def test_openai_tokenizer_offline_and_missing(tmp_path):
    offline = _fake_module(tmp_path / "offline", "tiktoken", (
        "class ConnectionError(Exception):\n    pass\n"
        "def get_encoding(name):\n"
        "    raise ConnectionError('Failed to resolve openaipublic.blob.core.windows.net')\n"))
    proc = run(PREPARE, "--task", "niah_single_1", "--save_dir", tmp_path / "out", "--tokenizer_type", "openai",
               env_extra=offline)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "cl100k_base" in lines[0] and "download" in lines[0], lines
    missing = _fake_module(tmp_path / "missing", "tiktoken", "raise ImportError('No module named tiktoken')\n")
    proc = run(PREPARE, "--task", "niah_single_1", "--save_dir", tmp_path / "out", "--tokenizer_type", "openai",
               env_extra=missing)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "pip install tiktoken" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_nemo_tokenizer_is_imported_only_when_asked(tmp_path):
    model = tmp_path / "tokenizer.model"
    model.write_bytes(b"not a model")
    broken = _fake_module(tmp_path / "fake", "nemo", "raise ImportError('No module named nemo')\n")
    proc = run(PREPARE, "--task", "niah_single_1", "--save_dir", tmp_path / "out", "--tokenizer_type", "nemo",
               "--tokenizer_path", model, env_extra=broken)
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "nemo" in lines[0] and "pip install" in lines[0], lines
    # the hf path never imports nemo or tiktoken (the broken fakes would raise)
    proc = run(PREPARE, "--task", "niah_single_1", "--save_dir", tmp_path / "hf", "--max_seq_length", 512,
               "--num_samples", 1, env_extra={"PYTHONPATH": f"{tmp_path / 'fake'}"})
    assert proc.returncode == 0, proc.stderr


def test_atomic_manifest_write(tmp_path):
    from eval.ruler.data import manifest_utils as manifest
    target = tmp_path / "task" / "validation.jsonl"
    manifest.write_manifest(target, [{"index": 0, "input": "x"}])
    before = target.read_bytes()

    def broken():
        yield {"index": 0}
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError):
        manifest.write_manifest(target, broken())
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["validation.jsonl"]


def test_zeta_matches_known_values():
    proc = run("-c", "import math; from eval.ruler.data.synthetic import common; "
               "print(abs(common.zeta(2.0) - math.pi ** 2 / 6), abs(common.zeta(3.0) - 1.2020569031595942), "
               "abs(common.zeta(1.5) - 2.612375348685488))")
    assert proc.returncode == 0, proc.stderr
    assert all(float(x) < 1e-12 for x in proc.stdout.split()), proc.stdout
