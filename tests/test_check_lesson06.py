"""labkit.check.lesson06: the right answer passes; typical mistakes get their specific message."""

import torch

from labkit import check


def _absmax(x):
    scale = x.abs().max() / 127
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def test_absmax_int8(capsys):
    assert check.lesson06.absmax_int8(_absmax)
    assert capsys.readouterr().out.startswith("✓ absmax_int8")

    def by_128(x):
        scale = x.abs().max() / 128
        return torch.round(x / scale).to(torch.int8), scale

    assert not check.lesson06.absmax_int8(by_128)
    assert "divide by 127" in capsys.readouterr().out

    def no_abs(x):
        scale = x.max() / 127
        return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale

    assert not check.lesson06.absmax_int8(no_abs)
    assert "max(|x|)" in capsys.readouterr().out

    def truncates(x):
        scale = x.abs().max() / 127
        return (x / scale).to(torch.int8), scale  # .to(int8) truncates towards zero

    assert not check.lesson06.absmax_int8(truncates)
    assert "truncated" in capsys.readouterr().out

    def float_codes(x):
        q, scale = _absmax(x)
        return q.float(), scale

    assert not check.lesson06.absmax_int8(float_codes)
    assert "float tensor" in capsys.readouterr().out

    def todo(x):
        raise NotImplementedError

    assert not check.lesson06.absmax_int8(todo)
    assert "not written yet" in capsys.readouterr().out


def test_outlier_features(capsys):
    assert check.lesson06.outlier_features(lambda X, t: (X.abs() >= t).any(0))
    assert capsys.readouterr().out.startswith("✓ outlier_features")
    assert not check.lesson06.outlier_features(lambda X, t: (t <= X).any(0))
    assert "not |x|" in capsys.readouterr().out
    assert not check.lesson06.outlier_features(lambda X, t: (X.abs() > t).any(0))
    assert "equal to the threshold" in capsys.readouterr().out
    assert not check.lesson06.outlier_features(lambda X, t: (X.abs() >= t).any(1))
    assert "one per feature" in capsys.readouterr().out


def test_smoothing_factors(capsys):
    from labkit import solutions

    assert check.lesson06.smoothing_factors(solutions.lesson06.smoothing_factors)
    assert capsys.readouterr().out.startswith("✓ smoothing_factors")

    def w_max(weights):
        return torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)

    wrong = {
        "swapped the exponents": lambda a, ws, alpha: (a ** (1 - alpha) / w_max(ws) ** alpha).clamp(min=1e-5),
        "multiplied by max|W|": lambda a, ws, alpha: (a**alpha * w_max(ws) ** (1 - alpha)).clamp(min=1e-5),
        "used the first weight's maximum only": lambda a, ws, alpha: (a**alpha / w_max(ws[:1]) ** (1 - alpha)).clamp(
            min=1e-5
        ),
        "forgot the clamp at 1e-5": lambda a, ws, alpha: a**alpha / w_max(ws) ** (1 - alpha),
        "not written yet": lambda a, ws, alpha: (_ for _ in ()).throw(NotImplementedError),
    }
    for words, answer in wrong.items():
        assert not check.lesson06.smoothing_factors(answer), words
        out = capsys.readouterr().out
        assert out.startswith("✗ smoothing_factors") and words in out, (words, out)
