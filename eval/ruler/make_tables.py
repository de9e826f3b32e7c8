#!/usr/bin/env python
"""Print the RULER evidence tables (docs/EVIDENCE.md) from the committed comparison files (no model runs).

    python eval/ruler/make_tables.py                              # SmolLM2 (results/ruler)
    python eval/ruler/make_tables.py --root results/ruler_gemma3  # Gemma-3-270M

Reads {root}/stage1/comparison/comparison.json (dense, 11 tasks x 3 lengths),
{root}/stage2/comparison*/comparison.json (the selectors on the judged cells) and, where they exist,
{root}/stage2_seerattn/comparison_<length>/comparison.json (SeerAttn at a threshold per length,
whose samples are the same as stage 2's: checked here by (task, length, index, sha256 of input)),
{root}/stage2/comparison_dense_rows/comparison.json (rows reported apart),
{root}/stage2_decode/comparison/comparison.json (dense decode / dense last query block on the essay cells),
{root}/two_gpu/two_gpu.json (one GPU vs torchrun on two),
{root}/e2e_32k/comparison/comparison.json (end-to-end seconds per sample of one process alone) and
{root}/selection_{evidence,fresh,curves}/comparison/comparison.json (issue 18's rows: each cell's accuracy with its
interval and both densities, and the mean over cells minus dense with its paired interval, eval/ruler/mean_difference.py;
rows run without a same-run dense (Gemma-3) are read beside {root}/stage2_decode's, with the score per needle depth).
Models whose layers differ (Gemma-3) also get the prefill density per layer type.
"""
import gzip
import json
import os
from statistics import median

from eval.ruler.cli import OneLineParser

DEFAULT_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "results", "ruler")
ROOT = DEFAULT_ROOT
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
    "kernels_full_budget": "every block kept, through our kernels",
    "sketchwalk_dlb1_skip_decode": "SketchWalk, --dense_last_blocks 1 --skip_decode",
}


def path_of(path):
    return os.path.join(ROOT, path)


def exists(path):
    return os.path.isfile(path_of(path))


def samples_path(folder):
    """``folder``/samples.jsonl.gz, or the plain samples.jsonl of results written before it was compressed."""
    gz = f"{folder}/samples.jsonl.gz"
    return gz if exists(gz) or not exists(f"{folder}/samples.jsonl") else f"{folder}/samples.jsonl"


def load(path):
    with open(path_of(path)) as fh:
        return json.load(fh)


def sample_records(path):
    """The records of a comparison's samples.jsonl.gz (or of an older, plain samples.jsonl)."""
    full = path_of(path)
    opener = gzip.open if full.endswith(".gz") else open
    with opener(full, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def sample_keys(path, run):
    return {(r["task"], str(r["length"]), r["index"]): r["input_sha256"]
            for r in sample_records(path) if r["run"] == run}


def fmt_len(n):
    return f"{n // 1024}K"


def stage1_table():
    s1 = load("stage1/comparison/comparison.json")
    lengths = sorted({int(c["length"]) for c in s1["cells"]})
    tasks = []
    for c in s1["cells"]:
        if c["task"] not in tasks:
            tasks.append(c["task"])
    score = {(c["task"], int(c["length"])): c["runs"]["dense"]["score"] for c in s1["cells"]}
    ns = sorted({c["runs"]["dense"]["n"] for c in s1["cells"]})
    n = f"n = {ns[0]} per cell" if len(ns) == 1 else f"n = {ns[0]}-{ns[-1]} per cell"
    print(f"Stage 1, dense RULER score ({n}; judged = at least 50, in bold)\n")
    print("| task | " + " | ".join(fmt_len(n) for n in lengths) + " |")
    print("| --- |" + " --- |" * len(lengths))
    for t in tasks:
        cells = [score[(t, n)] for n in lengths]
        print(f"| {t} | " + " | ".join(f"**{v:.0f}**" if v >= 50 else f"{v:.0f}" for v in cells) + " |")
    return lengths


def stage2_cells(lengths):
    s2 = load("stage2/comparison/comparison.json")
    cells = {(c["task"], int(c["length"])): c["runs"] for c in s2["cells"]}
    seer_keys, base_keys = {}, sample_keys(samples_path("stage2/comparison"), "dense")
    for n in lengths:
        path = f"stage2_seerattn/comparison_{n}/comparison.json"
        if not exists(path):
            continue
        for c in load(path)["cells"]:
            cells[(c["task"], int(c["length"]))]["seerattn"] = c["runs"]["seerattn"]
        seer_keys.update(sample_keys(samples_path(f"stage2_seerattn/comparison_{n}"), "seerattn"))
    if seer_keys:
        same = sum(1 for k, v in seer_keys.items() if base_keys.get(k) == v)
        print(f"\n(SeerAttn samples identical to stage 2's: {same} of {len(seer_keys)})")
    return cells


def stage2_tables(cells):
    order = ["dense", "sketchwalk", "sketchwalk_onehop", "sketchwalk_mean", "sketchwalk_mean_onehop",
             "sketchwalk_top8", "sketchwalk_top32", "seerattn", "oracle", "local"]
    print("\nStage 2, mean over the judged cells\n")
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
    show = [m for m in ["dense", "sketchwalk", "sketchwalk_mean", "seerattn", "oracle", "local"]
            if any(m in r for r in cells.values())]
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
        print(f"| {t} @ {fmt_len(n)} ({runs['dense']['n']}) | " + " | ".join(parts) + " |")


def layer_type_table(cells):
    """Prefill density per layer type (sparse: the layers that select blocks; sliding: their own
    window; dense: layers kept dense), mean over the judged cells of each length."""
    rows = {}
    for (t, n), runs in cells.items():
        for m, r in runs.items():
            by = r.get("density_by_layer_type")
            if by:
                rows.setdefault((m, n), []).append(by)
    if not rows:
        return
    kinds = [k for k in ("sparse", "sliding", "dense") if any(k in b for v in rows.values() for b in v)]
    layers = {}
    for v in rows.values():
        for b in v:
            for k in kinds:
                if k in b and k not in layers:
                    layers[k] = b[k].get("layers")
    print("\nStage 2, prefill density per layer type (mean over the judged cells of each length; "
          + "; ".join(f"{k}: layers {', '.join(map(str, layers[k]))}" for k in kinds) + ")\n")
    print("| method | length (cells) | " + " | ".join(kinds) + " | all layers |")
    print("| --- | --- |" + " --- |" * (len(kinds) + 1))
    for (m, n), v in sorted(rows.items(), key=lambda kv: (list(LABELS).index(kv[0][0])
                                                          if kv[0][0] in LABELS else 99, kv[0][1])):
        vals = [sum(b[k]["prefill"] for b in v) / len(v) if all(k in b for b in v) else None for k in kinds]
        overall = [cells[c][m]["density_prefill"] for c in cells if c[1] == n and m in cells[c]]
        print(f"| {m} | {fmt_len(n)} ({len(v)}) | " + " | ".join("-" if x is None else f"{x:.3f}" for x in vals)
              + f" | {sum(overall) / len(overall):.3f} |")


def dense_rows_table():
    path = "stage2/comparison_dense_rows/comparison.json"
    if not exists(path):
        return
    cell = load(path)["cells"][0]
    rows = cell["runs"]
    n = rows[next(iter(rows))]["n"]
    print(f"\n{cell['task']} @ {fmt_len(int(cell['length']))} (n = {n}), reported apart\n")
    print("| method | accuracy [95%] | prefill density | decode density | s / sample |")
    print("| --- | --- | --- | --- | --- |")
    for m, r in rows.items():
        lo, hi = r["acc_all_ci"]
        print(f"| {m} | {r['score']:.0f} [{lo:.0f}, {hi:.0f}] | {r['density_prefill']:.3f} | "
              f"{r['density_decode']:.3f} | {r['total_s']:.2f} |")


DECODE_LABELS = {
    "dense": "dense",
    "sketchwalk": "SketchWalk default (sparse decode, last block sparse)",
    "sketchwalk_skip_decode": "+ dense decode (--skip_decode)",
    "sketchwalk_dlb1": "+ last query block dense (--dense_last_blocks 1)",
    "sketchwalk_dlb1_skip_decode": "+ both (--dense_last_blocks 1 --skip_decode)",
    "oracle_skip_decode": "oracle + dense decode",
}


def decode_rows_table(judged):
    """Per cell and mean: the decode / last-block rows; ``judged``: stage 1's judged (task, length) cells."""
    path = "stage2_decode/comparison/comparison.json"
    if not exists(path):
        return
    cells = load(path)["cells"]
    runs = list(cells[0]["runs"])
    print("\nDense decode and the last query block, the cells of stage2_decode (RULER score / prefill density)\n")
    print("| method | " + " | ".join(f"{c['task']} @ {fmt_len(int(c['length']))}{'' if (c['task'], int(c['length'])) in judged else ' (not judged)'}"
                                 for c in cells) + " | mean, judged cells | mean, all |")
    print("| --- " * (len(cells) + 3) + "|")
    for m in runs:
        vals = [c["runs"][m]["score"] for c in cells]
        jv = [c["runs"][m]["score"] for c in cells if (c["task"], int(c["length"])) in judged]
        print(f"| {DECODE_LABELS.get(m, m)} | " + " | ".join(
            f"{c['runs'][m]['score']:.0f} / {c['runs'][m]['density_prefill']:.2f}" for c in cells)
              + f" | {sum(jv) / max(1, len(jv)):.1f} | {sum(vals) / len(vals):.1f} |")


def two_gpu_summary():
    path = "two_gpu/two_gpu.json"
    if not exists(path):
        return
    d = load(path)
    one, two, ip = d["one_gpu"], d["two_gpus"], d["identical_predictions"]
    method = d["method"]["server_type"] if isinstance(d["method"], dict) else d["method"]
    print(f"\nTwo GPUs ({d['gpus'][0].split(',')[1].strip()} x {len(d['gpus'])}), {d['task']} @ {fmt_len(d['length'])}, "
          f"{d['n']} samples, {method} (default knobs): one GPU {one['wall_s']:.1f} s, torchrun on two {two['wall_s']:.1f} s "
          f"({d['speedup']['wall']:.2f}x wall, {d['speedup']['predict']:.2f}x in predict seconds); "
          f"{ip['identical']}/{ip['compared']} predictions identical; scores {one['score']:.2f} / {two['score']:.2f}")


def e2e_table():
    path = "e2e_32k/comparison/comparison.json"
    if not exists(path):
        return
    comp = load(path)
    for cell in comp["cells"]:
        runs = cell["runs"]
        print(f"\nEnd to end, {cell['task']} @ {fmt_len(int(cell['length']))}, one process alone, batch 1 "
              f"(n = {cell['n']})\n")
        print("| method | prefill s | decode s | new tokens | ms / decode token | total s | speedup vs dense "
              "| prefill density | accuracy |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for m, r in runs.items():
            vs = r.get("vs_baseline") or {}
            ms = 1000 * r["decode_s"] / r["new_tokens"] if r.get("new_tokens") else float("nan")
            speed = vs.get("speedup_total")
            print(f"| {LABELS.get(m, m)} | {r['prefill_s']:.3f} | {r['decode_s']:.3f} | {r['new_tokens']:.1f} | "
                  f"{ms:.1f} | {r['total_s']:.3f} | {'-' if speed is None else f'{speed:.2f}x'} | "
                  f"{r['density_prefill']:.3f} | {r['score']:.0f} |")
        e2e_median_table(cell, list(runs))


def e2e_median_table(cell, methods):
    """Medians per sample beside the means: a run's first sample can carry one-time costs that its warm-up
    did not meet (compilation, per-shape library setup, the allocator growing to the longest prompt)."""
    path = samples_path("e2e_32k/comparison")
    if not exists(path):
        return
    per = {m: [] for m in methods}
    for r in sample_records(path):
        if r["run"] in per and r["task"] == cell["task"] and str(r["length"]) == str(cell["length"]):
            per[r["run"]].append(r)
    if not all(per.values()):
        return
    print("\nThe same, medians per sample (first: the run's first sample, total s)\n")
    print("| method | prefill s | decode s | ms / decode token | total s | speedup vs dense | first |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = None
    for m in methods:
        rs = sorted(per[m], key=lambda r: r["index"])
        pre, dec = median([r["prefill_s"] for r in rs]), median([r["decode_s"] for r in rs])
        tot = median([r["prefill_s"] + r["decode_s"] for r in rs])
        tok = median([1000 * r["decode_s"] / r["new_tokens"] for r in rs if r.get("new_tokens")] or [float("nan")])
        base = tot if base is None else base
        speed = "-" if m == methods[0] else f"{base / tot:.2f}x"
        print(f"| {LABELS.get(m, m)} | {pre:.3f} | {dec:.3f} | {tok:.1f} | {tot:.3f} | {speed} | "
              f"{rs[0]['prefill_s'] + rs[0]['decode_s']:.3f} |")


def selection_tables():
    """docs/EVIDENCE.md 2.10: per cell 'accuracy [95%] / prefill density / decode density', the mean over cells and
    the paired interval of its difference to dense."""
    from eval.ruler.mean_difference import load as load_samples, paired_mean_difference
    for name in ("selection_evidence", "selection_fresh", "selection_curves"):
        folder = f"{name}/comparison"
        if not exists(f"{folder}/comparison.json"):
            continue
        d = load(f"{folder}/comparison.json")
        if d["baseline"] is None:              # rows run without a same-run baseline (Gemma-3): read beside stage 2's
            pooled_selection_table(name)
            continue
        samples = load_samples(path_of(samples_path(folder)))
        base = d["baseline"]
        print(f"\n{name}: RULER score [95%] / prefill density / decode density; mean over cells; Δ vs {base} "
              "[paired 95%]\n")
        heads = [f"{c['task']} @ {fmt_len(int(c['length']))}" for c in d["cells"]]
        print("| method | " + " | ".join(heads) + " | mean | Δ vs dense |")
        print("| --- |" + " --- |" * (len(heads) + 2))
        for run in d["summary"]:
            row = []
            for c in d["cells"]:
                x = c["runs"][run]
                lo, hi = x["acc_all_ci"]
                dens = "" if run == base else f" / {x['density_prefill']:.2f} / {x['density_decode']:.2f}"
                row.append(f"{x['acc_all']:.0f} [{lo:.0f}, {hi:.0f}]{dens}")
            delta = "-"
            if run != base:
                point, (lo, hi), _, _ = paired_mean_difference(samples[base], samples[run])
                delta = f"{100 * point:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
            print(f"| {run} | " + " | ".join(row) + f" | {d['summary'][run]['score_mean']:.1f} | {delta} |")


def pooled_selection_table(name, reused="stage2_decode/comparison", depth_length="32768"):
    """docs/EVIDENCE.md 3.7: rows of ``name`` (its comparison*/ folders, e.g. a run cut short compared apart) beside
    the reused rows of ``reused`` on the same prompts: RULER score per cell (n where short of the cell's), the mean
    over cells, and the paired interval of its difference to dense over the samples both have; then the score per
    needle-depth quartile at ``depth_length``."""
    from eval.ruler.mean_difference import paired_mean_difference, scores_by_run
    folders = [reused] + sorted(f"{name}/{f}" for f in os.listdir(path_of(name)) if f.startswith("comparison"))
    samples, records = {}, []
    for folder in folders:
        folder_records = list(sample_records(samples_path(folder)))
        samples.update(scores_by_run(folder_records))
        records += folder_records
    cells = sorted({cell for run in samples.values() for cell in run}, key=lambda c: (int(c[1]), c[0]))
    print(f"\n{name} beside {reused}: RULER score per cell (n where short); mean over cells; Δ vs dense [paired 95%]\n")
    print("| method | " + " | ".join(f"{t} @ {fmt_len(int(n))}" for t, n in cells) + " | mean | Δ vs dense |")
    print("| --- |" + " --- |" * (len(cells) + 2))
    full = max(len(v) for run in samples.values() for v in run.values())
    for run, by_cell in samples.items():
        scores = [100 * sum(by_cell[c].values()) / len(by_cell[c]) for c in cells]
        row = [f"{x:.1f}" + (f" (n = {len(by_cell[c])})" if len(by_cell[c]) < full else "") for x, c in zip(scores, cells)]
        delta = "-"
        if run != "dense":
            point, (lo, hi), _, n = paired_mean_difference(samples["dense"], by_cell)
            delta = f"{100 * point:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] ({n} samples)"
        print(f"| {run} | " + " | ".join(row) + f" | {sum(scores) / len(scores):.1f} | {delta} |")
    print(f"\nscore per needle-depth quartile at {fmt_len(int(depth_length))} (samples):\n")
    for task in sorted({t for t, n in cells if n == depth_length}):
        print(f"| {task} | 0-25% | 25-50% | 50-75% | 75-100% |\n| --- | --- | --- | --- | --- |")
        for run in samples:
            bins = [[] for _ in range(4)]
            for r in records:
                if r["run"] == run and r["task"] == task and str(r["length"]) == depth_length:
                    bins[min(int(r["depth"]) // 25, 3)].append(r["score_all"])
            print(f"| {run} | " + " | ".join(f"{100 * sum(b) / len(b):.0f} ({len(b)})" if b else "-" for b in bins) + " |")


def main(argv=None):
    global ROOT
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=DEFAULT_ROOT, help="folder with stage1/, stage2/, ... (default: results/ruler)")
    args = p.parse_args(argv)
    ROOT = args.root
    if not exists("stage1/comparison/comparison.json"):
        p.error(f"--root {args.root}: no stage1/comparison/comparison.json there (a results folder such as "
                f"results/ruler or results/ruler_gemma3)")
    lengths = stage1_table()
    if not exists("stage2/comparison/comparison.json"):
        return
    cells = stage2_cells(lengths)
    stage2_tables(cells)
    layer_type_table(cells)
    dense_rows_table()
    decode_rows_table({(t, int(n)) for t, n in cells})
    two_gpu_summary()
    e2e_table()
    selection_tables()


if __name__ == "__main__":
    main()
