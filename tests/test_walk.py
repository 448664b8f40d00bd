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


# --- capture: what arrives at a layer boundary ----------------------------------------------------


class Counter:
    """Counts the forward calls of the modules it watches (forward hooks: they fire only if the module ran)."""

    def __init__(self, modules: dict):
        self.calls = dict.fromkeys(modules, 0)
        self.hooks = [m.register_forward_hook(self._count(name)) for name, m in modules.items()]

    def _count(self, name):
        def hook(*_):
            self.calls[name] += 1

        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


def watched(model):
    inner = model.model
    return {"embed": inner.embed_tokens, "layer0": inner.layers[0], "layer1": inner.layers[1], "norm": inner.norm}


def test_capture_one_layer_stops_there_and_sees_each_batch_once(tiny):
    model = tiny
    with torch.no_grad():
        expected = model(CALIB, output_hidden_states=True).hidden_states  # [L + 1] x [5, 24, 64]
    counter = Counter(watched(model))
    try:
        batches = walk.capture(model, CALIB, [1], batch_size=2)
    finally:
        counter.remove()
    assert len(batches) == 3  # 2, 2 and 1 windows
    assert torch.equal(torch.cat([states[0] for states, _ in batches]), expected[1])
    # each batch embedded once; layer 0 ran, layer 1 (the boundary) and everything after it did not
    assert counter.calls == {"embed": 3, "layer0": 3, "layer1": 0, "norm": 0}
    states, kwargs = batches[0]
    cos, _ = kwargs["position_embeddings"]
    assert len(states) == 1 and cos.shape[-2] == 24 and "hidden_states" not in kwargs
    with torch.no_grad():  # the kwargs replay the model's own computation (hidden_states[L] is after the norm)
        torch.testing.assert_close(model.model.norm(model.model.layers[1](states[0], **kwargs)), expected[2][:2])


def test_capture_all_boundaries(tiny):
    model = tiny
    with torch.no_grad():
        hidden = model(CALIB, output_hidden_states=True).hidden_states
    counter = Counter(watched(model))
    try:
        batches = walk.capture(model, CALIB, batch_size=4)
    finally:
        counter.remove()
    assert counter.calls == {"embed": 2, "layer0": 2, "layer1": 2, "norm": 0}  # stopped before the final norm
    states = [torch.cat(chunks) for chunks in zip(*(s for s, _ in batches))]
    assert len(states) == 3
    for i in (0, 1):
        assert torch.equal(states[i], hidden[i])
    with torch.no_grad():  # hidden_states[-1] is after the final norm; boundary L is before it
        assert torch.equal(model.model.norm(states[2]), hidden[2])
    # the same tensors as the public helpers give
    all_states, _ = walk.layer_states(model, CALIB, batch_size=4)
    inputs, _ = walk.layer_inputs(model, CALIB, 1, batch_size=4)
    assert all(torch.equal(a, b) for a, b in zip(all_states, states)) and torch.equal(inputs, states[1])
    # a chosen set, in the order asked for
    picked = walk.capture(model, CALIB, [2, 0], batch_size=4)
    assert torch.equal(torch.cat([s[0] for s, _ in picked]), states[2])
    assert torch.equal(torch.cat([s[1] for s, _ in picked]), states[0])


def test_capture_removes_its_hooks_after_an_error(tiny):
    model = tiny
    inner = model.model
    stations = [*inner.layers, inner.norm]

    def fail(*_):
        raise RuntimeError("boom")

    handle = inner.layers[1].mlp.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            walk.capture(model, CALIB, batch_size=2)
    finally:
        handle.remove()
    assert all(not m._forward_pre_hooks for m in stations)
    for bad in ([3], [], 1, [True]):
        with pytest.raises(ValueError, match=r"boundaries=.*: need a list of indices in 0..2"):
            walk.capture(model, CALIB, bad)
    with pytest.raises(ValueError, match=r"index=2: the model has decoder layers 0..1"):
        walk.layer_inputs(model, CALIB, 2)
    assert all(not m._forward_pre_hooks for m in stations)
    assert len(walk.capture(model, CALIB, [0])) == 1  # still works


def test_calibration_check_rejects_empty_sets_and_short_windows(tiny):
    model = tiny
    for empty in (CALIB[:0], CALIB[:, :0]):
        with pytest.raises(ValueError, match=r"calibration holds \d+ windows of \d+ tokens; need at least one"):
            walk.calibration_walk(model, empty, lambda n, lin: None, lambda i, layer, s: None)
        with pytest.raises(ValueError, match=r"^tokens holds"):
            walk.capture(model, empty)
    with pytest.raises(ValueError, match=r"data holds 5 windows of 1 tokens; need .* seqlen >= 2"):
        walk.check_calibration(CALIB[:, :1], model, name="data", min_seqlen=2)
    with pytest.raises(ValueError, match=r"data holds token ids outside \[0, 256\)"):
        walk.check_calibration(CALIB + 256, model, name="data")
    walk.check_calibration(CALIB[:, :2], model, name="data", min_seqlen=2)


def test_order_inside_a_sequential_group_does_not_change_results():
    """Every linear of a group is observed before any is changed: reversing a group changes nothing."""
    from labkit import models

    def run(groups):
        model, _ = models.load("tiny-llama-random", device="cpu")

        def update(i, layer, stats):
            for name, s in stats.items():  # a change that depends on the statistic
                layer.get_submodule(name).weight.mul_(1 + s.H.diagonal().mean())

        walk.calibration_walk(model, CALIB, lambda n, lin: walk.Hessian(lin.in_features), update, sequential=groups)
        return model.state_dict()

    forward = run(walk.SEQUENTIAL_GROUPS)
    backward = run([group[::-1] for group in walk.SEQUENTIAL_GROUPS])
    assert all(torch.equal(forward[k], backward[k]) for k in forward)


def test_large_batches_are_converted_in_chunks(monkeypatch):
    """Above CHUNK_BYTES a statistic converts a fp16 batch a chunk of tokens at a time (no full fp32/fp64
    copy); the sums agree with the whole-batch ones to fp32 rounding (the order of the sums differs).
    Below it, and for fp32 batches, the batch is added whole: bit for bit what one addmm gives."""
    x = torch.randn(300, 7, generator=torch.Generator().manual_seed(1))
    whole = torch.zeros(7, 7).addmm_(x.T, x)
    h = walk.Hessian(7)
    h.add(x)
    assert torch.equal(h.xtx, whole)
    monkeypatch.setattr(walk, "CHUNK_BYTES", 7 * 4 * 64)  # 64 tokens per fp32 chunk, 32 per fp64 chunk
    assert walk._chunk_rows(x) == 64 and walk._chunk_rows(x, 8) == 32
    h16, c16, c32 = walk.Hessian(7), walk.ColumnStats(7), walk.ColumnStats(7)
    x16 = x.half()
    h16.add(x16)
    c16.add(x16)
    c32.add(x)  # fp32 batches are chunked in ColumnStats too (its copy is fp64)
    ref = x16.float()
    assert torch.allclose(h16.xtx, ref.T @ ref, rtol=1e-5, atol=1e-4)
    assert torch.allclose(c16.sum, ref.double().sum(0)) and torch.allclose(c16.sumsq, (ref.double() ** 2).sum(0))
    assert torch.allclose(c32.sum, x.double().sum(0)) and torch.equal(c32.max_abs, x.abs().amax(0))
    assert h16.n == c16.n == 300


def test_activations_on_host_or_device_give_the_same_walk(tiny):
    """On a CPU device host and device are the same memory: both settings give the same statistics."""
    seen = {}
    for where in ("host", "device"):
        seen[where] = walk.calibration_walk(
            tiny,
            CALIB,
            lambda n, lin: Keep(),
            lambda i, layer, s: s["mlp.down_proj"].x,
            batch_size=2,
            activations=where,
        )
    assert all(torch.equal(a, b) for a, b in zip(seen["host"], seen["device"]))
    with pytest.raises(ValueError, match=r"activations='gpu': allowed are 'host'"):
        walk.calibration_walk(tiny, CALIB, lambda n, lin: None, lambda i, layer, s: None, activations="gpu")


def test_observe_layer_sees_what_the_walk_sees_in_that_layers_turn(tiny):
    walked = {}
    walk.calibration_walk(
        tiny, CALIB, lambda n, lin: Keep(), lambda i, layer, stats: walked.setdefault(i, stats), batch_size=2
    )
    for index in (0, 1):
        one = walk.observe_layer(
            tiny, CALIB, index, lambda n, lin: Keep() if n != "mlp.up_proj" else None, batch_size=2
        )
        assert set(one) == set(walked[index]) - {"mlp.up_proj"}
        for name, stat in one.items():
            torch.testing.assert_close(stat.x, walked[index][name].x, rtol=0, atol=0)
    assert walk.observe_layer(tiny, CALIB, 1, lambda n, lin: None) == {}
    with pytest.raises(ValueError, match="index=2"):
        walk.observe_layer(tiny, CALIB, 2, lambda n, lin: Keep())


def test_observe_layer_keeps_no_graph(tiny):
    stats = walk.observe_layer(tiny, CALIB, 0, lambda n, lin: walk.ColumnStats(lin.in_features))
    assert not any(s.sum.requires_grad or s.max_abs.requires_grad for s in stats.values())
