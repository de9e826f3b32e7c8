#!/usr/bin/env bash
# Issue 7 item 5: the same niah_single_1 set on one GPU, then with torchrun on two, in one call on a
# machine with 2 GPUs (device kind nvidia-h100-x2). Same predictions expected, about half the wall time.
#   [N=80] [MODEL_GGUF=...] bash eval/ruler/two_gpu_run.sh          -> $OUT/two_gpu.json, $OUT/two_gpu.log
# Setup as in device_run.sh (eval/ruler/device_setup.sh: wheels in .whl/, $MODEL_GGUF, the model
# converted once), then, all from the repository's own commands:
#   1. prepare.py: niah_single_1 at LENGTH tokens, N samples, seed 42 (stage 2's generator and seed)
#   2. an untimed warm-up: call_api.py on one sample (Triton compiles its kernels into its disk cache,
#      the model files come into the page cache), so that neither timed run pays for that alone
#   3. timed: call_api.py --server_type SketchWalk (default knobs, dense_last_blocks 0, sparse decode:
#      stage 2's "sketchwalk") with python on GPU 0 alone
#   4. timed: the same with `torchrun --standalone --nproc_per_node 2` (python -m torch.distributed.run)
#      on GPUs 0 and 1, into another folder: rank r predicts chunk r of 2 (niah_single_1-r.jsonl)
#   5. evaluate.py on both folders, then $OUT/two_gpu.json: GPUs, versions, date, commands, N, the wall
#      seconds of each whole call_api process (model load and CUDA start included), the sums of the
#      per-sample prefill+decode seconds from the prediction records (per rank for torchrun), the
#      speedups, how many predictions are identical string for string, and both RULER scores.
# N=80 makes the one-GPU run about 2 minutes on an H100: 1.37 s a sample measured for SketchWalk at 8K
# with one process (results/ruler/gpu_smollm2_8k, torch selection; stage 2's 2.2 s a sample was shared
# by 12 processes) plus about 20 s of process start and model load. The whole script then takes about
# 4-5 minutes (at most ~8: the timed runs stop at LIMIT1 and LIMIT2 seconds).
# For a CPU check of the plumbing: DEVICE=cpu LENGTH=1024 N=4 MAX_NEW_TOKENS=4.
set -uo pipefail
: "${OUT:?set OUT to the folder that comes back}"
N=${N:-80}; LENGTH=${LENGTH:-8192}; TASK=niah_single_1; SEED=42
DEVICE=${DEVICE:-cuda}                       # cpu: a plumbing check (two gloo ranks on the CPU)
LIMIT1=${LIMIT1:-240}; LIMIT2=${LIMIT2:-160}   # seconds before a timed run is stopped (the json says so)
work=${WORK:-/tmp/two_gpu}
log=$OUT/two_gpu.log
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # no NVLink multicast
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # what torchrun gives its workers: the same for the python run
source eval/ruler/device_setup.sh || exit 1
MODEL=${MODEL:-smollm2}
ms() { date +%s%3N; }

# 1. the data (kept between calls while the machine stays warm; prepare.py is deterministic)
data=$work/data_${MODEL}_${LENGTH}_$N   # per model: its tokenizer and template make the prompts
prepare=(python3 eval/ruler/data/prepare.py --save_dir "$data" --benchmark synthetic --task $TASK
         --subset validation --tokenizer_path "$MODEL" --tokenizer_type hf --max_seq_length "$LENGTH"
         --num_samples "$N" --random_seed $SEED)
if [ ! -s "$data/$TASK/validation.jsonl" ]; then
  echo "== prepare: ${prepare[*]}" | tee -a "$log"
  "${prepare[@]}" >> "$log" 2>&1 || { echo "error: prepare failed (see two_gpu.log)"; exit 1; }
fi

# the one call_api command line of both runs; only the launcher, the GPUs and the folder differ
if [ "$DEVICE" = cpu ]; then dev=(--device cpu --dtype float32); else dev=(--device cuda --dtype bfloat16); fi
api=(eval/ruler/pred/call_api.py --data_dir "$data" --benchmark synthetic --task $TASK --subset validation
     --server_type SketchWalk --model_name_or_path "$MODEL" --dense_last_blocks 0 --temperature 0.0
     --batch_size 1 "${dev[@]}" ${MAX_NEW_TOKENS:+--max_new_tokens "$MAX_NEW_TOKENS"})

# 2. warm-up, untimed: the first sample (chunk 0 of N)
rm -rf "$work/warm"
echo "== warm-up on one sample" | tee -a "$log"
CUDA_VISIBLE_DEVICES=0 python3 "${api[@]}" --save_dir "$work/warm" --chunk_amount "$N" --chunk_idx 0 >> "$log" 2>&1 \
  || { echo "error: warm-up failed (see two_gpu.log)"; tail -5 "$log"; exit 1; }

# 3. one GPU
one=(python3 "${api[@]}" --save_dir "$work/pred_1gpu")
rm -rf "$work/pred_1gpu"
echo "== one GPU: CUDA_VISIBLE_DEVICES=0 ${one[*]}" | tee -a "$log"
t=$(ms); CUDA_VISIBLE_DEVICES=0 timeout "$LIMIT1" "${one[@]}" >> "$log" 2>&1; rc1=$?; wall1=$(( $(ms) - t ))
echo "   exit $rc1 in $wall1 ms" | tee -a "$log"

# 4. two GPUs, torchrun
two=(python3 -m torch.distributed.run --standalone --nproc_per_node 2 "${api[@]}" --save_dir "$work/pred_2gpu")
rm -rf "$work/pred_2gpu"
echo "== two GPUs: CUDA_VISIBLE_DEVICES=0,1 ${two[*]}" | tee -a "$log"
t=$(ms); CUDA_VISIBLE_DEVICES=0,1 timeout "$LIMIT2" "${two[@]}" >> "$log" 2>&1; rc2=$?; wall2=$(( $(ms) - t ))
echo "   exit $rc2 in $wall2 ms" | tee -a "$log"

# 5. scores and the summary
for d in pred_1gpu pred_2gpu; do
  python3 eval/ruler/eval/evaluate.py --data_dir "$work/$d" --benchmark synthetic >> "$log" 2>&1 \
    || echo "evaluate $d failed (see two_gpu.log)" | tee -a "$log"
done
gpus=$(command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader)
export OUT WORK_DIR=$work TASK N LENGTH SEED MODEL DEVICE rc1 rc2 wall1 wall2 LIMIT1 LIMIT2 gpus
export CMD_PREPARE="${prepare[*]}" CMD_WARM="CUDA_VISIBLE_DEVICES=0 python3 ${api[*]} --save_dir $work/warm --chunk_amount $N --chunk_idx 0"
export CMD_ONE="CUDA_VISIBLE_DEVICES=0 ${one[*]}" CMD_TWO="CUDA_VISIBLE_DEVICES=0,1 ${two[*]}"
python3 - <<'EOF'
import csv, datetime, hashlib, json, os, platform
from importlib import metadata

E = os.environ
work, task = E["WORK_DIR"], E["TASK"]


def records(folder, name):
    path = os.path.join(work, folder, name)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def key(rec):
    return rec["index"], hashlib.sha256(rec["input"].encode("utf-8")).hexdigest()


def seconds(recs):
    """Sum of the per-sample prefill + decode seconds (call_api's others; warm-up and load excluded)."""
    return round(sum((r.get("others") or {}).get("prefill_s", 0) + (r.get("others") or {}).get("decode_s", 0)
                     for r in recs), 3)


def score(folder):
    path = os.path.join(work, folder, f"summary-{task}.csv")
    if not os.path.isfile(path):
        return None
    rows = {r[0]: r[1:] for r in csv.reader(open(path, encoding="utf-8")) if r}
    return {"score": float(rows["Score"][0]), "nulls": rows["Nulls"][0]}


def version(p):
    try:
        return metadata.version(p)
    except metadata.PackageNotFoundError:
        return None


def manifest(folder, stem):
    path = os.path.join(work, folder, f"manifest-{stem}.json")
    return json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else None


one = records("pred_1gpu", f"{task}.jsonl")
ranks = [records("pred_2gpu", f"{task}-{r}.jsonl") for r in range(2)]
two = {key(r): r for recs in ranks for r in recs}
both = [(r, two[key(r)]) for r in one if key(r) in two]
same = [a["index"] for a, b in both if a["pred"] == b["pred"]]
wall1, wall2 = int(E["wall1"]) / 1000, int(E["wall2"]) / 1000
s1, s2 = seconds(one), [seconds(r) for r in ranks]
m = manifest("pred_1gpu", task)
out = {
    "what": "issue 7 item 5: the same niah_single_1 set with SketchWalk on one GPU (python), then on two "
            "(torchrun --standalone --nproc_per_node 2: one chunk of the data per rank and GPU)",
    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "gpus": [g.strip() for g in E.get("gpus", "").splitlines() if g.strip()],
    "versions": {"python": platform.python_version(),
                 **{p: version(p) for p in ("torch", "transformers", "triton", "gguf", "nltk", "wonderwords")}},
    "omp_num_threads": E.get("OMP_NUM_THREADS"),
    "model": E["MODEL"], "device": E["DEVICE"], "task": task, "length": int(E["LENGTH"]),
    "n": int(E["N"]), "random_seed": int(E["SEED"]),
    "method": {"server_type": "SketchWalk", "knobs": (m or {}).get("key", {}).get("knobs"),
               "attn_backend": (m or {}).get("key", {}).get("attn_backend"), "dtype": (m or {}).get("key", {}).get("dtype")},
    "commands": {"prepare": E["CMD_PREPARE"], "warm_up (untimed)": E["CMD_WARM"],
                 "one_gpu": E["CMD_ONE"], "two_gpus": E["CMD_TWO"],
                 "evaluate": "python3 eval/ruler/eval/evaluate.py --data_dir FOLDER --benchmark synthetic",
                 "this": "bash eval/ruler/two_gpu_run.sh"},
    "one_gpu": {"exit": int(E["rc1"]), "stopped_at_limit": E["rc1"] == "124", "limit_s": int(E["LIMIT1"]),
                "wall_s": wall1, "samples": len(one), "per_sample_s_sum": s1, **(score("pred_1gpu") or {})},
    "two_gpus": {"exit": int(E["rc2"]), "stopped_at_limit": E["rc2"] == "124", "limit_s": int(E["LIMIT2"]),
                 "wall_s": wall2, "samples": sum(map(len, ranks)),
                 "per_rank": [{"rank": r, "samples": len(ranks[r]), "per_sample_s_sum": s2[r]} for r in range(2)],
                 "per_sample_s_max_rank": max(s2), **(score("pred_2gpu") or {})},
    "speedup": {"wall": round(wall1 / wall2, 3) if wall2 else None,
                "predict": round(s1 / max(s2), 3) if max(s2) else None,
                "note": "wall: whole call_api processes (start, model load, warm-up step, CUDA and, for torchrun, "
                        "process-group start included); predict: sum of per-sample seconds on one GPU over the "
                        "slower rank's sum"},
    "identical_predictions": {"compared": len(both), "identical": len(same),
                              "differing_indices": sorted(a["index"] for a, b in both if a["pred"] != b["pred"]),
                              "only_one_gpu": len(one) - len(both), "only_two_gpus": len(two) - len(both)},
    "samples": [{"index": a["index"], "depth": a.get("depth"), "outputs": a["outputs"], "pred_one_gpu": a["pred"],
                 "pred_two_gpus": b["pred"],
                 "s_one_gpu": round(a["others"].get("prefill_s", 0) + a["others"].get("decode_s", 0), 4),
                 "s_two_gpus": round(b["others"].get("prefill_s", 0) + b["others"].get("decode_s", 0), 4)}
                for a, b in both],
}
with open(os.path.join(E["OUT"], "two_gpu.json"), "w", encoding="utf-8") as fh:
    json.dump(out, fh, indent=1)
    fh.write("\n")
brief = {k: out[k] for k in ("gpus", "n", "one_gpu", "two_gpus", "speedup")}
brief["identical_predictions"] = {k: v for k, v in out["identical_predictions"].items() if k != "differing_indices"}
print(json.dumps(brief, indent=1))
EOF
