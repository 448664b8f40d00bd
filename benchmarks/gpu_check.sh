#!/usr/bin/env bash
# Everything about labkit.kernels that needs a CUDA GPU, in one call (about 5-8 minutes):
#   1. tests: tests/test_kernels.py, test_kernels_llama.py and test_kernels_roofline.py with the kernels
#      compiled for the GPU (TRITON_INTERPRET=0), not interpreted;
#   1b. compile: every kernel compiled for sm75/80/89/90 and this GPU's arch at LLaMA-7B shapes
#      (python -m labkit.kernels.offline): registers, spills, shared memory per kernel, in
#      $LOGS/kernels_compile.json; fails on a spill or on shared memory over the arch's limit;
#   2. bench: benchmarks/bench_kernels.py --quick (GB/s and % of peak per kernel against eager and
#      torch.compile; a 4-layer LLaMA-7B-shaped decode step in fp16 and W4A16 against the bandwidth limit);
#   3. lessons: the GPU code paths of lessons 09 and 10 on tiny-llama-random (no download): lesson 09's
#      kernel-timing cell and its engine on the Triton kernels, checked token for token against
#      model.generate; lesson 10's GPU profile cell (the cell tagged "gpu", run as is) and its fused
#      W4A16 model.
#
#   bash benchmarks/gpu_check.sh                  # from anywhere; logs go to $OUT or build/gpu_check
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Needs: torch with CUDA, triton, transformers, pytest (no nbval, no notebook kernel, no network).
# Each step has its own time limit; the script exits non-zero if any step fails, after running all.
set -u -o pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-build/gpu_check}"
mkdir -p "$LOGS"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export TOKENIZERS_PARALLELISM=false LABKIT_RESULTS_DIR="$LOGS/results"
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $LOGS/NAME.log
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOGS/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

: > "$LOGS/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOGS/summary.txt"
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'| triton', triton.__version__, '| transformers', transformers.__version__,
'| GPU:', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1 | tee -a "$LOGS/summary.txt"

step tests 170 "$PY" -m pytest -q -o addopts="" -p no:cacheprovider --durations=5 \
    tests/test_kernels.py tests/test_kernels_llama.py tests/test_kernels_roofline.py

ARCH=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(10 * a + b)" 2>/dev/null)
step compile 150 "$PY" -m labkit.kernels.offline --arch $(printf '%s\n' 75 80 89 90 $ARCH | sort -un) \
    --json "$LOGS/kernels_compile.json"

step bench 220 "$PY" benchmarks/bench_kernels.py --quick

step lessons 170 "$PY" - <<'PYEOF'
import json
import time
from pathlib import Path

import torch

from labkit import kernels, models, serving
from labkit.kernels import llama as fused_llama
from labkit.kernels import roofline

assert torch.cuda.is_available(), "no CUDA device: nothing to check"
failures = []


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
    exec(timing[0], {"torch": torch, "kernels": kernels})

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

# --- lesson 10 -------------------------------------------------------------------------------------------
print("\nlesson 10, section 7.2: the GPU profile cell (tagged 'gpu'), run as is")
gpu_cells = [s for cell, s in code_cells("notebooks/10_fused_ops.ipynb")
             if "gpu" in cell.get("metadata", {}).get("tags", [])]
if len(gpu_cells) != 1:
    failures.append(f"lesson 10: expected one cell tagged 'gpu', found {len(gpu_cells)}")
else:
    exec(gpu_cells[0], {"__name__": "lesson10_gpu"})

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

print("\nFAILED: " + "; ".join(failures) if failures else "\nall lesson GPU paths ran")
raise SystemExit(1 if failures else 0)
PYEOF

echo "=== summary"
cat "$LOGS/summary.txt"
exit $status
