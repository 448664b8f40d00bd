"""What a compressed model costs and how good it is: perplexity, stored bytes, runtime memory, speed."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import reuse as _reuse


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _check_int(value, name: str, minimum: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: need an integer >= {minimum} ({meaning}).")


def _check_stream(token_ids) -> torch.Tensor:
    """token_ids [1, n] or [n] of integer ids -> the stream [n]; anything else is refused by name."""
    ok = (
        isinstance(token_ids, torch.Tensor)
        and not token_ids.is_floating_point()
        and not token_ids.is_complex()
        and token_ids.dtype != torch.bool
        and (token_ids.dim() == 1 or (token_ids.dim() == 2 and token_ids.shape[0] == 1))
    )
    if not ok:
        got = (
            f"shape {list(token_ids.shape)}, dtype {token_ids.dtype}"
            if isinstance(token_ids, torch.Tensor)
            else type(token_ids).__name__
        )
        raise ValueError(
            f"token_ids must be one stream of integer token ids, shape [1, n_tokens] or [n_tokens]; got {got}. "
            f"Pass labkit.data.test_tokens(tokenizer); for several texts, evaluate each stream separately "
            f"(or concatenate them along dim 1)."
        )
    return token_ids.reshape(-1).long()  # long ids stay the same tensor


def split_windows(model, token_ids, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """The first `max_windows` non-overlapping windows of `seqlen` tokens: [n_windows, seqlen], checked."""
    stream = _check_stream(token_ids)
    _check_int(seqlen, "seqlen", 2, "a window needs at least 2 tokens: one to read, one to predict")
    if max_windows is not None:
        _check_int(max_windows, "max_windows", 1, "or None for all windows")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        raise ValueError(
            f"seqlen={seqlen} is larger than the model's context ({max_pos} positions, "
            f"config.max_position_embeddings). Use seqlen <= {max_pos}."
        )
    n_windows = stream.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"token_ids has {stream.numel()} tokens: fewer than one window of seqlen={seqlen}.")
    windows = stream[: n_windows * seqlen].view(n_windows, seqlen)
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and (windows.min() < 0 or windows.max() >= vocab):
        raise ValueError(
            f"token_ids holds ids from {windows.min().item()} to {windows.max().item()}; the model's vocabulary "
            f"is 0..{vocab - 1}. Tokenize with the model's own tokenizer."
        )
    return windows


@torch.no_grad()
def perplexity(
    model,
    token_ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    reuse: bool = True,
) -> float:
    """Perplexity with the GPTQ paper's protocol.

    token_ids: [1, n_tokens] (or [n_tokens]), one stream of integer ids (e.g. the whole WikiText-2
    test split, as labkit.data.test_tokens returns it). It is cut into n_tokens // seqlen
    non-overlapping windows (the tail is dropped); the first `max_windows` of them are evaluated.
    Each window predicts its tokens 2..seqlen from the ones before, with no context carried across
    windows. ppl = exp(mean NLL over all predicted tokens).
    seqlen: an integer >= 2; max_windows: a positive integer or None (all); batch_size: windows per
    forward pass, a positive integer. Bad arguments raise ValueError naming the argument.
    reuse: a window already measured on this very model (the same modules, settings and weights, the same
    code and threads) with the same results folder adds its stored NLL instead of running again
    (labkit.reuse: e.g. lesson 00's 16 dense windows serve every later lesson's dense windows); False
    always runs the model.
    """
    windows = split_windows(model, token_ids, seqlen, max_windows)
    n_windows = windows.shape[0]
    _check_int(batch_size, "batch_size", 1, "windows per forward pass")
    name = _reuse.model_key(model) if reuse else None  # None: nothing reused, nothing stored
    known, measured = _reuse.stored() if name else {}, {}
    device = _device(model)
    nll_sum = 0.0
    for start in tqdm(
        range(0, n_windows, batch_size), desc="perplexity", disable=not progress, unit_scale=batch_size, unit="window"
    ):
        batch = windows[start : start + batch_size]
        key = _reuse.key(name, "window nll", batch)
        if key in known:
            nll_sum += known[key]
            continue
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        value = nll.item()
        nll_sum += value
        if key is not None:
            measured[key] = value
        del batch, logits, nll  # not alive while the next window's forward runs (its logits would be)
    _reuse.store(measured)
    return math.exp(nll_sum / (n_windows * (seqlen - 1)))


@dataclass
class Predictions:
    """How a model's next-token distributions look on the test windows (all per predicted token)."""

    nll: float  # mean negative log-likelihood of the true next token, nats (log of the perplexity)
    entropy: float  # mean entropy of the predicted distribution, nats (a uniform guess: log of the vocabulary)
    top1_accuracy: float  # fraction of tokens whose most likely prediction is the true next token
    top_probability: float  # mean probability of the most likely prediction: how confident the model is
    uniform_nll: float  # log(vocabulary size): the NLL of a uniform guess, perplexity = vocabulary size


@torch.no_grad()
def predictions(model, token_ids: torch.Tensor, seqlen: int, max_windows: int | None = 1) -> Predictions:
    """Confidence and accuracy of the next-token predictions on the first `max_windows` windows (the windows
    of `perplexity`, same arguments). A perplexity above the vocabulary size means confident wrong guesses:
    these numbers show how confident and how wrong."""
    windows = split_windows(model, token_ids, seqlen, max_windows)
    device = _device(model)
    nll = entropy = hits = top = 0.0
    for window in windows:
        ids = window[None].to(device)
        logp = model(ids, use_cache=False).logits[0, :-1].float().log_softmax(-1)  # [seqlen - 1, vocab]
        target = ids[0, 1:]
        nll += -logp.gather(1, target[:, None]).sum().item()
        entropy += -(logp.exp() * logp).sum().item()
        hits += (logp.argmax(-1) == target).sum().item()
        top += logp.max(-1).values.exp().sum().item()
        vocab = logp.shape[-1]
    n = windows.shape[0] * (seqlen - 1)
    return Predictions(nll / n, entropy / n, hits / n, top / n, math.log(vocab))


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model really stores for its weights.

    A module that stores weights in a compressed form (packed integers plus scales, a sparse
    format) reports them through a `stored_bytes()` method, and its own tensors are not counted
    again. Everything else counts its parameters and persistent buffers at their dtype's size.
    Tied tensors (the embedding reused as the output layer) are counted once. Non-persistent
    buffers (e.g. rotary inv_freq, recomputed on load) are not weights and are not counted.
    """
    from .models import tensor_key, tied_copies

    seen: set = set()
    copies = tied_copies(model)  # declared ties held as separate tensors (the meta device): counted once
    total = 0

    def visit(module: nn.Module, prefix: str) -> None:
        nonlocal total
        if hasattr(module, "stored_bytes"):
            total += module.stored_bytes()
            seen.update(tensor_key(t) for t in [*module.parameters(), *module.buffers()])
            return
        tensors = [(prefix + n, t) for n, t in module.named_parameters(recurse=False)]
        tensors += [
            (prefix + n, b)
            for n, b in module.named_buffers(recurse=False)
            if n not in module._non_persistent_buffers_set
        ]
        for name, t in tensors:
            key = tensor_key(t)  # storage and offset; the tensor itself on meta, where data_ptr() is always 0
            if key not in seen and name not in copies:
                seen.add(key)
                total += tensor_bytes(t)
        for n, child in module.named_children():
            visit(child, f"{prefix}{n}.")

    visit(model, "")
    return total


def resident_bytes(model: nn.Module) -> int:
    """Bytes of all tensors the model holds in memory (parameters and every buffer), deduplicated."""
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


# --- runtime memory ----------------------------------------------------------------------------


@dataclass
class Memory:
    peak_bytes: int  # peak memory of the model's tensors plus the run's working memory
    model_bytes: int  # what the model's tensors occupy before the run
    working_bytes: int  # peak extra memory during the run (activations, KV cache, temporaries)
    device: str
    how: str  # how it was measured


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _release_free_memory() -> None:
    """Return freed heap memory to the OS, so that RSS tracks live memory (glibc only)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory(model, fn, *args, **kwargs):
    """Run fn(*args, **kwargs) and measure peak runtime memory; returns (fn's result, Memory).

    CUDA: the caching allocator's peak of allocated bytes (model + activations). CPU: the model's
    resident tensor bytes plus the peak rise of the process's resident set size (RSS, sampled
    every millisecond) during the call, after freed heap memory is given back to the OS. The
    CPU figure leaves out the Python interpreter and libraries, so it means the same thing as
    the CUDA one: what this model needs to run.
    """
    device = _device(model)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn(*args, **kwargs)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        model_bytes = resident_bytes(model)
        return result, Memory(
            peak, model_bytes, peak - before, str(device), "torch.cuda.max_memory_allocated (all tensors on the device)"
        )
    _release_free_memory()
    base = _rss()
    peak = base
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn(*args, **kwargs)
    finally:
        done.set()
        sampler.join()
    peak = max(peak, _rss())
    model_bytes = resident_bytes(model)
    working = peak - base
    return result, Memory(
        model_bytes + working,
        model_bytes,
        working,
        "cpu",
        "model tensor bytes + peak rise of process RSS during the run",
    )


# --- generation speed --------------------------------------------------------------------------


@dataclass
class Speed:
    tokens_per_s: float  # decode rate: new tokens after the first, per second
    prefill_s: float  # time to the first new token (prompt processing)
    new_tokens: int
    prompt_tokens: int
    device: str


@torch.no_grad()
def generation_speed(
    model,
    tokenizer,
    prompt: str = "The history of the city",
    new_tokens: int = 64,
    repeats: int = 3,
    progress: bool = True,
) -> Speed:
    """Greedy generation with the KV cache; decode tokens/s = (N - 1) / (t(N tokens) - t(1 token)).

    Timing the 1-token run separately removes the prompt's prefill from the decode rate. A
    warm-up run comes first, and the best of `repeats` runs is kept (the least disturbed one).
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens}: need at least 2 to time decoding.")
    device = _device(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)

    def run(n):
        _sync(device)
        start = time.perf_counter()
        out = model.generate(
            ids,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            pad_token_id=model.config.pad_token_id or 0,
        )
        _sync(device)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - start

    bar = tqdm(total=1 + 2 * repeats, desc="timing generation", disable=not progress, leave=False)
    run(2)  # warm-up
    bar.update()
    times = {1: [], new_tokens: []}
    for n in [1] * repeats + [new_tokens] * repeats:
        times[n].append(run(n))
        bar.update()
    bar.close()
    first, total = min(times[1]), min(times[new_tokens])
    decode = max(total - first, 1e-9)
    return Speed((new_tokens - 1) / decode, first, new_tokens, ids.shape[1], str(device))


def best_time(fn, repeats: int = 15, warmup: int = 0) -> float:
    """Seconds taken by the fastest of `repeats` calls of fn(), after `warmup` untimed calls.

    The fastest run is the least disturbed by other processes, so it is the best estimate of
    what fn itself costs. With CUDA, the device is synchronized before and after each call, so
    the kernels fn queued are counted, not just their launch.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats}, warmup={warmup}: need repeats >= 1 and warmup >= 0.")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure_generation(model, tokenizer, prompt: str = "The history of the city", new_tokens: int = 64):
    """Tokens/s and peak runtime memory of greedy generation: returns (Speed, Memory)."""
    return peak_memory(model, generation_speed, model, tokenizer, prompt, new_tokens)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
