#!/usr/bin/env bash
# Everything in the project that needs a CUDA GPU, in one call, in at most 8 minutes (the steps' time limits
# add up to 470 s) on one GPU, without network access:
#   1. tests: tests/test_kernels.py, test_kernels_llama.py, test_kernels_roofline.py and test_flash_attention.py
#      with the kernels compiled for the GPU (TRITON_INTERPRET=0), not interpreted;
#   2. compile: every kernel compiled for sm75/80/89/90 and this GPU's arch at LLaMA-7B shapes
#      (python -m labkit.kernels.offline): registers, spills, shared memory per kernel, in
#      $LOGS/kernels_compile.json; fails on a spill or on shared memory over the arch's limit;
#   3. bench: benchmarks/bench_kernels.py --quick on random-weight LLaMA-7B-shaped layers (GB/s and % of peak
#      per kernel against eager and torch.compile; a 4-layer decode step in fp16 and W4A16 against the
#      bandwidth limit); fails when a kernel misses its bandwidth target (bench_kernels.TARGETS);
#   4. lessons: the GPU code paths of lessons 09 and 10 on tiny-llama-random (no download): lesson 09's
#      kernel-timing cell and its engine on the Triton kernels, checked token for token against
#      model.generate; lesson 10's GPU profile cell (the cell tagged "gpu", run as is) and its fused
#      W4A16 model;
#   5. lesson_tests: every lesson's GPU-profile calls (tests/test_gpu_branch.py) and the parking of replaced
#      tensors (tests/test_all_or_nothing.py -k parking), each also on real CUDA tensors (their "cuda" cases).
# Then $LOGS/summary.json: each step's exit code, seconds and limit, the GPU, torch and triton versions,
# GB/s and % of peak per kernel, the targets checked, the compile table's path, the tests and lesson checks
# passed and failed (benchmarks/gpu_summary.py).
#
#   bash benchmarks/gpu_check.sh                  # from anywhere; logs go to $OUT or build/gpu_check
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Needs: torch with CUDA, triton, transformers, pytest (no nbval, no notebook kernel, no network), and the
# WikiText-2 files (step 5's calibration data) under $LABKIT_DATA_DIR, shared/data or ../shared/data.
# Each step has its own time limit; the script exits non-zero if any step fails, after running all.
set -u -o pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-build/gpu_check}"
mkdir -p "$LOGS"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export TOKENIZERS_PARALLELISM=false LABKIT_RESULTS_DIR="$LOGS/results" GPU_CHECK_LOGS="$LOGS"
for d in "${LABKIT_DATA_DIR:-}" shared/data ../shared/data; do  # offline WikiText-2 for the calibration sets
    if [ -n "$d" ] && [ -d "$d" ]; then export LABKIT_DATA_DIR="$(cd "$d" && pwd)"; break; fi
done
PYTEST=("$PY" -m pytest -q -o addopts="" -p no:cacheprovider --durations=5)
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $LOGS/NAME.log
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOGS/summary.txt"
    printf '{"name": "%s", "rc": %d, "seconds": %d, "limit": %d}\n' "$name" "$rc" $((SECONDS - start)) "$limit" \
        >> "$LOGS/steps.jsonl"
    [ "$rc" -eq 0 ] || status=1
}

: > "$LOGS/summary.txt"
: > "$LOGS/steps.jsonl"
rm -f "$LOGS/bench.json" "$LOGS/lessons.json" "$LOGS/kernels_compile.json" "$LOGS"/*.xml "$LOGS/summary.json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOGS/summary.txt"
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'| triton', triton.__version__, '| transformers', transformers.__version__,
'| GPU:', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1 | tee -a "$LOGS/summary.txt"

step tests 120 "${PYTEST[@]}" --junitxml="$LOGS/tests.xml" \
    tests/test_kernels.py tests/test_kernels_llama.py tests/test_kernels_roofline.py tests/test_flash_attention.py

ARCH=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(10 * a + b)" 2>/dev/null)
step compile 60 "$PY" -m labkit.kernels.offline --arch $(printf '%s\n' 75 80 89 90 $ARCH | sort -un) \
    --json "$LOGS/kernels_compile.json"

step bench 150 "$PY" benchmarks/bench_kernels.py --quick --json "$LOGS/bench.json"

step lessons 50 "$PY" - <<'PYEOF'
import json
import os
import time
from pathlib import Path

import torch

from labkit import kernels, models, serving
from labkit.kernels import llama as fused_llama
from labkit.kernels import roofline

assert torch.cuda.is_available(), "no CUDA device: nothing to check"
failures = []
checks = []  # (name, passed), for summary.json


def check(name, ok):
    checks.append((name, bool(ok)))


def code_cells(notebook):
    cells = json.loads(Path(notebook).read_text())["cells"]
    for cell in cells:
        if cell["cell_type"] == "code":
            src = cell["source"]
            yield cell, "".join(src) if isinstance(src, list) else src


# --- lesson 09 -------------------------------------------------------------------------------------------
print("lesson 09, section 5: the cell that times the compiled paged-attention kernel, as the lesson has it")
timing = [s for _, s in code_cells("notebooks/09_kv_cache_and_paged_attention.ipynb")
          if s.startswith("if torch.cuda.is_available():") and "paged_attention_decode" in s]
if len(timing) != 1:
    failures.append(f"lesson 09: expected one GPU timing cell, found {len(timing)}")
else:
    # the learner's kernel step from the lesson's "build it" (labkit's until it passes)
    exec(timing[0], {"torch": torch, "kernels": kernels, "my_online_softmax_step": kernels.online_softmax_step})
check("lesson 09: kernel-timing cell", len(timing) == 1)

print("\nlesson 09, section 6: the engine on the Triton kernels (tiny-llama-random), against model.generate")
prompts = ["The history of the city", "Paris is", "def fibonacci(n):\n    # Return the n-th Fibonacci number.\n",
           "In 1905, Albert Einstein published four papers", "Once upon a time", "The three primary colours are"]
limits = [12, 4, 16, 8, 6, 10]
for dtype in (torch.float32, torch.float16):  # fp32: must be identical; fp16: near-ties may flip, reported
    model, tok = models.load("tiny-llama-random", device="cuda", dtype=dtype)
    engine = serving.Engine(model, tok, num_blocks=16, block_size=16, max_batch=3, backend="auto")
    start = time.perf_counter()
    completions = engine.generate(prompts, max_new_tokens=limits)
    seconds = time.perf_counter() - start
    same = 0
    for prompt, n, c in zip(prompts, limits, completions):
        ids = tok(prompt, return_tensors="pt").input_ids.cuda()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
        same += c.token_ids == out[0, ids.shape[1]:].tolist()
    engine.blocks.check()
    print(f"  {str(dtype)[6:]}: {same}/{len(prompts)} requests identical to generate; "
          f"{engine.stats['steps']} decode steps, batch sizes {engine.stats['batch_sizes']}; {seconds:.2f} s")
    if dtype == torch.float32 and same != len(prompts):
        failures.append(f"lesson 09 engine (fp32, Triton kernels): {same}/{len(prompts)} identical to generate")
    check(f"lesson 09: engine on Triton kernels, {str(dtype)[6:]}", dtype != torch.float32 or same == len(prompts))

# --- lesson 10 -------------------------------------------------------------------------------------------
print("\nlesson 10, section 7.2: the GPU profile cell (tagged 'gpu'), run as is")
gpu_cells = [s for cell, s in code_cells("notebooks/10_fused_ops.ipynb")
             if "gpu" in cell.get("metadata", {}).get("tags", [])]
if len(gpu_cells) != 1:
    failures.append(f"lesson 10: expected one cell tagged 'gpu', found {len(gpu_cells)}")
else:
    exec(gpu_cells[0], {"__name__": "__main__"})  # as in a notebook: torch.compile looks the module up by name
check("lesson 10: GPU profile cell", len(gpu_cells) == 1)

print("\nlesson 10, section 6: a model through fuse(w4a16=True), on the Triton kernels (tiny-llama-random, fp16)")
model, tok = models.load("tiny-llama-random", device="cuda", dtype=torch.float16)
ids = tok("The history of the city", return_tensors="pt").input_ids.cuda()
one = ids[:, :1]
with torch.no_grad():
    ref = model(ids).logits.float()
    dense_ms = roofline.time_ms(lambda: model(one), "cuda")
report = fused_llama.fuse(model, w4a16=True, group_size=32)
with torch.no_grad():
    out = model(ids).logits.float()
    w4_ms = roofline.time_ms(lambda: model(one), "cuda")
    tokens = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
kinds = {type(m).__name__ for m in model.modules()}
diff = (out - ref).abs().max().item()
print(f"  {report}; W4A16Linear in the model: {'W4A16Linear' in kinds}; max |logits - dense logits| {diff:.3g} "
      f"(4-bit RTN changes the weights); one token: dense {dense_ms:.3f} ms, W4A16 {w4_ms:.3f} ms; "
      f"generated {tokens.shape[1] - ids.shape[1]} tokens")
if not torch.isfinite(out).all() or "W4A16Linear" not in kinds:
    failures.append("lesson 10: the fused W4A16 model did not run on the Triton kernels")
check("lesson 10: fused W4A16 model", torch.isfinite(out).all() and "W4A16Linear" in kinds)

Path(os.environ["GPU_CHECK_LOGS"], "lessons.json").write_text(json.dumps(dict(checks=checks, failures=failures)))
print("\nFAILED: " + "; ".join(failures) if failures else "\nall lesson GPU paths ran")
raise SystemExit(1 if failures else 0)
PYEOF

step lesson_tests 90 "${PYTEST[@]}" --junitxml="$LOGS/lesson_tests.xml" \
    tests/test_gpu_branch.py tests/test_all_or_nothing.py -k "test_gpu_branch or parking"

echo "=== summary"
cat "$LOGS/summary.txt"
"$PY" benchmarks/gpu_summary.py "$LOGS" || status=1
exit $status
