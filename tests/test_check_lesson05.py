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


def test_gptq_block(capsys):
    from labkit import solutions
    from labkit.check._blocks import slipped_block as _block

    assert check.lesson05.gptq_block(solutions.lesson05.gptq_block)
    assert capsys.readouterr().out.startswith("✓ gptq_block")
    wrong = {
        "forgot to propagate": dict(propagate=False),
        "forgot to divide the error by d": dict(divide=False),
        "added the update": dict(sign=1.0),
        "rounded each column as it was before the block's updates": dict(stale=True),
        "divided the loss by d instead of d²": dict(loss_power=1),
    }
    for words, kw in wrong.items():
        assert not check.lesson05.gptq_block(lambda W1, Hinv1, quantize, kw=kw: _block(W1, Hinv1, quantize, **kw))
        out = capsys.readouterr().out
        assert out.startswith("✗ gptq_block") and words in out, (words, out)

    def twice(W1, Hinv1, quantize):  # calls quantize twice for column 0
        quantize(0, W1)
        return solutions.lesson05.gptq_block(W1, Hinv1, quantize)

    assert not check.lesson05.gptq_block(twice)
    assert "out of turn" in capsys.readouterr().out
    assert check.lesson05.gptq_block(solutions.lesson02.obs_block)  # lesson 02's loop, with rounding instead
    capsys.readouterr()
    assert not check.lesson05.gptq_block(
        lambda W1, Hinv1, quantize: solutions.lesson05.gptq_block(W1, Hinv1, quantize)[:2]
    )
    assert "return a triple (Q1, Err1, Losses1)" in capsys.readouterr().out
