"""Students: the smaller models a teacher is distilled into.

fresh_student({"num_hidden_layers": 4}, teacher=teacher)
                                       a small randomly initialised Llama sharing the
                                       teacher's vocabulary
describe_student(student, teacher)     parameters and weight bytes, and their ratio

A student can also start from the teacher's own weights with some layers removed (depth pruning, as
in Sheared-LLaMA and Minitron): labkit.prune.drop_layers, chosen by labkit.prune.block_influence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..evaluate import weight_bytes
from ..models import check_llama, parameter_count


def vocab_size(model) -> int:
    """Rows of the output layer: the size of the distribution the model predicts."""
    head = model.get_output_embeddings()
    return head.out_features if isinstance(head, nn.Linear) else model.config.vocab_size


def check_vocab(student, teacher) -> None:
    """Logit distillation compares distributions over the same tokens: the vocabularies must match."""
    s, t = vocab_size(student), vocab_size(teacher)
    if s != t:
        raise ValueError(
            f"vocabulary mismatch: the student predicts {s:,} tokens and the teacher {t:,}. "
            f"Logit distillation needs the same tokenizer; build the student with "
            f"fresh_student(..., teacher=teacher) or labkit.prune.drop_layers(teacher, ...)."
        )


SMALL_LLAMA = dict(  # a small student: about 0.35 M parameters besides the embedding
    hidden_size=128,
    intermediate_size=320,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=256,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    bos_token_id=None,
    eos_token_id=0,
    pad_token_id=0,
)
FROM_TEACHER = (
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "max_position_embeddings",
    "rope_parameters",
    "rms_norm_eps",
    "hidden_act",
    "tie_word_embeddings",
)


def fresh_student(config_overrides: dict | None = None, teacher=None, seed: int = 0, dtype=torch.float32):
    """A randomly initialised LlamaForCausalLM: SMALL_LLAMA, then the teacher's vocabulary, special
    tokens and rotary settings (FROM_TEACHER) when a teacher is given, then `config_overrides`.

    A vocab_size override that differs from the teacher's is an error (the logits would not match).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(SMALL_LLAMA)
    if teacher is not None:
        check_llama(teacher, "fresh_student")
        settings.update({k: getattr(teacher.config, k) for k in FROM_TEACHER if hasattr(teacher.config, k)})
        settings["vocab_size"] = vocab_size(teacher)
    overrides = dict(config_overrides or {})
    if teacher is not None and "vocab_size" in overrides and overrides["vocab_size"] != settings["vocab_size"]:
        raise ValueError(
            f"config_overrides sets vocab_size={overrides['vocab_size']}, but the teacher's "
            f"vocabulary has {settings['vocab_size']:,} tokens; logit distillation needs the same one."
        )
    settings.update(overrides)
    hidden, heads = settings["hidden_size"], settings["num_attention_heads"]
    if "head_dim" not in overrides and ("hidden_size" in overrides or "num_attention_heads" in overrides):
        settings["head_dim"] = hidden // heads  # keep q_proj square unless told otherwise
    if heads % settings["num_key_value_heads"]:
        raise ValueError(
            f"num_attention_heads={heads} must be a multiple of "
            f"num_key_value_heads={settings['num_key_value_heads']} (grouped-query attention)."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**settings))
    return model.to(dtype).eval()


@dataclass
class StudentSummary:
    layers: int
    hidden_size: int
    intermediate_size: int
    parameters: int
    weight_bytes: int
    teacher_parameters: int | None = None
    teacher_weight_bytes: int | None = None

    @property
    def parameter_ratio(self) -> float | None:  # student / teacher
        return self.parameters / self.teacher_parameters if self.teacher_parameters else None

    def __str__(self) -> str:
        text = (
            f"{self.layers} layers, hidden {self.hidden_size}, MLP {self.intermediate_size}: "
            f"{self.parameters / 1e6:.2f} M parameters, {self.weight_bytes / 2**20:.1f} MiB of weights"
        )
        if self.teacher_parameters:
            text += (
                f" ({100 * self.parameter_ratio:.0f}% of the teacher's {self.teacher_parameters / 1e6:.2f} M, "
                f"{100 * self.weight_bytes / self.teacher_weight_bytes:.0f}% of its bytes)"
            )
        return text


def describe_student(student, teacher=None) -> StudentSummary:
    """Parameters (tied embedding counted once) and stored weight bytes, beside the teacher's."""
    c = student.config
    summary = StudentSummary(
        len(student.model.layers), c.hidden_size, c.intermediate_size, parameter_count(student), weight_bytes(student)
    )
    if teacher is not None:
        check_vocab(student, teacher)
        summary.teacher_parameters = parameter_count(teacher)
        summary.teacher_weight_bytes = weight_bytes(teacher)
    return summary


__all__ = [
    "SMALL_LLAMA",
    "StudentSummary",
    "check_vocab",
    "describe_student",
    "fresh_student",
    "vocab_size",
]
