"""Every public transform checks first and changes all or nothing; compressed models are labelled (issue 17).

Each case runs on tiny-llama-random with `cal = data.calibration(tok, 2, 32)`. "Unchanged" means bit-identical:
the same state_dict tensors (torch.equal), the same module types and the same history.
"""

import copy
import inspect

import pytest
import torch

from labkit import data, evaluate, export, lora, lowrank, models, prune, quant, transform
from labkit.kernels import llama as fused_llama
from labkit.quant import checkpoint


@pytest.fixture(scope="module")
def base():
    model, tok = models.load("tiny-llama-random", device="cpu")
    return model, data.calibration(tok, 2, 32)


@pytest.fixture
def model(base):
    return copy.deepcopy(base[0])


@pytest.fixture
def cal(base):
    return base[1]


def state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(name, type(m)) for name, m in model.named_modules()],
        transform.history(model),
        model.config.to_dict(),
    )


def same_bits(a, b):  # bit-identical, NaN included (torch.equal says NaN != NaN)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().flatten().view(torch.uint8), b.contiguous().flatten().view(torch.uint8))


def same_tensors(got: dict, want: dict) -> bool:  # two state dicts, bit for bit
    return got.keys() == want.keys() and all(same_bits(got[k], want[k]) for k in got)


def assert_unchanged(model, before):
    tensors, types, history, config = before
    now = model.state_dict()
    assert now.keys() == tensors.keys()
    changed = [k for k in tensors if not same_bits(now[k], tensors[k])]
    assert not changed, f"changed tensors: {changed[:5]}"
    assert [(name, type(m)) for name, m in model.named_modules()] == types
    assert transform.history(model) == history
    assert model.config.to_dict() == config


def assert_changed(model, before):  # the opposite: a tensor, a module type, the history or the config moved
    now = state(model)
    assert not same_tensors(now[0], before[0]) or now[1:] != before[1:], "the model did not change"


# --- every public transform, with arguments that work on the tiny model --------------------------------------

TRANSFORMS = {
    "prune.magnitude": lambda m, cal: prune.magnitude(m, 0.5),
    "prune.magnitude global": lambda m, cal: prune.magnitude(m, 0.5, scope="global"),
    "prune.wanda": lambda m, cal: prune.wanda(m, cal, 0.5),
    "prune.sparsegpt": lambda m, cal: prune.sparsegpt(m, cal, None, "2:4"),
    "prune.flap": lambda m, cal: prune.flap(m, cal, 0.2),
    "prune.llm_pruner": lambda m, cal: prune.llm_pruner(m, cal, 0.2),
    "lora.lora_recover": lambda m, cal: lora.lora_recover(m, cal, 1, batch_size=2),
    "prune.to_sparse": lambda m, cal: prune.to_sparse(m, "bitmask"),
    "quant.rtn": lambda m, cal: quant.rtn(m, 4, 32),
    "quant.rtn pack=False": lambda m, cal: quant.rtn(m, 4, 32, pack=False),
    "quant.gptq": lambda m, cal: quant.gptq(m, cal, 4, 32),
    "quant.gptq pack=False": lambda m, cal: quant.gptq(m, cal, 4, 32, pack=False),
    "quant.llm_int8": lambda m, cal: quant.llm_int8(m, calibration=cal),
    "quant.smooth": lambda m, cal: quant.smooth(m, cal),
    "quant.smoothquant": lambda m, cal: quant.smoothquant(m, cal),
    "quant.w8a8": lambda m, cal: quant.w8a8(m),
    "quant.w8a16": lambda m, cal: quant.w8a16(m),
    "quant.nf4": lambda m, cal: quant.nf4(m),
    "lowrank.svd": lambda m, cal: lowrank.svd(m, param_ratio=0.8),
    "lowrank.svd activation-aware": lambda m, cal: lowrank.svd(
        m, param_ratio=0.8, activation_aware=True, calibration=cal
    ),
    "lowrank.sparse_plus_lowrank": lambda m, cal: lowrank.sparse_plus_lowrank(m, param_ratio=0.7, density=0.05),
    "kernels.fuse w4a16": lambda m, cal: fused_llama.fuse(m, w4a16=True, group_size=32, backend="torch"),
}

CALIBRATED = [name for name in TRANSFORMS if name.split()[0] in {
    "prune.wanda", "prune.sparsegpt", "prune.flap", "prune.llm_pruner", "lora.lora_recover", "quant.gptq",
    "quant.llm_int8", "quant.smooth", "quant.smoothquant",
}] + ["lowrank.svd activation-aware"]  # fmt: skip


def _function(name):
    module, _, rest = name.partition(".")
    if module == "kernels":
        return fused_llama.fuse
    return getattr({"prune": prune, "quant": quant, "lowrank": lowrank, "lora": lora}[module], rest.split()[0])


def _fail_at_the_end(monkeypatch, name):
    """Make the transform fail after it changed everything: its last step (the label, or the last module built)."""
    fn = inspect.unwrap(_function(name))
    if name == "lora.lora_recover":  # no label of its own: fail in the fine-tune, once the adapters have learnt

        def finetune(model, *args, **kwargs):
            for module in model.modules():
                if isinstance(module, lora.LoRALinear):
                    module.B.data.fill_(0.25)  # what training does; lora_recover then merges them back
            raise RuntimeError("boom")

        monkeypatch.setattr(lora, "finetune", finetune)
    elif name == "prune.to_sparse":
        calls = []

        def from_linear(linear, format="bitmask"):
            calls.append(1)
            if len(calls) == 14:
                raise RuntimeError("boom")
            return original(linear, format)

        original = prune.SparseLinear.from_linear
        monkeypatch.setattr(prune.SparseLinear, "from_linear", from_linear)
    else:

        def boom(*args, **kwargs):
            raise RuntimeError("boom")

        label = "record" if "record" in fn.__globals__ else "record_prune"  # prune.magnitude/wanda/sparsegpt
        monkeypatch.setitem(fn.__globals__, label, boom)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_a_failure_after_every_change_leaves_the_model_bit_identical(name, model, cal, monkeypatch):
    before = state(model)
    _fail_at_the_end(monkeypatch, name)
    with pytest.raises(RuntimeError, match="boom"):
        TRANSFORMS[name](model, cal)
    assert_unchanged(model, before)
    forward = model.model.layers[0].__dict__.get("forward")
    assert forward is None, "a fused forward was left installed"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_each_transform_labels_the_model(name, model, cal):
    TRANSFORMS[name](model, cal)
    done = transform.history(model)
    if name in ("lora.lora_recover", "prune.to_sparse"):  # they change how weights are held, not what they are
        assert done == []
    else:
        assert done and done[-1].kind in ("prune", "quantize", "lowrank", "smooth")
        assert transform.history(copy.deepcopy(model)) == done  # survives what lessons do with a model


def test_a_failure_midway_through_the_walk_is_undone(model, cal):
    # layer 0 is already quantized when layer 1's inputs turn out to be NaN
    model.model.layers[1].input_layernorm.register_forward_hook(lambda m, i, out: out * float("nan"))
    before = state(model)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.\w_proj hold non-finite.*left unchanged"):
        quant.gptq(model, cal, 4, 32)
    assert_unchanged(model, before)


# --- case 1: an empty calibration set --------------------------------------------------------------------------


@pytest.mark.parametrize("name", CALIBRATED)
def test_an_empty_calibration_set_is_refused(name, model, cal):
    before = state(model)
    with pytest.raises(ValueError, match=r"(calibration|data) holds 0 windows of 32 tokens"):
        TRANSFORMS[name](model, cal[:0])
    with pytest.raises(ValueError, match=r"(calibration|data) holds 2 windows of 0 tokens"):
        TRANSFORMS[name](model, cal[:, :0])
    assert_unchanged(model, before)


# --- case 6: a bad layer is found before anything changes ------------------------------------------------------


@pytest.mark.parametrize("name", TRANSFORMS)
def test_a_nan_weight_in_the_last_layer_is_named_and_nothing_changes(name, model, cal):
    model.model.layers[1].self_attn.q_proj.weight.data[0, 0] = float("nan")
    before = state(model)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj\.weight holds non-finite"):
        TRANSFORMS[name](model, cal)
    assert_unchanged(model, before)


def _rewrite(path, change):
    tensors, metadata = checkpoint._read_safetensors(path)
    change(tensors)
    metadata["sha256"] = checkpoint._digest(tensors)
    path.unlink()
    checkpoint._write_safetensors(tensors, path, metadata)


def test_load_quantized_with_bad_scales_in_the_last_layer_changes_nothing(model, cal, tmp_path):
    packed = copy.deepcopy(model)
    quant.rtn(packed, 4, 32)
    path = quant.save_quantized(packed, tmp_path / "w4.safetensors")
    last = "model.layers.1.mlp.down_proj.scales"
    _rewrite(path, lambda t: t.__setitem__(last, t[last][:, :1].contiguous()))
    before = state(model)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj\.scales is \(64, 1\)"):
        quant.load_quantized(model, path)
    assert_unchanged(model, before)


def test_load_gptq_with_a_bad_last_tensor_changes_nothing(model, cal, tmp_path):
    packed = copy.deepcopy(model)
    quant.gptq(packed, cal, 4, 32)
    folder = quant.save_gptq(packed, tmp_path / "gptq")
    _rewrite(folder / "model.safetensors", lambda t: t.__setitem__("model.norm.weight", torch.zeros(3)))
    before = state(model)
    with pytest.raises(ValueError, match=r"shape mismatch for model\.norm\.weight"):
        quant.load_gptq(model, folder)
    assert_unchanged(model, before)


def test_set_backend_checks_every_layer_first(model):
    fused_llama.fuse(model, layers=[0], backend="torch")
    with pytest.raises(ValueError, match="layer 1 is not fused"):
        fused_llama.set_backend(model, "triton")
    assert model.model.layers[0].forward.keywords["backend"] == "torch"


# --- case 7: a second compression ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "second",
    [
        lambda m, cal: quant.rtn(m, 3),
        lambda m, cal: quant.llm_int8(m),
        lambda m, cal: quant.gptq(m, cal, 4, 32),
        lambda m, cal: quant.nf4(m),
        lambda m, cal: quant.w8a8(m),
        lambda m, cal: prune.wanda(m, cal, 0.5),
        lambda m, cal: lowrank.svd(m, param_ratio=0.8),
    ],
    ids=["rtn", "llm_int8", "gptq", "nf4", "w8a8", "wanda", "svd"],
)
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "fake-quantized"])
def test_a_quantized_model_is_not_compressed_again(second, pack, model, cal):
    quant.rtn(model, 4, 32, pack=pack)
    before = state(model)
    with pytest.raises(ValueError, match=r"already compressed \(RTN W4 g32\).*float model"):
        second(model, cal)
    assert_unchanged(model, before)


def test_packed_modules_are_refused_even_without_a_label(model):
    quant.rtn(model, 4, 32)
    del model.labkit_compression  # e.g. a model assembled by hand from QuantLinears
    with pytest.raises(ValueError, match=r"already hold packed \(quantized or sparse\) modules \(QuantLinear\)"):
        quant.rtn(model, 3)


def test_prune_then_quantize_is_allowed_and_labelled(model, cal):
    prune.sparsegpt(model, cal, None, "2:4")
    quant.gptq(model, cal, 4, 32, keep_zeros=True)
    assert [(c.method, c.setting) for c in transform.history(model)] == [
        ("sparsegpt", "2:4"),
        ("GPTQ", "W4 g32 keep-zeros"),
    ]
    assert transform.describe_history(model) == "sparsegpt 2:4, then GPTQ W4 g32 keep-zeros"


# --- case 8: every export round-trips, or is refused at save time ----------------------------------------------


@pytest.mark.parametrize(
    "compress",
    [
        lambda m, cal: None,
        lambda m, cal: prune.wanda(m, cal, 0.5),
        lambda m, cal: prune.flap(m, cal, 0.2),
        lambda m, cal: prune.llm_pruner(m, cal, 0.2),
        lambda m, cal: quant.rtn(m, 4, 32, pack=False),
        lambda m, cal: quant.smooth(m, cal),
        lambda m, cal: lowrank.svd(m, param_ratio=0.8),
    ],
    ids=["plain", "wanda", "flap", "llm_pruner", "rtn-fake-quantized", "smooth", "svd"],
)
def test_every_exportable_kind_round_trips(compress, model, cal, tmp_path):
    compress(model, cal)
    folder = export.save_compressed(model, tmp_path / "m")
    loaded = export.load_compressed(folder)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert transform.history(loaded) == transform.history(model)


@pytest.mark.parametrize(
    "compress",
    [
        lambda m, cal: quant.rtn(m, 4, 32),
        lambda m, cal: quant.nf4(m),
        lambda m, cal: quant.w8a8(m),
        lambda m, cal: prune.to_sparse(m),
        lambda m, cal: lowrank.sparse_plus_lowrank(m, param_ratio=0.7, density=0.05),
        lambda m, cal: fused_llama.fuse(m, backend="torch"),
    ],
    ids=["rtn", "nf4", "w8a8", "to_sparse", "sparse_plus_lowrank", "fused"],
)
def test_what_cannot_be_read_back_is_refused_before_writing(compress, model, cal, tmp_path):
    compress(model, cal)
    with pytest.raises(ValueError, match="save_compressed"):
        export.save_compressed(model, tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_the_rtn_refusal_names_the_writer_that_works(model, tmp_path):
    quant.rtn(model, 4, 32)
    with pytest.raises(ValueError, match=r"is a QuantLinear \(the model had RTN W4 g32\).*save_gptq"):
        export.save_compressed(model, tmp_path / "m")
    quant.load_gptq(models.load("tiny-llama-random", device="cpu")[0], quant.save_gptq(model, tmp_path / "g"))


# --- case 9: the meta device -----------------------------------------------------------------------------------


def test_counting_on_meta_matches_the_real_model(model):
    meta = copy.deepcopy(model).to("meta")
    assert models.parameter_count(meta) == models.parameter_count(model) == 102_720
    assert models.parameter_breakdown(meta) == models.parameter_breakdown(model)


def test_weight_bytes_on_meta_matches_the_real_model(model):
    assert evaluate.weight_bytes(copy.deepcopy(model).to("meta")) == evaluate.weight_bytes(model)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_transforms_that_need_data_name_the_meta_device(name, model, cal):
    meta = model.to("meta")
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight is on the meta device"):
        TRANSFORMS[name](meta, cal)


def test_all_or_nothing_undoes_moves_new_modules_attributes_and_config(model):
    # what a failing walk on a GPU leaves behind, imitated on the CPU: a layer converted by .to() (the walk moves
    # each layer to the compute device), a module replaced, an attribute and the config changed, in-place-free
    @transform.all_or_nothing
    def half_done(m):
        m.model.layers[0].to(torch.float64)
        m.model.layers[1].mlp.down_proj = torch.nn.Linear(160, 64)
        m.model.layers[1].self_attn.num_key_value_groups = 7
        m.config.intermediate_size = 1
        transform.record(m, "half", "done", "prune")
        raise KeyboardInterrupt  # an interrupt (Ctrl-C in a notebook) restores the model too

    before = state(model)
    with pytest.raises(KeyboardInterrupt):
        half_done(model)
    assert_unchanged(model, before)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert model.model.layers[1].self_attn.num_key_value_groups == 2


# --- on an accelerator, replaced tensors are parked in CPU memory, not kept beside the new ones -------------


# "imitated": on CPU, every tensor counts as an accelerator tensor; "cuda" (where present, e.g. in
# benchmarks/gpu_check.sh): the model on a real GPU, where parking happens by itself.
PARKING = ["imitated"] + (["cuda"] if torch.cuda.is_available() else [])


def _parking_on(where, model, monkeypatch):
    if where == "cuda":
        return model.cuda()
    monkeypatch.setattr(transform, "_parked", lambda t: t.device.type != "meta")
    return model


@pytest.mark.parametrize("where", PARKING)
@pytest.mark.parametrize("name", TRANSFORMS)
def test_parking_replaced_accelerator_tensors_restores_bit_identically(name, where, model, cal, monkeypatch):
    """What happens to a model on a GPU (imitated on CPU: every tensor counts as an accelerator tensor, so it
    is not referenced by the snapshot but copied when replaced, and a replaced module's tensors are emptied)."""
    model = _parking_on(where, model, monkeypatch)
    before = state(model)
    _fail_at_the_end(monkeypatch, name)
    with pytest.raises(RuntimeError, match="boom"):
        TRANSFORMS[name](model, cal)
    assert_unchanged(model, before)
    assert not transform._journals and not models.before_replace


@pytest.mark.parametrize("where", PARKING)
@pytest.mark.parametrize("name", ["quant.rtn", "quant.gptq", "prune.wanda"])
def test_parking_frees_what_a_successful_transform_replaced(name, where, model, cal, monkeypatch):
    if where == "cuda":
        model = model.cuda()
    reference = copy.deepcopy(model)
    with monkeypatch.context() as patch:
        patch.setattr(transform, "_parked", lambda t: False)  # without parking
        TRANSFORMS[name](reference, cal)
    model = _parking_on(where, model, monkeypatch)
    old = [m.weight for layer in models.decoder_layers(model) for m in models.linear_layers(layer).values()]
    TRANSFORMS[name](model, cal)
    now, then = model.state_dict(), reference.state_dict()
    assert same_tensors(now, then)  # parking changes no result
    if name != "prune.wanda":  # the float linears left the model: their memory was freed
        assert all(w.numel() == 0 for w in old)


# --- transform.undone: try a compression, measure it, go back -------------------------------------------------


@pytest.mark.parametrize("where", PARKING)
@pytest.mark.parametrize("name", TRANSFORMS)
def test_undone_puts_the_model_back_after_any_transform(name, where, model, cal, monkeypatch):
    model = _parking_on(where, model, monkeypatch)
    before = state(model)
    with transform.undone(model):
        TRANSFORMS[name](model, cal)
        assert_changed(model, before)
    assert_unchanged(model, before)
    assert not transform._journals and not models.before_replace


@pytest.mark.parametrize("where", PARKING)
def test_undone_puts_the_model_back_when_the_block_raises(where, model, cal, monkeypatch):
    model = _parking_on(where, model, monkeypatch)
    before = state(model)
    with pytest.raises(RuntimeError, match="measured"), transform.undone(model):
        quant.gptq(model, cal, 4, 32)
        raise RuntimeError("measured, then failed")
    assert_unchanged(model, before)
    assert not transform._journals and not models.before_replace


@pytest.mark.parametrize("where", PARKING)
def test_a_failed_transform_inside_undone_is_undone_by_both(where, model, cal, monkeypatch):
    """Nested restores: the transform's own (all_or_nothing) and the block's share one parked copy per tensor."""
    model = _parking_on(where, model, monkeypatch)
    before = state(model)
    with transform.undone(model):
        prune.wanda(model, cal, 0.5)
        after_wanda = state(model)
        with monkeypatch.context() as patch:
            _fail_at_the_end(patch, "quant.gptq")
            with pytest.raises(RuntimeError, match="boom"):
                quant.gptq(model, cal, 4, 32)
        assert_unchanged(model, after_wanda)  # the failed GPTQ put back the pruned model
    assert_unchanged(model, before)


@pytest.mark.parametrize("where", PARKING)
def test_lesson_12s_sequence_gives_what_a_copy_gives(where, model, cal, monkeypatch):
    """SparseGPT 2:4, a naive GPTQ inside undone, then GPTQ keep_zeros: the same as the naive GPTQ on a deep copy."""
    reference = copy.deepcopy(model)
    prune.sparsegpt(reference, cal, None, "2:4")
    naive = copy.deepcopy(reference)
    quant.gptq(naive, cal, 4, 32, pack=False)
    quant.gptq(reference, cal, 4, 32, keep_zeros=True)

    model = _parking_on(where, model, monkeypatch)
    prune.sparsegpt(model, cal, None, "2:4")
    with transform.undone(model):
        quant.gptq(model, cal, 4, 32, pack=False)
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    quant.gptq(model, cal, 4, 32, keep_zeros=True)
    for got, want in ((inside, naive.state_dict()), (model.state_dict(), reference.state_dict())):
        assert same_tensors(got, want)
    assert transform.history(model) == transform.history(reference)


def test_undone_refuses_what_is_not_a_model():
    with (
        pytest.raises(TypeError, match=r"transform\.undone: model must be a torch\.nn\.Module; got Tensor"),
        transform.undone(torch.zeros(2)),
    ):
        pass
