import pytest
import torch

from labkit import profiles


def test_default_is_cpu_without_cuda(monkeypatch):
    monkeypatch.delenv("LABKIT_PROFILE", raising=False)
    expected = "gpu" if torch.cuda.is_available() else "cpu"
    assert profiles.get().name == expected


def test_env_override_and_bad_name(monkeypatch):
    monkeypatch.setenv("LABKIT_PROFILE", "cpu")
    p = profiles.get()
    assert (p.name, p.model, p.seqlen) == ("cpu", "smollm2-135m", 512)
    monkeypatch.setenv("LABKIT_PROFILE", "tpu")
    with pytest.raises(ValueError, match=r"profile 'tpu'.*\['cpu', 'gpu'\]"):
        profiles.get()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without CUDA")
def test_gpu_profile_without_cuda_explains(monkeypatch):
    monkeypatch.setenv("LABKIT_PROFILE", "gpu")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        profiles.get()


def test_gpu_profile_is_the_papers_protocol():
    g = profiles.PROFILES["gpu"]
    assert (g.model, g.seqlen, g.eval_windows, g.calib_samples, g.dtype) == ("llama-7b", 2048, None, 128, torch.float16)
