"""The seed's standalone SketchWalk evaluation on one RULER task (niah_single_1 by default).

    python eval/ruler/pred/eval_sketchwalk.py --model_path ./checkpoints/sketchwalk_llama \
        --data_dir ./eval/ruler/data --num_samples 5 --block_size 64 --sketch_dim 64 \
        --top_k_blocks 16 --sparsity_exponent 8 --max_new_tokens 128 --output_dir ./results/sketchwalk

It is call_api.py with --server_type SketchWalk (the same planning, generation loop, manifest
and resumption: one generation path), followed by scoring. --model_path is any model form
(the alias smollm2, a .gguf file, a model folder, a hub name) or a SketchWalk checkpoint folder
(config.json with base_model and the knobs); --base_model replaces a checkpoint's base model.
Unset knobs come from the checkpoint, then from SketchWalkConfig's defaults. Writes into
--output_dir (created):

* {task}_results.json: per sample the prediction, references, correctness, prefill and decode
  seconds, density and depth; the run's config, model, versions, date and command;
* {task}.jsonl: RULER's prediction records (readable by eval/ruler/eval/evaluate.py), and its
  manifest-{task}.json;
* summary.csv: RULER's transposed layout (rows Tasks / Score / Nulls) with extra rows
  Score_part, Density (mean prefill density), Seconds_per_sample (prefill + decode).
"""
from __future__ import annotations

import datetime
import json
import shlex
import sys

from eval.ruler.cli import OneLineParser, UsageError, cli_main
from eval.ruler.eval import evaluate
from eval.ruler.pred import call_api, registry
from eval.ruler.pred.prediction_files import prompt_of, sample_key, write_json_atomic

SERVER = registry.get("SketchWalk")


def build_parser():
    parser = OneLineParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--model_path", default="smollm2",
                        help="a model (smollm2, .gguf, folder, hub name) or a SketchWalk checkpoint folder")
    parser.add_argument("--base_model", default=None, help="base model of a checkpoint (replaces its base_model)")
    parser.add_argument("--data_dir", default="./eval/ruler/data", help="folder holding {task}/{subset}.jsonl")
    parser.add_argument("--task", default="niah_single_1")
    parser.add_argument("--subset", default="validation")
    parser.add_argument("--num_samples", type=int, default=None, help="first N samples (default: all)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default: the task's tokens_to_generate")
    parser.add_argument("--output_dir", default="./results/sketchwalk")
    parser.add_argument("--overwrite", action="store_true", help="start afresh if output_dir holds another run")
    call_api.add_model_flags(parser)
    registry.add_server_flags(parser, [SERVER.server_type])
    return parser


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _round(x, nd):
    return None if x is None else round(x, nd)


def summarize(plan, records, task_cfg):
    """Per-sample rows and the run's summary from the prediction records of the plan's samples."""
    constants = evaluate.load_constants(plan.args.benchmark)
    samples, preds, refs = [], [], []
    for rec in records:
        pred = evaluate.postprocess_pred(rec["pred"], task_cfg)
        others = rec.get("others") or {}
        score_all = constants.string_match_all([pred], [rec["outputs"]])
        score_part = constants.string_match_part([pred], [rec["outputs"]])
        density = others.get("density") or {}
        samples.append({
            "index": rec["index"], "depth": rec.get("depth"), "prediction": rec["pred"], "reference": rec["outputs"],
            "correct": score_all == 100.0, "score_all": score_all, "score_part": score_part,
            "prefill_s": others.get("prefill_s"), "decode_s": others.get("decode_s"),
            "prompt_tokens": others.get("prompt_tokens"), "new_tokens": others.get("new_tokens"),
            "density": density, "density_per_layer": others.get("density_per_layer"),
        })
        preds.append(pred)
        refs.append(rec["outputs"])
    n = len(samples)
    seconds = [(s["prefill_s"] or 0.0) + (s["decode_s"] or 0.0) for s in samples]
    summary = {
        "num_samples": n,
        "score_all": task_cfg["metric_fn"](preds, refs) if n else 0.0,
        "score_all_metric": "string_match_all",
        "score_part": constants.string_match_part(preds, refs) if n else 0.0,
        "nulls": f"{sum(len(p) == 0 for p in preds)}/{n}",
        "accuracy": (sum(s["correct"] for s in samples) / n) if n else None,
        "density": {k: _round(_mean([s["density"].get(k) for s in samples]), 6)
                    for k in ("prefill", "decode", "overall")},
        "seconds_per_sample": _round(_mean(seconds), 4),
        "prefill_s_mean": _round(_mean([s["prefill_s"] for s in samples]), 4),
        "decode_s_mean": _round(_mean([s["decode_s"] for s in samples]), 4),
    }
    return samples, summary


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    world, _, _ = call_api.dist_env()
    if world > 1:
        raise UsageError("eval_sketchwalk.py runs in one process; under torchrun use call_api.py "
                         "--server_type SketchWalk and evaluate.py")
    api_argv = ["--data_dir", args.data_dir, "--save_dir", args.output_dir, "--task", args.task,
                "--subset", args.subset, "--benchmark", "synthetic", "--server_type", "SketchWalk",
                "--model_name_or_path", args.model_path, "--dtype", args.dtype, "--device", args.device,
                "--temperature", "0.0"]
    if args.max_new_tokens is not None:
        api_argv += ["--max_new_tokens", str(args.max_new_tokens)]
    if args.attn_backend is not None:
        api_argv += ["--attn_backend", args.attn_backend]
    api_argv += ["--graph_decode", args.graph_decode]
    if args.overwrite:
        api_argv.append("--overwrite")
    for name in SERVER.flags:
        value = getattr(args, name)
        if isinstance(value, bool):                 # --skip_decode / --no-skip_decode
            api_argv.append(f"--{name}" if value else f"--no-{name}")
        elif value is not None:
            api_argv += [f"--{name}", str(value)]
    api_args = call_api.parse_args(api_argv)
    if args.num_samples is not None and args.num_samples < 1:
        raise UsageError(f"--num_samples {args.num_samples}: must be >= 1")

    plan = call_api.run(api_args, limit=args.num_samples, base_model=args.base_model)

    # The records of this run's samples (the file may hold more from an earlier, larger run).
    wanted = {}
    for s in plan.samples:
        key = sample_key(s["index"], prompt_of(s))
        wanted[key] = wanted.get(key, 0) + 1
    records = []
    with open(plan.pred_file, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            key = sample_key(rec["index"], rec["input"])
            if wanted.get(key, 0) > 0:
                wanted[key] -= 1
                records.append(rec)

    task_cfg = evaluate.load_tasks("synthetic")[args.task]
    samples, summary = summarize(plan, records, task_cfg)
    manifest = json.loads(plan.manifest_file.read_text(encoding="utf-8"))
    out_dir = plan.pred_file.parent
    results = {
        "task": args.task,
        "model": {"model_path": args.model_path, "base_model": plan.model["model"],
                  "checkpoint": plan.model["checkpoint"]},
        "config": manifest.get("session") or manifest["key"].get("knobs"),
        "run": manifest["key"],
        "summary": summary,
        "samples": samples,
        "versions": call_api.versions(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
    }
    results_file = out_dir / f"{args.task}_results.json"
    write_json_atomic(results_file, results)

    density = summary["density"]["prefill"]
    rows = evaluate.summary_rows(
        {args.task: {"score": summary["score_all"], "nulls": summary["nulls"]}},
        extra_rows=[["Score_part", summary["score_part"]],
                    ["Density", _round(density, 4)],
                    ["Seconds_per_sample", _round(summary["seconds_per_sample"], 3)]])
    evaluate.write_csv(str(out_dir / "summary.csv"), rows)
    print(f"{args.task}: score {summary['score_all']} (part {summary['score_part']}), nulls {summary['nulls']}, "
          f"density {density}, {summary['seconds_per_sample']} s/sample")
    print(f"wrote {results_file}, {plan.pred_file}, {out_dir / 'summary.csv'}")


if __name__ == "__main__":
    main()
