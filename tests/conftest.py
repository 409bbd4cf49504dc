"""Shared fixtures: a tiny LLaMA checkpoint with its own small tokenizer, built offline in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A directory holding a tiny random LlamaForCausalLM and a byte-level BPE tokenizer."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def _workbench_home(tmp_path, monkeypatch):
    """Every test gets its own WORKBENCH_HOME, so nothing touches the user's data, and starts in local
    mode with this process's deployment read afresh (a test that configures one cannot leak it)."""
    from core import deployment

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    for name in ("WORKBENCH_MODE", "SPACE_ID", "WORKBENCH_DATA_DIRS", "WORKBENCH_ALLOW_REMOTE_CODE"):
        monkeypatch.delenv(name, raising=False)
    deployment.configure(None)
    yield
    deployment.configure(None)


@pytest.fixture
def service(tmp_path):
    """A job service on a temporary database and home."""
    from tests.test_jobs_support import make_service

    svc = make_service(tmp_path)
    yield svc
    svc.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """An empty database per test, once on SQLite and once on PostgreSQL (the server of
    ``$WORKBENCH_TEST_DB_URL``; those cases skip, saying so, when it is unset)."""
    from tests.test_jobs_support import fresh_database

    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def data(tmp_path) -> Path:
    """A small arithmetic training file (24 rows)."""
    from tests.test_jobs_support import write_data

    return write_data(tmp_path / "rows.json")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: takes tens of seconds (child processes, real training); CI runs it")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (two for multi-GPU tests); skipped without one")
    config.addinivalue_line("markers", "llamacpp: runs an exported GGUF in llama-cpp-python; skipped where it is "
                                       "not installed (pip install llama-cpp-python builds llama.cpp from source)")
