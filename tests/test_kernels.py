"""labkit.kernels: every Triton kernel against its torch reference, and every input check.

On a CPU machine the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before triton is imported); with TRITON_INTERPRET=0 on a CUDA machine the same tests run compiled on
the GPU.
Tolerances, and why:
  fp32: 1e-5 -- the same math in another summation order (online softmax, tiled dot products).
  fp16: 2e-3 relative -- the kernels round where PyTorch rounds, except that tl.dot rounds P (the
        softmax weights) to fp16 before P·V as FlashAttention does, and fp16 has 11 mantissa bits.
  bf16: 2e-2 relative -- 8 mantissa bits; and Triton 3.9's interpreter truncates fp32 -> bf16
        instead of rounding (measured), so results can differ by up to 2 bf16 ulps on CPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/conftest.py sets it too)

import pytest
import torch
from helpers import KERNEL_DTYPES, KERNEL_TOL, kernel_device

pytest.importorskip("triton", reason="triton is not installed (`pip install triton`); the kernels are untested")

from labkit import kernels
from labkit.kernels import _triton, paged_attention
from labkit.kernels.fused import (
    rms_norm,
    rms_norm_torch,
    rotary,
    rotary_torch,
    silu_and_mul,
    swiglu,
    swiglu_torch,
    w4a16_dequantize,
    w4a16_from_codes,
    w4a16_matmul,
    w4a16_matmul_torch,
    w4a16_unpack,
)
from labkit.kernels.paged_attention import paged_attention_decode, paged_attention_decode_torch

DEVICE = kernel_device()
TOL, DTYPES = KERNEL_TOL, KERNEL_DTYPES


pytestmark = pytest.mark.usefixtures("one_thread")


def close(actual, expected, dtype, scale=1.0):
    """assert_close with the dtype's tolerance; atol is relative to `scale` (the outputs' magnitude)."""
    tol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol["rtol"], atol=tol["atol"] * scale)


# --- paged attention ---------------------------------------------------------------------------------


def make_paged(context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0, spare_blocks=3):
    """Random q and caches; each sequence's blocks are scattered (a random permutation of the pool),
    and the unused tail of every block-table row holds garbage (-1) that must never be read."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(n + block_size - 1) // block_size for n in context_lens]
    width = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + spare_blocks
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.full((len(context_lens), width), -1, dtype=torch.int32)
    for s, nb in enumerate(blocks_per_seq):
        tables[s, :nb] = torch.tensor([perm.pop() for _ in range(nb)], dtype=torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return [t.to(dtype).to(DEVICE) if t.is_floating_point() else t.to(DEVICE) for t in (q, k, v, tables, lens)]


# (context_lens, num_heads, num_kv_heads, head_dim, block_size): one-token contexts, lengths on and
# next to block boundaries, odd lengths, GQA ratios 1 (the kernel's path without tl.dot), 2 and 3, a
# head_dim that is not a power of 2, a block size that is not one, and contexts longer than the
# kernel's tiles (32 or 64 tokens).
PAGED_CASES = [
    ([1, 16, 17, 31, 33], 4, 4, 32, 16),
    ([1, 5, 9, 100], 8, 4, 64, 16),
    ([7, 1, 48, 130], 6, 2, 24, 16),
    ([3, 10, 11, 23], 9, 3, 64, 5),
    ([200], 2, 1, 16, 32),
]


def _case_id(c):
    return f"lens{c[0]}-h{c[1]}-kv{c[2]}-d{c[3]}-bs{c[4]}" if isinstance(c, tuple) else str(c)


@pytest.mark.parametrize(
    "case,dtype",
    [(c, dt) for c in PAGED_CASES for dt in DTYPES[:2]] + [(PAGED_CASES[i], DTYPES[2]) for i in (0, 2)],
    ids=_case_id,
)
def test_paged_attention_matches_reference(case, dtype):
    lens, h, kv, d, bs = case
    q, k, v, tables, ctx = make_paged(lens, h, kv, d, bs, dtype)
    out = paged_attention_decode(q, k, v, tables, ctx, backend="triton")
    assert out.shape == q.shape and out.dtype == dtype
    close(out, paged_attention_decode_torch(q, k, v, tables, ctx), dtype)


def test_paged_attention_reference_is_plain_attention():
    """The reference equals softmax(q·Kᵀ/sqrt(d))·V over the tokens written in order, GQA via repeat."""
    q, k, v, tables, ctx = make_paged([5, 12], 4, 2, 16, 4, torch.float32)
    out = paged_attention_decode_torch(q, k, v, tables, ctx)
    for s, n in enumerate(ctx.tolist()):
        keys = torch.stack([k[tables[s, t // 4], t % 4] for t in range(n)])  # [n, kv_heads, d]
        vals = torch.stack([v[tables[s, t // 4], t % 4] for t in range(n)])
        keys, vals = keys.repeat_interleave(2, 1).transpose(0, 1), vals.repeat_interleave(2, 1).transpose(0, 1)
        ref = torch.softmax(q[s][:, None] @ keys.transpose(1, 2) / 4.0, -1) @ vals  # [heads, 1, d]
        torch.testing.assert_close(out[s], ref[:, 0], rtol=1e-5, atol=1e-6)


def test_paged_attention_scale_and_auto_backend():
    q, k, v, tables, ctx = make_paged([9, 20], 4, 2, 32, 8, torch.float32)
    out = paged_attention_decode(q, k, v, tables, ctx, scale=0.3, backend="triton")
    close(out, paged_attention_decode_torch(q, k, v, tables, ctx, scale=0.3), torch.float32)
    if DEVICE == "cpu":  # "auto" never picks the interpreter: on CPU it is the torch reference, exactly
        ref = paged_attention_decode_torch(q, k, v, tables, ctx)
        assert torch.equal(paged_attention_decode(q, k, v, tables, ctx), ref)


def test_paged_attention_input_errors(monkeypatch):
    q, k, v, tables, ctx = make_paged([5, 12], 4, 2, 16, 4, torch.float32)  # tables are [2, 4]: capacity 16

    def call(**changes):
        args = dict(q=q, k_cache=k, v_cache=v, block_tables=tables, context_lens=ctx) | changes
        return paged_attention_decode(**args, backend="triton")

    bad = tables.clone()
    bad[1, 2] = k.shape[0]  # used entry (sequence 1 uses blocks 0..2) == num_blocks
    with pytest.raises(ValueError, match=r"block table entry .* outside \[0, num_blocks"):
        call(block_tables=bad)
    bad[1, 2] = -3
    with pytest.raises(ValueError, match=r"outside \[0, num_blocks"):
        call(block_tables=bad)
    with pytest.raises(ValueError, match="exceeds the block table's capacity"):
        call(context_lens=torch.tensor([5, 17], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="context length must be >= 1"):
        call(context_lens=torch.tensor([5, 0], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        call(q=torch.randn(2, 3, 16, device=DEVICE))
    with pytest.raises(ValueError, match="head_dim mismatch"):
        call(q=torch.randn(2, 4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="block_tables must be int32"):
        call(block_tables=tables.long())
    with pytest.raises(ValueError, match="context_lens must be int32"):
        call(context_lens=ctx.long())
    with pytest.raises(ValueError, match="must share a dtype"):
        call(q=q.half())
    with pytest.raises(ValueError, match="q must be contiguous"):
        call(q=torch.randn(4, 2, 16, device=DEVICE).transpose(0, 1))
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        call(k_cache=k.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        call(q=q.double(), k_cache=k.double(), v_cache=v.double())
    with pytest.raises(ValueError, match="choose one of"):
        paged_attention_decode(q, k, v, tables, ctx, backend="cuda")
    if DEVICE == "cpu":
        monkeypatch.setattr(_triton, "interpreted", lambda: False)  # as if TRITON_INTERPRET were unset
        with pytest.raises(ValueError, match=r"Triton compiles for a CUDA GPU.*TRITON_INTERPRET=1"):
            call()


# --- RMSNorm, SwiGLU, rotary -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (3, 7, 96), (5, 203), (2, 1000)])
def test_rms_norm_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(shape, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype).to(DEVICE)
    scale = (x + r).abs().max().item()
    close(rms_norm(x, w, 1e-6, backend="triton"), rms_norm_torch(x, w, 1e-6), dtype, scale)
    out, h = rms_norm(x, w, 1e-5, residual=r, backend="triton")
    ref_out, ref_h = rms_norm_torch(x, w, 1e-5, residual=r)
    close(h, ref_h, dtype, scale)
    close(out, ref_out, dtype, scale)


def test_rms_norm_reference_is_transformers_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(48, eps=1e-5)
    norm.weight.data = torch.randn(48)
    x = torch.randn(3, 5, 48)
    assert torch.equal(rms_norm_torch(x, norm.weight, 1e-5), norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 16), (3, 5, 2 * 77), (2, 2 * 1500)])
def test_silu_and_mul_and_swiglu_match_reference(shape, dtype):
    gate_up = (3 * torch.randn(shape, generator=torch.Generator().manual_seed(2))).to(dtype).to(DEVICE)
    d = shape[-1] // 2
    gate, up = gate_up[..., :d].contiguous(), gate_up[..., d:].contiguous()
    ref = swiglu_torch(gate, up)
    scale = ref.abs().max().item()
    close(silu_and_mul(gate_up, backend="triton"), ref, dtype, scale)
    close(swiglu(gate, up, backend="triton"), ref, dtype, scale)


def llama_cos_sin(batch, seq_len, head_dim, dtype, offset=0, base=10000.0):
    """cos/sin as LlamaRotaryEmbedding makes them: [batch, seq_len, head_dim], halves repeated."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    pos = torch.arange(seq_len)[None].float() + offset + torch.arange(batch)[:, None] * 3  # [batch, seq]
    emb = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1)
    return emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (2, 3, 7, 24), (3, 4, 5, 64), (2, 4, 33, 128)])
def test_rotary_matches_reference(shape, dtype):
    batch, _heads, seq_len, head_dim = shape
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    cos, sin = llama_cos_sin(batch, seq_len, head_dim, dtype, offset=11)
    scale = x.abs().max().item()
    close(rotary(x, cos, sin, backend="triton"), rotary_torch(x, cos, sin), dtype, scale)
    cos1, sin1 = cos[0].contiguous(), sin[0].contiguous()  # [seq_len, head_dim], shared by the batch
    close(rotary(x, cos1, sin1, backend="triton"), rotary_torch(x, cos1, sin1), dtype, scale)


def test_rotary_reference_is_transformers_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 4, 6, 32), torch.randn(2, 2, 6, 32)
    cos, sin = llama_cos_sin(2, 6, 32, torch.float32)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos.cpu(), sin.cpu())
    assert torch.equal(rotary_torch(q, cos.cpu(), sin.cpu()), q_ref)
    assert torch.equal(rotary_torch(k, cos.cpu(), sin.cpu()), k_ref)


def test_fused_input_errors(monkeypatch):
    x = torch.randn(4, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must be \[hidden=32\]"):
        rms_norm(x, torch.ones(31, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="residual must match x"):
        rms_norm(x, torch.ones(32, device=DEVICE), residual=x.half(), backend="triton")
    with pytest.raises(ValueError, match="x must be contiguous"):
        rms_norm(x.t(), torch.ones(4, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="must be even"):
        silu_and_mul(torch.randn(3, 7, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="same shape and dtype"):
        swiglu(x, x[:, :16].contiguous(), backend="triton")
    with pytest.raises(ValueError, match=r"x must be .batch, num_heads, seq_len, head_dim. with an even head_dim"):
        rotary(
            torch.randn(2, 3, 5, 7, device=DEVICE),
            torch.randn(5, 7, device=DEVICE),
            torch.randn(5, 7, device=DEVICE),
            backend="triton",
        )
    with pytest.raises(ValueError, match="cos and sin must be"):
        rotary(
            torch.randn(2, 3, 5, 8, device=DEVICE),
            torch.randn(4, 8, device=DEVICE),
            torch.randn(4, 8, device=DEVICE),
            backend="triton",
        )
    if DEVICE == "cpu":
        monkeypatch.setattr(_triton, "interpreted", lambda: False)
        with pytest.raises(ValueError, match="rms_norm: backend='triton' got tensors on cpu"):
            rms_norm(x, torch.ones(32), backend="triton")


# --- W4A16 -----------------------------------------------------------------------------------------------


def make_w4(out_features, in_features, group_size, dtype, seed=4):
    g = torch.Generator().manual_seed(seed)
    n_groups = in_features // group_size
    codes = torch.randint(0, 16, (out_features, in_features), generator=g)
    scales = (0.01 + 0.05 * torch.rand(out_features, n_groups, generator=g)).to(dtype)
    zeros = (15 * torch.rand(out_features, n_groups, generator=g)).to(dtype)  # float zero points
    qweight, scales, zeros = w4a16_from_codes(codes, scales, zeros, group_size)
    return codes, qweight.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE)


def test_w4a16_layout_and_dequant_convention():
    codes = torch.tensor([[3, 12, 0, 15], [1, 2, 3, 4]])
    scales = torch.tensor([[0.5, 2.0], [1.0, 1.0]])
    zeros = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    qweight, s, z = w4a16_from_codes(codes, scales, zeros, group_size=2)
    assert qweight.dtype == torch.uint8 and qweight.shape == (2, 2)
    assert qweight[0, 0].item() == 3 | (12 << 4)  # low nibble = even column, high nibble = odd column
    assert torch.equal(w4a16_unpack(qweight), codes.to(torch.uint8))
    w = w4a16_dequantize(qweight, s, z, group_size=2)  # (code - zero) * scale
    assert torch.equal(w, torch.tensor([[1.0, 5.5, 0.0, 30.0], [1.0, 2.0, -1.0, 0.0]]))


def test_w4a16_layout_is_labkit_quant_pack():
    """The same bytes as labkit.quant.pack.pack(codes [out, in], 4), viewed as [out, in // 2]."""
    packing = pytest.importorskip("labkit.quant.pack", reason="labkit.quant is not available")
    codes, qweight, _, _ = make_w4(6, 32, 16, torch.float32)
    assert torch.equal(packing.pack(codes, 4).view(6, 16), qweight.cpu())


W4_CASES = [
    ((1, 64), 48, 32),  # one decode row
    ((5, 256), 100, 32),  # odd out_features: a partial N tile
    ((3, 7, 128), 64, 128),  # batch dims; one group per row (per-channel)
    ((20, 96), 33, 16),  # M > 16, K not a multiple of the 64-column K step; groups narrower than a step
    ((2, 192), 40, 64),  # one 64-column K step per group
    ((40, 384), 72, 192),  # M > 16 (a 64-row tile), 3 K steps per group
    ((1, 1536), 40, 64),  # decode split along K into 3 programs of 512 columns
    ((2, 1088), 24, 32),  # split in 2: 544 and 544 columns, whole groups of 32
    ((3, 1024), 20, 16),  # split in 2, groups narrower than a step (scales loaded per byte)
]


@pytest.mark.parametrize(
    "x_shape,out_features,group_size,dtype",
    [(*c, dt) for c in W4_CASES for dt in DTYPES[:2]] + [(*W4_CASES[1], DTYPES[2])],
)
def test_w4a16_matmul_matches_reference(x_shape, out_features, group_size, dtype):
    _, qweight, scales, zeros = make_w4(out_features, x_shape[-1], group_size, dtype)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    out = w4a16_matmul(x, qweight, scales, zeros, group_size, backend="triton")
    ref = w4a16_matmul_torch(x, qweight, scales, zeros, group_size)
    assert out.shape == (*x_shape[:-1], out_features) and out.dtype == dtype
    close(out, ref, dtype, ref.abs().max().item())
    # ... and the reference is x · Wᵀ with W dequantized in fp32
    torch.testing.assert_close(
        ref.float(),
        x.float() @ w4a16_dequantize(qweight, scales, zeros, group_size).T,
        **(
            {"rtol": 1e-4, "atol": 1e-4}
            if dtype == torch.float32
            else {"rtol": 2e-2, "atol": 2e-2 * ref.abs().max().item()}
        ),
    )


def test_w4a16_input_errors():
    _, qweight, scales, zeros = make_w4(8, 64, 16, torch.float32)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="qweight must be uint8"):
        w4a16_matmul(x, qweight.int(), scales, zeros, 16, backend="triton")
    with pytest.raises(ValueError, match="group_size=15 must be even and divide"):
        w4a16_matmul(x, qweight, scales, zeros, 15, backend="triton")
    with pytest.raises(ValueError, match=r"scales must be \[out_features=8, n_groups=2\]"):
        w4a16_matmul(x, qweight, scales, zeros, 32, backend="triton")
    with pytest.raises(ValueError, match="x has 63 input features, the weight 64"):
        w4a16_matmul(torch.randn(2, 63, device=DEVICE), qweight, scales, zeros, 16, backend="triton")
    with pytest.raises(ValueError, match=r"codes must lie in 0\.\.15"):
        w4a16_from_codes(torch.full((2, 4), 16), torch.ones(2, 1), torch.zeros(2, 1), 4)
    with pytest.raises(ValueError, match="in_features=5 must be even"):
        w4a16_from_codes(torch.zeros(2, 5, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(2, 1), 5)


def test_package_exports():
    assert kernels.paged_attention_decode is paged_attention_decode
    assert kernels.triton_available()


def test_check_block_tables_on_cpu_metadata():
    """What the serving engine calls once per step on the tables it builds on the CPU."""
    tables = torch.tensor([[3, 1, -1], [0, -1, -1]], dtype=torch.int32)  # -1: unused entries
    paged_attention.check_block_tables(tables, torch.tensor([16, 4], dtype=torch.int32), 4, 8)
    with pytest.raises(ValueError, match=r"entry -1 \(sequence 1, logical block 1\)"):
        paged_attention.check_block_tables(tables, torch.tensor([16, 9], dtype=torch.int32), 4, 8)
    with pytest.raises(ValueError, match="exceeds the block table's capacity 3 blocks x 8 tokens = 24"):
        paged_attention.check_block_tables(tables, torch.tensor([25, 4], dtype=torch.int32), 4, 8)


def _run_python(code, env_changes):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env_changes
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_interpreter_is_chosen_before_import():
    """Triton decides interpreter or GPU when it is imported (its own tl.sum, tl.max... are triton.jit
    functions): TRITON_INTERPRET set after importing labkit.kernels gets a clear error, not Triton's."""
    out = _run_python(
        "import os, torch\n"
        "from labkit import kernels\n"
        "from labkit.kernels import _triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    kernels.rms_norm(torch.randn(3, 40), torch.rand(40), backend='triton')\n"
        "except ValueError as err:\n"
        "    print(err)\n"
        "try:\n"
        "    _triton.load()\n"
        "except RuntimeError as err:\n"
        "    print(err)\n",
        {},
    )
    assert "set TRITON_INTERPRET=1 before triton is imported (before importing labkit.kernels)" in out, out
    assert "TRITON_INTERPRET is on now but was off when triton was imported" in out, out


def test_without_triton_the_torch_backends_work_and_triton_says_how_to_install():
    out = _run_python(
        "import sys\n"
        "sys.modules['triton'] = None  # as on a machine without triton: `import triton` raises ImportError\n"
        "import torch\n"
        "from labkit import kernels\n"
        "x, w = torch.randn(3, 40), torch.rand(40)\n"
        "assert torch.equal(kernels.rms_norm(x, w), kernels.rms_norm_torch(x, w))\n"
        "print(kernels.triton_available())\n"
        "try:\n"
        "    kernels.rms_norm(x, w, backend='triton')\n"
        "except ImportError as err:\n"
        "    print(err)\n",
        {"TRITON_INTERPRET": "1"},
    )
    assert out.startswith("False\nThe Triton backend needs the `triton` package: `pip install triton`"), out


# Compiling the kernels for GPU targets (sm75 to sm90), without a GPU: tests/test_kernels_compile.py.


def test_benchmark_script_runs_in_smoke_mode(capsys):
    """benchmarks/bench_kernels.py is run later on a GPU; --smoke runs all its code paths on tiny
    shapes here (interpreted), so that it does not rot."""
    import importlib.util
    from pathlib import Path

    if DEVICE != "cpu":
        pytest.skip("the smoke mode is for CPU machines")
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--smoke"])
    impls = {(row["kernel"].split()[0], row["impl"]) for row in report.rows}
    for kernel in ("rms_norm", "silu_and_mul", "rotary", "w4a16", "paged", "decode"):
        assert any(k == kernel and "triton" in impl for k, impl in impls), kernel
    assert len(report.targets) >= len(bench.TARGETS) and not report.failed  # checked, not enforced on smoke shapes
