"""Paired 95% interval on a run's RULER score minus the baseline's, as the mean over cells (RULER's average).

compare_results.py gives paired intervals per cell; the goal "within 2 points of dense on the mean over the judged
cells" needs one for the mean. From a comparison's compact per-sample records (samples.jsonl.gz: run, task, length,
index, input_sha256, score_all): within every cell, the samples both runs scored (matched by index and prompt hash)
are resampled with replacement (10,000 times, fixed seed), and each resample's mean over cells of the per-cell mean
difference gives the percentile interval.

Usage: python eval/ruler/mean_difference.py results/ruler/selection_fresh/comparison/samples.jsonl.gz [MORE.jsonl.gz]
           [--baseline dense] [--runs default seed] [--resamples 10000] [--seed 0]
Several files (runs made on the same prompts, e.g. stage 2's rows beside a later sweep's) pool their runs; a run name
already taken by an earlier file gets the suffix @2, @3 ... by file position.
Prints one line per run: mean difference [95% interval], cells, paired samples.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
from collections import defaultdict
from typing import Dict, List, Tuple


def scores_by_run(records) -> Dict[str, Dict[Tuple[str, str], Dict[Tuple[int, str], float]]]:
    """{run: {(task, length): {(index, sha256): score_all}}} of a comparison's per-sample records."""
    out: Dict = defaultdict(lambda: defaultdict(dict))
    for r in records:
        out[r["run"]][(r["task"], str(r["length"]))][(r["index"], r.get("input_sha256"))] = float(r["score_all"])
    return out


def load(path: str) -> Dict[str, Dict[Tuple[str, str], Dict[Tuple[int, str], float]]]:
    """:func:`scores_by_run` of a samples.jsonl.gz."""
    with gzip.open(path, "rt") as f:
        return scores_by_run(json.loads(line) for line in f)


def paired_mean_difference(base, run, resamples: int = 10000, seed: int = 0):
    """(mean over cells of the paired difference, (low, high) percentile interval, cells, samples)."""
    cells: List[List[float]] = []
    for cell, scores in base.items():
        other = run.get(cell, {})
        diffs = [other[k] - v for k, v in scores.items() if k in other]
        if diffs:
            cells.append(diffs)
    if not cells:
        raise SystemExit("no cell has samples in both runs")
    point = sum(sum(c) / len(c) for c in cells) / len(cells)
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        stats.append(sum(sum(rng.choices(c, k=len(c))) / len(c) for c in cells) / len(cells))
    stats.sort()
    lo, hi = stats[int(0.025 * resamples)], stats[int(0.975 * resamples) - 1]
    return point, (lo, hi), len(cells), sum(len(c) for c in cells)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("samples", nargs="+", help="comparisons' samples.jsonl.gz")
    ap.add_argument("--baseline", default="dense")
    ap.add_argument("--runs", nargs="+", help="runs to compare (default: every other run)")
    ap.add_argument("--resamples", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    data: Dict = {}
    for path in args.samples:
        if not os.path.isfile(path):
            print(f"error: {path}: no such samples file (compare_results.py writes <output_dir>/samples.jsonl.gz)",
                  file=sys.stderr)
            return 2
    for pos, path in enumerate(args.samples, start=1):
        for run, cells in load(path).items():
            data[run if run not in data else f"{run}@{pos}"] = cells
    if args.baseline not in data:
        print(f"error: --baseline {args.baseline!r} is not a run of {args.samples} (runs: {', '.join(data)})",
              file=sys.stderr)
        return 2
    for name in args.runs or [r for r in data if r != args.baseline]:
        if name not in data:
            print(f"error: --runs {name!r} is not a run of {args.samples} (runs: {', '.join(data)})", file=sys.stderr)
            return 2
        point, (lo, hi), n_cells, n = paired_mean_difference(data[args.baseline], data[name], args.resamples,
                                                             args.seed)
        print(f"{name:24s} {100 * point:+6.1f} [{100 * lo:+6.1f}, {100 * hi:+6.1f}]  vs {args.baseline}, "
              f"{n_cells} cells, {n} paired samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
