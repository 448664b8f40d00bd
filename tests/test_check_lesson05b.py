"""labkit.check.lesson05b: the right answer passes; typical mistakes get their specific message; the worked
solution, plugged into quant.awq, gives labkit's model bit for bit."""

import copy
import importlib

import pytest
import torch

from labkit import check, quant, solutions
from labkit.quant.formats import fake_quantize

awq = importlib.import_module("labkit.quant.awq")
pytestmark = pytest.mark.usefixtures("one_thread")


def _error(delta, H):
    return ((delta @ H) * delta).sum().item() / 2


SLIPS = {
    "did not divide the error by s": lambda W, H, s, b, g: _error(fake_quantize(W * s, b, g) - W * s, H),
    "quantized W itself": lambda W, H, s, b, g: _error(fake_quantize(W, b, g) - W, H),
    "1 / s instead of s": lambda W, H, s, b, g: _error((fake_quantize(W / s, b, g) - W / s) * s, H),
    "forgot the 1/2": lambda W, H, s, b, g: 2 * solutions.lesson05b.scaled_error(W, H, s, b, g),
    "only the diagonal of H": lambda W, H, s, b, g: (
        (((fake_quantize(W * s, b, g) - W * s) / s) ** 2 * H.diagonal()).sum().item() / 2
    ),
}


def test_the_worked_solution_and_labkits_pass(capsys):
    assert check.lesson05b.scaled_error(solutions.lesson05b.scaled_error)
    assert check.lesson05b.scaled_error(awq.scaled_error)
    assert capsys.readouterr().out.count("✓ scaled_error") == 2


@pytest.mark.parametrize("words", list(SLIPS))
def test_each_slip_is_named(words, capsys):
    assert not check.lesson05b.scaled_error(SLIPS[words])
    assert words in capsys.readouterr().out


def test_a_stub_and_a_non_number_are_reported(capsys):
    def todo(W, H, s, bits, group_size):
        raise NotImplementedError

    assert not check.lesson05b.scaled_error(todo)
    assert "not written yet" in capsys.readouterr().out
    assert not check.lesson05b.scaled_error(lambda W, H, s, b, g: torch.ones(3))
    assert "should be a number" in capsys.readouterr().out


def test_the_worked_solution_quantizes_the_model_as_labkit_does(tiny, calibration):
    mine = copy.deepcopy(tiny)
    expected = quant.awq(tiny, calibration, bits=4, group_size=16, n_grid=4)
    got = quant.awq(mine, calibration, bits=4, group_size=16, n_grid=4, loss=solutions.lesson05b.scaled_error)
    a, b = tiny.state_dict(), mine.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert expected.alphas == got.alphas
