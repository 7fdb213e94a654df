"""Task 06 (lesson 09): DNO-Prct's large-margin pair filter (Rosset et al. 2024, Algorithm 2, 2c).

Write the body of `select_pairs` below, then check it with

    pytest -m task_06

which compares it with minilm's own `select_pairs` (minilm/post/dno.py) on the lesson's
hand-built scores and on many random candidate sets.
"""


def select_pairs(scores: list[float], teacher_index: int | None = None, positive_min: float = 5,
                 teacher_margin: float = 2, student_margin: float = 1, large_margin: bool = True,
                 texts: list[str] | None = None, ended: list[bool] | None = None) -> list[tuple[int, int, str]]:
    """The (positive, negative, kind) index pairs to train on, from one prompt's scored candidates.

    scores[i] is candidate i's oracle score; candidate `teacher_index` is the teacher's reply,
    the others are the student's samples. A pair (i, j) says "make i more likely than j":
    - i may be a positive only if ended is None or ended[i] (a reply cut off before <|end|> is
      never made more likely);
    - i != j, and two candidates with identical texts (when texts is given) are never paired;
    - large_margin=True: scores[i] >= positive_min and scores[i] - scores[j] >= margin, where
      margin is teacher_margin if i is the teacher and student_margin otherwise;
    - large_margin=False: any scores[i] > scores[j].
    kind is "teacher>student" if i is the teacher, "student>teacher" if j is, else
    "student>student". Return every such pair, i ascending, then j ascending.
    """
    raise NotImplementedError("task 06: filter the pairs (see the docstring), then run pytest -m task_06")
