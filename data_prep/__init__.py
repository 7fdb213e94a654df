"""minilm's data preparation: where real text comes from and how it is cleaned.

For now this holds the embedded default corpus (`stdlib_docs`); the filtered-data pipeline
(sources, filters, dedup, quality classifier, synthetic textbooks) grows here.
"""
