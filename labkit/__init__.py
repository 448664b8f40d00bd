"""labkit: every compression technique of LLM Compression Lab, written from torch operations.

    from labkit import models, data, evaluate, profiles, results
    model, tokenizer = models.load("smollm2-135m")
"""
from . import data, evaluate, models, profiles, results, walk  # noqa: F401

__version__ = "0.1.0"
