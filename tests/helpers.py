"""Small builders shared by several test files (fixtures live in conftest.py)."""

import pytest
import torch

from labkit import profiles, results

# The Triton kernels' tests: tolerances per dtype (fp32: the same arithmetic in another order; fp16: 11 mantissa
# bits; bf16: 8), and the dtypes they run in.
KERNEL_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def kernel_device() -> str:
    """Where the Triton kernels' tests run: "cpu" in Triton's interpreter, else "cuda"; with neither, the calling
    test module is skipped."""
    from labkit.kernels import _triton

    if _triton.interpreted():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip(
        "TRITON_INTERPRET is off and there is no CUDA GPU: nowhere to run the Triton kernels", allow_module_level=True
    )


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


P = profiles.PROFILES["cpu"]
_PROTOCOL = P.protocol(32, seqlen=512, data="local:x")

ROW = dict(  # a valid results.Row, field by field
    lesson="00_baseline",
    method="fp32",
    setting="-",
    profile="cpu",
    model=P.model,
    params=10,
    weight_bytes=40,
    runtime_bytes=50,
    tokens_per_s=1.5,
    perplexity=20.0,
    seqlen=512,
    eval_windows=32,
    data="local:x",
    device="cpu",
    protocol=_PROTOCOL.as_dict(),
    fingerprint=_PROTOCOL.fingerprint,
)


def row(**kw) -> results.Row:
    """ROW with `kw` changed; its protocol follows a changed model, seqlen, eval_windows or data (unless given)."""
    fields = {**ROW, **kw}
    if "protocol" not in kw and "fingerprint" not in kw:
        try:
            protocol = P.protocol(fields["eval_windows"], seqlen=fields["seqlen"], data=fields["data"]).as_dict()
            protocol["model"] = fields["model"]
            fields.update(protocol=protocol, fingerprint=profiles.fingerprint(protocol))
        except (ValueError, TypeError, AttributeError):  # a bad value the test means to record: keep ROW's protocol
            pass
    return results.Row(**fields)
