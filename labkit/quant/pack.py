"""Dense bit packing of integer codes: 2, 3, 4 or 8 bits per value, into uint8 bytes or int32 words.

Layout: one little-endian bit stream. Value i occupies bits [i·b, (i+1)·b) of the stream, and stream
bit k is bit (k mod 8) of byte k // 8. So for 4 bits, byte j holds value 2j in its low nibble and
2j+1 in its high nibble; for 2 bits, four values per byte, lowest first; for 3 bits, 8 values fill 3
bytes (value 2 straddles bytes 0 and 1). Read in groups of 4 bytes as little-endian int32 words, this
is exactly AutoGPTQ's int32 packing (32 values in `bits` words; for 3 bits, values 10 and 21
straddle words), which `pack_int32` produces.

The packed form is flat; the caller keeps the true shape (and so the true length): the last byte is
zero-padded when n·bits is not a multiple of 8, and `unpack(data, bits, shape)` drops the padding.
"""

from __future__ import annotations

import math

import torch

from .formats import check_bits


def packed_bytes(n_values: int, bits: int) -> int:
    """Bytes that `pack` uses for n_values codes: ceil(n · bits / 8)."""
    check_bits(bits)
    return math.ceil(n_values * bits / 8)


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
        raise ValueError(
            f"codes must be an integer tensor; got "
            f"{codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__}."
        )
    if codes.numel():
        lo, hi = codes.min().item(), codes.max().item()  # Python ints: uint8 tensors cannot compare to 256
        if lo < 0 or hi >= 2**bits:
            raise ValueError(f"codes must lie in [0, {2**bits}) for bits={bits}; got values in [{lo}, {hi}].")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of any shape (values in [0, 2^bits)) -> uint8 [ceil(numel · bits / 8)]."""
    _check_codes(codes, bits)
    flat = codes.reshape(-1)
    n = flat.numel()
    if bits == 8:
        return flat.to(torch.uint8).clone()
    # 8 values make `bits` whole bytes: build each 8-value chunk as one integer of 8·bits ≤ 32 bits.
    word_dtype = torch.int32 if bits <= 3 else torch.int64  # 8 values = 8·bits bits must fit, sign bit spare
    flat = torch.nn.functional.pad(flat.to(word_dtype), (0, -n % 8))
    shifts = torch.arange(8, device=flat.device, dtype=word_dtype) * bits
    words = (flat.view(-1, 8) << shifts).sum(1, dtype=word_dtype)  # [n_chunks]
    data = (words[:, None] >> (torch.arange(bits, device=flat.device, dtype=word_dtype) * 8)) & 0xFF  # [n_chunks, bits]
    return data.to(torch.uint8).reshape(-1)[: packed_bytes(n, bits)]


def unpack(data: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of `pack`: uint8 [n_bytes] -> codes uint8 of `shape`."""
    check_bits(bits)
    shape = tuple(shape)
    n = math.prod(shape)
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"packed data must be a 1-D uint8 tensor; got {tuple(data.shape)} {data.dtype}.")
    if data.numel() != packed_bytes(n, bits):
        raise ValueError(
            f"{data.numel()} packed bytes do not hold {n} values of {bits} bits "
            f"(shape {shape}); expected {packed_bytes(n, bits)} bytes."
        )
    if bits == 8:
        return data.reshape(shape).clone()
    if bits in (2, 4):  # fast path: whole values per byte, shift and mask uint8 directly
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, device=data.device, dtype=torch.uint8) * bits
        codes = (data[:, None] >> shifts) & (2**bits - 1)
        return codes.reshape(-1)[:n].reshape(shape)
    # 3 bits, fast path: 8 values from each 3 bytes with uint8 shifts (values 2 and 5 straddle bytes)
    data = torch.nn.functional.pad(data, (0, -data.numel() % 3))
    b0, b1, b2 = data.view(-1, 3).unbind(1)
    codes = (
        torch.stack([b0, b0 >> 3, (b0 >> 6) | (b1 << 2), b1 >> 1, b1 >> 4, (b1 >> 7) | (b2 << 1), b2 >> 2, b2 >> 5], 1)
        & 7
    )
    return codes.reshape(-1)[:n].reshape(shape)


def _unpack_stream(data: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """General unpacking through 8-value chunks (any bits): the plain reference for the fast paths."""
    word_dtype = torch.int32 if bits <= 3 else torch.int64  # 8 values = 8·bits bits must fit, sign bit spare
    data = torch.nn.functional.pad(data.to(word_dtype), (0, -data.numel() % bits))
    shifts = torch.arange(8, device=data.device, dtype=word_dtype)
    words = (data.view(-1, bits) << (shifts[:bits] * 8)).sum(1, dtype=word_dtype)  # [n_chunks]
    codes = (words[:, None] >> (shifts * bits)) & (2**bits - 1)
    return codes.reshape(-1)[:n].to(torch.uint8)


# --- int32 words along one dimension (AutoGPTQ's qweight / qzeros) -----------------------------------


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack a 2-D code matrix along `dim` into int32 words: 32 values -> `bits` words.

    codes [rows, cols] with dim=0 -> int32 [rows · bits / 32, cols]  (qweight: codes are [in, out])
                        dim=1 -> int32 [rows, cols · bits / 32]  (qzeros: [n_groups, out])
    The length along `dim` must be a multiple of 32 (AutoGPTQ's requirement, so words never mix rows).
    """
    _check_codes(codes, bits)
    if codes.dim() != 2 or codes.shape[dim] % 32:
        raise ValueError(
            f"pack_int32 needs a 2-D code matrix whose size along dim {dim} is a multiple of 32; "
            f"got shape {tuple(codes.shape)}."
        )
    lines = codes.movedim(dim, 1).contiguous()  # [other, length]: pack each line on its own
    data = pack(lines, bits).view(lines.shape[0], -1)  # each line fills whole words: no padding between
    words = data.view(lines.shape[0], -1, 4).to(torch.int64)  # bytes -> little-endian 32-bit words
    words = (words << torch.tensor([0, 8, 16, 24], device=words.device)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # same bits, signed
    return words.movedim(1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int, length: int) -> torch.Tensor:
    """Inverse of pack_int32: int32 words -> uint8 codes with `length` values along `dim`."""
    check_bits(bits)
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"expected a 2-D int32 tensor of packed words; got {tuple(words.shape)} {words.dtype}.")
    if words.shape[dim] * 32 != length * bits:
        raise ValueError(f"{words.shape[dim]} int32 words along dim {dim} do not hold {length} values of {bits} bits.")
    lines = words.movedim(dim, 1).to(torch.int64) & 0xFFFFFFFF  # [other, n_words], unsigned
    data = (lines[..., None] >> torch.tensor([0, 8, 16, 24], device=words.device)) & 0xFF
    data = data.to(torch.uint8).reshape(-1)
    codes = unpack(data, bits, (lines.shape[0], length))
    return codes.movedim(1, dim).contiguous()
