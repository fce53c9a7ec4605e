import pytest

from qlora_bench.profiles import resolve_model


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly without CUDA (torch may not even be installed)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def llama8b():
    return resolve_model("llama-3.1-8b")


@pytest.fixture(scope="session")
def llama1b():
    return resolve_model("llama-3.2-1b")
