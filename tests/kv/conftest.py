"""KV tests run many small forwards: one intra-op thread avoids OpenMP spin-waits on a shared CPU
(a tiny decode step goes from ~1 s to ~10 ms when the cores are oversubscribed)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
