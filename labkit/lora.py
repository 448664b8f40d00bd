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

QLoRA (Dettmers et al., 2023) puts the adapters over frozen 4-bit weights (quant.QuantLinear from RTN, GPTQ or
AWQ, or quant.NF4Linear) and keeps them there: a quantized weight cannot take W + (alpha / rank) · B A without
being rounded again, which would undo part of what training bought. So with quantized linears `merge=False`:

    quant.awq(model, calibration, bits=4, group_size=64)
    report = lora.lora_recover(model, windows, steps=10, merge=False)   # LoRALinear(QuantLinear) in every slot
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time

import torch
from torch import nn

from .distill import finetune
from .models import set_module
from .quant.nf4 import NF4Linear
from .quant.qlinear import QuantLinear
from .transform import all_or_nothing, check_count, check_model, replace_data
from .walk import check_calibration

# The linears an adapter can sit on: float ones (merged back at the end) and packed quantized ones (QLoRA: kept).
QUANTIZED = (QuantLinear, NF4Linear)
ADAPTABLE = (nn.Linear, *QUANTIZED)


class LoRALinear(nn.Module):
    """y = W x + b + (alpha / rank) · B A x, with W, b frozen (Hu et al., 2021).

    base: an nn.Linear, or a packed quantized linear (quant.QuantLinear, quant.NF4Linear: QLoRA). A: [rank, in]
    small random, B: [out, rank] zero, so training starts from the base layer as it is. A and B take the base's
    device and (original) dtype."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        device = next(iter([*base.parameters(), *base.buffers()])).device
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else base.dtype
        a = torch.empty(rank, base.in_features).uniform_(-1, 1, generator=generator) / math.sqrt(base.in_features)
        self.A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        self.scale = alpha / rank
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return self.base(x) + (x @ self.A.T) @ self.B.T * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scale · B A: no extra cost at inference (a float base only)."""
        if not isinstance(self.base, nn.Linear):
            raise ValueError(
                f"a {type(self.base).__name__} cannot take W + scale · B A without being quantized again; keep the "
                "adapter beside it (lora.adapters(..., merge=False), as QLoRA does)."
            )
        replace_data(self.base.weight, self.base.weight + self.scale * (self.B @ self.A))  # not in place: see transform
        self.base.weight.requires_grad_(False)
        return self.base


def adaptable_linears(module: nn.Module) -> dict[str, nn.Module]:
    """The float and packed quantized linears inside `module`, by qualified name (not those inside another)."""
    found = {}
    for name, m in module.named_modules():
        if isinstance(m, ADAPTABLE) and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = m
    return found


def _targets(module: nn.Module) -> dict[str, nn.Module]:
    """The linears that get adapters, by dotted name under `module`: a causal LM's decoder linears (not its
    output layer), or every linear inside any other module (e.g. one decoder layer)."""
    inner = getattr(module, "model", None)
    if isinstance(inner, nn.Module) and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return {
            f"model.layers.{i}.{name}": linear
            for i, layer in enumerate(inner.layers)
            for name, linear in adaptable_linears(layer).items()
        }
    return adaptable_linears(module)


def _check_adapters(module, rank, alpha, merge=True) -> dict[str, nn.Module]:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r}: need a positive integer rank for the LoRA adapters, e.g. 8 (or None: none).")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha={alpha!r}: need a finite number > 0 (the adapters' scale is alpha / rank), e.g. 16.")
    if not isinstance(merge, bool):
        raise ValueError(f"merge={merge!r}: True (adapters merged into float weights at the end) or False (kept).")
    if not isinstance(module, nn.Module) or isinstance(module, (*ADAPTABLE, LoRALinear)):
        raise ValueError(
            f"module must be a model or a block holding linear layers; got {type(module).__name__} "
            "(wrap a single linear with LoRALinear directly)."
        )
    if any(isinstance(m, LoRALinear) for m in module.modules()):
        raise ValueError("module already holds LoRA adapters: merge them (leave their `adapters` block) first.")
    targets = _targets(module)
    if not targets:
        raise ValueError(f"module ({type(module).__name__}) holds no linear layer to put an adapter on.")
    quantized = [name for name, linear in targets.items() if isinstance(linear, QUANTIZED)]
    if merge and quantized:
        raise ValueError(
            f"{len(quantized)} of the linears are quantized (e.g. {quantized[0]}): an adapter cannot be merged into "
            "them without rounding again. Pass merge=False to keep the adapters beside the frozen quantized weights "
            "(QLoRA)."
        )
    return targets


@contextlib.contextmanager
def adapters(module: nn.Module, rank: int | None, alpha: float = 16.0, seed: int = 0, merge: bool = True):
    """Inside the block, `module` trains through rank-`rank` LoRA adapters; at its end they are merged back.

    module: a Llama causal LM (the linears of its decoder layers get adapters; the embedding, the output
    layer and the norms stay frozen) or any block of nn.Linear layers (every one gets an adapter), e.g. one
    decoder layer. Inside the block the adapters' A and B are the only parameters that require grad, so a
    training loop (labkit.distill) updates them alone: AdamW keeps state for rank · (in + out) numbers per
    linear instead of in · out. At the end, also on error, each adapter is merged into its weight
    (W + alpha / rank · B A) and every parameter's requires_grad is restored: the same modules as before.
    rank=None: no adapters, nothing frozen; the block trains every weight as it is (the CPU profile).
    merge=False (needed when the linears are quantized: QLoRA): at the end the adapters stay in the model,
    LoRALinear modules whose A and B no longer require grad; on error they are removed (the bases put back).
    Yields {dotted name: LoRALinear} ({} for rank=None). A is drawn from a generator seeded with `seed`.
    """
    if rank is None:
        yield {}
        return
    targets = _check_adapters(module, rank, alpha, merge)
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
        kept = not merge
    except BaseException:
        kept = False
        raise
    finally:
        for name, lora in wrapped.items():
            if module.get_submodule(name) is lora:
                if kept:
                    lora.requires_grad_(False)
                else:
                    set_module(module, name, lora.merged() if merge else lora.base)
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
    merge: bool = True,
) -> dict:
    """A short LoRA recovery fine-tune of every decoder linear, merged back into the weights, in place.

    data: LongTensor [n, seqlen] of token windows (next-token cross-entropy, labkit.distill.finetune).
    rank, alpha: the adapters' rank and scale alpha / rank (LLM-Pruner: rank 8, alpha 16, lr 1e-4).
    merge: True merges the adapters into the float weights (a plain dense model again); False keeps them as
    LoRALinear modules, as QLoRA does over quantized linears (there merge=True raises ValueError before training).
    Returns {'steps', 'seconds', 'loss' (per step), 'rank', 'trainable' (adapter parameters), 'merged'};
    afterwards every parameter of the model has requires_grad as before.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r}: need a positive integer rank for the LoRA adapters, e.g. 8.")
    check_model(model, "lora.lora_recover", after=())  # quantized linears are fine here, with merge=False
    check_calibration(data, model, name="data", min_seqlen=2)
    check_count(steps, "steps", 10)
    check_count(batch_size, "batch_size", 4)
    start = time.perf_counter()
    with adapters(model, rank, alpha, seed, merge) as wrapped:
        trainable = sum(lora.A.numel() + lora.B.numel() for lora in wrapped.values())
        curve = finetune(model, data, steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    seconds = time.perf_counter() - start
    return {"steps": steps, "seconds": seconds, "loss": curve, "rank": rank, "trainable": trainable, "merged": merge}


__all__ = ["ADAPTABLE", "LoRALinear", "adaptable_linears", "adapters", "lora_recover"]
