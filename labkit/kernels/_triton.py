"""Triton, imported lazily: labkit works without it, and TRITON_INTERPRET is read at first use.

Kernels in labkit.kernels are written as plain module-level functions decorated with `jit` below.
`jit` does nothing until the kernel is first launched; then it imports triton, binds `tl`
(triton.language) in the kernel's module, and hands the function to `triton.jit`. Triton decides
at that moment between compiling for the GPU and its CPU interpreter (TRITON_INTERPRET=1), so a
notebook can set the variable after `import labkit.kernels` but before the first launch.

    available()     is triton importable?
    interpreted()   do (or will) the kernels run in Triton's interpreter?
    resolve_backend(backend, where, *tensors)  "auto" | "triton" | "torch" -> "triton" | "torch"
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
_loaded: dict[str, object] = {}  # "triton", "tl", "interpret": filled by load()


def available() -> bool:
    """True if triton can be imported (without importing it)."""
    return "triton" in _loaded or importlib.util.find_spec("triton") is not None


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")  # as Triton reads it


def interpreted() -> bool:
    """True if the kernels run (or, before the first launch, will run) in Triton's CPU interpreter."""
    return bool(_loaded["interpret"]) if "interpret" in _loaded else _env_interpret()


def load():
    """Import triton once; returns (triton, triton.language)."""
    if "triton" not in _loaded:
        try:
            import triton
            import triton.language as tl
        except ImportError as err:
            raise ImportError(
                "The Triton backend needs the `triton` package: `pip install triton` (Linux; on a CPU "
                "machine also set TRITON_INTERPRET=1 to run its interpreter). Or use backend='torch'."
            ) from err
        knobs = getattr(triton, "knobs", None)  # triton >= 3.4: what triton.jit will actually decide
        interpret = knobs.runtime.interpret if knobs is not None else _env_interpret()
        _loaded.update(triton=triton, tl=tl, interpret=bool(interpret))
    return _loaded["triton"], _loaded["tl"]


class _LazyKernel:
    """A kernel function that becomes `triton.jit(fn)` at its first launch: `kernel[grid](...)`."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._jitted = None

    def __getitem__(self, grid):
        if self._jitted is None:
            triton, tl = load()
            # The kernel body refers to `tl` as a global of its module (as in every Triton file).
            self.fn.__globals__["tl"] = tl
            self._jitted = triton.jit(self.fn)
        return self._jitted[grid]


def jit(fn) -> _LazyKernel:
    """Use as `@jit` on a kernel in place of `@triton.jit` (same body, `tl` bound at first launch).

    Kernel modules need `from __future__ import annotations`, so that `BLOCK: tl.constexpr` is a
    string until Triton reads it (Triton recognises constexpr parameters from that string)."""
    return _LazyKernel(fn)


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def resolve_backend(backend: str, where: str, *tensors: torch.Tensor) -> str:
    """Choose the implementation for `where` (a function name, for error messages).

    "auto": Triton when the tensors are on a CUDA device, triton is installed and not in interpreter
    mode; else torch ("auto" never picks the slow interpreter: ask for backend="triton" explicitly).
    "triton": CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; anything else is a clear error.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{where}: backend={backend!r}; choose one of {BACKENDS}.")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and available() and not interpreted() else "torch"
    if not available():
        load()  # raises the ImportError that says how to install triton
    if not on_cuda and not interpreted():
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(
            f"{where}: backend='triton' got tensors on {', '.join(devices)}, but Triton compiles for a "
            f"CUDA GPU. Move the tensors to 'cuda', use backend='torch' (or 'auto'), or, to run the "
            f"kernel on CPU in Triton's interpreter (slow; for tests), set TRITON_INTERPRET=1 before "
            f"the first Triton kernel is launched in this process."
        )
    return "triton"


def check_contiguous(where: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(
                f"{where}: {name} must be contiguous (got strides {tuple(t.stride())} for shape "
                f"{tuple(t.shape)}); call .contiguous() first. The kernels compute addresses "
                f"from the shape alone."
            )


def check_float(where: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{where}: {name} must be float16, bfloat16 or float32; got {t.dtype}.")


def compute_in_fp32(dtype: torch.dtype) -> bool:
    """bf16 arithmetic is wrong in Triton's interpreter (3.9): upcast bf16 inputs there, not on GPU."""
    return dtype == torch.bfloat16 and interpreted()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 ("ieee") for fp32 inputs, so fp32 results match torch;
    "tf32" is Triton's default and is ignored for fp16/bf16 inputs (tensor cores, fp32 accumulate)."""
    return "ieee" if dtype == torch.float32 or compute_in_fp32(dtype) else "tf32"
