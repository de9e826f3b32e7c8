#!/usr/bin/env python
"""Print the README's RULER evidence tables from the committed comparison files (no model runs).

    python results/ruler/make_tables.py

Reads results/ruler/stage1/comparison/comparison.json (dense, 11 tasks x 3 lengths),
results/ruler/stage2/comparison*/comparison.json (the selectors on the judged cells) and
results/ruler/stage2_seerattn/comparison_<length>/comparison.json (SeerAttn at a threshold per length,
whose samples are the same as stage 2's: checked here by (task, length, index, sha256 of input)).
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
LABELS = {
    "dense": "dense",
    "sketchwalk": "SketchWalk, default (minmax, walk 0.25, top_k 16)",
    "sketchwalk_onehop": "SketchWalk, one hop (walk_damping 0)",
    "sketchwalk_mean": "SketchWalk, the paper's mean sketch",
    "sketchwalk_mean_onehop": "SketchWalk, mean sketch, one hop",
    "sketchwalk_top8": "SketchWalk, top_k_blocks 8",
    "sketchwalk_top32": "SketchWalk, top_k_blocks 32",
    "seerattn": "SeerAttn, threshold for SketchWalk's density",
    "oracle": "oracle (exact block mass, same budget)",
    "local": "local (sink + recent blocks, same budget)",
}


def load(path):
    with open(os.path.join(HERE, path)) as fh:
        return json.load(fh)


def sample_keys(path, run):
    keys = {}
    with open(os.path.join(HERE, path)) as fh:
        for line in fh:
            r = json.loads(line)
            if r["run"] == run:
                keys[(r["task"], str(r["length"]), r["index"])] = r["input_sha256"]
    return keys


def main():
    s1 = load("stage1/comparison/comparison.json")
    lengths = sorted({int(c["length"]) for c in s1["cells"]})
    tasks = []
    for c in s1["cells"]:
        if c["task"] not in tasks:
            tasks.append(c["task"])
    score = {(c["task"], int(c["length"])): c["runs"]["dense"]["score"] for c in s1["cells"]}
    print("Stage 1, dense RULER score (n = 25 per cell; judged = at least 50, in bold)\n")
    print("| task | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |")
    print("| --- |" + " --- |" * len(lengths))
    for t in tasks:
        cells = [score[(t, n)] for n in lengths]
        print(f"| {t} | " + " | ".join(f"**{v:.0f}**" if v >= 50 else f"{v:.0f}" for v in cells) + " |")

    s2 = load("stage2/comparison/comparison.json")
    cells = {(c["task"], int(c["length"])): c["runs"] for c in s2["cells"]}
    seer_keys, base_keys = {}, sample_keys("stage2/comparison/samples.jsonl", "dense")
    for n in lengths:
        path = f"stage2_seerattn/comparison_{n}/comparison.json"
        if not os.path.isfile(os.path.join(HERE, path)):
            continue
        for c in load(path)["cells"]:
            cells[(c["task"], int(c["length"]))]["seerattn"] = c["runs"]["seerattn"]
        seer_keys.update(sample_keys(f"stage2_seerattn/comparison_{n}/samples.jsonl", "seerattn"))
    same = sum(1 for k, v in seer_keys.items() if base_keys.get(k) == v)
    print(f"\n(SeerAttn samples identical to stage 2's: {same} of {len(seer_keys)})\n")

    order = ["dense", "sketchwalk", "sketchwalk_onehop", "sketchwalk_mean", "sketchwalk_mean_onehop",
             "sketchwalk_top8", "sketchwalk_top32", "seerattn", "oracle", "local"]
    print("Stage 2, mean over the judged cells\n")
    print("| method | RULER score (mean of cells) | Δ vs dense | prefill density | s / sample |")
    print("| --- | --- | --- | --- | --- |")
    for m in order:
        rows = [r[m] for r in cells.values() if m in r]
        if len(rows) != len(cells):
            continue
        mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
        dense = sum(r["dense"]["score"] for r in cells.values()) / len(cells)
        note = " (H200)" if m == "seerattn" else ""
        print(f"| {LABELS[m]} | {mean('score'):.1f} | {mean('score') - dense:+.1f} | "
              f"{mean('density_prefill'):.3f} | {mean('total_s'):.2f}{note} |")

    print("\nStage 2, per cell: accuracy [95% interval], prefill density\n")
    show = ["dense", "sketchwalk", "sketchwalk_mean", "seerattn", "oracle", "local"]
    print("| cell (n) | " + " | ".join(show) + " |")
    print("| --- |" + " --- |" * len(show))
    for (t, n), runs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        parts = []
        for m in show:
            r = runs.get(m)
            if r is None:
                parts.append("-")
                continue
            lo, hi = r["acc_all_ci"]
            parts.append(f"{r['score']:.0f} [{lo:.0f}, {hi:.0f}] / {r['density_prefill']:.2f}")
        print(f"| {t} @ {n // 1024}K ({runs['dense']['n']}) | " + " | ".join(parts) + " |")

    rows = load("stage2/comparison_dense_rows/comparison.json")["cells"][0]["runs"]
    print("\nniah_single_1 @ 8K (n = 100), reported apart\n")
    print("| method | accuracy [95%] | prefill density | decode density | s / sample |")
    print("| --- | --- | --- | --- | --- |")
    for m, r in rows.items():
        lo, hi = r["acc_all_ci"]
        print(f"| {m} | {r['score']:.0f} [{lo:.0f}, {hi:.0f}] | {r['density_prefill']:.3f} | "
              f"{r['density_decode']:.3f} | {r['total_s']:.2f} |")


if __name__ == "__main__":
    main()
