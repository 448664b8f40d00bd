import copy
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# Keep test runs (and the notebooks nbval executes) out of the learner's own results folder.
os.environ.setdefault("LABKIT_RESULTS_DIR", str(ROOT / "build" / "test-results"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton chooses its CPU interpreter or GPU compilation when it is first imported (labkit.kernels
# imports it), so before any test module: the kernels' tests run interpreted unless the caller sets
# TRITON_INTERPRET=0 (benchmarks/gpu_check.sh does, on a GPU).
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def tiny():
    """A fresh tiny random Llama (2 layers, 4 query / 2 KV heads, vocabulary 256) on CPU, this test's alone to change.

    A test that needs the unchanged model beside it takes `copy.deepcopy(tiny)` before changing it.
    """
    from labkit import models

    return models.load("tiny-llama-random", device="cpu")[0]


@pytest.fixture
def tiny_tokenizer():
    """The tiny model's byte-level tokenizer."""
    from labkit import models

    return models.load("tiny-llama-random", device="cpu")[1]


@pytest.fixture
def calibration():
    """Four seeded windows of 32 random token ids for the tiny model: [n_samples, seqlen]."""
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests, restored afterwards. A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`: tiny tensors gain nothing from threads, and on a
    shared 2-core machine OpenMP threads spinning against other processes made such tests 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M from the offline package (read once per session, fresh copy per use)."""
    from labkit import models

    return models.load("smollm2-135m", device="cpu")


@pytest.fixture
def data_dir():
    d = os.environ.get("LABKIT_DATA_DIR")
    if not d:
        pytest.fail("LABKIT_DATA_DIR is not set: point it at the offline WikiText-2 copy (CI uses ../shared/data).")
    return Path(d)


@pytest.fixture
def target_and_draft(tiny):
    """(target, draft) for speculative decoding. The tiny random model at its default initialisation decodes one
    token over and over, which any draft guesses; with its weight matrices ×8 its greedy output varies from token
    to token. The draft is that target with every weight perturbed by 5% (relative): it agrees with the target on
    some tokens and not others."""
    with torch.no_grad():
        for p in tiny.parameters():
            if p.dim() == 2:
                p.mul_(8)
        draft = copy.deepcopy(tiny)
        g = torch.Generator().manual_seed(1)
        for p in draft.parameters():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
    return tiny, draft
