"""What a pruned matrix really costs to store, in each sparse format.

Zeros are free only if the format can skip them, and every format pays for saying WHERE the
kept values are:

    dense     all values, zeros included                      numel · b
    bitmask   1 bit per position + the nonzero values         ⌈numel / 8⌉ + nnz · b
    csr       values + a column index per value + row starts  nnz · (b + i) + (rows + 1) · p
              (i = 2 bytes: int16 indices when in_features ≤ 32,768, else 4; p = 4 bytes: int32)
    2:4       half the values + a 2-bit position per value    numel/2 · b + ⌈numel/2 · 2 / 8⌉
              (NVIDIA's semi-structured layout; torch's to_sparse_semi_structured keeps the same
               2 bits per kept value as int16 metadata for 16-bit values)

(b = bytes per value.) At 50% sparsity in fp16, CSR with int16 indices saves nothing, the bitmask
saves 44% and 2:4 saves 44%; at fp32 every format saves more, because the overhead is fixed.

SparseLinear holds one of these representations as its only tensors, so `stored_bytes()` is
the size of what it holds, and labkit.evaluate.weight_bytes counts it. Its forward rebuilds the
dense weight and calls F.linear: the outputs equal the dense pruned layer's exactly, and there
is no speed-up (that needs a sparse kernel; see semi_structured_speed).
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.nn import functional as F

from ..evaluate import tensor_bytes
from ..transform import all_or_nothing, check_model
from .masks import nm_mask, weight_linears

FORMATS = ("dense", "bitmask", "csr", "2:4")


# --- byte counts, from the formulas ---------------------------------------------------------


def dense_bytes(weight: torch.Tensor) -> int:
    """numel · bytes per value: zeros cost as much as any other value."""
    return weight.numel() * weight.element_size()


def bitmask_bytes(weight: torch.Tensor) -> int:
    """A 1-bit-per-position mask (packed in bytes) plus the nonzero values."""
    nnz = int((weight != 0).sum())
    return math.ceil(weight.numel() / 8) + nnz * weight.element_size()


def csr_index_bytes(in_features: int) -> int:
    """Bytes per column index: int16 holds indices < 32,768, int32 the rest."""
    return 2 if in_features <= 2**15 else 4


def csr_bytes(weight: torch.Tensor) -> int:
    """Compressed sparse rows: nonzero values, one column index each, and rows + 1 int32 row starts.

    weight: [rows, columns]"""
    rows, columns = weight.shape
    nnz = int((weight != 0).sum())
    return nnz * (weight.element_size() + csr_index_bytes(columns)) + (rows + 1) * 4


def semi_structured_bytes(weight: torch.Tensor) -> int:
    """2:4 layout: the 2 kept values of every group of 4, plus a 2-bit position for each of them.

    weight: [rows, columns] with at most 2 nonzeros in each group of 4 consecutive columns."""
    check_2to4(weight)
    kept = weight.numel() // 2
    return kept * weight.element_size() + math.ceil(kept * 2 / 8)


def storage_bytes(weight: torch.Tensor, format: str) -> int:
    """Bytes to store `weight` in `format` (one of FORMATS)."""
    counters = {"dense": dense_bytes, "bitmask": bitmask_bytes, "csr": csr_bytes, "2:4": semi_structured_bytes}
    if format not in counters:
        raise ValueError(f"format={format!r}: allowed formats are {FORMATS}.")
    return counters[format](weight)


def check_2to4(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise unless every group of 4 consecutive input weights of each row has at most 2 nonzeros."""
    rows, columns = weight.shape
    if columns % 4:
        raise ValueError(f"{name}: the 2:4 layout needs in_features divisible by 4; got {columns}.")
    per_group = (weight != 0).reshape(rows, columns // 4, 4).sum(2)  # [rows, groups]
    if (per_group > 2).any():
        r, g = (per_group > 2).nonzero()[0].tolist()
        raise ValueError(
            f"{name} is not 2:4 sparse: row {r}, columns {4 * g}..{4 * g + 3} hold "
            f"{int(per_group[r, g])} nonzeros. Prune it with pattern='2:4' first."
        )


# --- packing small integers into bytes --------------------------------------------------------


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers < 2**bits (bits in 1, 2, 4), little end first: [n] -> uint8 [⌈n · bits / 8⌉]."""
    per_byte = 8 // bits
    values = values.flatten().to(torch.uint8)
    values = F.pad(values, (0, (-values.numel()) % per_byte)).reshape(-1, per_byte)
    shifts = torch.arange(per_byte, device=values.device, dtype=torch.uint8) * bits
    return (values << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [⌈n · bits / 8⌉] -> uint8 [n]."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    return ((packed[:, None] >> shifts) & (2**bits - 1)).flatten()[:n]


# --- encoding and decoding ---------------------------------------------------------------------


def encode(weight: torch.Tensor, format: str) -> dict[str, torch.Tensor]:
    """The tensors that store `weight` [rows, columns] in `format`."""
    weight = weight.detach()
    rows, columns = weight.shape
    if format == "dense":
        return {"values": weight.clone()}
    if format == "bitmask":
        nonzero = weight != 0
        return {"mask": pack_bits(nonzero, 1), "values": weight[nonzero]}  # values in row-major order
    if format == "csr":
        nonzero = weight != 0
        index_dtype = torch.int16 if csr_index_bytes(columns) == 2 else torch.int32
        counts = nonzero.sum(1)  # [rows]
        return {
            "values": weight[nonzero],
            "col_indices": nonzero.nonzero()[:, 1].to(index_dtype),
            "crow_indices": F.pad(counts.cumsum(0), (1, 0)).to(torch.int32),
        }  # [rows + 1]
    if format == "2:4":
        check_2to4(weight)
        groups = weight.reshape(rows, columns // 4, 4)
        # positions of the 2 kept values per group: the nonzeros first, padded with zeros' positions
        order = torch.sort((groups != 0).to(torch.uint8), dim=2, descending=True, stable=True).indices
        positions = order[..., :2].sort(dim=2).values  # [rows, groups, 2], increasing as in NVIDIA's layout
        return {"values": groups.gather(2, positions).reshape(rows, columns // 2), "positions": pack_bits(positions, 2)}
    raise ValueError(f"format={format!r}: allowed formats are {FORMATS}.")


def decode(tensors: dict[str, torch.Tensor], format: str, shape: tuple[int, int]) -> torch.Tensor:
    """The dense weight [rows, columns] back from encode's tensors."""
    rows, columns = shape
    values = tensors["values"]
    if format == "dense":
        return values
    dense = torch.zeros(rows * columns, dtype=values.dtype, device=values.device)
    if format == "bitmask":
        dense.masked_scatter_(unpack_bits(tensors["mask"], 1, rows * columns).bool(), values)  # row-major order
        return dense.reshape(rows, columns)
    if format == "csr":
        crow = tensors["crow_indices"].long()
        row_of = torch.repeat_interleave(torch.arange(rows, device=values.device), crow.diff())  # [nnz]
        dense.index_copy_(0, row_of * columns + tensors["col_indices"].long(), values)
        return dense.reshape(rows, columns)
    if format == "2:4":
        positions = unpack_bits(tensors["positions"], 2, rows * columns // 2).long()
        dense = dense.reshape(rows, columns // 4, 4)
        return dense.scatter_(2, positions.reshape(rows, -1, 2), values.reshape(rows, -1, 2)).reshape(rows, columns)
    raise ValueError(f"format={format!r}: allowed formats are {FORMATS}.")


class SparseLinear(nn.Module):
    """A linear layer whose weight is held only in a sparse format (no dense copy).

    forward(x [..., in_features]) -> [..., out_features]: rebuilds the dense weight, then F.linear,
    so it matches the dense pruned nn.Linear exactly. stored_bytes() is what its tensors occupy.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, format: str = "bitmask"):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format={format!r}: allowed formats are {FORMATS}.")
        self.format = format
        self.out_features, self.in_features = weight.shape
        for key, tensor in encode(weight, format).items():
            self.register_buffer(key, tensor)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str = "bitmask") -> SparseLinear:
        return cls(linear.weight, linear.bias, format)

    def dense_weight(self) -> torch.Tensor:  # [out_features, in_features]
        return decode(dict(self.named_buffers()), self.format, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def stored_bytes(self) -> int:
        return sum(tensor_bytes(t) for t in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format!r}"


@all_or_nothing
def to_sparse(model, format: str = "bitmask"):
    """Replace every decoder nn.Linear of `model` by a SparseLinear in `format`, in place; returns model.

    Embeddings, lm_head and norms stay as they are. With format '2:4' every decoder linear must
    already be 2:4 sparse (prune with pattern='2:4')."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: allowed formats are {FORMATS}.")
    check_model(model, "prune.to_sparse")
    linears = weight_linears(model)
    if format == "2:4":
        for name, linear in linears.items():
            check_2to4(linear.weight, name)
    for name, linear in linears.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.model.get_submodule(parent_name)
        setattr(parent, child, SparseLinear.from_linear(linear, format))
    return model


# --- 2:4 on a GPU --------------------------------------------------------------------------------


def semi_structured_unavailable(device=None) -> str | None:
    """Why torch has no 2:4 sparse matmul on `device` (default: the GPU if there is one, else the CPU), in words;
    None where it has one: CUDA with compute capability >= 8.0 (Ampere+). A Colab T4 (sm75) has no sparse
    tensor cores, and torch.sparse.to_sparse_semi_structured raises there: check this before timing."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        return "CPU: no sparse tensor cores, so a 2:4 matrix is multiplied as a dense one; the GPU profile times it."
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (
            f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}): no sparse tensor cores "
            f"(2:4 kernels need 8.0 or newer: A100, L4, H100), so a 2:4 matrix is multiplied as a dense one; "
            f"2:4 timing skipped."
        )
    return None


@torch.no_grad()
def semi_structured_speed(
    out_features: int = 4096,
    in_features: int = 4096,
    tokens: int = 2048,
    dtype=torch.float16,
    repeats: int = 50,
    device="cuda",
) -> dict[str, float]:
    """Time y = x Wᵀ with a dense W and with W in torch's 2:4 format (torch.sparse.to_sparse_semi_structured).

    Returns {"dense_ms", "sparse_ms", "speedup"}. CUDA only, compute capability ≥ 8.0 (Ampere+):
    semi_structured_unavailable() says whether this machine has it.
    Shapes should be multiples of 64; the speed-up is largest for big matmuls (prefill), and
    small at decode (1 token), where the time goes to reading weights, not multiplying.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(
            "semi_structured_speed needs an NVIDIA GPU (Ampere or newer): 2:4 matmuls run on sparse tensor "
            "cores through cuSPARSELt/CUTLASS. On a CPU torch has no 2:4 kernel, and a dense matmul over a "
            "matrix that is half zeros does all the same work, so no speed-up is expected there."
        )
    why_not = semi_structured_unavailable(device)
    if why_not is not None:
        raise RuntimeError(why_not)
    from torch.sparse import to_sparse_semi_structured

    weight = torch.randn(out_features, in_features, dtype=dtype, device=device)
    weight[nm_mask(weight.float().abs(), 2, 4)] = 0
    x = torch.randn(tokens, in_features, dtype=dtype, device=device)
    sparse = to_sparse_semi_structured(weight)
    if not torch.allclose(F.linear(x, sparse), F.linear(x, weight), rtol=1e-2, atol=1e-1):
        raise RuntimeError("the 2:4 matmul disagrees with the dense one")

    def time_ms(w):
        for _ in range(5):  # warm-up
            F.linear(x, w)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            F.linear(x, w)
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / repeats * 1e3

    dense_ms, sparse_ms = time_ms(weight), time_ms(sparse)
    return {"dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms}
