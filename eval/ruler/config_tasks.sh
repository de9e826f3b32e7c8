# Tasks of eval/ruler/run.sh, in the form of NVIDIA/RULER's scripts/config_tasks.sh: sourced by run.sh, which
# runs the list named like its BENCHMARK argument (the task names of eval/ruler/${BENCHMARK}.yaml).
# Each variable can be set from the environment instead, e.g.
#     NUM_SAMPLES=25 TASKS="niah_single_1 vt" bash eval/ruler/run.sh smollm2 synthetic

NUM_SAMPLES=${NUM_SAMPLES:-500}
REMOVE_NEWLINE_TAB=${REMOVE_NEWLINE_TAB:-false}
STOP_WORDS=${STOP_WORDS:-""}        # comma-separated stop strings (call_api.py --stop_words)

# task name in `synthetic.yaml`. niah_single_2/3, niah_multikey_1, niah_multivalue, niah_multiquery need the
# essay haystack and qa_1/qa_2 the QA sets, which are not shipped (README_SKETCHWALK.md, Step 1, says how to
# fetch them); without them prepare.py stops with the command that fetches them.
synthetic=(
    "niah_single_1"
    "niah_single_2"
    "niah_single_3"
    "niah_multikey_1"
    "niah_multikey_2"
    "niah_multikey_3"
    "niah_multivalue"
    "niah_multiquery"
    "vt"
    "cwe"
    "fwe"
    "qa_1"
    "qa_2"
)
