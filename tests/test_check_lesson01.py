"""Lesson 01's exercise checks: the right answer passes, typical mistakes get their own message."""

import math

import torch

from labkit import check, solutions


def test_wanda_mask(capsys):
    assert check.lesson01.wanda_mask(solutions.lesson01.wanda_mask)
    assert capsys.readouterr().out.startswith("✓ wanda_mask")
    right = solutions.lesson01.wanda_mask

    def row_mask(score, k):
        return torch.zeros_like(score, dtype=torch.bool).scatter(1, score.argsort(dim=1)[:, :k], True)

    wrong = {
        "inverted the mask": lambda W, norm, s: ~right(W, norm, s),
        "forgot the activations": lambda W, norm, s: right(W, torch.ones_like(norm), s),
        "forgot the absolute value": lambda W, norm, s: row_mask(W * norm, round(s * W.shape[1])),
        "pruned the highest scores": lambda W, norm, s: row_mask(-(W.abs() * norm), round(s * W.shape[1])),
        "one threshold for the whole matrix": lambda W, norm, s: (
            (W.abs() * norm) <= (W.abs() * norm).flatten().kthvalue(round(s * W.numel())).values
        ),
        "within each column": lambda W, norm, s: row_mask((W.abs() * norm).T.contiguous(), round(s * W.shape[0])).T,
        "rounded sparsity · in down with int()": lambda W, norm, s: row_mask(W.abs() * norm, int(s * W.shape[1])),
        "one too many": lambda W, norm, s: row_mask(W.abs() * norm, round(s * W.shape[1]) + 1),
        "has dtype torch.float32; return a bool tensor": lambda W, norm, s: right(W, norm, s).float(),
        "has shape (12, 6); expected (6, 12)": lambda W, norm, s: right(W, norm, s).T,
        "not written yet": lambda W, norm, s: (_ for _ in ()).throw(NotImplementedError),
    }
    for words, answer in wrong.items():
        assert not check.lesson01.wanda_mask(answer), words
        out = capsys.readouterr().out
        assert out.startswith("✗ wanda_mask") and words in out, (words, out)


def nm_mask(score, n, m):
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    lowest = groups.argsort(dim=2)[:, :, : m - n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter(2, lowest, True).reshape(rows, cols)


def test_nm_mask(capsys):
    assert check.lesson01.nm_mask(nm_mask)
    assert capsys.readouterr().out.startswith("✓ nm_mask")

    assert not check.lesson01.nm_mask(lambda score, n, m: ~nm_mask(score, n, m))
    assert "inverted the mask" in capsys.readouterr().out

    assert not check.lesson01.nm_mask(lambda score, n, m: nm_mask(score.T, n, m).T)
    assert "along the output dimension" in capsys.readouterr().out

    def whole_row(score, n, m):
        k = round(score.shape[1] * (1 - n / m))
        return torch.zeros_like(score, dtype=torch.bool).scatter(1, score.argsort(dim=1)[:, :k], True)

    assert not check.lesson01.nm_mask(whole_row)
    assert "of each whole row" in capsys.readouterr().out


def bitmask_bytes(weight):
    return math.ceil(weight.numel() / 8) + int((weight != 0).sum()) * weight.element_size()


def test_bitmask_bytes(capsys):
    assert check.lesson01.bitmask_bytes(bitmask_bytes)
    assert capsys.readouterr().out.startswith("✓ bitmask_bytes")

    assert not check.lesson01.bitmask_bytes(lambda w: int((w != 0).sum()) * w.element_size())
    assert "forgot the mask" in capsys.readouterr().out

    assert not check.lesson01.bitmask_bytes(lambda w: w.numel() // 8 + int((w != 0).sum()) * w.element_size())
    assert "rounded the mask down" in capsys.readouterr().out

    assert not check.lesson01.bitmask_bytes(lambda w: math.ceil(w.numel() / 8) + int((w != 0).sum()) * 4)
    assert "assumed 4 bytes per value" in capsys.readouterr().out
