"""labkit.check.lesson03: the right answers pass, typical mistakes get their specific message."""

import torch

from labkit import check


def right_fluctuation(x, W):
    return x.var(0, unbiased=False) * W.pow(2).sum(0)


def test_fluctuation_score(capsys):
    assert check.lesson03.fluctuation_score(right_fluctuation)
    assert check.lesson03.fluctuation_score(lambda x, W: x.var(0) * W.pow(2).sum(0))  # sample variance is fine
    assert not check.lesson03.fluctuation_score(lambda x, W: x.var(0, unbiased=False) * W.pow(2).sum(1))
    assert "instead of the column" in capsys.readouterr().out
    assert not check.lesson03.fluctuation_score(lambda x, W: x.pow(2).mean(0) * W.pow(2).sum(0))
    assert "subtract the channel's mean" in capsys.readouterr().out
    assert not check.lesson03.fluctuation_score(lambda x, W: x.var(0, unbiased=False) * W.norm(dim=0))
    assert "not its square" in capsys.readouterr().out


def test_fluctuation_score_not_written(capsys):
    def todo(x, W):
        raise NotImplementedError  # your code

    assert not check.lesson03.fluctuation_score(todo)
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
