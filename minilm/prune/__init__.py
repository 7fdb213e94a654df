"""Structured pruning of FFN neurons (arXiv 2302.03773): scores, schedule, redundancy, compaction."""
