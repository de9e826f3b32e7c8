#!/usr/bin/env bash
# RULER sweep over lengths x tasks x methods, in the spirit of RULER's run.sh: prepare.py,
# call_api.py and evaluate.py for every cell, then compare_results.py. A thin wrapper around
# eval/ruler/run_sketchwalk.py (the driver; see its --help for the config format).
#
#   bash eval/ruler/run_sketchwalk.sh eval/ruler/sweeps/demo.yaml            # tiny CPU demo
#   bash eval/ruler/run_sketchwalk.sh eval/ruler/sweeps/stage1_dense.yaml --dry_run
#   bash eval/ruler/run_sketchwalk.sh eval/ruler/sweeps/stage2.yaml --methods dense sketchwalk
#
# Resumable: run it again (also days later) and finished steps are skipped. It stops at the
# first failing step and prints that step's command. PY picks the interpreter (default python3).
set -euo pipefail
export TOKENIZERS_PARALLELISM=false
RULER_PATH=$(dirname "$0")
exec "${PY:-python3}" "${RULER_PATH}/run_sketchwalk.py" "$@"
