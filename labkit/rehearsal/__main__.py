"""`python -m labkit.rehearsal`: every plan rehearsed at LLaMA-7B's shapes, as one Markdown table."""

from __future__ import annotations

from . import plans
from .harness import rehearse, table

PLANS = {
    "lesson 00: load, generate, perplexity (2 windows of 2048)": lambda r: plans.lesson00(r, windows=2, new_tokens=2),
    "GPTQ walk, model on the GPU (today's load)": lambda r: plans.calibration_walk(r, "gptq", resident="gpu", layers=2),
    "GPTQ walk, model on the host": lambda r: plans.calibration_walk(r, "gptq", resident="host", layers=2),
    "SparseGPT walk, model on the GPU": lambda r: plans.calibration_walk(r, "sparsegpt", resident="gpu", layers=2),
    "SparseGPT walk, model on the host": lambda r: plans.calibration_walk(r, "sparsegpt", resident="host", layers=2),
    "two fp16 copies on the GPU": plans.two_models,
    "three fp16 copies on the GPU": lambda r: plans.copies(r, 3),
}

if __name__ == "__main__":
    print(table([rehearse(plan, name) for name, plan in PLANS.items()]))
