"""RULER's synthetic task generators (niah, variable_tracking, common/freq words, qa) and what they share (common.py)."""
