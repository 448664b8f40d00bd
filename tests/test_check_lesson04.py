"""Lesson 04's exercise checks: the right answer passes, typical mistakes get their own message."""

import math

import torch

from labkit import check


def quantize_asym(x, bits):
    maxq = 2**bits - 1
    scale = (x.max() - x.min()) / maxq
    zero = torch.round(-x.min() / scale)
    codes = (torch.round(x / scale) + zero).clamp(0, maxq)
    return codes.to(torch.uint8), scale * (codes - zero)


def test_quantize_asym(capsys):
    assert check.lesson04.quantize_asym(quantize_asym)
    assert capsys.readouterr().out.startswith("✓ quantize_asym")

    def floor_codes(x, bits):
        maxq = 2**bits - 1
        scale = (x.max() - x.min()) / maxq
        zero = torch.round(-x.min() / scale)
        codes = (torch.floor(x / scale) + zero).clamp(0, maxq)
        return codes, scale * (codes - zero)

    assert not check.lesson04.quantize_asym(floor_codes)
    assert "used floor" in capsys.readouterr().out

    def no_zero_in_dequant(x, bits):
        codes, _ = quantize_asym(x, bits)
        scale = (x.max() - x.min()) / (2**bits - 1)
        return codes, scale * codes.float()

    assert not check.lesson04.quantize_asym(no_zero_in_dequant)
    assert "forgot to subtract the zero point" in capsys.readouterr().out

    def no_zero_point(x, bits):
        scale = (x.max() - x.min()) / (2**bits - 1)
        codes = torch.round(x / scale)
        return codes, scale * codes

    assert not check.lesson04.quantize_asym(no_zero_point)
    assert "forgot the zero point" in capsys.readouterr().out


def pack_int4(codes):
    codes = torch.nn.functional.pad(codes.to(torch.uint8), (0, codes.numel() % 2))
    return codes[0::2] | (codes[1::2] << 4)


def test_pack_int4(capsys):
    assert check.lesson04.pack_int4(pack_int4)
    assert capsys.readouterr().out.startswith("✓ pack_int4")

    def swapped(codes):
        codes = torch.nn.functional.pad(codes.to(torch.uint8), (0, codes.numel() % 2))
        return (codes[0::2] << 4) | codes[1::2]

    assert not check.lesson04.pack_int4(swapped)
    assert "high nibble" in capsys.readouterr().out

    def drops_odd(codes):
        return pack_int4(codes[: codes.numel() // 2 * 2])

    assert not check.lesson04.pack_int4(drops_odd)
    assert "needs a byte of its own" in capsys.readouterr().out

    assert not check.lesson04.pack_int4(lambda c: pack_int4(c).long())
    assert "dtype is torch.int64" in capsys.readouterr().out

    def no_shift(codes):
        codes = torch.nn.functional.pad(codes.to(torch.uint8), (0, codes.numel() % 2))
        return codes[0::2] + codes[1::2]

    assert not check.lesson04.pack_int4(no_shift)
    assert "without shifting" in capsys.readouterr().out


def quantlinear_bytes(out_features, in_features, bits, group_size):
    groups = 1 if group_size is None else in_features // group_size
    return (
        math.ceil(out_features * in_features * bits / 8)
        + out_features * groups * 2
        + math.ceil(out_features * groups * bits / 8)
    )


def test_quantlinear_bytes(capsys):
    assert check.lesson04.quantlinear_bytes(quantlinear_bytes)
    assert capsys.readouterr().out.startswith("✓ quantlinear_bytes")

    def fp32_scales(o, i, b, g):
        groups = 1 if g is None else i // g
        return math.ceil(o * i * b / 8) + o * groups * 4 + math.ceil(o * groups * b / 8)

    assert not check.lesson04.quantlinear_bytes(fp32_scales)
    assert "fp32" in capsys.readouterr().out

    def zeros_in_bytes(o, i, b, g):  # one byte per zero point, not packed
        groups = 1 if g is None else i // g
        return math.ceil(o * i * b / 8) + o * groups * 2 + o * groups

    assert not check.lesson04.quantlinear_bytes(zeros_in_bytes)
    assert "bytes of a 1536x576 layer at 4 bits, group_size=64 is 483840" in capsys.readouterr().out

    def no_zeros(o, i, b, g):
        groups = 1 if g is None else i // g
        return math.ceil(o * i * b / 8) + o * groups * 2

    assert not check.lesson04.quantlinear_bytes(no_zeros)
    assert "forgot the zero points" in capsys.readouterr().out


def test_unwritten_stub(capsys):
    def stub(*args):
        raise NotImplementedError  # your code

    assert not check.lesson04.quantize_asym(stub)
    assert "not written yet" in capsys.readouterr().out


def test_rtn_quantize(capsys):
    from labkit import solutions

    right = solutions.lesson04.rtn_quantize
    assert check.lesson04.rtn_quantize(right)
    assert capsys.readouterr().out.startswith("✓ rtn_quantize")

    def variant(fp16=True, with_zero=True, steps=None, floor=False, per_row=False):
        def fn(w, bits, group_size):
            maxq = 2**bits - 1
            out_f, in_f = w.shape
            rows = w.float().reshape(-1, in_f if per_row else group_size or in_f)
            lo, hi = rows.amin(1), rows.amax(1)
            if with_zero:
                lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            scale = (hi - lo) / (steps or maxq)
            scale = scale.half().float() if fp16 else scale
            zero = torch.round(-lo / scale).clamp(0, maxq)
            q = torch.floor(rows / scale[:, None]) if floor else torch.round(rows / scale[:, None])
            codes = (q + zero[:, None]).clamp(0, maxq)
            return codes.reshape(out_f, in_f), scale.reshape(out_f, -1), zero.reshape(out_f, -1)

        return fn

    wrong = {
        "kept the scale in fp32": variant(fp16=False),
        "left 0.0 out of the range": variant(with_zero=False),
        "divided the range by 2^bits = 16": variant(steps=16),
        "used floor (truncation)": variant(floor=True),
        "used one grid per row": variant(per_row=True),
        "return a triple (codes, scale, zero)": lambda w, bits, gs: right(w, bits, gs)[:2],
        "are not whole numbers": lambda w, bits, gs: (right(w, bits, gs)[0] + 0.5, *right(w, bits, gs)[1:]),
        "the scale of W 4x16, 4 bits, group_size=8 has shape (8,)": lambda w, bits, gs: (
            right(w, bits, gs)[0],
            right(w, bits, gs)[1].flatten(),
            right(w, bits, gs)[2],
        ),
    }
    for words, answer in wrong.items():
        assert not check.lesson04.rtn_quantize(answer), words
        out = capsys.readouterr().out
        assert out.startswith("✗ rtn_quantize") and words in out, (words, out)
