"""Checks for lesson 11 (parallelism and offloading): the tensor-parallel slices of a decoder layer (the
lesson's "build it": the three ranks of section 4 load the slices your function gives), the pipeline
bubble, the bytes a ring all-reduce sends.

    check.lesson11.linear_slices(my_linear_slices)
    check.lesson11.bubble_fraction(my_bubble_fraction)
    check.lesson11.ring_bytes_per_token(my_ring_bytes_per_token)
"""

from __future__ import annotations

from . import Verdict, as_number, call, exercise, number_like


@exercise
def bubble_fraction(fn) -> bool:
    """fn(p, m) -> the idle share of a GPipe forward pass with p stages and m micro-batches."""
    v = Verdict("bubble_fraction")
    for p, m in [(4, 1), (3, 4), (2, 8), (8, 32), (1, 5)]:
        got = call(v, fn, p, m)
        if v.problem:
            break
        expected = (p - 1) / (m + p - 1)
        wrong = {
            "you computed (p - 1) / m, the bubble relative to the busy time (Narayanan et al.'s 'bubble time "
            "fraction'); here it is the share of the total time": (p - 1) / m,
            "you computed the busy share m / (m + p - 1); the bubble is the rest": m / (m + p - 1),
            "you computed p / (m + p); the pipeline takes m + p - 1 time slots, and each rank idles in p - 1 of them": p
            / (m + p),
        }
        value = as_number(got)
        if value is not None and abs(value - expected) > 1e-9:
            for hint, w in wrong.items():
                if abs(value - w) < 1e-9:
                    v.fail(f"for p={p}, m={m} you returned {value:.4g}: {hint}.")
                    break
        if not number_like(v, got, expected, f"the bubble for p={p} stages, m={m} micro-batches", rtol=1e-9):
            break
    return v.report("(p - 1) / (m + p - 1): more micro-batches, smaller bubble.")


_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def _expected_slices(config, rank: int, world: int) -> dict[str, tuple[int, int, int]]:
    d = config.hidden_size // config.num_attention_heads
    width = {"q": config.num_attention_heads * d // world, "kv": config.num_key_value_heads * d // world}
    width["mlp"] = config.intermediate_size // world
    kind = {"self_attn.q_proj": "q", "self_attn.o_proj": "q", "self_attn.k_proj": "kv", "self_attn.v_proj": "kv"}
    return {
        name: (
            1 if name in _ROW_PARALLEL else 0,
            rank * width[kind.get(name, "mlp")],
            (rank + 1) * width[kind.get(name, "mlp")],
        )
        for name in _LINEARS
    }


def _slice_hint(config, name: str, got: tuple, expected: tuple, rank: int, world: int) -> str:
    """Why one (dim, start, stop) differs from the right one, in words."""
    d = config.hidden_size // config.num_attention_heads
    dim, start, stop = got
    if dim != expected[0]:
        if name in _ROW_PARALLEL:
            return (
                f"{name} is row-parallel: it splits its input features, the columns of its [out, in] weight (dim 1), "
                f"so that each rank multiplies only the features it computed; the all-reduce then sums the outputs."
            )
        return (
            f"{name} is column-parallel: it splits its output features, the rows of its [out, in] weight (dim 0), "
            f"and every rank reads the whole input."
        )
    width = stop - start
    q_width = config.num_attention_heads * d // world
    kv_width = config.num_key_value_heads * d // world
    if name in ("self_attn.k_proj", "self_attn.v_proj") and width == q_width != kv_width:
        return (
            f"{name} holds the KV heads: a rank keeps num_kv_heads · head_dim / W = {kv_width} rows, the KV heads its "
            f"query heads read, not num_heads · head_dim / W = {q_width}."
        )
    if name.startswith("mlp.") and width == config.hidden_size // world != config.intermediate_size // world:
        return f"the MLP is split along its {config.intermediate_size} intermediate features, not the hidden size."
    if width == expected[2] - expected[1] and start == (world - 1 - rank) * width:
        return "the ranks are in reverse order: rank r keeps the r-th block, [r · width, (r + 1) · width)."
    if width == expected[2] - expected[1]:
        return f"the block has the right width {width} but starts at {start}: rank r's block starts at r · width."
    return f"rank {rank} of {world} should keep {expected[1:]} along dim {expected[0]}."


@exercise
def linear_slices(fn) -> bool:
    """fn(config, rank, world_size) -> {linear name: (dim, start, stop)} for the seven linears of a decoder
    layer ("self_attn.q_proj", ..., "mlp.down_proj"): the part of each weight [out, in] rank `rank` keeps.
    Column-parallel q, k, v, gate, up keep a block of rows (dim 0), row-parallel o and down a block of
    columns (dim 1); rank r keeps the r-th of world_size equal, contiguous blocks of whole heads (k and v:
    the KV heads its query heads read) or MLP features."""
    from transformers import LlamaConfig

    v = Verdict("linear_slices")
    cases = [
        (LlamaConfig(hidden_size=36, intermediate_size=24, num_attention_heads=9, num_key_value_heads=3), 3),
        (LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=4, num_key_value_heads=4), 2),
        (LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=8, num_key_value_heads=2), 2),
        (LlamaConfig(hidden_size=36, intermediate_size=24, num_attention_heads=9, num_key_value_heads=3), 1),
    ]
    for config, world in cases:
        shape = (
            f"{config.num_attention_heads} query heads, {config.num_key_value_heads} KV heads of "
            f"{config.hidden_size // config.num_attention_heads}, MLP {config.intermediate_size}, W = {world}"
        )
        for rank in range(world):
            got = call(v, fn, config, rank, world)
            if v.problem is not None:
                return v.report()
            if not isinstance(got, dict):
                v.fail(f"return a dict {{linear name: (dim, start, stop)}}; got {type(got).__name__}.")
                return v.report()
            missing, extra = set(_LINEARS) - set(got), set(got) - set(_LINEARS)
            if missing or extra:
                v.fail(
                    f"the dict's keys should be the seven linears {list(_LINEARS)}"
                    + (f"; missing {sorted(missing)}" if missing else "")
                    + (f"; unexpected {sorted(extra)}" if extra else "")
                    + "."
                )
                return v.report()
            expected = _expected_slices(config, rank, world)
            for name in _LINEARS:
                value = got[name]
                try:
                    value = tuple(int(x) for x in value)
                except (TypeError, ValueError):
                    value = None
                if value is None or len(value) != 3:
                    v.fail(f"{name}: give a tuple (dim, start, stop) of three ints; got {got[name]!r}.")
                    return v.report()
                if value != expected[name]:
                    v.fail(
                        f"{shape}, rank {rank}, {name}: you gave {value}, expected {expected[name]}. "
                        + _slice_hint(config, name, value, expected[name], rank, world)
                    )
                    return v.report()
    return v.report(
        "Rows of q/k/v/gate/up, columns of o/down, whole heads with their KV heads: one all-reduce per block."
    )


@exercise
def ring_bytes_per_token(fn) -> bool:
    """fn(hidden, layers, dtype_bytes, world_size) -> bytes each rank sends per token in the forward
    pass of a tensor-parallel Llama, with ring all-reduces."""
    v = Verdict("ring_bytes_per_token")
    for hidden, layers, nbytes, world in [(4096, 32, 2, 4), (576, 30, 4, 3), (8192, 80, 2, 8)]:
        got = call(v, fn, hidden, layers, nbytes, world)
        if v.problem:
            break
        payload = 2 * layers * hidden * nbytes
        expected = 2 * (world - 1) / world * payload
        wrong = {
            "are off by a factor of 2: count two all-reduces per layer (after attention's o_proj and after "
            "the MLP's down_proj), and 2 (W - 1) / W of the payload per all-reduce (a reduce-scatter plus an "
            "all-gather)": expected / 2,
            "returned the payload (the bytes summed), not what a ring sends: 2 (W - 1) / W times the payload": payload,
            "multiplied by the world size: count what one rank sends": expected * world,
        }
        value = as_number(got)
        if value is not None and abs(value - expected) > 1e-6 * expected:
            for hint, w in wrong.items():
                if abs(value - w) < 1e-6 * w:
                    v.fail(
                        f"for hidden={hidden}, layers={layers}, {nbytes}-byte values, W={world} you returned "
                        f"{value:,.0f}; you {hint}."
                    )
                    break
        if not number_like(
            v, got, expected, f"the bytes per token for hidden={hidden}, layers={layers}, W={world}", rtol=1e-6
        ):
            break
    return v.report("2 all-reduces x layers x hidden x bytes, times 2 (W - 1) / W on a ring.")
