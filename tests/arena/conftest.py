"""Arena tests train tiny models: one torch thread each (many tiny ops; a second thread only adds
synchronisation, and on a busy machine it costs several times the work)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
