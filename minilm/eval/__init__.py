"""Evaluation (lesson 12): win-rates with confidence intervals (winrate.py), the evaluation suite
every speedrun stage's model goes through (suite.py), and the report card (report.py, report_plots.py)."""
