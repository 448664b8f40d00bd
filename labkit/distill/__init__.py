"""Knowledge distillation: train a small student to imitate a large teacher's distributions.

    from labkit import distill, prune
    student = prune.drop_layers(teacher, keep=list(range(0, 30, 2)))   # depth pruning, or distill.fresh_student(...)
    curve = distill.distill(student, teacher, data, steps=200, loss="forward_kl", temperature=2.0)
    baseline = distill.finetune(other_student, data, steps=200)          # same tokens, hard labels
    distill.describe_student(student, teacher)

Losses (losses.py): forward_kl (Hinton et al., 2015), reverse_kl, jsd (GKD's generalized JSD,
Agarwal et al., 2024), hidden_mse. Loops (trainer.py): distill (off- or on-policy), finetune,
blockwise_distill (one block against its teacher block, or against the span of teacher layers it
replaces: layer_states, from labkit.walk, gives every layer boundary in one pass). Students (students.py);
depth pruning (drop_layers, ShortGPT's block_influence) is labkit.prune.depth.
"""

from ..walk import layer_inputs, layer_states  # the walk owns layer capture; here for block-wise distillation
from .losses import (
    LOSSES,
    at_temperature,
    check_beta,
    check_logits,
    check_temperature,
    forward_kl,
    hidden_mse,
    jsd,
    masked_mean,
    reverse_kl,
)
from .students import (
    SMALL_LLAMA,
    StudentSummary,
    check_vocab,
    describe_student,
    fresh_student,
    vocab_size,
)
from .trainer import batches, blockwise_distill, distill, finetune, sample

__all__ = [
    "LOSSES",
    "SMALL_LLAMA",
    "StudentSummary",
    "at_temperature",
    "batches",
    "blockwise_distill",
    "check_beta",
    "check_logits",
    "check_temperature",
    "check_vocab",
    "describe_student",
    "distill",
    "finetune",
    "forward_kl",
    "fresh_student",
    "hidden_mse",
    "jsd",
    "layer_inputs",
    "layer_states",
    "masked_mean",
    "reverse_kl",
    "sample",
    "vocab_size",
]
