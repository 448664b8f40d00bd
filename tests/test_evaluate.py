import math

import pytest
import torch
from torch import nn

from labkit import evaluate


def test_perplexity_matches_a_hand_computation(tiny):
    model = tiny
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    got = evaluate.perplexity(model, ids, seqlen=32, progress=False)  # 3 windows, 4 tokens dropped
    nll = []
    for w in ids[0, :96].view(3, 32):
        logp = model(w[None]).logits[0, :-1].log_softmax(-1)
        nll += (-logp.gather(1, w[1:, None])).flatten().tolist()
    assert got == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert evaluate.perplexity(model, ids, 32, batch_size=2, progress=False) == pytest.approx(got, rel=1e-5)


def test_uniform_model_has_perplexity_equal_to_vocabulary(tiny):
    model = tiny
    model.lm_head.weight = nn.Parameter(torch.zeros_like(model.lm_head.weight))  # all logits 0
    ids = torch.randint(0, 256, (1, 64))
    assert evaluate.perplexity(model, ids, 16, progress=False) == pytest.approx(256, rel=1e-5)


def test_max_windows_uses_a_prefix(tiny):
    model = tiny
    ids = torch.randint(0, 256, (1, 128), generator=torch.Generator().manual_seed(1))
    assert evaluate.perplexity(model, ids, 32, max_windows=2, progress=False) == pytest.approx(
        evaluate.perplexity(model, ids[:, :64], 32, progress=False), rel=1e-6
    )


def test_perplexity_bad_seqlen(tiny):
    model = tiny
    with pytest.raises(ValueError, match=r"seqlen=4096 is larger than the model's context \(1024"):
        evaluate.perplexity(model, torch.zeros(1, 8192, dtype=torch.long), 4096)
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate.perplexity(model, torch.zeros(1, 10, dtype=torch.long), 32)


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.zeros(2, 64, dtype=torch.long), r"token_ids must be one stream.*\[1, n_tokens\].*got shape \[2, 64\]"),
        (torch.zeros(1, 1, 64, dtype=torch.long), r"token_ids must be one stream.*got shape \[1, 1, 64\]"),
        (torch.zeros(1, 64), r"token_ids must be one stream of integer token ids.*dtype torch.float32"),
        (torch.zeros(1, 64, dtype=torch.bool), r"token_ids must be one stream.*dtype torch.bool"),
        ([[1, 2, 3]], r"token_ids must be one stream.*got list"),
        (torch.full((1, 64), 256), r"token_ids holds ids from 256 to 256; the model's vocabulary is 0..255"),
        (torch.full((1, 64), -1), r"token_ids holds ids from -1 to -1"),
    ],
)
def test_perplexity_refuses_token_ids_that_are_not_one_stream_of_valid_ids(tiny, ids, match):
    model = tiny
    with pytest.raises(ValueError, match=match):
        evaluate.perplexity(model, ids, 16, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seqlen=0), r"seqlen=0: need an integer >= 2"),
        (dict(seqlen=1), r"seqlen=1: need an integer >= 2"),
        (dict(seqlen=16.0), r"seqlen=16.0: need an integer >= 2"),
        (dict(seqlen=16, batch_size=0), r"batch_size=0: need an integer >= 1"),
        (dict(seqlen=16, max_windows=0), r"max_windows=0: need an integer >= 1 \(or None for all windows\)"),
        (dict(seqlen=16, max_windows=True), r"max_windows=True"),
    ],
)
def test_perplexity_bad_arguments_are_named(tiny, kwargs, match):
    model = tiny
    with pytest.raises(ValueError, match=match):
        evaluate.perplexity(model, torch.zeros(1, 64, dtype=torch.long), progress=False, **kwargs)


def test_perplexity_accepts_one_dimensional_and_int32_ids(tiny):
    model = tiny
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(2))
    got = evaluate.perplexity(model, ids, 16, progress=False)
    assert evaluate.perplexity(model, ids[0], 16, progress=False) == got
    assert evaluate.perplexity(model, ids.int(), 16, progress=False) == got


def test_weight_bytes_counts_dtype_tied_once_and_skips_nonpersistent(tiny):
    model = tiny
    n = sum(p.numel() for p in model.parameters())
    assert evaluate.weight_bytes(model) == 4 * n  # fp32; embedding and lm_head tied: once
    assert evaluate.weight_bytes(model.half()) == 2 * n
    assert "model.rotary_emb.inv_freq" in dict(model.named_buffers())  # a buffer, but not a weight


class Packed(nn.Module):
    """A stand-in for a compressed layer: a float copy it does not count, and its real bytes."""

    def __init__(self):
        super().__init__()
        self.shadow = nn.Parameter(torch.zeros(100, 100))
        self.register_buffer("codes", torch.zeros(5000, dtype=torch.uint8))

    def stored_bytes(self):
        return self.codes.numel() + 200


def test_weight_bytes_uses_stored_bytes_of_compressed_modules():
    model = nn.Sequential(nn.Linear(10, 10, bias=False), Packed())
    assert evaluate.weight_bytes(model) == 10 * 10 * 4 + 5000 + 200


def test_peak_memory_sees_a_large_temporary(tiny):
    model = tiny

    def work():
        x = torch.ones(64, 1024, 1024)  # 256 MiB, freed on return
        return float(x[0, 0, 0])

    result, mem = evaluate.peak_memory(model, work)
    assert result == 1.0
    assert mem.model_bytes == evaluate.resident_bytes(model)
    assert 200 * 2**20 < mem.working_bytes < 600 * 2**20
    assert mem.peak_bytes == mem.model_bytes + mem.working_bytes


def test_generation_speed_and_memory(tiny, tiny_tokenizer):
    model, tok = tiny, tiny_tokenizer
    speed, mem = evaluate.measure_generation(model, tok, prompt="abc", new_tokens=8)
    assert speed.tokens_per_s > 0 and speed.new_tokens == 8 and speed.prompt_tokens == 3
    assert mem.peak_bytes >= mem.model_bytes > 0
    with pytest.raises(ValueError, match="new_tokens=1"):
        evaluate.generation_speed(model, tok, new_tokens=1)


def test_format_bytes():
    assert evaluate.format_bytes(512) == "512 B"
    assert evaluate.format_bytes(3 * 2**20) == "3.0 MiB"
    assert evaluate.format_bytes(13.5 * 2**30) == "13.5 GiB"


def test_best_time_keeps_the_fastest_call_after_the_warmup(monkeypatch):
    clock = iter([0.0, 5.0, 10.0, 12.0, 20.0, 23.0])  # the timed calls take 5, 2 and 3 s
    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: next(clock))
    calls = []
    assert evaluate.best_time(lambda: calls.append(1), repeats=3, warmup=2) == 2.0
    assert len(calls) == 5  # two untimed warm-up calls, then three timed ones
    for repeats, warmup in ((0, 0), (1, -1)):
        with pytest.raises(ValueError, match=f"repeats={repeats}, warmup={warmup}"):
            evaluate.best_time(lambda: None, repeats=repeats, warmup=warmup)


def test_predictions_agree_with_perplexity_and_a_uniform_guess(tiny):
    model = tiny
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    got = evaluate.predictions(model, ids, 32, max_windows=3)
    assert math.exp(got.nll) == pytest.approx(evaluate.perplexity(model, ids, 32, progress=False), rel=1e-5)
    assert 0 <= got.top1_accuracy <= 1 and 1 / 256 <= got.top_probability <= 1
    assert got.uniform_nll == pytest.approx(math.log(256))
    model.lm_head.weight = nn.Parameter(torch.zeros_like(model.lm_head.weight))  # all logits 0: a uniform guess
    flat = evaluate.predictions(model, ids, 32)
    assert flat.entropy == pytest.approx(math.log(256), rel=1e-5) and flat.nll == pytest.approx(math.log(256), rel=1e-5)
    assert flat.top_probability == pytest.approx(1 / 256, rel=1e-5)


def test_predictions_of_a_confident_wrong_model():
    """A model sure of one wrong token: NLL far above a uniform guess's, no hit, top probability near 1."""

    class Sure(nn.Module):
        config = type("Config", (), {"vocab_size": 8, "max_position_embeddings": 64})()

        def forward(self, ids, use_cache=False):
            logits = torch.full((*ids.shape, 8), -20.0)
            logits[..., 7] = 20.0  # always token 7, never in the data
            return type("Out", (), {"logits": logits})()

    model = Sure()
    model.weight = nn.Parameter(torch.zeros(1))  # a device to read
    got = evaluate.predictions(model, torch.randint(0, 7, (1, 64)), 16, max_windows=None)
    assert got.top1_accuracy == 0 and got.top_probability == pytest.approx(1, abs=1e-6)
    assert got.nll > 10 * got.uniform_nll and got.entropy < 1e-3
