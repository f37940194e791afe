"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    """One intra-op thread: the tests' tensors are small, and on a busy machine several OpenMP threads
    spin-waiting against other processes make CPU convolutions an order of magnitude slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def _private_recokd_home(tmp_path_factory):
    """Model and ONNX caches in a temporary folder: the tests never write into the user's ~/.cache."""
    previous = os.environ.get("RECOKD_HOME")
    os.environ["RECOKD_HOME"] = str(tmp_path_factory.mktemp("recokd_home"))
    yield
    if previous is None:
        os.environ.pop("RECOKD_HOME", None)
    else:
        os.environ["RECOKD_HOME"] = previous


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder (``../shared/data`` from the repository root, or ``$RECOKD_SHARED_DATA``).

    Tests that use it are skipped when the folder is absent.
    """
    override = os.environ.get("RECOKD_SHARED_DATA")
    path = Path(override) if override else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared real data not found at {path}; set RECOKD_SHARED_DATA to the folder to run this test")
    return path
