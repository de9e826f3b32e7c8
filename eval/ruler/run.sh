#!/usr/bin/env bash
# RULER's run.sh for this project, in the form of NVIDIA/RULER's scripts/run.sh: for one model of
# config_models.sh and the tasks of config_tasks.sh, at every length of SEQ_LENGTHS, prepare the data
# (data/prepare.py), predict every task (pred/call_api.py) and score them (eval/evaluate.py).
#
#   bash eval/ruler/run.sh MODEL_NAME BENCHMARK_NAME      e.g. bash eval/ruler/run.sh smollm2-sketchwalk synthetic
#   NUM_SAMPLES=2 SEQ_LENGTHS=1024 TASKS="niah_single_1 vt" bash eval/ruler/run.sh smollm2 synthetic
#
# Results, as RULER lays them out:
#   ${ROOT_DIR}/${MODEL_NAME}/${BENCHMARK}/${LENGTH}/data/{task}/validation.jsonl   (+ validation.prepare.json)
#   ${ROOT_DIR}/${MODEL_NAME}/${BENCHMARK}/${LENGTH}/pred/{task}.jsonl, manifest-{task}.json,
#                                                        summary.csv (summary-{task}.csv for one task), submission.csv
# Compare two models' results with
#   python eval/ruler/pred/compare_results.py --run dense=benchmark_root/smollm2/synthetic \
#       --run sketchwalk=benchmark_root/smollm2-sketchwalk/synthetic --output_dir benchmark_root/comparison
#
# Resumable: run it again and what is predicted is kept (prepare.py writes the same bytes again, call_api.py
# skips the samples its prediction files hold). It stops at the first step that fails, with that step's exit
# status (2 for bad input, whose one-line error the step printed).
#
# Settings from the environment (defaults in brackets): ROOT_DIR [benchmark_root, as RULER], MODEL_DIR (your
# model folders, for config_models.sh) [models], GPUS [1; more runs call_api.py under torchrun, one chunk of
# the data per GPU], BATCH_SIZE [1], NUM_SAMPLES, SEQ_LENGTHS, TASKS, STOP_WORDS, REMOVE_NEWLINE_TAB
# [config_*.sh], MAX_NEW_TOKENS [the task's tokens_to_generate], SKETCHWALK_ARGS, SEERATTN_ARGS (the methods'
# knobs) [config_models.sh], PY, the interpreter [the project's .venv/bin/python when there is one, else python3].
set -euo pipefail

usage="usage: bash $0 MODEL_NAME BENCHMARK_NAME (models in config_models.sh, benchmarks in config_tasks.sh)"
if [ $# -ne 2 ]; then
    echo "error: $usage" >&2
    exit 2
fi

RULER_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "${RULER_DIR}/../.." && pwd)
if [ -z "${PY:-}" ]; then
    if [ -x "${REPO_DIR}/.venv/bin/python" ]; then PY="${REPO_DIR}/.venv/bin/python"; else PY=python3; fi
fi
export TOKENIZERS_PARALLELISM=false

# Root Directories
GPUS=${GPUS:-1}                         # GPUs for one model: torchrun ranks, each predicting a chunk
ROOT_DIR=${ROOT_DIR:-benchmark_root}    # the path that stores generated task samples and model predictions
MODEL_DIR=${MODEL_DIR:-models}          # the path that contains your own model folders (config_models.sh)
ENGINE_DIR="."                          # RULER's TensorRT-LLM engines: unused here, kept for MODEL_SELECT
BATCH_SIZE=${BATCH_SIZE:-1}             # dense only: sparse methods run one prompt at a time
if ! [[ "$GPUS" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: GPUS=$GPUS: must be a whole number >= 1" >&2
    exit 2
fi

# Model and Tokenizer
source "${RULER_DIR}/config_models.sh"
MODEL_NAME=${1}
MODEL_CONFIG=$(MODEL_SELECT "${MODEL_NAME}" "${MODEL_DIR}" "${ENGINE_DIR}")
IFS=":" read -r MODEL_PATH MODEL_TEMPLATE_TYPE MODEL_FRAMEWORK TOKENIZER_PATH TOKENIZER_TYPE SERVER_ARGS <<< "$MODEL_CONFIG"
if [ -z "${MODEL_PATH}" ]; then
    known=$(grep -oE '^ +[A-Za-z0-9._-]+\)$' "${RULER_DIR}/config_models.sh" | tr -d ' )' | paste -sd ' ' -)
    close=$("$PY" -c 'import difflib, sys; print(" or ".join(difflib.get_close_matches(sys.argv[1], sys.argv[2:], 2, 0.6)))' \
        "${MODEL_NAME}" ${known} 2> /dev/null || true)
    echo "error: model ${MODEL_NAME} is not in ${RULER_DIR}/config_models.sh${close:+; did you mean ${close}?}; choose one of: ${known} (or add an entry)" >&2
    exit 2
fi

# Benchmark and Tasks
source "${RULER_DIR}/config_tasks.sh"
BENCHMARK=${2}
if ! [[ "$BENCHMARK" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || ! declare -p "$BENCHMARK" 2> /dev/null | grep -q '^declare -a'; then
    echo "error: benchmark ${BENCHMARK} has no task list in ${RULER_DIR}/config_tasks.sh; the benchmark here is: synthetic" >&2
    exit 2
fi
if [ -n "${TASKS:-}" ]; then
    read -r -a TASK_LIST <<< "${TASKS//,/ }"
else
    declare -n BENCHMARK_TASKS=$BENCHMARK
    TASK_LIST=("${BENCHMARK_TASKS[@]}")
fi

prepare_flags=()
if [ -n "${MODEL_TEMPLATE_TYPE}" ]; then prepare_flags+=(--model_template_type "${MODEL_TEMPLATE_TYPE}"); fi
if [ "${REMOVE_NEWLINE_TAB}" != false ] && [ -n "${REMOVE_NEWLINE_TAB}" ]; then prepare_flags+=(--remove_newline_tab); fi
read -r -a server_flags <<< "${SERVER_ARGS}"
predict_flags=(--temperature "${TEMPERATURE}" --top_k "${TOP_K}" --top_p "${TOP_P}" --batch_size "${BATCH_SIZE}")
if [ -n "${STOP_WORDS}" ]; then predict_flags+=(--stop_words "${STOP_WORDS}"); fi
if [ -n "${MAX_NEW_TOKENS:-}" ]; then predict_flags+=(--max_new_tokens "${MAX_NEW_TOKENS}"); fi
launcher=("$PY")
if [ "$GPUS" -gt 1 ]; then
    # the project's torchrun path: rank r predicts chunk r of GPUS into {task}-r.jsonl; evaluate.py merges them
    export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
    launcher=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$GPUS")
fi

step() {  # run one step; stop run.sh with its exit status when it fails
    local label=$1
    shift
    echo "== ${label}: $*" >&2
    local rc=0
    "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "error: run.sh stopped: ${label} failed (exit ${rc}); run it again once fixed, finished steps are kept" >&2
        exit "$rc"
    fi
}

echo "model ${MODEL_NAME}: ${MODEL_FRAMEWORK} ${MODEL_PATH} ${SERVER_ARGS}; benchmark ${BENCHMARK}: ${TASK_LIST[*]}; lengths ${SEQ_LENGTHS[*]}; ${NUM_SAMPLES} samples; results in ${ROOT_DIR}/${MODEL_NAME}/${BENCHMARK}" >&2
total_time=0
for MAX_SEQ_LENGTH in "${SEQ_LENGTHS[@]}"; do

    RESULTS_DIR="${ROOT_DIR}/${MODEL_NAME}/${BENCHMARK}/${MAX_SEQ_LENGTH}"
    DATA_DIR="${RESULTS_DIR}/data"
    PRED_DIR="${RESULTS_DIR}/pred"

    # every task of this length in one prepare.py run (its tokenizer loads once); deterministic, so a rerun
    # writes the same samples and the predictions already made still match them
    tasks_csv=$(IFS=,; echo "${TASK_LIST[*]}")
    step "prepare ${MAX_SEQ_LENGTH}" "$PY" "${RULER_DIR}/data/prepare.py" \
        --save_dir "${DATA_DIR}" \
        --benchmark "${BENCHMARK}" \
        --task "${tasks_csv}" \
        --tokenizer_path "${TOKENIZER_PATH}" \
        --tokenizer_type "${TOKENIZER_TYPE}" \
        --max_seq_length "${MAX_SEQ_LENGTH}" \
        --num_samples "${NUM_SAMPLES}" \
        "${prepare_flags[@]}"

    for TASK in "${TASK_LIST[@]}"; do
        start_time=$(date +%s)
        step "predict ${TASK}@${MAX_SEQ_LENGTH}" "${launcher[@]}" "${RULER_DIR}/pred/call_api.py" \
            --data_dir "${DATA_DIR}" \
            --save_dir "${PRED_DIR}" \
            --benchmark "${BENCHMARK}" \
            --task "${TASK}" \
            --server_type "${MODEL_FRAMEWORK}" \
            --model_name_or_path "${MODEL_PATH}" \
            "${predict_flags[@]}" \
            "${server_flags[@]}"
        end_time=$(date +%s)
        time_diff=$((end_time - start_time))
        total_time=$((total_time + time_diff))
    done

    step "evaluate ${MAX_SEQ_LENGTH}" "$PY" "${RULER_DIR}/eval/evaluate.py" \
        --data_dir "${PRED_DIR}" \
        --benchmark "${BENCHMARK}"
done

echo "Total time spent on call_api: $total_time seconds"
echo "results: ${ROOT_DIR}/${MODEL_NAME}/${BENCHMARK}/LENGTH/pred/summary*.csv for LENGTH in ${SEQ_LENGTHS[*]}"
