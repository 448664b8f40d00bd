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
