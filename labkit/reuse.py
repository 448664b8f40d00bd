"""Measurements reused across lessons: the same perplexity is computed once per results folder.

Several lessons measure the very same thing (the dense model under the shared protocol in lessons 00,
05 and 10; Wanda at 50% in lessons 01 and 02; RTN W4 in lessons 04 and 05). `evaluate.perplexity`
stores what it measures on each window (the summed negative log-likelihood of the window's tokens) in the
results folder (labkit.folders.results_dir(), beside the rows), under a key that names exactly what was
computed:

  - every module of the model: its name, its class, its settings (plain attributes such as
    `bits` or `training`), the bytes of its weights and buffers, the model's config;
  - the window: its tokens' bytes (so 8 windows measured for a sweep serve the first 8 of 16 later),
    and the batch size;
  - what runs it: the device type, torch's CPU threads, and the versions of torch, transformers and
    every labkit source file.

Asked for the same key again, it uses the stored value, which is what the computation would give again
(the same code on the same inputs); the perplexity is then summed from the windows' values in the same
order as always. A model holding anything the key cannot name (hooks, a loader
object, an open file: e.g. labkit.parallel's offloaded layers) is always measured. A stored value is
used only by a run that finds it in its own results folder; a fresh folder measures everything.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import types
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .folders import results_dir

STORE = "reused-measurements.json"
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.Size)
# Code whose version code_version() names: a class or function from anywhere else (a notebook's own
# module, edited between two runs) could change what runs under the same name, so it is never keyed.
_KNOWN = ("torch", "transformers", "labkit")


def _known(module_name: str) -> bool:
    return module_name.split(".")[0] in _KNOWN


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 of every labkit source file and the torch and transformers versions."""
    import transformers

    h = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _plain(t: torch.Tensor) -> bool:
    """A dense tensor whose bytes can be read: not meta, not a subclass (fake tensors of labkit.rehearsal,
    2:4 semi-structured sparse weights), not a sparse layout."""
    return type(t) in (torch.Tensor, nn.Parameter) and not t.is_meta and t.layout == torch.strided


def _tensor(h, t: torch.Tensor) -> None:
    h.update(f"{t.dtype} {tuple(t.shape)} {t.device.type}".encode())
    data = t.detach().contiguous().cpu()
    if data.numel():
        h.update(memoryview(data.view(-1).view(torch.uint8).numpy()))


def _setting(value) -> str | None:
    """A plain attribute as text, or None when its meaning cannot be written down (then nothing is reused)."""
    if isinstance(value, (*_PLAIN, enum.Enum)):
        return repr(value)
    if isinstance(value, nn.Module):  # held outside _modules (e.g. transformers' kernel functions)
        return model_key(value)
    if isinstance(value, (tuple, list, frozenset, set)):
        parts = [_setting(v) for v in (sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value)]
        return None if None in parts else f"{type(value).__name__}({', '.join(parts)})"
    if isinstance(value, dict):
        parts = {repr(k): _setting(v) for k, v in value.items()}
        return None if None in parts.values() else repr(sorted(parts.items()))
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):  # module-level ones only: a name says it all
        name = f"{value.__module__}.{value.__qualname__}"
        return None if "<" in name or not _known(value.__module__ or "") else f"function {name}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # e.g. the model's labkit_compression list
        if not _known(type(value).__module__):
            return None
        text = _setting({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
        return None if text is None else f"{type(value).__qualname__}{text}"
    if hasattr(value, "to_json_string"):  # a transformers config: all of it, as JSON
        return value.to_json_string(use_diff=False)
    return None


def model_key(model: nn.Module) -> str | None:
    """sha256 naming the model's whole computation (see the module docstring); None when it cannot be named."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None
    h = hashlib.sha256()
    for name, module in model.named_modules(remove_duplicate=False):
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
            return None
        if not _known(type(module).__module__):  # e.g. a module class written in a notebook
            return None
        h.update(f"module {name} {type(module).__module__}.{type(module).__qualname__}".encode())
        for attr, value in sorted(vars(module).items()):
            if attr in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set") or attr.endswith("hooks"):
                continue
            if isinstance(value, torch.Tensor):
                if not _plain(value):
                    return None
                h.update(f"tensor {attr}".encode())
                _tensor(h, value)
                continue
            text = _setting(value)
            if text is None:
                return None
            h.update(f"{attr}={text}".encode())
        for kind, tensors in (("param", module._parameters), ("buffer", module._buffers)):
            for attr, t in sorted(tensors.items()):
                if t is not None and not _plain(t):
                    return None
                h.update(f"{kind} {attr}".encode())
                if t is not None:
                    _tensor(h, t)
    return h.hexdigest()


def key(model_key: str | None, what: str, inputs: torch.Tensor, **settings) -> str | None:
    """The key of measurement `what` on `inputs` with `settings` of the model named by model_key (None: none)."""
    if model_key is None or not _plain(inputs):
        return None
    h = hashlib.sha256(f"{what} {code_version()} {model_key} threads {torch.get_num_threads()}".encode())
    h.update(repr(sorted(settings.items())).encode())
    _tensor(h, inputs)
    return h.hexdigest()


def _path() -> Path:
    return results_dir() / STORE


def stored() -> dict:
    """Every value stored in this results folder, by key (empty when there is none)."""
    try:
        return json.loads(_path().read_text()) if _path().exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def store(values: dict) -> None:
    """Add `values` (key: value) to the store; written atomically, so a crash leaves the old file."""
    if not values:
        return
    path = _path()
    merged = {**stored(), **values}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=0, sort_keys=True))
    os.replace(tmp, path)


__all__ = ["code_version", "key", "model_key", "store", "stored"]
