"""The check of the OBS block loop that lessons 02 (SparseGPT: prune) and 05 (GPTQ: quantize) have
learners write: labkit.walk.obs_block's contract, the usual slips named."""

from __future__ import annotations

import torch

from .. import walk
from . import Verdict, call, tensor_like


def slipped_block(W1, Hinv1, constrain, *, propagate=True, divide=True, sign=-1.0, stale=False, loss_power=2):
    """walk.obs_block with the usual slips (keyword switches): no propagation, the error not divided by
    [H⁻¹]_ii, the update added, each column constrained as it was before the block's updates, a loss over d."""
    W1, original = W1.clone(), W1.clone()
    Q1, Err1, Losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        w, d = W1[:, i].clone(), Hinv1[i, i]
        q = constrain(i, original if stale else W1)
        Q1[:, i], Losses1[:, i] = q, (w - q) ** 2 / d**loss_power
        err = (w - q) / d if divide else w - q
        if propagate:
            W1[:, i:] += sign * err[:, None] * Hinv1[i, i:][None, :]
        Err1[:, i] = err
    return Q1, Err1, Losses1


def _matches(got: tuple, answer: tuple) -> bool:
    """All three outputs are finite float tensors of the answer's shapes and values (within fp32 round-off)."""
    return all(
        isinstance(g, torch.Tensor)
        and g.shape == a.shape
        and g.is_floating_point()
        and bool(torch.isfinite(g).all())
        and torch.allclose(g.double(), a.double(), atol=1e-5, rtol=1e-4)
        for g, a in zip(got, answer, strict=True)
    )


def block_case(seed: int, rows: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block W1 [rows, B] and the upper Cholesky factor Hinv1 [B, B] of its inputs' damped H⁻¹."""
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(rows, block, generator=g)
    X = torch.randn(8 * block, block, generator=g)
    X[:, 1] *= 8  # an outlier input: its errors matter most
    Hinv1, _ = walk.inverse_hessian_cholesky(2 * X.T @ X / X.shape[0], 0.01)
    return W1, Hinv1


def check_block_loop(v: Verdict, fn, cases, verb: str) -> bool:
    """Run the learner's loop fn(W1, Hinv1, constrain) on `cases` [(W1, Hinv1, make_constrain, what)], where
    make_constrain() gives a fresh constraint (it may keep state); compare with walk.obs_block. `verb`: what
    the constraint does to a column ("pruned", "rounded"), for the messages."""
    for W1, Hinv1, make_constrain, what in cases:
        expected = walk.obs_block(W1.clone(), Hinv1, make_constrain())
        got = call(v, fn, W1.clone(), Hinv1.clone(), make_constrain())
        if v.problem:
            return False
        if not isinstance(got, tuple) or len(got) != 3:
            return v.fail(f"return a triple (Q1, Err1, Losses1); got {type(got).__name__}.")
        if _matches(got, expected):
            continue
        slips = {
            f"forgot to propagate each column's error to the columns after it (that is plain {verb} columns), or "
            "used a column of Hinv1 instead of its row i": dict(propagate=False),
            "forgot to divide the error by d = Hinv1[i, i]: Err1[:, i] = (w − q) / d": dict(divide=False),
            "added the update: the remaining columns move against the error, W1[:, i:] −= ...": dict(sign=1.0),
            f"{verb} each column as it was before the block's updates: pass the block as updated by the columns "
            "before i": dict(stale=True),
            "divided the loss by d instead of d²: Losses1[:, i] = (w − q)² / d²": dict(loss_power=1),
        }
        for words, kw in slips.items():
            if _matches(got, slipped_block(W1.clone(), Hinv1, make_constrain(), **kw)):
                return v.fail(f"the outputs for {what} are wrong: it looks like you {words}.")
        for index, name in enumerate(("Q1", "Err1", "Losses1")):  # say which output differs, and where
            if not tensor_like(v, got[index], expected[index], f"{name} of {what}", atol=1e-5, rtol=1e-4):
                return False
    return True
