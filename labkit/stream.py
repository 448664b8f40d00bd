"""Decoder layers streamed from a checkpoint's safetensors shards, for a calibration walk whose model is not
whole in memory (LLaMA-7B in fp16 is 13.5 GB; a free Colab T4 has 12.7 GB of RAM).

    model = skeleton(folder)                       # decoder layers on `meta`: no bytes; the rest in CPU memory
    layers = ShardLayers(folder, out_folder)       # reads layer i when the walk reaches it, writes it back
    walk.calibration_walk(model, calibration, make_stats, update, device="cuda", layers=layers)

safetensors files are a JSON header and raw bytes, so `safe_open` reads one tensor without the rest. After
the method changed layer i, its weights go to out_folder/layer_{i:03d}.safetensors (names as in the
checkpoint) and the layer goes back to `meta`; the user's checkpoint is never written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


def _index(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from model.safetensors.index.json or the one model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    single = folder / "model.safetensors"
    if not single.exists():
        raise ValueError(
            f"folder={str(folder)!r} holds no model.safetensors(.index.json): save_pretrained writes them."
        )
    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), single.name)


def _read(folder: Path, index: dict[str, str], names: list[str], device) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        with safe_open(str(folder / index[name]), "pt", device=str(device)) as f:
            out[name] = f.get_tensor(name)
    return out


def skeleton(folder, dtype=None):
    """The model in `folder` with its decoder layers on `meta` and everything else read into CPU memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or config.dtype)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # a computed buffer, not in the shards
    index = _index(folder)
    rest = [name for name in model.state_dict() if not name.startswith("model.layers.") and name in index]
    model.load_state_dict(_read(folder, index, rest, "cpu"), strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


class ShardLayers:
    """Loads decoder layer i from the shards of `folder` onto the walk's device; stores it to `out_folder`."""

    def __init__(self, folder, out_folder):
        self.folder, self.out = Path(folder), Path(out_folder)
        if self.out.resolve() == self.folder.resolve():
            raise ValueError(
                "out_folder is the checkpoint's folder: pass another one (the checkpoint is never written)."
            )
        self.out.mkdir(parents=True, exist_ok=True)
        self.index = _index(self.folder)

    def load(self, i: int, layer: nn.Module, device) -> None:
        prefix = f"model.layers.{i}."
        tensors = _read(self.folder, self.index, [prefix + n for n in layer.state_dict()], device)
        layer.load_state_dict({n[len(prefix) :]: t for n, t in tensors.items()}, assign=True)

    def store(self, i: int, layer: nn.Module) -> None:
        tensors = {f"model.layers.{i}.{n}": t.detach().contiguous().cpu() for n, t in layer.state_dict().items()}
        save_file(tensors, str(self.out / f"layer_{i:03d}.safetensors"))
        layer.to("meta")
