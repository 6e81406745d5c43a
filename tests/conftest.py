"""Shared fixtures. Integration fixtures start real processes on loopback and stop every one of them."""
from __future__ import annotations

import os

import pytest
import torch

# Each test process and each server gets one torch thread: the machine has 2 cores and several processes.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def embedded_dir():
    from corolla.models.embedded import embedded_model_dir

    return embedded_model_dir()
