"""A quantized labkit model as a compressed-tensors checkpoint ("pack-quantized"), the format vLLM serves
and transformers loads (its CompressedTensors integration, on CPU too).

    quant.gptq(model, calib, bits=4, group_size=128, act_order=False)
    quant.save_compressed_tensors(model, "build/export/smollm2-gptq-ct")
    AutoModelForCausalLM.from_pretrained("build/export/smollm2-gptq-ct")   # needs `pip install compressed-tensors`

Per quantized linear the folder's model.safetensors holds
    weight_packed      int32 [out, in · bits / 32]   the codes, packed by compressed-tensors' own packer
    weight_scale       [out, n_groups]               labkit's scales, in the model's dtype
    weight_zero_point  int32 [out · bits / 32, n_groups]   (asymmetric grids) the zero points, packed likewise
    weight_shape       int64 [2]                     [out, in]
and config.json carries `quantization_config` (quant_method "compressed-tensors", format "pack-quantized",
one config group: int, `bits`, group or channel strategy, symmetric or not; lm_head ignored). compressed-
tensors stores signed codes q − 2^(bits−1) and signed zero points: ŵ = s · (q_s − zp_s), which is labkit's
ŵ = s · (q − zp) exactly. Its grids have integer zero points, so float-offset layers (GGUF Q4_1-style) and
act-order layers (g_idx) are refused; every other tensor is written in its own dtype.

Checked (tests/test_ct_export.py): transformers 5 with compressed-tensors 0.20 loads a symmetric export and
gives labkit's logits exactly; it cannot load asymmetric pack-quantized checkpoints, labkit's or anyone's
(its skeleton expects unpacked zero points: llm-compressor issue #1618), so an asymmetric export is
checked with compressed-tensors' own decompressor instead, layer by layer.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models import check_llama
from .qlinear import QuantLinear, quant_linears

FILES = ("model.safetensors", "config.json")


def _check_layers(model) -> tuple[int, int | None, bool]:
    layers = quant_linears(model)
    if not layers:
        raise ValueError(
            "save_compressed_tensors: the model has no QuantLinear; quantize it first (quant.rtn / quant.gptq)."
        )
    settings = {(m.bits, m.group_size, m.sym) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(
            "save_compressed_tensors: one config group needs one setting for every layer; found "
            f"{sorted(settings, key=str)}."
        )
    for name, m in layers.items():
        if m.float_offset:
            raise ValueError(
                f"{name}: a float offset (ŵ = s·q + m) has no integer zero point; quantize with float_offset=False."
            )
        if m.g_idx is not None:
            raise ValueError(f"{name}: act-order layers (g_idx) are not exported here; quantize with act_order=False.")
        if m.bits > 8:
            raise ValueError(f"{name}: compressed-tensors packs 1 to 8 bits; this layer has {m.bits}.")
    return next(iter(settings))


def quantization_config(bits: int, group_size: int | None, sym: bool) -> dict:
    """The checkpoint's quantization_config, built by compressed-tensors' own config classes."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    args = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=sym,
        strategy="group" if group_size else "channel",
        group_size=group_size,
    )
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        format="pack-quantized",
        ignore=["lm_head"],
        quantization_status=QuantizationStatus.COMPRESSED,
    )
    return json.loads(config.model_dump_json())


def compressed_tensors(layer: QuantLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One QuantLinear's tensors in the pack-quantized layout (without the module prefix)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 1 << (layer.bits - 1)
    codes = (layer.codes().to(torch.int16) - offset).to(torch.int8)  # [out, in], signed as compressed-tensors stores
    out = {
        "weight_packed": pack_to_int32(codes, layer.bits),
        "weight_scale": layer.scales.to(dtype).contiguous(),
        "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if not layer.sym:
        zero = (layer.zero_points().round().to(torch.int16) - offset).to(torch.int8)  # [out, n_groups]
        out["weight_zero_point"] = pack_to_int32(zero, layer.bits, packed_dim=0).contiguous()
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().to(dtype).contiguous()
    return out


@torch.no_grad()
def save_compressed_tensors(model, folder, overwrite: bool = False) -> Path:
    """Write `model` (its decoder linears QuantLinears of one setting, integer zero points, no act-order) as a
    compressed-tensors pack-quantized checkpoint in `folder`: model.safetensors and config.json. Checks
    everything before writing; refuses to overwrite a checkpoint unless overwrite=True."""
    check_llama(model, "quant.save_compressed_tensors")
    bits, group_size, sym = _check_layers(model)
    folder = Path(folder)
    existing = [folder / f for f in FILES if (folder / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} exists; refusing to overwrite a checkpoint. Pass overwrite=True or another folder."
        )
    qc = quantization_config(bits, group_size, sym)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    layers = quant_linears(model)
    tensors = {}
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner not in layers:
            tensors[name] = t.detach().contiguous()
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # the embedding's own tensor (safetensors stores no shared storage)
    for name, layer in layers.items():
        tensors.update({f"{name}.{k}": v for k, v in compressed_tensors(layer, dtype).items()})
    config = copy.deepcopy(model.config)
    config.quantization_config = qc
    config.architectures = ["LlamaForCausalLM"]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.to_json_file(str(folder / "config.json"))
    return folder


__all__ = ["compressed_tensors", "quantization_config", "save_compressed_tensors"]
