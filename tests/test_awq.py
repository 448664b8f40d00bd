"""labkit.quant.awq: AWQ's scale search from the Hessian, its exact rewrite, clipping, and the whole-model driver."""

import copy
import importlib

import pytest
import torch

from labkit import data, evaluate, quant
from labkit.quant import cpu_kernels
from labkit.quant.formats import fake_quantize
from labkit.quant.qlinear import QuantLinear

awq = importlib.import_module("labkit.quant.awq")  # quant.awq is the function
pytestmark = pytest.mark.usefixtures("one_thread")


def _layer_data(out_f=24, in_f=64, tokens=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, in_f, generator=g)
    X[:, 3] *= 20  # a salient input channel, as in the paper's Figure 2
    W = torch.randn(out_f, in_f, generator=g) * 0.1
    return W, X, 2 * X.T @ X / tokens


def test_the_hessian_form_is_the_error_on_the_activations():
    W, X, H = _layer_data()
    for alpha in (0.0, 0.5, 0.9):
        s = awq.candidate_scales(X.abs().mean(0), alpha)
        fast, naive = awq.scaled_error(W, H, s, 4, 16), awq.scaled_error_naive(W, X, s, 4, 16)
        assert fast == pytest.approx(naive, rel=1e-4)  # tr(ΔHΔᵀ)/2 = ‖ΔX‖²/n up to fp32 summation order


def test_candidate_scales_are_normalized_and_alpha_0_is_rtn():
    m = torch.tensor([0.1, 1.0, 4.0, 9.0])
    torch.testing.assert_close(awq.candidate_scales(m, 0.0), torch.ones(4))
    s = awq.candidate_scales(m, 0.5)
    assert (s.max() * s.min()).item() == pytest.approx(1.0, rel=1e-6)
    assert torch.equal(s.argsort(), m.argsort())  # louder channel, larger scale


def test_the_salient_channel_is_protected():
    W, X, H = _layer_data()
    s, alpha, losses = awq.search_scale([W], H, X.abs().mean(0), 3, 16)
    assert alpha > 0 and losses[round(alpha * 20)] == min(losses) < losses[0]  # better than plain RTN (α = 0)
    err = (fake_quantize(W * s, 3, 16) / s - W)[:, 3].abs().mean()
    assert err < (fake_quantize(W, 3, 16) - W)[:, 3].abs().mean()  # the loud channel's weights are rounded finer


def test_kv_heads_share_the_scale_of_o_proj():
    m = torch.arange(12.0)  # 4 query heads of dim 3, 2 KV heads: heads 0, 1 read KV head 0
    shared = awq.shared_by_kv_heads(m, 2, 3)
    torch.testing.assert_close(shared, torch.tensor([1.5, 2.5, 3.5] * 2 + [7.5, 8.5, 9.5] * 2))


def test_folding_keeps_the_function(tiny, calibration):
    with torch.no_grad():
        before = tiny(calibration).logits
        g = torch.Generator().manual_seed(0)
        c = tiny.config
        n_rep = c.num_attention_heads // c.num_key_value_heads
        for layer in tiny.model.layers:
            for prev, names in awq.AWQ_GROUPS.items():
                linears = [layer.get_submodule(n) for n in names]
                m = torch.rand(linears[0].in_features, generator=g) + 0.2
                rep = n_rep if prev == "self_attn.v_proj" else 1
                if rep > 1:
                    m = awq.shared_by_kv_heads(m, rep, c.head_dim)
                awq.fold_scale(layer.get_submodule(prev), linears, awq.candidate_scales(m, 1.0), rep, c.head_dim)
        torch.testing.assert_close(tiny(calibration).logits, before, rtol=1e-4, atol=1e-4)


def test_unshared_scales_on_o_proj_would_change_the_function(tiny, calibration):
    """The reason for shared_by_kv_heads: under GQA one v_proj row feeds several query heads."""
    with torch.no_grad():
        before = tiny(calibration).logits
        layer, c = tiny.model.layers[0], tiny.config
        m = torch.rand(c.hidden_size, generator=torch.Generator().manual_seed(0)) + 0.2
        awq.fold_scale(layer.self_attn.v_proj, [layer.self_attn.o_proj], awq.candidate_scales(m, 1.0), 2, c.head_dim)
        assert not torch.allclose(tiny(calibration).logits, before, atol=1e-3)


def test_clipping_never_raises_a_groups_error():
    W, _, H = _layer_data(seed=1)
    max_val = awq.search_clip(W, H, 3, 16)
    org = W.abs().reshape(W.shape[0], -1, 16).amax(-1)
    assert (max_val <= org).all() and (max_val >= 0.5 * org - 1e-6).all() and (max_val < org).any()
    clipped = torch.maximum(torch.minimum(W, max_val.repeat_interleave(16, 1)), -max_val.repeat_interleave(16, 1))

    def group_errors(w):  # [out, n_groups]: each group's own output error, δ_g H_gg δ_gᵀ
        d = (fake_quantize(w, 3, 16) - W).reshape(W.shape[0], -1, 16)
        blocks = torch.stack([H[i : i + 16, i : i + 16] for i in range(0, W.shape[1], 16)])
        return torch.einsum("ogk,gkl,ogl->og", d, blocks, d)

    assert (group_errors(clipped) <= group_errors(W) * (1 + 1e-5) + 1e-9).all()


def test_awq_quantizes_every_decoder_linear(tiny, calibration):
    report = quant.awq(tiny, calibration, bits=4, group_size=16, n_grid=5)
    slots = [n for n, m in tiny.named_modules() if isinstance(m, QuantLinear)]
    assert len(slots) == 14 and report.layers == 14 and report.method == "AWQ"
    assert len(report.alphas) == 8 and set(report.alphas.values()) <= {0.0, 0.2, 0.4, 0.6, 0.8}
    assert all(len(v) == 5 for v in report.losses.values())
    assert all(0 <= e < 1 for e in report.errors.values())
    assert not any(m.sym or m.float_offset for m in tiny.modules() if isinstance(m, QuantLinear))


def test_a_learners_loss_plugs_in(tiny, calibration):
    other = copy.deepcopy(tiny)
    quant.awq(tiny, calibration, bits=4, group_size=16, n_grid=4)
    quant.awq(
        other, calibration, bits=4, group_size=16, n_grid=4, loss=lambda W, H, s, b, g: awq.scaled_error(W, H, s, b, g)
    )
    for (name, a), b in zip(tiny.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"n_grid": 1}, "n_grid=1"),
        ({"clip": "yes"}, "clip='yes'"),
        ({"loss": 3}, "loss=3"),
        ({"loss": lambda W, H, s, b, g: float("nan")}, "one finite number"),
        ({"group_size": 48}, "group_size"),
        ({"bits": 9}, "bits"),
    ],
)
def test_bad_input_is_refused_and_the_model_is_unchanged(tiny, calibration, kwargs, words):
    before = copy.deepcopy(tiny.state_dict())
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        quant.awq(tiny, calibration, **{"bits": 4, "group_size": 16, "n_grid": 3, **kwargs})
    after = tiny.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_an_awq_model_runs_on_the_cpu_int4_kernel(tiny, calibration):
    if not cpu_kernels.cpu_kernels_available():
        pytest.skip("this torch lacks the CPU kernels")
    quant.awq(tiny, calibration, bits=4, group_size=32, n_grid=3)
    reference = copy.deepcopy(tiny)
    assert quant.to_cpu_kernels(tiny).int4_layers == 14  # the one packed layout: no conversion of its own
    with torch.no_grad():
        got, want = tiny(calibration).logits, reference(calibration).logits
    assert ((got - want).abs().max() / want.abs().max()).item() < 0.05  # bf16 activations (test_cpu_kernels)


def test_awq_beats_rtn_on_the_real_model(real_model, data_dir):
    """The issue's bar at the CPU profile's group size, on a small protocol that fits a unit test: 4 windows of 256
    test tokens, 4 calibration windows of 256, 5 values of alpha (the lesson runs the full protocol)."""
    _, tok = real_model
    from labkit import models

    test, calib = data.test_tokens(tok), data.calibration(tok, 4, 256, seed=0)
    ppl = {}
    for name in ("rtn", "awq"):
        model, _ = models.load("smollm2-135m", device="cpu")
        if name == "rtn":
            quant.rtn(model, 4, 64)
        else:
            quant.awq(model, calib, bits=4, group_size=64, n_grid=5)
        ppl[name] = evaluate.perplexity(model, test, seqlen=256, max_windows=4, progress=False)
    assert ppl["awq"] < 0.97 * ppl["rtn"], ppl
