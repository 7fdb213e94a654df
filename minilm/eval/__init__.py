"""Evaluation: win-rates with confidence intervals, length-aware reporting (minilm/eval/winrate.py)."""
