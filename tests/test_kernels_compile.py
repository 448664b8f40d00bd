"""Every Triton kernel compiled for real GPU targets on this CPU machine (labkit.kernels.offline):
sm75 (T4), sm80 (A100), sm89 (L4) and sm90 (H100), at LLaMA-7B's shapes, in fp16, bf16 from sm80 on,
and fp32 on sm75 for the tl.dot kernels. Fails if a kernel stops compiling, spills registers
(budget: offline.SPILL_BUDGET bytes per thread) or needs more shared memory than the arch allows.

The compiles run in a fresh process without TRITON_INTERPRET (this process may have run kernels in
the interpreter). Run time, measured on the shared 2-core machine before the flash-attention kernel
joined (55 compiles; now 63): 45-62 s with an empty Triton cache, about 35 s when Triton's cache holds them.
`pytest -s` prints the table of registers, spills and shared memory.
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (`pip install triton`)")
try:
    from triton.backends.compiler import GPUTarget  # noqa: F401  (only: is the offline-compile API there?)
    from triton.compiler import ASTSource  # noqa: F401  (likewise)
except ImportError as err:
    pytest.skip(f"this triton has no ASTSource/GPUTarget API for an offline compile ({err})", allow_module_level=True)

from labkit.kernels import offline, paged_attention


@pytest.fixture(scope="module")
def report():
    rows = offline.compile_report()
    print("\n" + offline.format_table(rows))
    return rows


def test_every_kernel_compiles_for_every_target_within_budget(report):
    expected = {(c.name, arch, str(dtype)[6:]) for arch, dtype in offline.targets() for c in offline.cases(dtype)}
    assert {(r.case, r.arch, r.dtype) for r in report} == expected
    assert {r.arch for r in report} == {75, 80, 89, 90}
    meta = {c.name: c.meta for c in offline.cases(torch.float16)}  # both ways of loading W4A16 scales
    assert meta["w4a16 decode [16x4096] g128"]["STEP_IN_GROUP"]
    assert not meta["w4a16 decode [16x4096] g16"]["STEP_IN_GROUP"]
    found = offline.problems(report)
    assert not found, "\n".join(found)
    for r in report:
        assert r.registers > 0 and r.num_warps > 0, r


def test_bf16_is_compiled_from_sm80_and_fp32_on_sm75_only():
    pairs = offline.targets()
    assert (75, torch.bfloat16) not in pairs and all((a, torch.bfloat16) in pairs for a in (80, 89, 90))
    assert (75, torch.float32) in pairs and all(a == 75 for a, dt in pairs if dt == torch.float32)


def test_paged_attention_uses_no_padded_dot_with_one_query_per_kv_head(report):
    """LLaMA-7B: 32 query heads, 32 KV heads. The kernel then multiplies and sums (BLOCK_G = 1) instead
    of padding the group to tl.dot's 16 rows; with GQA it keeps tl.dot, whose tiles live in shared memory."""
    assert paged_attention._launch_meta(32, 32, 128, torch.float16)["BLOCK_G"] == 1
    assert paged_attention._launch_meta(32, 8, 128, torch.float16)["BLOCK_G"] == 16
    shared = {(r.case, r.arch, r.dtype): r.shared_bytes for r in report}
    for arch in offline.ARCHS:
        assert (
            shared[("paged attention 32/32 d128", arch, "float16")]
            < shared[("paged attention GQA 32/8 d128", arch, "float16")]
        )


def test_the_budgets_catch_spills_shared_memory_and_failed_compiles():
    rows = offline.compile_report(archs=[80], only="rms_norm", maxnreg=32)  # too few registers: ptxas spills
    assert len(rows) == 2 and all(r.spill_bytes > 0 for r in rows)
    assert all("spills" in p for p in offline.problems(rows))
    too_big = offline.Compiled("k", 75, "float16", registers=64, shared_bytes=64 * 1024 + 1, num_warps=4)
    assert "shared memory; sm75 allows 65536" in offline.problems([too_big])[0]
    assert "does not compile" in offline.problems([offline.Compiled("k", 80, "float16", error="boom")])[0]
