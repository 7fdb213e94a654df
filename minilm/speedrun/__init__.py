"""`minilm speedrun`: every stage from data to report (run.py drives, stages.py is the table)."""
