#!/usr/bin/env bash
# Run a sweep yaml on the lent GPU machine (docs/PERFORMANCE.md and docs/EVIDENCE.md say how the runs were made) within a time budget.
#   [MODEL=smollm2] [JOBS=12] [GPUS=2] [RESERVE=90] bash eval/ruler/device_run.sh SECONDS SWEEP_YAML [run_sketchwalk.py flags]
# SECONDS: the whole call, setup and packing included (keep it ~30 s under the call's limit).
# Expects: $MODEL_GGUF (MODEL's GGUF joined from the carried parts), wheels in .whl/ (gguf nltk
# wonderwords defusedxml), the essay file in .carry/, for MODEL=gemma3-270m its tokenizer as transformers 5.24
# converts it in .gtok/ (the machine's 5.17 converts it wrongly; eval/ruler/device_setup.sh does the setup and
# converts the model once before the parallel processes start).
# JOBS predict processes run at once (SmolLM2 at batch 1 is launch-bound: one process leaves the GPU
# mostly idle), spread over GPUS GPUs (default: those CUDA_VISIBLE_DEVICES names, else every GPU nvidia-smi lists;
# at most JOBS; run_sketchwalk.py --gpus).
# Data and predictions live under /tmp/gpu_run/<sweep> (they survive between calls while the machine
# stays warm, so a second call with the same arguments resumes). RESERVE seconds (default 90) are kept
# back for evaluate + compare (JOBS at a time: ~5 s a wave of evaluate.py, ~7 s compare) and the
# packing (~5 s), with room for the stopped processes to exit: when
# predict reaches SECONDS - RESERVE the whole driver process group is stopped (every call_api resumes
# from its fsync'd lines), then evaluate and compare run on what exists.
# Back in $OUT (5 files): device.log (GPUs, versions, phases and times), run.log (the driver's output),
# results.tgz (the root without its pred/ folder: comparisons, sweep_log.jsonl), summaries.tgz (every
# summary csv, manifest and predict log) and preds.tar.xz (the prediction files, prompts included, for
# a local re-run of compare_results.py; packed last, with every core, under what time is left: if cut,
# device.log says so and the archive holds the files before the cut). The files of one cell are packed
# side by side, method after method, so that xz finds each prompt repeated within its window; the data
# itself is re-made bit for bit by prepare.py from the same seed. (Measured on 2 CPU cores, 47 MB of
# essay-like predictions of 6 methods: xz -3 in 16 MiB blocks 4 s -> 3.2 MB; xz -6 20 s -> 2.3 MB; the same
# files in name order, method by method, 23 MB: each prompt's copies were farther apart than a block.)
set -uo pipefail
budget=${1:?seconds}; sweep=${2:?sweep yaml}; shift 2
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
jobs=${JOBS:-1}
reserve=${RESERVE:-90}
source eval/ruler/device_setup.sh || exit 1
if [ -n "${GPUS:-}" ]; then gpus=$GPUS
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then gpus=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
else gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); fi
[ "${gpus:-0}" -ge 1 ] 2>/dev/null || gpus=1
[ "$gpus" -gt "$jobs" ] && gpus=$jobs    # one job runs on one GPU: more GPUs than jobs would sit idle
root=/tmp/gpu_run/$(basename "$sweep" .yaml)

left=$(( budget - $(elapsed) - reserve ))
echo "== predict with $jobs job(s) on $gpus GPU(s), $left s left for it (reserve $reserve s)" | tee -a "$OUT/device.log"
if [ "$left" -gt 0 ]; then
  set -m                                 # the driver gets its own process group: stop it with its children
  python3 eval/ruler/run_sketchwalk.py "$sweep" --root_dir "$root" --jobs "$jobs" --gpus "$gpus" \
      --only prepare predict "$@" >> "$OUT/run.log" 2>&1 &
  driver=$!
  # The killer's output goes nowhere and its whole group (its sleep too) is stopped when the driver
  # ends first: an orphaned sleep holding this script's stdout would keep the call open until it woke.
  ( sleep "$left"; echo "budget reached: stopping the sweep" >> "$OUT/device.log"; kill -TERM -- "-$driver" 2>/dev/null ) \
      > /dev/null 2>&1 &
  killer=$!
  wait "$driver"; rc=$?
  kill -- "-$killer" 2>/dev/null
  wait "$killer" 2>/dev/null
  set +m
  echo "predict exit $rc after $(elapsed) s" | tee -a "$OUT/device.log"
fi

# evaluate and compare, leaving 30 s for the two small archives and at least a start on the large one
timeout $(( budget - $(elapsed) - 30 > 5 ? budget - $(elapsed) - 30 : 5 )) \
  python3 eval/ruler/run_sketchwalk.py "$sweep" --root_dir "$root" --jobs "$jobs" --only evaluate compare "$@" \
    >> "$OUT/run.log" 2>&1
echo "evaluate/compare exit $? after $(elapsed) s" | tee -a "$OUT/device.log"

(cd "$root" && tar -czf "$OUT/results.tgz" --exclude='./pred' .)
(cd "$root" && find pred \( -name 'summary*.csv' -o -name 'manifest-*.json' -o -name '*.log' \) -print \
   | tar -czf "$OUT/summaries.tgz" -T -)
echo "results.tgz, summaries.tgz packed after $(elapsed) s" | tee -a "$OUT/device.log"
# pred/<method>/<length>/<task>.jsonl sorted by length, file, then method: one cell's files together
(cd "$root" && find pred -path pred/_logs -prune -o -path pred/_data -prune -o -name '*.jsonl' -print \
   | sort -t/ -k3,3 -k4,4 -k2,2 > /tmp/preds.list)
pack_s=$(( budget - $(elapsed) - 3 ))
if [ "$pack_s" -gt 0 ]; then
  (cd "$root" && timeout "$pack_s" tar -cf "$OUT/preds.tar.xz" -I "xz -T0 -3 --block-size=16MiB" -T /tmp/preds.list)
  prc=$?
  if [ "$prc" -eq 124 ]; then msg="CUT at the budget (partial: xz -dc | tar -x gives the files before the cut)"
  else msg="exit $prc"; fi
  echo "preds.tar.xz ($(wc -l < /tmp/preds.list) files, $(stat -c %s "$OUT/preds.tar.xz") bytes): $msg after $(elapsed) s" \
    | tee -a "$OUT/device.log"
else
  echo "preds.tar.xz not packed: no time left" | tee -a "$OUT/device.log"
fi
grep -E "^\[|error|Error" "$OUT/run.log" | tail -40
ls -la "$OUT"
