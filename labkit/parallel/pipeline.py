"""Pipeline parallelism with the GPipe schedule (Huang et al., 2019, "GPipe", §2.2).

The decoder layers are cut into p consecutive *stages*, one per rank: rank 0 also embeds the
tokens, the last rank also applies the final norm and the output layer. A batch is split into m
*micro-batches*; rank r runs micro-batch i as soon as rank r-1 has sent it, then sends its output
(the hidden states, [b, seq, hidden]) to rank r+1. With equal stage times t, the forward pass
takes (m + p - 1) t, during which each rank is busy m t, so the fraction of rank-time spent idle,
the *bubble*, is

    bubble = (p - 1) / (m + p - 1)                                  (GPipe §2.2: O((K-1)/(M+K-1)))

More micro-batches shrink it; every micro-batch boundary costs one send of b · seq · hidden values
per stage boundary, and smaller micro-batches make each matrix product less efficient.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..models import head_dim
from . import store
from .comm import CommLog, recv, send
from .tensor import rank_device


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """(p - 1) / (m + p - 1): the idle share of p ranks' time in a GPipe forward pass."""
    if stages < 1 or micro_batches < 1:
        raise ValueError(f"stages={stages}, micro_batches={micro_batches}: both must be >= 1.")
    return (stages - 1) / (micro_batches + stages - 1)


def split_layers(num_layers: int, world_size: int, sizes: list[int] | None = None) -> list[range]:
    """The layers of each stage: `sizes` layers per rank (must sum to num_layers), or as even as
    possible (the first num_layers % world_size ranks get one more)."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: need at least 1 rank.")
    if sizes is None:
        if world_size > num_layers:
            raise ValueError(
                f"world_size={world_size} > {num_layers} decoder layers: a pipeline stage needs at "
                f"least one layer, so ranks {list(range(num_layers, world_size))} would be empty. "
                f"Use at most {num_layers} ranks."
            )
        base, extra = divmod(num_layers, world_size)
        sizes = [base + (r < extra) for r in range(world_size)]
    sizes = list(sizes)
    if len(sizes) != world_size:
        raise ValueError(f"sizes={sizes} has {len(sizes)} entries for world_size={world_size}: give one per rank.")
    empty = [r for r, s in enumerate(sizes) if s < 1]
    if empty:
        raise ValueError(f"sizes={sizes} leaves rank(s) {empty} without a layer: every stage needs at least one.")
    if sum(sizes) != num_layers:
        raise ValueError(f"sizes={sizes} sums to {sum(sizes)}; the model has {num_layers} decoder layers.")
    starts = [sum(sizes[:r]) for r in range(world_size)]
    return [range(s, s + n) for s, n in zip(starts, sizes)]


def layer_macs(config) -> int:
    """Multiply-adds per token of one decoder layer's linears (attention's score part left out)."""
    d = head_dim(config)
    h = config.hidden_size
    attention = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)  # q, o; k, v
    return attention + 3 * h * config.intermediate_size  # gate, up, down


def balanced_sizes(config, world_size: int) -> list[int]:
    """Layers per stage so that every stage does about the same multiply-adds per token, counting the
    output layer (hidden x vocab) in the last stage: for a small model with a large vocabulary the
    output layer alone weighs several decoder layers."""
    n, head = config.num_hidden_layers, config.hidden_size * config.vocab_size / layer_macs(config)
    split_layers(n, world_size)  # the even-split errors (too many ranks) first
    total = n + head
    sizes, left = [], n
    for r in range(world_size - 1):
        want = round((r + 1) * total / world_size) - sum(sizes)
        take = max(1, min(want, left - (world_size - 1 - r)))  # leave at least one layer per later stage
        sizes.append(take)
        left -= take
    return [*sizes, left]


def load_stage(folder, rank: int, world_size: int, sizes=None, device="cpu"):
    """Rank `rank`'s stage read from `folder`: (model skeleton holding only what this stage runs,
    its layer indices). The other layers stay on the meta device (no memory)."""
    store.check_folder(folder)
    config = store.read_config(folder)
    stages = split_layers(config.num_hidden_layers, world_size, sizes)
    model = store.skeleton(config)
    if rank in (0, world_size - 1):  # embedding; final norm and output layer
        store.load_rest(model, folder, device)
    for index in stages[rank]:
        model.model.layers[index].load_state_dict(
            store.read_tensors(store.layer_file(folder, index), device), assign=True
        )
    model.model.rotary_emb.to(device)
    return model, stages[rank]


def run_layers(model, layers, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [b, seq, hidden] through decoder layers `layers` (indices), as LlamaModel.forward runs them."""
    from transformers.masking_utils import create_causal_mask

    position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]  # [1, seq]
    position_embeddings = model.model.rotary_emb(hidden, position_ids)  # (cos, sin)
    mask = create_causal_mask(
        config=model.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids
    )
    for index in layers:
        hidden = model.model.layers[index](
            hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings
        )
    return hidden


@torch.no_grad()
def gpipe_forward(model, layers, ids: torch.Tensor, micro_batches: int, log: CommLog | None = None):
    """One GPipe forward pass in this rank. ids: [batch, seq] (the same on every rank).

    Returns (logits [batch, seq, vocab] on the last rank, else None; events), events being
    (micro-batch, start, end) of this rank's compute, in time.perf_counter() seconds (one clock for
    all processes of a machine)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if not 1 <= micro_batches <= ids.shape[0]:
        raise ValueError(f"micro_batches={micro_batches}: need 1 <= micro_batches <= batch size {ids.shape[0]}.")
    hidden_size, dtype = model.config.hidden_size, model.model.norm.weight.dtype
    events, logits = [], []
    for i, chunk in enumerate(torch.tensor_split(ids, micro_batches)):  # chunk: [b_i, seq]
        if rank == 0:
            start = time.perf_counter()
            hidden = model.model.embed_tokens(chunk)
        else:
            hidden = torch.empty(*chunk.shape, hidden_size, dtype=dtype, device=ids.device)
            recv(hidden, rank - 1, log)  # waits for the previous stage: this wait is the bubble
            start = time.perf_counter()
        hidden = run_layers(model, layers, hidden)
        if rank == world - 1:
            logits.append(model.lm_head(model.model.norm(hidden)))
        events.append((i, start, time.perf_counter()))
        if rank < world - 1:
            send(hidden, rank + 1, log)
    return (torch.cat(logits) if logits else None), events


def measured_bubble(events_per_rank: list[list[tuple[int, float, float]]]) -> float:
    """1 - (busy rank-time) / (p x span): span from the first rank's first start to the last end."""
    starts = [e[1] for events in events_per_rank for e in events]
    ends = [e[2] for events in events_per_rank for e in events]
    span = max(ends) - min(starts)
    busy = sum(end - start for events in events_per_rank for _, start, end in events)
    return 1 - busy / (len(events_per_rank) * span)


@torch.no_grad()
def pipeline_forward(
    rank: int, world_size: int, folder, ids: torch.Tensor, micro_batches=(1,), sizes=None, warmup: bool = True
) -> dict:
    """What each rank runs (through labkit.parallel.launch(..., return_all=True)): load this stage,
    then one GPipe forward pass per value of `micro_batches`, all ranks starting together.

    Returns this rank's {"layers", "events": {m: events}, "comm": {m: log summary}, "logits": {m:
    logits} (last rank only), "layer_weight_bytes"}."""
    device = rank_device(rank)
    model, layers = load_stage(folder, rank, world_size, sizes, device)
    ids = ids.to(device)
    out = {
        "layers": list(layers),
        "events": {},
        "comm": {},
        "logits": {},
        "layer_weight_bytes": sum(
            p.numel() * p.element_size() for i in layers for p in model.model.layers[i].parameters()
        ),
    }
    if warmup:  # first calls allocate and initialise: keep them out of the timings
        gpipe_forward(model, layers, ids, micro_batches[0])
    for m in micro_batches:
        log = CommLog()
        dist.barrier()
        logits, events = gpipe_forward(model, layers, ids, m, log)
        out["events"][m], out["comm"][m] = events, log.summary()
        if logits is not None:
            out["logits"][m] = logits
    return out
