"""labkit.export: pruned and low-rank models written as safetensors and read back exactly."""

import pytest
import torch

from labkit import export, lowrank
from labkit.prune import structured


def _compress(model):
    # layer 0: one of two KV groups removed, with a compensation bias; MLP channels cut
    structured.prune_layer(
        model.model.layers[0],
        keep_heads=[0, 1],
        keep_channels=range(50),
        attn_mean=torch.randn(64),
        mlp_mean=torch.randn(model.config.intermediate_size),
    )
    # layer 1: one query head per group kept (KV heads stay)
    structured.prune_heads(model.model.layers[1].self_attn, [0, 2])
    lowrank.svd(model, rank=8)  # every decoder linear becomes a thin pair
    return model


def test_round_trip_is_exact_and_refuses_to_overwrite(tiny, tmp_path):
    model = tiny
    model = _compress(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    folder = export.save_compressed(model, tmp_path / "m")
    plan = export.layout(model)["layers"]
    assert plan[0]["heads"] == 2 and plan[0]["kv_heads"] == 1 and plan[0]["channels"] == 50
    assert plan[1]["heads"] == 2 and plan[1]["kv_heads"] == 2 and "self_attn.o_proj" in plan[0]["bias"]
    assert plan[0]["low_rank"]["mlp.down_proj"] == 8
    loaded = export.load_compressed(folder)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        export.save_compressed(model, folder)
    export.save_compressed(model, folder, overwrite=True)


def test_truncated_file_and_missing_files_fail_clearly(tiny, tmp_path):
    model = tiny
    folder = export.save_compressed(_compress(model), tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or altered"):
        export.load_compressed(folder)
    (folder / "labkit_layout.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"labkit_layout.json"):
        export.load_compressed(folder)
