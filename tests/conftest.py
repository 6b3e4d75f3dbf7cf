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


@pytest.fixture(autouse=True)
def _seed_and_clean_backend_env(monkeypatch):
    """Each test starts from seed 0 and automatic backend choice, whatever the shell set."""
    torch.manual_seed(0)
    for key in list(os.environ):
        if key.startswith("EPG_BACKEND"):
            monkeypatch.delenv(key)
