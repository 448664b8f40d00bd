"""What every function that changes a model shares: check first, change all or nothing, label the result.

    @all_or_nothing
    def rtn(model, bits, ...):
        check_model(model, "quant.rtn")             # a Llama with real (not meta), finite weights, not yet quantized
        ...check every other argument and every layer, then change the model...
        record(model, "RTN", "W4 g32", "quantize")  # labkit.transform.history(model) tells what was done

Pruning then quantizing is allowed (lesson 12: SparseGPT 2:4, then GPTQ with keep_zeros); anything after a
quantization is refused with a message, since the weights are then codes, not the float weights a method expects.

`all_or_nothing` restores the model when the call raises, at any point (an interrupt included): every module's
attributes (submodules, parameters, buffers, sizes), each parameter's and buffer's tensor, and the config. This
works because labkit's transforms never write into a tensor the model already holds: they install new tensors
(`replace_data`) or new modules (`models.set_module`). What is kept for the restore:
- tensors in CPU memory: a reference (no copy). A call that rewrites every decoder weight (Wanda, SparseGPT,
  GPTQ with pack=False) holds the old CPU weights beside the new ones until it returns: small on the CPU
  profile (0.5 GB);
- tensors on an accelerator: nothing at first; when one is replaced (`replace_data`, or its module replaced by
  `models.set_module`), its old values are copied to CPU memory and its accelerator memory is freed, so GPU
  memory is not doubled (a 7B model's 13.5 GB would not fit twice on an L4). The restore copies them back.

`undone(model)` keeps the same for a block of code and always restores: try a compression, measure it, go back
(lesson 12), without a second copy of the model. Nested calls share one CPU copy of each parked tensor.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import models
from .models import check_llama, decoder_layers


@dataclass(frozen=True)
class Compression:
    """One thing done to a model: the method and its setting, e.g. Compression("RTN", "W4 g32")."""

    method: str
    setting: str
    kind: str  # "prune" | "quantize" | "lowrank" | "smooth" (SmoothQuant's equivalent rescaling)


ATTRIBUTE = "labkit_compression"  # a list of Compression on the model (survives copy.deepcopy and .to())


def history(model: nn.Module) -> list[Compression]:
    """What labkit did to `model`, in order (empty for a model as loaded)."""
    return list(getattr(model, ATTRIBUTE, []))


def record(model: nn.Module, method: str, setting: str, kind: str) -> None:
    """Append what was done (a new list each time, so all_or_nothing's snapshot restores the old one)."""
    setattr(model, ATTRIBUTE, [*history(model), Compression(method, setting, kind)])


def describe_history(model: nn.Module) -> str:
    done = history(model)
    return ", then ".join(f"{c.method} {c.setting}".strip() for c in done) if done else "nothing"


def refuse_after(model: nn.Module, where: str, kinds: tuple[str, ...]) -> None:
    """Refuse to compress a model that already had one of `kinds` done to it.

    A quantized model's linears hold codes, not float weights: quantizing or pruning it again would
    either change nothing or quantize the rounding of a rounding. Pruning then quantizing is fine (lesson 12:
    SparseGPT 2:4, then GPTQ with keep_zeros)."""
    done = [c for c in history(model) if c.kind in kinds]
    if done:
        raise ValueError(
            f"{where}: the model was already compressed ({describe_history(model)}), and this method does not "
            f"apply to a {done[0].kind}d model: its weights are no longer the float weights it expects. Start "
            f"from the float model (labkit.models.load, or a copy.deepcopy made before the first compression)."
        )
    packed = sorted({type(m).__name__ for layer in decoder_layers(model) for m in layer.modules() if _is_packed(m)})
    if packed and "quantize" in kinds:
        raise ValueError(
            f"{where}: the model's decoder layers already hold packed (quantized or sparse) modules "
            f"({', '.join(packed)}); labkit quantizes a float model, once. Start from the float model "
            f"(labkit.models.load)."
        )


def _is_packed(module: nn.Module) -> bool:
    """A module that stores its weight as integer codes or bits (QuantLinear, NF4Linear, Int8Linear, W4A16Linear,
    SparseLinear): it holds integer buffers of its own."""
    return any(b.dtype in (torch.uint8, torch.int8, torch.int32) for b in module.buffers(recurse=False))


def check_model(model: nn.Module, where: str, after: tuple[str, ...] = ("quantize",)) -> None:
    """Before a transform changes anything: a Llama with real, finite weights, not already compressed by one of
    `after` (kinds of labkit.transform.Compression)."""
    check_llama(model, where)
    check_data(model, where)
    refuse_after(model, where, after)


def check_data(model: nn.Module, where: str, finite: bool = True) -> None:
    """Refuse a model whose weights are not real data (the meta device) or, with finite=True, hold NaN or inf.

    Names the first offending tensor, so that the error points at the layer, before anything changes."""
    for name, p in model.named_parameters():
        if p.is_meta:
            raise ValueError(
                f"{where} needs the model's weights, but {name} is on the meta device (shapes only, no data). "
                f"Load the model on 'cpu' or 'cuda' (labkit.models.load(name, device=...))."
            )
    if finite:
        for name, p in model.named_parameters():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise ValueError(
                    f"{where}: {name} holds non-finite values (NaN or inf); the model is left unchanged. "
                    f"Reload it (labkit.models.load) or find the step that produced them."
                )


def check_count(value, name: str, example: int = 8) -> int:
    """A positive integer argument (a batch size, a number of steps or columns); bool is not a count."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r}: need a positive integer, e.g. {example}.")
    return int(value)


def check_damping(value, name: str = "percdamp") -> float:
    """A finite, non-negative dampening fraction (λ = percdamp · mean(diag H))."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
        raise ValueError(f"{name}={value!r}: need a finite non-negative fraction of mean(diag H), e.g. 0.01.")
    return float(value)


def _parked(t: torch.Tensor) -> bool:
    """Kept for a restore as a CPU copy made when it is replaced (accelerator memory), not as a reference.

    Any device but CPU memory and meta; `cpu:1` counts as an accelerator, since labkit.rehearsal uses it as
    the stand-in GPU (real CPU tensors are on `cpu`, index None)."""
    if t.device.type == "meta":
        return False
    return t.device.type != "cpu" or (t.device.index or 0) > 0


class _Journal:
    """What an all_or_nothing call (or an `undone` block) parked in CPU memory: the old values of replaced
    accelerator tensors.

    referenced: ids of the tensors whose old data the snapshot holds already (CPU tensors at the start): not
    parked again when a walk has moved them to the GPU meanwhile. devices: where each tensor was at the start,
    where a restore puts it back (a CPU model walked on a GPU goes back to the CPU)."""

    def __init__(self, referenced: set[int] = frozenset(), devices: dict[int, torch.device] | None = None):
        self.tensors: dict[int, tuple[torch.Tensor, torch.Tensor, torch.device]] = {}
        self.referenced, self.devices = referenced, devices or {}

    def wants(self, t: torch.Tensor) -> bool:  # the first replacement of an accelerator tensor it does not hold
        return _parked(t) and id(t) not in self.tensors and id(t) not in self.referenced

    def restore(self) -> None:
        with torch.no_grad():
            for t, old, device in self.tensors.values():
                t.data = old.to(device)


_journals: list[_Journal] = []  # one per all_or_nothing call in progress (they may nest)


def _park(t: torch.Tensor) -> None:
    """Give each journal in progress that needs them the old values of `t`, copied to CPU memory once (nested
    calls share the copy)."""
    saved = None
    for journal in _journals:
        if journal.wants(t):
            saved = t.data.to("cpu", copy=True) if saved is None else saved
            journal.tensors[id(t)] = (t, saved, journal.devices.get(id(t), t.device))


def replace_data(tensor: torch.Tensor, new: torch.Tensor) -> None:
    """Give `tensor` (a parameter or buffer of the model) the values `new`, in a new storage.

    Never written in place, so that all_or_nothing can put the old storage back."""
    _park(tensor)
    tensor.data = new.to(tensor.dtype)


def _module_replaced(old: nn.Module, new: nn.Module) -> None:
    """`old` leaves the model: its accelerator tensors are parked, then emptied, except those `new` still holds
    (a bias passed on, or a base layer that a LoRA wrapper keeps)."""
    kept = {id(t) for t in [*new.parameters(), *new.buffers()]}
    for t in [*old.parameters(), *old.buffers()]:
        if _parked(t) and id(t) not in kept:
            _park(t)
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)  # frees its accelerator memory


def _snapshot(model: nn.Module):
    modules = []
    for module in model.modules():
        state = dict(module.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):
            state[key] = dict(module.__dict__[key])
        modules.append((module, state))
    tensors = [t for module, _ in modules for t in [*module._parameters.values(), *module._buffers.values()]]
    config = copy.deepcopy(model.config.__dict__) if hasattr(model, "config") else None
    return modules, [(t, t.data) for t in tensors if t is not None and not _parked(t)], config


def _start_devices(snapshot) -> tuple[set[int], dict[int, torch.device]]:
    """For the journal: the ids of the tensors the snapshot holds, and every tensor's device at the start."""
    modules, referenced, _ = snapshot
    tensors = [t for module, _ in modules for t in [*module._parameters.values(), *module._buffers.values()]]
    return {id(t) for t, _ in referenced}, {id(t): t.device for t in tensors if t is not None}


def _restore(model: nn.Module, snapshot) -> None:
    modules, tensors, config = snapshot
    for module, state in modules:
        for key in ("_parameters", "_buffers", "_modules"):
            module.__dict__[key].clear()
            module.__dict__[key].update(state[key])
        for key in [k for k in module.__dict__ if k not in state]:
            del module.__dict__[key]
        module.__dict__.update({k: v for k, v in state.items() if k not in ("_parameters", "_buffers", "_modules")})
    with torch.no_grad():
        for t, data in tensors:
            t.data = data
    if config is not None:
        model.config.__dict__.clear()
        model.config.__dict__.update(config)


def _begin(model: nn.Module):
    """Start keeping what a restore of `model` needs: (snapshot, journal)."""
    snapshot = _snapshot(model)
    journal = _Journal(*_start_devices(snapshot))
    _journals.append(journal)
    if _module_replaced not in models.before_replace:
        models.before_replace.append(_module_replaced)
    return snapshot, journal


def _end(journal: _Journal) -> None:
    _journals.remove(journal)
    if not _journals:
        models.before_replace.remove(_module_replaced)


def all_or_nothing(transform):
    """Decorate a function `transform(model, ...)` that changes `model`: if it raises, the model is put back
    exactly as it was (same modules, same tensors, same config) before the error propagates."""

    @functools.wraps(transform)
    def wrapper(model, *args, **kwargs):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{transform.__qualname__}: model must be a torch.nn.Module; got {type(model).__name__}.")
        snapshot, journal = _begin(model)
        try:
            return transform(model, *args, **kwargs)
        except BaseException:
            _restore(model, snapshot)
            journal.restore()
            raise
        finally:
            _end(journal)

    return wrapper


@contextlib.contextmanager
def undone(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block that changes `model` with labkit's transforms, then put the model back exactly as it was
    (same modules, tensors, config and history), also when the block raises. To try a compression, measure
    it and go back without a second copy of the model (lesson 12: GPTQ on a pruned model, to count what it
    does to the 2:4 pattern):

        with transform.undone(model):
            quant.gptq(model, calibration, 4, 128, pack=False)
            ...measure model...
        # model is as before the block

    What is kept, as in all_or_nothing: CPU tensors by reference; accelerator tensors copied to CPU memory
    when first replaced (a 7B model's weights: 13.5 GB of RAM, not of GPU memory). Like all_or_nothing it
    relies on the block changing tensors only through replace_data and models.set_module (every labkit
    transform does), never in place."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"transform.undone: model must be a torch.nn.Module; got {type(model).__name__}.")
    snapshot, journal = _begin(model)
    try:
        yield model
    finally:
        _restore(model, snapshot)
        journal.restore()
        _end(journal)
