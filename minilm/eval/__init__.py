"""Evaluation (lesson 12): the held-out measurements every speedrun stage's model goes through (suite.py)."""
