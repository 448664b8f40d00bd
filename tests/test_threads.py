"""labkit.threads.num_threads: the caller's choice of torch's CPU thread count, restored afterwards."""

import pytest
import torch

from labkit.threads import num_threads


def test_num_threads_sets_and_restores():
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    with num_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"), num_threads(other):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before  # restored on error too
    with num_threads(None):
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_num_threads_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="need a positive number of CPU threads"), num_threads(bad):
        pass
