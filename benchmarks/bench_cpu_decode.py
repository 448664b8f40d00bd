"""Decode speed of the compressed CPU-profile model on this CPU: one table, one run (issue 18).

    python benchmarks/bench_cpu_decode.py                          # every row (about 6 min on 2 cores)
    python benchmarks/bench_cpu_decode.py --rows fp32 w4-rtn-kernel  # some rows (names: --help)
    python benchmarks/bench_cpu_decode.py --json build/cpu_decode.json
    python benchmarks/bench_cpu_decode.py --smoke                  # tiny random model, seconds: the script runs

Rows (SmolLM2-135M, the CPU profile's model; its weights were GGUF Q4_1 before labkit dequantized them):
  fp32                the dense model as every lesson runs it
  bf16                every weight and activation in bf16 (model.to(torch.bfloat16))
  w8a16-torch         quant.w8a16: int8 weights dequantized to fp32 in torch at every call (lesson 06)
  w8a16-kernel        the same int8 codes on aten._weight_int8pack_mm (quant.cpu_kernels), output layer int8
  w8a8                quant.w8a8: int8 weights and per-token int8 activations on torch._int_mm (lesson 06)
  w4-rtn-torch        quant.rtn(4 bits, groups of 32, float offset): Q4_1's own grid, so the codes are the
                      GGUF file's; QuantLinear dequantizes in torch at every call (lessons 04, 10)
  w4-rtn-kernel       the same codes on aten._weight_int4pack_mm_for_cpu, output layer int8
  w4-gptq-kernel      quant.gptq(4 bits, groups of 64, no act-order) on the int4 kernel, output layer int8
  llama.cpp           the same Q4_1 file in llama-cpp-python, when it is installed (never in the default
                      set-up: it compiles llama.cpp for ~6 minutes); its perplexity is not measured here
Columns: weight bytes (evaluate.weight_bytes: what the model holds; the int8 output layer is a copy beside
the float embedding), peak runtime memory and decode tokens/s (evaluate.measure_generation: greedy, 64 new
tokens, best of 3 after a warm-up, the prompt's prefill excluded), perplexity under the profile's protocol
(first 16 windows of 512 tokens of WikiText-2 test), and greedy agreement: the first of 64 greedy tokens
where the row parts from its reference: for the kernels' rows the same quantized model on labkit's torch
path (its weights dequantized, fp32 activations: what the bf16 activations and the int8 output layer
change), for bf16 the fp32 model, for w8a8 w8a16-torch (the same int8 weights: what the int8 activations
change); the torch paths are their own reference. "64/64" means no difference.

Targets (issue 18), checked unless --smoke or --rows leaves a targeted row out: the fastest compressed row
decodes at least 1.5x faster than fp32, and a 4-bit row faster than fp32; the script exits 1 otherwise.
Timings depend on the machine and on what else runs: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from labkit import data, evaluate, models, profiles, quant
from labkit.quant import cpu_kernels

PROMPT = "The history of the city"
ROWS = (
    "fp32",
    "bf16",
    "w8a16-torch",
    "w8a16-kernel",
    "w8a8",
    "w4-rtn-torch",
    "w4-rtn-kernel",
    "w4-gptq-kernel",
    "llama.cpp",
)
SPEED_UP_TARGET = 1.5


def build(name: str, load, calib, gptq_group: int = 64):
    """The row's model and its reference for greedy agreement (None: the row is its own reference)."""
    model = load()
    if name == "fp32":
        return model, None
    if name == "bf16":
        return model.to(torch.bfloat16), load()
    if name.startswith("w8a16"):
        quant.w8a16(model)
    elif name == "w8a8":
        quant.w8a8(model)
        reference = load()
        quant.w8a16(reference)  # the same int8 weights, float activations: what the int8 activations change
        return model, reference
    elif name.startswith("w4-rtn"):
        quant.rtn(model, 4, 32, float_offset=True)
    elif name.startswith("w4-gptq"):
        quant.gptq(model, calib, bits=4, group_size=gptq_group, act_order=False)
    if name.endswith("-kernel"):
        reference = copy.deepcopy(model)
        cpu_kernels.to_cpu_kernels(model, lm_head=True)
        return model, reference
    return model, None  # a torch path: the quantized weights in fp32 arithmetic, its own reference


@torch.no_grad()
def greedy(model, tokenizer, n: int) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :]


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    differ = (a != b).nonzero()
    return int(differ[0]) if len(differ) else len(a)


def llama_cpp_row(gguf: Path, n: int) -> dict | None:
    """The same Q4_1 file decoded by llama.cpp (llama-cpp-python), when installed: tokens/s of n greedy tokens."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import time

    llm = llama_cpp.Llama(str(gguf), n_threads=torch.get_num_threads(), n_ctx=512, verbose=False)
    llm(PROMPT, max_tokens=2, temperature=0.0)  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        out = llm(PROMPT, max_tokens=n, temperature=0.0)
        best = min(best, (time.perf_counter() - start) / max(out["usage"]["completion_tokens"], 1))
    return dict(row="llama.cpp", weight_bytes=gguf.stat().st_size, tokens_per_s=1 / best, note="prefill included")


def measure(names, P, smoke: bool) -> list[dict]:
    model_name = "tiny-llama-random" if smoke else P.model
    load = lambda: models.load(model_name, device="cpu", dtype=torch.float32)[0]
    tokenizer = models.load(model_name, device="cpu")[1]
    test_ids = data.test_tokens(tokenizer) if not smoke else torch.randint(0, 256, (1, 4096))
    seqlen, windows, new = (P.seqlen, P.eval_windows, 64) if not smoke else (64, 2, 8)
    calib = (
        data.calibration(tokenizer, P.calib_samples, P.seqlen, seed=0) if not smoke else test_ids[:, :256].view(4, 64)
    )
    rows = []
    for name in names:
        if name == "llama.cpp":
            spec = models.MODELS[P.model]
            gguf = None if smoke else Path(models.gguf_folder(spec.repo)) / spec.gguf_file
            row = llama_cpp_row(gguf, new) if gguf is not None else None
            if row is not None:
                rows.append(row)
                print(format_row(row), flush=True)
            else:
                print("llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python): row skipped")
            continue
        model, reference = build(name, load, calib, 32 if smoke else 64)
        speed, memory = evaluate.peak_memory(model, evaluate.generation_speed, model, tokenizer, PROMPT, new, 3, False)
        ppl = evaluate.perplexity(model, test_ids, seqlen, windows, progress=False)
        tokens = greedy(model, tokenizer, new)
        agree = first_difference(tokens, greedy(reference, tokenizer, new)) if reference is not None else new
        rows.append(
            dict(
                row=name,
                weight_bytes=evaluate.weight_bytes(model),
                peak_bytes=memory.peak_bytes,
                tokens_per_s=speed.tokens_per_s,
                perplexity=ppl,
                agreement=f"{agree}/{new}",
            )
        )
        print(format_row(rows[-1]), flush=True)
        del model, reference
    return rows


def format_row(r: dict) -> str:
    fmt = evaluate.format_bytes
    peak = fmt(r["peak_bytes"]) if "peak_bytes" in r else "-"
    ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
    return (
        f"{r['row']:<16} {fmt(r['weight_bytes']):>10} {peak:>10} {r['tokens_per_s']:>8.1f} {ppl:>9} "
        f"{r.get('agreement', '-'):>8}  {r.get('note', '')}"
    )


def check_targets(rows: list[dict]) -> list[str]:
    by = {r["row"]: r for r in rows}
    if "fp32" not in by:
        return ["fp32 was not measured: no target can be checked"]
    base = by["fp32"]["tokens_per_s"]
    ours = [r for r in rows if r["row"] not in ("fp32", "bf16", "llama.cpp")]
    failures = []
    best = max(ours, key=lambda r: r["tokens_per_s"], default=None)
    if best is None or best["tokens_per_s"] < SPEED_UP_TARGET * base:
        got = f"{best['row']} at {best['tokens_per_s'] / base:.2f}x" if best else "no compressed row"
        failures.append(f"fastest compressed row below {SPEED_UP_TARGET}x fp32: {got}")
    four = [r for r in ours if r["row"].startswith("w4")]
    if not four or max(r["tokens_per_s"] for r in four) <= base:
        failures.append("no 4-bit row decodes faster than fp32")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to measure")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny random model: checks the script, not speed")
    args = parser.parse_args(argv)
    if not cpu_kernels.cpu_kernels_available():
        print("this torch lacks aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu")
        return 1
    P = profiles.get("cpu")
    threads = torch.get_num_threads()
    model = P.model if not args.smoke else "tiny-llama-random"
    print(f"{model} on the CPU, {threads} torch thread(s); perplexity: {P.protocol().describe()}")
    print(f"{'row':<16} {'weights':>10} {'peak':>10} {'tok/s':>8} {'ppl':>9} {'greedy':>8}")
    rows = measure(args.rows, P, args.smoke)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(threads=threads, rows=rows), indent=1))
    by = {r["row"]: r for r in rows}
    if "fp32" in by:
        print(
            "\nspeed-up over fp32: "
            + ", ".join(f"{r['row']} {r['tokens_per_s'] / by['fp32']['tokens_per_s']:.2f}x" for r in rows)
        )
    ours = [r for r in rows if r["row"] != "llama.cpp"]
    if "llama.cpp" in by and ours:  # the stretch goal: half of llama.cpp's speed on the same weights
        best = max(ours, key=lambda r: r["tokens_per_s"])
        print(
            f"fastest labkit row {best['row']}: {best['tokens_per_s'] / by['llama.cpp']['tokens_per_s']:.0%} of "
            f"llama.cpp's tokens/s (stretch goal 50%; llama.cpp's time includes its prompt's prefill, ours not)"
        )
    if args.smoke or set(args.rows) != set(ROWS):
        return 0
    failures = check_targets(rows)
    for f in failures:
        print("TARGET MISSED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
