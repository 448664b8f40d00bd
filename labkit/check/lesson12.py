"""Checks for lesson 12 (capstone): the Pareto front of (weight memory, perplexity) points, and the
storage cost of a 2:4 sparse, low-bit layout.

    check.lesson12.pareto_front(my_pareto_front)
    check.lesson12.bits_per_weight_24(my_bits_per_weight_24)
"""

from __future__ import annotations

import math
import numbers

from . import Verdict, call, exercise

# (weight MiB, perplexity) points: a dominated point, a tie in memory, a tie in perplexity, unsorted input
_POINTS = [
    (513.1, 36.47),
    (160.4, 38.34),
    (323.3, 81.53),
    (146.5, 329.61),
    (210.0, 30.47),
    (159.1, 54.11),
    (171.4, 36.47),
    (160.4, 40.0),
    (432.2, 74.75),
    (150.4, 100.89),
]


def _front(points):
    """Points no other point beats: none with less or equal memory AND lower perplexity (ties: smaller memory)."""
    front, best = [], math.inf
    for point in sorted(points):
        if point[1] < best:
            front.append(point)
            best = point[1]
    return front


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


@exercise
def pareto_front(fn) -> bool:
    """fn(points: list of (weight_bytes, perplexity)) -> the non-dominated points, sorted by weight_bytes."""
    v = Verdict("pareto_front")
    for points in (_POINTS, _POINTS[:4], [(1.0, 5.0)]):
        got = call(v, fn, list(points))
        if v.problem is not None:
            break
        expected = _front(points)
        try:
            got = [tuple(p) for p in got]
        except TypeError:
            v.fail(f"return a list of (weight_bytes, perplexity) pairs, got {type(got).__name__}.")
            break
        if not all(len(p) == 2 and all(_real(x) for x in p) for p in got):
            v.fail(f"return a list of (weight_bytes, perplexity) pairs of finite numbers; got {got[:3]}...")
            break
        if sorted(got) == expected and got != expected:
            v.fail("the right points, in the wrong order: sort the front by weight memory, smallest first.")
        elif got == [min(points, key=lambda p: p[1])] and len(expected) > 1:
            v.fail("only the lowest perplexity: the front also keeps every smaller model that is the best at its size.")
        elif set(got) > set(expected):
            extra = sorted(set(got) - set(expected))[0]
            v.fail(f"{extra} is dominated: another point has no more weight memory and a lower perplexity.")
        elif set(got) < set(expected):
            missing = sorted(set(expected) - set(got))[0]
            v.fail(f"{missing} is missing: no point with less or equal memory has a lower perplexity.")
        elif got != expected:
            v.fail(f"for {len(points)} points got {got}; expected {expected}.")
        if v.problem is not None:
            break
    return v.report(
        "Sort by memory, keep a point when its perplexity beats every smaller one: labkit.results.pareto_front."
    )


@exercise
def bits_per_weight_24(fn) -> bool:
    """fn(value_bits) -> bits per original weight of a 2:4 layout: 2 kept values of `value_bits` plus a
    2-bit position each, per group of 4 weights (scales not counted)."""
    v = Verdict("bits_per_weight_24")
    for value_bits in (4, 8, 16, 3):
        got = call(v, fn, value_bits)
        if v.problem is not None:
            break
        expected = (value_bits + 2) / 2
        hints = {
            "forgot the 2-bit positions of the kept values (without them the zeros cannot be placed)": value_bits / 2,
            "counted a position for all 4 weights; only the 2 kept ones need one": (2 * value_bits + 4 * 2) / 4,
            "kept all 4 values: 2:4 stores only 2 of every 4": value_bits + 2,
        }
        if isinstance(got, bool) or not isinstance(got, numbers.Real):
            v.fail(f"return a number of bits, got {type(got).__name__}.")
            break
        for description, wrong in hints.items():
            if abs(got - wrong) < 1e-9 and abs(wrong - expected) > 1e-9:
                v.fail(f"{value_bits}-bit values give {got:g} bits per weight: it looks like you {description}.")
                break
        if v.problem is None and not abs(got - expected) <= 1e-9:  # NaN compares False: it is wrong too
            v.fail(f"{value_bits}-bit values give {got:g} bits per weight; expected {expected:g}.")
        if v.problem is not None:
            break
    return v.report("(2 · (value_bits + 2)) / 4: 3 bits per weight for 4-bit codes, 9 for 16-bit values.")
