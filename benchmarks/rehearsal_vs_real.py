"""The memory rehearsal (labkit.rehearsal) against a real GPU: the same plans at LLaMA-7B's shapes, once on fake
tensors and once on CUDA with random weights, and their peak GPU memory side by side (torch.cuda.max_memory_allocated
per phase against the rehearsal's count). The runtime each lesson declares rests on the rehearsal; this says how far
to trust it. Also: torch's 2:4 sparse matmul (to_sparse_semi_structured) at LLaMA-7B's linear shapes.

    python benchmarks/rehearsal_vs_real.py [--sparse]   # needs CUDA and ~20 GiB of GPU memory; --sparse: 2:4 too
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
import traceback

import torch

from labkit import prune
from labkit.rehearsal import plans
from labkit.rehearsal.harness import GiB, llama_7b_config, rehearse

CUDA = torch.device("cuda")


class RealRun:
    """What a plan asks of a Rehearsal, on a real GPU: phase peaks from torch.cuda.max_memory_allocated."""

    def __init__(self):
        self.phases: dict[str, int] = {}
        self.notes: list[str] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        torch.cuda.synchronize()
        self.phases[name] = torch.cuda.max_memory_allocated()
        print(f"    real {name}: {time.perf_counter() - start:.1f} s", flush=True)

    def assume(self, where, answer) -> None:  # real values answer the real run's questions
        pass

    def note(self, text: str) -> None:
        self.notes.append(text)


def real_llama_7b(device=CUDA, dtype=torch.float16, config=None):
    """LLaMA-7B with random weights (the model's own init) built directly on `device` in `dtype`."""
    from transformers import LlamaForCausalLM

    config = config or llama_7b_config(dtype)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


PLANS = {
    "lesson 00 (2 windows of 2048, 2 new tokens)": lambda r: plans.lesson00(r, windows=2, new_tokens=2),
    "GPTQ walk, model on GPU, activations on GPU (2 layers)": lambda r: plans.calibration_walk(
        r, "gptq", resident="gpu", layers=2, activations="device"
    ),
    "GPTQ walk, model on GPU, activations on host (2 layers)": lambda r: plans.calibration_walk(
        r, "gptq", resident="gpu", layers=2, activations="host"
    ),
}


def compare(name, plan) -> None:
    print(f"\n== {name}", flush=True)
    try:
        start = time.perf_counter()
        fake = rehearse(plan, name)
        print(f"  rehearsal ({time.perf_counter() - start:.1f} s): peak GPU {fake.peak_gpu / GiB:.2f} GiB", flush=True)
    except Exception:
        traceback.print_exc()
        return
    saved = plans.GPU, plans.llama_7b
    plans.GPU, plans.llama_7b = CUDA, real_llama_7b
    real = RealRun()
    try:
        start = time.perf_counter()
        plan(real)
        print(f"  real run: {time.perf_counter() - start:.1f} s", flush=True)
    except Exception:
        traceback.print_exc()
    finally:
        plans.GPU, plans.llama_7b = saved
        gc.collect()
        torch.cuda.empty_cache()
    for phase, (gpu, _) in fake.phases.items():
        got = real.phases.get(phase)
        ratio = f"{got / gpu:.3f}" if got and gpu else "-"
        shown = f"{got / GiB:.2f}" if got is not None else "(did not run)"
        print(f"  phase {phase:>12}: rehearsal {gpu / GiB:6.2f} GiB | real {shown:>8} GiB | real/rehearsal {ratio}")


def sparse_24() -> None:
    print("\n== 2:4 sparse matmul (torch.sparse.to_sparse_semi_structured), fp16, LLaMA-7B linear shapes")
    why_not = prune.semi_structured_unavailable()
    if why_not:
        print("  " + why_not)
        return
    for out_f, in_f in ((4096, 4096), (11008, 4096), (4096, 11008)):
        for tokens in (2048, 128, 16):
            try:
                r = prune.semi_structured_speed(out_f, in_f, tokens, repeats=50)
                print(
                    f"  W {out_f}x{in_f}, {tokens:5d} tokens: dense {r['dense_ms']:.4f} ms, "
                    f"2:4 {r['sparse_ms']:.4f} ms, speed-up {r['speedup']:.2f}x",
                    flush=True,
                )
            except Exception as e:
                print(f"  W {out_f}x{in_f}, {tokens:5d} tokens: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    if "--sparse" in sys.argv:
        sparse_24()
    for name, plan in PLANS.items():
        compare(name, plan)
