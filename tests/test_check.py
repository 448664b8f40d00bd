"""labkit.check's shared core: verdicts name what is wrong."""

import torch

from labkit import check


def test_tensor_like_names_shape_value_and_hint(capsys):
    expected = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    v = check.Verdict("demo")
    assert not check.tensor_like(v, expected.T[:1], expected, "the score")
    assert "shape (1, 2)" in v.problem
    v = check.Verdict("demo")
    assert not check.tensor_like(v, expected.abs(), expected, "the score", hints={"took |x|": expected.abs()})
    assert "took |x|" in v.problem
    v = check.Verdict("demo")
    wrong = expected.clone()
    wrong[1, 0] = 7
    assert not check.tensor_like(v, wrong, expected, "the score")
    assert "index (1, 0)" in v.problem and v.report() is False
    assert capsys.readouterr().out.startswith("✗ demo:")
    v = check.Verdict("demo")
    assert check.tensor_like(v, expected.clone(), expected, "the score") and v.report()


def test_call_reports_exceptions():
    v = check.Verdict("demo")

    def todo(x):
        raise NotImplementedError

    assert check.call(v, todo, 1) is None and "not written yet" in v.problem
    v = check.Verdict("demo")
    assert check.call(v, lambda x: x / 0, 1) is None and "ZeroDivisionError" in v.problem


def test_number_like():
    v = check.Verdict("demo")
    assert not check.number_like(v, "abc", 1.0, "ratio") and "number" in v.problem
    v = check.Verdict("demo")
    assert not check.number_like(v, 2.0, 1.0, "ratio") and "expected 1" in v.problem
