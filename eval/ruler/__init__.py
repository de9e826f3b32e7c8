"""RULER's scripts, mirrored (data/, pred/, eval/), and the harness modules beside them.

Scripts import each other as ``eval.ruler...`` (the editable install puts the repository root on the path).
``eval/ruler/eval/`` (RULER's evaluate.py) has no ``__init__.py`` on purpose: a script run from this folder
(``python eval/ruler/run_sketchwalk.py``) has this folder first on ``sys.path``, and a regular package named
``eval`` here would hide the top-level ``eval`` package; as a namespace package it stays importable as
``eval.ruler.eval`` and hides nothing.
"""
