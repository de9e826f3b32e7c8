#!/usr/bin/env bash
# The main job end to end on CPU with the default model (SmolLM2-135M-Instruct), as `make demo`
# runs it: niah_single_1 data, dense predictions, SketchWalk, the SeerAttention baseline with the
# committed gates, RULER scores for each, and the comparison report.
# Everything is resumable: run it again and finished steps are skipped by the scripts themselves.
set -euo pipefail
PY=${PY:-python3}
D=${DEMO_DIR:-results/demo}
N=${DEMO_SAMPLES:-5}
L=${DEMO_LENGTH:-4096}
T=${DEMO_TOKENS:-32}
set -x
$PY eval/ruler/data/synthetic/generate_niah_single_1.py --save_dir "$D/data" --num_samples "$N" \
    --max_seq_length "$L" --tokens_to_generate "$T" --tokenizer_path smollm2 --tokenizer_type hf
$PY eval/ruler/pred/call_api.py --server_type hf --model_name_or_path smollm2 --data_dir "$D/data" \
    --save_dir "$D/dense" --task niah_single_1 --subset validation --benchmark synthetic \
    --max_new_tokens "$T" --temperature 0.0
$PY eval/ruler/pred/eval_sketchwalk.py --model_path smollm2 --data_dir "$D/data" --num_samples "$N" \
    --block_size 64 --sketch_dim 64 --top_k_blocks 16 --sparsity_exponent 8 --max_new_tokens "$T" \
    --output_dir "$D/sketchwalk"
$PY eval/ruler/pred/call_api.py --server_type SeerAttn --model_name_or_path seer_attn/checkpoints/smollm2 \
    --data_dir "$D/data" --save_dir "$D/seerattn" --task niah_single_1 --subset validation \
    --benchmark synthetic --max_new_tokens "$T" --temperature 0.0
for run in dense seerattn; do
    $PY eval/ruler/eval/evaluate.py --data_dir "$D/$run" --benchmark synthetic
done
$PY eval/ruler/pred/compare_results.py --run dense="$D/dense" --run sketchwalk="$D/sketchwalk" \
    --run seerattn="$D/seerattn" --baseline dense --output_dir "$D/comparison"
set +x
echo "demo done: report in $D/comparison/comparison_report.md"
