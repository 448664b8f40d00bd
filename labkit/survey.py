"""The published table the capstone sets the course's measurements beside.

Chavan, Magazine, Kushwaha, Debbah, Gupta: "Faster and Lighter LLMs: A Survey on Current Challenges
and Way Forward", IJCAI 2024 (arXiv 2402.01799), empirical section; the same numbers are in the
README of the survey's code (github.com/nyunAI/Faster-LLM-Survey). One A100 GPU.

Protocols, as far as the survey states them: pruning rows are LLaMA-7B with WikiText-2 perplexity at
sequence length 128 (LLM-Pruner's evaluation; hence the baseline's 12.62 rather than 5.68 at 2048);
quantization rows are LLaMA-2-7B at the usual longer context (baseline 5.85). WM = weight memory,
RM = runtime memory, both in GB; tokens/s of generation.
"""

from __future__ import annotations

SOURCE = "Chavan et al., IJCAI 2024 (arXiv 2402.01799), tables of the empirical section"

# The model behind each table: name it wherever the course compares with one of its rows.
PRUNING_MODEL = "LLaMA-7B"
QUANTIZATION_MODEL = "LLaMA-2-7B"

# (method, setting, RM GB, WM GB, tokens/s, perplexity); None where the survey reports none.
PRUNING_LLAMA_7B = [
    ("Baseline", "-", 26.16, 12.55, 30.90, 12.62),
    ("Wanda-SP", "20%", None, None, None, 22.12),
    ("Wanda-SP", "50%", None, None, None, 366.43),
    ("LLM-Pruner", "20%", 10.38, 10.09, 32.57, 19.77),
    ("LLM-Pruner", "50%", 6.54, 6.23, 40.95, 112.44),
    ("LLM-Pruner + fine-tuning", "20%", 10.38, 10.09, 32.57, 17.37),
    ("LLM-Pruner + fine-tuning", "50%", 6.54, 6.23, 40.95, 38.12),
    ("FLaP", "20%", 9.72, 9.44, 33.90, 14.62),
    ("FLaP", "50%", 6.26, 6.07, 42.88, 31.80),
]

# (method, engine, WM GB, RM GB, tokens/s, perplexity) on LLaMA-2-7B.
QUANTIZATION_LLAMA_2_7B = [
    ("Baseline FP16", "PyTorch", 12.55, 26.16, 30.90, 5.85),
    ("GPTQ 2-bit", "PyTorch", 2.11, 2.98, 20.91, None),  # the survey prints NaN
    ("GPTQ 3-bit", "PyTorch", 2.87, 3.86, 21.24, 7.36),
    ("GPTQ 4-bit", "PyTorch", 3.63, 4.65, 21.63, 6.08),
    ("GPTQ 8-bit", "PyTorch", 6.67, 7.62, 21.36, 5.86),
    ("AWQ 4-bit GEMM", "PyTorch", 3.68, 4.64, 28.51, 6.02),
    ("QLoRA (NF4)", "PyTorch", 3.56, 4.84, 19.70, 6.02),
    ("LLM.int8()", "PyTorch", 6.58, 7.71, 5.24, 5.89),
    ("K-quants 4-bit", "llama.cpp", 3.80, 7.38, 104.45, 5.96),
    ("GPTQ 4-bit", "ExLlama", 3.63, 5.35, 77.10, 6.08),
    ("GPTQ 4-bit", "vLLM", 3.63, 36.51, 172.88, 6.08),
    ("GPTQ 4-bit", "TensorRT-LLM", 3.60, 5.88, 202.16, 6.08),
    ("OmniQuant 4-bit", "MLC-LLM", 3.80, 5.70, 134.2, 5.97),
]


def pruning_row(method: str, setting: str) -> dict:
    """One row of PRUNING_LLAMA_7B as a dict (method, setting, rm_gb, wm_gb, tokens_per_s, perplexity, model)."""
    for m, s, rm, wm, tps, ppl in PRUNING_LLAMA_7B:
        if (m, s) == (method, setting):
            return dict(method=m, setting=s, rm_gb=rm, wm_gb=wm, tokens_per_s=tps, perplexity=ppl, model=PRUNING_MODEL)
    allowed = ", ".join(f"({m!r}, {s!r})" for m, s, *_ in PRUNING_LLAMA_7B)
    raise ValueError(
        f"(method, setting)=({method!r}, {setting!r}) is not in the survey's pruning table; allowed: {allowed}."
    )


def format_pruning() -> str:
    head = f"{'method':<26}{'setting':>8}{'RM GB':>8}{'WM GB':>8}{'tok/s':>8}{'ppl':>9}"
    cell = lambda v, f: "-" if v is None else format(v, f)
    lines = [head, "-" * len(head)]
    for m, s, rm, wm, tps, ppl in PRUNING_LLAMA_7B:
        lines.append(f"{m:<26}{s:>8}{cell(rm, '.2f'):>8}{cell(wm, '.2f'):>8}{cell(tps, '.2f'):>8}{cell(ppl, '.2f'):>9}")
    return "\n".join(lines)


def format_quantization() -> str:
    head = f"{'method':<18}{'engine':<14}{'WM GB':>7}{'RM GB':>7}{'tok/s':>8}{'ppl':>7}"
    cell = lambda v, f: "NaN" if v is None else format(v, f)
    lines = [head, "-" * len(head)]
    for m, e, wm, rm, tps, ppl in QUANTIZATION_LLAMA_2_7B:
        lines.append(f"{m:<18}{e:<14}{wm:>7.2f}{rm:>7.2f}{tps:>8.2f}{cell(ppl, '.2f'):>7}")
    return "\n".join(lines)
