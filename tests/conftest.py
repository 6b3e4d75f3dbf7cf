import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none found)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _ieee_float32_on_cuda():
    """float32 tests compare kernels that compute in IEEE float32 with references that run
    through cuDNN, whose convolutions default to TF32 (~2e-4 off at patch_embed's sizes)."""
    if not torch.cuda.is_available():
        yield
        return
    from epg.evaluation.inception import full_fp32

    with full_fp32(torch.device("cuda")):
        yield


@pytest.fixture(autouse=True)
def _seed_and_clean_backend_env(monkeypatch):
    """Each test starts from seed 0 and automatic backend choice, whatever the shell set."""
    torch.manual_seed(0)
    for key in list(os.environ):
        if key.startswith("EPG_BACKEND"):
            monkeypatch.delenv(key)
