"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021), from torch operations.

Every decoder linear keeps its weight W frozen and learns a low-rank update beside it:

    y = W x + b + (alpha / rank) · B A x,    A: [rank, in] small random,  B: [out, rank] zero

so training starts from the model as it is, trains rank · (in + out) numbers per linear instead of
in · out, and ends with the update merged back (W + (alpha / rank) · B A): a plain dense model, no
cost at inference. LLM-Pruner recovers a pruned model this way (rank 8, alpha 16, lr 1e-4):

    from labkit import lora, prune
    prune.llm_pruner(model, calibration, 0.2)
    report = lora.lora_recover(model, windows, steps=10)   # next-token loss, labkit.distill.finetune

Any training loop can train through adapters instead of the weights themselves (the GPU profile's students:
AdamW's fp32 state for every weight of a 7B model does not fit a GPU beside it):

    with lora.adapters(student, rank=8):                    # rank=None: nothing changes, every weight trains
        distill.distill(student, teacher, windows, steps=100)   # trains the adapters only
    # here the adapters are merged: the student is a plain model again
"""

from __future__ import annotations

import contextlib
import math
import numbers
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


def _targets(module: nn.Module) -> dict[str, nn.Linear]:
    """The linears that get adapters, by dotted name under `module`: a causal LM's decoder linears (not its
    output layer), or every nn.Linear inside any other module (e.g. one decoder layer)."""
    inner = getattr(module, "model", None)
    if isinstance(inner, nn.Module) and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return {
            f"model.layers.{i}.{name}": linear
            for i, layer in enumerate(inner.layers)
            for name, linear in linear_layers(layer).items()
        }
    return linear_layers(module)


def _check_adapters(module, rank, alpha) -> dict[str, nn.Linear]:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r}: need a positive integer rank for the LoRA adapters, e.g. 8 (or None: none).")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha={alpha!r}: need a finite number > 0 (the adapters' scale is alpha / rank), e.g. 16.")
    if not isinstance(module, nn.Module) or isinstance(module, (nn.Linear, LoRALinear)):
        raise ValueError(
            f"module must be a model or a block holding nn.Linear layers; got {type(module).__name__} "
            "(wrap a single nn.Linear with LoRALinear directly)."
        )
    if any(isinstance(m, LoRALinear) for m in module.modules()):
        raise ValueError("module already holds LoRA adapters: merge them (leave their `adapters` block) first.")
    targets = _targets(module)
    if not targets:
        raise ValueError(f"module ({type(module).__name__}) holds no nn.Linear to put an adapter on.")
    return targets


@contextlib.contextmanager
def adapters(module: nn.Module, rank: int | None, alpha: float = 16.0, seed: int = 0):
    """Inside the block, `module` trains through rank-`rank` LoRA adapters; at its end they are merged back.

    module: a Llama causal LM (the linears of its decoder layers get adapters; the embedding, the output
    layer and the norms stay frozen) or any block of nn.Linear layers (every one gets an adapter), e.g. one
    decoder layer. Inside the block the adapters' A and B are the only parameters that require grad, so a
    training loop (labkit.distill) updates them alone: AdamW keeps state for rank · (in + out) numbers per
    linear instead of in · out. At the end, also on error, each adapter is merged into its weight
    (W + alpha / rank · B A) and every parameter's requires_grad is restored: the same modules as before.
    rank=None: no adapters, nothing frozen; the block trains every weight as it is (the CPU profile).
    Yields {dotted name: LoRALinear} ({} for rank=None). A is drawn from a generator seeded with `seed`.
    """
    if rank is None:
        yield {}
        return
    targets = _check_adapters(module, rank, alpha)
    flags = {p: p.requires_grad for p in module.parameters()}  # restored at the end
    generator = torch.Generator().manual_seed(seed)
    try:
        wrapped = {}
        for name, linear in targets.items():
            wrapped[name] = LoRALinear(linear, rank, alpha, generator)  # freezes the linear's own weights
        for p in module.parameters():
            p.requires_grad_(False)
        for name, lora in wrapped.items():
            set_module(module, name, lora)  # its A, B are the only trainable parameters
        yield wrapped
    finally:
        for name, lora in wrapped.items():
            if module.get_submodule(name) is lora:
                set_module(module, name, lora.merged())
        for p, flag in flags.items():
            p.requires_grad_(flag)


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
    start = time.perf_counter()
    with adapters(model, rank, alpha, seed):
        curve = finetune(model, data, steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    return {"steps": steps, "seconds": time.perf_counter() - start, "loss": curve, "rank": rank}


__all__ = ["LoRALinear", "adapters", "lora_recover"]
