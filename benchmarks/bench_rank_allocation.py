"""Automatic against uniform rank allocation for SVD-LLM, on the real model: perplexity at one budget.

    python benchmarks/bench_rank_allocation.py                 # CPU profile, budget 0.8 (about 20 minutes)
    python benchmarks/bench_rank_allocation.py --budget 0.6
    python benchmarks/bench_rank_allocation.py --allocations uniform,by-kind-measured
    LABKIT_PROFILE=gpu python benchmarks/bench_rank_allocation.py   # LLaMA-7B (needs CUDA)

Every allocation keeps the same fraction `budget` of the decoder linears' parameters and is applied
with the same whitened truncation (labkit.lowrank.svd, activation_aware=True, same calibration):
only the ranks differ. Allocations compared (labkit.lowrank.greedy_ranks on the whitened spectra):

    uniform          every linear keeps `budget` of its parameters (param_ratio=budget)
    greedy           cheapest share of a layer's output energy per parameter first (allocate_ranks)
    greedy-floor-X   the same, no linear below X times its uniform rank (min_ranks)
    greedy-absolute  cost σ_i² / (in + out), not normalised by the layer's Σσ² (relative=False)
    by-kind-measured one kept fraction per kind of linear from measured loss increases on 2 other
                     validation windows (allocate_by_sensitivity; about 13 minutes on the CPU profile)

Lesson 08 shows the first two; this script checks whether the obvious repairs of the greedy proxy
help, and whether measuring the damage end to end does. Perplexity on the profile's `sweep_windows` test
windows, as in the lesson.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from labkit import data, evaluate, lowrank, models, profiles

ALLOCATIONS = ["uniform", "greedy", "greedy-floor-0.5", "greedy-floor-0.75", "greedy-absolute", "by-kind-measured"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.8, help="fraction of the linears' parameters kept")
    parser.add_argument("--allocations", default=",".join(ALLOCATIONS), help=f"comma list of {', '.join(ALLOCATIONS)}")
    args = parser.parse_args(argv)
    chosen = args.allocations.split(",")
    if set(chosen) - set(ALLOCATIONS):
        raise SystemExit(f"--allocations: unknown {sorted(set(chosen) - set(ALLOCATIONS))}; allowed: {ALLOCATIONS}.")
    torch.manual_seed(0)
    P = profiles.get()
    model, tokenizer = models.load(P.model, device=P.device, dtype=P.dtype)
    test_ids = data.test_tokens(tokenizer)
    calib = data.calibration(tokenizer, P.calib_samples, P.seqlen, seed=0)
    spectra, shapes = lowrank.measure_spectra(model, calib)
    uniform = {name: lowrank.rank_for_ratio(inp, out, args.budget) for name, (out, inp) in shapes.items()}

    def floor(x):
        return {name: max(1, int(x * r)) for name, r in uniform.items()}

    allocations = {
        "uniform": lambda: uniform,
        "greedy": lambda: lowrank.greedy_ranks(spectra, shapes, args.budget),
        "greedy-floor-0.5": lambda: lowrank.greedy_ranks(spectra, shapes, args.budget, min_ranks=floor(0.5)),
        "greedy-floor-0.75": lambda: lowrank.greedy_ranks(spectra, shapes, args.budget, min_ranks=floor(0.75)),
        "greedy-absolute": lambda: lowrank.greedy_ranks(spectra, shapes, args.budget, relative=False),
        "by-kind-measured": lambda: lowrank.allocate_by_sensitivity(model, calib, args.budget, probe).ranks,
    }
    probe = data.calibration(tokenizer, 2, P.seqlen, seed=2)  # validation windows other than calib's
    total = sum(out * inp for out, inp in shapes.values())
    print(
        f"{P.name} profile, {P.model}: SVD-LLM at budget {args.budget:g}; {P.calib_samples} x {P.seqlen} calibration "
        f"tokens; perplexity on the first {P.sweep_windows} windows of {P.seqlen}"
    )
    print(f"{'allocation':<20} {'kept':>7} {'lowest rank / uniform':>22} {'perplexity':>11} {'seconds':>8}")
    for label in chosen:
        start = time.perf_counter()
        ranks = allocations[label]()
        m = copy.deepcopy(model)
        lowrank.svd(m, rank=ranks, activation_aware=True, calibration=calib)
        ppl = evaluate.perplexity(m, test_ids, P.seqlen, P.sweep_windows, progress=False)
        del m
        kept = sum(ranks[n] * sum(shapes[n]) if n in ranks else shapes[n][0] * shapes[n][1] for n in shapes) / total
        lowest = min(ranks.get(name, uniform[name] / args.budget) / uniform[name] for name in shapes)
        print(f"{label:<20} {kept:>7.4f} {lowest:>22.2f} {ppl:>11.2f} {time.perf_counter() - start:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
