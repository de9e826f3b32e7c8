"""RULER data preparation: prepare.py, the prompt templates and tokenizers, the synthetic task generators."""
