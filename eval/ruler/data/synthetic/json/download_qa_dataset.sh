#!/usr/bin/env bash
# Download the QA sets of RULER's qa_1 and qa_2 next to this script, whatever the working folder:
#   squad.json     SQuAD 2.0 dev set (qa_1)
#   hotpotqa.json  HotpotQA dev set, distractor setting (qa_2; a mirror is tried if the first fails)
# Usage: bash eval/ruler/data/synthetic/json/download_qa_dataset.sh
# prepare.py's --qa_file takes other files of the same shape.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

fetch() {  # fetch URL FILE: to FILE.part, then rename, so an interrupted download leaves no broken file
    if command -v wget >/dev/null 2>&1; then
        wget --tries=3 "$1" -O "$2.part"
    else
        curl -fL --retry 3 "$1" -o "$2.part"
    fi && mv "$2.part" "$2"
}

fetch https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json squad.json
fetch http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json hotpotqa.json || \
fetch https://huggingface.co/datasets/namlh2004/hotpotqa/resolve/7e54db4656209750ff487f6fdf8e39a66dba136b/hotpot_dev_distractor_v1.json hotpotqa.json
rm -f squad.json.part hotpotqa.json.part
echo "wrote $(pwd)/squad.json and $(pwd)/hotpotqa.json"
