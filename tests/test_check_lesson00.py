"""Lesson 00's exercise checks: the right answer passes, typical mistakes get their own message."""

import math

import torch
from torch.nn import functional as F

from labkit import check


def token_nll(logits, ids):
    return F.cross_entropy(logits[:-1], ids[1:], reduction="none")


def test_token_nll(capsys):
    assert check.lesson00.token_nll(token_nll)
    assert capsys.readouterr().out.startswith("✓ token_nll")

    assert not check.lesson00.token_nll(lambda logits, ids: F.cross_entropy(logits, ids, reduction="none"))
    assert "the last position has no next token" in capsys.readouterr().out

    assert not check.lesson00.token_nll(lambda logits, ids: F.cross_entropy(logits[:-1], ids[:-1], reduction="none"))
    assert "compared logits[t] with ids[t]" in capsys.readouterr().out

    def raw_logit(logits, ids):
        return -logits[torch.arange(ids.numel() - 1), ids[1:]]

    assert not check.lesson00.token_nll(raw_logit)
    assert "raw logit" in capsys.readouterr().out


def perplexity(nll):
    return math.exp(nll.mean().item())


def test_perplexity(capsys):
    assert check.lesson00.perplexity(perplexity)
    assert capsys.readouterr().out.startswith("✓ perplexity")

    assert not check.lesson00.perplexity(lambda nll: nll.exp().mean().item())
    assert "averaged exp(NLL)" in capsys.readouterr().out

    assert not check.lesson00.perplexity(lambda nll: nll.mean(1).exp().mean().item())
    assert "perplexities do not average" in capsys.readouterr().out

    assert not check.lesson00.perplexity(lambda nll: math.exp(-nll.mean().item()))
    assert "1 / perplexity" in capsys.readouterr().out


def model_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_model_bytes(capsys):
    assert check.lesson00.model_bytes(model_bytes)
    assert capsys.readouterr().out.startswith("✓ model_bytes")

    assert not check.lesson00.model_bytes(lambda model: 4 * sum(p.numel() for p in model.parameters()))
    assert "4 bytes per parameter" in capsys.readouterr().out

    assert not check.lesson00.model_bytes(
        lambda model: sum(t.numel() * t.element_size() for t in model.state_dict().values())
    )
    assert "counted the tied embedding twice" in capsys.readouterr().out
