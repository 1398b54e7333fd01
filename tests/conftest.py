import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one torch thread is faster and immune to OpenMP stalls on a busy machine.
    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _prefect_server():
    """One temporary Prefect server (and database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(params=[True, False], ids=["sparse", "dense"])
def kernels(request, monkeypatch):
    """Run a TopK / BatchTopK / Matryoshka test with both implementations: the sparse autograd
    kernels and the dense reference (``sparse_kernels`` on both classes)."""
    from saeflow.saes import BatchTopKSAE, TopKSAE

    for cls in (TopKSAE, BatchTopKSAE):
        monkeypatch.setattr(cls, "sparse_kernels", request.param)
    return request.param
