"""Shared fixtures: tiny random-weight models of every supported architecture (no downloads)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from caploc.models.tiny import TINY_ARCHS, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models():
    """{model_type: model} for all 11 architectures (built once per session)."""
    return {mt: tiny_model(mt) for mt in TINY_ARCHS}


@pytest.fixture(params=TINY_ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads; on a shared CPU the second thread only burns time spinning."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
