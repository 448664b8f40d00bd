"""labkit.reuse: a perplexity is reused only for the very same measurement, in the same results folder."""

import copy

import pytest
import torch

from labkit import evaluate, models, reuse


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def forwards(monkeypatch):
    """Counts the tiny model's forward passes (patched on the class, so the model itself is unchanged)."""
    counter = {"n": 0}
    cls = type(models.load("tiny-llama-random", device="cpu")[0])
    original = cls.forward

    def counting(self, *args, **kwargs):
        counter["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counting)
    return counter


IDS = torch.randint(0, 256, (1, 4 * 16), generator=torch.Generator().manual_seed(0))


def measure(model, **kwargs):
    return evaluate.perplexity(model, IDS, 16, progress=False, **kwargs)


def test_same_measurement_is_reused(tiny, results, forwards):
    first = measure(tiny)
    assert forwards["n"] == 4
    again = measure(copy.deepcopy(tiny))  # another object, the same computation
    assert again == first and forwards["n"] == 4
    assert (results / reuse.STORE).exists()


def test_a_fresh_results_folder_measures(tiny, results, forwards, tmp_path_factory, monkeypatch):
    measure(tiny)
    monkeypatch.setenv("LABKIT_RESULTS_DIR", str(tmp_path_factory.mktemp("other")))
    measure(tiny)
    assert forwards["n"] == 8


def test_any_change_is_measured(tiny, results, forwards):
    base = measure(tiny)
    changed = copy.deepcopy(tiny)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3  # one weight
    assert measure(changed) != base and forwards["n"] == 8
    setting = copy.deepcopy(tiny)
    setting.model.layers[1].self_attn.scaling = 0.5  # one plain setting that the forward reads
    assert measure(setting) != base and forwards["n"] == 12
    measure(tiny, batch_size=2)  # another batching: 2 passes of 2 windows
    assert forwards["n"] == 12 + 2


def test_windows_are_shared_between_protocols(tiny, results, forwards):
    first_two = measure(tiny, max_windows=2)
    assert forwards["n"] == 2
    measure(tiny)  # 4 windows: the first 2 are stored
    assert forwards["n"] == 4
    assert measure(tiny, max_windows=2, reuse=False) == first_two  # a stored window is what running gives
    assert forwards["n"] == 6


def test_threads_and_code_are_part_of_the_key(tiny, results, monkeypatch):
    name = reuse.model_key(tiny)
    keys = {reuse.key(name, "window nll", IDS)}
    torch.set_num_threads(torch.get_num_threads() + 1)
    try:
        keys.add(reuse.key(name, "window nll", IDS))
    finally:
        torch.set_num_threads(torch.get_num_threads() - 1)
    monkeypatch.setattr(reuse, "code_version", lambda: "another labkit")
    keys.add(reuse.key(name, "window nll", IDS))
    assert len(keys) == 3 and reuse.key(None, "window nll", IDS) is None


def test_what_cannot_be_named_is_always_measured(tiny, results, forwards):
    handle = tiny.model.layers[0].register_forward_hook(lambda *args: None)
    measure(tiny)
    measure(tiny)
    handle.remove()
    assert forwards["n"] == 8
    tiny.model.layers[0].helper = object()  # state the key cannot write down
    assert reuse.model_key(tiny) is None
    measure(tiny)
    assert forwards["n"] == 12


def test_reuse_false_always_measures(tiny, results, forwards):
    measure(tiny)
    measure(tiny, reuse=False)
    assert forwards["n"] == 8


def test_offloaded_model_is_measured(tiny, results, tmp_path):
    from labkit import parallel

    offloaded = parallel.offload(copy.deepcopy(tiny), folder=tmp_path / "layers")
    assert reuse.model_key(offloaded) is None


def test_tensors_without_readable_bytes_are_never_keyed(tiny):
    from torch._subclasses.fake_tensor import FakeTensorMode  # what labkit.rehearsal runs lessons with

    assert reuse.model_key(copy.deepcopy(tiny).to("meta")) is None
    name = reuse.model_key(tiny)
    assert name is not None
    assert reuse.key(name, "window nll", IDS.to("meta")) is None
    assert reuse.key(name, "window nll", FakeTensorMode().from_tensor(IDS)) is None


def test_a_module_class_from_outside_the_libraries_is_never_keyed(tiny):
    class Doubler(torch.nn.Module):  # e.g. written in a notebook, and perhaps edited before the next run
        def forward(self, x):
            return 2 * x

    tiny.model.layers[0].mlp.act_fn = Doubler()
    assert reuse.model_key(tiny) is None
