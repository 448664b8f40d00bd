"""Lesson 07's exercise checks: the right answer passes, typical mistakes get their own message."""

import torch

from labkit import check


def kl(p, q):  # KL(p ‖ q) per row
    return (p * (p.log() - q.log())).sum(-1)


def test_soft_targets(capsys):
    assert check.lesson07.soft_targets(lambda z, tau: torch.softmax(z / tau, dim=-1))
    assert capsys.readouterr().out.startswith("✓ soft_targets")
    assert not check.lesson07.soft_targets(lambda z, tau: torch.softmax(z * tau, dim=-1))
    assert "multiplied the logits by τ" in capsys.readouterr().out
    assert not check.lesson07.soft_targets(lambda z, tau: torch.softmax(z / tau, dim=0))
    assert "over the tokens (dim 0)" in capsys.readouterr().out


def forward_kl(s, t, tau):
    p_s, p_t = torch.softmax(s / tau, -1), torch.softmax(t / tau, -1)
    return tau**2 * kl(p_t, p_s).mean()


def test_forward_kl(capsys):
    assert check.lesson07.forward_kl(forward_kl)
    assert capsys.readouterr().out.startswith("✓ forward_kl")
    assert not check.lesson07.forward_kl(lambda s, t, tau: forward_kl(s, t, tau) / tau**2)
    assert "forgot the τ² factor" in capsys.readouterr().out
    assert not check.lesson07.forward_kl(lambda s, t, tau: forward_kl(t, s, tau))
    assert "the reverse KL" in capsys.readouterr().out
    assert not check.lesson07.forward_kl(
        lambda s, t, tau: tau**2 * kl(torch.softmax(t / tau, -1), torch.softmax(s, -1)).mean()
    )
    assert "softened only the teacher" in capsys.readouterr().out


def jsd(s, t, beta):
    p_s, p_t = torch.softmax(s, -1), torch.softmax(t, -1)
    m = beta * p_t + (1 - beta) * p_s
    return (beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)).mean()


def test_jsd(capsys):
    assert check.lesson07.jsd(jsd)
    assert capsys.readouterr().out.startswith("✓ jsd")
    assert not check.lesson07.jsd(lambda s, t, beta: jsd(t, s, beta))  # = swapped weights in m and the terms
    out = capsys.readouterr().out
    assert out.startswith("✗ jsd") and "β=0.1" in out
    assert not check.lesson07.jsd(lambda s, t, beta: jsd(s, t, 1 - beta) if beta != 0.5 else jsd(s, t, beta))
    assert "β=0.1" in capsys.readouterr().out

    def unweighted(s, t, beta):
        p_s, p_t = torch.softmax(s, -1), torch.softmax(t, -1)
        m = beta * p_t + (1 - beta) * p_s
        return (kl(p_t, m) + kl(p_s, m)).mean()

    assert not check.lesson07.jsd(unweighted)
    assert "without the weights β and 1 − β" in capsys.readouterr().out

    def swapped_mixture(s, t, beta):
        p_s, p_t = torch.softmax(s, -1), torch.softmax(t, -1)
        m = (1 - beta) * p_t + beta * p_s
        return (beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)).mean()

    assert not check.lesson07.jsd(swapped_mixture)
    assert "weights swapped" in capsys.readouterr().out
