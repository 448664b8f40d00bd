"""labkit.check.lesson03: the right answers pass, typical mistakes get their specific message."""

import torch

from labkit import check


def right_unit_scores(var, W, unit):
    score = var * W.pow(2).sum(0)
    return ((score - score.mean()) / score.std()).view(-1, unit).mean(1)


def _z(score, unbiased=True):
    return (score - score.mean()) / score.std(unbiased=unbiased)


def test_unit_scores(capsys):
    assert check.lesson03.unit_scores(right_unit_scores)
    assert check.lesson03.unit_scores(lambda var, W, unit: _z(var * W.pow(2).sum(0), False).view(-1, unit).mean(1))
    assert "population std" in capsys.readouterr().out  # accepted, said
    wrong = {
        "instead of the column": lambda var, W, unit: _z(var * W.pow(2).sum(1)).view(-1, unit).mean(1),
        "not its square": lambda var, W, unit: _z(var * W.norm(dim=0)).view(-1, unit).mean(1),
        "forgot to standardize": lambda var, W, unit: (var * W.pow(2).sum(0)).view(-1, unit).mean(1),
        "standardized within each unit": lambda var, W, unit: torch.stack(
            [_z(u) for u in (var * W.pow(2).sum(0)).view(-1, unit)]
        ).mean(1),
        "standardize the channels first": lambda var, W, unit: _z((var * W.pow(2).sum(0)).view(-1, unit).mean(1)),
        "summed each unit's z": lambda var, W, unit: _z(var * W.pow(2).sum(0)).view(-1, unit).sum(1),
        "interleaved": lambda var, W, unit: _z(var * W.pow(2).sum(0)).view(unit, -1).mean(0),
        "the variance of the scores": lambda var, W, unit: (
            ((var * W.pow(2).sum(0) - (var * W.pow(2).sum(0)).mean()) / (var * W.pow(2).sum(0)).var())
            .view(-1, unit)
            .mean(1)
        ),
        "has shape (12,)": lambda var, W, unit: _z(var * W.pow(2).sum(0)),  # no averaging per unit
    }
    for words, answer in wrong.items():
        assert not check.lesson03.unit_scores(answer), words
        assert words in capsys.readouterr().out, words


def test_unit_scores_not_written(capsys):
    def todo(var, W, unit):
        raise NotImplementedError  # your code

    assert not check.lesson03.unit_scores(todo)
    assert "not written yet" in capsys.readouterr().out


def right_columns(g, n_heads, n_kv_heads, head_dim):
    group = n_heads // n_kv_heads
    return torch.arange(g * group * head_dim, (g + 1) * group * head_dim)


def test_kv_group_columns(capsys):
    assert check.lesson03.kv_group_columns(right_columns)
    assert check.lesson03.kv_group_columns(lambda *a: right_columns(*a).tolist())  # a list is fine

    def interleaved(g, n_heads, n_kv_heads, head_dim):
        heads = torch.arange(g, n_heads, n_kv_heads)
        return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()

    assert not check.lesson03.kv_group_columns(interleaved)
    assert "interleaved" in capsys.readouterr().out
    assert not check.lesson03.kv_group_columns(lambda g, n, k, d: torch.arange(g * (n // k), (g + 1) * (n // k)))
    assert "head indices, not channels" in capsys.readouterr().out
    assert not check.lesson03.kv_group_columns(lambda g, n, k, d: torch.arange(g * d, (g + 1) * d))
    assert "shape" in capsys.readouterr().out


def test_compensation_bias(capsys):
    assert check.lesson03.compensation_bias(lambda W, x, removed: W[:, removed] @ x[:, removed].mean(0))
    assert not check.lesson03.compensation_bias(lambda W, x, removed: W @ x.mean(0))
    assert "used every input channel" in capsys.readouterr().out
    assert not check.lesson03.compensation_bias(lambda W, x, removed: -(W[:, removed] @ x[:, removed].mean(0)))
    assert "subtracted it" in capsys.readouterr().out
