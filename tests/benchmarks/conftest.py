import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _one_torch_thread_in_the_repo_root(monkeypatch):
    """The harnesses' config paths are relative to the repository root; one torch thread, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.chdir(REPO)
    yield
    torch.set_num_threads(before)
