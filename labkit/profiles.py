"""Model profiles: the same lessons at two sizes.

cpu: SmolLM2-135M, sized so each lesson runs in about two minutes on two CPU cores (CI).
gpu: LLaMA-7B in fp16 with the papers' protocol (seqlen 2048, the whole test split, 128
     calibration samples), so numbers compare with the published ones. Students (lessons 07, 12) are
     trained through LoRA adapters there (lora_rank), not weight by weight, to fit beside a 7B teacher.

The profile is chosen automatically (gpu when CUDA is available) and overridden by the
environment variable LABKIT_PROFILE=cpu|gpu.

A perplexity means something only with its protocol: which model and dtype, which text, how many
windows of how many tokens, which calibration data, and whether a BOS token starts the stream.
`Profile.protocol()` is the one place that writes it down (`Protocol`), with a short fingerprint;
every recorded result carries both (labkit.results), and results of different protocols are never
compared.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields

import torch

from .data import copy_kind


@dataclass(frozen=True)
class Protocol:
    """Everything that fixes a perplexity besides the model's weights: equal protocols, comparable numbers."""

    model: str  # a key of labkit.models.MODELS
    dtype: str  # the unchanged model's dtype, e.g. "float32"
    dataset: str  # the evaluation text
    split: str  # its split
    copy: str  # "local" (LABKIT_DATA_DIR) or "hub": the copies differ (labkit.data)
    eval_windows: int | None  # the first N windows of the split; None: all of them
    seqlen: int  # tokens per evaluation window (no context carried across windows)
    calib_samples: int  # calibration windows a method may use (labkit.data.calibration)
    calib_seqlen: int  # tokens per calibration window
    calib_source: str  # where calibration windows come from
    bos: str  # "none": no BOS token anywhere; "stream start": one, at the start of the tokenized split

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.as_dict())

    def describe(self) -> str:
        """One line: the fingerprint and what it stands for."""
        windows = "all windows" if self.eval_windows is None else f"first {self.eval_windows} windows"
        bos = {"none": "no BOS token", "stream start": "a BOS token at the start of the test stream only"}
        return (
            f"protocol {self.fingerprint}: {self.model} {self.dtype}; {self.dataset} {self.split} ({self.copy} copy), "
            f"{windows} of {self.seqlen} tokens; calibration {self.calib_samples} windows of {self.calib_seqlen} "
            f"tokens ({self.calib_source}); {bos.get(self.bos, self.bos)}"
        )


PROTOCOL_FIELDS = tuple(f.name for f in fields(Protocol))


def fingerprint(protocol: dict) -> str:
    """The first 8 hex digits of the sha256 of `protocol`'s canonical JSON (sorted keys, no spaces)."""
    if not isinstance(protocol, dict) or set(protocol) != set(PROTOCOL_FIELDS):
        got = sorted(map(str, protocol)) if isinstance(protocol, dict) else type(protocol).__name__
        raise ValueError(f"protocol must be a dict with the keys {sorted(PROTOCOL_FIELDS)}; got {got}.")
    canonical = json.dumps(protocol, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def differences(a: dict, b: dict) -> list[str]:
    """What differs between two protocols (as dicts), e.g. ["eval_windows: 16 vs 8"]."""
    return [f"{key}: {a.get(key)!r} vs {b.get(key)!r}" for key in PROTOCOL_FIELDS if a.get(key) != b.get(key)]


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
    bos: str  # BOS handling of the model's tokenizer: "none" or "stream start" (Protocol.bos)
    # How the distillation lessons (07, 12) train a student: None = every weight (AdamW on fp32 masters);
    # r = rank-r LoRA adapters on frozen weights (labkit.lora.adapters), merged afterwards. A 7B student's
    # weights cost 16 bytes each in AdamW (fp32 master, gradient, two moments): 50 GiB for 3.4 B parameters,
    # beside a 13.5 GB teacher. The adapters cost ~0.3% of that.
    lora_rank: int | None = None

    def protocol(self, eval_windows: int | str | None = "eval", *, seqlen: int | None = None, data: str | None = None):
        """This profile's Protocol for a perplexity over `eval_windows` windows of `seqlen` tokens.

        eval_windows: "eval" (the profile's eval_windows, the default), "sweep" (its sweep_windows, for curves
        with many points), a positive integer, or None (the whole split). seqlen: default the profile's.
        data: the source of the test text (labkit.data.Text.source, e.g. "local:/path/wiki.test.raw"); only
        its kind, before the colon, enters the protocol (a folder is not a protocol); default: the copy
        this process reads (labkit.data.copy_kind). Bad arguments raise ValueError naming them."""
        named = isinstance(eval_windows, str) and eval_windows in ("eval", "sweep")
        number = isinstance(eval_windows, int) and not isinstance(eval_windows, bool) and eval_windows >= 1
        if not (named or number or eval_windows is None):
            raise ValueError(f"eval_windows={eval_windows!r}: allowed are 'eval', 'sweep', a positive integer or None.")
        windows = {"eval": self.eval_windows, "sweep": self.sweep_windows}[eval_windows] if named else eval_windows
        seqlen = self.seqlen if seqlen is None else seqlen
        if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
            raise ValueError(f"seqlen={seqlen!r}: need an integer >= 2 (tokens per evaluation window).")
        if data is not None and not isinstance(data, str):
            raise ValueError(f"data={data!r}: need the text's source (labkit.data.Text.source) or None.")
        copy = copy_kind() if data is None else data.split(":", 1)[0]
        return Protocol(
            model=self.model,
            dtype=str(self.dtype).removeprefix("torch."),
            dataset="WikiText-2 raw",
            split="test",
            copy=copy,
            eval_windows=windows,
            seqlen=seqlen,
            calib_samples=self.calib_samples,
            calib_seqlen=self.seqlen,
            calib_source="WikiText-2 validation, random starts",
            bos=self.bos,
        )


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
        bos="none",  # the tokenizer built from the GGUF file adds no BOS token (tests/test_real_model.py)
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
        bos="stream start",  # LLaMA's tokenizer adds one BOS before the whole split, as in the GPTQ code
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
