"""Small builders shared by several test files (fixtures live in conftest.py)."""

import torch

from labkit import results


def correlated_layer(seed=0, rows=32, columns=64, tokens=512, noise=0.3):
    """A weight and inputs whose features are correlated and unevenly scaled, like an LLM's."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, columns, generator=g)  # [rows, columns]
    mixing = torch.randn(columns, columns, generator=g) / columns**0.5
    scales = torch.ones(columns)
    scales[:4] = 10.0  # a few outlier channels
    X = torch.randn(tokens, columns, generator=g) @ mixing * scales + noise * torch.randn(tokens, columns, generator=g)
    return W, X  # X: [tokens, columns]


def output_error(W, W_hat, X):
    return ((X @ W.T - X @ W_hat.T) ** 2).sum().item()  # ‖WX − ŴX‖²


ROW = dict(  # a valid results.Row, field by field
    lesson="00_baseline",
    method="fp32",
    setting="-",
    profile="cpu",
    model="m",
    params=10,
    weight_bytes=40,
    runtime_bytes=50,
    tokens_per_s=1.5,
    perplexity=20.0,
    seqlen=512,
    eval_windows=32,
    data="local:x",
    device="cpu",
)


def row(**kw) -> results.Row:
    return results.Row(**{**ROW, **kw})
