"""Triton for labkit's kernels: imported with labkit.kernels where it is installed, optional elsewhere.

Kernel modules import `triton.language as tl` as every Triton file does (guarded: triton is a
dependency on Linux only; without it the torch references still work and a Triton launch says how
to install it), and decorate each kernel with `jit` below, which hands the function to `triton.jit`
at the kernel's first launch.

When Triton chooses between compiling for the GPU and its CPU interpreter: `triton.jit` reads
TRITON_INTERPRET, and `import triton.language` already applies `triton.jit` to Triton's own library
functions (tl.sum, tl.max, tl.sigmoid, ...; checked on Triton 3.9). So the choice is made when
triton is first imported, and TRITON_INTERPRET=1 must be set before that: before importing
labkit.kernels (lessons 09 and 10 set it in their first cell, tests/conftest.py for the tests). A
launch after the variable changed gets a clear error here rather than Triton's "Cannot call
@triton.jit'd outside of the scope of a kernel".

    available()     is triton importable?
    interpreted()   do the kernels run in Triton's interpreter?
    device()        where backend="triton" needs its tensors here: "cpu" (interpreter) or "cuda"
    resolve_backend(backend, where, *tensors)  "auto" | "triton" | "torch" -> "triton" | "torch"
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

BACKENDS = ("auto", "triton", "torch")


def available() -> bool:
    """True if triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")  # as Triton reads it


def interpreted() -> bool:
    """True if Triton runs kernels in its CPU interpreter: how triton.language was imported (with
    TRITON_INTERPRET set or not); before triton is imported, what TRITON_INTERPRET says now."""
    language = sys.modules.get("triton.language")
    if language is None:
        return _env_interpret()
    return type(language.sum).__name__ == "InterpretedFunction"  # a JITFunction when compiling for GPUs


def device() -> torch.device:
    """Where backend="triton" needs its tensors in this process: the CPU in Triton's interpreter, else CUDA.
    Lessons build small examples on the CPU; on a GPU (no interpreter) they move them here before a launch."""
    return torch.device("cpu" if interpreted() else "cuda")


def load():
    """Import triton (a clear error if it is missing, or if TRITON_INTERPRET changed since triton was
    imported); returns the triton module."""
    try:
        import triton
    except ImportError as err:
        raise ImportError(
            "The Triton backend needs the `triton` package: `pip install triton` (Linux; on a CPU "
            "machine also set TRITON_INTERPRET=1, before importing labkit.kernels, to run its "
            "interpreter). Or use backend='torch'."
        ) from err
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4: what triton.jit decides now
    now = bool(knobs.runtime.interpret) if knobs is not None else _env_interpret()
    if now != interpreted():
        raise RuntimeError(
            f"TRITON_INTERPRET is {'on' if now else 'off'} now but was {'on' if interpreted() else 'off'} "
            f"when triton was imported, and Triton cannot mix its interpreter with GPU compilation. Set "
            f"TRITON_INTERPRET before importing labkit.kernels (or triton), e.g. in a notebook's first "
            f"cell, and restart the process."
        )
    return triton


class _LazyKernel:
    """A kernel function that becomes `triton.jit(fn)` at its first launch: `kernel[grid](...)`.
    `.fn` is the plain Python function (as on Triton's own JITFunction)."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._jitted = None

    def __getitem__(self, grid):
        if self._jitted is None:
            self._jitted = load().jit(self.fn)
        return self._jitted[grid]


def device_function(fn):
    """`triton.jit` for a function that kernels call rather than launch (Triton compiles it into each
    caller; a kernel can also receive one as a tl.constexpr argument). Decorated when labkit.kernels is
    imported, which is when `import triton.language` makes Triton's own interpreter-or-GPU choice anyway;
    without triton, the plain function (no kernel can run then)."""
    if not available():
        return fn
    import triton

    return triton.jit(fn)


def jit(fn) -> _LazyKernel:
    """Use as `@jit` on a kernel in place of `@triton.jit` (same body; `triton.jit` at first launch).

    Kernel modules need `from __future__ import annotations`, so that `BLOCK: tl.constexpr` stays a
    string (the module imports, and Triton recognises constexpr parameters from that string, also
    when triton is missing and `tl` is None)."""
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
            f"triton is imported (before importing labkit.kernels), in a fresh process."
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
