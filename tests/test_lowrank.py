"""labkit.lowrank: SVD, SVD-LLM whitening, rank allocation, low rank + sparse. Tiny Llama and small matrices."""

import copy

import pytest
import torch
from helpers import correlated_layer, output_error

from labkit import evaluate, lowrank, models

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


# --- one matrix ----------------------------------------------------------------------------------


def test_full_rank_svd_reproduces_the_layer():
    W, X = correlated_layer(columns=48, noise=0.1)
    A, B, _s = lowrank.truncated_svd(W, 32)
    layer = lowrank.LowRankLinear.from_factors(A, B)
    torch.testing.assert_close(layer(X), X @ W.T, rtol=1e-4, atol=1e-3)  # fp32 SVD of a 32 x 48 matrix
    torch.testing.assert_close(layer.weight, W, rtol=0, atol=1e-4)


@pytest.mark.parametrize("rank", [1, 5, 20])
def test_truncation_error_is_eckart_young(rank):
    W, _ = correlated_layer(columns=48, noise=0.1)
    A, B, s = lowrank.truncated_svd(W, rank)
    error = ((W - B @ A) ** 2).sum().item()
    assert error == pytest.approx((s[rank:] ** 2).sum().item(), rel=1e-4)  # Σ_{i>r} σ_i²
    other = torch.randn(32, rank, generator=torch.Generator().manual_seed(9)) @ A  # another rank-r matrix
    assert ((W - other) ** 2).sum().item() > error


def test_whitened_svd_minimises_the_output_error():
    W, X = correlated_layer(columns=48, noise=0.1)
    H = X.T @ X  # ∝ X Xᵀ in the docstring's [in, tokens] convention
    rank = 8
    A, B, _s = lowrank.truncated_svd(W, rank)
    Aw, Bw, sw = lowrank.whitened_svd(W, H, rank)
    plain, whitened = output_error(W, B @ A, X), output_error(W, Bw @ Aw, X)
    assert whitened < 0.5 * plain  # same rank, far less output error
    assert whitened == pytest.approx((sw[rank:] ** 2).sum().item(), rel=1e-3)  # Σ_{i>r} σ_i(W S)²
    # ... while its weight error is larger: the weight error is the wrong guide
    assert ((W - Bw @ Aw) ** 2).sum() > ((W - B @ A) ** 2).sum()
    Aw_full, Bw_full, _ = lowrank.whitened_svd(W, H, 32)
    torch.testing.assert_close(Bw_full @ Aw_full, W, rtol=0, atol=1e-3)


def test_whitening_dampens_a_singular_hessian():
    H = torch.zeros(4, 4)
    H[:2, :2] = torch.tensor([[2.0, 2.0], [2.0, 2.0]])  # rank 1, two dead inputs
    S = lowrank.whitening(H)  # dead inputs get H_jj = mean of the live diagonal (2), then a tiny λ·I
    expected = H.double().clone()
    expected[2, 2] = expected[3, 3] = 2.0
    assert torch.isfinite(S).all() and (S.diagonal() > 0).all()
    torch.testing.assert_close(S @ S.T, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not positive definite"):
        lowrank.whitening(-torch.eye(3))


def test_whitening_retries_when_the_factorization_reports_success_with_nan(monkeypatch):
    """MKL and cuSOLVER returned info 0 with NaN in S for a singular H (the H200 machine, torch 2.11)."""
    real, calls = torch.linalg.cholesky_ex, []

    def cholesky_ex(A):
        calls.append(A.clone())
        S, info = real(A)
        return (torch.full_like(S, float("nan")), torch.zeros_like(info)) if len(calls) == 1 else (S, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", cholesky_ex)
    H = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    S = lowrank.whitening(H)
    assert len(calls) == 2 and torch.isfinite(S).all()
    assert torch.equal(calls[0], H.double()) and (calls[1] - calls[0]).diagonal().gt(0).all()  # dampened retry


# --- the model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("aware", [False, True])
def test_svd_at_full_rank_reproduces_the_model(tiny, calibration, tokens, aware):
    dense = copy.deepcopy(tiny)  # the unchanged model, to compare with
    kwargs = dict(activation_aware=True, calibration=calibration) if aware else {}
    report = lowrank.svd(tiny, energy=1.0, **kwargs)
    assert len(report.layers) == 14 and len(lowrank.lowrank_linears(tiny)) == 14
    assert all(layer.rank == layer.full_rank for layer in report.layers.values())
    torch.testing.assert_close(tiny(tokens).logits, dense(tokens).logits, rtol=0, atol=1e-4)


def test_param_ratio_removes_parameters(tiny, tokens):
    dense = copy.deepcopy(tiny)  # the unchanged model, to compare with
    report = lowrank.svd(tiny, param_ratio=0.8)
    for layer in report.layers.values():
        assert layer.params_after <= 0.8 * layer.params_before
    linear_before = sum(layer.params_before for layer in report.layers.values())
    assert report.params_before == linear_before == 86016
    removed = models.parameter_count(dense) - models.parameter_count(tiny)
    assert removed == report.params_before - report.params_after  # real parameters, not a mask
    assert evaluate.weight_bytes(dense) - evaluate.weight_bytes(tiny) == 4 * removed
    assert report.method == "svd" and 0.75 < report.kept <= 0.8
    assert torch.isfinite(tiny(tokens).logits).all()
    q = tiny.model.layers[0].self_attn.q_proj
    assert q.rank == 25 and q.A.weight.shape == (25, 64) and q.B.weight.shape == (64, 25)  # ⌊0.8·64·64/128⌋


def test_rank_int_and_dict(tiny):
    dense = copy.deepcopy(tiny)  # the unchanged model, to compare with
    report = lowrank.svd(tiny, rank=8, targets=["mlp.gate_proj", "up_proj"])
    assert set(report.layers) == {f"layers.{i}.mlp.{n}" for i in (0, 1) for n in ("gate_proj", "up_proj")}
    assert isinstance(tiny.model.layers[0].mlp.down_proj, torch.nn.Linear)
    other = copy.deepcopy(dense)
    report = lowrank.svd(other, rank={"layers.1.self_attn.k_proj": 3, "layers.0.mlp.down_proj": 10})
    assert report.ranks() == {"layers.1.self_attn.k_proj": 3, "layers.0.mlp.down_proj": 10}
    assert other.model.layers[1].self_attn.k_proj.rank == 3
    with pytest.raises(ValueError, match=r"match no nn.Linear"):  # already factored
        lowrank.svd(other, rank=2, targets=["layers.1.self_attn.k_proj"])


def test_activation_aware_walk_reports_the_output_error(tiny, calibration):
    dense = copy.deepcopy(tiny)  # the unchanged model, to compare with
    seen = []  # inputs of layer 0's q_proj on the calibration data, in the dense model
    hook = dense.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        dense(calibration)
    hook.remove()
    X = seen[0].reshape(-1, 64)
    report = lowrank.svd(tiny, param_ratio=0.5, activation_aware=True, calibration=calibration)
    assert report.method == "svd-llm"
    W = dense.model.layers[0].self_attn.q_proj.weight.detach()
    W_hat = tiny.model.layers[0].self_attn.q_proj.weight.detach()
    relative = output_error(W, W_hat, X) / ((X @ W.T) ** 2).sum().item()
    assert relative == pytest.approx(report.layers["layers.0.self_attn.q_proj"].discarded, rel=1e-3)
    plain = copy.deepcopy(dense)
    lowrank.svd(plain, param_ratio=0.5)
    W_plain = plain.model.layers[0].self_attn.q_proj.weight.detach()
    assert output_error(W, W_hat, X) < output_error(W, W_plain, X)


def test_sequential_walk_runs(tiny, calibration, tokens):
    report = lowrank.svd(tiny, param_ratio=0.6, activation_aware=True, calibration=calibration, sequential=True)
    assert len(report.layers) == 14 and torch.isfinite(tiny(tokens).logits).all()


# --- rank allocation ----------------------------------------------------------------------------


def test_greedy_ranks_on_hand_made_spectra():
    spectra = {"steep": torch.tensor([10.0, 1.0, 0.1, 0.01]), "flat": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    shapes = {"steep": (4, 4), "flat": (4, 4)}  # 16 parameters each; one rank holds 8
    ranks = lowrank.greedy_ranks(spectra, shapes, 0.5)  # keep 16 of 32: two ranks in all
    assert ranks == {"steep": 1, "flat": 1}
    ranks = lowrank.greedy_ranks(spectra, shapes, 0.75)  # keep 24: three ranks
    assert ranks == {"steep": 1, "flat": 2}  # the flat spectrum needs its rank more
    assert lowrank.break_even(4, 4) == 2  # 2 · (4 + 4) = 16 = 4 · 4: more would cost more than dense
    wide = {"steep": (4, 5), "flat": (4, 5)}  # break-even 2: 2 · 9 = 18 < 20 parameters
    assert lowrank.greedy_ranks(spectra, wide, 0.95) == {"steep": 2, "flat": 2}  # never above break-even


@pytest.mark.parametrize("budget", [0.3, 0.6, 0.8])
def test_allocation_meets_the_budget(tiny, calibration, budget):
    allocation = lowrank.allocate_ranks(tiny, calibration, budget)
    target = budget * allocation.params_before
    step = max(64 + 160, 64 + 64)  # parameters of one rank of the widest linear (in + out)
    assert target - step < allocation.params_after <= target
    assert allocation.uniform_params <= target
    assert allocation.predicted < allocation.uniform_predicted  # the point of allocating
    assert all(r >= 1 for r in allocation.ranks.values())
    factored = copy.deepcopy(tiny)
    report = lowrank.svd(factored, rank=allocation.ranks, activation_aware=True, calibration=calibration)
    assert report.params_after == allocation.params_after
    first = "layers.0.mlp.down_proj"  # layer 0 sees the same inputs in both walks: the same error
    assert report.layers[first].discarded == pytest.approx(
        lowrank.discarded(allocation.spectra[first], allocation.ranks[first]), rel=1e-4
    )


def test_allocation_from_weights_alone(tiny):
    allocation = lowrank.allocate_ranks(tiny, None, 0.5)
    assert allocation.params_after <= 0.5 * allocation.params_before


# --- errors -----------------------------------------------------------------------------------------


def test_svd_errors(tiny, calibration):
    with pytest.raises(ValueError, match=r"rank=0 for layers.0.self_attn.q_proj"):
        lowrank.svd(tiny, rank=0)
    with pytest.raises(ValueError, match=r"rank=33 for layers.0.self_attn.k_proj \(32 x 64\).*\[1, 32\]"):
        lowrank.svd(tiny, rank=33)
    for ratio in (0, 1, 1.5):
        with pytest.raises(ValueError, match=f"param_ratio={ratio}"):
            lowrank.svd(tiny, param_ratio=ratio)
    for energy in (0, 1.5):
        with pytest.raises(ValueError, match=f"energy={energy}"):
            lowrank.svd(tiny, energy=energy)
    with pytest.raises(ValueError, match="exactly one of rank, param_ratio, energy; got none"):
        lowrank.svd(tiny)
    with pytest.raises(ValueError, match=r"exactly one .* got \['rank', 'energy'\]"):
        lowrank.svd(tiny, rank=4, energy=0.9)
    with pytest.raises(ValueError, match="activation_aware=True needs calibration"):
        lowrank.svd(tiny, param_ratio=0.8, activation_aware=True)
    with pytest.raises(ValueError, match=r"targets \['attn.q'\] match no nn.Linear"):
        lowrank.svd(tiny, rank=4, targets=["attn.q"])
    with pytest.raises(ValueError, match=r"rank names .* are not linears to factor"):
        lowrank.svd(tiny, rank={"layers.7.mlp.up_proj": 4})
    assert not lowrank.lowrank_linears(tiny)  # nothing was changed by the failed calls


def test_allocation_errors(tiny, calibration):
    with pytest.raises(ValueError, match=r"budget=0.001 keeps 86 parameters, but even the lowest ranks allowed"):
        lowrank.allocate_ranks(tiny, None, 0.001)
    for budget in (0, 1, 1.2):
        with pytest.raises(ValueError, match=f"budget={budget}"):
            lowrank.allocate_ranks(tiny, calibration, budget)


# --- low rank + sparse ------------------------------------------------------------------------------


def test_sparse_plus_lowrank_module():
    W, X = correlated_layer(columns=48, noise=0.1)
    linear = torch.nn.Linear(48, 32, bias=True)
    with torch.no_grad():
        linear.weight.copy_(W)
    rank, density = 6, 0.05
    layer = lowrank.SparsePlusLowRankLinear.from_linear(linear, rank, density)
    k = round(density * W.numel())  # 77 entries of S
    assert layer.values.numel() == k and layer.index.dtype == torch.int32
    torch.testing.assert_close(layer(X), X @ layer.weight.T + linear.bias, rtol=1e-4, atol=1e-3)
    assert layer.n_params() == rank * (48 + 32) + 32 + k
    assert layer.stored_bytes() == 4 * (rank * (48 + 32) + 32 + k) + 4 * k  # values + int32 indices
    A, B, _ = lowrank.truncated_svd(W, rank)
    lowrank_only = ((W - B @ A) ** 2).sum()
    errors = [
        ((W - lowrank.SparsePlusLowRankLinear.from_linear(linear, rank, density, iters).weight) ** 2).sum()
        for iters in (1, 2, 4)
    ]
    assert errors[0] < lowrank_only and errors[2] <= errors[1] * 1.0001 <= errors[0] * 1.0001
    # the sparse part holds exactly the largest residuals of W − B A after one step
    S = layer.sparse_weight()
    residual = (W - B @ A).abs()
    assert residual[S != 0].min() >= residual[S == 0].max() - 1e-5


def test_sparse_plus_lowrank_model(tiny, tokens):
    dense = copy.deepcopy(tiny)  # the unchanged model, to compare with
    report = lowrank.sparse_plus_lowrank(tiny, param_ratio=0.6, density=0.02)
    assert report.bytes_after == evaluate.weight_bytes(tiny) - (evaluate.weight_bytes(dense) - report.bytes_before)
    assert report.kept < 0.7 and torch.isfinite(tiny(tokens).logits).all()
    with pytest.raises(ValueError, match="density=1"):
        lowrank.decompose(torch.randn(4, 4), 2, 1.0)
    with pytest.raises(ValueError, match="rank=5 for a 4 x 4 matrix"):
        lowrank.decompose(torch.randn(4, 4), 5, 0.1)


def test_greedy_ranks_floor_and_absolute_costs():
    shapes = {"steep": (4, 4), "flat": (4, 4)}  # break-even 2 each, 8 parameters per rank
    spectra = {"steep": torch.tensor([10.0, 0.1, 0.1, 0.1]), "flat": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    assert lowrank.greedy_ranks(spectra, shapes, 0.75) == {"steep": 1, "flat": 2}  # steep's 2nd σ is cheap
    floored = lowrank.greedy_ranks(spectra, shapes, 0.75, min_ranks={"steep": 2})
    assert floored == {"steep": 2, "flat": 1}  # steep may not go below 2: flat pays
    # relative: steep's σ_2 holds 0.01% of its energy, flat's 25%; absolute: 0.01 against 1.0, same order
    assert lowrank.greedy_ranks(spectra, shapes, 0.75, relative=False) == {"steep": 1, "flat": 2}
    spectra["steep"] = torch.tensor([100.0, 5.0, 0.1, 0.1])  # σ_2² = 25: relatively small, absolutely large
    assert lowrank.greedy_ranks(spectra, shapes, 0.75) == {"steep": 1, "flat": 2}
    assert lowrank.greedy_ranks(spectra, shapes, 0.75, relative=False) == {"steep": 2, "flat": 1}
    with pytest.raises(ValueError, match="min_ranks"):
        lowrank.greedy_ranks(spectra, shapes, 0.75, min_ranks={"nope": 1})
    with pytest.raises(ValueError, match="no allocation"):
        lowrank.greedy_ranks(spectra, shapes, 0.55, min_ranks={"steep": 2, "flat": 2})


def test_allocate_by_sensitivity(tiny, calibration, tokens):
    before = copy.deepcopy(tiny.state_dict())
    alloc = lowrank.allocate_by_sensitivity(tiny, calibration, 0.7, tokens, ratios=(0.5, 0.8, 1.0))
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())  # the model is unchanged
    assert set(alloc.ratios) == set(lowrank.TARGETS) and alloc.kept <= 0.7
    assert len(alloc.sensitivity) == 3 * len(lowrank.TARGETS)
    assert all(alloc.sensitivity[k, 1.0] == 0.0 for k in lowrank.TARGETS)
    factored = {n for n in alloc.ranks}  # only kinds with a ratio below 1 are factored
    assert all(any(n.endswith(k) for n in factored) == (r < 1) for k, r in alloc.ratios.items())
    assert alloc.predicted == pytest.approx(sum(alloc.sensitivity[k, r] for k, r in alloc.ratios.items()))
    total = sum(m.in_features * m.out_features for m in lowrank.factor_targets(tiny).values())
    lowrank.svd(tiny, rank=alloc.ranks, activation_aware=True, calibration=calibration)
    factored = sum(m.rank * (m.in_features + m.out_features) for m in lowrank.lowrank_linears(tiny).values())
    whole = [k for k, r in alloc.ratios.items() if r == 1]  # kinds kept whole stay nn.Linear
    dense = sum(m.in_features * m.out_features for m in lowrank.factor_targets(tiny, whole).values()) if whole else 0
    assert (factored + dense) / total == pytest.approx(alloc.kept)


def test_allocate_by_sensitivity_errors(tiny, calibration, tokens):
    with pytest.raises(ValueError, match="even the smallest ratio"):
        lowrank.allocate_by_sensitivity(tiny, calibration, 0.3, tokens, ratios=(0.8, 0.9))
    with pytest.raises(ValueError, match="ratios"):
        lowrank.allocate_by_sensitivity(tiny, calibration, 0.8, tokens, ratios=(0.0, 0.5))
    with pytest.raises(ValueError, match="budget"):
        lowrank.allocate_by_sensitivity(tiny, calibration, 1.5, tokens)
