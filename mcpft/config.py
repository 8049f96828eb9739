"""Where mcpft keeps its data, and the app's own settings (space.yaml, overridden by the environment)."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SPACE_YAML = REPO_ROOT / "space.yaml"


PERSISTENT_ROOT = Path("/data")  # where a Hugging Face Space mounts its persistent storage, when it has some


def data_dir() -> Path:
    """`$MCPFT_HOME`, else `/data/mcpft` on a Space with persistent storage, else `~/.local/share/mcpft`.

    `/data` counts only when it is writable: a Space without persistent storage may still have an empty `/data`
    owned by root, and the app runs as another user there."""
    if os.environ.get("MCPFT_HOME"):
        return Path(os.environ["MCPFT_HOME"]).expanduser()
    if is_writable_dir(PERSISTENT_ROOT):
        return PERSISTENT_ROOT / "mcpft"
    return Path.home() / ".local" / "share" / "mcpft"


def is_writable_dir(path: Path) -> bool:
    """Whether a file can be created in `path`, tried for real: permission bits say nothing for root, a read-only
    mount or an immutable folder."""
    if not path.is_dir():
        return False
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".mcpft-write-test-"):
            return True
    except OSError:
        return False


def default_db_path() -> Path:
    return data_dir() / "mcpft.db"


def load_settings(path: Path = SPACE_YAML) -> dict:
    """The app's configuration: `space.yaml`, then `MCPFT_<KEY>` environment variables override top-level keys."""
    settings = yaml.safe_load(path.read_text()) if path.exists() else {}
    settings = settings or {}
    for key in list(settings):
        env_value = os.environ.get(f"MCPFT_{key.upper()}")
        if env_value is not None:
            settings[key] = yaml.safe_load(env_value)
    return settings


def default_base_model(settings: dict) -> str | None:
    """space.yaml's `base_model` for this machine: `gpu` with CUDA, else `cpu` ("smollm2" = the packaged model)."""
    base = settings.get("base_model") or {}
    if not isinstance(base, dict):
        return str(base)
    on_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        on_cuda = torch.cuda.is_available()
    return base.get("gpu" if on_cuda else "cpu")
