"""Knowledge distillation: train a small student to imitate a large teacher's distributions.

    from labkit import distill
    student = distill.drop_layers(teacher, keep=list(range(0, 30, 2)))  # or distill.fresh_student(...)
    curve = distill.distill(student, teacher, data, steps=200, loss="forward_kl", temperature=2.0)
    baseline = distill.finetune(other_student, data, steps=200)          # same tokens, hard labels
    distill.describe_student(student, teacher)

Losses (losses.py): forward_kl (Hinton et al., 2015), reverse_kl, jsd (GKD's generalized JSD,
Agarwal et al., 2024), hidden_mse. Loops (trainer.py): distill (off- or on-policy), finetune,
blockwise_distill (one block against its teacher block). Students (students.py).
"""
from .losses import LOSSES, check_beta, check_logits, check_temperature, forward_kl, hidden_mse, jsd, masked_mean, reverse_kl
from .students import (SMALL_LLAMA, StudentSummary, check_vocab, describe_student, drop_layers, fresh_student,
                       vocab_size)
from .trainer import batches, blockwise_distill, check_tokens, distill, finetune, layer_inputs, sample

__all__ = [
    "forward_kl", "reverse_kl", "jsd", "hidden_mse", "LOSSES", "masked_mean",
    "check_temperature", "check_beta", "check_logits",
    "distill", "finetune", "blockwise_distill", "layer_inputs", "sample", "batches", "check_tokens",
    "drop_layers", "fresh_student", "describe_student", "StudentSummary", "check_vocab", "vocab_size", "SMALL_LLAMA",
]
