"""Checks for lesson 10b (prefill attention, speculative decoding, a compressed KV cache): the rejection rule
of speculative decoding (the lesson's "build it": speculative_generate calls it once per round).

    check.lesson10b.accept_tokens(my_accept_tokens)
"""

from __future__ import annotations

import torch

from ..serving.speculative import answer_problem
from . import Verdict, call, exercise

# One draft token on a 5-token vocabulary: the target p and the draft q disagree most on tokens 0 and 2.
_P = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])
_Q = torch.tensor([0.1, 0.1, 0.6, 0.1, 0.1])
_DRAWS = 8000  # frequencies within 0.025 of the expected ones: over 4 standard deviations at p = 0.5
_TOLERANCE = 0.025


def _one_hot(tokens: list[int], vocab: int = 6) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float()


def _greedy_cases():
    """(p, q, draft tokens, expected (n, next), what it tests): one-hot distributions, as at temperature 0."""
    draft = [1, 2, 3]
    return [
        (_one_hot([1, 2, 3, 4]), _one_hot(draft), draft, (3, 4), "every draft token is the target's choice"),
        (_one_hot([1, 5, 3, 4]), _one_hot(draft), draft, (1, 5), "the target disagrees at position 2 only"),
        (_one_hot([0, 2, 3, 4]), _one_hot(draft), draft, (0, 0), "the target disagrees at once"),
    ]


def _emitted(fn, v: Verdict, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
    """Frequencies of the token a one-draft round emits first (x if kept, else the replacement), _DRAWS rounds."""
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(p.numel())
    for _ in range(_DRAWS):
        x = torch.multinomial(q, 1, generator=generator)  # [1]: the draft's proposal, x ~ q
        got = call(v, fn, torch.stack([p, p]), q[None], x, generator)
        if v.problem is not None:
            return None
        if not _valid(v, got, 1, p.numel()):
            return None
        n, token = got
        counts[int(x) if n == 1 else token] += 1
    return counts / _DRAWS


def _valid(v: Verdict, got, k: int, vocab: int) -> bool:
    problem = answer_problem(got, k, vocab)  # the contract speculative_generate enforces
    return v.fail(problem) if problem is not None else True


def _slips(p: torch.Tensor, q: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a one-draft round emits under the usual mistakes, exactly (x ~ q)."""
    keep = torch.minimum(p, q)  # P(propose x and keep it) = q(x) min(1, p(x)/q(x))
    rejected = 1 - keep.sum()
    residual = (p - q).clamp_min(0) / (p - q).clamp_min(0).sum()
    inverted = torch.minimum(q, q * q / p)  # kept with probability min(1, q/p)
    return {
        "after a rejection the replacement comes from norm(max(0, p − q)), not from p itself": keep + rejected * p,
        "x is kept with probability min(1, p(x)/q(x)): the ratio is upside down": inverted
        + (1 - inverted.sum()) * residual,
        "the draft token is always kept: the target has to be able to reject it": q,
    }


@exercise
def accept_tokens(fn) -> bool:
    """fn(p [k+1, vocab], q [k, vocab], draft_tokens [k], generator) -> (n_accepted, next_token): keep draft token
    x_i with probability min(1, p_i(x_i) / q_i(x_i)), left to right, until the first rejection; then sample the
    next token from norm(max(0, p_i − q_i)); if all k are kept, sample a bonus token from p_{k+1}."""
    v = Verdict("accept_tokens")
    for p, q, draft, expected, what in _greedy_cases():
        got = call(v, fn, p, q, torch.tensor(draft), torch.Generator().manual_seed(0))
        if v.problem is not None or not _valid(v, got, len(draft), p.shape[1]):
            break
        if got == expected:
            continue
        n, token = got
        agreements = sum(int(p[i].argmax()) == x for i, x in enumerate(draft))
        if n > expected[0] and n == agreements:
            v.fail(
                f"{what}: you kept {n} tokens, the target's choice allows {expected[0]}. The round ends at the "
                "first rejection; later agreements do not count."
            )
        elif n > expected[0]:
            v.fail(
                f"{what}: you kept {n} tokens, the target's choice allows {expected[0]}: a draft token to which "
                "the target gives probability 0 was kept. Keep x with probability min(1, p(x)/q(x)): with "
                "q(x)/p(x) the ratio is upside down, and the target has to be able to reject."
            )
        elif expected[0] == len(draft) and token != expected[1]:
            v.fail(
                f"{what}: all {n} kept, then next_token {token}; the bonus token comes from the last row of p "
                f"(the target's distribution after the k draft tokens), here token {expected[1]}."
            )
        else:
            v.fail(
                f"{what}: got (n_accepted, next_token) = {got}; expected {expected} (temperature 0: keep "
                "the draft token while it is the target's argmax, then emit the target's argmax)."
            )
        break
    if v.problem is None:
        freq = _emitted(fn, v, _P, _Q)
        if freq is not None and (freq - _P).abs().max() > _TOLERANCE:
            gaps = {what: (freq - dist).abs().max().item() for what, dist in _slips(_P, _Q).items()}
            what, gap = min(gaps.items(), key=lambda item: item[1])
            shown = ", ".join(f"{f:.3f}" for f in freq.tolist())
            target = ", ".join(f"{f:.2f}" for f in _P.tolist())
            v.fail(
                f"over {_DRAWS} rounds the emitted tokens had frequencies [{shown}], not the target's p = "
                f"[{target}]" + (f": {what}." if gap <= _TOLERANCE else ".")
            )
    return v.report("The emitted tokens follow the target's distribution: labkit.serving.accept_tokens.")
