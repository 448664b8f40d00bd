"""Worked solutions of the lessons' exercises, one module per lesson (labkit/solutions/lessonNN.py).

A lesson never defines these in its own cells, so a learner's code is never overwritten by Run All.
`check.use(my_fn, check.lesson01.wanda_mask, ...)` checks the learner's function; with the environment
variable LABKIT_SOLUTIONS=1 (set by the test suite and by `python -m labkit.course`) it checks and plugs
in the worked solution instead, so CI proves that a correct answer passes and reproduces the lesson's
checked numbers. `show(check.lesson01.wanda_mask)` prints a solution (the book hides that output).
"""

from __future__ import annotations

import importlib
import inspect
import os

ENV = "LABKIT_SOLUTIONS"


def enabled() -> bool:
    """True when the worked solutions are plugged in instead of the learner's functions (LABKIT_SOLUTIONS=1)."""
    return os.environ.get(ENV) == "1"


def of(exercise):
    """The worked solution of `exercise`, a check such as check.lesson01.wanda_mask."""
    lesson = exercise.__module__.rsplit(".", 1)[-1]
    try:
        return getattr(importlib.import_module(f"{__name__}.{lesson}"), exercise.__name__)
    except (ImportError, AttributeError) as err:
        raise LookupError(f"no worked solution for check.{lesson}.{exercise.__name__} in labkit.solutions") from err


def show(exercise) -> None:
    """Print the worked solution of `exercise` (its source code; a Triton kernel's Python function)."""
    solution = of(exercise)
    print(inspect.getsource(getattr(solution, "fn", solution)).rstrip())


def __getattr__(name: str):
    # solutions.lesson01 etc. import on first use, as check.lesson01 does.
    if name.startswith("lesson"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ENV", "enabled", "of", "show"]
