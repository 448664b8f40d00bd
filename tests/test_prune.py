"""labkit.prune: masks, magnitude, Wanda, SparseGPT, sparse storage. Fast: tiny random Llama and small matrices."""

import copy

import pytest
import torch
from helpers import correlated_layer, output_error
from torch import nn

from labkit import evaluate, prune
from labkit.prune import masks, sparse_storage


def linears(model):
    return prune.decoder_linears(model)


def check_nm(weight, n, m):
    rows, columns = weight.shape
    per_group = (weight != 0).reshape(rows, columns // m, m).sum(2)
    assert (per_group == n).all(), f"groups with {per_group.unique().tolist()} nonzeros, expected {n}"


# --- masks ----------------------------------------------------------------------------------------


def test_parse_pattern():
    assert masks.parse_pattern("unstructured") is None
    assert masks.parse_pattern("2:4") == (2, 4)
    assert masks.parse_pattern("4:8") == (4, 8)
    assert masks.check_sparsity(None, "2:4") == (0.5, (2, 4))
    assert masks.check_sparsity(0.75, "1:4") == (0.75, (1, 4))


def test_lowest_mask_exact_with_ties():
    scores = [torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 1.0]]), torch.tensor([1.0, 3.0])]
    got = masks.lowest_mask(scores, 3)  # 0.0 plus two of the five 1.0 ties
    assert sum(int(m.sum()) for m in got) == 3
    assert got[0][1, 0]  # the lowest score is always pruned
    assert not got[0][1, 1] and not got[1][1]


def concatenated_kth(scores, k):
    """The reference kth_lowest replaced: every score in one fp32 tensor, then kthvalue."""
    everything = torch.cat([s.flatten().float() for s in scores])
    value = everything.kthvalue(k).values
    return value, int((everything < value).sum())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kth_lowest_equals_the_concatenation(dtype, monkeypatch):
    monkeypatch.setattr(masks, "_CHUNK", 7)  # several chunks per tensor
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        shapes = [tuple(torch.randint(1, 12, (2,), generator=g).tolist()) for _ in range(1 + trial % 4)]
        tensors = [torch.randn(shape, generator=g) for shape in shapes]
        if trial % 2:  # few distinct values: many ties at the threshold
            tensors = [(t * 2).round() / 2 for t in tensors]
        tensors[0].view(-1)[0] = -0.0  # -0.0 and 0.0 compare equal
        tensors = [t.to(dtype) for t in tensors]
        total = sum(t.numel() for t in tensors)
        for k in (1, total, int(torch.randint(1, total + 1, (1,), generator=g))):
            for score in (None, torch.abs):
                scores = [score(t) if score else t for t in tensors]
                value, below = masks.kth_lowest(tensors, k, score)
                assert (value, below) == concatenated_kth(scores, k), (trial, k, score)
    with pytest.raises(ValueError, match="k=0: need 1 <= k <= 2"):
        masks.kth_lowest([torch.ones(2)], 0)


def concatenated_global_magnitude(weights, k):
    """Global magnitude as it was: one fp32 concatenation, kthvalue, then ties pruned in order."""
    scores = [w.abs() for w in weights]
    threshold, _ = concatenated_kth(scores, k)
    pruned = [s.float() < threshold for s in scores]
    missing = k - sum(int(m.sum()) for m in pruned)
    for mask, s in zip(pruned, scores):
        ties = (s.float() == threshold).flatten().nonzero().squeeze(1)[:missing]
        mask.view(-1)[ties] = True
        missing -= ties.numel()
    return [w.masked_fill(mask, 0) for w, mask in zip(weights, pruned)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("ties", [False, True])
def test_magnitude_global_equals_the_concatenation(dtype, ties, monkeypatch):
    from labkit import models

    monkeypatch.setattr(masks, "_CHUNK", 1000)
    model = models.load("tiny-llama-random", device="cpu", dtype=dtype)[0]
    if ties:  # weights on a coarse grid (as after 4-bit quantization): thousands of equal magnitudes
        for lin in linears(model).values():
            lin.weight.data = (lin.weight.float() * 64).round().div(64).to(dtype)
    weights = [lin.weight.detach().clone() for lin in linears(model).values()]
    for sparsity in (0.3, 0.5):
        expected = concatenated_global_magnitude(weights, masks.n_pruned(sparsity, sum(w.numel() for w in weights)))
        m = copy.deepcopy(model)
        prune.magnitude(m, sparsity, scope="global")
        for name, want in zip(linears(m), expected):
            assert torch.equal(linears(m)[name].weight, want), (name, sparsity)
    if ties:  # the threshold fell on a tie: some equal magnitudes kept, some pruned
        flat = torch.cat([w.flatten().float().abs() for w in weights])
        pruned = torch.cat([w.flatten() for w in expected]) == 0
        threshold = flat[pruned].max()
        assert (flat[~pruned] == threshold).any()


# --- magnitude ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_layer_exact_and_keeps_largest(tiny, sparsity):
    before = {name: lin.weight.clone() for name, lin in linears(tiny).items()}
    embed, norm = tiny.model.embed_tokens.weight.clone(), tiny.model.norm.weight.clone()
    rep = prune.magnitude(tiny, sparsity)
    for name, lin in linears(tiny).items():
        W0, W = before[name], lin.weight
        pruned = W == 0
        assert int(pruned.sum()) == round(sparsity * W.numel()), name
        assert torch.equal(W[~pruned], W0[~pruned])  # kept weights untouched
        if sparsity > 0:
            assert W0[pruned].abs().max() <= W0[~pruned].abs().min()  # the smallest went
        assert rep.per_linear[name] == pytest.approx(round(sparsity * W.numel()) / W.numel())
    assert torch.equal(tiny.model.embed_tokens.weight, embed) and torch.equal(tiny.model.norm.weight, norm)
    assert rep.method == "magnitude" and rep.seconds >= 0 and rep.overall == pytest.approx(sparsity, abs=1e-3)


def test_magnitude_row_exact(tiny):
    prune.magnitude(tiny, 0.3, scope="row")
    for lin in linears(tiny).values():
        assert ((lin.weight == 0).sum(1) == round(0.3 * lin.in_features)).all()


def test_magnitude_global_one_threshold(tiny):
    before = [lin.weight.clone() for lin in linears(tiny).values()]
    rep = prune.magnitude(tiny, 0.4, scope="global")
    after = [lin.weight for lin in linears(tiny).values()]
    total = sum(w.numel() for w in after)
    assert sum(int((w == 0).sum()) for w in after) == round(0.4 * total)
    pruned = torch.cat([w0[w == 0].abs() for w0, w in zip(before, after)])
    kept = torch.cat([w0[w != 0].abs() for w0, w in zip(before, after)])
    assert pruned.max() <= kept.min()
    assert len(set(round(v, 6) for v in rep.per_linear.values())) > 1  # layers end up unevenly sparse


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("1:4", 1, 4), ("4:8", 4, 8)])
def test_magnitude_nm(tiny, pattern, n, m):
    before = {name: lin.weight.clone() for name, lin in linears(tiny).items()}
    rep = prune.magnitude(tiny, None, pattern)
    assert rep.overall == pytest.approx(1 - n / m)
    for name, lin in linears(tiny).items():
        check_nm(lin.weight, n, m)
        groups0 = before[name].abs().reshape(lin.out_features, -1, m)
        kept = (lin.weight != 0).reshape(lin.out_features, -1, m)
        # in each group, every kept weight is at least as large as every pruned one
        assert (groups0.masked_fill(~kept, float("inf")).amin(2) >= groups0.masked_fill(kept, 0).amax(2)).all()


# --- Wanda ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.3), ("2:4", None)])
def test_wanda_uniform_activations_is_row_magnitude(pattern, sparsity):
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    mask = prune.wanda_mask(W, torch.full((32,), 3.0), sparsity, pattern)
    scope = "row" if pattern == "unstructured" else "layer"
    assert torch.equal(mask, prune.magnitude_mask(W, sparsity, pattern, scope))


def test_wanda_scores_use_activation_norms():
    W = torch.tensor([[1.0, 2.0], [-3.0, 0.5]])
    assert torch.equal(prune.wanda_scores(W, torch.tensor([10.0, 1.0])), torch.tensor([[10.0, 2.0], [30.0, 0.5]]))
    # a small weight on a loud channel outranks a large weight on a quiet one
    assert prune.wanda_mask(torch.tensor([[1.0, 2.0]]), torch.tensor([10.0, 1.0]), 0.5).tolist() == [[False, True]]


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None)])
def test_wanda_model_exact_and_faithful(tiny, calibration, pattern, sparsity):
    # layer 0 sees the unpruned embeddings: its q_proj mask must equal one computed by hand
    seen = []
    hook = tiny.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        tiny(calibration)
    hook.remove()
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])  # [tokens, hidden]
    W0 = tiny.model.layers[0].self_attn.q_proj.weight.clone()
    expected = prune.wanda_mask(W0, X.double().norm(dim=0).float(), sparsity, pattern)

    rep = prune.wanda(tiny, calibration, sparsity, pattern)
    assert torch.equal(tiny.model.layers[0].self_attn.q_proj.weight == 0, expected)
    for lin in linears(tiny).values():
        if pattern == "2:4":
            check_nm(lin.weight, 2, 4)
        else:
            assert ((lin.weight == 0).sum(1) == lin.in_features // 2).all()
    assert rep.overall == 0.5 and rep.method == "wanda"


# --- SparseGPT ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.3), ("2:4", None)])
def test_sparsegpt_matches_naive_reference(pattern, sparsity):
    # Cholesky rows + lazy batch updates == explicit inverse of the remaining Hessian each column.
    # Tolerance: fp32 round-off of 32 sequential updates with a well-damped H, ~1e-6 observed.
    W, X = correlated_layer(rows=16, columns=32)
    H = 2 * X.T @ X / X.shape[0]
    fast, mask, _ = prune.sparsegpt_prune(W, H, sparsity, pattern, blocksize=8)
    slow, slow_mask = prune.sparsegpt_naive(W, H, sparsity, pattern, blocksize=8)
    assert torch.equal(mask, slow_mask)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast == 0, mask)


def test_sparsegpt_nm_blocksize_does_not_matter():
    # with a fixed N:M rule the lazy batching is an exact re-ordering of the same updates
    W, X = correlated_layer()
    H = 2 * X.T @ X / X.shape[0]
    a, mask_a, _ = prune.sparsegpt_prune(W, H, None, "2:4", blocksize=8)
    b, mask_b, _ = prune.sparsegpt_prune(W, H, None, "2:4", blocksize=64)
    assert torch.equal(mask_a, mask_b)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None)])
def test_sparsegpt_beats_magnitude_and_wanda(pattern, sparsity):
    W, X = correlated_layer()
    H = 2 * X.T @ X / X.shape[0]
    norm = X.norm(dim=0)
    scope = "row" if pattern == "unstructured" else "layer"
    errors = {
        "magnitude": output_error(W, W.masked_fill(prune.magnitude_mask(W, sparsity, pattern, scope), 0), X),
        "wanda": output_error(W, W.masked_fill(prune.wanda_mask(W, norm, sparsity, pattern), 0), X),
        "sparsegpt": output_error(W, prune.sparsegpt_prune(W, H, sparsity, pattern, blocksize=16)[0], X),
    }
    assert errors["sparsegpt"] < min(errors["wanda"], errors["magnitude"]), errors


def test_sparsegpt_dead_inputs_and_no_pruning():
    W, X = correlated_layer(rows=8, columns=16)
    X[:, 3] = 0  # an input that is never active
    H = 2 * X.T @ X / X.shape[0]
    out, mask, _ = prune.sparsegpt_prune(W, H, 0.0)
    assert not mask.any()
    assert (out[:, 3] == 0).all()  # dead input's weights are zeroed
    torch.testing.assert_close(X @ out.T, X @ W.T)  # ... which changes nothing on the data


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.25), ("2:4", None)])
def test_sparsegpt_model_exact(tiny, calibration, pattern, sparsity):
    rep = prune.sparsegpt(tiny, calibration, sparsity, pattern, blocksize=32)
    for name, lin in linears(tiny).items():
        if pattern == "2:4":
            check_nm(lin.weight, 2, 4)
        else:
            assert int((lin.weight == 0).sum()) == round(sparsity * lin.weight.numel()), name
    assert rep.method == "sparsegpt" and rep.overall == pytest.approx(0.5 if sparsity is None else sparsity, abs=1e-3)


# --- reports --------------------------------------------------------------------------------------


def test_sparsity_report(tiny):
    rep = prune.sparsity_report(tiny)
    assert rep.overall == 0 and len(rep.per_linear) == 2 * 7
    assert "layers.1.mlp.down_proj" in rep.per_linear
    tiny.model.layers[1].mlp.down_proj.weight.data[:, :80] = 0  # half of a [64, 160] matrix
    rep = prune.sparsity_report(tiny)
    assert rep.per_linear["layers.1.mlp.down_proj"] == 0.5
    assert rep.zeros == 64 * 80 and rep.overall == pytest.approx(64 * 80 / rep.total)


# --- storage --------------------------------------------------------------------------------------

# 4 x 8, 2:4 sparse, with one all-zero group (row 3, columns 4..7): nnz = 14
EXAMPLE = torch.tensor(
    [
        [1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 4.0],
        [0.0, 5.0, 6.0, 0.0, 7.0, 8.0, 0.0, 0.0],
        [9.0, 1.5, 0.0, 0.0, 0.0, 0.0, 2.5, 3.5],
        [0.0, 0.0, 4.5, 5.5, 0.0, 0.0, 0.0, 0.0],
    ]
)


@pytest.mark.parametrize(
    "dtype,expected",
    [
        # dense: 32 values. bitmask: 32 bits = 4 B + 14 values. csr: 14 · (value + 2 B int16 index) + 5 int32 row
        # starts = 20 B. 2:4: 16 kept slots + 16 · 2 bits = 4 B.
        (torch.float32, {"dense": 128, "bitmask": 4 + 56, "csr": 14 * 6 + 20, "2:4": 64 + 4}),
        (torch.float16, {"dense": 64, "bitmask": 4 + 28, "csr": 14 * 4 + 20, "2:4": 32 + 4}),
    ],
)
def test_storage_bytes_hand_computed(dtype, expected):
    W = EXAMPLE.to(dtype)
    for format, nbytes in expected.items():
        assert prune.storage_bytes(W, format) == nbytes, format
        layer = prune.SparseLinear(W, format=format)
        assert layer.stored_bytes() == nbytes, format  # what it holds is what the formula says
        assert torch.equal(layer.dense_weight(), W), format
        x = torch.randn(3, 5, 8, dtype=dtype)
        assert torch.equal(layer(x), nn.functional.linear(x, W)), format


def test_csr_index_width():
    assert sparse_storage.csr_index_bytes(32768) == 2 and sparse_storage.csr_index_bytes(32769) == 4


def test_sparse_linear_with_bias_and_random_sparsity():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(24, 40, generator=g)
    W[torch.rand(24, 40, generator=g) < 0.7] = 0
    linear = nn.Linear(40, 24)
    linear.weight.data.copy_(W)
    x = torch.randn(7, 40, generator=g)
    for format in ("dense", "bitmask", "csr"):
        sparse = prune.SparseLinear.from_linear(linear, format)
        assert torch.equal(sparse(x), linear(x)), format
        assert sparse.stored_bytes() == prune.storage_bytes(W, format) + 24 * 4, format


@pytest.mark.parametrize("format", ["bitmask", "csr", "2:4"])
def test_to_sparse_model(tiny, format):
    prune.magnitude(tiny, None, "2:4")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = tiny(ids).logits
    dense_bytes = evaluate.weight_bytes(tiny)
    sparse_bytes = sum(
        prune.storage_bytes(lin.weight, format) - prune.dense_bytes(lin.weight) for lin in linears(tiny).values()
    )
    prune.to_sparse(tiny, format)
    assert all(isinstance(m, prune.SparseLinear) for m in linears(tiny).values())
    assert not isinstance(tiny.lm_head, prune.SparseLinear)
    with torch.no_grad():
        assert torch.equal(tiny(ids).logits, expected)
    assert evaluate.weight_bytes(tiny) == dense_bytes + sparse_bytes
    assert prune.sparsity_report(tiny).overall == 0.5


# --- bad inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, "0.5", True])
def test_bad_sparsity(tiny, sparsity):
    with pytest.raises(ValueError, match=r"sparsity=.*allowed is a number in \[0, 1\)"):
        prune.magnitude(tiny, sparsity)


def test_missing_sparsity(tiny, calibration):
    with pytest.raises(ValueError, match="needs a sparsity"):
        prune.wanda(tiny, calibration)


@pytest.mark.parametrize(
    "pattern,message",
    [
        ("4:4", "needs 1 <= N < M"),
        ("5:4", "needs 1 <= N < M"),
        ("0:4", "needs 1 <= N < M"),
        ("2-4", "allowed are 'unstructured' or 'N:M'"),
        ("semi", "allowed are 'unstructured' or 'N:M'"),
        ("2:4:8", "allowed are 'unstructured' or 'N:M'"),
    ],
)
def test_bad_pattern(tiny, pattern, message):
    with pytest.raises(ValueError, match=message):
        prune.magnitude(tiny, 0.5, pattern)


def test_sparsity_contradicts_pattern(tiny):
    with pytest.raises(ValueError, match="contradicts pattern='2:4'"):
        prune.magnitude(tiny, 0.6, "2:4")


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_in_features_not_divisible(tiny, calibration, method):
    before = tiny.model.layers[0].self_attn.q_proj.weight.clone()
    args = () if method == "magnitude" else (calibration,)
    with pytest.raises(ValueError, match=r"needs in_features divisible by M=3.*down_proj': 160"):
        getattr(prune, method)(tiny, *args, None, "2:3")
    assert torch.equal(tiny.model.layers[0].self_attn.q_proj.weight, before)  # nothing changed


def test_bad_scope(tiny):
    with pytest.raises(ValueError, match=r"scope='column': allowed scopes are \('layer', 'row', 'global'\)"):
        prune.magnitude(tiny, 0.5, scope="column")
    with pytest.raises(ValueError, match="scope='global' applies to unstructured"):
        prune.magnitude(tiny, None, "2:4", scope="global")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("bad", [torch.rand(4, 32), torch.randint(0, 256, (32,)), [[1, 2, 3]]])
def test_bad_calibration(tiny, method, bad):
    with pytest.raises(ValueError, match=r"calibration must be a LongTensor of token ids shaped \[n_samples, seqlen\]"):
        getattr(prune, method)(tiny, bad, 0.5)


def test_calibration_out_of_vocabulary(tiny):
    with pytest.raises(ValueError, match=r"outside \[0, 256\)"):
        prune.sparsegpt(tiny, torch.full((2, 8), 300), 0.5)


def test_sparsegpt_bad_blocksize(tiny, calibration):
    with pytest.raises(ValueError, match="blocksize=6 must be a multiple of M=4"):
        prune.sparsegpt(tiny, calibration, None, "2:4", blocksize=6)


def test_bad_format(tiny):
    with pytest.raises(ValueError, match=r"format='coo': allowed formats are \('dense', 'bitmask', 'csr', '2:4'\)"):
        prune.to_sparse(tiny, "coo")
    with pytest.raises(ValueError, match=r"layers.0.self_attn.q_proj is not 2:4 sparse: row 0"):
        prune.to_sparse(tiny, "2:4")
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        prune.storage_bytes(EXAMPLE.masked_fill(EXAMPLE == 0, 1.0), "2:4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_semi_structured_speed_refuses_cpu():
    with pytest.raises(RuntimeError, match="no speed-up is expected"):
        prune.semi_structured_speed()
