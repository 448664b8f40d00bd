"""Lesson 01's exercise checks: the right answer passes, typical mistakes get their own message."""

import math

import torch

from labkit import check


def wanda_score(W, X):
    return W.abs() * X.norm(dim=0)


def test_wanda_score(capsys):
    assert check.lesson01.wanda_score(wanda_score)
    assert capsys.readouterr().out.startswith("✓ wanda_score")

    assert not check.lesson01.wanda_score(lambda W, X: W * X.norm(dim=0))
    assert "forgot the absolute value" in capsys.readouterr().out

    assert not check.lesson01.wanda_score(lambda W, X: W.abs() * (X**2).sum(0))
    assert "squared norm" in capsys.readouterr().out

    assert not check.lesson01.wanda_score(lambda W, X: W.abs() * X.norm(dim=1))
    assert "wrong axis" in capsys.readouterr().out


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
