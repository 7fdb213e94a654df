"""The lessons' figures: lessons/figures.py draws PNGs, and every figure a lesson embeds exists.

A few figure functions are run into tmp_path (the fast ones, no data pipeline needed); the rest
are drawn by `python lessons/figures.py` and committed under lessons/figures/.
"""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.md"))   # the numbered lessons, not answers or tasks
EMBED = re.compile(r"!\[[^\]]*\]\((figures/[\w.-]+\.png)\)")


@pytest.fixture(scope="module")
def figures():
    """lessons/figures.py, loaded from its path: a script of the course, not an installed module."""
    spec = importlib.util.spec_from_file_location("lesson_figures", ROOT / "lessons" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert 5_000 < path.stat().st_size < 200_000, f"{path.name} is {path.stat().st_size} bytes"


@pytest.mark.lesson_01
def test_causal_masks_figure_is_drawn(figures, tmp_path):
    figures.causal_masks(tmp_path / "masks.png")
    _check_png(tmp_path / "masks.png")


@pytest.mark.lesson_07
def test_dpo_loss_figure_is_drawn(figures, tmp_path):
    figures.post.dpo_loss_curves(tmp_path / "dpo.png")
    _check_png(tmp_path / "dpo.png")


@pytest.mark.lesson_11
def test_prune_schedule_figure_is_drawn(figures, tmp_path):
    figures.post.prune_schedule(tmp_path / "prune.png")
    _check_png(tmp_path / "prune.png")


@pytest.mark.lesson_00
def test_every_figure_has_a_function_and_a_name_from_its_lesson(figures, tmp_path):
    names = list(figures.registry(tmp_path))
    assert len(names) == len(set(names))
    assert {n[:2] for n in names} == {p.name[:2] for p in LESSONS}, "every lesson has a figure"


@pytest.mark.lesson_00
@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.name)
def test_each_lesson_embeds_figures_that_exist(lesson):
    embedded = EMBED.findall(lesson.read_text())
    assert embedded, f"{lesson.name} embeds no figure (![caption](figures/NAME.png))"
    missing = [f for f in embedded if not (lesson.parent / f).is_file()]
    assert not missing, f"{lesson.name} embeds missing figures {missing}; run python lessons/figures.py"
