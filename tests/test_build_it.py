"""The "build it" exercises: the learner's function is checked, then plugged into the whole-model path
(check.use); a stub or a wrong answer leaves labkit's own in place; LABKIT_SOLUTIONS=1 plugs in the
worked solution (as the test suite and labkit.course run the lessons)."""

import copy

import pytest
import torch

from labkit import check, prune, solutions
from labkit.course import lesson_id, lessons


def _stub(W, norm, sparsity):
    raise NotImplementedError  # your code


def _magnitude(W, norm, sparsity):  # a wrong answer: forgets the activations
    return solutions.lesson01.wanda_mask(W, torch.ones_like(norm), sparsity)


@pytest.fixture
def own_code(monkeypatch):
    monkeypatch.delenv(solutions.ENV, raising=False)


def test_a_stub_is_reported_and_labkit_goes_on(own_code, capsys):
    assert check.use(_stub, check.lesson01.wanda_mask, prune.wanda_mask) is prune.wanda_mask
    out = capsys.readouterr().out
    assert "✗ wanda_mask: not written yet" in out and "uses labkit's prune.wanda_mask" in out


def test_a_wrong_answer_is_named_and_not_plugged_in(own_code, capsys):
    assert check.use(_magnitude, check.lesson01.wanda_mask, prune.wanda_mask) is prune.wanda_mask
    out = capsys.readouterr().out
    assert "forgot the activations" in out and "uses labkit's prune.wanda_mask" in out


def test_a_right_answer_is_plugged_in(own_code, capsys):
    def wanda_mask(W, norm, sparsity):
        score = W.abs() * norm
        return score <= score.kthvalue(round(sparsity * W.shape[1]), dim=1, keepdim=True).values

    assert check.use(wanda_mask, check.lesson01.wanda_mask, prune.wanda_mask) is wanda_mask
    assert "uses your wanda_mask" in capsys.readouterr().out


def test_solutions_env_plugs_in_the_worked_solution(monkeypatch, capsys):
    monkeypatch.setenv(solutions.ENV, "1")
    assert check.use(_stub, check.lesson01.wanda_mask, prune.wanda_mask) is solutions.lesson01.wanda_mask
    assert "the worked solution" in capsys.readouterr().out


def _all_checks():
    import importlib
    import inspect

    for path in lessons():
        module = importlib.import_module(f"labkit.check.lesson{lesson_id(path)}")
        for name, fn in vars(module).items():
            is_check = inspect.isfunction(fn) and list(inspect.signature(fn).parameters) == ["fn"]
            if is_check and fn.__module__ == module.__name__ and not name.startswith("_"):
                yield fn


def test_every_check_has_a_worked_solution_that_passes(capsys):
    exercises = list(_all_checks())
    assert len(exercises) == 45
    for exercise in exercises:
        assert exercise(solutions.of(exercise)), (exercise.__module__, exercise.__name__, capsys.readouterr().out)
    with pytest.raises(LookupError, match=r"no worked solution for check\.lesson00\.nothing"):
        solutions.of(_nothing)


def _nothing(fn): ...


_nothing.__module__, _nothing.__name__ = "labkit.check.lesson00", "nothing"


def test_solution_source_is_shown(capsys):
    solutions.show(check.lesson01.wanda_mask)
    out = capsys.readouterr().out
    assert out.startswith("def wanda_mask(W, norm, sparsity):") and "Wanda eq. 1" in out


def test_the_learners_mask_prunes_the_whole_model(tiny, calibration):
    reference, mine, magnitude = tiny, copy.deepcopy(tiny), copy.deepcopy(tiny)
    prune.wanda(reference, calibration, 0.5)
    prune.wanda(mine, calibration, 0.5, mask=solutions.lesson01.wanda_mask)
    prune.wanda(magnitude, calibration, 0.5, mask=_magnitude)
    labkits = copy.deepcopy(tiny)
    prune.wanda(labkits, calibration, 0.5, mask=prune.wanda_mask)  # what check.use returns until yours passes
    a, b, c = reference.state_dict(), mine.state_dict(), magnitude.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the worked solution is labkit's wanda_mask, bit for bit
    assert all(torch.equal(a[k], v) for k, v in labkits.state_dict().items())
    assert not all(torch.equal(a[k], c[k]) for k in a)  # and the function passed is the one that runs


def test_a_bad_mask_leaves_the_model_unchanged(tiny, calibration):
    before = copy.deepcopy(tiny.state_dict())
    with pytest.raises(ValueError, match=r"mask returned shape \(\d+, \d+\), dtype torch.float32.*bool tensor"):
        prune.wanda(tiny, calibration, 0.5, mask=lambda W, norm, s: solutions.lesson01.wanda_mask(W, norm, s).float())
    with pytest.raises(ValueError, match="mask returned NoneType"):
        prune.wanda(tiny, calibration, 0.5, mask=lambda W, norm, s: None)
    with pytest.raises(ValueError, match=r"mask=.*unstructured"):
        prune.wanda(tiny, calibration, None, "2:4", mask=solutions.lesson01.wanda_mask)
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_learners_loss_trains_the_student(tiny, calibration):
    from labkit import distill

    teacher, reference, mine = tiny, copy.deepcopy(tiny), copy.deepcopy(tiny)
    for student in (reference, mine):  # a student that differs from its teacher, the same for both runs
        with torch.no_grad():
            student.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    kwargs = dict(steps=3, lr=1e-3, batch_size=2, progress=False)
    curve = distill.distill(reference, teacher, calibration, loss="forward_kl", temperature=2.0, **kwargs)
    mine_curve = distill.distill(
        mine, teacher, calibration, loss=distill.at_temperature(solutions.lesson07.forward_kl, 2.0), **kwargs
    )
    assert curve == mine_curve  # the worked solution is labkit's loss, bit for bit
    a, b = reference.state_dict(), mine.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="takes no mask"):
        distill.distill(
            mine,
            teacher,
            calibration,
            loss=distill.at_temperature(solutions.lesson07.forward_kl, 1.0),
            on_policy=True,
            **kwargs,
        )
    with pytest.raises(ValueError, match="pass a function loss"):
        distill.at_temperature("forward_kl", 1.0)
    with pytest.raises(ValueError, match="temperature"):
        distill.at_temperature(solutions.lesson07.forward_kl, 0.0)


def test_the_learners_rtn_grid_quantizes_the_whole_model(tiny):
    from labkit import evaluate, quant

    reference, mine = tiny, copy.deepcopy(tiny)
    quant.rtn(reference, 4, 32)
    quant.rtn(mine, 4, 32, quantize=solutions.lesson04.rtn_quantize)
    a, b = reference.state_dict(), mine.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # packed codes, scales, zeros
    assert evaluate.weight_bytes(mine) == evaluate.weight_bytes(reference)


def test_a_bad_rtn_grid_leaves_the_model_unchanged(tiny):
    from labkit import quant

    before = copy.deepcopy(tiny.state_dict())
    right = solutions.lesson04.rtn_quantize
    bad = {
        "must return a tuple": lambda w, b, g: right(w, b, g)[0],
        r"codes must lie in \[0, 15\]": lambda w, b, g: (right(w, b, g)[0].long() + 16, *right(w, b, g)[1:]),
        "codes must be whole numbers": lambda w, b, g: (right(w, b, g)[0].float() + 0.5, *right(w, b, g)[1:]),
        r"scale and zero must be \[out, n_groups\]": lambda w, b, g: (
            right(w, b, g)[0],
            *(t.T for t in right(w, b, g)[1:]),
        ),
        "scale must be positive": lambda w, b, g: (right(w, b, g)[0], -right(w, b, g)[1], right(w, b, g)[2]),
    }
    for words, answer in bad.items():
        with pytest.raises(ValueError, match=words):
            quant.rtn(tiny, 4, 32, quantize=answer)
        after = tiny.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before), words
    with pytest.raises(ValueError, match="sym=False"):
        quant.rtn(tiny, 4, 32, sym=True, quantize=right)


@pytest.mark.parametrize(
    "settings",
    [
        dict(bits=4, group_size=None),
        dict(bits=4, group_size=32, act_order=True),
        dict(bits=3, group_size=16, blocksize=32),
    ],
)
def test_the_learners_gptq_block_quantizes_the_whole_model(tiny, calibration, settings):
    from labkit import quant

    reference, mine = tiny, copy.deepcopy(tiny)
    expected = quant.gptq(reference, calibration, **settings, pack=False)
    got = quant.gptq(mine, calibration, **settings, pack=False, quantize_block=solutions.lesson05.gptq_block)
    a, b = reference.state_dict(), mine.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the worked solution is labkit's loop, bit for bit
    assert got.errors == expected.errors


def test_a_bad_gptq_block_leaves_the_model_unchanged(tiny, calibration):
    from labkit import quant

    before = copy.deepcopy(tiny.state_dict())
    right = solutions.lesson05.gptq_block
    bad = {
        r"it must return \(Q1, Err1, Losses1\)": lambda W1, Hinv1, q: right(W1, Hinv1, q)[0],
        "returned Err1 of shape": lambda W1, Hinv1, q: (lambda r: (r[0], r[1].T, r[2]))(right(W1, Hinv1, q)),
        "out of turn": lambda W1, Hinv1, q: (q(1, W1), right(W1, Hinv1, q))[1],
        "called its constraint for 0 of the block's": lambda W1, Hinv1, q: (W1, W1 * 0, W1 * 0),
    }
    for words, answer in bad.items():
        with pytest.raises(ValueError, match=words):
            quant.gptq(tiny, calibration, 4, 32, quantize_block=answer)
        after = tiny.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before), words
    with pytest.raises(ValueError, match="a divisor of blocksize=48"):
        quant.gptq(tiny, calibration, 4, 32, blocksize=48, quantize_block=right)


@pytest.mark.parametrize("sparsity, pattern", [(0.5, "unstructured"), (None, "2:4"), (0.3, "unstructured")])
def test_the_learners_obs_block_prunes_the_whole_model(tiny, calibration, sparsity, pattern):
    reference, mine = tiny, copy.deepcopy(tiny)
    prune.sparsegpt(reference, calibration, sparsity, pattern, blocksize=32)
    prune.sparsegpt(mine, calibration, sparsity, pattern, blocksize=32, prune_block=solutions.lesson02.obs_block)
    a, b = reference.state_dict(), mine.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the worked solution is labkit's loop, bit for bit


def test_a_bad_obs_block_leaves_the_model_unchanged(tiny, calibration):
    before = copy.deepcopy(tiny.state_dict())
    right = solutions.lesson02.obs_block
    bad = {
        r"prune_block returned Tensor; it must return \(Q1, Err1, Losses1\)": lambda W1, Hinv1, p: right(W1, Hinv1, p)[
            0
        ],
        "returned Losses1 of shape": lambda W1, Hinv1, p: (lambda r: (r[0], r[1], r[2][:1]))(right(W1, Hinv1, p)),
        "out of turn": lambda W1, Hinv1, p: (p(2, W1), right(W1, Hinv1, p))[1],
    }
    for words, answer in bad.items():
        with pytest.raises(ValueError, match=words):
            prune.sparsegpt(tiny, calibration, 0.5, prune_block=answer)
        after = tiny.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), words
    with pytest.raises(ValueError, match="prune_block=3"):
        prune.sparsegpt(tiny, calibration, 0.5, prune_block=3)


def test_the_learners_smoothing_factors_smooth_the_whole_model(tiny, calibration):
    from labkit import quant

    reference, mine = tiny, copy.deepcopy(tiny)
    expected = quant.smoothquant(reference, calibration, 0.5)
    got = quant.smoothquant(mine, calibration, 0.5, factors=solutions.lesson06.smoothing_factors)
    a, b = reference.state_dict(), mine.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the worked solution is labkit's, bit for bit
    assert all(torch.equal(expected.smoothing.scales[k], got.smoothing.scales[k]) for k in expected.smoothing.scales)


def test_bad_smoothing_factors_leave_the_model_unchanged(tiny, calibration):
    from labkit import quant

    before = copy.deepcopy(tiny.state_dict())
    right = solutions.lesson06.smoothing_factors
    bad = {
        r"factors returned shape \(1, \d+\)": lambda a, ws, alpha: right(a, ws, alpha)[None],
        "finite, positive": lambda a, ws, alpha: right(a, ws, alpha) * 0,
        "factors returned float": lambda a, ws, alpha: 1.0,
    }
    for words, answer in bad.items():
        with pytest.raises(ValueError, match=words):
            quant.smoothquant(tiny, calibration, 0.5, factors=answer)
        after = tiny.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before), words
    with pytest.raises(ValueError, match="factors=2"):
        quant.smooth(tiny, calibration, 0.5, factors=2)


def test_the_learners_whitened_factors_factor_the_whole_model(tiny, calibration):
    from labkit import lowrank

    reference, mine = tiny, copy.deepcopy(tiny)
    expected = lowrank.svd(reference, param_ratio=0.5, activation_aware=True, calibration=calibration)
    got = lowrank.svd(
        mine,
        param_ratio=0.5,
        activation_aware=True,
        calibration=calibration,
        whitened=solutions.lesson08.whitened_factors,
    )
    a, b = reference.state_dict(), mine.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert got.params_after == expected.params_after


def test_bad_whitened_factors_leave_the_model_unchanged(tiny, calibration):
    from labkit import lowrank

    before = copy.deepcopy(tiny.state_dict())
    right = solutions.lesson08.whitened_factors
    bad = {
        r"whitened returned Tensor for layers\.0\.": lambda W, S, r: right(W, S, r)[0],
        "whitened returned B of shape": lambda W, S, r: (lambda t: (t[0], t[1].T, t[2]))(right(W, S, r)),
        "whitened returned A of shape": lambda W, S, r: (lambda t: (t[0][:1], t[1], t[2]))(right(W, S, r)),
    }
    for words, answer in bad.items():
        with pytest.raises(ValueError, match=words):
            lowrank.svd(tiny, param_ratio=0.5, activation_aware=True, calibration=calibration, whitened=answer)
        after = tiny.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before), words
    with pytest.raises(ValueError, match="activation_aware=True"):
        lowrank.svd(tiny, param_ratio=0.5, whitened=right)
