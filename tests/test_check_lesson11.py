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


def _slices_with(**changes):
    from labkit import solutions

    def answer(config, rank, world):
        out = solutions.lesson11.linear_slices(config, rank, world)
        for name, change in changes.items():
            out[name] = change(config, rank, world, *out[name])
        return out

    return answer


def test_linear_slices(capsys):
    from labkit import parallel, solutions

    assert check.lesson11.linear_slices(solutions.lesson11.linear_slices)
    assert check.lesson11.linear_slices(parallel.linear_slices)
    assert capsys.readouterr().out.startswith("✓ linear_slices")
    whole_width = lambda c, r, w, d, a, b: (d, r * c.hidden_size // w, (r + 1) * c.hidden_size // w)  # the query width
    wrong = {
        "is row-parallel: it splits its input features": _slices_with(
            **{"self_attn.o_proj": lambda c, r, w, d, a, b: (0, a, b)}
        ),
        "is column-parallel: it splits its output features": _slices_with(
            **{"mlp.up_proj": lambda c, r, w, d, a, b: (1, a, b)}
        ),
        "holds the KV heads": _slices_with(**{"self_attn.k_proj": whole_width}),
        "not the hidden size": _slices_with(**{"mlp.gate_proj": whole_width}),
        "reverse order": lambda c, r, w: parallel.linear_slices(c, w - 1 - r, w),
        "the dict's keys should be the seven linears": lambda c, r, w: {"q_proj": (0, 0, 1)},
        "give a tuple (dim, start, stop)": _slices_with(**{"mlp.down_proj": lambda c, r, w, d, a, b: (d, a)}),
        "return a dict": lambda c, r, w: [(0, 0, 1)] * 7,
    }
    for words, answer in wrong.items():
        assert not check.lesson11.linear_slices(answer), words
        assert words in capsys.readouterr().out, words

    def todo(config, rank, world_size):
        raise NotImplementedError

    assert not check.lesson11.linear_slices(todo)
    assert "not written yet" in capsys.readouterr().out


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
