import os
from pathlib import Path

import pytest

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
    from labkit import models

    return models.load("tiny-llama-random", device="cpu")


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
