"""Lesson 10b's exercise: the rejection rule of speculative decoding. The worked solution passes and gives labkit's
rounds bit for bit; each usual mistake gets its own message; speculative_generate runs the learner's rule and
refuses an answer outside the contract."""

import pytest
import torch

from labkit import check, serving, solutions


def _stub(p, q, draft_tokens, generator=None):
    raise NotImplementedError  # your code


def _rule(p, q, draft_tokens, generator, *, ratio="p/q", replacement="residual", stop=True, bonus=True):
    """accept_tokens with one mistake switched on (the defaults are the right rule)."""
    k = draft_tokens.shape[0]
    rows = torch.arange(k)
    px, qx = p[rows, draft_tokens], q[rows, draft_tokens]
    r = torch.rand(k, generator=generator)
    keep = r * qx < px if ratio == "p/q" else r * px < qx if ratio == "q/p" else torch.ones(k, dtype=torch.bool)
    n = int(keep.long().cumprod(0).sum()) if stop else int(keep.sum())
    if n < k:
        dist = (p[n] - q[n]).clamp_min(0) if replacement == "residual" else p[n]
        dist = dist if dist.sum() > 0 else p[n]
    else:
        dist = p[k] if bonus else p[k - 1]
    return n, int(torch.multinomial(dist, 1, generator=generator))


def test_the_worked_solution_passes_and_matches_labkit_bit_for_bit(capsys):
    assert check.lesson10b.accept_tokens(solutions.lesson10b.accept_tokens)
    assert capsys.readouterr().out.startswith("✓ accept_tokens: correct.")
    g = torch.Generator().manual_seed(1)
    for k in (1, 3, 8):
        for _ in range(50):
            p = torch.rand(k + 1, 7, generator=g).softmax(-1)
            q = torch.rand(k, 7, generator=g).softmax(-1)
            x = torch.multinomial(q, 1, generator=g)[:, 0]
            seed = int(torch.randint(0, 2**31, (1,), generator=g))
            ours = serving.accept_tokens(p, q, x, torch.Generator().manual_seed(seed))
            assert solutions.lesson10b.accept_tokens(p, q, x, torch.Generator().manual_seed(seed)) == ours


def test_the_right_rule_written_differently_passes(capsys):
    assert check.lesson10b.accept_tokens(_rule)
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("slip", "message"),
    [
        (dict(replacement="p"), "norm(max(0, p − q)), not from p itself"),
        (dict(ratio="q/p"), "the ratio is upside down"),
        (dict(ratio="always"), "the target has to be able to reject"),
        (dict(stop=False), "you kept 2 tokens, the target's choice allows 1"),
        (dict(bonus=False), "the bonus token comes from the last row of p"),
    ],
)
def test_each_slip_is_named(slip, message, capsys):
    assert not check.lesson10b.accept_tokens(lambda p, q, x, g: _rule(p, q, x, g, **slip))
    assert message in capsys.readouterr().out


def test_stub_wrong_types_and_ranges(capsys):
    assert not check.lesson10b.accept_tokens(_stub)
    assert "not written yet" in capsys.readouterr().out
    assert not check.lesson10b.accept_tokens(lambda p, q, x, g: [0, 1])
    assert "return a pair" in capsys.readouterr().out
    assert not check.lesson10b.accept_tokens(lambda p, q, x, g: (torch.tensor(0), 1))
    assert "two Python ints" in capsys.readouterr().out
    assert not check.lesson10b.accept_tokens(lambda p, q, x, g: (x.numel() + 1, 0))
    assert "n_accepted = 4 for 3 draft token(s)" in capsys.readouterr().out


PROMPT = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(0))  # [1, 8]


def test_speculative_generate_runs_the_learners_rule(target_and_draft):
    (target, draft), ids = target_and_draft, PROMPT
    for temperature in (0.0, 1.0):
        ours = serving.speculative_generate(
            target, draft, ids, 12, k=3, temperature=temperature, generator=torch.Generator().manual_seed(0)
        )
        theirs = serving.speculative_generate(
            target, draft, ids, 12, k=3, temperature=temperature, generator=torch.Generator().manual_seed(0),
            accept=solutions.lesson10b.accept_tokens,
        )  # fmt: skip
        assert torch.equal(ours.token_ids, theirs.token_ids) and ours.accepted == theirs.accepted
        assert 0 < ours.accepted < ours.proposed  # the draft is rejected some of the time: the rule is exercised


@pytest.mark.parametrize("answer", [(4, 0), (0, 10**6), (0.0, 1), None])
def test_a_bad_answer_raises_and_names_the_contract(target_and_draft, answer):
    (target, draft), ids = target_and_draft, PROMPT
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"accept returned .* expected \(n_accepted, next_token\)"):
        serving.speculative_generate(target, draft, ids, 8, k=3, accept=lambda p, q, x, g: answer)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="accept=3: pass a function"):
        serving.speculative_generate(target, draft, ids, 8, k=3, accept=3)
