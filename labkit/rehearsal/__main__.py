"""`python -m labkit.rehearsal`: every plan rehearsed at LLaMA-7B's shapes, as one Markdown table."""

from __future__ import annotations

from . import plans
from .harness import rehearse, table


def _walk(method: str, resident: str, activations: str):
    return lambda r: plans.calibration_walk(r, method, resident=resident, layers=2, activations=activations)


PLANS = {
    "lesson 00: load, generate, perplexity (2 windows of 2048)": lambda r: plans.lesson00(r, windows=2, new_tokens=2),
    "GPTQ walk, model on the GPU, activations on the GPU": _walk("gptq", "gpu", "device"),
    "GPTQ walk, model on the GPU, activations on the host": _walk("gptq", "gpu", "host"),
    "GPTQ walk, model on the host, activations on the GPU": _walk("gptq", "host", "device"),
    "GPTQ walk, model on the host, activations on the host": _walk("gptq", "host", "host"),
    "SparseGPT walk, model on the GPU, activations on the host": _walk("sparsegpt", "gpu", "host"),
    "SparseGPT walk, model on the host, activations on the host": _walk("sparsegpt", "host", "host"),
    "GPTQ walk, layers streamed from the shards, activations on the host": _walk("gptq", "streamed", "host"),
    "SparseGPT walk, layers streamed from the shards, activations on the host": _walk("sparsegpt", "streamed", "host"),
    "two fp16 copies on the GPU": plans.two_models,
    "three fp16 copies on the GPU": lambda r: plans.copies(r, 3),
}

if __name__ == "__main__":
    print(table([rehearse(plan, name) for name, plan in PLANS.items()]))
