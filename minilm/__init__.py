"""minilm: a minimal, readable Phi-3-style language-model library, from tokenizer to post-training.

Start with `lessons/00_overview.md` (the order to read lessons and code); `minilm speedrun` runs
every stage, from data to report.md.
"""

__version__ = "0.1.0"


class MinilmError(Exception):
    """A problem with the user's input (a file, a flag, a checkpoint) and what to do about it.

    The CLI prints the message and exits with status 2 instead of showing a traceback.
    """
