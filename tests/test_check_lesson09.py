"""Lesson 09's exercise checks: the right answer passes, typical mistakes get their own message."""

import math

import pytest
import torch
import triton
import triton.language as tl

from labkit import check
from labkit.kernels import weighted_sum


def kv_bytes_per_token(config, dtype_bytes):
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes


def test_kv_bytes_per_token(capsys):
    assert check.lesson09.kv_bytes_per_token(kv_bytes_per_token)
    assert capsys.readouterr().out.startswith("✓ kv_bytes_per_token")

    assert not check.lesson09.kv_bytes_per_token(lambda config, b: kv_bytes_per_token(config, b) // 2)
    assert "forgot the factor 2" in capsys.readouterr().out

    assert not check.lesson09.kv_bytes_per_token(
        lambda config, b: 2 * config.num_hidden_layers * config.hidden_size * b
    )
    assert "used the query heads" in capsys.readouterr().out


def slot(block_table, block_size, t):
    return block_table[t // block_size] * block_size + t % block_size


def test_slot(capsys):
    assert check.lesson09.slot(slot)
    assert capsys.readouterr().out.startswith("✓ slot")

    assert not check.lesson09.slot(lambda table, block_size, t: t)
    assert "returned the logical position t" in capsys.readouterr().out

    assert not check.lesson09.slot(lambda table, block_size, t: table[t // block_size] + t % block_size)
    assert "forgot to multiply the physical block by the block size" in capsys.readouterr().out


def paged_waste(lengths, block_size):
    return 1 - sum(lengths) / sum(math.ceil(n / block_size) * block_size for n in lengths)


def test_paged_waste(capsys):
    assert check.lesson09.paged_waste(paged_waste)
    assert capsys.readouterr().out.startswith("✓ paged_waste")

    assert not check.lesson09.paged_waste(lambda lengths, b: 1 - sum(lengths) / sum(n // b * b for n in lengths))
    assert "rounded the blocks down" in capsys.readouterr().out

    def per_request(lengths, b):
        return sum(1 - n / (math.ceil(n / b) * b) for n in lengths) / len(lengths)

    assert not check.lesson09.paged_waste(per_request)
    assert "averaged each request's waste" in capsys.readouterr().out


# Learner steps for the online-softmax build-it (module level: Triton reads their source; tests/conftest.py
# sets TRITON_INTERPRET=1, so they run in the interpreter).


@triton.jit
def _unchanged(m_i, l_i, acc, s, v):  # the lesson's stub
    return m_i, l_i, acc


@triton.jit
def _slip(m_i, l_i, acc, s, v, RESCALE_L: tl.constexpr, RESCALE_ACC: tl.constexpr, OLD_MAX: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_i[:, None]) if OLD_MAX else tl.exp(s - m_new[:, None])
    l_new = (l_i * alpha if RESCALE_L else l_i) + tl.sum(p, 1)
    acc_new = (acc * alpha[:, None] if RESCALE_ACC else acc) + weighted_sum(p, v)
    return m_new, l_new, acc_new


@triton.jit
def _no_l_rescale(m_i, l_i, acc, s, v):
    return _slip(m_i, l_i, acc, s, v, False, True, False)


@triton.jit
def _no_acc_rescale(m_i, l_i, acc, s, v):
    return _slip(m_i, l_i, acc, s, v, True, False, False)


@triton.jit
def _old_max(m_i, l_i, acc, s, v):
    return _slip(m_i, l_i, acc, s, v, True, True, True)


@triton.jit
def _right(m_i, l_i, acc, s, v):
    return _slip(m_i, l_i, acc, s, v, True, True, False)


def test_online_softmax_step(capsys):
    from labkit import kernels

    L = check.lesson09
    assert L.online_softmax_step(kernels.online_softmax_step)
    assert L.online_softmax_step(_right)
    assert capsys.readouterr().out.startswith("✓ online_softmax_step")
    wrong = {
        "not written yet: it returns the state it was given, unchanged": _unchanged,
        "forgot to rescale l": _no_l_rescale,
        "forgot to rescale acc": _no_acc_rescale,
        "NaN or infinite": _old_max,  # exp(s - (-inf)) on the first tile
        "pass a function decorated with @triton.jit": _right.fn,
    }
    for words, answer in wrong.items():
        assert not L.online_softmax_step(answer), words
        assert words in capsys.readouterr().out, words


def test_the_learners_step_runs_the_paged_kernel(capsys):
    from labkit import kernels, solutions
    from labkit.check.lesson09 import _paged_example

    args = _paged_example()
    reference = kernels.paged_attention_decode(*args, backend="triton")
    mine = kernels.paged_attention_decode(*args, backend="triton", step=solutions.lesson09.online_softmax_step)
    assert torch.equal(mine, reference)  # the worked solution is labkit's step, bit for bit
    slipped = kernels.paged_attention_decode(*args, backend="triton", step=_no_acc_rescale)
    assert not torch.allclose(slipped, reference, atol=1e-3)  # the step passed is the one that runs
    for bad in (_right.fn, "online_softmax_step", kernels.rms_norm_kernel):
        with pytest.raises(ValueError, match=r"pass a function decorated with @triton\.jit"):
            kernels.paged_attention_decode(*args, backend="triton", step=bad)
