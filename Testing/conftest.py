"""Shared pytest fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

#: set in the fresh pytest process that runs one ``own_process`` test
_OWN_PROCESS = "RECOKD_TEST_OWN_PROCESS"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "own_process: the test runs in a fresh pytest process. For tests that load OpenVINO: its "
        "thread pool, once in the suite's process, crashed later tests that fork (nnU-Net, data-loader workers).")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """An ``own_process`` test is run by a child pytest on its node id; its outcome is this test's."""
    if pyfuncitem.get_closest_marker("own_process") is None or os.environ.get(_OWN_PROCESS):
        return None
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, _OWN_PROCESS: "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", pyfuncitem.nodeid],
                              cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    except subprocess.TimeoutExpired:
        pytest.fail("in its own process: still running after 1200 s", pytrace=False)
    tail = (done.stdout + done.stderr)[-6000:]
    if done.returncode != 0:
        pytest.fail(f"in its own process (exit {done.returncode}):\n{tail}", pytrace=False)
    if " passed" not in done.stdout:
        reasons = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
        pytest.skip(f"in its own process: {(reasons or [tail.strip()])[-1]}")
    return True


@pytest.fixture(autouse=True)
def _no_openvino_in_the_suites_process(request, monkeypatch):
    """``auto`` leaves OpenVINO out in the suite's process (see ``own_process``); tests of OpenVINO are marked."""
    if request.node.get_closest_marker("own_process") is not None:
        yield
        return
    from ReCoKDLib.inference import backends

    available = backends._engine_available
    monkeypatch.setattr(backends, "_engine_available", lambda name: name != "openvino" and available(name))
    loaded = "openvino" in sys.modules
    yield
    # caught here, at the test that loaded it, not as a crash of some later test that forks
    assert loaded or "openvino" not in sys.modules, "this test loaded OpenVINO: mark it @pytest.mark.own_process"


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
