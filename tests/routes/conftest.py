"""Routes tests run the tiny model with one thread: its matmuls are too small to gain from more, and a
shared machine makes extra threads wait on each other."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
