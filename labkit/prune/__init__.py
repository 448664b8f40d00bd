"""Pruning: set weights to zero and measure what it costs and what it saves.

Unstructured and N:M (semi-structured) pruning of the decoder linears of a Llama model, in place:

    from labkit import prune
    prune.magnitude(model, 0.5)                         # |W|, no data
    prune.wanda(model, calibration, 0.5)                # |W|·‖X‖₂ per row (Sun et al., 2023)
    prune.sparsegpt(model, calibration, pattern="2:4")  # OBS with mask selection (Frantar & Alistarh, 2023)
    prune.sparsity_report(model).overall
    prune.to_sparse(model, "bitmask")                   # then labkit.evaluate.weight_bytes(model)

Each method returns a PruneReport (achieved sparsity per linear and overall, seconds taken).

Structured pruning (lesson 03) removes attention heads and MLP channels for real: prune.flap,
prune.llm_pruner (recover afterwards with labkit.lora.lora_recover). Depth pruning removes whole
decoder layers: prune.block_influence (ShortGPT) chooses them, prune.drop_layers removes them.
"""

from .depth import block_influence, drop_layers
from .flap import flap, flap_allocation, flap_scores, flap_stats, flap_unit_scores, fluctuation, standardize
from .llm_pruner import (
    default_layers,
    group_importance,
    layer_plan,
    llm_pruner,
    taylor_importance,
)
from .magnitude import magnitude, magnitude_mask
from .masks import (
    PruneReport,
    SparsityReport,
    decoder_linears,
    lowest_mask,
    nm_fraction,
    nm_mask,
    parse_pattern,
    row_mask,
    sparsity_report,
)
from .sparse_storage import (
    FORMATS,
    SparseLinear,
    bitmask_bytes,
    csr_bytes,
    decode,
    dense_bytes,
    encode,
    semi_structured_bytes,
    semi_structured_speed,
    semi_structured_unavailable,
    storage_bytes,
    to_sparse,
)
from .sparsegpt import inverse_hessian_cholesky, sparsegpt, sparsegpt_naive, sparsegpt_prune
from .structured import (
    AttentionShape,
    LayerStructure,
    StructuredReport,
    attention_shape,
    channel_param_count,
    check_ratio,
    compensation,
    group_heads,
    group_param_count,
    head_channels,
    keep_lowest_removed,
    layer_param_count,
    linear_param_count,
    prune_channels,
    prune_heads,
    prune_layer,
    structure,
)
from .wanda import wanda, wanda_mask, wanda_scores

__all__ = [
    "FORMATS",
    "AttentionShape",
    "LayerStructure",
    "PruneReport",
    "SparseLinear",
    "SparsityReport",
    "StructuredReport",
    "attention_shape",
    "bitmask_bytes",
    "block_influence",
    "channel_param_count",
    "check_ratio",
    "compensation",
    "csr_bytes",
    "decode",
    "decoder_linears",
    "default_layers",
    "dense_bytes",
    "drop_layers",
    "encode",
    "flap",
    "flap_allocation",
    "flap_scores",
    "flap_stats",
    "flap_unit_scores",
    "fluctuation",
    "group_heads",
    "group_importance",
    "group_param_count",
    "head_channels",
    "inverse_hessian_cholesky",
    "keep_lowest_removed",
    "layer_param_count",
    "layer_plan",
    "linear_param_count",
    "llm_pruner",
    "lowest_mask",
    "magnitude",
    "magnitude_mask",
    "nm_fraction",
    "nm_mask",
    "parse_pattern",
    "prune_channels",
    "prune_heads",
    "prune_layer",
    "row_mask",
    "semi_structured_bytes",
    "semi_structured_speed",
    "semi_structured_unavailable",
    "sparsegpt",
    "sparsegpt_naive",
    "sparsegpt_prune",
    "sparsity_report",
    "standardize",
    "storage_bytes",
    "structure",
    "taylor_importance",
    "to_sparse",
    "wanda",
    "wanda_mask",
    "wanda_scores",
]
