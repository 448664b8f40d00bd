"""The layer-by-layer calibration walk shared by GPTQ, SparseGPT, Wanda, FLaP and activation-aware SVD,
and the one place that runs a model up to a decoder-layer boundary and captures what arrives there.

    capture the inputs of decoder layer 0 on the calibration batch
    for each decoder layer:
        move it to the compute device
        run it on its inputs, batch by batch, while hooks feed every nn.Linear's inputs to a statistic
        let the method change the layer, using those statistics
        run the changed layer again: each batch's outputs replace its inputs, as the next layer's inputs
        move it back

The calibration activations (128 x 2048 tokens of LLaMA-7B: 2 GiB in fp16) stay in CPU memory
(`activations="host"`, the default) and go to the compute device one batch at a time, so the device
holds one decoder layer, one batch and the layer's statistics; on a CPU device nothing moves. Layers
move only if the model lives elsewhere: a model in CPU memory needs a few GiB of GPU for the walk, but
its 13.5 GB of fp16 weights in RAM (more than a free Colab T4 has); a model on the GPU (what
models.load does for 7B) needs its weights plus the walk's few GiB there. With `layers=` (labkit.stream)
the model holds no decoder layer at all: each is read from the checkpoint's shards in its turn and
written to a new folder afterwards, so neither memory holds the whole model (a free T4 suffices).
`python -m labkit.rehearsal` shows all three at LLaMA-7B's shapes.
Because each layer sees the outputs of the already-compressed layers before it, later layers
correct for earlier layers' errors, as in the GPTQ and SparseGPT papers.

`capture` (forward pre-hooks, the pass stopped as soon as what was asked for is recorded) gives the
walk its layer-0 inputs and block-wise distillation its layer inputs (`layer_inputs`) and every layer
boundary (`layer_states`). `check_calibration` is the one check of a token-id set, `SEQUENTIAL_GROUPS`
the one list of a decoder layer's linears in the order they are calibrated one group after the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import check_llama, linear_layers

# GPTQ's "true sequential" order inside a decoder layer: each group is changed after the ones before it,
# and is calibrated on the inputs that the already-changed linears produce (GPTQ; SVD-LLM with
# sequential=True). Inside a group the order does not change any result: every linear of a group is
# observed on the same inputs before any of them is changed, and each is changed from its own statistic;
# only the order of a report's entries (and which linear an error names first) follows it. Listed in the
# model's own order.
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class _Stop(Exception):
    """Ends a forward pass early, once what it was run for has been recorded."""


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


def obs_block(W1: torch.Tensor, Hinv1: torch.Tensor, constrain) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inner loop over one block of B columns that SparseGPT and GPTQ share (their Algorithm 1).

    W1: [rows, B] the block's weights, updated in place column by column; Hinv1: [B, B] the block of the
    upper Cholesky factor of H⁻¹ (its row i holds what the OBS update needs at column i);
    constrain(i, W1) -> [rows]: column i of the block as updated so far, with its constraint applied
    (SparseGPT: its pruned weights set to 0; GPTQ: rounded to its group's grid). Call it once per column,
    in order. Returns Q1 (the constrained columns), Err1 (each column's change divided by [H⁻¹]_ii, for
    the lazy update of the columns after the block) and Losses1 ((w − q)² / [H⁻¹]_ii², before the
    factor 1/2), each [rows, B]. (Lessons 02 and 05 have learners write this loop.)
    """
    Q1, Err1, Losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        w, d = W1[:, i], Hinv1[i, i]
        q = constrain(i, W1)
        Q1[:, i] = q
        Losses1[:, i] = (w - q) ** 2 / d**2
        err1 = (w - q) / d
        W1[:, i:] -= err1[:, None].matmul(Hinv1[i, i:][None, :])  # OBS update of the block's later columns
        Err1[:, i] = err1
    return Q1, Err1, Losses1


class in_turn:  # lower case: used as a decorator, like a function
    """constrain(i, W1), refusing a call out of order (i = 0, 1, 2, ... once each): the constraints of a
    block loop keep state (a group's grid, an N:M mask) that only calls in order fill correctly.
    `calls` counts the calls, so that checked_block can tell a loop that skipped columns."""

    def __init__(self, constrain):
        self.constrain, self.calls = constrain, 0

    def __call__(self, i, W1):
        if i != self.calls:
            raise ValueError(
                f"the block loop called its constraint for column {i} out of turn: once per column, in order."
            )
        self.calls += 1
        return self.constrain(i, W1)


def checked_block(
    answer, W1: torch.Tensor, name: str, constrain: in_turn
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A learner's block loop's (Q1, Err1, Losses1), or ValueError naming `name` and what is off."""
    if constrain.calls != W1.shape[1]:
        raise ValueError(
            f"{name} called its constraint for {constrain.calls} of the block's {W1.shape[1]} columns: once per "
            "column, in order. The model is unchanged."
        )
    if not (isinstance(answer, tuple) and len(answer) == 3 and all(isinstance(t, torch.Tensor) for t in answer)):
        raise ValueError(f"{name} returned {type(answer).__name__}; it must return (Q1, Err1, Losses1).")
    for label, t in zip(("Q1", "Err1", "Losses1"), answer, strict=True):
        if t.shape != W1.shape or not torch.isfinite(t).all():
            raise ValueError(
                f"{name} returned {label} of shape {tuple(t.shape)}; each must be a finite [rows, B] = "
                f"{tuple(W1.shape)} tensor. The model is unchanged."
            )
    return tuple(t.to(W1.dtype) for t in answer)


def check_calibration(calibration, model=None, *, name: str = "calibration", min_seqlen: int = 1) -> None:
    """Raise a ValueError naming `name` unless `calibration` is a non-empty LongTensor of token ids
    [n_samples, seqlen] with seqlen >= min_seqlen, and (given `model`) every id is in its vocabulary."""
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long:
        got = (
            f"{tuple(calibration.shape)} {calibration.dtype}"
            if isinstance(calibration, torch.Tensor)
            else type(calibration).__name__
        )
        raise ValueError(
            f"{name} must be a LongTensor of token ids shaped [n_samples, seqlen]; got {got}. "
            f"Make one with labkit.data.calibration(tokenizer, n_samples, seqlen)."
        )
    n, seqlen = calibration.shape
    if n == 0 or seqlen < max(min_seqlen, 1):
        raise ValueError(
            f"{name} holds {n} windows of {seqlen} tokens; need at least one window with seqlen >= "
            f"{max(min_seqlen, 1)}. Make one with labkit.data.calibration(tokenizer, n_samples, seqlen)."
        )
    if model is not None:
        vocab = model.config.vocab_size
        if calibration.min() < 0 or calibration.max() >= vocab:
            raise ValueError(f"{name} holds token ids outside [0, {vocab}): was it made with another tokenizer?")


# --- capture: what arrives at a decoder-layer boundary ---------------------------------------------


@torch.no_grad()
def capture(
    model,
    tokens: torch.Tensor,
    boundaries: Sequence[int] | None = None,
    *,
    batch_size: int = 8,
    device=None,
    name: str = "tokens",
) -> list[tuple[list[torch.Tensor], dict]]:
    """What arrives at decoder-layer boundaries when `model` runs on `tokens` [n, seqlen], batch by batch.

    Boundary i < L (L decoder layers) is the input of layer i; boundary L is the last layer's output, what
    the final norm receives. boundaries: which ones to record (default: all, 0..L).
    Returns, per batch of `batch_size` windows, (states, kwargs): states[k] [batch, seqlen, hidden] arrives
    at boundaries[k]; kwargs are exactly what the model passes to its decoder layers (rotary cos/sin,
    attention mask, position ids), captured rather than rebuilt, so a layer replayed on them repeats the
    model's own computation.

    Forward pre-hooks record; each pass stops as soon as the last boundary asked for is reached, so the
    rest of the model does not run (boundary 0 costs only the embedding). The hooks are removed
    afterwards, also on error. device: where the batches run; when given, the embedding and the rotary
    module are moved there for the call and back afterwards (enough for boundary 0: the walk keeps the
    layers elsewhere); by default the embedding's device. `name` names `tokens` in error messages.
    """
    check_llama(model, "capture")
    check_calibration(tokens, model, name=name)
    inner = model.model
    stations = [*inner.layers, inner.norm]  # the modules that receive boundary 0..L
    wanted = list(range(len(stations))) if boundaries is None else boundaries
    if (
        not isinstance(wanted, (list, tuple, range))
        or not wanted
        or any(isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < len(stations) for b in wanted)
    ):
        raise ValueError(
            f"boundaries={boundaries!r}: need a list of indices in 0..{len(inner.layers)} (i < {len(inner.layers)}: "
            f"the input of decoder layer i; {len(inner.layers)}: the last layer's output), e.g. [0], or None for all."
        )
    wanted = list(wanted)
    last = max(wanted)
    seen: dict = {}  # this batch: boundary -> hidden states, and "kwargs"

    def recorder(boundary):
        def hook(module, args, kwargs):
            seen[boundary] = args[0] if args else kwargs["hidden_states"]
            if boundary == 0:
                seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if boundary == last:
                raise _Stop  # everything asked for is recorded: the rest of the pass is not needed

        return hook

    homes = []
    if device is not None:
        device = torch.device(device)
        homes = [
            (m, next(iter([*m.parameters(), *m.buffers()])).device) for m in (inner.embed_tokens, inner.rotary_emb)
        ]
    else:
        device = inner.embed_tokens.weight.device
    hooks = [stations[b].register_forward_pre_hook(recorder(b), with_kwargs=True) for b in sorted({0, *wanted})]
    out = []
    try:
        for m, _ in homes:
            m.to(device)
        for start in range(0, tokens.shape[0], batch_size):
            seen.clear()
            with contextlib.suppress(_Stop):
                model(tokens[start : start + batch_size].to(device), use_cache=False)
            out.append(([seen[b] for b in wanted], seen["kwargs"]))
    finally:
        for hook in hooks:
            hook.remove()
        for m, home in homes:
            m.to(home)
    return out


def layer_inputs(model, tokens: torch.Tensor, index: int, batch_size: int = 8) -> tuple[torch.Tensor, dict]:
    """What decoder layer `index` of `model` receives on `tokens` [n, seqlen]:
    (hidden states [n, seqlen, hidden], the keyword arguments the model passes to its layers).

    The kwargs (rotary cos/sin for positions 0..seqlen-1, mask None = causal) are shared by
    every window, so any batch of the inputs can be replayed with them. One forward per batch,
    stopped at layer `index`.
    """
    check_llama(model, "layer_inputs")
    n_layers = len(model.model.layers)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_layers:
        raise ValueError(f"index={index!r}: the model has decoder layers 0..{n_layers - 1}.")
    batches = capture(model, tokens, [index], batch_size=batch_size)
    return torch.cat([states[0] for states, _ in batches]), _shared_kwargs(batches[0][1], "layer_inputs")


@torch.no_grad()
def observe_layer(
    model, tokens: torch.Tensor, index: int, make_stats: Callable[[str, nn.Linear], Stats | None], batch_size: int = 8
) -> dict[str, Stats]:
    """The statistics of decoder layer `index`'s linear inputs on `tokens` [n, seqlen], as calibration_walk collects
    them in that layer's turn when no layer before it has changed; make_stats(name, linear) as there.
    One forward per batch, stopped once the layer's last observed linear has its input: a look at one layer
    without walking all of them."""
    check_llama(model, "observe_layer")
    n_layers = len(model.model.layers)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_layers:
        raise ValueError(f"index={index!r}: the model has decoder layers 0..{n_layers - 1}.")
    layer = model.model.layers[index]
    linears = linear_layers(layer)
    stats = {name: s for name, linear in linears.items() if (s := make_stats(name, linear)) is not None}
    if stats:
        batches = capture(model, tokens, [index], batch_size=batch_size)
        device = next(layer.parameters()).device
        _observe(layer, linears, stats, [(states[0], kwargs) for states, kwargs in batches], device)
    return stats


def layer_states(model, tokens: torch.Tensor, batch_size: int = 8) -> tuple[list[torch.Tensor], dict]:
    """Every decoder layer's input, and the last layer's output, from one forward pass per batch:
    (states, kwargs) with states[i] [n, seqlen, hidden] the input of layer i for i < L and states[L]
    the last layer's output (before the final norm); kwargs as in layer_inputs.

    states[j] is what the teacher's layers 0..j-1 make of the tokens, so the span of layers i..j-1
    maps states[i] to states[j]: the targets of a student layer that replaces that span.
    """
    batches = capture(model, tokens, batch_size=batch_size)
    states = [torch.cat(chunks) for chunks in zip(*(states for states, _ in batches))]
    return states, _shared_kwargs(batches[0][1], "layer_states")


def _shared_kwargs(kwargs: dict, caller: str) -> dict:
    """The layer kwargs, if every window shares them (position ids per window would tie them to one batch)."""
    cos, _ = kwargs["position_embeddings"]
    if cos.shape[0] != 1:
        raise ValueError(f"the model passes per-window position embeddings; {caller} needs shared ones.")
    return kwargs


# --- the walk -------------------------------------------------------------------------------------


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
    activations: str = "host",
    layers=None,
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
    activations: where the calibration activations (every batch's inputs of the current layer) live
        between uses. "host" (default): in CPU memory; each batch goes to `device` for its forward and its
        outputs come back, so the device holds one layer, one batch and the statistics (128 x 2048 tokens
        of LLaMA-7B are 2 GiB in fp16). "device": kept on `device` (faster when it has room). On a CPU
        `device` both are the same: nothing moves.
    layers: where the decoder layers' weights come from when the model does not hold them (labkit.stream:
        `layers.load(index, layer, device)` before a layer's turn, `layers.store(index, layer)` after it);
        None: the model's own layers, moved to `device` and back.
    """
    check_llama(model, "calibration_walk")
    if activations not in ("host", "device"):
        raise ValueError(f"activations={activations!r}: allowed are 'host' (CPU memory) and 'device'.")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else next(model.parameters()).device
    device = torch.device(device)
    store = torch.device("cpu") if activations == "host" else device
    # The inputs of layer 0, batch by batch (no other reference kept: each layer's outputs replace them).
    batches = [
        (states[0].to(store), kwargs)
        for states, kwargs in capture(model, calibration, [0], batch_size=batch_size, device=device, name="calibration")
    ]
    results = []
    for index, layer in enumerate(tqdm(model.model.layers, desc=desc, leave=False)):
        if layers is None:
            home = next(layer.parameters()).device
            layer.to(device)
        else:
            layers.load(index, layer, device)
        try:
            results += _walk_layer(layer, index, make_stats, update, sequential, batches, device, store)
        finally:  # also on error: a failed call leaves the model where it was (a CPU model on a GPU machine)
            if layers is None:
                layer.to(home)
        if layers is not None:
            layers.store(index, layer)
    return results


def _walk_layer(layer, index, make_stats, update, sequential, batches, device, store) -> list:
    """One layer's turn in calibration_walk: observe and update each group, then replace `batches` by the
    layer's outputs. Returns update's results, one per group."""
    linears = linear_layers(layer)
    results = []
    for group in sequential if sequential is not None else [list(linears)]:
        unknown = [name for name in group if name not in linears]
        if unknown:
            raise ValueError(f"sequential names {unknown} are not linears of the layer; allowed: {list(linears)}.")
        stats = {name: s for name in group if (s := make_stats(name, linears[name])) is not None}
        if stats:
            _observe(layer, linears, stats, batches, device)
        results.append(update(index, layer, stats))
    for i in range(len(batches)):  # the next layer's inputs, each replacing its batch
        hidden, kwargs = batches[i]
        batches[i] = (layer(hidden.to(device), **kwargs).to(store), kwargs)
        del hidden  # the replaced batch is freed now, not after the loop: one set of activations at a time
    return results


def _observe(layer: nn.Module, linears: dict, stats: dict, batches: list, device: torch.device) -> None:
    """Feed each observed linear's inputs to its statistic, batch by batch. The layer's forward stops as
    soon as the last of them has received its input: what would follow (that linear itself and the rest
    of the layer) is not needed here, so e.g. q/k/v's group costs only the input norm, not the layer.
    Each batch is moved to `device` for its forward (a no-op when it is there already)."""
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
            with contextlib.suppress(_Stop):
                layer(hidden.to(device), **kwargs)
    finally:
        for hook in hooks:
            hook.remove()


# --- statistics of a linear layer's inputs -------------------------------------------------------


# A statistic converts a batch to fp32/fp64 at most this many bytes at a time. Below it (every batch of the
# CPU profile's models) the batch is converted whole, exactly as before chunking existed: chunking changes the
# order of the sums, so results would move in their last bits.
CHUNK_BYTES = 256 * 2**20


def _chunk_rows(x: torch.Tensor, itemsize: int = 4) -> int:  # x: [tokens, in_features]
    return max(1, CHUNK_BYTES // (x.shape[1] * itemsize))


class Hessian:
    """H = 2/n · Σ x xᵀ over the n calibration tokens: the Hessian of the layer-wise squared error
    ‖W X − Ŵ X‖² with respect to each row of W (GPTQ eq. 1, SparseGPT sec. 3). Accumulated in fp32."""

    def __init__(self, in_features: int, device=None):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:  # x: [tokens, in_features]
        self.xtx = self.xtx.to(x.device)
        if x.dtype == torch.float32 or x.numel() * 4 <= CHUNK_BYTES:
            x = x.float()  # no copy for fp32 (the CPU profile); a small one otherwise
            self.xtx.addmm_(x.T, x)
        else:  # an fp16/bf16 batch of LLaMA-7B (16k x 11008) is 0.7 GB in fp32: convert a chunk of tokens at a time
            for chunk in x.split(_chunk_rows(x), 0):
                c = chunk.float()
                self.xtx.addmm_(c.T, c)
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
        self.sum, self.sumsq = self.sum.to(x.device), self.sumsq.to(x.device)
        # Small batches (every CPU-profile one) in one piece, as before; large ones a chunk of tokens at a time,
        # so that no fp64 copy of the whole batch exists (16k x 11008 tokens of LLaMA-7B: 1.4 GB each).
        chunks = [x] if x.numel() * 8 <= CHUNK_BYTES else x.split(_chunk_rows(x, 8), 0)
        for chunk in chunks:
            x64 = chunk.double()
            self.sum = self.sum + x64.sum(0)
            self.sumsq = self.sumsq + (x64 * x64).sum(0)
            del x64
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
