"""Counting what the ranks send each other: every collective and point-to-point call of
labkit.parallel goes through these wrappers, which log the operation, its payload and its time."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommLog:
    """Operations of one rank: (op, payload bytes, seconds). Payload = the tensor's bytes; what a
    ring all-reduce really puts on the wire per rank is 2 (W - 1) / W times that (ring_bytes)."""

    ops: list[tuple[str, int, float]] = field(default_factory=list)

    def add(self, op: str, t: torch.Tensor, seconds: float) -> None:
        self.ops.append((op, t.numel() * t.element_size(), seconds))

    def clear(self) -> None:
        self.ops.clear()

    def count(self, op: str | None = None) -> int:
        return sum(1 for o, _, _ in self.ops if op in (None, o))

    def bytes(self, op: str | None = None) -> int:
        return sum(b for o, b, _ in self.ops if op in (None, o))

    def seconds(self, op: str | None = None) -> float:
        return sum(s for o, _, s in self.ops if op in (None, o))

    def summary(self) -> dict:
        return {
            op: {"calls": self.count(op), "bytes": self.bytes(op), "seconds": self.seconds(op)}
            for op in sorted({o for o, _, _ in self.ops})
        }


def ring_bytes(payload: int, world_size: int) -> float:
    """Bytes each rank sends in a ring all-reduce of `payload` bytes: a reduce-scatter and an
    all-gather, each W - 1 steps of payload / W (Patarasuk & Yuan, 2009)."""
    return 2 * (world_size - 1) / world_size * payload


def _timed(log: CommLog | None, op: str, t: torch.Tensor, fn):
    start = time.perf_counter()
    fn()
    if log is not None:
        log.add(op, t, time.perf_counter() - start)
    return t


def all_reduce(t: torch.Tensor, log: CommLog | None = None, group=None) -> torch.Tensor:
    """Sum `t` over the ranks, in place (every rank ends with the same sum)."""
    return _timed(log, "all_reduce", t, lambda: dist.all_reduce(t, group=group))


def send(t: torch.Tensor, dst: int, log: CommLog | None = None) -> None:
    _timed(log, "send", t, lambda: dist.send(t.contiguous(), dst))


def recv(t: torch.Tensor, src: int, log: CommLog | None = None) -> torch.Tensor:
    """Receive into the pre-allocated `t` (the receiver must know the shape and dtype)."""
    return _timed(log, "recv", t, lambda: dist.recv(t, src))
