"""labkit.check.lesson11: right answers pass, typical wrong answers get their specific message."""

import torch

from labkit import check


def test_bubble_fraction(capsys):
    assert check.lesson11.bubble_fraction(lambda p, m: (p - 1) / (m + p - 1))
    assert capsys.readouterr().out.startswith("✓ bubble_fraction")
    assert not check.lesson11.bubble_fraction(lambda p, m: (p - 1) / m)
    assert "relative to the busy time" in capsys.readouterr().out
    assert not check.lesson11.bubble_fraction(lambda p, m: m / (m + p - 1))
    assert "busy share" in capsys.readouterr().out

    def todo(p, m):
        raise NotImplementedError

    assert not check.lesson11.bubble_fraction(todo)
    assert "not written yet" in capsys.readouterr().out


def test_column_shards(capsys):
    assert check.lesson11.column_shards(lambda w, n: list(w.chunk(n, dim=0)))
    assert capsys.readouterr().out.startswith("✓ column_shards")
    assert not check.lesson11.column_shards(lambda w, n: list(w.chunk(n, dim=1)))
    assert "split the input dimension (dim 1)" in capsys.readouterr().out
    assert not check.lesson11.column_shards(lambda w, n: [w[r::n] for r in range(n)])
    assert "interleaved" in capsys.readouterr().out
    assert not check.lesson11.column_shards(lambda w, n: w)
    assert "list of 3 tensors" in capsys.readouterr().out


def test_ring_bytes_per_token(capsys):
    right = lambda h, l, b, w: 2 * (w - 1) / w * 2 * l * h * b
    assert check.lesson11.ring_bytes_per_token(right)
    assert capsys.readouterr().out.startswith("✓ ring_bytes_per_token")
    assert not check.lesson11.ring_bytes_per_token(lambda h, l, b, w: 2 * l * h * b)
    assert "returned the payload" in capsys.readouterr().out
    assert not check.lesson11.ring_bytes_per_token(lambda h, l, b, w: (w - 1) / w * 2 * l * h * b)
    assert "off by a factor of 2" in capsys.readouterr().out
    assert not check.lesson11.ring_bytes_per_token(lambda h, l, b, w: w * right(h, l, b, w))
    assert "multiplied by the world size" in capsys.readouterr().out
    assert not check.lesson11.ring_bytes_per_token(lambda h, l, b, w: torch.zeros(2))
    assert "should be a number" in capsys.readouterr().out
