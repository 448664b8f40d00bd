"""Self-checking exercises: each lesson's checks live in labkit/check/lessonNN.py.

    from labkit import check
    check.lesson01.wanda_mask(my_wanda_mask)   # prints what is right or what is wrong, in words
    mask = check.use(my_wanda_mask, check.lesson01.wanda_mask, prune.wanda_mask)   # yours once it passes

A check calls the learner's function on small hand-made tensors, compares with the answer, and
prints one line: "✓ ..." when right, or "✗ ..." saying what differs (a shape, a sign, a missing
absolute value) rather than just False. It returns True or False so a worked solution can
`assert` it (CI executes the worked solutions).
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers

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


def exercise(check):
    """Decorator of every check: whatever the learner's function returns, the check prints a verdict and
    returns True or False, never a traceback (the helpers below handle NaN, wrong types and shapes; this
    is the net under answers no helper foresaw)."""

    @functools.wraps(check)
    def run(fn) -> bool:
        try:
            return check(fn)
        except Exception as error:  # the answer broke the comparison itself: report it in words
            print(
                f"✗ {check.__name__}: your answer could not be compared with the expected one "
                f"({type(error).__name__}: {_short(error)}). Compare its type, shape and dtype with the "
                f"exercise's description: help(check.{check.__module__.rsplit('.', 1)[-1]}.{check.__name__})."
            )
            return False

    return run


def _short(error: Exception, limit: int = 300) -> str:
    text = str(error)
    return text if len(text) <= limit else text[:limit] + " ..."


def call(verdict: Verdict, fn, *args, **kwargs):
    """Run the learner's `fn`; a raised exception, or no answer (None or `...`), becomes the verdict's
    problem and the call returns None."""
    if not callable(fn):
        verdict.fail(f"pass your function itself, not its result (got {describe(fn)}).")
        return None
    try:
        result = fn(*args, **kwargs)
    except NotImplementedError:
        verdict.fail("not written yet (the function raises NotImplementedError).")
    except Exception as error:  # the learner's code: report it, do not crash the lesson
        verdict.fail(f"calling it raised {type(error).__name__}: {_short(error)}")
    else:
        if result is None:
            verdict.fail("it returned None: not written yet, or the `return` is missing.")
        elif result is Ellipsis:
            verdict.fail("it returned `...`: not written yet.")
        else:
            return result
    return None


def describe(value) -> str:
    """A short description of an answer's type, for messages: "a tensor of shape (3,), dtype torch.int64"."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}, dtype {value.dtype}"
    return type(value).__name__


def _kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    return "float" if t.dtype.is_floating_point else "complex" if t.dtype.is_complex else "int"


_NOT_FINITE = "Look for a division by zero, a log of 0 or an overflow."


def tensor_like(
    verdict: Verdict,
    got,
    expected: torch.Tensor,
    what: str,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    hints: dict | None = None,
) -> bool:
    """Compare `got` with `expected`: type, shape, dtype class, NaN/inf, then values.

    hints: {description: tensor} of known wrong answers; when `got` matches one of them the
    verdict says so (e.g. {"used W instead of |W|": W * x}), which is the point of a check."""
    if verdict.problem is not None:
        return False
    if not isinstance(got, torch.Tensor):
        return verdict.fail(f"{what} should be a torch.Tensor, got {describe(got)}.")
    if got.device.type == "meta" or got.layout != torch.strided:
        return verdict.fail(
            f"{what} should be a plain (dense) tensor with values, got one on {got.device}, {got.layout}."
        )
    if tuple(got.shape) != tuple(expected.shape):
        return verdict.fail(f"{what} has shape {tuple(got.shape)}; expected {tuple(expected.shape)}.")
    if _kind(got) != _kind(expected):
        return verdict.fail(f"{what} has dtype {got.dtype}; expected {expected.dtype}.")
    g, e = got.detach().cpu().double(), expected.detach().cpu().double()
    not_finite = ~torch.isfinite(g) & torch.isfinite(e)
    if not_finite.any():
        index = tuple(int(i) for i in not_finite.nonzero()[0])
        return verdict.fail(
            f"{what} has {int(not_finite.sum())} NaN or infinite entries of {g.numel()}; first at index {index}: "
            f"got {g[index].item()}, expected {e[index].item():.6g}. {_NOT_FINITE}"
        )
    if torch.allclose(g, e, atol=atol, rtol=rtol):
        return True
    for description, wrong in (hints or {}).items():
        if tuple(wrong.shape) == tuple(g.shape) and torch.allclose(
            g, wrong.detach().double().cpu(), atol=atol, rtol=rtol
        ):
            return verdict.fail(f"{what} is wrong: it looks like you {description}.")
    bad = ~torch.isclose(g, e, atol=atol, rtol=rtol)
    index = tuple(int(i) for i in bad.nonzero()[0])
    return verdict.fail(
        f"{what} differs at {int(bad.sum())} of {bad.numel()} entries; first at index {index}: "
        f"got {g[index].item():.6g}, expected {e[index].item():.6g}."
    )


def as_number(got) -> float | None:
    """`got` as a float when it is one real number (a Python or NumPy number, a one-element real tensor);
    None for anything else (a string, a bool, a list, a tensor of several values, a complex number)."""
    if isinstance(got, (bool, str, bytes)):
        return None
    if isinstance(got, torch.Tensor):
        if got.numel() != 1 or got.dtype == torch.bool or got.is_complex() or got.device.type == "meta":
            return None
        return got.item()
    if not isinstance(got, numbers.Real) and not hasattr(got, "__float__"):
        return None
    try:
        return float(got)
    except (TypeError, ValueError, OverflowError, RuntimeError):
        return None


def number_like(verdict: Verdict, got, expected: float, what: str, rtol: float = 1e-3) -> bool:
    """Compare a number `got` with `expected` within rtol; NaN, inf and non-numbers are wrong answers."""
    if verdict.problem is not None:
        return False
    value = as_number(got)
    if value is None:
        return verdict.fail(f"{what} should be a number, got {describe(got)}.")
    if not math.isfinite(value):
        return verdict.fail(f"{what} is {value}, not a finite number; expected {expected:.6g}. {_NOT_FINITE}")
    if not abs(value - expected) <= rtol * abs(expected) + 1e-12:
        return verdict.fail(f"{what} is {value:.6g}; expected {expected:.6g}.")
    return True


def use(fn, exercise, instead=None):
    """Check the learner's `fn` with `exercise` (e.g. check.lesson01.wanda_mask) and return the function
    the lesson should run: `fn` when it passes; otherwise `instead`, labkit's own function of the same
    signature (for a "build it" exercise, whose result the whole-model path then uses:
    prune.wanda(..., mask=check.use(wanda_mask, check.lesson01.wanda_mask, prune.wanda_mask))), or None.
    A stub (raise NotImplementedError) is reported as not written yet; nothing raises, so Run All goes on.
    With LABKIT_SOLUTIONS=1 (the test suite, labkit.course) the worked solution from labkit.solutions is
    checked and returned instead of `fn`; a worked solution that fails its check raises AssertionError."""
    from .. import solutions

    plugged = solutions.enabled()
    if plugged:
        fn, whose = solutions.of(exercise), f"the worked solution (labkit.solutions, {solutions.ENV}=1)"
    else:
        whose = f"your {getattr(fn, '__name__', exercise.__name__)}"
    passed = exercise(fn)
    if plugged and not passed:
        raise AssertionError(f"labkit.solutions.{exercise.__name__} fails its check ({exercise.__module__}): a defect")
    if instead is not None:
        target = getattr(instead, "fn", instead)  # a Triton kernel or function: its Python function
        name = f"{target.__module__.split('.')[1]}.{target.__name__}"  # e.g. prune.wanda_mask
        if passed:
            print(f"→ the whole-model run below uses {whose}.")
        else:
            print(f"→ the whole-model run below uses labkit's {name}; run this cell again once yours passes.")
    return fn if passed else instead


def __getattr__(name: str):
    # check.lesson01 etc. import on first use, so lessons only load their own checks.
    if name.startswith("lesson"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
