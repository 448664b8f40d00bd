"""The layer-by-layer calibration walk shared by GPTQ, SparseGPT, Wanda, FLaP and activation-aware SVD.

    capture the inputs of decoder layer 0 on the calibration batch
    for each decoder layer:
        move it to the compute device
        run it on its inputs, while hooks feed every nn.Linear's inputs to a statistic
        let the method change the layer, using those statistics
        run the changed layer again: its outputs are the next layer's inputs
        move it back

Only one decoder layer (plus the calibration activations) is on the compute device at a time,
so a 7B model in fp16 (13.5 GB) can be compressed on a 16 GB GPU while it lives in CPU memory.
Because each layer sees the outputs of the already-compressed layers before it, later layers
correct for earlier layers' errors, as in the GPTQ and SparseGPT papers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import check_llama, linear_layers


class _Stop(Exception):
    """Ends a forward pass early, once what it was run for has been recorded."""


class _Catcher(nn.Module):
    """Stands in for decoder layer 0: records what the model passes to it, then stops the forward."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.seen: list[tuple[torch.Tensor, dict]] = []

    def forward(self, hidden_states, **kwargs):
        self.seen.append((hidden_states, kwargs))
        raise _Stop


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp · mean(diag H), and the dead inputs.

    What SparseGPT and GPTQ both need from a layer's Hessian (their Algorithm 1).

    H: [in_features, in_features] -> (Hinv [in_features, in_features] upper triangular, dead [in_features] bool)
    A dead input (never nonzero on the calibration set, diag 0) gets H_jj = 1 so H stays invertible;
    its weights are zeroed, as they cannot change the layer's output on that data.
    """
    H = H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    damp = percdamp * torch.mean(torch.diag(H))  # H⁻¹ = (X Xᵀ + λI)⁻¹ in Algorithm 1
    H.diagonal().add_(damp)
    try:
        L = torch.linalg.cholesky(H)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"the layer's Hessian is not positive definite even with percdamp={percdamp}; "
            f"use a larger percdamp (e.g. 0.1) or more calibration tokens."
        ) from err
    Hinv = torch.cholesky_inverse(L)  # (H + λI)⁻¹
    return torch.linalg.cholesky(Hinv, upper=True), dead


@torch.no_grad()
def capture_layer0_inputs(model, calibration: torch.Tensor, device, batch_size: int = 8):
    """Inputs of decoder layer 0: a list of (hidden_states [b, seqlen, hidden], kwargs) per batch.

    The kwargs are exactly what the model passes to its layers (rotary cos/sin, attention mask,
    position ids), captured rather than rebuilt, so the walk replays the model's own computation.
    """
    check_calibration(calibration, model)
    inner = model.model
    homes = [(m, next(iter([*m.parameters(), *m.buffers()])).device) for m in (inner.embed_tokens, inner.rotary_emb)]
    for m, _ in homes:
        m.to(device)
    catcher = _Catcher(inner.layers[0])
    inner.layers[0] = catcher
    try:
        for start in range(0, calibration.shape[0], batch_size):
            try:
                model(calibration[start : start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        inner.layers[0] = catcher.layer
        for m, home in homes:
            m.to(home)
    return catcher.seen


def check_calibration(calibration, model=None) -> None:
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long:
        got = (
            f"{tuple(calibration.shape)} {calibration.dtype}"
            if isinstance(calibration, torch.Tensor)
            else type(calibration).__name__
        )
        raise ValueError(
            f"calibration must be a LongTensor of token ids shaped [n_samples, seqlen]; got {got}. "
            f"Make one with labkit.data.calibration(tokenizer, n_samples, seqlen)."
        )
    if calibration.shape[0] == 0 or calibration.shape[1] == 0:
        raise ValueError(
            f"calibration is empty (shape {tuple(calibration.shape)}): need at least one sample of at least one "
            f"token. Make one with labkit.data.calibration(tokenizer, n_samples, seqlen)."
        )
    if model is not None:
        vocab = model.config.vocab_size
        if calibration.numel() and (calibration.min() < 0 or calibration.max() >= vocab):
            raise ValueError(f"calibration holds token ids outside [0, {vocab}): was it made with another tokenizer?")


Stats = object  # anything with .add(x: Tensor [tokens, in_features])


@torch.no_grad()
def calibration_walk(
    model,
    calibration: torch.Tensor,
    make_stats: Callable[[str, nn.Linear], Stats | None],
    update: Callable[[int, nn.Module, dict[str, Stats]], object],
    device=None,
    sequential: Sequence[Sequence[str]] | None = None,
    batch_size: int = 8,
    desc: str = "layers",
) -> list:
    """Walk the decoder layers in order, observing linear inputs and letting `update` change each layer.

    calibration: LongTensor [n_samples, seqlen] of token ids.
    make_stats(name, linear): a fresh statistic for that linear's inputs (called with `name` like
        'self_attn.q_proj'), or None to leave it unobserved.
    update(index, layer, stats): changes `layer` in place (it is on `device`); its return values
        are collected, one per call, and returned.
    sequential: optional groups of linear names, observed and updated one group after the other
        inside each layer (GPTQ's "true sequential": the MLP sees the inputs that the already
        compressed attention produces). Default: every linear of the layer in one group.
    device: where each layer runs; defaults to CUDA when available.
    """
    check_llama(model, "calibration_walk")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else next(model.parameters()).device
    device = torch.device(device)
    batches = capture_layer0_inputs(model, calibration, device, batch_size)
    results = []
    for index, layer in enumerate(tqdm(model.model.layers, desc=desc, leave=False)):
        home = next(layer.parameters()).device
        layer.to(device)
        linears = linear_layers(layer)
        groups = sequential if sequential is not None else [list(linears)]
        for group in groups:
            unknown = [name for name in group if name not in linears]
            if unknown:
                raise ValueError(f"sequential names {unknown} are not linears of the layer; allowed: {list(linears)}.")
            stats = {name: s for name in group if (s := make_stats(name, linears[name])) is not None}
            if stats:
                _observe(layer, linears, stats, batches)
            results.append(update(index, layer, stats))
        batches = [(layer(hidden, **kwargs), kwargs) for hidden, kwargs in batches]  # next layer's inputs
        layer.to(home)
    return results


def _observe(layer: nn.Module, linears: dict, stats: dict, batches: list) -> None:
    """Feed each observed linear's inputs to its statistic, batch by batch. The layer's forward stops as
    soon as the last of them has received its input: what would follow (that linear itself and the rest
    of the layer) is not needed here, so e.g. q/k/v's group costs only the input norm, not the layer."""
    seen = set()

    def feeder(name):
        def hook(module, inputs):  # a pre-hook: the input, before the linear runs
            x = inputs[0]
            stats[name].add(x.reshape(-1, x.shape[-1]))
            seen.add(name)
            if len(seen) == len(stats):  # every observed linear of the group has this batch's input
                raise _Stop

        return hook

    hooks = [linears[name].register_forward_pre_hook(feeder(name)) for name in stats]
    try:
        for hidden, kwargs in batches:
            seen.clear()
            try:
                layer(hidden, **kwargs)
            except _Stop:
                pass
    finally:
        for hook in hooks:
            hook.remove()


# --- statistics of a linear layer's inputs -------------------------------------------------------


class Hessian:
    """H = 2/n · Σ x xᵀ over the n calibration tokens: the Hessian of the layer-wise squared error
    ‖W X − Ŵ X‖² with respect to each row of W (GPTQ eq. 1, SparseGPT sec. 3). Accumulated in fp32."""

    def __init__(self, in_features: int, device=None):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:  # x: [tokens, in_features]
        x = x.float()
        self.xtx = self.xtx.to(x.device)
        self.xtx.addmm_(x.T, x)
        self.n += x.shape[0]

    @property
    def H(self) -> torch.Tensor:  # [in_features, in_features]
        return 2 * self.xtx / max(self.n, 1)


class ColumnStats:
    """Per-input-feature statistics: mean, variance, L2 norm over tokens, max |x|.

    Wanda scores |W_ij|·‖X_j‖₂; FLaP uses each channel's variance (its "fluctuation");
    SmoothQuant and LLM.int8() look at max |X_j| to find outlier features."""

    def __init__(self, in_features: int, device=None):
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.max_abs = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:  # x: [tokens, in_features]
        x64 = x.double()
        self.sum = self.sum.to(x.device) + x64.sum(0)
        self.sumsq = self.sumsq.to(x.device) + (x64 * x64).sum(0)
        self.max_abs = torch.maximum(self.max_abs.to(x.device), x.abs().amax(0).float())
        self.n += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.n, 1)).float()

    @property
    def var(self) -> torch.Tensor:  # population variance, clamped against rounding below zero
        n = max(self.n, 1)
        return (self.sumsq / n - (self.sum / n) ** 2).clamp_min(0).float()

    @property
    def norm(self) -> torch.Tensor:  # ‖X_j‖₂ over all tokens
        return self.sumsq.sqrt().float()
