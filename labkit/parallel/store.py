"""A model folder that ranks and offloaded layers read from: one safetensors file per decoder layer.

    folder/config.json              the model's configuration (transformers' JSON)
    folder/rest.safetensors         everything outside the decoder layers: embedding, final norm,
                                    output layer (absent when tied to the embedding)
    folder/layer_000.safetensors    decoder layer 0, names relative to it ('self_attn.q_proj.weight')
    ...

safetensors files are a JSON header (names, dtypes, shapes, byte offsets) followed by raw tensor
bytes, so a reader can memory-map a file and read one tensor, or one slice of a tensor, without
reading the rest: a tensor-parallel rank reads only its columns, a pipeline stage only its layers,
an offloaded model one layer at a time. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..models import check_llama


def layer_file(folder, index: int) -> Path:
    return Path(folder) / f"layer_{index:03d}.safetensors"


def writable_folder(folder) -> Path:
    """Create `folder` if needed and prove it is writable (a probe file); ValueError if not."""
    folder = Path(folder)
    probe = folder / f".labkit-write-probe-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"folder={str(folder)!r} is not a writable folder ({type(err).__name__}: {err}). "
            f"Pass a folder you may write to, e.g. one under tempfile.gettempdir()."
        ) from err
    return folder


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # Write to a temporary name, then rename: an interrupted write never leaves a half-written file
    # under the real name.
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def write_folder(model, folder) -> Path:
    """Write `model` (a Llama) to `folder` in the layout above; returns the folder."""
    check_llama(model, "labkit.parallel.write_folder")
    folder = writable_folder(folder)
    (folder / "config.json").write_text(model.config.to_json_string())
    for index, layer in enumerate(model.model.layers):
        _save(dict(layer.state_dict()), layer_file(folder, index))
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
    if model.config.tie_word_embeddings:
        rest.pop("lm_head.weight", None)  # the same tensor as the embedding: stored once
    _save(rest, folder / "rest.safetensors")
    return folder


def check_file(path) -> None:
    """ValueError if `path` is not a complete safetensors file (missing, truncated, bad header).

    Format: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}}, then the data; a complete file is at least 8 + N + max(end) bytes."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: the folder is incomplete (write it with write_folder).")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(
                f"{path} is truncated or not a safetensors file: {size} bytes, header needs "
                f"{8 + max(n, 0)}. Write the folder again (write_folder)."
            )
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise ValueError(f"{path}: unreadable safetensors header ({err}); write the folder again.") from err
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(
            f"{path} is truncated or damaged: {size} bytes on disk, its header describes "
            f"{8 + n + end}. Write the folder again (write_folder)."
        )


def check_folder(folder) -> Path:
    """ValueError unless `folder` holds config.json, rest.safetensors and every layer file, complete."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"folder={str(folder)!r} has no config.json: write it with labkit.parallel.write_folder(model, folder)."
        )
    config = read_config(folder)
    for path in [folder / "rest.safetensors", *(layer_file(folder, i) for i in range(config.num_hidden_layers))]:
        check_file(path)
    return folder


def read_config(folder):
    from transformers import LlamaConfig

    return LlamaConfig.from_dict(json.loads((Path(folder) / "config.json").read_text()))


def read_tensors(path, device="cpu", slices: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one file, read through a memory map into `device` memory; slices: {name: (dim,
    start, stop)} reads only those rows (dim 0) or columns (dim 1) of a tensor.

    On the CPU, safetensors hands out tensors that still point into the memory-mapped file (the
    bytes are read later, on first touch, and a file changed meanwhile crashes the reader); they
    are copied here, so that reading happens now and the file is released when this returns."""
    own = torch.device(device).type == "cpu"
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            out = {}
            for name in f.keys():  # noqa: SIM118 (a safetensors handle is not a dict: keys() is its API)
                if slices and name in slices:
                    dim, start, stop = slices[name]
                    part = f.get_slice(name)
                    t = part[start:stop] if dim == 0 else part[:, start:stop]
                else:
                    t = f.get_tensor(name)
                out[name] = t.clone() if own else t
            return out
    except (SafetensorError, OSError) as err:
        check_file(path)  # a truncated or missing file gets the clearer message
        raise ValueError(f"could not read {path}: {err}") from err


def skeleton(config):
    """A LlamaForCausalLM with every weight on the meta device (no memory); fill it with
    `module.load_state_dict(tensors, assign=True)`. The rotary embedding's inverse frequencies
    (a computed buffer, not a weight) are made for real, on the CPU."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


def load_rest(model, folder, device="cpu") -> None:
    """Fill the embedding, final norm and output layer of a skeleton from folder/rest.safetensors."""
    rest = read_tensors(Path(folder) / "rest.safetensors", device)
    model.load_state_dict(rest, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def load_folder(folder, device="cpu"):
    """The whole model from a folder (all layers resident): the single-process reference."""
    check_folder(folder)
    model = skeleton(read_config(folder))
    load_rest(model, folder, device)
    for index, layer in enumerate(model.model.layers):
        layer.load_state_dict(read_tensors(layer_file(folder, index), device), assign=True)
    return model.to(device)
