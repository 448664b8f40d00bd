"""Checks for lesson 00 (the baseline): the per-token loss of one window, perplexity from those
losses, and the bytes a model's weights take.

    check.lesson00.token_nll(my_token_nll)
    check.lesson00.perplexity(my_perplexity)
    check.lesson00.model_bytes(my_model_bytes)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import Verdict, call, exercise, tensor_like
from ._numbers import number_with_hints


def _window(seqlen: int = 12, vocab: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(seqlen, vocab, generator=g)  # [seqlen, vocab]
    ids = torch.randint(0, vocab, (seqlen,), generator=g)  # [seqlen]
    return logits, ids


@exercise
def token_nll(fn) -> bool:
    """fn(logits [seqlen, vocab], ids [seqlen]) -> [seqlen - 1]: −log p(ids[t+1] | ids[..t]) for every t,
    where p = softmax(logits[t]). Position t's logits predict the NEXT token."""
    v = Verdict("token_nll")
    logits, ids = _window()
    seqlen = ids.numel()
    expected = F.cross_entropy(logits[:-1], ids[1:], reduction="none")  # [seqlen - 1]
    got = call(v, fn, logits.clone(), ids.clone())
    if isinstance(got, torch.Tensor) and got.dim() == 0:
        v.fail(
            "you returned one number: return one loss per predicted token, a [seqlen - 1] tensor "
            "(the perplexity exercise averages them)."
        )
    if isinstance(got, torch.Tensor) and tuple(got.shape) == (seqlen,):
        v.fail(
            f"you returned {seqlen} losses, one per position; the last position has no next token to predict, "
            f"so there are {seqlen - 1}: compare logits[:-1] with ids[1:] (position t predicts token t+1)."
        )
    log_p = torch.log_softmax(logits, dim=-1)
    t = torch.arange(seqlen - 1)
    tensor_like(
        v,
        got,
        expected,
        "the per-token NLL",
        hints={
            "compared logits[t] with ids[t], the token the model was given, not the next one (use ids[1:])": -log_p[
                t, ids[:-1]
            ],
            (
                "compared logits[t + 1] with ids[t + 1]: the logits must come from "
                "the position before the token (use logits[:-1])"
            ): -log_p[t + 1, ids[1:]],
            (
                "took the raw logit of the true token; it must be normalised first (log_softmax over the vocabulary)"
            ): -logits[t, ids[1:]],
            "forgot the minus sign: the negative log-likelihood is −log p, a positive number": log_p[t, ids[1:]],
            "returned the probability 1 − p or −p instead of −log p": -log_p[t, ids[1:]].exp(),
            (
                "took the log-softmax over the positions (dim 0) instead of over the vocabulary (dim −1)"
            ): -torch.log_softmax(logits, dim=0)[t, ids[1:]],
        },
    )
    return v.report("These are the values F.cross_entropy(logits[:-1], ids[1:], reduction='none') gives.")


def _nll_windows() -> torch.Tensor:
    """[3 windows, 7 predicted tokens]: windows of different difficulty, so averaging per window differs."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 7, generator=g) * torch.tensor([[1.0], [3.0], [6.0]])


@exercise
def perplexity(fn) -> bool:
    """fn(nll [windows, tokens]) -> float: exp of the mean NLL over ALL predicted tokens of all windows."""
    v = Verdict("perplexity")
    nll = _nll_windows()
    expected = math.exp(nll.double().mean().item())
    got = call(v, fn, nll.clone())
    if isinstance(got, torch.Tensor):
        if got.numel() != 1:
            v.fail(f"you returned a tensor of shape {tuple(got.shape)}: the perplexity is one number over all windows.")
        else:
            got = got.item()
    number_with_hints(
        v,
        got,
        expected,
        "the perplexity",
        rtol=1e-5,
        hints={
            (
                "averaged exp(NLL) (the mean of exp is not the exp of the mean: one hard token then dominates)"
            ): nll.double().exp().mean().item(),
            (
                "averaged the windows' perplexities; perplexities do not average, NLLs do: exp(mean of all NLLs)"
            ): nll.double().mean(1).exp().mean().item(),
            "used exp(−mean NLL), which is 1 / perplexity (the NLL is already negated)": math.exp(
                -nll.double().mean().item()
            ),
            "used 2 ** mean; the NLL is in nats (natural log), so the base is e": 2 ** nll.double().mean().item(),
            "took exp of the sum instead of the mean": math.exp(nll.double().sum().item()),
            "returned the mean NLL itself (the cross-entropy); perplexity is its exponential": nll.double()
            .mean()
            .item(),
        },
    )
    return v.report("exp(mean NLL over every predicted token): what evaluate.perplexity computes.")


class _Tied(nn.Module):
    """An embedding reused as the output layer (as SmolLM2 does), in fp16, plus fp32 and bf16 parts."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 16, dtype=torch.float16)
        self.proj = nn.Linear(16, 24, dtype=torch.bfloat16)
        self.norm = nn.Parameter(torch.ones(16))  # fp32
        self.head = nn.Linear(16, 100, bias=False, dtype=torch.float16)
        self.head.weight = self.embed.weight  # tied: one tensor, two modules


@exercise
def model_bytes(fn) -> bool:
    """fn(model) -> int: bytes of the model's parameters, each at its own dtype's size, a tensor shared
    by two modules counted once (what labkit.evaluate.weight_bytes counts for a plain model)."""
    from ..evaluate import weight_bytes

    v = Verdict("model_bytes")
    cases = [
        ("a model with an fp16 embedding tied to its output layer, a bf16 linear and an fp32 norm", _Tied()),
        ("an fp32 two-layer MLP", nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))),
    ]
    for label, model in cases:
        expected = weight_bytes(model)
        params = list(model.parameters())  # tied tensors once
        count = sum(p.numel() for p in params)
        state = model.state_dict()  # tied tensors under each name
        got = call(v, fn, model)
        if not number_with_hints(
            v,
            got,
            expected,
            f"the byte count of {label}",
            hints={
                "assumed 4 bytes per parameter whatever its dtype (use p.element_size())": 4 * count,
                "assumed 2 bytes per parameter whatever its dtype (use p.element_size())": 2 * count,
                "returned the number of parameters; multiply each by its bytes per element": count,
                "counted bits, not bytes": 8 * expected,
                "counted the tied embedding twice: model.state_dict() lists it under both names, while "
                "model.parameters() yields a shared tensor once": sum(
                    t.numel() * t.element_size() for t in state.values()
                ),
            },
        ):
            break
    return v.report("Each parameter at its dtype's size, shared tensors once.")
