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


def test_whitened_factors(capsys):
    import torch

    from labkit import solutions

    right = solutions.lesson08.whitened_factors
    assert check.lesson08.whitened_factors(right)
    assert capsys.readouterr().out.startswith("✓ whitened_factors")

    def plain(W, S, rank):
        U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        return (s[:rank, None] * Vh[:rank]).float(), U[:, :rank].float(), right(W, S, rank)[2]

    def not_undone(W, S, rank):
        U, s, Vh = torch.linalg.svd(W.double() @ S, full_matrices=False)
        return (s[:rank, None] * Vh[:rank]).float(), U[:, :rank].float(), s.float()

    def smallest(W, S, rank):
        U, s, Vh = torch.linalg.svd(W.double() @ S, full_matrices=False)
        A = torch.linalg.solve_triangular(S, s[-rank:, None] * Vh[-rank:], upper=False, left=False)
        return A.float(), U[:, -rank:].float(), s.float()

    def unbalanced(W, S, rank):  # all of Sigma in A: the same layer, accepted
        U, s, Vh = torch.linalg.svd(W.double() @ S, full_matrices=False)
        A = torch.linalg.solve_triangular(S, s[:rank, None] * Vh[:rank], upper=False, left=False)
        return A.float(), U[:, :rank].float(), s.float()

    assert check.lesson08.whitened_factors(unbalanced)
    capsys.readouterr()
    wrong = {
        "forgot the whitening": plain,
        "forgot to undo the whitening": not_undone,
        "kept the smallest singular values": smallest,
        "returned the singular values of W": lambda W, S, rank: (
            *right(W, S, rank)[:2],
            torch.linalg.svdvals(W),
        ),
        "A of W 6x8 at rank 3 (its shape) has shape (8, 3)": lambda W, S, rank: (
            right(W, S, rank)[0].T,
            *right(W, S, rank)[1:],
        ),
    }
    for words, answer in wrong.items():
        assert not check.lesson08.whitened_factors(answer), words
        out = capsys.readouterr().out
        assert out.startswith("✗ whitened_factors") and words in out, (words, out)
