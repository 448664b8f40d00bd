"""Start `world_size` processes that form one torch.distributed group, run a function in each,
and return rank 0's result: the launcher every parallel demo of the course goes through.

    result = launch(parallel.tensor_parallel_forward, 2, folder, ids)

Each rank is its own process, as with torchrun: it shares no memory with the others, joins the
group through a TCP rendezvous on a free local port, and calls `fn(rank, world_size, *args)`.
The processes are forked from a clean "fork server" that imported torch and transformers once
(where the OS has fork; elsewhere each rank is a fresh interpreter, "spawn"). `fn` must be
importable (defined in a module, not in a notebook cell): a rank finds it by module and name.

Shutdown is always clean: when a rank raises, exits without reporting (killed, out of memory) or
the time runs out, the other ranks are terminated (they may be blocked in a collective waiting
for the failed one) and `RankFailed` names the rank and carries its traceback. No rank process
is left behind (the fork server itself lives until the Python process that started it exits).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback

import numpy as np
import torch


class RankFailed(RuntimeError):
    """A rank raised, died, or did not finish in time; `.rank` says which (None: several)."""

    def __init__(self, message: str, rank: int | None):
        super().__init__(message)
        self.rank = rank


def free_port() -> int:
    """A TCP port that is free now (the OS picks it); used at once for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    # NCCL moves tensors GPU to GPU (one GPU per rank); gloo runs collectives on CPU tensors.
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 1 else "gloo"


def launch(
    fn,
    world_size: int,
    *args,
    backend: str | None = None,
    timeout: float = 120.0,
    threads_per_rank: int = 1,
    return_all: bool = False,
):
    """Run fn(rank, world_size, *args) in `world_size` new processes; return rank 0's result
    (return_all=True: the list of every rank's result, by rank).

    backend: "gloo" (CPU tensors) or "nccl" (rank r uses cuda:r); default: nccl with several GPUs.
    timeout: seconds for the whole run, start-up included. The collectives' own timeout is a few seconds
        longer, so that a hang is reported here, naming the ranks that had not finished.
    threads_per_rank: torch threads in each rank (ranks share the machine's cores).
    Results cross the process boundary as plain data: tensors travel as NumPy arrays (copied, so
    a rank may exit as soon as it has reported) and come back as tensors.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}: need an integer >= 1 (the number of ranks).")
    backend = backend or default_backend()
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: allowed are 'gloo' (CPU) and 'nccl' (one GPU per rank).")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"backend='nccl' with world_size={world_size} needs {world_size} GPUs; "
            f"{torch.cuda.device_count()} visible. Use backend='gloo' or fewer ranks."
        )
    if timeout <= 0:
        raise ValueError(f"timeout={timeout}: need a positive number of seconds.")
    _check_importable(fn)
    ctx = _context()
    reports = ctx.Queue()
    address = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        ctx.Process(
            target=_rank_main,
            daemon=True,
            name=f"labkit-rank-{rank}",
            args=(
                fn,
                rank,
                world_size,
                args,
                address,
                backend,
                timeout + COLLECTIVE_GRACE,
                threads_per_rank,
                return_all or rank == 0,
                reports,
            ),
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout  # before any rank starts: no rank's collective can outlast it
    for p in procs:
        p.start()
    try:
        results = _collect(procs, reports, world_size, deadline, timeout)
        return results if return_all else results[0]
    finally:
        _stop(procs)
        reports.close()
        reports.join_thread()


# Seconds the collectives wait beyond the run's timeout: the launcher's own deadline comes first.
COLLECTIVE_GRACE = 5.0


def _check_importable(fn) -> None:
    """The ranks find `fn` by module and name: a lambda, a nested function or a function defined in a
    notebook cell cannot be found, and would only fail inside every rank."""
    name, module = getattr(fn, "__qualname__", ""), getattr(fn, "__module__", None)
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not callable(fn) or "<" in name or module is None or (module == "__main__" and main_file is None):
        raise ValueError(
            f"fn={fn!r}: the ranks must be able to import it, so it has to be a function defined at "
            f"the top level of a module (a .py file), not a lambda, a nested function or a notebook cell."
        )


# Modules every rank needs, imported once by the fork server instead of once per rank and launch.
PRELOAD = ["labkit.parallel", "transformers.models.llama.modeling_llama"]


def _context():
    """A "forkserver" context where the OS has fork (a clean server process, started at the first
    launch, imports torch and transformers once; each rank is forked from it in milliseconds),
    else "spawn" (each rank a new interpreter, as torchrun does)."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return mp.get_context("spawn")


def _collect(procs, reports, world_size, deadline, timeout):
    results, silent_since = {}, {}
    while len(results) < world_size:
        try:
            kind, rank, payload = reports.get(timeout=0.1)
        except queue.Empty:
            now = time.monotonic()
            for rank, p in enumerate(procs):
                if rank in results or p.exitcode is None:
                    continue
                # Exited without a report (its report may still be in the pipe: wait a second).
                if now - silent_since.setdefault(rank, now) > 1.0:
                    raise RankFailed(
                        f"rank {rank} of {world_size} exited with code {p.exitcode} without "
                        f"reporting: killed by a signal, out of memory, or failed before it started (a "
                        f"script that calls launch must do so under `if __name__ == '__main__':`, "
                        f"because each rank imports the main module again). Its stderr has details.",
                        rank,
                    ) from None
            if now > deadline:
                missing = sorted(set(range(world_size)) - set(results))
                raise RankFailed(
                    f"timed out after {timeout:g} s: rank(s) {missing} of {world_size} had not "
                    f"finished (a hang, e.g. a collective that another rank never entered?). "
                    f"All ranks were stopped; raise `timeout` if the work is only slow.",
                    missing[0] if len(missing) == 1 else None,
                ) from None
            continue
        if kind == "error":
            raise RankFailed(f"rank {rank} of {world_size} failed:\n{payload}", rank)
        results[rank] = _from_numpy(payload)
    return [results[r] for r in range(world_size)]


def _stop(procs) -> None:
    """Give the ranks a moment to exit; terminate the rest (SIGTERM, then SIGKILL); reap them all."""
    deadline = time.monotonic() + 1.0
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join()


def _rank_main(fn, rank, world_size, args, address, backend, timeout, threads, keep_result, reports):
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, init_method=address, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout)
        )
        result = fn(rank, world_size, *args)
        reports.put(("ok", rank, _to_numpy(result) if keep_result else None))
        dist.barrier()  # nobody leaves while another rank may still talk to it
    except BaseException:
        reports.put(("error", rank, traceback.format_exc()))
    finally:
        # Flush the report *before* leaving the group: leaving makes the other ranks' collectives
        # fail, and their (secondary) errors must not reach the parent first.
        reports.close()
        reports.join_thread()
        if dist.is_initialized():
            dist.destroy_process_group()


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        return ("tensor", (t.float() if t.dtype == torch.bfloat16 else t).numpy(), str(t.dtype))
    if isinstance(x, dict):
        return {k: _to_numpy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_numpy(v) for v in x)
    return x


def _from_numpy(x):
    if isinstance(x, tuple) and len(x) == 3 and x[0] == "tensor" and isinstance(x[1], np.ndarray):
        return torch.from_numpy(x[1]).to(getattr(torch, x[2].removeprefix("torch.")))
    if isinstance(x, dict):
        return {k: _from_numpy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_from_numpy(v) for v in x)
    return x
