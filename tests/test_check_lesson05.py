"""Lesson 05's exercise checks: the right answer passes, typical wrong answers get their own message."""

import torch

from labkit import check


def right_hessian(X):  # X: [tokens, in]
    return 2 * X.T @ X / X.shape[0]


def right_obq_update(W, H, q, wq_hat):
    Hinv = torch.linalg.inv(H)
    err = (W[:, q] - wq_hat) / Hinv[q, q]
    return W - err[:, None] * Hinv[q][None, :]


def test_hessian(capsys):
    assert check.lesson05.hessian(right_hessian)
    assert "✓ hessian" in capsys.readouterr().out
    assert not check.lesson05.hessian(lambda X: X.T @ X / X.shape[0])
    assert "factor 2" in capsys.readouterr().out
    assert not check.lesson05.hessian(lambda X: 2 * X @ X.T / X.shape[0])
    assert "X Xᵀ" in capsys.readouterr().out
    assert not check.lesson05.hessian(lambda X: 2 * X.T @ X)
    assert "number of tokens" in capsys.readouterr().out


def test_obq_update(capsys):
    assert check.lesson05.obq_update(right_obq_update)
    assert "✓ obq_update" in capsys.readouterr().out

    def with_h(W, H, q, wq_hat):  # H where H⁻¹ belongs
        return W - ((W[:, q] - wq_hat) / H[q, q])[:, None] * H[q][None, :]

    assert not check.lesson05.obq_update(with_h)
    assert "used H where the update needs H⁻¹" in capsys.readouterr().out

    def flipped(W, H, q, wq_hat):
        return 2 * W - right_obq_update(W, H, q, wq_hat)

    assert not check.lesson05.obq_update(flipped)
    assert "sign" in capsys.readouterr().out

    def pruning(W, H, q, wq_hat):  # OBS pruning's update: w_q instead of the error
        return right_obq_update(W, H, q, torch.zeros_like(wq_hat))

    assert not check.lesson05.obq_update(pruning)
    assert "OBS pruning" in capsys.readouterr().out

    def todo(W, H, q, wq_hat):
        raise NotImplementedError  # your code

    assert not check.lesson05.obq_update(todo)
    assert "not written yet" in capsys.readouterr().out


def test_act_order(capsys):
    assert check.lesson05.act_order(lambda H: torch.argsort(torch.diag(H), descending=True))
    assert "✓ act_order" in capsys.readouterr().out
    assert not check.lesson05.act_order(lambda H: torch.argsort(torch.diag(H)))
    assert "largest" in capsys.readouterr().out
    assert not check.lesson05.act_order(lambda H: torch.argsort(H.sum(1), descending=True))
    assert "row sums" in capsys.readouterr().out
    assert not check.lesson05.act_order(lambda H: torch.zeros(H.shape[0], dtype=torch.long))
    assert "not a permutation" in capsys.readouterr().out
