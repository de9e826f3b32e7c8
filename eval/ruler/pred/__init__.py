"""RULER prediction: call_api.py (server types from registry.py), model_wrappers.py, eval_sketchwalk.py, compare_results.py."""
