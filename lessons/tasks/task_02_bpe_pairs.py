"""Task 02 (lesson 02): the pair counts that byte-level BPE training starts from.

Write the body of `count_pairs` below, then check it with

    pytest -m task_02

which compares it with minilm's own `count_pairs` (minilm/bpe_train.py) on hand-built chunks and
on the chunks of a real text, and checks that its most frequent pair is the first merge
`learn_merges()` makes.
"""

from collections import Counter


def count_pairs(chunks: dict[bytes, int]) -> Counter[tuple[int, int]]:
    """How often each adjacent pair of byte ids occurs, each chunk weighted by its count.

    chunks: what `count_chunks()` returns, a Counter from each distinct chunk (UTF-8 bytes) to
    the number of times it occurs in the text. Iterating over a bytes object gives ints 0..255,
    which are the token ids before any merge.

        {b"hug": 3, b"pug": 1}  ->  {(104, 117): 3, (117, 103): 4, (112, 117): 1}   # hu, ug, pu
        {b"aaa": 1}             ->  {(97, 97): 2}    # pairs overlap when counting
        {b"a": 5}               ->  {}               # one byte: no pair
    """
    raise NotImplementedError("task 02: count the pairs (see the docstring), then run pytest -m task_02")
