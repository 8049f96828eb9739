"""Shared fixtures: the real Trelis traces (when ../shared is present), a store file, a tiny random model."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub is unreachable here; nothing may try it
# The suite never reads or writes the user's data dir (a training run records its speed there, for one).
os.environ["MCPFT_HOME"] = tempfile.mkdtemp(prefix="mcpft-tests-")
atexit.register(shutil.rmtree, os.environ["MCPFT_HOME"], ignore_errors=True)

REPO = Path(__file__).resolve().parent.parent
TRELIS_DIR = REPO.parent / "shared" / "fixtures" / "trelis-traces"


@pytest.fixture(scope="session")
def trelis_dir() -> Path:
    if not TRELIS_DIR.is_dir():
        pytest.skip(f"the shared Trelis traces are not at {TRELIS_DIR} (they come with ../shared)")
    return TRELIS_DIR


@pytest.fixture
def store(tmp_path):
    from mcpft.store import Store

    with Store(tmp_path / "mcpft.db") as s:
        yield s


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", template="hermes")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    from tests.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3") / "model", template="qwen3")
