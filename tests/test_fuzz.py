"""Fuzzing the public arguments (issue 17): hypothesis draws bad and edge values for evaluate.perplexity,
the data functions, the distillation losses and loops, the exercise checks, results.record, models.load
and quant's bits. The properties:

- an argument outside its documented domain raises ValueError, and the message names the argument;
- a failed call leaves the model bit-identical (and writes no file);
- valid arguments give a finite result (training may stop with FloatingPointError, its documented error).

Derandomized (the same examples on every run), bounded examples, the tiny random Llama only.
"""

import contextlib
import copy
import functools
import math
import numbers
import os
import tempfile
from unittest import mock

import pytest
import torch
from helpers import ROW
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from labkit import check, data, distill, evaluate, models, prune, quant, results
from labkit.distill.losses import TEMPERATURE_RANGE

FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # CI sees the same examples every run
    database=None,
    suppress_health_check=list(HealthCheck),
)

# Values of the wrong type, plus numbers at and past the edges. Integers stay small: a valid huge
# count (steps=10**9) would only make a test slow, not find a bug.
NOT_A_NUMBER = st.one_of(
    st.none(),
    st.text(max_size=4),
    st.lists(st.integers(0, 3), max_size=2),
    st.just(torch.tensor(2.0)),
    st.just(torch.tensor([1, 2])),
    st.just(object()),
    st.just(1 + 2j),
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1.0, 1.5, 1e300, -1.0]),
    st.floats(0, 1),
)
SMALL_INTS = st.integers(-2, 3)
ANY_FLOAT = st.one_of(FLOATS, st.booleans(), SMALL_INTS, NOT_A_NUMBER)
ANY_INT = st.one_of(SMALL_INTS, st.booleans(), st.sampled_from([2.0, 1.5, math.nan]), NOT_A_NUMBER)


def real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def float_tensor(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 1 and x.shape[-1] >= 1


def integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@functools.cache
def _tiny():
    torch.set_num_threads(1)
    return models.load("tiny-llama-random", device="cpu")


def snapshot(model) -> dict:
    return {name: t.clone() for name, t in model.state_dict().items()}


def assert_unchanged(model, before: dict) -> None:
    state = model.state_dict()
    assert state.keys() == before.keys()
    for name, t in state.items():
        assert torch.equal(t, before[name]), f"{name} changed by a failed call"


def assert_names_one_of(error: Exception, names: list[str]) -> None:
    assert any(name in str(error) for name in names), f"{error!r} names none of {names}"


@contextlib.contextmanager
def refused(names: list[str]):
    """The block must raise ValueError naming one of `names`."""
    with pytest.raises(ValueError) as info:
        yield
    assert_names_one_of(info.value, names)


# --- evaluate.perplexity -------------------------------------------------------------------------


def _ids(shape, dtype, low, seed):
    ids = torch.randint(low, 260, shape, generator=torch.Generator().manual_seed(seed))
    return ids.to(dtype)


TOKEN_IDS = st.one_of(
    st.builds(
        _ids,
        shape=st.sampled_from([(64,), (1, 64), (2, 32), (1, 1, 64), (0,), (1, 0), (1, 5), (64, 1)]),
        dtype=st.sampled_from([torch.long, torch.long, torch.int32, torch.uint8, torch.float32, torch.bool]),
        low=st.sampled_from([0, 0, 0, -3]),
        seed=st.integers(0, 10),
    ),
    NOT_A_NUMBER,
)


@FUZZ
@given(
    token_ids=TOKEN_IDS,
    seqlen=st.one_of(st.integers(-1, 70), ANY_INT),
    max_windows=st.one_of(st.none(), ANY_INT),
    batch_size=ANY_INT,
)
# issue 17, case 5: each of these once gave a silent result or a bare exception
@example(token_ids=torch.zeros(2, 32, dtype=torch.long), seqlen=16, max_windows=None, batch_size=1)
@example(token_ids=torch.zeros(1, 64, dtype=torch.long), seqlen=0, max_windows=None, batch_size=1)
@example(token_ids=torch.zeros(1, 64, dtype=torch.long), seqlen=1, max_windows=None, batch_size=1)
@example(token_ids=torch.zeros(1, 64, dtype=torch.long), seqlen=16, max_windows=None, batch_size=0)
@example(token_ids=torch.zeros(1, 64, dtype=torch.long), seqlen=16, max_windows=0, batch_size=1)
@example(token_ids=torch.full((1, 64), 256), seqlen=16, max_windows=None, batch_size=1)
def test_perplexity_arguments(token_ids, seqlen, max_windows, batch_size):
    model, _ = _tiny()
    before = snapshot(model)
    ids_ok = (
        isinstance(token_ids, torch.Tensor)
        and token_ids.dtype in (torch.long, torch.int32, torch.uint8)
        and (token_ids.dim() == 1 or (token_ids.dim() == 2 and token_ids.shape[0] == 1))
    )
    bad = [
        name
        for name, ok in [
            ("token_ids", ids_ok),
            ("seqlen", integer(seqlen) and seqlen >= 2),
            ("max_windows", max_windows is None or (integer(max_windows) and max_windows >= 1)),
            ("batch_size", integer(batch_size) and batch_size >= 1),
        ]
        if not ok
    ]
    try:
        ppl = evaluate.perplexity(model, token_ids, seqlen, max_windows, batch_size, progress=False)
    except ValueError as error:
        # with every argument valid on its own, only their combination can fail: too few tokens for one
        # window, or ids outside the vocabulary in the windows used
        assert_names_one_of(error, bad or ["token_ids"])
    else:
        assert not bad, f"{bad} accepted"
        windows = token_ids.reshape(-1)[: token_ids.numel() // seqlen * seqlen]
        assert windows.numel() >= seqlen and int(windows.max()) < 256
        assert math.isfinite(ppl) and ppl >= 1
    assert_unchanged(model, before)


# --- data -------------------------------------------------------------------------------------------


@FUZZ
@given(split=st.one_of(st.sampled_from(["test", "validation", "train", "TEST", ""]), ANY_INT, NOT_A_NUMBER))
def test_wikitext2_split(split, data_dir):
    if split in ("test", "validation"):
        assert len(data.wikitext2(split).text) > data.MIN_CHARS
    else:
        with refused(["split="]):
            data.wikitext2(split)


@FUZZ
@given(tokenizer=st.one_of(NOT_A_NUMBER, ANY_INT))
def test_tokens_tokenizer(tokenizer, data_dir):
    with refused(["tokenizer"]):
        data.tokens(tokenizer)


@FUZZ
@given(
    n_samples=ANY_INT,
    seqlen=st.one_of(st.integers(-1, 40), st.just(10**8), ANY_INT),
    seed=st.one_of(ANY_INT, st.just(2**63), st.just(-1)),
)
def test_calibration_arguments(n_samples, seqlen, seed, data_dir):
    _, tok = _tiny()
    bad = [
        name
        for name, ok in [
            ("n_samples=", integer(n_samples) and n_samples >= 1),
            ("seqlen=", integer(seqlen) and seqlen >= 2),
            ("seed=", integer(seed) and 0 <= seed < 2**63),
        ]
        if not ok
    ]
    if bad or seqlen == 10**8:
        with refused(bad or ["seqlen="]):
            data.calibration(tok, n_samples, seqlen, seed)
    else:
        windows = data.calibration(tok, n_samples, seqlen, seed)
        assert windows.shape == (n_samples, seqlen) and windows.dtype == torch.long


# --- distillation losses ---------------------------------------------------------------------------------


def _logits(shape, dtype, seed):
    return (10 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


LOGITS = st.one_of(
    st.builds(
        _logits,
        shape=st.sampled_from([(3, 5), (3, 5), (2, 3, 5), (3, 7), (5,), (3, 0)]),
        dtype=st.sampled_from([torch.float32, torch.float32, torch.float16, torch.long]),
        seed=st.integers(0, 5),
    ),
    NOT_A_NUMBER,
)
MASKS = st.one_of(
    st.none(),
    st.sampled_from(
        [torch.tensor([True, False, True]), torch.zeros(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
    ),
    NOT_A_NUMBER,
)


@FUZZ
@given(
    loss=st.sampled_from(["forward_kl", "reverse_kl", "jsd"]),
    student=LOGITS,
    teacher=LOGITS,
    temperature=ANY_FLOAT,
    beta=ANY_FLOAT,
    mask=MASKS,
)
def test_distillation_losses(loss, student, teacher, temperature, beta, mask):
    low, high = TEMPERATURE_RANGE
    bad = [
        name
        for name, ok in [
            ("temperature=", real(temperature) and low <= temperature <= high),
            ("beta=", loss != "jsd" or (real(beta) and 0 < beta < 1)),
            ("student_logits", float_tensor(student)),
            ("teacher_logits", float_tensor(teacher)),
        ]
        if not ok
    ]
    kwargs = {"beta": beta} if loss == "jsd" else {}
    try:
        value = distill.LOSSES[loss](student, teacher, temperature=temperature, mask=mask, **kwargs)
    except ValueError as error:
        # all valid on their own: the shapes disagree, or the mask is wrong or selects nothing
        assert_names_one_of(error, bad or ["vocabulary", "logits", "mask"])
    else:
        assert not bad, f"{bad} accepted"
        assert value.dim() == 0 and torch.isfinite(value) and value >= -1e-4


@FUZZ
@given(student=LOGITS, teacher=LOGITS, mask=MASKS)
def test_hidden_mse(student, teacher, mask):
    try:
        value = distill.hidden_mse(student, teacher, mask)
    except ValueError as error:
        assert_names_one_of(error, ["student_hidden", "teacher_hidden", "hidden states differ", "mask"])
    else:
        assert torch.isfinite(value) and value >= 0


# --- distillation and fine-tuning loops ----------------------------------------------------------------


@functools.cache
def _train_data():
    return torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(0))


TRAINING = dict(
    steps=(1, ANY_INT),
    lr=(1e-3, st.one_of(st.just(1.0), ANY_FLOAT)),
    batch_size=(2, ANY_INT),
    grad_accum=(1, ANY_INT),
    max_grad_norm=(1.0, st.one_of(st.none(), ANY_FLOAT)),
    weight_decay=(0.0, ANY_FLOAT),
    seed=(0, st.one_of(ANY_INT, st.just(2**40))),
)
TRAINING_OK = dict(
    steps=lambda v: integer(v) and v >= 1,
    lr=lambda v: real(v) and 0 < v <= 1,
    batch_size=lambda v: integer(v) and v >= 1,
    grad_accum=lambda v: integer(v) and v >= 1,
    max_grad_norm=lambda v: v is None or (real(v) and v > 0),
    weight_decay=lambda v: real(v) and 0 <= v <= 1,
    seed=lambda v: integer(v) and v >= 0,
)
DISTILL = dict(
    TRAINING,
    loss=("forward_kl", st.sampled_from(["reverse_kl", "jsd", "kl", None, 3])),
    temperature=(2.0, ANY_FLOAT),
    beta=(0.5, ANY_FLOAT),
    alpha_ce=(0.0, ANY_FLOAT),
)
DISTILL_OK = dict(
    TRAINING_OK,
    loss=lambda v: v in distill.LOSSES,
    temperature=lambda v: real(v) and TEMPERATURE_RANGE[0] <= v <= TEMPERATURE_RANGE[1],
    beta=lambda v: real(v) and 0 < v < 1,
    alpha_ce=lambda v: real(v) and 0 <= v <= 1,
)


def _one_argument(table: dict):
    """(name, value): one argument drawn from its bad-and-edge strategy, the others at their defaults."""
    return st.sampled_from(sorted(table)).flatmap(lambda name: st.tuples(st.just(name), table[name][1]))


def _run_training(call, student, name: str, value, ok: bool) -> None:
    event("valid argument" if ok else "bad argument")  # --hypothesis-show-statistics: both kinds are drawn
    before = snapshot(student)
    try:
        curve = call()
    except ValueError as error:
        assert not ok, f"valid {name}={value!r} refused: {error}"
        assert f"{name}=" in str(error), error
        assert_unchanged(student, before)
    except FloatingPointError as error:  # documented: a step's loss or gradient was not finite
        assert ok and "training step" in str(error)
    else:
        assert ok, f"{name}={value!r} accepted"
        assert curve and all(math.isfinite(v) for v in curve)


@FUZZ
@given(argument=_one_argument(DISTILL))
@example(argument=("temperature", math.inf))  # issue 17, case 4: returned [nan], the student NaN
@example(argument=("lr", math.nan))
def test_distill_hyperparameters(argument):
    name, value = argument
    teacher, _ = _tiny()
    student = prune.drop_layers(teacher, keep=[0])
    kwargs = {key: default for key, (default, _) in DISTILL.items()}
    kwargs[name] = value
    if name == "steps" and integer(value):
        kwargs[name] = min(value, 2)  # a valid count, kept short
    teacher_before = snapshot(teacher)
    _run_training(
        lambda: distill.distill(student, teacher, _train_data(), progress=False, **kwargs),
        student,
        name,
        value,
        DISTILL_OK[name](value),
    )
    assert_unchanged(teacher, teacher_before)


@FUZZ
@given(argument=_one_argument(TRAINING))
def test_finetune_hyperparameters(argument):
    name, value = argument
    teacher, _ = _tiny()
    student = prune.drop_layers(teacher, keep=[0])
    kwargs = {key: default for key, (default, _) in TRAINING.items()}
    kwargs[name] = min(value, 2) if name == "steps" and integer(value) else value
    _run_training(
        lambda: distill.finetune(student, _train_data(), progress=False, **kwargs),
        student,
        name,
        value,
        TRAINING_OK[name](value),
    )


# --- exercise checks: whatever the learner returns, a verdict in words ------------------------------


def _poisoned(shape, dtype, fill):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if dtype.is_floating_point:
        t = t.to(dtype)
        t.view(-1)[0] = fill
        return t
    return (t * 1e6).to(dtype)  # integers no check expects


ANSWERS = st.recursive(
    st.one_of(
        ANY_FLOAT,
        st.builds(
            _poisoned,
            shape=st.sampled_from([(1,), (3,), (4, 6), (6, 6), (8,), (5,)]),
            dtype=st.sampled_from([torch.float32, torch.float64, torch.int64]),
            fill=st.sampled_from([math.nan, math.inf, -math.inf]),
        ),
    ),
    lambda inner: st.one_of(st.tuples(inner, inner), st.lists(inner, max_size=3)),
    max_leaves=4,
)


def _checks():
    import inspect

    names = []
    from labkit.course import lesson_id, lessons

    for path in lessons():
        module = getattr(check, f"lesson{lesson_id(path)}")
        for name, fn in vars(module).items():
            is_check = inspect.isfunction(fn) and list(inspect.signature(fn).parameters) == ["fn"]
            if is_check and fn.__module__ == module.__name__ and not name.startswith("_"):
                names.append((module, name))
    return names


@pytest.mark.parametrize("module, name", _checks(), ids=lambda x: getattr(x, "__name__", x).split(".")[-1])
@settings(FUZZ, max_examples=8)
@given(answer=ANSWERS)
def test_checks_answer_every_return_value_in_words(module, name, answer, capsys):
    assert getattr(module, name)(lambda *args: answer) is False
    out = capsys.readouterr().out
    assert out.startswith(f"✗ {name}: ") and "Traceback" not in out


# --- results.record -----------------------------------------------------------------------------------------

TEXT_FIELDS = ("lesson", "method", "setting", "model", "data", "device", "note")


def _field_ok(field, value) -> bool:
    if field in ("model", "seqlen", "eval_windows", "fingerprint"):  # must also agree with ROW's protocol
        return value == ROW[field] and type(value) is type(ROW[field])
    if field == "data":  # its kind must be the protocol's copy
        return isinstance(value, str) and value.split(":", 1)[0] == ROW["protocol"]["copy"]
    if field in ("protocol", "role"):  # a whole protocol dict; one of results.ROLES: never drawn here
        return False
    if field in TEXT_FIELDS:
        return isinstance(value, str)
    if field == "profile":
        return isinstance(value, str) and value not in ("", ".") and value.replace("_", "a").replace("-", "a").isalnum()
    if field in ("seqlen", "eval_windows"):
        return (value is None and field == "eval_windows") or (integer(value) and value >= 1)
    low = 1 if field == "perplexity" else 0
    nullable = field in ("runtime_bytes", "tokens_per_s", "perplexity")
    return (value is None and nullable) or (real(value) and value >= low)


@FUZZ
@given(
    field=st.sampled_from([*ROW, "note"]),
    value=st.one_of(ANY_FLOAT, st.sampled_from(["", "cpu", "../x", "a/b", ".", "gpu-2"]), st.integers(-5, 10**12)),
)
def test_record_fields(field, value):
    with tempfile.TemporaryDirectory() as folder, mock.patch.dict(os.environ, {"LABKIT_RESULTS_DIR": folder}):
        row = results.Row(**{**ROW, field: value})
        if _field_ok(field, value):
            results.record(row)
            assert results.load_rows(row.profile) == [row]
        else:
            with refused([f"Row.{field}="]):
                results.record(row)
            assert os.listdir(folder) == []


# --- models.load --------------------------------------------------------------------------------------------


def _dtype_ok(dtype) -> bool:
    if isinstance(dtype, str):
        return dtype.removeprefix("torch.") in models.DTYPES
    return isinstance(dtype, torch.dtype) and dtype in models.DTYPES.values()


@FUZZ
@given(
    name=st.one_of(st.just("tiny-llama-random"), st.sampled_from(["tiny", "TINY-LLAMA-RANDOM", ""]), NOT_A_NUMBER),
    device=st.one_of(st.sampled_from([None, "cpu", torch.device("cpu"), "gpu", "cpu:x", "cuda:99", ""]), ANY_INT),
    dtype=st.one_of(
        st.sampled_from([None, "float16", "bf16", "torch.float32", torch.float16, "int8", torch.int8, "float8"]),
        ANY_INT,
    ),
)
@example(name="tiny-llama-random", device="cpu", dtype="float16")  # issue 17, case 10: "Invalid device string"
def test_load_arguments(name, device, dtype):
    cuda = torch.cuda.is_available()
    bad = [
        arg
        for arg, ok in [
            ("model name", name == "tiny-llama-random"),
            ("device=", device is None or str(device) == "cpu" or (cuda and str(device) == "cuda:0")),
            ("dtype=", dtype is None or _dtype_ok(dtype)),
        ]
        if not ok
    ]
    if bad:
        with refused(bad):
            models.load(name, device=device, dtype=dtype)
    else:
        model, _ = models.load(name, device=device, dtype=dtype)
        assert next(model.parameters()).is_floating_point()


# --- quant: bits ---------------------------------------------------------------------------------------------


@FUZZ
@given(bits=st.one_of(ANY_FLOAT, st.sampled_from([4.0, True, 1, 5, 16, 8.0])))
@example(bits=4.0)  # issue 17, case 10: NotImplementedError "lshift_cpu"
@example(bits=True)
def test_rtn_bits_must_be_a_supported_int(bits):
    assume(not (integer(bits) and bits in (2, 3, 4, 8)))
    model, _ = _tiny()
    model = copy.deepcopy(model)
    before = snapshot(model)
    with refused(["bits="]):
        quant.rtn(model, bits, 32)
    assert_unchanged(model, before)
