"""The number of CPU threads torch uses, set for a block of code by its caller and restored after it.

    from labkit.threads import num_threads
    with num_threads(1):   # e.g. GPTQ's column loop: tiny operations that threads only slow down
        ...

torch's thread count is process-wide: a library call does not change it behind its caller's back.
Functions that run faster or more reproducibly on a given count take a documented `threads=` option
and apply it with this context for the duration of the call only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch.set_num_threads(n), then restore the previous count (also on error).

    n: a positive number of threads, or None to leave torch's setting as it is.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"threads={n!r}: need a positive number of CPU threads, or None to leave torch's setting.")
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


__all__ = ["num_threads"]
