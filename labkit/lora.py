"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021), from torch operations.

Every decoder linear keeps its weight W frozen and learns a low-rank update beside it:

    y = W x + b + (alpha / rank) · B A x,    A: [rank, in] small random,  B: [out, rank] zero

so training starts from the model as it is, trains rank · (in + out) numbers per linear instead of
in · out, and ends with the update merged back (W + (alpha / rank) · B A): a plain dense model, no
cost at inference. LLM-Pruner recovers a pruned model this way (rank 8, alpha 16, lr 1e-4):

    from labkit import lora, prune
    prune.llm_pruner(model, calibration, 0.2)
    report = lora.lora_recover(model, windows, steps=10)   # next-token loss, labkit.distill.finetune
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from .distill import finetune
from .models import linear_layers, set_module
from .transform import all_or_nothing, check_count, check_model, replace_data
from .walk import check_calibration


class LoRALinear(nn.Module):
    """y = W x + b + (alpha / rank) · B A x, with W, b frozen (Hu et al., 2021).

    A: [rank, in] small random, B: [out, rank] zero, so training starts from the base layer as it is."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        a = torch.empty(rank, base.in_features).uniform_(-1, 1, generator=generator) / math.sqrt(base.in_features)
        self.A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return self.base(x) + (x @ self.A.T) @ self.B.T * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scale · B A: no extra cost at inference."""
        replace_data(self.base.weight, self.base.weight + self.scale * (self.B @ self.A))  # not in place: see transform
        self.base.weight.requires_grad_(False)
        return self.base


@all_or_nothing
def lora_recover(
    model,
    data: torch.Tensor,
    steps: int,
    rank: int = 8,
    alpha: float = 16.0,
    lr: float = 1e-4,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """A short LoRA recovery fine-tune of every decoder linear, merged back into the weights, in place.

    data: LongTensor [n, seqlen] of token windows (next-token cross-entropy, labkit.distill.finetune).
    rank, alpha: the adapters' rank and scale alpha / rank (LLM-Pruner: rank 8, alpha 16, lr 1e-4).
    Returns {'steps', 'seconds', 'loss' (per step)}; afterwards every parameter of the model has
    requires_grad as before and the model is a plain dense model again.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r}: need a positive integer rank for the LoRA adapters, e.g. 8.")
    check_model(model, "lora.lora_recover")
    check_calibration(data, model, name="data", min_seqlen=2)
    check_count(steps, "steps", 10)
    check_count(batch_size, "batch_size", 4)
    flags = {p: p.requires_grad for p in model.parameters()}
    generator = torch.Generator().manual_seed(seed)
    wrapped = {}
    for index, layer in enumerate(model.model.layers):
        for name, linear in linear_layers(layer).items():
            wrapped[(index, name)] = LoRALinear(linear, rank, alpha, generator)
    for p in model.parameters():
        p.requires_grad_(False)
    for (index, name), lora in wrapped.items():
        set_module(model.model.layers[index], name, lora)  # its A, B are the only trainable parameters
    start = time.perf_counter()
    try:
        curve = finetune(model, data, steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    finally:
        for (index, name), lora in wrapped.items():
            set_module(model.model.layers[index], name, lora.merged())
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {"steps": steps, "seconds": time.perf_counter() - start, "loss": curve, "rank": rank}


__all__ = ["LoRALinear", "lora_recover"]
