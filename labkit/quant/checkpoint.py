"""Saving and loading quantized models with safetensors (never pickle).

Two layouts:

1. labkit's own (`save_quantized` / `load_quantized`): one .safetensors file with each QuantLinear's
   buffers under its module name ('model.layers.0.self_attn.q_proj.qweight', ...), the layers'
   settings as JSON in the header metadata, and a SHA-256 of all tensor bytes, so a truncated or
   altered file fails loudly instead of loading wrong weights. Only the quantized linears are
   stored: load them into a fresh copy of the same model (labkit.models.load).

2. The GPTQ checkpoint layout of AutoGPTQ / transformers / optimum (`save_gptq` / `load_gptq`):
   a folder with model.safetensors, quantize_config.json and config.json. Per linear:
       qweight  int32 [in · bits / 32, out]     codes packed along the input dim (32 values -> bits words)
       qzeros   int32 [n_groups, out · bits / 32] zero points packed along the output dim
       scales   fp16  [n_groups, out]
       g_idx    int32 [in]                       group of each input column
   Zero points: format="gptq" (the default, AutoGPTQ's v1 checkpoint_format) stores zero − 1, the
   historical convention of AutoGPTQ's packer (its kernels add the 1 back). A zero point of 0 cannot
   be stored that way (−1 would spill into the neighbouring fields), so saving one raises; GPTQModel's
   format="gptq_v2" stores the zero points themselves. Symmetric 4-bit therefore shows qzeros
   0x77777777 in "gptq" and 0x88888888 in "gptq_v2". Every other tensor of the model (embeddings,
   norms) is stored too, in its own dtype, so the folder is a complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..transform import all_or_nothing, check_model, record, replace_data
from .formats import group_index
from .pack import pack_int32, unpack_int32
from .qlinear import QuantLinear, quant_linears, set_module

FORMAT = "labkit.quant.v1"
_SETTINGS = ("in_features", "out_features", "bits", "group_size", "sym", "float_offset")


# --- shared helpers -----------------------------------------------------------------------------


def _check_free(paths: list[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exists; pass overwrite=True to replace it.")


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file, then rename: an interrupted save never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not a dict: no `in`)
    except Exception as err:  # safetensors raises its own error types for a bad header or short file
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated, or not safetensors at all?): "
            f"{type(err).__name__}: {err}"
        ) from err
    return tensors, metadata


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _target_linear(model: nn.Module, name: str, in_features: int, out_features: int) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(
            f"the checkpoint has a layer {name!r} that this model does not have: "
            f"was it saved from another architecture?"
        ) from err
    if not isinstance(module, (nn.Linear, QuantLinear)):
        raise ValueError(f"{name!r} is a {type(module).__name__} in this model, not a linear layer.")
    if (module.in_features, module.out_features) != (in_features, out_features):
        raise ValueError(
            f"shape mismatch for {name!r}: the checkpoint has in_features={in_features}, "
            f"out_features={out_features}; the model has {module.in_features}, {module.out_features}."
        )
    return module


def _module_dtype(module: nn.Module) -> torch.dtype:
    return module.dtype if isinstance(module, QuantLinear) else module.weight.dtype


# --- labkit's layout ----------------------------------------------------------------------------


def save_quantized(model: nn.Module, path, overwrite: bool = False) -> Path:
    """Save every QuantLinear of `model` to the safetensors file `path`; returns the path."""
    path = Path(path)
    _check_free([path], overwrite)
    layers = quant_linears(model)
    if not layers:
        raise ValueError(
            "the model has no QuantLinear modules: quantize it first (labkit.quant.rtn or gptq, pack=True)."
        )
    tensors, settings = {}, {}
    for name, m in layers.items():
        for key, t in m.state_dict().items():
            tensors[f"{name}.{key}"] = t
        settings[name] = {k: getattr(m, k) for k in _SETTINGS} | {
            "act_order": m.g_idx is not None,
            "bias": m.bias is not None,
            "dtype": str(m.dtype).removeprefix("torch."),
        }
    metadata = {"format": FORMAT, "layers": json.dumps(settings), "sha256": _digest(tensors)}
    _write_safetensors(tensors, path, metadata)
    return path


@all_or_nothing
def load_quantized(model: nn.Module, path) -> nn.Module:
    """Install the QuantLinears saved in `path` into `model` (a fresh copy of the same model), in place."""
    path = Path(path)
    check_model(model, "quant.load_quantized", after=("quantize", "lowrank"))
    tensors, metadata = _read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} was not written by labkit.quant.save_quantized (format {metadata.get('format')!r}; "
            f"expected {FORMAT!r}). For a GPTQ folder use load_gptq."
        )
    if _digest(tensors) != metadata.get("sha256"):
        raise ValueError(
            f"{path} is corrupt: its tensors do not match the checksum written when it was saved "
            f"(the file was altered or damaged after saving)."
        )
    for name, s in json.loads(metadata["layers"]).items():
        target = _target_linear(model, name, s["in_features"], s["out_features"])
        layer = QuantLinear(
            s["in_features"],
            s["out_features"],
            s["bits"],
            s["group_size"],
            s["sym"],
            s["float_offset"],
            s["bias"],
            s["act_order"],
            dtype=getattr(torch, s["dtype"]),
        )
        state = {k: tensors.pop(f"{name}.{k}", None) for k in layer.state_dict()}
        for key, expected in layer.state_dict().items():
            got = state[key]
            if got is None or got.shape != expected.shape or got.dtype != expected.dtype:
                found = "missing" if got is None else f"{tuple(got.shape)} {got.dtype}"
                raise ValueError(
                    f"{path}: {name}.{key} is {found}; a layer with these settings needs "
                    f"{tuple(expected.shape)} {expected.dtype}."
                )
        layer.load_state_dict(state)
        device = next(iter([*target.parameters(), *target.buffers()])).device
        set_module(model, name, layer.to(device))
    if tensors:
        raise ValueError(f"{path} holds tensors that belong to no saved layer: {sorted(tensors)[:5]}.")
    record(model, "loaded", path.name, "quantize")
    return model


# --- the GPTQ (AutoGPTQ / transformers) layout ----------------------------------------------------

GPTQ_FORMATS = ("gptq", "gptq_v2")


def save_gptq(
    model: nn.Module,
    folder,
    overwrite: bool = False,
    format: str = "gptq",
    damp_percent: float = 0.01,
    true_sequential: bool = True,
) -> Path:
    """Write `model` (its linears QuantLinear, integer zero points) as a GPTQ checkpoint folder.

    format: "gptq" (AutoGPTQ v1: qzeros hold zero − 1) or "gptq_v2" (qzeros hold the zeros).
    All QuantLinears must share bits, group size and symmetry (quantize_config.json has one of each);
    in_features and out_features must be multiples of 32 (whole int32 words per row).
    """
    if format not in GPTQ_FORMATS:
        raise ValueError(f"format={format!r}: allowed are {GPTQ_FORMATS}.")
    folder = Path(folder)
    files = [folder / "model.safetensors", folder / "quantize_config.json", folder / "config.json"]
    _check_free(files, overwrite)
    layers = quant_linears(model)
    if not layers:
        raise ValueError("the model has no QuantLinear modules: quantize it first (pack=True).")
    kinds = {(m.bits, m.group_size, m.sym, m.float_offset) for m in layers.values()}
    if len(kinds) > 1:
        raise ValueError(f"a GPTQ checkpoint has one (bits, group_size, sym) for all layers; this model mixes {kinds}.")
    bits, group_size, sym, float_offset = kinds.pop()
    if float_offset:
        raise ValueError(
            "float-offset layers (GGUF Q4_1-style) have no GPTQ representation: GPTQ stores integer zeros."
        )

    tensors = {}
    for name, m in layers.items():
        codes, zeros = m.codes(), m.zero_points().round().to(torch.int64)  # [out, in], [out, n_groups]
        stored = zeros - 1 if format == "gptq" else zeros
        if stored.min() < 0:
            raise ValueError(
                f"{name} has a zero point of 0, which format='gptq' cannot store (it writes zero − 1). "
                f"Save with format='gptq_v2', or quantize symmetrically."
            )
        g_idx = m.g_idx if m.g_idx is not None else group_index(m.in_features, m.group_size, codes.device)
        tensors[f"{name}.qweight"] = pack_int32(codes.T, bits, dim=0)  # [in · bits / 32, out]
        tensors[f"{name}.qzeros"] = pack_int32(stored.T, bits, dim=1)  # [n_groups, out · bits / 32]
        tensors[f"{name}.scales"] = m.scales.T.contiguous()  # [n_groups, out] fp16
        tensors[f"{name}.g_idx"] = g_idx.to(torch.int32)  # [in]
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.data
    seen = {t.data_ptr() for m in layers.values() for t in [*m.buffers(), *m.parameters()]}
    for key, t in model.state_dict().items():  # everything else: embeddings, norms (tied tensors once)
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensors[key] = t

    config = {
        "bits": bits,
        "group_size": group_size or -1,
        "damp_percent": damp_percent,
        "desc_act": any(m.g_idx is not None for m in layers.values()),
        "static_groups": False,
        "sym": sym,
        "true_sequential": true_sequential,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": format,
    }
    _write_safetensors(tensors, files[0], {"format": "pt"})
    files[1].write_text(json.dumps(config, indent=2) + "\n")
    if hasattr(model, "config"):
        model_config = model.config.to_dict() | {"quantization_config": config}
        files[2].write_text(json.dumps(model_config, indent=2, default=str) + "\n")
    return folder


@all_or_nothing
def load_gptq(model: nn.Module, folder) -> nn.Module:
    """Load a GPTQ checkpoint folder (format "gptq" or "gptq_v2") into `model` (same architecture), in place:
    its linears become QuantLinears holding exactly the stored codes, scales, zeros and g_idx."""
    folder = Path(folder)
    check_model(model, "quant.load_gptq", after=("quantize", "lowrank"))
    config_file = folder / "quantize_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist: not a GPTQ checkpoint folder.")
    config = json.loads(config_file.read_text())
    format = config.get("checkpoint_format", "gptq")
    if config.get("quant_method", "gptq") != "gptq" or format not in GPTQ_FORMATS:
        raise ValueError(
            f"{config_file}: quant_method {config.get('quant_method')!r}, checkpoint_format {format!r}; "
            f"this reader handles GPTQ formats {GPTQ_FORMATS}."
        )
    bits, sym, group_size = config["bits"], config.get("sym", True), config.get("group_size", -1)
    tensors, _ = _read_safetensors(folder / "model.safetensors")

    for prefix in [k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")]:
        qweight = tensors.pop(f"{prefix}.qweight")
        try:
            qzeros, scales = tensors.pop(f"{prefix}.qzeros"), tensors.pop(f"{prefix}.scales")
        except KeyError as err:
            raise ValueError(f"{folder}: {prefix} has a qweight but no {err.args[0]}.") from err
        g_idx, bias = tensors.pop(f"{prefix}.g_idx", None), tensors.pop(f"{prefix}.bias", None)
        out_features, in_features = scales.shape[1], qweight.shape[0] * 32 // bits
        target = _target_linear(model, prefix, in_features, out_features)
        if qzeros.shape != (scales.shape[0], out_features * bits // 32) or qweight.shape[1] != out_features:
            raise ValueError(
                f"{folder}: {prefix} has qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                f"scales {tuple(scales.shape)}, which do not fit together for bits={bits}."
            )
        codes = unpack_int32(qweight, bits, 0, in_features).T  # [out, in]
        zeros = unpack_int32(qzeros, bits, 1, out_features).T.float()  # [out, n_groups]
        if format == "gptq":
            zeros = zeros + 1  # v1 stores zero − 1
            if zeros.max() >= 2**bits:
                raise ValueError(
                    f"{prefix} stores a zero point of {2**bits} (qzeros = {2**bits - 1} in the v1 "
                    f"format), which a {bits}-bit QuantLinear cannot hold."
                )
        layer = QuantLinear.from_codes(
            codes,
            scales.T.float(),
            zeros,
            bits,
            group_size,
            sym=sym,
            g_idx=g_idx,
            bias=bias,
            dtype=_module_dtype(target),
        )
        if bias is not None:
            layer.bias.data = bias.clone()  # keep the stored dtype: bit-exact
        device = next(iter([*target.parameters(), *target.buffers()])).device
        set_module(model, prefix, layer.to(device))

    state = model.state_dict()
    unknown = [k for k in tensors if k not in state]
    if unknown:
        raise ValueError(f"{folder}: tensors {unknown[:5]} do not belong to this model.")
    for key, t in tensors.items():
        if state[key].shape != t.shape:
            raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(t.shape)}, model {tuple(state[key].shape)}.")
    for key, t in tensors.items():
        owner, _, attr = key.rpartition(".")
        module = model.get_submodule(owner)
        target = module._parameters.get(attr) if attr in module._parameters else module._buffers[attr]
        replace_data(target, t.to(target.device))
    record(model, "GPTQ checkpoint", f"W{bits} g{group_size}", "quantize")
    return model
