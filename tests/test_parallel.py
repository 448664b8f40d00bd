"""labkit.parallel on tiny-llama-random (4 query / 2 KV heads, 2 layers) with 2 ranks on gloo.

The ranks are processes forked from labkit's fork server: the first launch of a session starts
it (a few seconds: it imports torch and transformers once), later launches take well under a
second. The worker functions below are module-level so that the ranks can import them.
"""

import multiprocessing
import os
import time

import pytest
import torch

from labkit import models, parallel

# Tensor parallelism sums each row-parallel product in two parts (one per rank) and adds them in
# the all-reduce, instead of one long sum: in fp32 that reorders roundings only, so logits agree
# to ~1e-7 (measured 2.4e-7 on this model); 1e-5 leaves room and still catches any wrong slice
# (those change logits by ~1e-1). Pipeline parallelism runs exactly the same operations per
# sequence, but a micro-batch is a smaller matrix product, which may be blocked differently.
TP_ATOL = PP_ATOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, tokenizer = models.load("tiny-llama-random", device="cpu")
    ids = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))  # [batch, seq]
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    folder = parallel.write_folder(model, tmp_path_factory.mktemp("tiny"))
    return model, tokenizer, ids, logits, folder


def test_folder_round_trip(setup):
    _, _, ids, logits, folder = setup
    parallel.check_folder(folder)
    with torch.no_grad():
        assert torch.equal(parallel.load_folder(folder)(ids, use_cache=False).logits, logits)


def test_tensor_parallel_equals_single_process(setup):
    model, _, ids, logits, folder = setup
    out = parallel.launch(parallel.tensor_parallel_forward, 2, folder, ids, 6, timeout=120)
    assert out["logits"].shape == logits.shape
    assert (out["logits"] - logits).abs().max() < TP_ATOL
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out["generated"], expected)
    # Two all-reduces per layer, each of [batch, seq, hidden] fp32 values, in the forward pass.
    comm = out["comm"]["all_reduce"]
    c = model.config
    assert comm["calls"] == 2 * c.num_hidden_layers
    assert comm["bytes"] == 2 * c.num_hidden_layers * ids.numel() * c.hidden_size * 4
    assert comm["bytes"] / ids.numel() == parallel.comm_per_token(c, 4, 2)["payload_bytes"]
    assert out["heads"] == {"query": [0, 1], "kv": [0]}


def test_a_plan_from_the_learners_slices_runs_in_the_ranks(setup):
    from labkit import solutions

    model, _, ids, logits, folder = setup
    c = model.config
    plan = parallel.tensor_plan(c, 2, solutions.lesson11.linear_slices)
    assert plan == parallel.tensor_plan(c, 2)  # the worked solution is labkit's linear_slices
    reversed_ranks = plan[::-1]  # a valid plan too: rank 0 now computes the second half of every layer
    out = parallel.launch(parallel.tensor_parallel_forward, 2, folder, ids, 0, reversed_ranks, timeout=120)
    assert (out["logits"] - logits).abs().max() < TP_ATOL
    layer = models.load("tiny-llama-random")[0]
    parallel.tensor_parallel(layer, 0, 2, plan=reversed_ranks)
    q = layer.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q, model.model.layers[0].self_attn.q_proj.weight[32:])  # the plan's rows, not labkit's


def _plan_with(c, **changes):
    plan = parallel.tensor_plan(c, 2)
    for rank, entry in enumerate(plan):
        for name, value in changes.items():
            entry[name] = value(*entry[name], rank)
    return plan


def test_bad_plans_are_refused_before_any_rank_starts(setup):
    model = setup[0]
    c = model.config
    bad = {
        "splits self_attn.o_proj along dim 0; it is row-parallel": {"self_attn.o_proj": lambda d, a, b, r: (0, a, b)},
        "runs past its": {"self_attn.k_proj": lambda d, a, b, r: (0, 32 * r, 32 * r + 32)},
        "do not cover": {"mlp.up_proj": lambda d, a, b, r: (0, 0, b - a)},
        "whole heads": {  # 1.5 query heads each: the cover is fine, the heads are cut
            name: (lambda d, a, b, r: (d, 0, 24) if r == 0 else (d, 24, 64))
            for name in ("self_attn.q_proj", "self_attn.o_proj")
        },
    }
    for words, changes in bad.items():
        with pytest.raises(ValueError, match=words):
            parallel.tensor_plan(c, 2, lambda config, rank, world, ch=changes: _plan_with(config, **ch)[rank])
    with pytest.raises(ValueError, match="it must be a dict with the keys"):
        parallel.tensor_plan(c, 2, lambda config, rank, world: None)
    with pytest.raises(ValueError, match="three ints"):
        parallel.tensor_plan(c, 2, lambda config, rank, world: {k: 1 for k in parallel.linear_slices(c, 0, 2)})
    with pytest.raises(ValueError, match="pass a function slices"):
        parallel.tensor_plan(c, 2, "labkit")
    with pytest.raises(ValueError, match="plan must be a list of 2"):
        parallel.layer_slices(c, 0, 2, plan=[{}])


def test_pipeline_parallel_equals_single_process(setup):
    _, _, ids, logits, folder = setup
    ranks = parallel.launch(
        parallel.pipeline_forward, 2, folder, ids, (1, 2, 4), None, False, return_all=True, timeout=120
    )
    assert [r["layers"] for r in ranks] == [[0], [1]]
    assert ranks[0]["logits"] == {}  # only the last stage has the output layer
    for m in (1, 2, 4):
        assert (ranks[1]["logits"][m] - logits).abs().max() < PP_ATOL
        assert [e[0] for e in ranks[0]["events"][m]] == list(range(m))
        sends = ranks[0]["comm"][m]["send"]  # one [b_i, seq, hidden] send per micro-batch
        assert sends["calls"] == m and sends["bytes"] == ids.numel() * 64 * 4
        assert 0 <= parallel.measured_bubble([r["events"][m] for r in ranks]) < 1


def test_in_memory_sharding_keeps_the_right_slices():
    model = models.load("tiny-llama-random")[0]
    original = {k: v.clone() for k, v in model.model.layers[0].state_dict().items()}
    parallel.tensor_parallel(model, 1, 2)  # rank 1 of 2: query heads 2, 3 (16 features each), KV head 1
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.q_proj, parallel.ColumnParallelLinear) and isinstance(
        mlp.down_proj, parallel.RowParallelLinear
    )
    assert torch.equal(attn.q_proj.weight, original["self_attn.q_proj.weight"][32:64])
    assert torch.equal(attn.k_proj.weight, original["self_attn.k_proj.weight"][16:32])
    assert torch.equal(attn.o_proj.weight, original["self_attn.o_proj.weight"][:, 32:64])
    assert torch.equal(mlp.up_proj.weight, original["mlp.up_proj.weight"][80:160])
    assert torch.equal(mlp.down_proj.weight, original["mlp.down_proj.weight"][:, 80:160])
    assert attn.num_key_value_groups == 2  # 2 query heads per KV head on each rank, as in the whole model


def test_bubble_formula_and_splits():
    assert parallel.bubble_fraction(4, 1) == pytest.approx(0.75)
    assert parallel.bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert parallel.bubble_fraction(1, 5) == 0
    # A fake timeline, one time unit per stage: GPipe with p=3, m=2 spans m + p - 1 = 4 units.
    events = [[(i, r + i, r + i + 1.0) for i in range(2)] for r in range(3)]
    assert parallel.measured_bubble(events) == pytest.approx(parallel.bubble_fraction(3, 2))
    assert parallel.split_layers(30, 3) == [range(0, 10), range(10, 20), range(20, 30)]
    assert parallel.split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert parallel.split_layers(5, 2, [1, 4]) == [range(0, 1), range(1, 5)]
    config = models.load("tiny-llama-random")[0].config
    sizes = parallel.balanced_sizes(config, 2)
    assert sum(sizes) == 2 and min(sizes) >= 1


def test_offloaded_generation_equals_resident(setup, tmp_path):
    model, tokenizer, _, _, folder = setup
    ids = tokenizer("Offloading moves layers", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for where, prefetch in [(None, True), (tmp_path / "off", True), (tmp_path / "off2", False)]:
        m = models.load("tiny-llama-random", device="cpu")[0]
        parallel.offload(m, where, prefetch=prefetch)
        try:
            assert torch.equal(m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), expected)
            assert all(isinstance(layer, parallel.OffloadedLayer) for layer in m.model.layers)
            # Only the embedding (tied to the output layer) and the final norm stay resident.
            assert sum(p.numel() for p in m.parameters()) == 256 * 64 + 64
            assert m.offload_prefetcher.loads >= 8 * 2  # every step loads every layer
            layer_bytes = sum(t.numel() * 4 for t in model.model.layers[0].state_dict().values())
            assert m.offload_prefetcher.peak_bytes_in_flight == (2 if prefetch else 1) * layer_bytes
        finally:
            m.offload_prefetcher.close()
    m = parallel.load_offloaded(folder)
    try:
        assert torch.equal(m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), expected)
    finally:
        m.offload_prefetcher.close()
    with pytest.raises(ValueError, match="already offloaded"):
        parallel.offload(m)


def test_bad_inputs(setup, tmp_path):
    model, _, _, _, _ = setup
    with pytest.raises(ValueError, match=r"world_size=3.*allowed world sizes for this model: \[1, 2\]"):
        parallel.check_world_size(model.config, 3)
    with pytest.raises(ValueError, match=r"world_size=3 > 2 decoder layers.*ranks \[2\] would be empty"):
        parallel.split_layers(2, 3)
    with pytest.raises(ValueError, match=r"leaves rank\(s\) \[1\] without a layer"):
        parallel.split_layers(2, 2, [2, 0])
    with pytest.raises(ValueError, match="sums to 3"):
        parallel.split_layers(2, 2, [1, 2])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="is not a writable folder"):
        parallel.offload(models.load("tiny-llama-random")[0], blocker / "offload")
    with pytest.raises(ValueError, match=r"has no config\.json"):
        parallel.load_offloaded(tmp_path)
    with pytest.raises(ValueError, match="world_size=0"):
        parallel.launch(_ok, 0)
    with pytest.raises(ValueError, match="backend='mpi'"):
        parallel.launch(_ok, 1, backend="mpi")
    with pytest.raises(ValueError, match="not a lambda, a nested function or a notebook cell"):
        parallel.launch(lambda rank, world: rank, 2)


def test_truncated_file(setup, tmp_path):
    model = setup[0]
    folder = parallel.write_folder(model, tmp_path / "copy")
    path = folder / "layer_001.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    for call in (
        lambda: parallel.check_folder(folder),
        lambda: parallel.load_offloaded(folder),
        lambda: parallel.load_folder(folder),
    ):
        with pytest.raises(ValueError, match=r"layer_001.safetensors is truncated or damaged"):
            call()
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        parallel.check_file(path)


# --- the launcher: failures are reported by rank, and nothing is left running -------------------


def _ok(rank, world_size):
    return {"rank": rank, "t": torch.arange(3)}


def _fail_on_rank_1(rank, world_size):
    import torch.distributed as dist

    if rank == 1:
        raise ArithmeticError("rank 1 cannot divide")
    dist.barrier()  # rank 0 waits in a collective that rank 1 never enters


def _die_on_rank_1(rank, world_size):
    if rank == 1:
        os._exit(3)
    time.sleep(30)


def _hang(rank, world_size):
    time.sleep(30 if rank == 1 else 0)


def _rank_processes():
    return [p for p in multiprocessing.active_children() if p.name.startswith("labkit-rank-")]


def test_launcher_reports_the_failing_rank():
    out = parallel.launch(_ok, 2)
    assert out["rank"] == 0 and torch.equal(out["t"], torch.arange(3))
    assert [r["rank"] for r in parallel.launch(_ok, 2, return_all=True)] == [0, 1]
    start = time.monotonic()
    with pytest.raises(
        parallel.RankFailed, match=r"rank 1 of 2 failed:(.|\n)*ArithmeticError: rank 1 cannot divide"
    ) as err:
        parallel.launch(_fail_on_rank_1, 2, timeout=60)
    assert err.value.rank == 1 and time.monotonic() - start < 30  # not the collective's timeout
    with pytest.raises(parallel.RankFailed, match="rank 1 of 2 exited with code 3 without reporting") as err:
        parallel.launch(_die_on_rank_1, 2, timeout=60)
    assert err.value.rank == 1
    with pytest.raises(parallel.RankFailed, match=r"timed out after 3 s: rank\(s\) \[1\] of 2"):
        parallel.launch(_hang, 2, timeout=3)
    assert _rank_processes() == []  # every rank was stopped and reaped
