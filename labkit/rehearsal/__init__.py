"""Memory rehearsal of the GPU profile at LLaMA-7B's shapes, on CPU: see harness.py (how) and plans.py (what)."""

from . import plans
from .harness import (
    GPU,
    HOST,
    LLAMA_7B,
    LLAMA_7B_PARAMS,
    MARGIN,
    RUNTIMES,
    Fit,
    Query,
    Rehearsal,
    Report,
    Runtime,
    fits,
    llama_7b,
    llama_7b_config,
    profile,
    rehearse,
    tokens,
)

__all__ = [
    "GPU",
    "HOST",
    "LLAMA_7B",
    "LLAMA_7B_PARAMS",
    "MARGIN",
    "RUNTIMES",
    "Fit",
    "Query",
    "Rehearsal",
    "Report",
    "Runtime",
    "fits",
    "llama_7b",
    "llama_7b_config",
    "plans",
    "profile",
    "rehearse",
    "tokens",
]
