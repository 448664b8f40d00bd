"""labkit.check.lesson10: right answers pass, typical wrong answers get their specific message."""

import pytest
import torch
import triton
import triton.language as tl

from labkit import check
from labkit.kernels import roofline


def test_counted_bytes_matches_the_hand_count():
    # add 3n, pow 2n, mean n + rows, + eps 2 rows, rsqrt 2 rows, h * r 2n + rows, weight * 2n + hidden
    for rows, hidden in [(1, 8), (5, 64)]:
        n = rows * hidden
        assert check.lesson10.counted_bytes(rows, hidden) == 4 * (10 * n + 6 * rows + hidden)


def test_unfused_rmsnorm_residual_bytes(capsys):
    L = check.lesson10
    assert L.unfused_rmsnorm_residual_bytes(lambda rows, hidden: 4 * (10 * rows * hidden + 6 * rows + hidden))
    assert L.unfused_rmsnorm_residual_bytes(lambda rows, hidden: 4 * (10 * rows * hidden + hidden))  # rows terms: < 1%
    capsys.readouterr()
    assert not L.unfused_rmsnorm_residual_bytes(lambda rows, hidden: 10 * rows * hidden + 6 * rows + hidden)
    assert "elements, not bytes" in capsys.readouterr().out
    assert not L.unfused_rmsnorm_residual_bytes(lambda rows, hidden: 4 * (4 * rows * hidden + hidden))
    assert "one fused kernel" in capsys.readouterr().out
    assert not L.unfused_rmsnorm_residual_bytes(lambda rows, hidden: 4 * (10 * rows * hidden + 6 * rows))
    assert "left out the weight" in capsys.readouterr().out

    def todo(rows, hidden):
        raise NotImplementedError

    assert not L.unfused_rmsnorm_residual_bytes(todo)
    assert "not written yet" in capsys.readouterr().out


def test_matmul_intensity(capsys):
    L = check.lesson10
    assert L.matmul_intensity(lambda m, n, k, b: 2 * m * n * k / ((m * k + n * k + m * n) * b))
    cost = roofline.linear_cost(16, 11008, 4096, act_bytes=2, weight_bytes=2)  # the library agrees
    assert L.matmul_intensity(lambda m, n, k, b: roofline.linear_cost(m, n, k, b, b).intensity)
    assert abs(cost.intensity - 2 * 16 * 11008 * 4096 / ((16 * 4096 + 11008 * 4096 + 16 * 11008) * 2)) < 1e-9
    capsys.readouterr()
    assert not L.matmul_intensity(lambda m, n, k, b: m * n * k / ((m * k + n * k + m * n) * b))
    assert "two" in capsys.readouterr().out
    assert not L.matmul_intensity(lambda m, n, k, b: 2 * m * n * k / (n * k * b))
    assert "only the weight" in capsys.readouterr().out
    assert not L.matmul_intensity(lambda m, n, k, b: (m * k + n * k + m * n) * b / (2 * m * n * k))
    assert "FLOPs per byte" in capsys.readouterr().out


# Learner kernels for the RMSNorm build-it: the stub of the lesson's cell and typical slips. Triton needs
# their source, so they live at module level (in the interpreter: tests/conftest.py sets TRITON_INTERPRET=1).


@triton.jit
def _stub(
    out_ptr,
    x_ptr,
    residual_ptr,
    residual_out_ptr,
    weight_ptr,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # noqa: F841 - as the lesson's cell starts
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden  # noqa: F841


@triton.jit
def _rms(
    out_ptr,
    x_ptr,
    residual_ptr,
    residual_out_ptr,
    weight_ptr,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    DIVISOR: tl.constexpr,
    STORE_H: tl.constexpr,
    USE_H: tl.constexpr,
    WEIGHT: tl.constexpr,
):
    """A right kernel with switches for the slips (DIVISOR 0: hidden, else that number)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * hidden + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * hidden + offs, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(residual_out_ptr.dtype.element_ty)
        if STORE_H:
            tl.store(residual_out_ptr + row * hidden + offs, h, mask=mask)
        if USE_H:
            x = h.to(tl.float32)
    n = hidden if DIVISOR == 0 else DIVISOR
    var = tl.sum(x * x, axis=0) / n
    normed = (x / tl.sqrt(var + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    if WEIGHT:
        normed = normed * tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + offs, normed.to(out_ptr.dtype.element_ty), mask=mask)


class _Variant:
    """_rms with fixed switches, launched as kernel[grid](...) like any kernel."""

    def __init__(self, **switches):
        self.fn, self.switches = _rms.fn, dict(DIVISOR=0, STORE_H=True, USE_H=True, WEIGHT=True) | switches

    def __getitem__(self, grid):
        return lambda *args, **meta: _rms[grid](*args, **meta, **self.switches)


def test_rms_norm_kernel(capsys):
    from labkit import kernels

    L = check.lesson10
    assert L.rms_norm_kernel(kernels.rms_norm_kernel)
    assert L.rms_norm_kernel(_Variant())
    assert capsys.readouterr().out.startswith("✓ rms_norm_kernel")
    wrong = {
        "not written yet: your kernel stored nothing": _stub,
        "divided the sum of squares by BLOCK (256) instead of hidden (203)": _Variant(DIVISOR=256),
        "h = x + residual was never stored": _Variant(STORE_H=False),
        "normalised x without the residual": _Variant(USE_H=False),
        "forgot to multiply by the weight": _Variant(WEIGHT=False),
        "decorate your function with @triton.jit": _rms.fn,
    }
    for words, answer in wrong.items():
        assert not L.rms_norm_kernel(answer), words
        assert words in capsys.readouterr().out, words


def test_a_bad_kernel_leaves_the_fused_model_unchanged(capsys):
    from labkit import models
    from labkit.kernels import llama as fused_llama

    model = models.load("tiny-llama-random")[0]
    forwards = [layer.forward for layer in model.model.layers]
    with pytest.raises(ValueError, match="computes something else than RMSNorm"):
        fused_llama.fuse(model, rms_norm_kernel=_Variant(DIVISOR=64))
    with pytest.raises(ValueError, match="pass a Triton kernel"):
        fused_llama.fuse(model, rms_norm_kernel=_rms.fn)
    assert [layer.forward for layer in model.model.layers] == forwards
    fused_llama.fuse(model, rms_norm_kernel=_Variant(), layers=[0])
    fused_llama.set_backend(model, "triton", layers=[0])
    assert model.model.layers[0].forward.keywords["rms_norm_kernel"].switches["DIVISOR"] == 0  # kept by set_backend
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
