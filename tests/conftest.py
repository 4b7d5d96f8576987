import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    # Tests choose the backend explicitly; a user's environment must not leak in.
    monkeypatch.delenv("OPENSORA_FAST_BACKEND", raising=False)
