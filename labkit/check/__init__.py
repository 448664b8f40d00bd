"""Self-checking exercises: each lesson's checks live in labkit/check/lessonNN.py.

    from labkit import check
    check.lesson01.wanda_score(my_wanda_score)   # prints what is right or what is wrong, in words

A check calls the learner's function on small hand-made tensors, compares with the answer, and
prints one line: "✓ ..." when right, or "✗ ..." saying what differs (a shape, a sign, a missing
absolute value) rather than just False. It returns True or False so a worked solution can
`assert` it (CI executes the worked solutions).
"""

from __future__ import annotations

import importlib

import torch


class Verdict:
    """Collects the first failure of a check; `report()` prints and returns the outcome."""

    def __init__(self, name: str):
        self.name, self.problem = name, None

    def fail(self, problem: str) -> bool:
        if self.problem is None:
            self.problem = problem
        return False

    def report(self, success: str = "") -> bool:
        if self.problem is None:
            print(f"✓ {self.name}: correct. {success}".rstrip())
            return True
        print(f"✗ {self.name}: {self.problem}")
        return False


def call(verdict: Verdict, fn, *args, **kwargs):
    """Run the learner's `fn`; a raised exception becomes the verdict's problem (returns None)."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        verdict.fail("not written yet (the function raises NotImplementedError).")
    except Exception as error:  # the learner's code: report it, do not crash the lesson
        verdict.fail(f"calling it raised {type(error).__name__}: {error}")
    return None


def tensor_like(
    verdict: Verdict,
    got,
    expected: torch.Tensor,
    what: str,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    hints: dict | None = None,
) -> bool:
    """Compare `got` with `expected`: type, shape, dtype class, then values.

    hints: {description: tensor} of known wrong answers; when `got` matches one of them the
    verdict says so (e.g. {"used W instead of |W|": W * x}), which is the point of a check."""
    if verdict.problem is not None:
        return False
    if not isinstance(got, torch.Tensor):
        return verdict.fail(f"{what} should be a torch.Tensor, got {type(got).__name__}.")
    if tuple(got.shape) != tuple(expected.shape):
        return verdict.fail(f"{what} has shape {tuple(got.shape)}; expected {tuple(expected.shape)}.")
    kind = lambda t: "bool" if t.dtype == torch.bool else "float" if t.dtype.is_floating_point else "int"  # noqa: E731
    if kind(got) != kind(expected):
        return verdict.fail(f"{what} has dtype {got.dtype}; expected {expected.dtype}.")
    g, e = got.detach().double().cpu(), expected.detach().double().cpu()
    if torch.allclose(g, e, atol=atol, rtol=rtol):
        return True
    for description, wrong in (hints or {}).items():
        if tuple(wrong.shape) == tuple(g.shape) and torch.allclose(
            g, wrong.detach().double().cpu(), atol=atol, rtol=rtol
        ):
            return verdict.fail(f"{what} is wrong: it looks like you {description}.")
    bad = (g - e).abs() > atol + rtol * e.abs()
    index = tuple(int(i) for i in bad.nonzero()[0])
    return verdict.fail(
        f"{what} differs at {int(bad.sum())} of {bad.numel()} entries; first at index {index}: "
        f"got {g[index].item():.6g}, expected {e[index].item():.6g}."
    )


def number_like(verdict: Verdict, got, expected: float, what: str, rtol: float = 1e-3) -> bool:
    if verdict.problem is not None:
        return False
    try:
        value = float(got)
    except (TypeError, ValueError):
        return verdict.fail(f"{what} should be a number, got {type(got).__name__}.")
    if abs(value - expected) > rtol * abs(expected) + 1e-12:
        return verdict.fail(f"{what} is {value:.6g}; expected {expected:.6g}.")
    return True


def __getattr__(name: str):
    # check.lesson01 etc. import on first use, so lessons only load their own checks.
    if name.startswith("lesson"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
