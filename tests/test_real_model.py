"""Integration tests on the real CPU-profile model, SmolLM2-135M (offline, from the GGUF package)."""

import time

import torch

from labkit import data, evaluate, models, profiles, walk


def test_architecture_and_size(real_model):
    model, tok = real_model
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert models.parameter_count(model) == 134_515_008
    assert evaluate.weight_bytes(model) == 4 * 134_515_008  # fp32, tied embedding counted once
    assert tok("Hello").input_ids[0] != tok.bos_token_id  # the GGUF tokenizer adds no BOS
    assert tok.bos_token_id not in tok("Hello.\n\n = Title =\n\nText.").input_ids  # none anywhere in a stream
    assert profiles.PROFILES["cpu"].bos == "none"  # what the CPU profile's protocol states


def test_decoder_weights_lie_on_a_q4_1_grid(real_model):
    """Q4_1 stored 16 levels per group of 32 input columns: min + k * scale, k = 0..15."""
    model, _ = real_model
    w = model.model.layers[3].mlp.up_proj.weight.reshape(-1, 32)  # [groups, 32]
    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    k = (w - lo) / scale
    assert (k - k.round()).abs().max() < 2e-3  # every weight sits on its group's 16-level grid
    assert max(len(torch.unique(g)) for g in w[:200]) <= 16


def test_fresh_copies_are_cheap(real_model):
    start = time.perf_counter()
    a, _ = models.load("smollm2-135m", device="cpu")
    assert time.perf_counter() - start < 10
    assert a is not real_model[0]


def test_perplexity_on_real_text_is_sane(real_model, data_dir):
    model, tok = real_model
    ppl = evaluate.perplexity(model, data.test_tokens(tok), seqlen=256, max_windows=2, progress=False)
    assert 5 < ppl < 80  # a working 135M model on Wikipedia text; a broken one gives hundreds or more


def test_walk_finds_the_outlier_channel(real_model, data_dir):
    """NOTES: in layer 28's down_proj one input channel holds most of the Hessian's trace."""
    model, tok = real_model
    calib = data.calibration(tok, 2, 64, seed=0)
    share = {}

    def make(name, lin):
        return walk.Hessian(lin.in_features) if name == "mlp.down_proj" else None

    def update(i, layer, stats):
        d = stats["mlp.down_proj"].H.diagonal()
        share[i] = (d.max() / d.sum()).item()

    walk.calibration_walk(model, calib, make, update)
    assert len(share) == 30 and share[28] > 0.5
