"""Automatic against uniform rank allocation for SVD-LLM, on the real model: perplexity at one budget.

    python benchmarks/bench_rank_allocation.py                 # CPU profile, budget 0.8 (about 6 minutes)
    python benchmarks/bench_rank_allocation.py --budget 0.6
    LABKIT_PROFILE=gpu python benchmarks/bench_rank_allocation.py   # LLaMA-7B (needs CUDA)

Every allocation keeps the same fraction `budget` of the decoder linears' parameters and is applied
with the same whitened truncation (labkit.lowrank.svd, activation_aware=True, same calibration):
only the ranks differ. Allocations compared (labkit.lowrank.greedy_ranks on the whitened spectra):

    uniform          every linear keeps `budget` of its parameters (param_ratio=budget)
    greedy           cheapest share of a layer's output energy per parameter first (allocate_ranks)
    greedy, floor X  the same, no linear below X times its uniform rank (min_ranks)
    greedy, absolute cost σ_i² / (in + out), not normalised by the layer's Σσ² (relative=False)

Lesson 08 shows the first two; this script checks whether the obvious repairs of the greedy proxy
help. Perplexity on the profile's `sweep_windows` test windows, as in the lesson.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from labkit import data, evaluate, lowrank, models, profiles


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.8, help="fraction of the linears' parameters kept")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    P = profiles.get()
    model, tokenizer = models.load(P.model, device=P.device, dtype=P.dtype)
    test_ids = data.test_tokens(tokenizer)
    calib = data.calibration(tokenizer, P.calib_samples, P.seqlen, seed=0)
    spectra, shapes = lowrank.measure_spectra(model, calib)
    uniform = {name: lowrank.rank_for_ratio(inp, out, args.budget) for name, (out, inp) in shapes.items()}
    floor = lambda x: {name: max(1, int(x * r)) for name, r in uniform.items()}
    allocations = {
        "uniform": uniform,
        "greedy": lowrank.greedy_ranks(spectra, shapes, args.budget),
        "greedy, floor 0.5": lowrank.greedy_ranks(spectra, shapes, args.budget, min_ranks=floor(0.5)),
        "greedy, floor 0.75": lowrank.greedy_ranks(spectra, shapes, args.budget, min_ranks=floor(0.75)),
        "greedy, absolute": lowrank.greedy_ranks(spectra, shapes, args.budget, relative=False),
    }
    total = sum(out * inp for out, inp in shapes.values())
    print(f"{P.name} profile, {P.model}: SVD-LLM at budget {args.budget:g}; {P.calib_samples} x {P.seqlen} calibration "
          f"tokens; perplexity on the first {P.sweep_windows} windows of {P.seqlen}")
    print(f"{'allocation':<20} {'kept':>7} {'lowest rank / uniform':>22} {'perplexity':>11} {'seconds':>8}")
    for label, ranks in allocations.items():
        start = time.perf_counter()
        m = copy.deepcopy(model)
        lowrank.svd(m, rank=ranks, activation_aware=True, calibration=calib)
        ppl = evaluate.perplexity(m, test_ids, P.seqlen, P.sweep_windows, progress=False)
        del m
        kept = sum(r * sum(shapes[name]) for name, r in ranks.items()) / total
        lowest = min(r / uniform[name] for name, r in ranks.items())
        print(f"{label:<20} {kept:>7.4f} {lowest:>22.2f} {ppl:>11.2f} {time.perf_counter() - start:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
