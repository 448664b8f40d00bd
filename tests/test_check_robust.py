"""Every exercise check answers in words, whatever the learner's function does: NaN, inf, a wrong type
or shape, an exception, a stub. Never "✓ correct" for a wrong answer, never a traceback."""

import importlib
import inspect
import math

import pytest
import torch
from torch.nn import functional as F

from labkit import check, kernels, serving, solutions
from labkit.course import lesson_id, lessons
from labkit.distill import losses
from labkit.lowrank import break_even
from labkit.prune import masks, sparse_storage
from labkit.quant import formats
from labkit.quant import pack as packing
from labkit.quant.qlinear import QuantLinear
from labkit.serving import block_manager


def _pareto(points):
    front, best = [], math.inf
    for point in sorted(points):
        if point[1] < best:
            front.append(point)
            best = point[1]
    return front


def _quantize_asym(x, bits):
    q, scale, zero = formats.quantize(x[None], bits, scale_dtype=None)
    return q[0].long(), formats.dequantize(q, scale, zero)[0]


def _rms_norm(x, weight, eps):
    xf = x.float()
    return (weight.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# A right answer for every check: the baseline each broken answer below is made from.
SOLUTIONS = {
    "lesson00.token_nll": lambda logits, ids: F.cross_entropy(logits[:-1], ids[1:], reduction="none"),
    "lesson00.perplexity": lambda nll: math.exp(nll.double().mean().item()),
    "lesson00.model_bytes": lambda m: sum(p.numel() * p.element_size() for p in m.parameters()),
    "lesson01.wanda_mask": solutions.lesson01.wanda_mask,
    "lesson01.nm_mask": lambda score, n, m: masks.nm_mask(score, n, m),
    "lesson01.bitmask_bytes": lambda w: sparse_storage.bitmask_bytes(w),
    "lesson02.obs_error": lambda w, H: w**2 / (2 * torch.linalg.inv(H).diagonal()),
    "lesson02.obs_update": lambda w, H, q: w - w[q] / torch.linalg.inv(H)[q, q] * torch.linalg.inv(H)[:, q],
    "lesson02.obs_block": solutions.lesson02.obs_block,
    "lesson02.output_error": lambda W, W_hat, H: (
        torch.trace((W - W_hat) @ H @ (W - W_hat).T) / torch.trace(W @ H @ W.T)
    ).item(),
    "lesson03.unit_scores": solutions.lesson03.unit_scores,
    "lesson03.kv_group_columns": lambda g, n_heads, n_kv, d: torch.arange(
        g * (n_heads // n_kv) * d, (g + 1) * (n_heads // n_kv) * d
    ),
    "lesson03.compensation_bias": lambda W, x, removed: W[:, removed] @ x[:, removed].mean(0),
    "lesson04.rtn_quantize": solutions.lesson04.rtn_quantize,
    "lesson04.quantize_asym": _quantize_asym,
    "lesson04.pack_int4": lambda codes: packing.pack(codes, 4),
    "lesson04.quantlinear_bytes": lambda out_f, in_f, bits, gs: QuantLinear(in_f, out_f, bits, gs).stored_bytes(),
    "lesson05.hessian": lambda X: 2 * X.T @ X / X.shape[0],
    "lesson05.obq_update": lambda W, H, q, wq_hat: (
        W - ((W[:, q] - wq_hat) / torch.linalg.inv(H)[q, q])[:, None] * torch.linalg.inv(H)[q][None, :]
    ),
    "lesson05.act_order": lambda H: torch.argsort(torch.diag(H), descending=True),
    "lesson05.gptq_block": solutions.lesson05.gptq_block,
    "lesson06.absmax_int8": lambda x: (torch.round(x / (x.abs().max() / 127)).to(torch.int8), x.abs().max() / 127),
    "lesson06.outlier_features": lambda X, threshold: (X.abs() >= threshold).any(0),
    "lesson06.smoothing_factors": solutions.lesson06.smoothing_factors,
    "lesson07.soft_targets": lambda logits, tau: torch.softmax(logits / tau, -1),
    "lesson07.forward_kl": lambda s, t, tau: losses.forward_kl(s, t, tau),
    "lesson07.jsd": lambda s, t, beta: losses.jsd(s, t, beta),
    "lesson08.whitened_factors": solutions.lesson08.whitened_factors,
    "lesson08.factored_params": lambda out_f, in_f, r: r * (in_f + out_f),
    "lesson08.break_even_rank": lambda out_f, in_f: break_even(out_f, in_f),
    "lesson08.rank_r_approximation": lambda W, r: (lambda U, S, Vh: U[:, :r] @ torch.diag(S[:r]) @ Vh[:r])(
        *torch.linalg.svd(W, full_matrices=False)
    ),
    "lesson09.kv_bytes_per_token": lambda cfg, b: block_manager.kv_bytes_per_token(cfg, b),
    "lesson09.slot": lambda table, b, t: table[t // b] * b + t % b,
    "lesson09.online_softmax_step": kernels.online_softmax_step,
    "lesson09.paged_waste": lambda lengths, b: 1 - sum(lengths) / sum(math.ceil(n / b) * b for n in lengths),
    "lesson10.unfused_rmsnorm_residual_bytes": lambda rows, hidden: check.lesson10.counted_bytes(rows, hidden),
    "lesson10.matmul_intensity": lambda m, n, k, b: 2 * m * n * k / ((m * k + n * k + m * n) * b),
    "lesson10.rms_norm_kernel": kernels.rms_norm_kernel,
    "lesson11.bubble_fraction": lambda p, m: (p - 1) / (m + p - 1),
    "lesson11.linear_slices": solutions.lesson11.linear_slices,
    "lesson11.ring_bytes_per_token": lambda hidden, layers, b, world: 2 * (world - 1) / world * 2 * layers * hidden * b,
    "lesson05b.scaled_error": solutions.lesson05b.scaled_error,
    "lesson10b.accept_tokens": serving.accept_tokens,
    "lesson12.pareto_front": _pareto,
    "lesson12.bits_per_weight_24": lambda value_bits: (value_bits + 2) / 2,
}


def _checks() -> list[str]:
    names = []
    for path in lessons():
        n = lesson_id(path)
        module = importlib.import_module(f"labkit.check.lesson{n}")
        for name, fn in vars(module).items():
            is_check = inspect.isfunction(fn) and list(inspect.signature(fn).parameters) == ["fn"]
            if is_check and fn.__module__ == module.__name__ and not name.startswith("_"):
                names.append(f"lesson{n}.{name}")
    return names


CHECKS = _checks()


def _check(key: str):
    lesson, name = key.split(".")
    return getattr(getattr(check, lesson), name)


def test_every_check_is_covered():
    assert len(CHECKS) == 45 and sorted(CHECKS) == sorted(SOLUTIONS)


def _poison(value, fill: float, everywhere: bool = True):
    """The same answer with NaN or inf in it: a float tensor (int tensors become float), a number."""
    if isinstance(value, torch.Tensor):
        out = value.detach().clone().double() if not value.is_floating_point() else value.detach().clone()
        if everywhere:
            return out.fill_(fill)
        out.view(-1)[-1] = fill  # one bad entry, the rest right
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(_poison(v, fill, everywhere) for v in value)
    return fill


def _reshaped(value):
    if isinstance(value, torch.Tensor):
        return value[None]
    if isinstance(value, (list, tuple)):
        return type(value)(_reshaped(v) for v in value)
    return [value, value]


def _raise(error):
    def broken(*args, **kwargs):
        raise error

    return broken


def _stub(*args, **kwargs): ...


BROKEN = {
    "nan": lambda right: lambda *a: _poison(right(*a), math.nan),
    "inf": lambda right: lambda *a: _poison(right(*a), math.inf),
    "-inf": lambda right: lambda *a: _poison(right(*a), -math.inf),
    "one nan": lambda right: lambda *a: _poison(right(*a), math.nan, everywhere=False),
    "scalar nan": lambda right: lambda *a: math.nan,
    "nan tensor": lambda right: lambda *a: torch.tensor(math.nan),
    "raises": lambda right: _raise(ValueError("boom")),
    "not implemented": lambda right: _raise(NotImplementedError),
    "stub returning None": lambda right: _stub,
    "returns ...": lambda right: lambda *a: ...,
    "a string": lambda right: lambda *a: "42",
    "a bool": lambda right: lambda *a: True,
    "wrong shape": lambda right: lambda *a: _reshaped(right(*a)),
    "complex": lambda right: lambda *a: torch.tensor(1 + 2j),
}
KERNELS = {
    "lesson09.online_softmax_step",
    "lesson10.rms_norm_kernel",
}  # checks of Triton kernels (their own tests try broken kernels)
EXPECTED_WORDS = {
    "raises": "raised ValueError: boom",
    "not implemented": "not written yet",
    "stub returning None": "returned None",
    "returns ...": "returned `...`",
}


@pytest.mark.parametrize("key", CHECKS)
def test_right_answer_passes(key, capsys):
    assert _check(key)(SOLUTIONS[key]) is True
    assert capsys.readouterr().out.startswith(f"✓ {key.split('.')[1]}: correct.")


@pytest.mark.parametrize("kind", list(BROKEN))
@pytest.mark.parametrize("key", CHECKS)
def test_broken_answer_gets_a_verdict_in_words(key, kind, capsys):
    name = key.split(".")[1]
    assert _check(key)(BROKEN[kind](SOLUTIONS[key])) is False
    out = capsys.readouterr().out
    assert out.startswith(f"✗ {name}: ") and "correct" not in out.split("\n")[0][: len(name) + 20]
    # the shared helpers word it; the last-resort net of @exercise is not needed for these answers
    assert "could not be compared" not in out, out
    if key in KERNELS:  # every broken answer here is a plain Python function, not a Triton kernel
        assert "@triton.jit" in out, out
    elif kind in EXPECTED_WORDS:
        assert EXPECTED_WORDS[kind] in out, out


def test_the_net_words_an_answer_no_helper_foresaw(capsys):
    @check.exercise
    def fragile(fn):
        return fn() + 1  # a check that trusts its answer to be a number

    assert fragile(lambda: "a string") is False
    out = capsys.readouterr().out
    assert out.startswith("✗ fragile: your answer could not be compared") and "TypeError" in out


def test_passing_a_result_instead_of_the_function(capsys):
    assert check.lesson00.perplexity(3.5) is False
    assert "pass your function itself" in capsys.readouterr().out


def test_the_answers_of_issue_17(capsys):
    """NaN once passed as "✓ correct"; a NaN tensor and a NaN count once crashed the checker."""
    assert not check.lesson00.perplexity(lambda nll: float("nan"))
    assert "the perplexity is nan, not a finite number" in capsys.readouterr().out
    assert not check.lesson01.bitmask_bytes(lambda w: float("nan"))
    assert "is nan, not a finite number" in capsys.readouterr().out
    assert not check.lesson01.wanda_mask(lambda W, norm, sparsity: torch.full_like(W, math.nan))
    assert "has dtype torch.float32; return a bool tensor" in capsys.readouterr().out
    assert not check.lesson07.soft_targets(lambda logits, tau: torch.full_like(logits, math.nan))
    assert "NaN or infinite entries" in capsys.readouterr().out
    assert not check.lesson08.factored_params(lambda out_f, in_f, r: float("nan"))
    assert "is nan, not a finite number" in capsys.readouterr().out
