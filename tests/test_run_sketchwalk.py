"""The sweep driver eval/ruler/run_sketchwalk.py: its plan, --dry_run, resume/skip logic and
failure handling, with the real scripts replaced by a fake runner (no model runs)."""
from __future__ import annotations

import json
from collections import Counter
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml


from eval.ruler import run_sketchwalk as rs

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "eval" / "ruler" / "run_sketchwalk.py"
SWEEPS = REPO / "eval" / "ruler" / "sweeps"



def run_main(argv, capsys):
    try:
        code = rs.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def commands(stdout):
    """Commands of a --dry_run listing: (skipped?, argv)."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("# skip ("):
            out.append((True, shlex.split(line.split("): ", 1)[1])))
        elif line and not line.startswith("#"):
            out.append((False, shlex.split(line)))
    return out


def script_of(cmd):
    return next(Path(c).name for c in cmd if c.endswith(".py"))


# ------------------------------------------------------------------------------- fake runner
class FakeRunner:
    """Stands in for subprocess.run: does what each script would write, minimally."""

    def __init__(self, fail_on=None, rc=3, predict_only=None, prepare_lines=None):
        self.prepare_lines = prepare_lines
        self.calls = []
        self.fail_on = fail_on
        self.rc = rc
        self.predict_only = predict_only  # predict this many samples, then "die"

    def __call__(self, cmd, **kw):            # kw: stdout / stderr of a --jobs run (ignored here)
        self.calls.append(cmd)
        name = script_of(cmd)
        if self.fail_on and self.fail_on(cmd):
            return subprocess.CompletedProcess(cmd, self.rc)
        if name == "prepare.py":
            d = Path(flag(cmd, "--save_dir")) / flag(cmd, "--task")
            d.mkdir(parents=True, exist_ok=True)
            n = self.prepare_lines or int(flag(cmd, "--num_samples"))
            with open(d / f"{flag(cmd, '--subset')}.jsonl", "w") as f:
                for i in range(n):
                    f.write(json.dumps({"index": i, "input": f"haystack {flag(cmd, '--max_seq_length')} {i}",
                                        "outputs": [str(i)], "answer_prefix": " Answer:", "length": 100}) + "\n")
        elif name == "call_api.py":
            data = Path(flag(cmd, "--data_dir")) / flag(cmd, "--task") / f"{flag(cmd, '--subset')}.jsonl"
            save = Path(flag(cmd, "--save_dir"))
            save.mkdir(parents=True, exist_ok=True)
            pred = save / f"{flag(cmd, '--task')}.jsonl"
            done = len(pred.read_text().splitlines()) if pred.exists() else 0
            samples = [json.loads(l) for l in data.read_text().splitlines()][done:]
            if self.predict_only is not None:
                samples = samples[:self.predict_only]
            with open(pred, "a") as f:
                for s in samples:
                    f.write(json.dumps({"index": s["index"], "pred": s["outputs"][0],
                                        "input": s["input"] + s["answer_prefix"], "outputs": s["outputs"],
                                        "others": {"prefill_s": 0.1, "decode_s": 0.1, "method": "dense"}}) + "\n")
        elif name == "evaluate.py":
            (Path(flag(cmd, "--data_dir")) / "summary.csv").write_text("0,1\nTasks,x\n")
        return subprocess.CompletedProcess(cmd, 0)

    def kinds(self):
        return [script_of(c) for c in self.calls]


def tiny_config(tmp_path, **over):
    cfg = {
        "root_dir": str(tmp_path / "root"), "num_samples": 3, "lengths": [1024, 2048],
        "tasks": ["niah_single_1", "vt"], "call_api_args": {"temperature": 0.0, "max_new_tokens": 16},
        "methods": {"dense": {"server_type": "hf"},
                    "sw": {"server_type": "SketchWalk", "top_k_blocks": 8, "skip_decode": False}},
        "comparisons": [{"name": "comparison", "baseline": "dense"}],
    }
    cfg.update(over)
    path = tmp_path / "sweep.yaml"
    import yaml
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------ dry run
def test_dry_run_demo(tmp_path, capsys):
    code, out, err = run_main([SWEEPS / "demo.yaml", "--dry_run", "--root_dir", tmp_path / "r"], capsys)
    assert code == 0, err
    cmds = commands(out)
    assert [script_of(c) for _, c in cmds] == ["prepare.py"] + ["call_api.py"] * 3 + ["evaluate.py"] * 3 \
        + ["compare_results.py"]
    assert not any(skipped for skipped, _ in cmds)
    prep = cmds[0][1]
    assert flag(prep, "--task") == "niah_single_1" and flag(prep, "--max_seq_length") == "1024"
    assert flag(prep, "--num_samples") == "3" and flag(prep, "--save_dir") == str(tmp_path / "r/pred/_data/1024")
    dense, sw, seer = (c for _, c in cmds[1:4])
    assert flag(dense, "--server_type") == "hf" and flag(dense, "--model_name_or_path") == "smollm2"
    assert flag(sw, "--server_type") == "SketchWalk" and flag(sw, "--max_new_tokens") == "32"
    assert flag(seer, "--model_name_or_path") == "seer_attn/checkpoints/smollm2"
    assert seer.count("--model_name_or_path") == 1
    assert flag(seer, "--save_dir") == str(tmp_path / "r/pred/seerattn/1024")
    assert flag(seer, "--data_dir") == str(tmp_path / "r/pred/_data/1024")
    cmp_ = cmds[-1][1]
    assert [cmp_[i + 1] for i, a in enumerate(cmp_) if a == "--run"] == [
        f"dense={tmp_path / 'r/pred/dense'}", f"sketchwalk={tmp_path / 'r/pred/sketchwalk'}",
        f"seerattn={tmp_path / 'r/pred/seerattn'}"]
    assert flag(cmp_, "--baseline") == "dense" and flag(cmp_, "--output_dir") == str(tmp_path / "r/comparison")
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_stage_configs(tmp_path, capsys):
    code, out, err = run_main([SWEEPS / "stage1_dense.yaml", "--dry_run", "--root_dir", tmp_path / "s1"], capsys)
    assert code == 0, err
    kinds = [script_of(c) for _, c in commands(out)]
    assert kinds.count("prepare.py") == 33 and kinds.count("call_api.py") == 33
    assert kinds.count("evaluate.py") == 3 and kinds.count("compare_results.py") == 1
    assert "--essay_file" in commands(out)[0][1]

    code, out, err = run_main([SWEEPS / "stage2.yaml", "--dry_run", "--root_dir", tmp_path / "s2",
                               "--cells_from", tmp_path / "none.json"], capsys)
    assert code == 2 and "none.json not found" in err

    # a stage-1 comparison where dense passes only some cells
    tasks = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
             "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]
    good = {("niah_single_1", 8192), ("niah_single_1", 4096), ("vt", 2048)}
    cells = [{"task": t, "length": str(l), "runs": {"dense": {"score": 90.0 if (t, l) in good else 10.0}}}
             for l in (2048, 4096, 8192) for t in tasks]
    comp = tmp_path / "stage1.json"
    comp.write_text(json.dumps({"cells": cells}))
    code, out, err = run_main([SWEEPS / "stage2.yaml", "--dry_run", "--root_dir", tmp_path / "s2",
                               "--cells_from", comp], capsys)
    assert code == 0, err
    assert "judged cells" in out and "3 of 33 (fewer than 6)" in out
    cmds = [c for _, c in commands(out)]
    preps = {(flag(c, "--task"), int(flag(c, "--max_seq_length"))): int(flag(c, "--num_samples"))
             for c in cmds if script_of(c) == "prepare.py"}
    assert preps == {("vt", 2048): 50, ("niah_single_1", 4096): 50, ("niah_single_1", 8192): 100}
    preds = [c for c in cmds if script_of(c) == "call_api.py"]
    by_method = {}
    for c in preds:
        by_method.setdefault(Path(flag(c, "--save_dir")).parent.name, []).append(c)
    assert len(by_method) == 12
    assert all(len(v) == 3 for k, v in by_method.items() if k not in ("sketchwalk_skip_decode", "sketchwalk_dlb4"))
    [skip] = by_method["sketchwalk_skip_decode"]
    assert "--skip_decode" in skip and flag(skip, "--task") == "niah_single_1" and flag(skip, "--save_dir").endswith("8192")
    assert flag(by_method["sketchwalk_dlb4"][0], "--dense_last_blocks") == "4"
    assert all(flag(c, "--dense_last_blocks") == "0" for c in preds
               if "SketchWalk" in c and "sketchwalk_dlb4" not in flag(c, "--save_dir"))
    assert flag(by_method["sketchwalk_mean"][0], "--key_summary") == "mean"
    assert flag(by_method["oracle"][0], "--selector") == "oracle"
    assert all("--skip_decode" not in c for k, v in by_method.items() if k != "sketchwalk_skip_decode" for c in v)
    compares = [c for c in cmds if script_of(c) == "compare_results.py"]
    assert len(compares) == 2
    assert flag(compares[1], "--tasks") == "niah_single_1" and flag(compares[1], "--lengths") == "8192"
    assert compares[0].count("--run") == 10

    # the SeerAttn rows: the same 7 cells as the committed stage-2 run, one threshold per length
    code, out, err = run_main([SWEEPS / "stage2_seerattn.yaml", "--dry_run", "--root_dir", tmp_path / "s3"], capsys)
    assert code == 0, err
    cmds = [c for _, c in commands(out)]
    seer = [c for c in cmds if script_of(c) == "call_api.py" and "SeerAttn" in c]
    thr = {flag(c, "--save_dir").rsplit("/", 1)[1]: flag(c, "--threshold") for c in seer}
    assert len(seer) == 7 and thr == {"2048": "0.00545", "4096": "0.00697", "8192": "0.00664"}
    s2 = json.loads((Path(rs.__file__).resolve().parents[2] / "results/ruler/stage2/comparison/comparison.json")
                    .read_text())
    assert {(c["task"], int(c["length"])) for c in s2["cells"]} == \
        {(flag(c, "--task"), int(flag(c, "--max_seq_length"))) for c in cmds if script_of(c) == "prepare.py"}


def test_stage2_decode_config(tmp_path, capsys):
    """stage2_decode.yaml: stage 2's cells and data (identical prepare commands, so identical prompts),
    the decode/last-block rows of SketchWalk and the oracle, compared against dense."""
    def plan(name, root):
        code, out, err = run_main([SWEEPS / name, "--dry_run", "--root_dir", root], capsys)
        assert code == 0, err
        return [c for _, c in commands(out)]

    def prepares(cmds, root):
        return sorted(" ".join(c[1:]).replace(str(root), "ROOT") for c in cmds if script_of(c) == "prepare.py")

    s2, s2d = plan("stage2.yaml", tmp_path / "a"), plan("stage2_decode.yaml", tmp_path / "b")
    assert prepares(s2, tmp_path / "a") == prepares(s2d, tmp_path / "b") and len(prepares(s2d, tmp_path / "b")) == 7
    preds = [c for c in s2d if script_of(c) == "call_api.py"]
    flags = {}
    for c in preds:
        flags.setdefault(Path(flag(c, "--save_dir")).parent.name, set()).add(
            " ".join(c[c.index("--server_type"):]))
    assert {m: len(v) for m, v in flags.items()} == {m: 1 for m in (
        "dense", "sketchwalk", "sketchwalk_skip_decode", "sketchwalk_dlb1", "sketchwalk_dlb1_skip_decode",
        "oracle_skip_decode")}
    assert len(preds) == 6 * 7
    want = {"sketchwalk": "--dense_last_blocks 0 --decode_rerank 0",
            "sketchwalk_skip_decode": "--dense_last_blocks 0 --decode_rerank 0 --skip_decode",
            "sketchwalk_dlb1": "--dense_last_blocks 1 --decode_rerank 0",
            "sketchwalk_dlb1_skip_decode": "--dense_last_blocks 1 --decode_rerank 0 --skip_decode",
            "oracle_skip_decode": "--dense_last_blocks 0 --selector oracle --skip_decode"}
    for m, f in want.items():
        [line] = flags[m]
        assert line == f"--server_type SketchWalk {f}"
    assert all(flag(c, "--device") == "cuda" and flag(c, "--batch_size") == "1" for c in preds)
    [cmp_] = [c for c in s2d if script_of(c) == "compare_results.py"]
    assert flag(cmp_, "--baseline") == "dense" and cmp_.count("--run") == 6


def test_gemma3_configs(tmp_path, capsys):
    """gemma3_stage1/2.yaml and gemma3_e2e_32k.yaml (issue 8): Gemma-3-270M with the base template,
    64 new tokens, batch 1 on cuda; stage 2 runs the five methods on the cells stage 1 judged, with
    the same prepare arguments as stage 1 apart from the sample count (the 25 samples are the
    first 25 of the 50: prepare.py draws them in order from the same seed)."""
    def plan(args):
        code, out, err = run_main(args, capsys)
        assert code == 0, err
        return out, [c for _, c in commands(out)]

    def prep_args(c):
        args = c[c.index("--benchmark"):]
        return " ".join(a for i, a in enumerate(args) if not (i and args[i - 1] == "--num_samples"))

    _, s1 = plan([SWEEPS / "gemma3_stage1.yaml", "--dry_run", "--root_dir", tmp_path / "s1"])
    preps1 = [c for c in s1 if script_of(c) == "prepare.py"]
    preds1 = [c for c in s1 if script_of(c) == "call_api.py"]
    assert len(preps1) == 33 and len(preds1) == 33
    assert {int(flag(c, "--max_seq_length")) for c in preps1} == {8192, 16384, 32768}
    assert all(flag(c, "--tokenizer_path") == "gemma3-270m" and flag(c, "--model_template_type") == "base"
               and flag(c, "--num_samples") == "25" and flag(c, "--essay_file") for c in preps1)
    assert all(flag(c, "--model_name_or_path") == "gemma3-270m" and flag(c, "--max_new_tokens") == "64"
               and flag(c, "--batch_size") == "1" and flag(c, "--device") == "cuda"
               and flag(c, "--dtype") == "bfloat16" and flag(c, "--server_type") == "hf" for c in preds1)

    tasks = sorted({flag(c, "--task") for c in preps1})
    good = {("niah_single_1", 8192), ("niah_single_2", 16384), ("niah_single_1", 32768)}
    cells = [{"task": t, "length": str(l), "runs": {"dense": {"score": 70.0 if (t, l) in good else 20.0}}}
             for l in (8192, 16384, 32768) for t in tasks]
    comp = tmp_path / "stage1.json"
    comp.write_text(json.dumps({"cells": cells}))
    out, s2 = plan([SWEEPS / "gemma3_stage2.yaml", "--dry_run", "--root_dir", tmp_path / "s2", "--cells_from", comp])
    assert "3 of 33" in out
    preps2 = [c for c in s2 if script_of(c) == "prepare.py"]
    assert {(flag(c, "--task"), int(flag(c, "--max_seq_length"))) for c in preps2} == good
    assert all(flag(c, "--num_samples") == "50" for c in preps2)
    same = {(flag(c, "--task"), flag(c, "--max_seq_length")): prep_args(c) for c in preps1}
    assert all(prep_args(c) == same[(flag(c, "--task"), flag(c, "--max_seq_length"))] for c in preps2)
    preds2 = [c for c in s2 if script_of(c) == "call_api.py"]
    by_method = {}
    for c in preds2:
        by_method.setdefault(Path(flag(c, "--save_dir")).parent.name, []).append(c)
    assert sorted(by_method) == ["dense", "local", "oracle", "sketchwalk", "sketchwalk_mean"]
    assert all(len(v) == 3 for v in by_method.values())
    assert all(flag(c, "--max_new_tokens") == "64" and flag(c, "--batch_size") == "1" and "--skip_decode" not in c
               for c in preds2)
    assert all(flag(c, "--dense_last_blocks") == "0" for c in preds2 if "SketchWalk" in c)
    assert flag(by_method["sketchwalk_mean"][0], "--key_summary") == "mean"
    assert flag(by_method["oracle"][0], "--selector") == "oracle" and flag(by_method["local"][0], "--selector") == "local"
    [cmp2] = [c for c in s2 if script_of(c) == "compare_results.py"]
    assert flag(cmp2, "--baseline") == "dense" and cmp2.count("--run") == 5

    _, e2e = plan([SWEEPS / "gemma3_e2e_32k.yaml", "--dry_run", "--root_dir", tmp_path / "e"])
    [prep] = [c for c in e2e if script_of(c) == "prepare.py"]
    assert prep_args(prep) == same[("niah_single_1", "32768")] and flag(prep, "--num_samples") == "10"
    preds = [c for c in e2e if script_of(c) == "call_api.py"]
    assert [flag(c, "--server_type") for c in preds] == ["hf", "SketchWalk", "SketchWalk", "SketchWalk"]
    assert flag(preds[1], "--selector") == "local" and int(flag(preds[1], "--top_k_blocks")) >= 32768 // 64
    assert flag(preds[3], "--dense_last_blocks") == "1" and "--skip_decode" in preds[3]

    # the decode row: stage 2's cells, prompts and data flags, one method run on the GPU
    _, s3 = plan([SWEEPS / "gemma3_stage2_decode.yaml", "--dry_run", "--root_dir", tmp_path / "d",
                  "--cells_from", comp, "--methods", "sketchwalk_dlb1_skip_decode"])
    preds3 = [c for c in s3 if script_of(c) == "call_api.py"]
    assert len(preds3) == 3 and all("--skip_decode" in c and flag(c, "--dense_last_blocks") == "1" for c in preds3)
    assert sorted(prep_args(c) + flag(c, "--num_samples") for c in s3 if script_of(c) == "prepare.py") == \
        sorted(prep_args(c) + flag(c, "--num_samples") for c in preps2)
    assert all(flag(c, "--max_new_tokens") == "64" and flag(c, "--batch_size") == "1" for c in preds3)
    # its dense and sketchwalk rows are stage 2's own files: the two configs must define them alike
    cfg2, cfg3 = (yaml.safe_load((SWEEPS / f).read_text()) for f in ("gemma3_stage2.yaml", "gemma3_stage2_decode.yaml"))
    assert all(cfg3["methods"][m] == cfg2["methods"][m] for m in ("dense", "sketchwalk"))
    assert {k: v for k, v in cfg3.items() if k not in ("root_dir", "methods", "comparisons")} == \
        {k: v for k, v in cfg2.items() if k not in ("root_dir", "methods", "comparisons")}
    assert all(flag(c, "--max_new_tokens") == "64" and flag(c, "--batch_size") == "1" for c in preds)


# ------------------------------------------------------------------------- running, resuming
def test_run_then_resume_skips_everything(tmp_path, capsys, monkeypatch):
    cfg = tiny_config(tmp_path)
    fake = FakeRunner()
    monkeypatch.setattr(rs, "_run_command", fake)
    code, out, err = run_main([cfg], capsys)
    assert code == 0, err
    assert fake.kinds() == ["prepare.py"] * 4 + ["call_api.py"] * 8 + ["evaluate.py"] * 4 + ["compare_results.py"]
    root = tmp_path / "root"
    stamp = json.loads((root / "pred/_data/1024/niah_single_1/.prepare_stamp.json").read_text())
    assert stamp["samples"] == 3 and "--save_dir" not in stamp["args"] and "--num_samples" in stamp["args"]
    log = [json.loads(l) for l in (root / "sweep_log.jsonl").read_text().splitlines()]
    assert len(log) == 17 and all(e["rc"] == 0 for e in log)

    fake2 = FakeRunner()
    monkeypatch.setattr(rs, "_run_command", fake2)
    code, out, err = run_main([cfg], capsys)
    assert code == 0, err
    assert fake2.kinds() == ["compare_results.py"]
    assert out.count("skip ") == 16

    # dry run now lists the skipped steps as comments
    code, out, err = run_main([cfg, "--dry_run"], capsys)
    skipped = [s for s, _ in commands(out)]
    assert skipped == [True] * 16 + [False]
    assert "# skip (data up to date" in out and "# skip (all 3 samples predicted)" in out


def test_parallel_jobs_same_files_longest_first(tmp_path, capsys, monkeypatch):
    cfg = tiny_config(tmp_path)
    fake = FakeRunner()
    monkeypatch.setattr(rs, "_run_command", fake)
    code, out, err = run_main([cfg, "--jobs", "3"], capsys)
    assert code == 0, err
    kinds = fake.kinds()
    # prepare first, all predicts, then evaluate and compare (the order of the sequential run)
    assert kinds == ["prepare.py"] * 4 + ["call_api.py"] * 8 + ["evaluate.py"] * 4 + ["compare_results.py"]
    assert flag(fake.calls[4], "--save_dir").endswith("2048")      # longest cells are started first
    root = tmp_path / "root"
    for m in ("dense", "sw"):
        for length in (1024, 2048):
            for task in ("niah_single_1", "vt"):
                assert len((root / f"pred/{m}/{length}/{task}.jsonl").read_text().splitlines()) == 3
    log = [json.loads(l) for l in (root / "sweep_log.jsonl").read_text().splitlines()]
    # prepare, predict and evaluate each ran as a pool (logs per step); compare ran in the foreground
    pooled = Counter(e["step"] for e in log if e.get("jobs") == 3)
    assert pooled == {"prepare": 4, "predict": 8, "evaluate": 4}
    assert len(list((root / "pred/_logs").glob("*.log"))) == 16
    assert all((root / f"pred/_data/{l}/{t}/.prepare_stamp.json").is_file() for l in (1024, 2048) for t in ("vt", "niah_single_1"))
    # resume: nothing left to predict
    fake2 = FakeRunner()
    monkeypatch.setattr(rs, "_run_command", fake2)
    code, out, err = run_main([cfg, "--jobs", "3"], capsys)
    assert code == 0 and fake2.kinds() == ["compare_results.py"]
    code, out, err = run_main([cfg, "--jobs", "0"], capsys)
    assert code == 2 and "--jobs 0" in err


def test_gpus_without_jobs_is_a_usage_error(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    code, out, err = run_main([cfg, "--gpus", "2", "--dry_run"], capsys)
    assert code == 2 and "--gpus 2 with --jobs 1" in err and "Traceback" not in err


def test_gpu_assignment():
    # which GPUs: 1 sets nothing; N takes the first N of CUDA_VISIBLE_DEVICES, else 0..N-1
    assert rs.gpu_devices(1, {}) is None
    assert rs.gpu_devices(2, {}) == ["0", "1"]
    assert rs.gpu_devices(2, {"CUDA_VISIBLE_DEVICES": "3, 5,7"}) == ["3", "5"]
    for bad, env in ((0, {}), (3, {"CUDA_VISIBLE_DEVICES": "0,1"})):
        try:
            rs.gpu_devices(bad, env)
            raise AssertionError(f"--gpus {bad} accepted")
        except rs.UsageError as exc:
            assert f"--gpus {bad}" in str(exc)
    # job i of the first wave gets GPU i mod N; later jobs take the GPU with the fewest running jobs
    slots = rs.GpuSlots(["0", "1"])
    first = [slots.acquire() for _ in range(5)]
    assert first == [0, 1, 0, 1, 0] and slots.running == [3, 2]
    slots.release(1)
    slots.release(1)
    assert [slots.acquire() for _ in range(4)] == [1, 1, 1, 0]   # GPU 1 catches up first, then ties go to 0
    assert slots.running == [4, 3]
    # torchrun steps are recognised by their launcher, not by a script argument
    assert rs.is_distributed(["torchrun", "--standalone", "--nproc_per_node", "2", "eval/ruler/pred/call_api.py"])
    assert rs.is_distributed(["/usr/bin/python3", "-m", "torch.distributed.run", "x/call_api.py", "--a"])
    assert not rs.is_distributed(["/usr/bin/python3", "x/call_api.py", "--save_dir", "torchrun"])


class EnvRecorder(FakeRunner):
    """A FakeRunner that records the CUDA_VISIBLE_DEVICES each call_api ran with (None: inherited),
    and how many calls ran at once."""

    def __init__(self):
        import threading

        super().__init__()
        self.seen, self.active, self.max_active, self.lock = [], 0, 0, threading.Lock()

    def __call__(self, cmd, **kw):
        import time

        if script_of(cmd) == "call_api.py":
            with self.lock:
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                env = kw.get("env")
                self.seen.append((cmd, None if env is None else env.get("CUDA_VISIBLE_DEVICES")))
            time.sleep(0.05)
            with self.lock:
                self.active -= 1
        return super().__call__(cmd, **kw)


def test_parallel_jobs_over_gpus(tmp_path, capsys, monkeypatch):
    cfg = tiny_config(tmp_path, methods={
        "dense": {"server_type": "hf"},
        "sw": {"server_type": "SketchWalk", "top_k_blocks": 8},
        "dist": {"args": {"server_type": "hf"}, "launcher": ["torchrun", "--standalone", "--nproc_per_node", "2"]}})
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = EnvRecorder()
    monkeypatch.setattr(rs, "_run_command", fake)
    code, out, err = run_main([cfg, "--jobs", "4", "--gpus", "2"], capsys)
    assert code == 0, err
    python_steps = [(c, g) for c, g in fake.seen if c[0] != "torchrun"]
    torch_steps = [(c, g) for c, g in fake.seen if c[0] == "torchrun"]
    assert len(python_steps) == 8 and len(torch_steps) == 4
    # the pooled jobs see one GPU each, both GPUs used evenly (4 jobs on 2 GPUs, 8 steps of equal length)
    assert sorted(g for _, g in python_steps) == ["0"] * 4 + ["1"] * 4
    # torchrun steps see every GPU, run after the pool, one at a time
    assert all(g is None for _, g in torch_steps)
    assert [c[0] for c, _ in fake.seen][-4:] == ["torchrun"] * 4
    log = [json.loads(l) for l in (tmp_path / "root/sweep_log.jsonl").read_text().splitlines()]
    pooled = [e for e in log if e.get("jobs") == 4 and e["step"] == "predict"]
    assert len(pooled) == 8 and {e["cuda_visible_devices"] for e in pooled} == {"0", "1"}
    assert not any("cuda_visible_devices" in e for e in log if e["step"] != "predict")   # only predicts get a GPU
    assert all(e["gpus"] == 2 for e in pooled)
    assert " on GPU 0 " in out and " on GPU 1 " in out
    # --gpus 1 (the default) sets nothing; too many GPUs for CUDA_VISIBLE_DEVICES is refused up front
    fake = EnvRecorder()
    monkeypatch.setattr(rs, "_run_command", fake)
    code, out, err = run_main([cfg, "--jobs", "4", "--root_dir", tmp_path / "r1"], capsys)
    assert code == 0 and {g for _, g in fake.seen} == {None} and "on GPU" not in out
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    code, out, err = run_main([cfg, "--jobs", "4", "--gpus", "2", "--root_dir", tmp_path / "r2"], capsys)
    assert code == 2 and "CUDA_VISIBLE_DEVICES=1 names only 1 GPU" in err


def test_parallel_failure_reported_after_all_finish(tmp_path, capsys, monkeypatch):
    cfg = tiny_config(tmp_path)
    fake = FakeRunner(fail_on=lambda c: script_of(c) == "call_api.py" and "/sw/" in flag(c, "--save_dir") + "/"
                      and flag(c, "--task") == "vt")
    monkeypatch.setattr(rs, "_run_command", fake)
    code, out, err = run_main([cfg, "--jobs", "2"], capsys)
    assert code == 3 and "predict sw vt@" in err
    kinds = fake.kinds()
    assert kinds.count("call_api.py") == 8 and "evaluate.py" not in kinds   # the others ran; nothing after
    # a pooled prepare that writes the wrong number of samples stops the sweep before any predict
    fake = FakeRunner(prepare_lines=2)
    monkeypatch.setattr(rs, "_run_command", fake)
    code, out, err = run_main([cfg, "--jobs", "2", "--root_dir", tmp_path / "other"], capsys)
    assert code == 1 and "has 2 samples, expected 3" in err and set(fake.kinds()) == {"prepare.py"}
    assert len(fake.kinds()) == 4 and not list((tmp_path / "other").rglob(".prepare_stamp.json"))


def test_partial_predictions_are_resumed(tmp_path, capsys, monkeypatch):
    cfg = tiny_config(tmp_path, lengths=[1024], tasks=["vt"])
    monkeypatch.setattr(rs, "_run_command", FakeRunner(predict_only=1))
    code, out, err = run_main([cfg, "--only", "prepare", "predict"], capsys)
    assert code == 0, err
    fake = FakeRunner()
    monkeypatch.setattr(rs, "_run_command", fake)
    code, out, err = run_main([cfg, "--dry_run"], capsys)
    assert "2 of 3 samples to predict" not in out  # reasons are only shown for skips
    cmds = commands(out)
    assert [(s, script_of(c)) for s, c in cmds] == [(True, "prepare.py"), (False, "call_api.py"), (False, "call_api.py"),
                                                      (False, "evaluate.py"), (False, "evaluate.py"),
                                                      (False, "compare_results.py")]
    code, out, err = run_main([cfg], capsys)
    assert code == 0 and fake.kinds() == ["call_api.py", "call_api.py", "evaluate.py", "evaluate.py",
                                          "compare_results.py"]
    pred = tmp_path / "root/pred/sw/1024/vt.jsonl"
    assert len(pred.read_text().splitlines()) == 3


def test_changed_data_args_with_predictions_is_an_error(tmp_path, capsys, monkeypatch):
    cfg = tiny_config(tmp_path, lengths=[1024], tasks=["vt"])
    monkeypatch.setattr(rs, "_run_command", FakeRunner())
    assert run_main([cfg], capsys)[0] == 0
    code, out, err = run_main([cfg, "--num_samples", "5", "--dry_run"], capsys)
    assert code == 2
    assert "vt@1024: data would be regenerated (prepare arguments changed)" in err and "vt.jsonl" in err
    # without predictions, the data is simply prepared again (the old file removed first)
    for m in ("dense", "sw"):
        for f in (tmp_path / "root/pred" / m / "1024").iterdir():
            f.unlink()
    fake = FakeRunner()
    monkeypatch.setattr(rs, "_run_command", fake)
    code, out, err = run_main([cfg, "--num_samples", "5"], capsys)
    assert code == 0, err
    assert fake.kinds()[0] == "prepare.py"
    data = tmp_path / "root/pred/_data/1024/vt/validation.jsonl"
    assert len(data.read_text().splitlines()) == 5
    # an edited data file is noticed through its sha256
    with open(data, "a") as f:
        f.write(json.dumps({"index": 9, "input": "x", "outputs": ["y"]}) + "\n")
    code, out, err = run_main([cfg, "--num_samples", "5", "--dry_run"], capsys)
    assert code == 2 and "data file changed since it was prepared" in err


def test_method_read_from_run_sh_results(tmp_path, capsys, monkeypatch):
    """A method given as `predictions: {ROOT}/{MODEL}/{BENCHMARK}` (what eval/ruler/run.sh wrote) is compared, never
    predicted or evaluated; a cell its folder lacks is an error before any step runs."""
    ruler = tmp_path / "benchmark_root" / "smollm2"
    for task in ("niah_single_1", "vt"):
        pred = ruler / "synthetic" / "1024" / "pred" / f"{task}.jsonl"
        pred.parent.mkdir(parents=True, exist_ok=True)
        pred.write_text("{}\n")
    cfg = tiny_config(tmp_path, lengths=[1024], methods={"dense": {"predictions": str(ruler)},
                                                         "sw": {"server_type": "SketchWalk"}})
    code, out, err = run_main([cfg, "--dry_run"], capsys)
    assert code == 0, err
    cmds = [c for _, c in commands(out)]
    assert [script_of(c) for c in cmds] == ["prepare.py", "prepare.py", "call_api.py", "call_api.py", "evaluate.py",
                                            "compare_results.py"]
    assert all(flag(c, "--server_type") == "SketchWalk" for c in cmds if script_of(c) == "call_api.py")
    runs = [cmds[-1][i + 1] for i, a in enumerate(cmds[-1]) if a == "--run"]
    assert runs == [f"dense={ruler / 'synthetic'}", f"sw={tmp_path / 'root/pred/sw'}"]
    assert f"# method dense: predictions read from {ruler}" in out
    code, out, err = run_main([cfg, "--dry_run", "--lengths", "2048"], capsys)
    assert code == 2 and f"method dense: {ruler / 'synthetic' / '2048' / 'pred'} holds no niah_single_1.jsonl" in err


def test_stops_at_first_failure(tmp_path, capsys, monkeypatch):
    cfg = tiny_config(tmp_path, lengths=[1024], tasks=["vt"])
    fake = FakeRunner(fail_on=lambda c: script_of(c) == "call_api.py" and "SketchWalk" in c, rc=3)
    monkeypatch.setattr(rs, "_run_command", fake)
    code, out, err = run_main([cfg], capsys)
    assert code == 3
    assert fake.kinds() == ["prepare.py", "call_api.py", "call_api.py"]
    assert err.startswith("error: predict sw vt@1024 failed (exit 3): ")
    assert "--server_type SketchWalk --top_k_blocks 8" in err
    log = [json.loads(l) for l in (tmp_path / "root/sweep_log.jsonl").read_text().splitlines()]
    assert log[-1]["rc"] == 3 and log[-1]["label"] == "predict sw vt@1024"
    # a prepare that writes the wrong number of samples is a failure too, and leaves no stamp
    fake = FakeRunner(prepare_lines=2)
    monkeypatch.setattr(rs, "_run_command", fake)
    code, out, err = run_main([cfg, "--root_dir", tmp_path / "other"], capsys)
    assert code == 1 and "has 2 samples, expected 3" in err and fake.kinds() == ["prepare.py"]
    assert not (tmp_path / "other/pred/_data/1024/vt/.prepare_stamp.json").exists()


def test_flags_without_config(tmp_path, capsys):
    code, out, err = run_main(["--root_dir", tmp_path, "--lengths", "4096", "--tasks", "vt", "cwe",
                               "--method", "dense=--server_type hf --batch_size 4",
                               "--method", "sw8=--server_type SketchWalk --top_k_blocks 8", "--dry_run"], capsys)
    assert code == 0, err
    cmds = [c for _, c in commands(out)]
    assert [script_of(c) for c in cmds].count("call_api.py") == 4
    assert flag(cmds[2], "--batch_size") == "4" and flag(cmds[4], "--top_k_blocks") == "8"
    i = cmds[-1].index("--tasks")
    assert set(cmds[-1][i + 1:i + 3]) == {"vt", "cwe"}

    code, out, err = run_main(["--root_dir", tmp_path, "--dry_run"], capsys)
    assert code == 2 and "no methods" in err


def test_method_subset_and_config_errors(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    code, out, err = run_main([cfg, "--methods", "sw", "--dry_run"], capsys)
    assert code == 0, err
    cmds = [c for _, c in commands(out)]
    assert all("dense" not in flag(c, "--save_dir") for c in cmds if script_of(c) == "call_api.py")
    assert "--baseline" not in cmds[-1]
    code, out, err = run_main([cfg, "--methods", "nope", "--dry_run"], capsys)
    assert code == 2 and "--methods: nope not in the config" in err
    bad = tiny_config(tmp_path, lenghts=[1])
    code, out, err = run_main([bad, "--dry_run"], capsys)
    assert code == 2 and "unknown key(s) lenghts" in err
    bad = tiny_config(tmp_path, methods={"_x": {"server_type": "hf"}})
    assert "must be letters" in run_main([bad, "--dry_run"], capsys)[2]
    bad = tiny_config(tmp_path, methods={"a": {"server_type": "hf", "save_dir": "x"}})
    assert "sets --save_dir" in run_main([bad, "--dry_run"], capsys)[2]
    bad = tiny_config(tmp_path, methods={"dense": {"server_type": "hf"},
                                         "x": {"args": {"server_type": "hf"}, "tasks": ["vt"]}},
                      comparisons=[{"name": "c", "methods": ["dense", "x"]}])
    code, out, err = run_main([bad, "--dry_run"], capsys)
    assert code == 2 and "method x does not run niah_single_1@1024" in err


def test_shell_wrapper(tmp_path):
    env = dict(os.environ, PY=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "eval/ruler/run_sketchwalk.sh"), str(SWEEPS / "demo.yaml"),
                           "--dry_run", "--root_dir", str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "eval/ruler/pred/compare_results.py" in proc.stdout


def test_device_scripts(tmp_path):
    """The GPU-machine scripts parse, and the shared setup places each model's GGUF where the loader
    looks for it (the conversion itself needs the real file: it fails here, as it should)."""
    for name in ("device_run.sh", "device_setup.sh", "two_gpu_run.sh"):
        proc = subprocess.run(["bash", "-n", str(REPO / "eval/ruler" / name)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    setup = REPO / "eval/ruler/device_setup.sh"
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF not really")
    out = tmp_path / "out"
    out.mkdir()

    def source(**env):
        return subprocess.run(["bash", "-c", f"source {setup}; echo rc=$?"], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120,
                              env=dict(os.environ, OUT=str(out), MODEL_GGUF=str(fake), **env))

    proc = source(MODEL="llama")
    assert "rc=2" in proc.stdout and "MODEL=llama: choose smollm2 or gemma3-270m" in proc.stderr
    proc = source(MODEL="gemma3-270m", SKETCH_WALK_CACHE=str(tmp_path / "cache"))
    assert (tmp_path / "cache/gguf/gemma-3-270m-q4_k_m.gguf").read_bytes() == fake.read_bytes()
    assert "rc=1" in proc.stdout and "could not be converted" in proc.stderr
    assert not (tmp_path / "cache/tokenizers").exists()

    # a carried Gemma-3 tokenizer (xz-compressed, as a device call carries it) lands where model_loader looks
    import lzma

    from eval.ruler.model_loader import EMBEDDED_MODELS
    carried = tmp_path / "tok"
    carried.mkdir()
    (carried / "tokenizer.json.xz").write_bytes(lzma.compress(b'{"model": "a tokenizer"}'))
    (carried / "tokenizer_config.json").write_text("{}")
    proc = source(MODEL="gemma3-270m", SKETCH_WALK_CACHE=str(tmp_path / "cache2"), TOKENIZER_DIR=str(carried),
                  PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    placed = tmp_path / "cache2/tokenizers" / EMBEDDED_MODELS["gemma3-270m"].sha256[:24]
    assert (placed / "tokenizer.json").read_bytes() == b'{"model": "a tokenizer"}', proc.stderr
    assert (placed / "tokenizer_config.json").read_text() == "{}"


def test_device_run_returns_when_the_sweep_ends(tmp_path):
    """device_run.sh with a stub setup and driver: the flags reach the driver, and the call ends as soon
    as its work does (the budget's killer, sleeping until SECONDS - RESERVE, is stopped with its sleep
    and holds no copy of stdout, so whoever reads the output is not kept waiting)."""
    import time

    (tmp_path / "eval/ruler").mkdir(parents=True)
    (tmp_path / "eval/ruler/device_run.sh").write_text((REPO / "eval/ruler/device_run.sh").read_text())
    (tmp_path / "eval/ruler/device_setup.sh").write_text("true\n")
    (tmp_path / "eval/ruler/run_sketchwalk.py").write_text(
        "import sys\nprint('driver', *sys.argv[1:])\n")
    out = tmp_path / "out"
    out.mkdir()
    sweep = f"swtest_{os.getpid()}_{time.time_ns()}.yaml"       # its root under /tmp/gpu_run does not exist
    t0 = time.time()
    proc = subprocess.run(["bash", "eval/ruler/device_run.sh", "40", sweep], cwd=tmp_path, capture_output=True,
                          text=True, timeout=35, env=dict(os.environ, OUT=str(out), JOBS="3", GPUS="2", RESERVE="0"))
    assert time.time() - t0 < 25, proc.stderr
    log = (out / "run.log").read_text()
    assert f"driver {sweep} --root_dir /tmp/gpu_run/{sweep[:-5]} --jobs 3 --gpus 2 --only prepare predict" in log
    assert "--jobs 3 --only evaluate compare" in log
    assert "predict exit 0" in (out / "device.log").read_text()

    # GPUs counted from CUDA_VISIBLE_DEVICES when set, and never more than the jobs that use them
    for env, want in (({"CUDA_VISIBLE_DEVICES": "2,3", "JOBS": "4"}, "--jobs 4 --gpus 2"),
                      ({"GPUS": "2", "JOBS": "1"}, "--jobs 1 --gpus 1")):
        (out / "run.log").unlink()
        base = {k: v for k, v in os.environ.items() if k not in ("GPUS", "CUDA_VISIBLE_DEVICES")}
        proc = subprocess.run(["bash", "eval/ruler/device_run.sh", "40", sweep], cwd=tmp_path, capture_output=True,
                              text=True, timeout=35, env=dict(base, OUT=str(out), RESERVE="0", **env))
        assert f"{want} --only prepare predict" in (out / "run.log").read_text(), (env, proc.stderr)


def test_two_gpu_run_keeps_data_per_model(tmp_path):
    """two_gpu_run.sh with stub setup and scripts: the data folder it keeps between calls is named by the
    model too (another model's tokenizer and template make other prompts), and two_gpu.json is written."""
    for rel, text in (("eval/ruler/device_setup.sh", "MODEL=${MODEL:-smollm2}\n"),
                      ("eval/ruler/data/prepare.py", "import sys\n"),
                      ("eval/ruler/pred/call_api.py", "import sys\n"),
                      ("eval/ruler/eval/evaluate.py", "import sys\n")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "eval/ruler/two_gpu_run.sh").write_text((REPO / "eval/ruler/two_gpu_run.sh").read_text())
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(["bash", "eval/ruler/two_gpu_run.sh"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OUT=str(out), WORK=str(tmp_path / "w"), MODEL="gemma3-270m",
                                                DEVICE="cpu", N="4", LENGTH="1024", LIMIT1="30", LIMIT2="30"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "two_gpu.json").read_text())
    assert f"--save_dir {tmp_path / 'w'}/data_gemma3-270m_1024_4 " in summary["commands"]["prepare"]
    assert summary["model"] == "gemma3-270m"
