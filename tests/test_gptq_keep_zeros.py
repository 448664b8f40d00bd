"""GPTQ after pruning: keep_zeros keeps the sparsity pattern exactly (SparseGPT's joint 2:4 + 4-bit)."""

import pytest
import torch

from labkit import prune
from labkit.quant.gptq import gptq_quantize_weight


def _layer(rows=16, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols**0.5
    W = torch.randn(rows, cols, generator=g)
    return W, 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize("group_size,act_order,sym", [(None, False, False), (32, True, False), (16, False, True)])
def test_keep_zeros_preserves_a_2_4_pattern(group_size, act_order, sym):
    W, H = _layer()
    W = W * ~prune.nm_mask(W.abs(), 2, 4)  # 2:4: the two smallest of every four are zero
    Wq = gptq_quantize_weight(W, H, 4, group_size, sym=sym, act_order=act_order, keep_zeros=True).weight
    assert ((W == 0) & (Wq != 0)).sum() == 0  # every pruned weight is still exactly 0
    plain = gptq_quantize_weight(W, H, 4, group_size, sym=sym, act_order=act_order).weight
    assert ((W == 0) & (plain != 0)).sum() > 0  # without it, GPTQ's updates fill the zeros


def test_keep_zeros_refuses_a_float_offset():
    W, H = _layer()
    with pytest.raises(ValueError, match="keep_zeros=True needs an integer zero point"):
        gptq_quantize_weight(W, H, 4, 32, keep_zeros=True, float_offset=True)


def test_nm_fraction_counts_valid_groups():
    W = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert prune.nm_fraction(W, 2, 4) == 0.5
    with pytest.raises(ValueError, match="not divisible by m=3"):
        prune.nm_fraction(W, 1, 3)
