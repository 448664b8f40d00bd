"""Lesson 02's exercise checks: the right answer passes, typical mistakes get their own message."""

import torch

from labkit import check


def obs_error(w, H):
    return w**2 / (2 * torch.linalg.inv(H).diagonal())


def test_obs_error(capsys):
    assert check.lesson02.obs_error(obs_error)
    assert capsys.readouterr().out.startswith("✓ obs_error")

    assert not check.lesson02.obs_error(lambda w, H: w**2 / (2 * H.diagonal()))
    assert "divided by H_qq instead of [H⁻¹]_qq" in capsys.readouterr().out

    assert not check.lesson02.obs_error(lambda w, H: w**2 * H.diagonal() / 2)
    assert "with the other weights left as they are" in capsys.readouterr().out

    assert not check.lesson02.obs_error(lambda w, H: w**2 / torch.linalg.inv(H).diagonal())
    assert "forgot the 1/2" in capsys.readouterr().out


def obs_update(w, H, q):
    Hinv = torch.linalg.inv(H)
    return w - w[q] / Hinv[q, q] * Hinv[:, q]


def test_obs_update(capsys):
    assert check.lesson02.obs_update(obs_update)
    assert capsys.readouterr().out.startswith("✓ obs_update")
    assert check.lesson02.obs_update(lambda w, H, q: obs_update(w.float(), H.float(), q))  # fp32 is precise enough
    capsys.readouterr()

    def no_update(w, H, q):
        w = w.clone()
        w[q] = 0
        return w

    assert not check.lesson02.obs_update(no_update)
    assert "left the other weights unchanged" in capsys.readouterr().out

    assert not check.lesson02.obs_update(lambda w, H, q: w - w[q] / H[q, q] * H[:, q])
    assert "used H where the update needs H⁻¹" in capsys.readouterr().out

    def plus(w, H, q):
        Hinv = torch.linalg.inv(H)
        return w + w[q] / Hinv[q, q] * Hinv[:, q]

    assert not check.lesson02.obs_update(plus)
    assert "flipped the sign" in capsys.readouterr().out


def output_error(W, W_hat, H):
    dW = W - W_hat
    return (torch.trace(dW @ H @ dW.T) / torch.trace(W @ H @ W.T)).item()


def test_output_error(capsys):
    assert check.lesson02.output_error(output_error)
    assert capsys.readouterr().out.startswith("✓ output_error")

    assert not check.lesson02.output_error(lambda W, W_hat, H: ((W - W_hat).norm() ** 2 / W.norm() ** 2).item())
    assert "compared the weights" in capsys.readouterr().out

    assert not check.lesson02.output_error(lambda W, W_hat, H: torch.trace((W - W_hat) @ H @ (W - W_hat).T).item())
    assert "without dividing" in capsys.readouterr().out


def test_obs_block(capsys):
    from labkit import solutions
    from labkit.check._blocks import slipped_block

    assert check.lesson02.obs_block(solutions.lesson02.obs_block)
    assert capsys.readouterr().out.startswith("✓ obs_block")
    wrong = {
        "forgot to propagate": dict(propagate=False),
        "forgot to divide the error by d": dict(divide=False),
        "added the update": dict(sign=1.0),
        "pruned each column as it was before the block's updates": dict(stale=True),
        "divided the loss by d instead of d²": dict(loss_power=1),
    }
    for words, kw in wrong.items():
        assert not check.lesson02.obs_block(lambda W1, Hinv1, prune, kw=kw: slipped_block(W1, Hinv1, prune, **kw))
        out = capsys.readouterr().out
        assert out.startswith("✗ obs_block") and words in out, (words, out)
