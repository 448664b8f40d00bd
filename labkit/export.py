"""Export compressed models that are not quantized: structured-pruned and low-rank ones.

Quantized models have their own writers (labkit.quant.save_gptq for the GPTQ layout that vLLM and
transformers load; labkit.quant.save_quantized). A pruned or factored model is a plain float model
whose layers no longer have the sizes its config.json says: FLaP keeps a different number of heads
and MLP channels in every layer, LLM-Pruner leaves the first and last layers whole, bias compensation
adds biases, and SVD replaces a linear by two thin ones. Llama's config has one size for all layers,
so a folder written here holds:

    model.safetensors   every tensor of the model (safetensors: no pickle, nothing executed on load)
    config.json         the original architecture (transformers' LlamaConfig)
    labkit_layout.json  what differs from the config: per layer, heads / KV heads / MLP channels kept,
                        which linears have a bias, and which are low-rank pairs (with their rank)

    save_compressed(model, "build/export/flap-20")
    model = load_compressed("build/export/flap-20")   # same tensors, same outputs

When every layer still has the config's sizes and nothing else changed, the folder is also an ordinary
transformers checkpoint (AutoModelForCausalLM.from_pretrained loads it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch
from torch import nn

from . import transform
from .models import check_llama, set_module
from .transform import check_data

LAYOUT = "labkit_layout.json"
FILES = ("model.safetensors", "config.json", LAYOUT)


def _check_free(folder: Path, overwrite: bool) -> None:
    existing = [folder / f for f in FILES if (folder / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} exists; refusing to overwrite a checkpoint. Pass overwrite=True or choose another folder."
        )
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / ".labkit-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"folder={str(folder)!r} is not writable: {err}") from err


def layout(model) -> dict:
    """Per layer: heads, kv_heads, channels, biased linears, low-rank linears {name: rank}."""
    from .lowrank.svd import LowRankLinear

    check_llama(model, "labkit.export")
    check_exportable(model)
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        entry = {
            "heads": _out(attn.q_proj) // attn.head_dim,
            "kv_heads": _out(attn.k_proj) // attn.head_dim,
            "channels": _out(mlp.gate_proj),
            "bias": [],
            "low_rank": {},
        }
        for name, module in layer.named_modules():
            if isinstance(module, LowRankLinear):
                entry["low_rank"][name] = module.rank
                if module.B.bias is not None:
                    entry["bias"].append(name)
            elif isinstance(module, nn.Linear) and module.bias is not None and not name.endswith((".A", ".B")):
                entry["bias"].append(name)
        layers.append(entry)
    history = [dataclasses.asdict(c) for c in transform.history(model)]
    return {"format": "labkit-compressed-v1", "layers": layers, "history": history}


def check_exportable(model) -> None:
    """This format holds float tensors in Llama's modules plus LowRankLinear pairs. Refuse anything else before
    a file is written (it could not be read back): quantized layers have their own writers."""
    from .lowrank.svd import LowRankLinear

    check_data(model, "labkit.export.save_compressed", finite=False)
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear) or not type(module).__module__.startswith("labkit."):
            continue
        writer = (
            "labkit.quant.save_gptq (or save_quantized)"
            if type(module).__name__ == "QuantLinear"
            else "none yet: export the float model before this step"
        )
        raise ValueError(
            f"save_compressed writes float and low-rank layers only; {name} is a {type(module).__name__} "
            f"(the model had {transform.describe_history(model)}). Writer for it: {writer}."
        )
    if any(isinstance(getattr(m, "forward", None), functools.partial) for m in model.model.layers):
        raise ValueError(
            "save_compressed: the model's layers run fused kernels (labkit.kernels.llama.fuse); export the model "
            "before fusing it."
        )


def _out(linear) -> int:
    return linear.out_features


def save_compressed(model, folder, overwrite: bool = False) -> Path:
    """Write `model` (pruned, low-rank, or plain) to `folder` as safetensors + config + layout; returns the folder.

    Never overwrites an existing checkpoint unless overwrite=True."""
    from safetensors.torch import save_model

    folder = Path(folder)
    _check_free(folder, overwrite)
    plan = layout(model)
    save_model(model, str(folder / "model.safetensors"))  # stores a tied embedding once
    model.config.to_json_file(str(folder / "config.json"))
    (folder / LAYOUT).write_text(json.dumps(plan, indent=1) + "\n")
    return folder


def _reshape(model, plan: dict) -> None:
    """Give a freshly built model the layer sizes and module kinds of `plan` (values come from the file)."""
    from .lowrank.svd import LowRankLinear
    from .prune.structured import attention_shape, prune_channels, prune_heads

    layers = plan.get("layers")
    if (
        plan.get("format") != "labkit-compressed-v1"
        or not isinstance(layers, list)
        or len(layers) != len(model.model.layers)
    ):
        raise ValueError(
            f"{LAYOUT} does not describe this model's {len(model.model.layers)} layers "
            f"(format {plan.get('format')!r}, {len(layers) if isinstance(layers, list) else '?'} layers)."
        )
    for layer, entry in zip(model.model.layers, layers):
        s = attention_shape(layer.self_attn)
        heads, kv_heads = entry["heads"], entry["kv_heads"]
        if kv_heads < 1 or heads % kv_heads or heads // kv_heads > s.group:
            raise ValueError(
                f"{LAYOUT}: {heads} query heads over {kv_heads} KV heads does not fit a layer "
                f"with {s.n_heads}/{s.n_kv_heads} heads."
            )
        per_kv = heads // kv_heads
        prune_heads(layer.self_attn, [g * s.group + j for g in range(kv_heads) for j in range(per_kv)])
        prune_channels(layer.mlp, range(entry["channels"]))
        for name in entry["bias"]:
            linear = layer.get_submodule(name)
            if name in entry["low_rank"]:
                continue  # handled below with its factors
            set_module(
                layer,
                name,
                nn.Linear(
                    linear.in_features,
                    linear.out_features,
                    bias=True,
                    dtype=linear.weight.dtype,
                    device=linear.weight.device,
                ),
            )
        for name, rank in entry["low_rank"].items():
            linear = layer.get_submodule(name)
            set_module(
                layer,
                name,
                LowRankLinear(
                    linear.in_features,
                    linear.out_features,
                    int(rank),
                    bias=name in entry["bias"],
                    dtype=linear.weight.dtype,
                    device=linear.weight.device,
                ),
            )


def load_compressed(folder, dtype: torch.dtype = torch.float32, device="cpu"):
    """Rebuild a model written by save_compressed: architecture from config.json, sizes from the layout,
    tensors from model.safetensors (strict: a missing, extra or wrongly shaped tensor is an error)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}: not a folder written by labkit.export.save_compressed.")
    config = LlamaConfig.from_json_file(str(folder / "config.json"))
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    _reshape(model, json.loads((folder / LAYOUT).read_text()))
    try:
        load_model(model, str(folder / "model.safetensors"), strict=True, device=str(device))
    except (SafetensorError, RuntimeError, OSError) as err:
        raise ValueError(
            f"{folder / 'model.safetensors'} cannot be loaded into the layout it came with "
            f"(truncated or altered file?): {err}"
        ) from err
    model.tie_weights()
    history = json.loads((folder / LAYOUT).read_text()).get("history", [])
    for c in history:
        transform.record(model, c["method"], c["setting"], c["kind"])
    return model.eval()
