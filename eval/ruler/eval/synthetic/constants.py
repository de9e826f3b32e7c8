"""RULER's metrics for the synthetic benchmark (NVIDIA/RULER scripts/eval/synthetic/constants.py).

Add a new task type:

TASK_NAME: {
    'metric_fn': the metric function with input (predictions: [str], references: [[str]]) to compute score.
}

Both metrics are case-insensitive substring matches, averaged over samples, times 100, rounded
to 2 decimals. ``string_match_all``: the fraction of a sample's references found in its
prediction; ``string_match_part``: 1 when any reference is found.
"""


def string_match_part(preds, refs):
    score = sum([max([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) for pred, ref in zip(preds, refs)]) \
        / len(preds) * 100
    return round(score, 2)


def string_match_all(preds, refs):
    score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref)
                 for pred, ref in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


TASKS = {
    'niah': {
        'metric_fn': string_match_all,
    },
    'variable_tracking': {
        'metric_fn': string_match_all,
    },
    'common_words_extraction': {
        'metric_fn': string_match_all,
    },
    'freq_words_extraction': {
        'metric_fn': string_match_all,
    },
    'qa': {
        'metric_fn': string_match_part,
    },
}

# The 13 tasks of the SeerAttention fork's synthetic.yaml and their task types: used only when
# eval/ruler/synthetic.yaml cannot be read (the yaml is the authority, as in RULER).
DEFAULT_TASK_TYPES = {
    'niah_single_1': 'niah', 'niah_single_2': 'niah', 'niah_single_3': 'niah',
    'niah_multikey_1': 'niah', 'niah_multikey_2': 'niah', 'niah_multikey_3': 'niah',
    'niah_multivalue': 'niah', 'niah_multiquery': 'niah',
    'vt': 'variable_tracking', 'cwe': 'common_words_extraction', 'fwe': 'freq_words_extraction',
    'qa_1': 'qa', 'qa_2': 'qa',
}
