"""Tensor parallelism, Megatron style (Shoeybi et al., 2019, "Megatron-LM", §3 and Fig. 3).

Every decoder layer is a pair of blocks, attention and MLP, each "linear in, linear out":

    MLP:        y = down( silu(gate(x)) * up(x) )
    attention:  y = o( concat_h attention_h(q_h(x), k_g(h)(x), v_g(h)(x)) )

Split the first linears of a block by *output* columns (column-parallel: rank r computes its own
slice of gate/up, or its own heads of q/k/v, from the full input x, with no communication) and
the last linear by *input* rows (row-parallel: rank r multiplies its slice of the hidden features
by its rows of `down` or `o`, giving a partial sum of the full output). The element-wise SwiGLU
and the per-head attention need nothing from other ranks in between. One all-reduce (a sum over
ranks) per block completes the output: two per layer in the forward pass, each of
[tokens, hidden] values.

Grouped-query attention: query head h reads KV head h // (Hq / Hkv). Giving rank r the query
heads [r Hq/W, (r+1) Hq/W) and the KV heads [r Hkv/W, (r+1) Hkv/W) keeps every query head on the
rank of its KV head, which needs W to divide the number of KV heads (and the MLP width).
Embedding, norms and output layer are replicated on every rank here (Megatron also splits the
vocabulary; that saves memory, not communication, for a model this size).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

from ..models import check_llama, head_dim, set_module
from . import store
from .comm import CommLog, all_reduce

# Which linears of a decoder layer are split how: "column" = by output features (rows of the
# [out, in] weight), "row" = by input features (columns of the weight) followed by an all-reduce.
PLAN = {
    "self_attn.q_proj": "column",
    "self_attn.k_proj": "column",
    "self_attn.v_proj": "column",
    "self_attn.o_proj": "row",
    "mlp.gate_proj": "column",
    "mlp.up_proj": "column",
    "mlp.down_proj": "row",
}


class ColumnParallelLinear(nn.Module):
    """Rank r's output columns of y = x Wᵀ + b: weight [out / W, in]. No communication
    (Megatron's f: identity in the forward pass, an all-reduce only in training's backward)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out / W, in]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # [out / W]

    def forward(self, x):  # x: [..., in] -> [..., out / W]
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in={self.weight.shape[1]}, out per rank={self.weight.shape[0]}"


class RowParallelLinear(nn.Module):
    """y = Σ_r x_r W_rᵀ + b: rank r holds weight [out, in / W] for its slice x_r of the input; the
    partial products are summed over ranks by one all-reduce (Megatron's g). The bias, if any, is
    added once, after the sum."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, log: CommLog | None = None, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in / W]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # [out], replicated
        self.log, self.group = log, group

    def forward(self, x):  # x: [..., in / W] -> [..., out], identical on every rank
        y = F.linear(x, self.weight)
        all_reduce(y, self.log, self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in per rank={self.weight.shape[1]}, out={self.weight.shape[0]}"


def allowed_world_sizes(config) -> list[int]:
    """World sizes that split the KV heads, the query heads and the MLP width evenly."""
    hq, hkv, mlp = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    return [w for w in range(1, hkv + 1) if hkv % w == 0 and hq % w == 0 and mlp % w == 0]


def check_world_size(config, world_size: int) -> None:
    allowed = allowed_world_sizes(config)
    if world_size not in allowed:
        raise ValueError(
            f"world_size={world_size}: tensor parallelism gives each rank whole KV heads with their query "
            f"heads, so it must divide the {config.num_key_value_heads} KV heads, the "
            f"{config.num_attention_heads} query heads and the MLP width {config.intermediate_size}; "
            f"allowed world sizes for this model: {allowed}. (Beyond the KV heads, Megatron-LM and vLLM "
            f"replicate each KV head on several ranks; not done here.)"
        )


def heads_of(config, rank: int, world_size: int) -> dict[str, range]:
    """The query and KV heads rank `rank` computes."""
    check_world_size(config, world_size)
    q, kv = config.num_attention_heads // world_size, config.num_key_value_heads // world_size
    return {"query": range(rank * q, (rank + 1) * q), "kv": range(rank * kv, (rank + 1) * kv)}


def linear_slices(config, rank: int, world_size: int) -> dict[str, tuple[int, int, int]]:
    """{linear name in a decoder layer: (dim, start, stop)}: the part of each weight [out, in] rank `rank`
    keeps. Column-parallel linears (q, k, v, gate, up) keep rows (dim 0), row-parallel ones (o, down)
    columns (dim 1); every split is a contiguous block of whole heads or MLP features, the same block
    for the linears that meet (q rows = o columns, k rows = v rows, gate rows = up rows = down columns)."""
    check_world_size(config, world_size)
    d = head_dim(config)
    width = {  # features per rank along the split dimension
        "self_attn.q_proj": config.num_attention_heads * d // world_size,
        "self_attn.k_proj": config.num_key_value_heads * d // world_size,
        "self_attn.v_proj": config.num_key_value_heads * d // world_size,
        "self_attn.o_proj": config.num_attention_heads * d // world_size,
        "mlp.gate_proj": config.intermediate_size // world_size,
        "mlp.up_proj": config.intermediate_size // world_size,
        "mlp.down_proj": config.intermediate_size // world_size,
    }
    return {
        name: (0 if kind == "column" else 1, rank * width[name], (rank + 1) * width[name])
        for name, kind in PLAN.items()
    }


def _weight_shapes(config) -> dict[str, tuple[int, int]]:
    d = head_dim(config)
    hidden, q, kv, mlp = (
        config.hidden_size,
        config.num_attention_heads * d,
        config.num_key_value_heads * d,
        config.intermediate_size,
    )
    return {
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (mlp, hidden),
        "mlp.up_proj": (mlp, hidden),
        "mlp.down_proj": (hidden, mlp),
    }


def tensor_plan(config, world_size: int, slices=linear_slices) -> list[dict[str, tuple[int, int, int]]]:
    """Every rank's slices, [slices(config, r, world_size) for r in range(world_size)], checked: each rank
    names the seven linears, splits column-parallel ones by rows and row-parallel ones by columns, the
    ranks together cover every weight exactly once, and every rank's query heads read only its own KV
    heads. slices: labkit's linear_slices (default) or your own function of its signature (lesson 11's
    "build it"); a plan that breaks a rule raises ValueError naming it, before any rank starts.
    The plan is plain data, so it crosses to the ranks: tensor_parallel_forward(..., plan=plan)."""
    check_world_size(config, world_size)
    if not callable(slices):
        raise ValueError(
            f"slices={slices!r}: pass a function slices(config, rank, world_size) -> {{linear: (dim, start, stop)}}."
        )
    plan = [_checked_entry(slices(config, rank, world_size), rank, "slices returned") for rank in range(world_size)]
    check_plan(config, world_size, plan)
    return plan


def _checked_entry(got, rank: int, who: str) -> dict[str, tuple[int, int, int]]:
    """One rank's {linear: (dim, start, stop)}, as tuples of ints, or ValueError."""
    if not isinstance(got, dict) or set(got) != set(PLAN):
        names = sorted(got) if isinstance(got, dict) else type(got).__name__
        raise ValueError(f"{who} {names} for rank {rank}; it must be a dict with the keys {sorted(PLAN)}.")
    entry = {}
    for name, value in got.items():
        is_ints = isinstance(value, (tuple, list)) and len(value) == 3
        if not (is_ints and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise ValueError(f"{who} {value!r} for rank {rank}, {name}; it must be three ints (dim, start, stop).")
        entry[name] = tuple(value)
    return entry


def check_plan(config, world_size: int, plan) -> None:
    """The rules of tensor_plan for a plan given as data (e.g. in a rank); ValueError naming the broken one."""
    if not isinstance(plan, (list, tuple)) or len(plan) != world_size:
        raise ValueError(f"plan must be a list of {world_size} dicts, one per rank (labkit.parallel.tensor_plan).")
    plan = [_checked_entry(entry, rank, "plan holds") for rank, entry in enumerate(plan)]
    shapes = _weight_shapes(config)
    d = head_dim(config)
    group = config.num_attention_heads // config.num_key_value_heads
    for name, kind in PLAN.items():
        dim = 0 if kind == "column" else 1
        size = shapes[name][dim]
        parts = sorted((plan[r][name][1], plan[r][name][2], r) for r in range(world_size))
        for rank in range(world_size):
            if plan[rank][name][0] != dim:
                raise ValueError(
                    f"plan: rank {rank} splits {name} along dim {plan[rank][name][0]}; it is {kind}-parallel, so it "
                    f"splits dim {dim} ({'output features, rows' if dim == 0 else 'input features, columns'} "
                    f"of [out, in])."
                )
        covered = 0
        for start, stop, rank in parts:
            if stop > size:
                raise ValueError(
                    f"plan: rank {rank}'s slice [{start}, {stop}) of {name} runs past its {size} features."
                )
            if start != covered or stop <= start:
                raise ValueError(
                    f"plan: {name}'s slices do not cover its {size} features once each: rank {rank} has "
                    f"[{start}, {stop}) after [0, {covered}) was covered."
                )
            covered = stop
        if covered != size:
            raise ValueError(f"plan: {name}'s slices cover [0, {covered}) of its {size} features.")
    for rank, entry in enumerate(plan):
        same = [
            ("self_attn.q_proj", "self_attn.o_proj"),
            ("self_attn.k_proj", "self_attn.v_proj"),
            ("mlp.gate_proj", "mlp.up_proj"),
            ("mlp.gate_proj", "mlp.down_proj"),
        ]
        for a, b in same:
            if entry[a][1:] != entry[b][1:]:
                raise ValueError(
                    f"plan: rank {rank} keeps features {entry[a][1:]} of {a} but {entry[b][1:]} of {b}; "
                    f"they must match."
                )
        q0, q1 = entry["self_attn.q_proj"][1:]
        k0, k1 = entry["self_attn.k_proj"][1:]
        if q0 % d or q1 % d or k0 % d or k1 % d or (q0 // d) != group * (k0 // d) or (q1 // d) != group * (k1 // d):
            raise ValueError(
                f"plan: rank {rank} keeps q_proj rows [{q0}, {q1}) and k_proj rows [{k0}, {k1}): a rank needs whole "
                f"heads of {d} and exactly the KV heads its query heads read (query head h reads KV head h // {group})."
            )


def layer_slices(config, rank: int, world_size: int, plan=None) -> dict[str, tuple[int, int, int]]:
    """{tensor name in a decoder layer: (dim, start, stop)}: what rank `rank` keeps of each split tensor,
    from `plan` (tensor_plan) or labkit's linear_slices; column-parallel biases follow their rows."""
    check_world_size(config, world_size)
    if plan is not None:
        check_plan(config, world_size, plan)
    linears = linear_slices(config, rank, world_size) if plan is None else plan[rank]
    out = {}
    for name, kind in PLAN.items():
        out[f"{name}.weight"] = linears[name]
        if kind == "column":  # bias [out]: the same entries; a row-parallel bias stays whole
            out[f"{name}.bias"] = linears[name]
    return out


def _slice(t: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    return t.narrow(dim, start, stop - start).clone()  # clone: the full tensor can then be freed


def _install(layer: nn.Module, tensors: dict[str, torch.Tensor], log, group) -> None:
    """Replace the layer's linears by parallel ones made from `tensors` (already this rank's slices)."""
    for name, kind in PLAN.items():
        weight, bias = tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.bias", None)
        module = ColumnParallelLinear(weight, bias) if kind == "column" else RowParallelLinear(weight, bias, log, group)
        set_module(layer, name, module)
    unknown = set(tensors) - set(layer.state_dict())
    if unknown:
        raise ValueError(f"unexpected tensors in a decoder layer: {sorted(unknown)}")
    layer.load_state_dict(tensors, strict=False, assign=True)  # the two RMSNorm weights, whole


def tensor_parallel(model, rank: int, world_size: int, log: CommLog | None = None, group=None, plan=None):
    """Turn a whole in-memory Llama into rank `rank`'s tensor-parallel part, in place; returns it.
    Call it in every rank of an initialised process group (labkit.parallel.launch). plan: tensor_plan's
    list (default: labkit's linear_slices)."""
    check_llama(model, "labkit.parallel.tensor_parallel")
    check_world_size(model.config, world_size)
    slices = layer_slices(model.config, rank, world_size, plan)
    for layer in model.model.layers:
        tensors = {k: (_slice(v, *slices[k]) if k in slices else v) for k, v in layer.state_dict().items()}
        _install(layer, tensors, log, group)
    return model


def load_tensor_parallel(
    folder, rank: int, world_size: int, device="cpu", log: CommLog | None = None, group=None, plan=None
):
    """Rank `rank`'s tensor-parallel model, reading only its slices of each layer from `folder`
    (labkit.parallel.write_folder): the whole model is never in this rank's memory. plan: tensor_plan's
    list (default: labkit's linear_slices)."""
    store.check_folder(folder)
    config = store.read_config(folder)
    check_world_size(config, world_size)
    model = store.skeleton(config)
    store.load_rest(model, folder, device)
    slices = layer_slices(config, rank, world_size, plan)
    for index, layer in enumerate(model.model.layers):
        _install(layer, store.read_tensors(store.layer_file(folder, index), device, slices), log, group)
    return model.to(device)


def comm_per_token(config, dtype_bytes: int, world_size: int) -> dict[str, float]:
    """What the forward pass sends, per token, by the formula: two all-reduces of `hidden` values per
    layer. payload = bytes summed per all-reduce call; ring = bytes each rank sends (ring algorithm)."""
    payload = 2 * config.num_hidden_layers * config.hidden_size * dtype_bytes
    return {
        "all_reduces_per_layer": 2,
        "payload_bytes": payload,
        "ring_bytes_per_rank": 2 * (world_size - 1) / world_size * payload,
    }


# --- what a rank runs (labkit.parallel.launch calls these in every rank) -----------------------


def rank_device(rank: int) -> torch.device:
    import torch.distributed as dist

    return torch.device(f"cuda:{rank}" if dist.get_backend() == "nccl" else "cpu")


@torch.no_grad()
def tensor_parallel_forward(
    rank: int, world_size: int, folder, ids: torch.Tensor, new_tokens: int = 0, plan=None
) -> dict:
    """Load this rank's slices (of `plan`, tensor_parallel's list, or labkit's), run the forward pass on
    ids [batch, seq], optionally generate greedily.

    Returns (rank 0's copy): logits [batch, seq, vocab], the all-reduce log of the forward pass,
    this rank's weight bytes, the forward's seconds, and the generated ids if new_tokens > 0."""
    device = rank_device(rank)
    log = CommLog()
    model = load_tensor_parallel(folder, rank, world_size, device, log, plan=plan)
    ids = ids.to(device)
    start = time.perf_counter()
    logits = model(ids, use_cache=False).logits
    seconds = time.perf_counter() - start
    out = {
        "logits": logits,
        "comm": log.summary(),
        "tokens": ids.numel(),
        "seconds": seconds,
        "layer_weight_bytes": sum(p.numel() * p.element_size() for p in model.model.layers.parameters()),
        "heads": {k: list(v) for k, v in heads_of(model.config, rank, world_size).items()},
    }
    if new_tokens:
        out["generated"] = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id or 0,
        )
    return out
