"""Every Triton kernel compiled for real GPU targets, without a GPU: registers, spills, shared memory.

Triton's interpreter (TRITON_INTERPRET=1, how the CPU tests run the kernels) accepts programs that a
GPU compile rejects (a tl.dot tile under 16, too much shared memory) and says nothing about register
pressure. Triton's NVIDIA backend compiles to a cubin with the ptxas bundled in its wheel and needs
no GPU, so each kernel is compiled here for the GPUs the course targets, at the GPU profile's shapes
(LLaMA-7B: hidden 4096, MLP 11008, 32 heads of 128; W4A16 groups of 128), with the compile-time
constants the launchers choose for those shapes, and the cubin's resource use is read back:

    from labkit.kernels import offline
    rows = offline.compile_report()           # in a fresh process (TRITON_INTERPRET unset there)
    print(offline.format_table(rows))
    offline.problems(rows)                     # [] when every kernel compiled within its budget

    python -m labkit.kernels.offline [--arch 75 80] [--json report.json]   # the same; exit 1 on problems

Targets (GPUTarget("cuda", arch, 32)): sm75 (T4, Colab's free GPU), sm80 (A100), sm89 (L4), sm90
(H100). Dtypes: fp16 everywhere (the GPU profile's dtype); bf16 on sm80 and newer only, since sm75
has no bf16 tensor cores (Triton would emulate the bf16 tl.dot; lessons run bf16 on Ampere or later);
fp32 on sm75 for the three kernels with tl.dot, whose fp32 tiles are the ones that press on the T4's
64 KB of shared memory (the unit tests run fp32 on any GPU).

Budgets, checked by problems(): no spills (0 bytes of per-thread stack, where ptxas puts spilled
registers: every kernel fits in registers today, and a spill in a bandwidth-bound kernel is a
regression worth a look), and shared memory within the arch's per-block limit (opt-in maximum).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import fused, paged_attention
from .flash_attention import _flash_attention_kernel, _flash_meta

ARCHS = {75: "T4", 80: "A100", 89: "L4", 90: "H100"}  # compute capability -> the GPU the course has in mind
SHARED_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block (opt-in max)
SPILL_BUDGET = 0  # bytes of per-thread stack (spilled registers) allowed per kernel
LLAMA_7B = dict(hidden=4096, intermediate=11008, heads=32, head_dim=128, group_size=128)

_TRITON_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.uint8: "u8",
    torch.int32: "i32",
}


@dataclasses.dataclass
class Case:
    """One kernel specialization: kernel arguments as a launch would pass them (a torch dtype stands
    for a tensor of that dtype, ints and floats for themselves) and the launcher's constexprs."""

    name: str
    kernel: object  # a labkit.kernels._triton.jit kernel (its .fn is the Python function)
    args: dict
    meta: dict  # what the launcher passes besides args: constexprs, and num_warps where it sets them


@dataclasses.dataclass
class Compiled:
    """Resource use of one compiled kernel (per thread: registers and stack; per block: shared memory)."""

    case: str
    arch: int
    dtype: str
    registers: int = 0
    spill_bytes: int = 0  # per-thread stack frame: where ptxas puts registers it could not keep
    shared_bytes: int = 0  # Triton's dynamic shared memory plus the cubin's static shared memory
    num_warps: int = 0
    error: str = ""  # the compile error, if it failed


def cases(dtype: torch.dtype, shapes: dict = LLAMA_7B, arch: int | None = None) -> list[Case]:
    """The kernels as the GPU profile launches them on compute capability `arch`, with the launchers' own
    constexpr choices (only flash attention's depend on the arch)."""
    H, inter, heads, d, g = (shapes[k] for k in ("hidden", "intermediate", "heads", "head_dim", "group_size"))
    dt, i32 = dtype, torch.int32
    rms = dict(out_ptr=dt, x_ptr=dt, residual_ptr=dt, residual_out_ptr=dt, weight_ptr=dt, hidden=H, eps=1e-6)
    swiglu = dict(out_ptr=dt, gate_ptr=dt, up_ptr=dt, up_offset=inter, d=inter, row_stride=2 * inter)
    rotary = dict(
        out_ptr=dt,
        x_ptr=dt,
        cos_ptr=dt,
        sin_ptr=dt,
        rows=heads * 2048,
        num_heads=heads,
        seq_len=2048,
        half=d // 2,
        cos_batch_stride=0,
    )
    w4 = dict(out_ptr=dt, x_ptr=dt, qweight_ptr=torch.uint8, scales_ptr=dt, zeros_ptr=dt)

    def w4_args(M):
        split = fused._w4a16_split_k(M, H)  # split K: fp32 slices, added by the launcher
        out = dict(out_ptr=torch.float32) if split > 1 else {}
        return w4 | out | dict(M=M, N=inter, K=H, n_groups=H // g, group_size=g, split_cols=-(-H // split))

    def paged(kv_heads):
        args = dict(out_ptr=dt, q_ptr=dt, k_cache_ptr=dt, v_cache_ptr=dt, block_tables_ptr=i32, context_lens_ptr=i32)
        args |= dict(scale=d**-0.5, num_heads=heads, num_kv_heads=kv_heads, head_dim=d, block_size=16)
        return args | dict(max_blocks_per_seq=256)

    all_cases = [
        Case(f"rms_norm + residual [{H}]", fused.rms_norm_kernel, rms, fused._rms_norm_meta(H, True)),
        Case(f"silu_and_mul [{inter}]", fused._swiglu_kernel, swiglu, fused._swiglu_meta(inter)),
        Case(f"rotary [d {d}]", fused._rotary_kernel, rotary, fused._rotary_meta(d)),
        Case(f"w4a16 decode [16x{H}] g{g}", fused._w4a16_matmul_kernel, w4_args(16), fused._w4a16_meta(16, g, dt)),
        Case(
            f"w4a16 prefill [2048x{H}] g{g}", fused._w4a16_matmul_kernel, w4_args(2048), fused._w4a16_meta(2048, g, dt)
        ),
        Case(
            f"paged attention {heads}/{heads} d{d}",
            paged_attention._paged_attention_decode_kernel,
            paged(heads),
            paged_attention._launch_meta(heads, heads, d, dt),
        ),
        Case(
            f"paged attention GQA {heads}/{heads // 4} d{d}",
            paged_attention._paged_attention_decode_kernel,
            paged(heads // 4),
            paged_attention._launch_meta(heads, heads // 4, d, dt),
        ),
        Case(
            f"flash attention {heads}/{heads} d{d} [2048]",
            _flash_attention_kernel,
            dict(out_ptr=dt, q_ptr=dt, k_ptr=dt, v_ptr=dt, scale=d**-0.5, num_heads=heads, num_kv_heads=heads)
            | dict(seq_len=2048, head_dim=d),
            _flash_meta(d, dt, arch) | dict(CAUSAL=True),
        ),
    ]
    if dtype == torch.float16:  # groups narrower than a K step (not the GPU profile's): scales loaded per byte
        w4_g16 = w4_args(16) | dict(n_groups=H // 16, group_size=16)
        meta = fused._w4a16_meta(16, 16, dt)
        all_cases.append(Case(f"w4a16 decode [16x{H}] g16", fused._w4a16_matmul_kernel, w4_g16, meta))
    if dtype == torch.float32:  # fp32 only matters for the tl.dot kernels' shared memory (see the docstring)
        all_cases = [c for c in all_cases if "w4a16 prefill" in c.name or "GQA" in c.name or "flash" in c.name]
    return all_cases


def targets(archs=tuple(ARCHS)) -> list[tuple[int, torch.dtype]]:
    """(arch, dtype) pairs to compile: fp16 everywhere, bf16 from sm80, fp32 on sm75."""
    out = []
    for arch in archs:
        out.append((arch, torch.float16))
        out.append((arch, torch.float32) if arch < 80 else (arch, torch.bfloat16))
    return out


def _signature(fn, args: dict, constexprs: dict):
    """The signature and attributes triton.jit would derive at a launch with these arguments:
    tensors are 16-byte aligned pointers, ints that are multiples of 16 get the divisibility hint."""
    names = list(inspect.signature(fn).parameters)
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, torch.dtype):
            signature[name] = "*" + _TRITON_TYPES[value]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{fn.__name__}: argument {name}={value!r} must be a torch dtype, an int or a float.")
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    missing = set(args) - set(names)
    if missing:
        raise TypeError(f"{fn.__name__} has no parameters {sorted(missing)}.")
    return signature, attrs


def _resource_usage(cubin: bytes, kernel_name: str) -> dict:
    """REG, STACK and SHARED of one function in a cubin, as `cuobjdump --dump-resource-usage` prints them."""
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        run = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
    for block in run.stdout.split("Function ")[1:]:
        name, _, line = block.partition(":")
        if name.strip() == kernel_name:
            return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED):(\d+)", line)}
    raise RuntimeError(f"cuobjdump lists no function {kernel_name!r}:\n{run.stdout}")


def compile_case(case: Case, arch: int, dtype: torch.dtype, **options) -> Compiled:
    """Compile one case for GPUTarget("cuda", arch, 32) in this process (TRITON_INTERPRET must be unset:
    compile_report runs this in a fresh process). options: extra compile options (e.g. maxnreg=32)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if triton.knobs.runtime.interpret:
        raise RuntimeError(
            "compile_case: TRITON_INTERPRET is set in this process; compile in a fresh process without it "
            "(labkit.kernels.offline.compile_report does)."
        )
    row = Compiled(case.name, arch, str(dtype).removeprefix("torch."))
    launch_options = {k: v for k, v in case.meta.items() if k in ("num_warps", "num_stages")}
    constexprs = {k: v for k, v in case.meta.items() if k not in launch_options}
    signature, attrs = _signature(case.kernel.fn, case.args, constexprs)
    try:
        compiled = triton.compile(
            ASTSource(JITFunction(case.kernel.fn), signature, constexprs, attrs),
            target=GPUTarget("cuda", arch, 32),
            options=launch_options | options,
        )
    except Exception as err:  # a kernel that no longer compiles is a result to report, not a crash
        row.error = f"{type(err).__name__}: {str(err).strip()[-600:]}"
        return row
    usage = _resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    row.registers, row.spill_bytes = usage.get("REG", 0), usage.get("STACK", 0)
    row.shared_bytes = compiled.metadata.shared + usage.get("SHARED", 0)
    row.num_warps = compiled.metadata.num_warps
    return row


def compile_all(archs=tuple(ARCHS), only: str | None = None, **options) -> list[Compiled]:
    """Every case for every (arch, dtype) of targets(archs), in this process. only: keep the cases
    whose name contains this text."""
    rows = []
    for arch, dtype in targets(archs):
        for case in cases(dtype, arch=arch):
            if only is None or only in case.name:
                rows.append(compile_case(case, arch, dtype, **options))
    return rows


def compile_report(archs=tuple(ARCHS), only: str | None = None, timeout: float = 600, **options) -> list[Compiled]:
    """compile_all in a fresh Python process with TRITON_INTERPRET removed from its environment (the
    interpreter decides at triton.jit time and patches triton.language while it runs kernels, so a
    process that ran interpreted kernels cannot compile for a GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])  # the folder holding this labkit
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    request = json.dumps(dict(archs=list(archs), only=only, options=options))
    run = subprocess.run(
        [sys.executable, "-m", "labkit.kernels.offline", "--request", request],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if run.returncode != 0:
        raise RuntimeError(f"the offline compile process failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return [Compiled(**row) for row in json.loads(run.stdout.strip().splitlines()[-1])]


def problems(rows: list[Compiled], spill_budget: int = SPILL_BUDGET) -> list[str]:
    """What breaks the budgets: a failed compile, spills above spill_budget bytes, shared memory
    above the arch's per-block limit. [] when all is well."""
    found = []
    for r in rows:
        what = f"{r.case} ({r.dtype}, sm{r.arch})"
        if r.error:
            found.append(f"{what} does not compile: {r.error}")
            continue
        if r.spill_bytes > spill_budget:
            found.append(f"{what} spills {r.spill_bytes} bytes per thread (budget {spill_budget})")
        limit = SHARED_LIMIT.get(r.arch)
        if limit is not None and r.shared_bytes > limit:
            found.append(f"{what} needs {r.shared_bytes} bytes of shared memory; sm{r.arch} allows {limit}")
    return found


def format_table(rows: list[Compiled]) -> str:
    lines = [f"{'kernel (LLaMA-7B shapes)':<36} {'dtype':<9} {'arch':<11} {'regs':>5} {'spill B':>8} "
             f"{'shared B':>9} {'warps':>6}"]  # fmt: skip
    for r in rows:
        arch = f"sm{r.arch} {ARCHS.get(r.arch, '')}"
        if r.error:
            lines.append(f"{r.case:<36} {r.dtype:<9} {arch:<11} FAILED: {r.error.splitlines()[0][:80]}")
        else:
            lines.append(
                f"{r.case:<36} {r.dtype:<9} {arch:<11} {r.registers:>5} {r.spill_bytes:>8} "
                f"{r.shared_bytes:>9} {r.num_warps:>6}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Compile labkit's Triton kernels for GPU targets, without a GPU.")
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (default: all)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--request", help=argparse.SUPPRESS)  # compile_report's call: compile, print JSON rows
    args = p.parse_args(argv)
    if args.request:
        request = json.loads(args.request)
        rows = compile_all(request["archs"], request["only"], **request["options"])
        print(json.dumps([dataclasses.asdict(r) for r in rows]))
        return 0
    rows = compile_report(args.arch)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    found = problems(rows)
    print("\n".join(["", "PROBLEMS:", *found]) if found else f"\nall {len(rows)} compiles within budget")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
