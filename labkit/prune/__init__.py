"""Pruning: set weights to zero and measure what it costs and what it saves.

Unstructured and N:M (semi-structured) pruning of the decoder linears of a Llama model, in place:

    from labkit import prune
    prune.magnitude(model, 0.5)                         # |W|, no data
    prune.wanda(model, calibration, 0.5)                # |W|·‖X‖₂ per row (Sun et al., 2023)
    prune.sparsegpt(model, calibration, pattern="2:4")  # OBS with mask selection (Frantar & Alistarh, 2023)
    prune.sparsity_report(model).overall
    prune.to_sparse(model, "bitmask")                   # then labkit.evaluate.weight_bytes(model)

Each method returns a PruneReport (achieved sparsity per linear and overall, seconds taken).
"""

from .flap import flap, flap_allocation, flap_scores, flap_stats, fluctuation, standardize
from .llm_pruner import (
    LoRALinear,
    default_layers,
    group_importance,
    layer_plan,
    llm_pruner,
    lora_recover,
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
    "magnitude",
    "magnitude_mask",
    "wanda",
    "wanda_mask",
    "wanda_scores",
    "sparsegpt",
    "sparsegpt_prune",
    "sparsegpt_naive",
    "inverse_hessian_cholesky",
    "sparsity_report",
    "PruneReport",
    "SparsityReport",
    "decoder_linears",
    "parse_pattern",
    "lowest_mask",
    "row_mask",
    "nm_mask",
    "nm_fraction",
    "FORMATS",
    "SparseLinear",
    "to_sparse",
    "encode",
    "decode",
    "dense_bytes",
    "bitmask_bytes",
    "csr_bytes",
    "semi_structured_bytes",
    "storage_bytes",
    "semi_structured_speed",
    # structured pruning (lesson 03): heads and channels removed for real
    "flap",
    "flap_stats",
    "flap_scores",
    "flap_allocation",
    "fluctuation",
    "standardize",
    "llm_pruner",
    "taylor_importance",
    "group_importance",
    "default_layers",
    "layer_plan",
    "lora_recover",
    "LoRALinear",
    "prune_heads",
    "prune_channels",
    "prune_layer",
    "compensation",
    "head_channels",
    "group_heads",
    "attention_shape",
    "AttentionShape",
    "structure",
    "LayerStructure",
    "StructuredReport",
    "check_ratio",
    "group_param_count",
    "channel_param_count",
    "layer_param_count",
    "linear_param_count",
    "keep_lowest_removed",
]
