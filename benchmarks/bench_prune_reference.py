"""labkit.prune.wanda, sparsegpt and llm_pruner against faithful implementations of the papers (for
LLM-Pruner: the authors' own code), on the same model, calibration and evaluation windows.

    python benchmarks/bench_prune_reference.py                  # Wanda and SparseGPT at 50% and 2:4 (about 6 min)
    python benchmarks/bench_prune_reference.py --methods sparsegpt --patterns 2:4
    python benchmarks/bench_prune_reference.py --methods llm_pruner --llm-pruner-code ~/LLM-Pruner \
        --eval-windows 40 --calib-samples 32                    # LLM-Pruner at 20% and 50% (about 15 min)
    python benchmarks/bench_prune_reference.py --smoke          # seconds: labkit == reference on one layer
    LABKIT_PROFILE=gpu python benchmarks/bench_prune_reference.py   # LLaMA-7B (needs CUDA)

The references below are written from the papers, in the style of the authors' code:
  * SparseGPT (Frantar & Alistarh, ICML 2023, Algorithm 1; github.com/IST-DASLab/sparsegpt): a
    `SparseGPT` object per linear accumulates H = 2 X Xᵀ / n in `add_batch` and prunes in
    `fasterprune`: dampening 1% of the mean diagonal, the upper Cholesky factor of H⁻¹, the adaptive
    mask chosen per block of 128 columns by w² / [H⁻¹]_jj² (N:M: per group of M columns when the
    group is reached), each pruned weight's error spread over the later columns, lazy block updates.
  * Wanda (Sun et al., ICLR 2024, eq. 1; github.com/locuslab/wanda): ‖X_j‖₂ accumulated as a running
    mean of squared norms, score |W_ij| · ‖X_j‖₂, the lowest-scoring weights of every output row
    removed (N:M: the lowest N of every M consecutive inputs of a row).
Both walk the layers as the authors' drivers do: inputs of layer 0 caught once, every linear of a
layer observed in one pass, the layer pruned, and its pruned outputs fed to the next layer. They
share nothing with labkit except the model, the data and the perplexity protocol.

LLM-Pruner (Ma et al., NeurIPS 2023) runs the authors' code itself, from a checkout of
github.com/horseee/LLM-Pruner given with --llm-pruner-code (nothing of it is copied here), set up
as its block-wise LLaMA script does: Taylor importance (`param_first`: |w · ∂L/∂w| summed over each
coupled group), local pruning of the k_proj roots (consecutive groups of head_dim channels: whole
KV groups) and the gate_proj roots of the pruned layers (layers 4-27 of SmolLM2's 30, as labkit's
default), no LoRA. Adaptations to run it on transformers 5 and SmolLM2, none touching its pruning:
its package __init__ (which imports modelling code of other architectures) is skipped; the graph
is traced with eager attention (SDPA's fused GQA hides repeat_kv, so the tracer would tie K channels
to the wrong query channels); the trace returns the logits; after pruning each attention's
num_key_value_groups is set from its pruned shapes (what transformers 5 reads); a k_proj whose
rounding removes no head is left out of the roots (the code would stop on an empty torch.cat when
a few channels but no whole head are due, as with SmolLM2's 3 heads below a third); the gradient of
the loss is accumulated over batches of 4 samples, each weighted so the sum is the one-batch mean
loss of the authors' script. Its per-structure rounding keeps int(C · (1 − s)) of each root's C channels
at sparsity s, so it cannot hit every removal: the benchmark gives it the largest s whose removal
is at most labkit's ratio, and runs labkit a second time at the removal the authors' code reached
(same removal, side by side).

Pass criteria printed per setting (the issue's): labkit's perplexity within 1% of the reference's
(or lower), and, for SparseGPT, labkit's pruning time at most the reference's; for LLM-Pruner,
labkit at the ratio within 5% of the authors' code (or lower), which removes at most as much. Timings on a shared
machine are noisy: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import types

import torch
from reference_walk import catch_layer0_inputs  # this folder
from torch import nn

from labkit import data, evaluate, models, profiles, prune

# --- the references -----------------------------------------------------------------------------------


class SparseGPT:
    """One linear layer: H accumulated from its inputs, then Algorithm 1 of the SparseGPT paper."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.rows, self.columns = layer.weight.shape
        self.H = torch.zeros(self.columns, self.columns, device=layer.weight.device)
        self.nsamples = 0

    def add_batch(self, inp):
        inp = inp.reshape(-1, inp.shape[-1]).t().float()  # [columns, tokens]
        tmp = 1  # one calibration sample per call, as the authors' driver feeds them
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = (2 / self.nsamples) ** 0.5 * inp
        self.H += inp @ inp.t()

    def fasterprune(self, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
        W = self.layer.weight.data.clone().float()
        H = self.H
        self.H = None
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns, device=W.device)
        H[diag, diag] += damp
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prunen == 0:  # adaptive mask selection: the block's lowest w² / [H⁻¹]_jj² (eq. 3's error)
                tmp = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prunen != 0 and i % prunem == 0:  # N:M: choose the group's pruned weights on reaching it
                    tmp = W1[:, i : i + prunem] ** 2 / torch.diag(Hinv1)[i : i + prunem].reshape(1, -1) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)  # OBS update of the later columns
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy update of the rest
        self.layer.weight.data = W.to(self.layer.weight.dtype)


class Wanda:
    """One linear layer: ‖X_j‖₂² accumulated as a running mean, then the per-row pruning of eq. 1."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.scaler_row = torch.zeros(layer.in_features, device=layer.weight.device)
        self.nsamples = 0

    def add_batch(self, inp):
        inp = inp.reshape(-1, inp.shape[-1]).t().float()  # [columns, tokens]
        self.scaler_row *= self.nsamples / (self.nsamples + 1)
        self.nsamples += 1
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples

    def fasterprune(self, sparsity, prunen=0, prunem=0):
        W = self.layer.weight.data
        W_metric = W.abs().float() * torch.sqrt(self.scaler_row.reshape(1, -1))
        mask = torch.zeros_like(W_metric, dtype=torch.bool)
        if prunen != 0:
            for ii in range(0, W_metric.shape[1], prunem):
                tmp = W_metric[:, ii : ii + prunem]
                mask.scatter_(1, ii + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
        else:  # per output row (the paper's comparison group)
            indices = torch.sort(W_metric, dim=-1, stable=True)[1][:, : int(W_metric.shape[1] * sparsity)]
            mask.scatter_(1, indices, True)
        W[mask] = 0


@torch.no_grad()
def reference_prune(model, calibration, dev, method, sparsity, prunen=0, prunem=0):
    """The authors' layer-by-layer driver: catch layer 0's inputs, then for every layer observe all of
    its linears in one pass, prune them, and pass the pruned layer's outputs on."""
    layers = model.model.layers
    inps, kwargs = catch_layer0_inputs(model, calibration, dev)
    for layer in layers:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        pruners = {n: (SparseGPT if method == "sparsegpt" else Wanda)(m) for n, m in linears.items()}
        handles = [
            m.register_forward_hook(lambda mod, inp, out, p=pruners[n]: p.add_batch(inp[0].data))
            for n, m in linears.items()
        ]
        for j in range(len(inps)):
            layer(inps[j], **kwargs[j])
        for h in handles:
            h.remove()
        for pruner in pruners.values():
            pruner.fasterprune(sparsity, prunen, prunem)
        inps = [layer(inps[j], **kwargs[j]) for j in range(len(inps))]
        inps = [x[0] if isinstance(x, tuple) else x for x in inps]


# --- LLM-Pruner: the authors' code ---------------------------------------------------------------------


def import_authors_llm_pruner(code_dir):
    """(torch_pruning, hf_llama_pruner) from a checkout of github.com/horseee/LLM-Pruner. The package's
    __init__ imports modelling code for other architectures that transformers 5 no longer loads: the
    two packages are registered empty, so only the pruning code itself is imported."""
    root = os.path.join(os.path.expanduser(code_dir), "LLMPruner")
    if not os.path.isfile(os.path.join(root, "pruner", "hf_llama_pruner.py")):
        raise SystemExit(
            f"--llm-pruner-code {code_dir}: no LLMPruner/pruner/hf_llama_pruner.py there; give the folder of a "
            f"checkout of github.com/horseee/LLM-Pruner."
        )
    for name, path in (("LLMPruner", root), ("LLMPruner.pruner", os.path.join(root, "pruner"))):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
    import LLMPruner.torch_pruning as tp
    from LLMPruner.pruner import hf_llama_pruner

    return tp, hf_llama_pruner


def authors_removal(model, sparsity, layers) -> float:
    """The fraction of decoder-linear weights the authors' local pruning removes at `sparsity`: each root
    keeps int(C · (1 − sparsity)) of its C channels; k_proj's go in whole heads of head_dim."""
    removed = 0
    for i in layers:
        attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
        k = attn.k_proj.out_features
        heads = (k - int(k * (1 - sparsity))) // attn.head_dim
        channels = mlp.gate_proj.out_features - int(mlp.gate_proj.out_features * (1 - sparsity))
        removed += heads * prune.group_param_count(attn) + channels * prune.channel_param_count(mlp)
    return removed / prune.linear_param_count(model)


def authors_sparsity(model, ratio, layers) -> float:
    """The largest sparsity (steps of 1e-4) at which the authors' code removes at most `ratio`."""
    return max(s / 1e4 for s in range(10_000) if authors_removal(model, s / 1e4, layers) <= ratio)


def authors_llm_pruner(model, calibration, sparsity, layers, code_dir, batch_size=4):
    """The authors' block-wise LLM-Pruner (Taylor, param_first, sum over each group), run on `model` in place."""
    tp, hf_llama_pruner = import_authors_llm_pruner(code_dir)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")  # repeat_kv visible to the tracer
    for p in model.parameters():
        p.requires_grad_(True)
    importance = hf_llama_pruner.TaylorImportance(group_reduction="sum", taylor="param_first")

    def removes_a_head(i):  # its rounding removes (C − int(C · (1 − s))) // head_dim heads of k_proj's C channels
        k = model.model.layers[i].self_attn.k_proj.out_features
        return (k - int(k * (1 - sparsity))) // model.model.layers[i].self_attn.head_dim > 0

    pruner = tp.pruner.MetaPruner(
        model,
        calibration[:2, :8],  # only traced: any tokens build the dependency graph
        importance=importance,
        global_pruning=False,
        iterative_steps=1,
        ch_sparsity=sparsity,
        ignored_layers=[],
        channel_groups={},
        consecutive_groups={layer.self_attn.k_proj: layer.self_attn.head_dim for layer in model.model.layers},
        customized_pruners={LlamaRMSNorm: hf_llama_pruner.hf_rmsnorm_pruner},
        root_module_types=None,
        root_instances=[model.model.layers[i].self_attn.k_proj for i in layers if removes_a_head(i)]
        + [model.model.layers[i].mlp.gate_proj for i in layers],
        forward_fn=lambda m, x: m(x, use_cache=False).logits,
    )
    model.zero_grad()
    n = calibration.shape[0]
    for start in range(0, n, batch_size):
        batch = calibration[start : start + batch_size]
        loss = model(batch, labels=batch, use_cache=False).loss * batch.shape[0] / n  # the whole batch's mean
        loss.backward()
    pruner.step()
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.num_key_value_groups = attn.q_proj.out_features // attn.k_proj.out_features
    model.zero_grad()
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    model.set_attn_implementation(implementation)


def compare_llm_pruner(P, test_ids, calib, ratios, code_dir):
    """Rows of labkit's llm_pruner at each ratio, labkit at the authors' removal, and the authors' code."""

    def ppl(model):
        return evaluate.perplexity(model, test_ids, P.seqlen, P.eval_windows, progress=False)

    model, _ = models.load(P.model, device=P.device, dtype=P.dtype)
    layers = prune.default_layers(len(model.model.layers))
    start = time.perf_counter()
    importance = prune.taylor_importance(model, calib, layers, batch_size=4)
    importance_s = time.perf_counter() - start
    sparsities = {ratio: authors_sparsity(model, ratio, layers) for ratio in ratios}
    del model
    print(f"LLM-Pruner, layers {layers[0]}-{layers[-1]}; labkit's Taylor importance in {importance_s:.0f} s")
    print(
        f"{'setting':<16} {'ppl labkit':>10} {'removed':>8} {'ppl ref':>9} {'removed':>8} "
        f"{'ppl labkit at ref removal':>26} {'diff':>7} {'ref s':>6}  within 5%"
    )
    all_ok = True
    for ratio in ratios:
        model, _ = models.load(P.model, device=P.device, dtype=P.dtype)
        report = prune.llm_pruner(model, None, ratio, importance=importance)
        ppl_l, removed_l = ppl(model), report.linear_removed
        del model
        model, _ = models.load(P.model, device=P.device, dtype=P.dtype)
        before = prune.linear_param_count(model)
        start = time.perf_counter()
        authors_llm_pruner(model, calib, sparsities[ratio], layers, code_dir)
        sec_r = time.perf_counter() - start
        ppl_r, removed_r = ppl(model), 1 - prune.linear_param_count(model) / before
        del model
        model, _ = models.load(P.model, device=P.device, dtype=P.dtype)
        same = prune.llm_pruner(model, None, removed_r, importance=importance)
        ppl_same = ppl(model)
        del model
        diff = ppl_l / ppl_r - 1
        close = diff <= 0.05
        all_ok &= close
        print(
            f"{f'llm_pruner {ratio:.0%}':<16} {ppl_l:>10.2f} {removed_l:>8.1%} {ppl_r:>9.2f} {removed_r:>8.1%} "
            f"{ppl_same:>18.2f} ({same.linear_removed:.1%}) {100 * diff:>6.1f}% {sec_r:>6.0f}  "
            f"{'yes' if close else 'NO':>9}",
            flush=True,
        )
    return all_ok


# --- the comparison -----------------------------------------------------------------------------------


def run(P, test_ids, calib, method, pattern, which):
    model, _ = models.load(P.model, device=P.device, dtype=P.dtype)
    start = time.perf_counter()
    if which == "labkit":
        getattr(prune, method)(model, calib, 0.5 if pattern == "unstructured" else None, pattern)
    else:
        n, m = (0, 0) if pattern == "unstructured" else (2, 4)  # 2:4 keeps 2 of 4: prune the other 2
        reference_prune(model, calib, P.device, method, 0.5, n, m)
    if P.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    sparsity = prune.sparsity_report(model).overall
    ppl = evaluate.perplexity(model, test_ids, P.seqlen, P.eval_windows, progress=False)
    del model
    return ppl, seconds, sparsity


def smoke() -> None:
    """Seconds: on one layer, given the same inputs, labkit's per-layer functions and the references.
    Wanda and N:M SparseGPT agree exactly. Unstructured SparseGPT differs by design in a few mask
    entries: the authors' code prunes every weight at or below the block's threshold (at least one
    more than its share per block), labkit exactly round(sparsity · numel) over the matrix; the
    updates of the later columns then differ too."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 256, generator=g)
    X = torch.randn(2, 128, 256, generator=g) @ (torch.eye(256) + torch.randn(256, 256, generator=g) / 10)
    for pattern, (n, m) in [("unstructured", (0, 0)), ("2:4", (2, 4))]:
        for Ref, ours in [(SparseGPT, prune.sparsegpt_prune), (Wanda, None)]:
            linear = nn.Linear(256, 48, bias=False)
            linear.weight.data = W.clone()
            ref = Ref(linear)
            for x in X:
                ref.add_batch(x)
            if Ref is SparseGPT:
                H = ref.H.clone()
                ref.fasterprune(0.5, n, m)
                mine = ours(W.clone(), H, 0.5 if n == 0 else None, pattern)
                mine = mine[0] if isinstance(mine, tuple) else mine
            else:
                norm = ref.scaler_row.sqrt()
                ref.fasterprune(0.5, n, m)
                mine = W.masked_fill(prune.wanda_mask(W, norm, 0.5 if n == 0 else None, pattern), 0)  # True = pruned
            diff = (mine - linear.weight.data).abs().max().item()
            differ = int(((mine == 0) != (linear.weight.data == 0)).sum())
            print(
                f"one layer, {Ref.__name__} {pattern}: masks differ in {differ} of {W.numel()} weights, "
                f"largest weight difference {diff:.1e}"
            )
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    for method in ("wanda", "sparsegpt"):
        tiny = models.load("tiny-llama-random", device="cpu")[0]
        reference_prune(tiny, calib, "cpu", method, 0.5, 2, 4)
        print(f"tiny model, reference {method} 2:4 driver: sparsity {prune.sparsity_report(tiny).overall:.1%}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="wanda,sparsegpt", help="wanda, sparsegpt, llm_pruner (comma-separated)")
    parser.add_argument("--patterns", default="unstructured,2:4", help="unstructured (50%%), 2:4, or both")
    parser.add_argument("--ratios", default="0.2,0.5", help="llm_pruner: fractions of decoder-linear weights removed")
    parser.add_argument(
        "--llm-pruner-code",
        help="llm_pruner: folder of a checkout of github.com/horseee/LLM-Pruner (the authors' code)",
    )
    parser.add_argument("--eval-windows", type=int, help="test windows evaluated (default: the profile's)")
    parser.add_argument("--calib-samples", type=int, help="calibration windows (default: the profile's)")
    parser.add_argument(
        "--reversed",
        action="store_true",
        help="feed the calibration samples in reverse order: the same statistics up to round-off, "
        "to see how far round-off alone moves each implementation's perplexity",
    )
    parser.add_argument("--smoke", action="store_true", help="only compare one layer (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        return smoke()
    methods, patterns = args.methods.split(","), args.patterns.split(",")
    if set(methods) - {"wanda", "sparsegpt", "llm_pruner"} or set(patterns) - {"unstructured", "2:4"}:
        raise SystemExit(
            f"--methods {methods} / --patterns {patterns}: allowed are wanda, sparsegpt, llm_pruner / "
            f"unstructured, 2:4."
        )
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        ratios = []
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise SystemExit(f"--ratios {args.ratios}: allowed are comma-separated numbers in (0, 1), e.g. 0.2,0.5.")
    if "llm_pruner" in methods and not args.llm_pruner_code:
        raise SystemExit("--methods llm_pruner needs --llm-pruner-code PATH (a checkout of horseee/LLM-Pruner).")
    for name in ("eval_windows", "calib_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: allowed is a count >= 1.")
    torch.manual_seed(0)
    P = profiles.get()
    P = dataclasses.replace(
        P,
        eval_windows=args.eval_windows or P.eval_windows,
        calib_samples=args.calib_samples or P.calib_samples,
    )
    model, tokenizer = models.load(P.model, device=P.device, dtype=P.dtype)
    del model
    test_ids = data.test_tokens(tokenizer)
    calib = data.calibration(tokenizer, P.calib_samples, P.seqlen, seed=0)
    if args.reversed:
        calib = calib.flip(0)
    print(
        f"{P.name} profile: {P.model}, {P.calib_samples} calibration samples of {P.seqlen} tokens"
        f"{' (reversed order)' if args.reversed else ''}, "
        f"perplexity on the first {P.eval_windows or 'all'} test windows of {P.seqlen}; "
        f"{torch.get_num_threads()} threads"
    )
    all_ok = True
    unstructured = [m for m in methods if m != "llm_pruner"]
    if unstructured:
        print(
            f"{'setting':<24} {'ppl labkit':>10} {'ppl ref':>9} {'diff':>7} {'labkit s':>9} {'ref s':>8} "
            f"{'sparsity':>9}  within 1%  as fast"
        )
    for method in unstructured:
        for pattern in patterns:
            ppl_l, sec_l, sp_l = run(P, test_ids, calib, method, pattern, "labkit")
            ppl_r, sec_r, sp_r = run(P, test_ids, calib, method, pattern, "reference")
            diff = ppl_l / ppl_r - 1
            close = diff <= 0.01
            fast = sec_l <= sec_r if method == "sparsegpt" else None
            all_ok &= close and fast is not False
            print(
                f"{method + ' ' + pattern:<24} {ppl_l:>10.2f} {ppl_r:>9.2f} {100 * diff:>6.2f}% "
                f"{sec_l:>9.1f} {sec_r:>8.1f} {sp_l:>4.1%}/{sp_r:.1%}  {'yes' if close else 'NO':>9}  "
                f"{'-' if fast is None else 'yes' if fast else 'NO'}",
                flush=True,
            )
    if "llm_pruner" in methods:
        all_ok &= compare_llm_pruner(P, test_ids, calib, ratios, args.llm_pruner_code)
    print("all criteria met" if all_ok else "some criteria NOT met (see the table)")


if __name__ == "__main__":
    main()
