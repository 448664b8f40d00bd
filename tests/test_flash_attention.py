"""labkit.kernels.flash_attention: the prefill kernel against its torch references, the tiled torch twin
against plain attention and PyTorch's SDPA, the memory-traffic counts, and every input check.

On a CPU machine the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before triton is imported); with TRITON_INTERPRET=0 on a CUDA machine the same tests run compiled.
Tolerances, and why (the kernel computes scores, softmax and sums in fp32 in every dtype):
  fp32: 1e-5 -- the same math in another order: the online softmax sums tile by tile and rescales by
        exp(m_old - m_new), tl.dot sums the head dimension in its own order (measured: under 1e-6).
  fp16: 2e-3 relative -- tl.dot rounds the softmax weights P to fp16 before P·V (as FlashAttention
        does; the reference keeps them fp32), and the output is rounded to fp16: 11 mantissa bits, one
        ulp is 1e-3 at 1.0 (measured: at most one ulp).
  bf16: 2e-2 relative -- 8 mantissa bits, and Triton 3.9's interpreter truncates fp32 -> bf16 instead
        of rounding, so up to 2 bf16 ulps on CPU. (bf16 *arithmetic* is wrong in the interpreter: the
        kernel upcasts bf16 to fp32 there, _triton.compute_in_fp32; only two cases run bf16.)
"""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/conftest.py sets it too)

import pytest
import torch
import torch.nn.functional as F
from helpers import KERNEL_DTYPES, KERNEL_TOL, kernel_device

pytest.importorskip("triton", reason="triton is not installed (`pip install triton`); the kernel is untested")

from labkit.kernels import _triton, offline, roofline
from labkit.kernels.flash_attention import (
    _flash_attention_kernel,
    _flash_attention_triton,
    _flash_meta,
    attention_traffic,
    flash_attention,
    flash_attention_tiled_torch,
    flash_attention_torch,
)

DEVICE = kernel_device()
TOL, DTYPES = KERNEL_TOL, KERNEL_DTYPES

pytestmark = pytest.mark.usefixtures("one_thread")


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


def make_qkv(batch, heads, kv_heads, seq, head_dim, dtype=torch.float32, seed=0):
    """Random q [batch, heads, seq, head_dim] and k, v [batch, kv_heads, seq, head_dim] on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=g)
    return [t.to(dtype).to(DEVICE) for t in (q, k, v)]


# (batch, heads, kv_heads, seq, head_dim): one token; GQA 4/2 and a 17-token prompt (one past a
# 16-key tile); GQA 8/2 at 33; 100 tokens (two 64-query tiles, seven 16-key tiles: a tail in both);
# GQA 3/1 with head_dim 24 (not a power of 2: masked columns) and 130 tokens (past bf16's 128-query tile).
CASES = [
    (1, 2, 2, 1, 16),
    (2, 4, 2, 17, 32),
    (1, 8, 2, 33, 64),
    (1, 4, 4, 100, 16),
    (1, 3, 1, 130, 24),
]


def _id(c):
    return "b{}-h{}-kv{}-n{}-d{}".format(*c) if isinstance(c, tuple) else str(c).removeprefix("torch.")


@pytest.mark.parametrize(
    "case,dtype",
    [(c, dt) for c in CASES for dt in DTYPES[:2]] + [(CASES[i], DTYPES[2]) for i in (1, 4)],
    ids=_id,
)
def test_kernel_matches_reference_causal(case, dtype):
    q, k, v = make_qkv(*case, dtype=dtype)
    out = flash_attention(q, k, v, backend="triton")
    assert out.shape == q.shape and out.dtype == dtype
    close(out, flash_attention_torch(q, k, v), dtype)


@pytest.mark.parametrize("case,dtype", [(CASES[i], dt) for i in (1, 3, 4) for dt in DTYPES[:2]], ids=_id)
def test_kernel_matches_reference_not_causal(case, dtype):
    q, k, v = make_qkv(*case, dtype=dtype, seed=1)
    out = flash_attention(q, k, v, causal=False, backend="triton")
    close(out, flash_attention_torch(q, k, v, causal=False), dtype)


@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16), (16, 16)])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_with_small_tiles(block_m, block_n, causal):
    """Many tiles on a short prompt: query tiles smaller and larger than key tiles, so the causal loop
    ends inside a key tile or on its edge, and both the queries and the keys have a ragged tail."""
    q, k, v = make_qkv(1, 4, 2, 75, 32, seed=2)
    meta = _flash_meta(32, q.dtype) | dict(BLOCK_M=block_m, BLOCK_N=block_n)
    out = _flash_attention_triton(q, k, v, causal, 32**-0.5, meta)
    close(out, flash_attention_torch(q, k, v, causal), torch.float32)


def test_kernel_skips_key_tiles_above_the_diagonal():
    """NaN in the values of keys 48.. (and a finite rest): a query tile that read any of those tiles
    would be NaN (0 · NaN is NaN, masked or not). With 16 x 16 tiles, queries 0..47 read keys up to
    47 only, so they are exact; the tile of queries 48..63 reads the NaN tile."""
    q, k, v = make_qkv(1, 2, 2, 70, 16, seed=3)
    ref = flash_attention_torch(q, k, v)
    v[:, :, 48:] = float("nan")
    meta = _flash_meta(16, q.dtype) | dict(BLOCK_M=16, BLOCK_N=16)
    out = _flash_attention_triton(q, k, v, True, 0.25, meta)
    close(out[:, :, :48], ref[:, :, :48], torch.float32)
    assert out[:, :, 48:].isnan().all()


def test_kernel_never_reads_past_the_tensor():
    """The batch after the one passed (contiguous memory right after the tensors' end) is all NaN: the
    masked tails of the last query tile, the last key tile and the padded head_dim must not touch it."""
    q, k, v = make_qkv(2, 4, 2, 37, 24, seed=4)
    for t in (q, k, v):
        t[1] = float("nan")
    out = flash_attention(q[:1], k[:1], v[:1], backend="triton")
    close(out, flash_attention_torch(q[:1], k[:1], v[:1]), torch.float32)


def test_scale_empty_and_auto_backend():
    q, k, v = make_qkv(1, 4, 2, 21, 16, seed=5)
    out = flash_attention(q, k, v, scale=0.3, backend="triton")
    close(out, flash_attention_torch(q, k, v, scale=0.3), torch.float32)
    assert not torch.allclose(out, flash_attention_torch(q, k, v), atol=1e-3)  # the scale mattered
    for shape in [(1, 2, 0, 16), (0, 2, 5, 16)]:  # no tokens, no sequences
        empty = torch.zeros(shape, device=DEVICE)
        assert flash_attention(empty, empty, empty, backend="triton").shape == shape
    if DEVICE == "cpu":  # "auto" never picks the interpreter: on CPU it is the torch reference, exactly
        assert torch.equal(flash_attention(q, k, v), flash_attention_torch(q, k, v))


# --- the references ------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4], (2, 6, 3, 9, 8)], ids=_id)
def test_references_match_sdpa(case, causal):
    """The plain reference and the tiled twin both equal PyTorch's scaled_dot_product_attention (fp32:
    the same math in another order, 1e-5); SDPA gets grouped KV heads through enable_gqa, and again as
    explicitly repeated heads."""
    q, k, v = (t.cpu() for t in make_qkv(*case, seed=6))
    group = q.shape[1] // k.shape[1]
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    repeated = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=causal
    )
    torch.testing.assert_close(sdpa, repeated, rtol=1e-5, atol=1e-5)
    close(flash_attention_torch(q, k, v, causal), sdpa, torch.float32)
    close(flash_attention_tiled_torch(q, k, v, causal, block_m=4, block_n=3), sdpa, torch.float32)


@pytest.mark.parametrize("block_m,block_n", [(1, 1), (4, 8), (8, 4), (16, 16), (64, 16), (200, 200)])
@pytest.mark.parametrize("causal", [True, False])
def test_tiled_twin_equals_plain_attention(block_m, block_n, causal):
    """The online softmax (running max, sum and rescaled output) gives plain attention for any tiling,
    tiles of one token and tiles longer than the prompt included; fp32, 1e-5 (summation order)."""
    q, k, v = (t.cpu() for t in make_qkv(2, 4, 2, 29, 16, seed=7))
    twin = flash_attention_tiled_torch(q, k, v, causal, scale=0.2, block_m=block_m, block_n=block_n)
    close(twin, flash_attention_torch(q, k, v, causal, scale=0.2), torch.float32)


def test_plain_reference_by_hand():
    """Query 0 sees only key 0: its output is v[0]. Query 1 with equal scores for keys 0 and 1: the mean."""
    q = torch.zeros(1, 1, 2, 4)
    k = torch.randn(1, 1, 2, 4, generator=torch.Generator().manual_seed(8))
    v = torch.tensor([[[[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]]]])
    out = flash_attention_torch(q, k, v)
    torch.testing.assert_close(out[0, 0], torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]]))
    torch.testing.assert_close(flash_attention_torch(q, k, v, causal=False)[0, 0, 0], torch.tensor([2.0] * 4))


# --- memory traffic --------------------------------------------------------------------------------------


def test_traffic_small_case_by_hand():
    """batch 1, 4 query heads, 2 KV heads, 10 tokens, head_dim 8, fp16 (2 bytes), query tiles of 4."""
    q_bytes = 1 * 4 * 10 * 8 * 2  # 640, and O the same
    kv_bytes = 1 * 2 * 10 * 8 * 2  # 320 for K, 320 for V
    minimum = 2 * q_bytes + 2 * kv_bytes  # 1920
    scores = 4 * (1 * 4 * 10 * 10 * 2)  # S written, S read, P written, P read: 3200
    # causal: the three query tiles (queries 0-3, 4-7, 8-9) read keys 0-3, 0-7 and 0-9: 4 + 8 + 10 = 22
    # rows of K and of V, for each of the 4 query heads: 2 * 4 * 22 * 8 * 2 = 2816 bytes
    assert (q_bytes, kv_bytes, minimum, scores) == (640, 320, 1920, 3200)
    assert attention_traffic(1, 4, 2, 10, 8, 2, block_m=4) == dict(
        minimum=minimum, naive=minimum + scores, tiled=2 * q_bytes + 2816, scores=scores, kv_tiled=2816
    )
    # not causal: each tile reads all 10 keys: 2 * 4 * 30 * 8 * 2 = 3840
    assert attention_traffic(1, 4, 2, 10, 8, 2, block_m=4, causal=False)["tiled"] == 2 * 640 + 3840
    # one query tile covering the prompt, and a KV head per query head: the minimum
    one_tile = attention_traffic(1, 4, 4, 10, 8, 2, block_m=16)
    assert one_tile["tiled"] == one_tile["minimum"] == 4 * 640


def test_traffic_naive_matches_eager_pytorch():
    """The naive count is what eager PyTorch moves for Q·Kᵀ, softmax, P·V (roofline.count_traffic on
    meta tensors: every op reads its inputs and writes its output; views move nothing)."""
    q, k, v = (torch.empty(2, 4, 10, 8, dtype=torch.float16, device="meta") for _ in range(3))
    ops = roofline.count_traffic(lambda q, k, v: (q @ k.transpose(-1, -2)).softmax(-1) @ v, q, k, v)
    moved = sum(op.total for op in ops if "view" not in op.op)  # matmul reshapes with _unsafe_view
    assert moved == attention_traffic(2, 4, 4, 10, 8, 2, block_m=64)["naive"]


def test_traffic_at_llama_7b_shapes():
    """The numbers in the module's docstring: 32 heads of 128, 2048 tokens, fp16, fp16's 64-query tile."""
    MiB = 2**20
    t = attention_traffic(1, 32, 32, 2048, 128, 2, block_m=_flash_meta(128, torch.float16)["BLOCK_M"])
    assert (t["minimum"], t["naive"], t["tiled"], t["scores"], t["kv_tiled"]) == tuple(
        n * MiB for n in (64, 1088, 560, 1024, 528)
    )
    assert attention_traffic(1, 32, 32, 2048, 128, 2, block_m=64, causal=False)["tiled"] == 1056 * MiB


# --- the launcher, the offline compile, and the input checks ----------------------------------------------


def test_meta_and_offline_case():
    """Tiles of at least 16 (tl.dot's minimum) in every dtype, and the offline compile covers the kernel at
    LLaMA-7B's shapes with the launcher's own meta, in fp16, bf16 and fp32."""
    for dtype in DTYPES:
        for arch in (None, 75, 80, 89, 90):
            meta = _flash_meta(128, dtype, arch)
            assert meta["BLOCK_M"] >= 16 and meta["BLOCK_N"] >= 16 and meta["BLOCK_D"] == 128
            assert _flash_meta(24, dtype, arch)["BLOCK_D"] == 32 and _flash_meta(8, dtype, arch)["BLOCK_D"] == 16
            (case,) = [c for c in offline.cases(dtype, arch=arch) if c.kernel is _flash_attention_kernel]
            assert case.meta == meta | dict(CAUSAL=True)
            assert case.args["num_heads"] == 32 and case.args["seq_len"] == 2048 and case.args["head_dim"] == 128
            assert math.isclose(case.args["scale"], 128**-0.5)
    # tensor cores from sm80: 64 x 64 tiles, fewer stages where shared memory is 99 KB; the T4 and fp32 keep 64 x 16
    for arch, warps, stages in ((80, 8, 3), (86, 8, 2), (89, 8, 2), (90, 4, 3)):
        for dtype in (torch.float16, torch.bfloat16):
            tiles = {k: _flash_meta(128, dtype, arch)[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
            assert tiles == dict(BLOCK_M=64, BLOCK_N=64, num_warps=warps, num_stages=stages)
    for arch, dtype in ((75, torch.float16), (90, torch.float32), (None, torch.float16)):
        meta = _flash_meta(128, dtype, arch)
        assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"]) == (64, 16, 8) and "num_stages" not in meta


def test_input_errors(monkeypatch):
    q, k, v = make_qkv(1, 4, 2, 5, 16)

    def call(**changes):
        args = dict(q=q, k=k, v=v) | changes
        return flash_attention(**args, backend="triton")

    with pytest.raises(ValueError, match=r"q must be \[batch, num_heads, seq, head_dim\]"):
        call(q=q[0])
    with pytest.raises(ValueError, match=r"k must be \[batch, num_kv_heads, seq, head_dim\]"):
        call(k=k[0], v=v[0])
    with pytest.raises(ValueError, match="v must have k's shape"):
        call(v=v[:, :1].contiguous())
    with pytest.raises(ValueError, match="k has batch 2, q has 1"):
        call(k=torch.cat([k, k]), v=torch.cat([v, v]))
    with pytest.raises(ValueError, match="k has seq 4, q has 5"):
        call(k=k[:, :, :4].contiguous(), v=v[:, :, :4].contiguous())
    with pytest.raises(ValueError, match="head_dim mismatch: q has 16, k has 8"):
        call(k=k[..., :8].contiguous(), v=v[..., :8].contiguous())
    with pytest.raises(ValueError, match=r"num_heads=3 \(q\) is not a multiple of num_kv_heads=2 \(k\)"):
        call(q=q[:, :3].contiguous())
    with pytest.raises(ValueError, match="q must be float16, bfloat16 or float32"):
        call(q=q.double())
    with pytest.raises(ValueError, match="v must be float16, bfloat16 or float32"):
        call(v=v.double())
    with pytest.raises(ValueError, match="must share a dtype"):
        call(k=k.half())
    with pytest.raises(ValueError, match="q must be contiguous"):
        call(q=q.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="k must be contiguous"):
        call(k=k.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(ValueError, match="must be on one device"):
        call(k=k.to("meta"))
    with pytest.raises(ValueError, match="causal must be True or False"):
        call(causal="yes")
    with pytest.raises(ValueError, match="scale must be a number or None"):
        call(scale="0.1")
    with pytest.raises(ValueError, match="scale must be finite"):
        call(scale=float("inf"))
    with pytest.raises(TypeError, match=r"q must be a torch\.Tensor"):
        call(q=q.tolist())
    with pytest.raises(ValueError, match="choose one of"):
        flash_attention(q, k, v, backend="cuda")
    if DEVICE == "cpu":
        monkeypatch.setattr(_triton, "interpreted", lambda: False)  # as if TRITON_INTERPRET were unset
        with pytest.raises(ValueError, match=r"Triton compiles for a CUDA GPU.*TRITON_INTERPRET=1"):
            call()
