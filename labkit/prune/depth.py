"""Depth pruning: remove whole decoder layers, chosen by how little each one changes the residual stream.

    bi = prune.block_influence(model, tokens)            # ShortGPT's Block Influence, one value per layer
    keep = sorted(sorted(range(L), key=bi.__getitem__)[L - n_keep:])
    student = prune.drop_layers(model, keep)              # a copy with only those layers

ShortGPT (Men et al., 2024) drops the layers of lowest Block Influence and evaluates without any
training; Sheared-LLaMA and Minitron start a student from the teacher's own layers this way and then
distill (labkit.distill, lesson 07).
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn import functional as F

from ..models import check_llama
from ..transform import record
from ..walk import layer_states


def drop_layers(model, keep: list[int] | None = None):
    """A copy of `model` with only the decoder layers `keep` (indices, increasing); None keeps every
    other layer (0, 2, 4, ...). The original model is not changed.

    Renumbers the kept layers (each attention's layer_idx, used by the KV cache) and sets
    config.num_hidden_layers, so the student runs, generates and saves like any Llama.
    """
    check_llama(model, "drop_layers")
    n = len(model.model.layers)
    if keep is None:
        keep = list(range(0, n, 2))
    keep = list(keep)
    if (
        not keep
        or any(isinstance(i, bool) or not isinstance(i, int) for i in keep)
        or any(not 0 <= i < n for i in keep)
        or sorted(set(keep)) != keep
    ):
        raise ValueError(
            f"keep={keep!r}: need a non-empty, increasing list of distinct layer indices in [0, {n}) "
            f"(the model has {n} decoder layers), or None for every other layer."
        )
    student = copy.deepcopy(model)
    student.model.layers = nn.ModuleList([student.model.layers[i] for i in keep])
    for new_index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = new_index
    student.config.num_hidden_layers = len(keep)
    layer_types = getattr(student.config, "layer_types", None)
    if layer_types is not None and len(layer_types) == n:  # per-layer attention types (sliding window, ...)
        student.config.layer_types = [layer_types[i] for i in keep]
    record(student, "drop layers", f"{len(keep)} of {n} kept", "prune")
    return student


@torch.no_grad()
def block_influence(model, tokens: torch.Tensor, batch_size: int = 8) -> list[float]:
    """ShortGPT's Block Influence of each decoder layer (Men et al., 2024, eq. 1):

        BI_i = 1 − mean over tokens of cos(x_i, x_{i+1}),   x_i the input of layer i (a hidden state)

    A layer that barely turns the residual stream (BI near 0) changes little and is the first to
    drop. tokens: [n, seqlen]. Returns one value per layer; keep the largest:
    keep = sorted(sorted(range(L), key=bi.__getitem__)[L - n_keep:]).
    """
    check_llama(model, "block_influence")
    states, _ = layer_states(model, tokens, batch_size)  # x_0 ... x_L from one forward pass per batch
    return [1 - F.cosine_similarity(a.float(), b.float(), dim=-1).mean().item() for a, b in itertools.pairwise(states)]


__all__ = ["block_influence", "drop_layers"]
