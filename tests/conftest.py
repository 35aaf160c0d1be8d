"""Shared test helpers: where the real CIFAR-10 is, if anywhere."""

import os
from pathlib import Path

import pytest


def real_data_dir():
    """The folder from KMJAX_DATA_DIR if it holds cifar-10-batches-py, else None."""
    root = os.environ.get("KMJAX_DATA_DIR")
    if root and (Path(root) / "cifar-10-batches-py" / "data_batch_1").is_file():
        return Path(root)
    return None


requires_data = pytest.mark.skipif(real_data_dir() is None,
                                   reason="real CIFAR-10 not found: set KMJAX_DATA_DIR")


def pytest_configure(config):
    # runs compile into a cache of this test session, never into the user's ~/.cache
    import tempfile

    os.environ.setdefault("KMJAX_COMPILE_CACHE", tempfile.mkdtemp(prefix="kmjax-test-jit-"))


@pytest.fixture(scope="session")
def small_cifar(tmp_path_factory):
    """A synthetic cifar-10-batches-py of 40 images per batch (read only: copy it to change it)."""
    from synthetic_cifar import make_cifar

    root = tmp_path_factory.mktemp("small-cifar")
    make_cifar(root, n=40)
    return root
