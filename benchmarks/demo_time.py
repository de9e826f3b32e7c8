"""Wall time of `make demo`'s job once installed: eval/ruler/demo.sh with the Makefile's defaults, step by step.

Runs ``bash eval/ruler/demo.sh`` (what `make demo` runs after its install step) into a fresh folder with
DEMO_SAMPLES / DEMO_LENGTH as the Makefile sets them (5 prompts of 4,096 tokens), bash's trace stamped with
the time, so every step of the script (the data generator, the three prediction runs, the two evaluations,
the comparison) gets its seconds; then reads the comparison's per-sample prefill / decode seconds, densities
and scores. ``--backend reference`` sets SKETCH_WALK_ATTN_BACKEND=reference for the whole job: the sparse
methods then run on the float references, the CPU attention before sketch_walk/core/kernels/block_sparse_cpu.py
(the before of docs/PERFORMANCE.md's CPU section, measured in today's tree).

Usage: python benchmarks/demo_time.py [--backend auto|reference] [--samples 5] [--length 4096] [--label L] [--out PATH]
Writes benchmarks/results/demo_time_<cpu>.json (or --out); the job's own output goes to <out>.log.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from cpu_speed import REPO, cpu_name                # siblings: benchmarks/ is the script's folder
from results_io import header, results_path, write_json


def steps_from_trace(lines, t_end: float):
    """bash -x lines stamped '+ <epoch seconds> <command>' ('++ ...' in a sourced script) -> [{step, seconds until the
    next stamped line}]."""
    stamped = []
    for line in lines:
        if line.startswith("+") and line.lstrip("+").startswith(" ") and line.count(" ") >= 2:
            _, stamp, cmd = line.rstrip("\n").split(" ", 2)
            try:
                stamped.append((float(stamp), cmd))
            except ValueError:
                continue
    out = []
    for (t0, cmd), nxt in zip(stamped, stamped[1:] + [(t_end, "")]):
        if cmd.startswith(("for run", "set +x")):
            continue
        out.append({"step": cmd[:160], "seconds": round(nxt[0] - t0, 2)})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="auto", choices=["auto", "reference"])
    ap.add_argument("--samples", type=int, default=5, help="DEMO_SAMPLES (the Makefile's default: 5)")
    ap.add_argument("--length", type=int, default=4096, help="DEMO_LENGTH (the Makefile's default: 4096)")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    path = results_path("demo_time", cpu_name(), args.out)
    demo_dir = tempfile.mkdtemp(prefix="demo_time_")
    env = dict(os.environ, DEMO_DIR=demo_dir, DEMO_SAMPLES=str(args.samples), DEMO_LENGTH=str(args.length),
               PY=sys.executable)
    if args.backend == "reference":
        env["SKETCH_WALK_ATTN_BACKEND"] = "reference"
    res = header(cpu=cpu_name(), cpu_count=os.cpu_count(), label=args.label, backend=args.backend,
                 demo_samples=args.samples, demo_length=args.length, demo_dir=demo_dir,
                 load_before=os.getloadavg())
    log_path = os.path.splitext(path)[0] + ".log"
    t0 = time.time()
    with open(log_path, "w") as log:
        # PS4 set inside the shell (bash running as root ignores one from the environment); the script is sourced
        # so that its `set -x` trace carries the stamp
        script = os.path.join(REPO, "eval/ruler/demo.sh")
        rc = subprocess.run(["bash", "-c", """PS4='+ $(date +%s.%N) '; . "$0" """, script], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT).returncode
    t1 = time.time()
    with open(log_path, errors="replace") as f:
        lines = f.read().replace("\r", "\n").splitlines()
    res.update(returncode=rc, seconds=round(t1 - t0, 2), load_after=os.getloadavg(),
               steps=steps_from_trace(lines, t1))
    try:
        with open(os.path.join(demo_dir, "comparison", "comparison.json")) as f:
            res["comparison_summary"] = json.load(f)["summary"]
    except (OSError, KeyError, ValueError) as exc:
        res["comparison_summary"] = f"unreadable: {exc}"
    write_json(res, path)
    print(f"demo job: {res['seconds']:.1f} s (rc {rc}), load {res['load_before']} -> {res['load_after']}")
    for s in res["steps"]:
        print(f"  {s['seconds']:8.1f} s  {s['step'][:110]}")
    if isinstance(res["comparison_summary"], dict):
        for run, row in res["comparison_summary"].items():
            print(f"  {run:11s} prefill {row['prefill_s_mean']:.2f} s, decode {row['decode_s_mean']:.2f} s per sample, "
                  f"density {row['density_prefill_mean']:.3f}, score {row['score_mean']:.1f}")
    print("wrote", path)


if __name__ == "__main__":
    main()
