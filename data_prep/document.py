"""The unit every data_prep stage passes along: one document with its id, source and text.

    Document(id="stdlib/json/decoder.py", source="stdlib", text="...")

Stages return new Documents (or drop them); `meta` carries what a stage learned about a document
(a quality score, the reason it was dropped) for the pipeline's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Document:
    id: str        # unique within its source, stable across runs (used for splits and dedup reports)
    source: str    # which source produced it, e.g. "stdlib", "man", "doc"
    text: str
    meta: dict = field(default_factory=dict)
