"""Model profiles: the same lessons at two sizes.

cpu: SmolLM2-135M, sized so each lesson runs in about two minutes on two CPU cores (CI).
gpu: LLaMA-7B in fp16 with the papers' protocol (seqlen 2048, the whole test split, 128
     calibration samples), so numbers compare with the published ones. Students (lessons 07, 12) are
     trained through LoRA adapters there (lora_rank), not weight by weight, to fit beside a 7B teacher.

The profile is chosen automatically (gpu when CUDA is available) and overridden by the
environment variable LABKIT_PROFILE=cpu|gpu.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Profile:
    name: str
    model: str  # a key of labkit.models.MODELS
    device: str
    dtype: torch.dtype
    seqlen: int  # evaluation and calibration window length
    eval_windows: int | None  # first N test windows; None = the whole test split
    sweep_windows: int | None  # fewer windows for curves with many points
    calib_samples: int
    new_tokens: int  # tokens generated when timing decode speed
    # How the distillation lessons (07, 12) train a student: None = every weight (AdamW on fp32 masters);
    # r = rank-r LoRA adapters on frozen weights (labkit.lora.adapters), merged afterwards. A 7B student's
    # weights cost 16 bytes each in AdamW (fp32 master, gradient, two moments): 50 GiB for 3.4 B parameters,
    # beside a 13.5 GB teacher. The adapters cost ~0.3% of that.
    lora_rank: int | None = None


PROFILES = {
    # Sized for CI (13 lessons on 2 cores, each in about two minutes): a perplexity over 16
    # windows x 512 tokens (8,192 test tokens) takes ~15 s, and a calibration walk over 8 samples
    # x 512 tokens (4,096 tokens, more than the widest linear's 1,536 inputs) ~15 s.
    "cpu": Profile(
        "cpu",
        "smollm2-135m",
        "cpu",
        torch.float32,
        seqlen=512,
        eval_windows=16,
        sweep_windows=8,
        calib_samples=8,
        new_tokens=32,
    ),
    "gpu": Profile(
        "gpu",
        "llama-7b",
        "cuda",
        torch.float16,
        seqlen=2048,
        eval_windows=None,
        sweep_windows=40,
        calib_samples=128,
        new_tokens=128,
        lora_rank=8,  # LLM-Pruner's recovery rank (alpha 16)
    ),
}


def get(name: str | None = None, *, rehearse: bool = False) -> Profile:
    """The active profile: `name`, else $LABKIT_PROFILE, else 'gpu' if CUDA is available, else 'cpu'.

    rehearse=True returns the profile even when its device is missing, for labkit.rehearsal, which runs
    the GPU profile's code on fake tensors (use labkit.rehearsal.profile, which also swaps the device)."""
    name = name or os.environ.get("LABKIT_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")
    if name not in PROFILES:
        raise ValueError(f"profile {name!r} (from the argument or LABKIT_PROFILE): allowed are {list(PROFILES)}.")
    profile = PROFILES[name]
    if profile.device == "cuda" and not torch.cuda.is_available() and not rehearse:
        raise RuntimeError(
            f"The {name!r} profile needs a CUDA GPU and torch sees none. Unset LABKIT_PROFILE (or set "
            f"LABKIT_PROFILE=cpu; in a lesson on Colab: PROFILE = 'cpu' in the set-up cell) to run the CPU profile, "
            "or use a GPU runtime (Colab: Runtime > Change runtime type; the lesson's first cell names which)."
        )
    return profile
