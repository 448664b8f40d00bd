import torch

from labkit import prune
from labkit.prune.obs import obs_prune, output_error


def correlated(d=16, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)  # correlated features
    return X, 2 * X.T @ X / n


def test_one_obs_step_equals_refitting_the_row_by_least_squares():
    X, H = correlated()
    w = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
    pruned, mask = obs_prune(w, H, 1 / 16, percdamp=0.0)
    q = int(mask.nonzero()[0, 1])
    keep = [j for j in range(16) if j != q]  # least squares: min ‖X_keep v − X w‖
    v = torch.linalg.lstsq(X[:, keep].double(), (X @ w.T).double()).solution.T
    assert torch.allclose(pruned[0, keep].double(), v[0], atol=1e-3)
    assert pruned[0, q] == 0


def test_obs_beats_sparsegpt_beats_wanda_beats_magnitude():
    """Inputs with uneven feature scales (as in LLMs) and some correlation between features."""
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        Z = torch.randn(2000, 64, generator=g)
        X = (Z + Z @ torch.randn(64, 64, generator=g) / 8) * torch.rand(64, generator=g).mul(3).exp()
        H = 2 * X.T @ X / 2000
        W = torch.randn(16, 64, generator=g)
        err = {
            "magnitude": output_error(W, W * ~prune.magnitude_mask(W, 0.5, scope="row"), H),
            "wanda": output_error(W, W * ~prune.wanda_mask(W, X.norm(dim=0), 0.5), H),
            "sparsegpt": output_error(W, prune.sparsegpt_prune(W, H, 0.5, blocksize=64)[0], H),
            "obs": output_error(W, obs_prune(W, H, 0.5)[0], H),
        }
        assert err["obs"] < err["sparsegpt"] < err["wanda"] < err["magnitude"], (seed, err)


def test_obs_exact_sparsity_per_row():
    _, H = correlated(d=20)
    W = torch.randn(5, 20)
    pruned, mask = obs_prune(W, H, 0.3)
    assert (mask.sum(1) == 6).all() and torch.equal(pruned == 0, mask)
