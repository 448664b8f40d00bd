"""The one rule of lesson ids, imported by labkit.course (which re-exports it: labkit.course.lesson_id, ...),
labkit.runtime and labkit.results. A leaf module: it imports nothing of labkit, so each can use it.

A lesson's id is two digits, then a lowercase letter for a lesson inserted after another without renumbering:
notebooks/05b_awq_and_qlora.ipynb is lesson '05b', after '05' (05_gptq) and before '06'. Ids sort as the
course runs ('05' < '05b' < '06', string order), and so do the lessons' file names ('_' < 'b').
Nothing else slices a name ([:2]) or matches digits itself: it asks lesson_id, is_lesson_id or is_lesson.
"""

from __future__ import annotations

import re
from pathlib import Path

LESSON_ID = r"[0-9]{2}[a-z]?"  # a regex; ASCII digits, as the glob's (\d would match any script's digits)
LESSON_NAME = re.compile(rf"({LESSON_ID})_\w+")  # a lesson notebook's stem, e.g. 05b_awq_and_qlora
LESSON_GLOB = "[0-9][0-9]*_*.ipynb"  # every lesson file matches (more may: is_lesson decides)


def is_lesson_id(text: str) -> bool:
    """'05' and '05b' are lesson ids; '5', '05B', '005', '05bc' and '05_gptq' are not."""
    return isinstance(text, str) and re.fullmatch(LESSON_ID, text) is not None


def lesson_id(name: str | Path) -> str:
    """'05b' from '05b_awq_and_qlora', '05b_awq_and_qlora.ipynb', a path to it or '05b' itself; '05' from '05_gptq'.

    Raises ValueError for a name that is no lesson's."""
    text = Path(name).name
    if is_lesson_id(text):
        return text
    match = LESSON_NAME.fullmatch(text.removesuffix(".ipynb"))
    if match is None:
        raise ValueError(f"{name!r} is not a lesson's name: lessons are named like 00_baseline or 05b_awq_and_qlora.")
    return match.group(1)


def is_lesson(path: Path) -> bool:
    """A lesson notebook's file: NN_title.ipynb or NNx_title.ipynb (x a lowercase letter)."""
    return path.suffix == ".ipynb" and LESSON_NAME.fullmatch(path.stem) is not None
