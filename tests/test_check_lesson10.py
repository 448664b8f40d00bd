"""labkit.check.lesson10: right answers pass, typical wrong answers get their specific message."""

import torch

from labkit import check
from labkit.kernels import roofline


def test_counted_bytes_matches_the_hand_count():
    # add 3n, pow 2n, mean n + rows, + eps 2 rows, rsqrt 2 rows, h * r 2n + rows, weight * 2n + hidden
    for rows, hidden in [(1, 8), (5, 64)]:
        n = rows * hidden
        assert check.lesson10.counted_bytes(rows, hidden) == 4 * (10 * n + 6 * rows + hidden)


def test_unfused_rmsnorm_residual_bytes(capsys):
    L = check.lesson10
    assert L.unfused_rmsnorm_residual_bytes(lambda rows, hidden: 4 * (10 * rows * hidden + 6 * rows + hidden))
    assert L.unfused_rmsnorm_residual_bytes(lambda rows, hidden: 4 * (10 * rows * hidden + hidden))  # rows terms: < 1%
    capsys.readouterr()
    assert not L.unfused_rmsnorm_residual_bytes(lambda rows, hidden: 10 * rows * hidden + 6 * rows + hidden)
    assert "elements, not bytes" in capsys.readouterr().out
    assert not L.unfused_rmsnorm_residual_bytes(lambda rows, hidden: 4 * (4 * rows * hidden + hidden))
    assert "one fused kernel" in capsys.readouterr().out
    assert not L.unfused_rmsnorm_residual_bytes(lambda rows, hidden: 4 * (10 * rows * hidden + 6 * rows))
    assert "left out the weight" in capsys.readouterr().out

    def todo(rows, hidden):
        raise NotImplementedError

    assert not L.unfused_rmsnorm_residual_bytes(todo)
    assert "not written yet" in capsys.readouterr().out


def test_matmul_intensity(capsys):
    L = check.lesson10
    assert L.matmul_intensity(lambda m, n, k, b: 2 * m * n * k / ((m * k + n * k + m * n) * b))
    cost = roofline.linear_cost(16, 11008, 4096, act_bytes=2, weight_bytes=2)  # the library agrees
    assert L.matmul_intensity(lambda m, n, k, b: roofline.linear_cost(m, n, k, b, b).intensity)
    assert abs(cost.intensity - 2 * 16 * 11008 * 4096 / ((16 * 4096 + 11008 * 4096 + 16 * 11008) * 2)) < 1e-9
    capsys.readouterr()
    assert not L.matmul_intensity(lambda m, n, k, b: m * n * k / ((m * k + n * k + m * n) * b))
    assert "two" in capsys.readouterr().out
    assert not L.matmul_intensity(lambda m, n, k, b: 2 * m * n * k / (n * k * b))
    assert "only the weight" in capsys.readouterr().out
    assert not L.matmul_intensity(lambda m, n, k, b: (m * k + n * k + m * n) * b / (2 * m * n * k))
    assert "FLOPs per byte" in capsys.readouterr().out


def test_rms_norm(capsys):
    L = check.lesson10

    def right(x, weight, eps):
        xf = x.float()
        return (weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)).to(x.dtype)

    assert L.rms_norm(right)
    from labkit.kernels import rms_norm_torch

    assert L.rms_norm(rms_norm_torch)
    capsys.readouterr()

    def layer_norm(x, weight, eps):
        return torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps).mul(weight.float()).to(x.dtype)

    assert not L.rms_norm(layer_norm)
    assert "LayerNorm" in capsys.readouterr().out
    assert not L.rms_norm(lambda x, w, eps: w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)))
    assert "left out eps" in capsys.readouterr().out
    assert not L.rms_norm(lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    assert "weight" in capsys.readouterr().out
    assert not L.rms_norm(
        lambda x, w, eps: w.float() * x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    )
    assert "x's dtype" in capsys.readouterr().out
