"""Lesson 08's exercise checks: the right answer passes, typical mistakes get their own message."""

import torch

from labkit import check


def test_factored_params(capsys):
    assert check.lesson08.factored_params(lambda out_f, in_f, r: r * (in_f + out_f))
    assert capsys.readouterr().out.startswith("✓ factored_params")
    assert not check.lesson08.factored_params(lambda out_f, in_f, r: r * in_f * out_f)
    assert "multiplied everything" in capsys.readouterr().out
    assert not check.lesson08.factored_params(lambda out_f, in_f, r: r * in_f)
    assert "counted only A" in capsys.readouterr().out


def test_break_even_rank(capsys):
    assert check.lesson08.break_even_rank(lambda out_f, in_f: in_f * out_f // (in_f + out_f))
    assert capsys.readouterr().out.startswith("✓ break_even_rank")
    assert not check.lesson08.break_even_rank(lambda out_f, in_f: min(in_f, out_f) // 2)
    assert "right only for square matrices" in capsys.readouterr().out
    assert not check.lesson08.break_even_rank(lambda out_f, in_f: in_f * out_f / (in_f + out_f))
    assert "round down" in capsys.readouterr().out
    assert not check.lesson08.break_even_rank(lambda out_f, in_f: -(-in_f * out_f // (in_f + out_f)))
    assert "rounded up" in capsys.readouterr().out


def rank_r(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def test_rank_r_approximation(capsys):
    assert check.lesson08.rank_r_approximation(rank_r)
    assert capsys.readouterr().out.startswith("✓ rank_r_approximation")

    def smallest(W, r):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:]

    assert not check.lesson08.rank_r_approximation(smallest)
    assert "r smallest singular values" in capsys.readouterr().out

    def no_sigma(W, r):
        U, _S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r] @ Vh[:r]

    assert not check.lesson08.rank_r_approximation(no_sigma)
    assert "forgot the singular values" in capsys.readouterr().out

    def columns(W, r):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r] @ torch.diag(S[:r]) @ Vh[:, :r].T

    assert not check.lesson08.rank_r_approximation(columns)
    assert "first r columns of Vh" in capsys.readouterr().out
