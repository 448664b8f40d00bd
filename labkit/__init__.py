"""labkit: every compression technique of LLM Compression Lab, written from torch operations.

    from labkit import models, data, evaluate, profiles, results
    model, tokenizer = models.load("smollm2-135m")

Technique packages: labkit.prune, labkit.quant, labkit.distill, labkit.lora, labkit.lowrank,
labkit.kernels, labkit.serving, labkit.parallel (import them by name; `import labkit` never imports
Triton, labkit.kernels does). The README's "For contributors" maps each lesson to its modules.
"""

from . import data, evaluate, models, profiles, results, threads, walk

__version__ = "0.1.0"
