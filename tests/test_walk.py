import pytest
import torch

from labkit import walk

CALIB = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(0))


class Keep:
    """A statistic that keeps every input it sees."""

    def __init__(self):
        self.xs = []

    def add(self, x):
        self.xs.append(x.clone())

    @property
    def x(self):
        return torch.cat(self.xs)


def layer_inputs(model, calib):
    """What each decoder layer receives in an ordinary forward pass: [layers][n*seqlen, hidden]."""
    with torch.no_grad():
        hs = model(calib, output_hidden_states=True).hidden_states
    return [h.reshape(-1, h.shape[-1]) for h in hs[:-1]]


def test_walk_sees_exactly_what_the_model_computes(tiny):
    model = tiny
    expected = layer_inputs(model, CALIB)
    seen = []

    def update(i, layer, stats):
        seen.append(stats["self_attn.q_proj"].x)  # q_proj's input is RMSNorm(layer input)
        return i

    out = walk.calibration_walk(model, CALIB, lambda n, lin: Keep(), update, batch_size=2)
    assert out == [0, 1]
    for i, layer in enumerate(model.model.layers):
        assert torch.allclose(seen[i], layer.input_layernorm(expected[i]), atol=1e-5)


def test_changes_propagate_to_later_layers(tiny):
    model = tiny
    seen = {}

    def update(i, layer, stats):
        seen[i] = stats["self_attn.q_proj"].x
        layer.mlp.down_proj.weight.mul_(3.0)  # a visible change to every layer

    walk.calibration_walk(model, CALIB, lambda n, lin: Keep() if n == "self_attn.q_proj" else None, update)
    expected = layer_inputs(model, CALIB)  # the model now holds the changed weights
    layer1 = model.model.layers[1]
    assert torch.allclose(seen[1], layer1.input_layernorm(expected[1]), atol=1e-5)


def test_sequential_groups_see_inputs_after_earlier_changes(tiny):
    model = tiny
    seen = {}

    def update(i, layer, stats):
        if "self_attn.o_proj" in stats:
            layer.self_attn.o_proj.weight.zero_()  # attention now adds nothing
        if "mlp.up_proj" in stats and i == 0:
            seen["up"] = stats["mlp.up_proj"].x

    groups = [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    ]
    walk.calibration_walk(model, CALIB, lambda n, lin: Keep(), update, sequential=groups)
    layer0 = model.model.layers[0]
    h = model.model.embed_tokens(CALIB).reshape(-1, 64)  # residual stream with zero attention
    assert torch.allclose(seen["up"], layer0.post_attention_layernorm(h), atol=1e-5)


def test_hessian_and_column_stats_match_direct_formulas():
    x = torch.randn(300, 7, generator=torch.Generator().manual_seed(0))
    h, c = walk.Hessian(7), walk.ColumnStats(7)
    for chunk in x.split(64):
        h.add(chunk)
        c.add(chunk)
    assert torch.allclose(h.H, 2 * x.T @ x / 300, atol=1e-5)
    assert torch.allclose(c.norm, x.norm(dim=0), atol=1e-5)
    assert torch.allclose(c.mean, x.mean(0), atol=1e-6)
    assert torch.allclose(c.var, x.var(0, unbiased=False), atol=1e-5)
    assert torch.equal(c.max_abs, x.abs().amax(0))


def test_layers_return_to_their_device_and_errors(tiny):
    model = tiny
    walk.calibration_walk(model, CALIB, lambda n, lin: None, lambda i, layer, s: None, device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    with pytest.raises(ValueError, match=r"LongTensor of token ids shaped \[n_samples, seqlen\]; got \(24,\)"):
        walk.calibration_walk(model, CALIB[0], lambda n, lin: None, lambda i, layer, s: None)
    with pytest.raises(ValueError, match=r"got \(5, 24\) torch.float32"):
        walk.calibration_walk(model, CALIB.float(), lambda n, lin: None, lambda i, layer, s: None)
    with pytest.raises(ValueError, match="outside \\[0, 256\\)"):
        walk.calibration_walk(model, CALIB + 1000, lambda n, lin: None, lambda i, layer, s: None)
    with pytest.raises(ValueError, match=r"\['mlp.nope'\] are not linears"):
        walk.calibration_walk(model, CALIB, lambda n, lin: Keep(), lambda i, layer, s: None, sequential=[["mlp.nope"]])


def test_observation_stops_once_the_group_has_its_inputs(tiny):
    # q/k/v's inputs need only the input norm: nothing after them runs while they are observed,
    # and each statistic still receives every batch exactly once
    model = tiny
    calls = {"o_proj": 0, "down_proj": 0}
    layer0 = model.model.layers[0]
    hooks = [
        layer0.self_attn.o_proj.register_forward_hook(lambda *a: calls.__setitem__("o_proj", calls["o_proj"] + 1)),
        layer0.mlp.down_proj.register_forward_hook(lambda *a: calls.__setitem__("down_proj", calls["down_proj"] + 1)),
    ]
    counts = {}

    def update(i, layer, stats):
        if i == 0:
            counts.update({name: (len(s.xs), dict(calls)) for name, s in stats.items()})

    try:
        walk.calibration_walk(
            model,
            CALIB,
            lambda n, lin: Keep(),
            update,
            batch_size=2,
            sequential=[
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                ["self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
            ],
        )
    finally:
        for h in hooks:
            h.remove()
    assert counts["self_attn.q_proj"] == (3, {"o_proj": 0, "down_proj": 0})  # 3 batches of 2, 2, 1 samples
    # the second group stops before down_proj runs: o_proj ran once per batch, down_proj never
    assert counts["mlp.down_proj"] == (3, {"o_proj": 3, "down_proj": 0})
