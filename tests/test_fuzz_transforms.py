"""Property-based tests of the whole-model transforms' arguments (issue 17's fuzz suite, model side).

For every (transform, argument) below, hypothesis draws bad and edge values for that one argument (the others
valid) and asserts: either the call succeeds and every weight of the model is finite (no silent NaN), or it raises
ValueError or TypeError whose message names the argument, and the model is bit-identical to what it was.
Tiny model, 2 x 16 calibration tokens, a few examples per argument: the file runs in well under a minute.
"""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labkit import lowrank, models, prune, quant, transform
from labkit.kernels import llama as fused_llama

CAL = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))  # tiny-llama-random's vocabulary

ANY = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 300),
    st.sampled_from([None, True, False, "x", "2:4", "", 0.5, 1, 0, -1, 1e-12, 1 - 1e-12]),
)
SMALL = st.one_of(ANY.filter(lambda v: not isinstance(v, int) or isinstance(v, bool)), st.integers(-2, 2))

ARGUMENTS = {  # (what, argument): (call with the drawn value, strategy)
    ("prune.magnitude", "sparsity"): (lambda m, v: prune.magnitude(m, v), ANY),
    ("prune.magnitude", "pattern"): (lambda m, v: prune.magnitude(m, None, v), ANY),
    ("prune.magnitude", "scope"): (lambda m, v: prune.magnitude(m, 0.5, scope=v), ANY),
    ("prune.wanda", "sparsity"): (lambda m, v: prune.wanda(m, CAL, v), ANY),
    ("prune.wanda", "batch_size"): (lambda m, v: prune.wanda(m, CAL, 0.5, batch_size=v), ANY),
    ("prune.sparsegpt", "sparsity"): (lambda m, v: prune.sparsegpt(m, CAL, v), ANY),
    ("prune.sparsegpt", "blocksize"): (lambda m, v: prune.sparsegpt(m, CAL, 0.5, blocksize=v), ANY),
    ("prune.sparsegpt", "percdamp"): (lambda m, v: prune.sparsegpt(m, CAL, 0.5, percdamp=v), ANY),
    ("prune.flap", "ratio"): (lambda m, v: prune.flap(m, CAL, v), ANY),
    ("prune.llm_pruner", "ratio"): (lambda m, v: prune.llm_pruner(m, CAL, v), ANY),
    ("quant.rtn", "bits"): (lambda m, v: quant.rtn(m, v, 32), ANY),
    ("quant.rtn", "group_size"): (lambda m, v: quant.rtn(m, 4, v), ANY),
    ("quant.gptq", "bits"): (lambda m, v: quant.gptq(m, CAL, v, 32), ANY),
    ("quant.gptq", "group_size"): (lambda m, v: quant.gptq(m, CAL, 4, v), ANY),
    ("quant.gptq", "percdamp"): (lambda m, v: quant.gptq(m, CAL, 4, 32, percdamp=v), ANY),
    ("quant.gptq", "blocksize"): (lambda m, v: quant.gptq(m, CAL, 4, 32, blocksize=v), ANY),
    ("quant.gptq", "batch_size"): (lambda m, v: quant.gptq(m, CAL, 4, 32, batch_size=v), ANY),
    ("quant.llm_int8", "threshold"): (lambda m, v: quant.llm_int8(m, v), ANY),
    ("quant.smooth", "alpha"): (lambda m, v: quant.smooth(m, CAL, v), ANY),
    ("quant.nf4", "blocksize"): (lambda m, v: quant.nf4(m, v), ANY),
    ("lowrank.svd", "rank"): (lambda m, v: lowrank.svd(m, rank=v), ANY),
    ("lowrank.svd", "param_ratio"): (lambda m, v: lowrank.svd(m, param_ratio=v), ANY),
    ("lowrank.svd", "energy"): (lambda m, v: lowrank.svd(m, energy=v), ANY),
    ("lowrank.svd", "percdamp"): (
        lambda m, v: lowrank.svd(m, param_ratio=0.8, activation_aware=True, calibration=CAL, percdamp=v),
        ANY,
    ),
    ("lowrank.sparse_plus_lowrank", "density"): (
        lambda m, v: lowrank.sparse_plus_lowrank(m, param_ratio=0.7, density=v),
        ANY,
    ),
    ("lowrank.sparse_plus_lowrank", "iters"): (
        lambda m, v: lowrank.sparse_plus_lowrank(m, param_ratio=0.7, density=0.05, iters=v),
        SMALL,
    ),
    ("kernels.fuse", "group_size"): (lambda m, v: fused_llama.fuse(m, w4a16=True, group_size=v, backend="torch"), ANY),
}


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def same(model, before):
    tensors, types = before
    now = model.state_dict()
    return (
        now.keys() == tensors.keys()
        and all(
            now[k].dtype == v.dtype and now[k].shape == v.shape and torch.equal(now[k], v) for k, v in tensors.items()
        )
        and [type(m) for m in model.modules()] == types
        and transform.history(model) == []
    )


@pytest.fixture(scope="module")
def tiny_model():  # loaded when the tests run, not at import (loading transformers may import triton, which reads
    # TRITON_INTERPRET once: importing it while other test modules are still being collected would fix that too early)
    return models.load("tiny-llama-random", device="cpu")[0]


@pytest.mark.parametrize("key", ARGUMENTS, ids=[f"{what}-{arg}" for what, arg in ARGUMENTS])
def test_bad_or_edge_arguments_give_a_named_error_or_a_finite_model(key, tiny_model):
    what, argument = key
    call, values = ARGUMENTS[key]

    @settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(value=values)
    def check(value):
        model = copy.deepcopy(tiny_model)
        before = snapshot(model)
        try:
            call(model, value)
        except (ValueError, TypeError) as err:
            assert argument in str(err), f"{what}({argument}={value!r}): the message does not name it: {err}"
            assert same(model, before), f"{what}({argument}={value!r}) failed but left the model changed"
        else:
            bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
            assert not bad, f"{what}({argument}={value!r}) returned normally with non-finite weights: {bad[:3]}"
            assert transform.history(model), f"{what} did not label the model"

    check()
