"""Training loops for distillation, plain fine-tuning and block-wise (local) distillation.

One plain loop (`_train`), written out once:

    for step in range(steps):
        for each of grad_accum micro-batches:        # gradient accumulation
            loss = micro_loss(next batch)             # distillation, cross-entropy or hidden MSE
            (loss / grad_accum).backward()
        clip the gradient norm to max_grad_norm       # one bad batch cannot blow the student up
        AdamW step
    return the loss of every step                      # the learning curve, for a plot

Mixed precision (the GPU profile trains fp16 models): AdamW steps fp32 master copies of the
fp16/bf16 trainable parameters and keeps its state in fp32; the model computes in its own dtype
and the weights are copied back after each step (Micikevicius et al., 2018). In fp16 AdamW's
eps = 1e-8 rounds to 0 and a zero gradient gives 0 / 0 = NaN; an update ~lr · w is below fp16's
resolution. fp32 parameters are trained as they are (the CPU profile: no copy, no change).
The losses are computed in fp32 (losses.py upcasts the logits).

Every step sees batch_size · grad_accum windows of the token data, so `distill` and `finetune`
with the same steps, batch_size and grad_accum train on the same token budget: the comparison
"distillation vs plain fine-tuning on the same tokens" changes only the target (the teacher's
whole distribution vs the one observed next token).

Deterministic for a seed: batches are drawn and on-policy samples are generated with
generators seeded from `seed`, and the global RNG is forked so the caller's is left alone.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..models import cache_kwarg
from ..walk import check_calibration
from .losses import LOSSES, check_beta, check_temperature, hidden_mse
from .students import check_vocab

# --- data -----------------------------------------------------------------------------------------


def batches(data: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of `batch_size` rows of data [n, ...]: shuffled epochs, each row once per epoch."""
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order += torch.randperm(data.shape[0], generator=generator).tolist()
        rows, order = order[:batch_size], order[batch_size:]
        yield data[rows]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: need a positive integer.")
    return value


def _real(value, name: str, low: float, low_open: bool, high: float, allowed: str) -> float:
    """A finite real number in (low, high] or [low, high] (NaN, inf and bools refused), named in the error."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if low_open else value < low) or value > high:
        raise ValueError(f"{name}={value!r}: need {allowed}.")
    return float(value)


def _check_training(steps, lr, batch_size, grad_accum, max_grad_norm, weight_decay=0.0, seed=0) -> None:
    _positive_int(steps, "steps")
    _positive_int(batch_size, "batch_size")
    _positive_int(grad_accum, "grad_accum")
    _real(lr, "lr", 0, True, 1, "a learning rate in (0, 1], e.g. 1e-4")  # AdamW moves each weight ~lr per step
    if max_grad_norm is not None:
        _real(max_grad_norm, "max_grad_norm", 0, True, math.inf, "a finite norm > 0, or None for no clipping")
    _real(weight_decay, "weight_decay", 0, False, 1, "a decay in [0, 1] (AdamW's; 0 = none)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}: need an integer >= 0.")


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


# --- the loop -------------------------------------------------------------------------------------


def _train(
    model: nn.Module,
    steps: int,
    micro_loss: Callable[[], torch.Tensor],
    lr: float,
    grad_accum: int,
    max_grad_norm: float | None,
    weight_decay: float,
    desc: str,
    progress: bool,
) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad is False everywhere).")
    masters = [_master_weight(p) for p in params]  # what AdamW updates: fp32
    optimizer = torch.optim.AdamW(masters, lr=lr, weight_decay=weight_decay)
    curve: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    try:
        for step in bar:
            _zero_grad(params, optimizer)
            total = 0.0
            for _ in range(grad_accum):
                loss = micro_loss()
                value = loss.item()
                if not math.isfinite(value):
                    _stop(params, optimizer, step, steps, f"the loss is {value}")
                (loss / grad_accum).backward()  # gradients add up over the micro-batches
                total += value
            for p, master in zip(params, masters):
                if master is not p:  # the low-precision gradient, in fp32, on the master copy
                    master.grad = None if p.grad is None else p.grad.float()
                    p.grad = None
            if max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(masters, max_grad_norm)
            else:
                norm = torch.nn.utils.get_total_norm([m.grad for m in masters if m.grad is not None])
            if not torch.isfinite(norm):
                _stop(params, optimizer, step, steps, f"the gradient norm is {norm.item()}")
            optimizer.step()
            with torch.no_grad():
                for p, master in zip(params, masters):
                    if master is not p:
                        p.copy_(master)  # rounded to the model's dtype for the next forward
            curve.append(total / grad_accum)
            bar.set_postfix(loss=f"{curve[-1]:.4f}")
    finally:
        model.eval()
    return curve


def _master_weight(p: nn.Parameter) -> torch.Tensor:
    """The tensor the optimizer updates for parameter p: p itself if it is fp32 or fp64, else an fp32 copy."""
    if p.dtype in (torch.float32, torch.float64):
        return p
    return p.detach().float().requires_grad_(True)


def _zero_grad(params: list, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None


def _stop(params: list, optimizer, step: int, steps: int, what: str) -> None:
    """A non-finite loss or gradient: stop before the update, so the weights stay those of the last good step."""
    _zero_grad(params, optimizer)
    raise FloatingPointError(
        f"training step {step + 1} of {steps}: {what}. Stopped before updating: the weights are those after "
        f"step {step}. Lower lr, check the data and the model's weights for NaN/inf, or clip with max_grad_norm."
    )


# --- on-policy samples ------------------------------------------------------------------------------


@torch.no_grad()
def sample(
    model, prompts: torch.Tensor, new_tokens: int, temperature: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample `new_tokens` tokens after each prompt from the model's own distribution (KV cache).

    prompts: [batch, prompt_len] -> [batch, prompt_len + new_tokens]. Seeded by `generator`
    (on the model's device), not by the global RNG.
    """
    temperature = check_temperature(temperature)
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens={new_tokens!r}: need a positive integer.")
    # transformers 5.x renamed past_key_values to cache; accept either spelling
    cache_name = cache_kwarg(model)
    was_training = model.training
    model.eval()
    try:
        out = model(prompts, use_cache=True)
        tokens = prompts
        for i in range(new_tokens):
            probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)  # [batch, vocab]
            next_token = torch.multinomial(probs, 1, generator=generator)  # [batch, 1]
            tokens = torch.cat([tokens, next_token], dim=1)
            if i + 1 < new_tokens:  # feed only the new token; the cache holds the rest
                out = model(next_token, use_cache=True, **{cache_name: out[cache_name]})
    finally:
        model.train(was_training)
    return tokens


# --- distillation ------------------------------------------------------------------------------------


def distill(
    student,
    teacher,
    data: torch.Tensor,
    steps: int,
    loss: str | Callable = "forward_kl",
    temperature: float = 2.0,
    lr: float = 1e-4,
    batch_size: int = 4,
    grad_accum: int = 1,
    max_grad_norm: float | None = 1.0,
    on_policy: bool = False,
    alpha_ce: float = 0.0,
    beta: float = 0.5,
    prompt_len: int | None = None,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: bool = True,
) -> list[float]:
    """Train `student` in place to match `teacher`'s next-token distributions; returns the loss per step.

    data: LongTensor [n, seqlen] of token windows (e.g. labkit.data.calibration(tokenizer, n, seqlen)).
    loss: "forward_kl" (Hinton et al.), "reverse_kl", "jsd" (GKD's generalized JSD, with `beta`),
        or a callable loss(student_logits, teacher_logits, mask=mask) -> scalar.
    temperature: τ of the softened distributions (the divergences are scaled by τ²).
    alpha_ce: weight of the hard-label cross-entropy on the data's next tokens, in [0, 1]:
        loss = (1 − alpha_ce) · divergence + alpha_ce · CE (Hinton et al.'s weighted average).
    on_policy: GKD (Agarwal et al., 2024) with student-data fraction λ = 1: each batch keeps the
        first prompt_len tokens of its windows (default seqlen // 2) as prompts, the student
        samples the rest (temperature 1, seeded), and the divergence is taken on the sampled
        tokens only: the student learns from its own mistakes, where it will be at inference.
    The teacher runs in eval mode under no_grad and is never changed; it may live on another device.
    Errors: ValueError naming a bad argument (every float must be finite and in its range), before any
    change; FloatingPointError when a step's loss or gradient is not finite, raised before that step's
    update, so the student keeps the weights of the last good step.
    """
    check_vocab(student, teacher)
    _check_training(steps, lr, batch_size, grad_accum, max_grad_norm, weight_decay, seed)
    check_calibration(data, student, name="data", min_seqlen=2)
    temperature = check_temperature(temperature)
    beta = check_beta(beta)
    alpha_ce = _real(alpha_ce, "alpha_ce", 0, False, 1, "a weight in [0, 1] for the cross-entropy term")
    if callable(loss):
        divergence = loss
    elif loss in LOSSES:
        divergence = functools.partial(LOSSES[loss], temperature=temperature)
        if loss == "jsd":
            divergence = functools.partial(divergence, beta=beta)
    else:
        raise ValueError(
            f"loss={loss!r}: allowed are {list(LOSSES)} or a callable loss(student_logits, teacher_logits, mask=mask)."
        )
    seqlen = data.shape[1]
    if on_policy:
        if alpha_ce:
            raise ValueError(
                "alpha_ce > 0 with on_policy=True: the sequences are the student's own samples, "
                "so there is no data token to take a cross-entropy on. Use alpha_ce=0."
            )
        prompt_len = seqlen // 2 if prompt_len is None else prompt_len
        if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or not 1 <= prompt_len < seqlen:
            raise ValueError(
                f"prompt_len={prompt_len!r}: need an integer in [1, {seqlen}) "
                f"(the rest of each {seqlen}-token window is sampled by the student)."
            )
    device, teacher_device = _device(student), _device(teacher)
    teacher.eval()
    generator = torch.Generator().manual_seed(seed)
    sampler = torch.Generator(device=device).manual_seed(seed)
    stream = batches(data, batch_size, generator)

    def micro_loss():
        tokens = next(stream).to(device)  # [batch, seqlen]
        mask = None
        if on_policy:
            tokens = sample(student, tokens[:, :prompt_len], seqlen - prompt_len, generator=sampler)
            mask = torch.zeros(tokens.shape[0], seqlen - 1, dtype=torch.bool, device=device)
            mask[:, prompt_len - 1 :] = True  # positions that predict a sampled token
        with torch.no_grad():
            teacher_logits = teacher(tokens.to(teacher_device), use_cache=False).logits[:, :-1].to(device)
        student_logits = student(tokens, use_cache=False).logits[:, :-1]  # [batch, seqlen - 1, vocab]
        value = divergence(student_logits, teacher_logits, mask=mask)
        if alpha_ce:
            ce = F.cross_entropy(student_logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            value = (1 - alpha_ce) * value + alpha_ce * ce
        return value

    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        return _train(
            student,
            steps,
            micro_loss,
            lr,
            grad_accum,
            max_grad_norm,
            weight_decay,
            "distill (on-policy)" if on_policy else "distill",
            progress,
        )


def finetune(
    student,
    data: torch.Tensor,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 4,
    grad_accum: int = 1,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: bool = True,
) -> list[float]:
    """Plain next-token cross-entropy on the same token windows; returns the loss per step.

    data: LongTensor [n, seqlen]. With the same steps, batch_size, grad_accum and seed as a
    `distill` call, it sees exactly the same batches: the baseline for "distillation vs
    fine-tuning on the same token budget" (the teacher adds information, not tokens).
    """
    _check_training(steps, lr, batch_size, grad_accum, max_grad_norm, weight_decay, seed)
    check_calibration(data, student, name="data", min_seqlen=2)
    device = _device(student)
    stream = batches(data, batch_size, torch.Generator().manual_seed(seed))

    def micro_loss():
        tokens = next(stream).to(device)  # [batch, seqlen]
        logits = student(tokens, use_cache=False).logits[:, :-1]  # [batch, seqlen - 1, vocab]
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        return _train(student, steps, micro_loss, lr, grad_accum, max_grad_norm, weight_decay, "finetune", progress)


# --- block-wise (local) distillation -------------------------------------------------------------------


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # transformers 5 layers return a tensor


def blockwise_distill(
    student_layer: nn.Module,
    teacher_layer: nn.Module | None,
    inputs: torch.Tensor,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 4,
    layer_kwargs: dict | None = None,
    grad_accum: int = 1,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: bool = True,
    targets: torch.Tensor | None = None,
) -> list[float]:
    """Train one block to reproduce another block's outputs on the same inputs (hidden_mse).

    inputs: [n, seqlen, hidden], the block's inputs in the full model (labkit.walk.layer_inputs gives
    them, with the layer_kwargs a decoder layer needs). Local distillation needs no backward pass
    through the rest of the model, so it repairs one compressed block at a time at the memory
    cost of a single layer. Returns the loss per step; the teacher block is never changed.
    targets: [n, seqlen, hidden], the outputs to reproduce, instead of teacher_layer (pass None):
    e.g. states[j] of labkit.walk.layer_states for a student layer that replaces the teacher's layers i..j-1.
    """
    _check_training(steps, lr, batch_size, grad_accum, max_grad_norm, weight_decay, seed)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 3 or not inputs.is_floating_point():
        got = f"{tuple(inputs.shape)} {inputs.dtype}" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(
            f"inputs must be float hidden states [n, seqlen, hidden]; got {got}. "
            f"Get a decoder layer's inputs with labkit.walk.layer_inputs(model, tokens, index)."
        )
    if (teacher_layer is None) == (targets is None):
        raise ValueError(
            "give exactly one of teacher_layer (its outputs are the targets) and targets "
            "(precomputed outputs [n, seqlen, hidden])."
        )
    kwargs = layer_kwargs or {}
    device = _device(student_layer)
    if targets is not None:
        if not isinstance(targets, torch.Tensor) or targets.shape != inputs.shape:
            got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets {got} must have the inputs' shape {tuple(inputs.shape)}.")
        targets = targets.to(device)
    else:
        teacher_layer.eval()
        with torch.no_grad():  # the targets, computed once
            targets = torch.cat(
                [_hidden(teacher_layer(chunk.to(device), **kwargs)) for chunk in inputs.split(batch_size)]
            )  # [n, seqlen, hidden]
    pairs = torch.stack([inputs.to(device), targets])  # [2, n, seqlen, hidden]
    stream = batches(pairs.transpose(0, 1), batch_size, torch.Generator().manual_seed(seed))

    def micro_loss():
        batch = next(stream)  # [batch, 2, seqlen, hidden]
        return hidden_mse(_hidden(student_layer(batch[:, 0], **kwargs)), batch[:, 1])

    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        return _train(
            student_layer, steps, micro_loss, lr, grad_accum, max_grad_norm, weight_decay, "blockwise distill", progress
        )


__all__ = [
    "batches",
    "blockwise_distill",
    "distill",
    "finetune",
    "sample",
]
