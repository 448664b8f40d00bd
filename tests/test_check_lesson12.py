"""Lesson 12's exercise checks: the right answer passes, typical mistakes get their own message."""

from labkit import check


def front(points):
    kept, best = [], float("inf")
    for memory, ppl in sorted(points):
        if ppl < best:
            kept.append((memory, ppl))
            best = ppl
    return kept


def test_pareto_front(capsys):
    assert check.lesson12.pareto_front(front)
    assert capsys.readouterr().out.startswith("✓ pareto_front")
    assert not check.lesson12.pareto_front(lambda points: front(points)[::-1])
    assert "wrong order" in capsys.readouterr().out
    assert not check.lesson12.pareto_front(lambda points: [min(points, key=lambda p: p[1])])
    assert "only the lowest perplexity" in capsys.readouterr().out
    assert not check.lesson12.pareto_front(lambda points: sorted(points))
    assert "is dominated" in capsys.readouterr().out
    assert not check.lesson12.pareto_front(lambda points: front(points)[1:])
    assert "is missing" in capsys.readouterr().out


def test_bits_per_weight_24(capsys):
    assert check.lesson12.bits_per_weight_24(lambda bits: 2 * (bits + 2) / 4)
    assert capsys.readouterr().out.startswith("✓ bits_per_weight_24")
    assert not check.lesson12.bits_per_weight_24(lambda bits: bits / 2)
    assert "forgot the 2-bit positions" in capsys.readouterr().out
    assert not check.lesson12.bits_per_weight_24(lambda bits: bits / 2 + 2)
    assert "all 4 weights" in capsys.readouterr().out
    assert not check.lesson12.bits_per_weight_24(lambda bits: "3")
    assert "return a number" in capsys.readouterr().out
