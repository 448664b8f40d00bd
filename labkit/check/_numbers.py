"""A number check that recognises typical wrong answers (the scalar twin of tensor_like's `hints`)."""

from __future__ import annotations

import math

from . import Verdict, number_like


def number_with_hints(
    verdict: Verdict, got, expected: float, what: str, hints: dict | None = None, rtol: float = 1e-6
) -> bool:
    """number_like, but when `got` equals one of hints' values the verdict says which mistake it is.

    hints: {description: wrong value}, e.g. {"forgot the factor 2 (K and V)": expected / 2}."""
    if verdict.problem is not None:
        return False
    trial = Verdict(verdict.name)
    if number_like(trial, got, expected, what, rtol=rtol):
        return True
    for description, wrong in (hints or {}).items():
        if (
            math.isfinite(wrong)
            and not math.isclose(wrong, expected, rel_tol=rtol)
            and number_like(Verdict(verdict.name), got, wrong, what, rtol=rtol)
        ):
            return verdict.fail(f"{what} is {float(got):.6g}, not {expected:.6g}: it looks like you {description}.")
    return verdict.fail(trial.problem)
