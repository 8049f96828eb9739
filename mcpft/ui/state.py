"""What the app's tabs share: the process-wide context (store, data dir, settings, embedded endpoint) and the
components one tab defines and another reads (the owner, the endpoint fields, the MCP config, the agent session)."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mcpft.agent.session import EmbeddedEndpoint
from mcpft.config import data_dir as default_data_dir
from mcpft.config import default_base_model, load_settings
from mcpft.store import Store

SESSION_TTL_S = 24 * 3600


@dataclass
class AppContext:
    store: Store
    data_dir: Path
    settings: dict
    embedded: EmbeddedEndpoint
    default_model: str | None  # the model spec the embedded endpoint serves at start (None: packaged SmolLM2)
    mcp_config: dict  # the default {"mcpServers": ...} shown in the Endpoint tab
    mcp_config_error: str = ""  # why the default browser config could not be built (shown, never fatal)
    on_space: bool = False  # a Hugging Face Space: owners come from OAuth, the login button is shown
    browser_secret: str = ""  # encrypts the browser-side session id (kept in the data dir across restarts)
    train_jobs: dict = field(default_factory=dict)  # owner -> their running or last mcpft.ui.train_tab.TrainJob
    compare_endpoint: EmbeddedEndpoint | None = None  # base + adapter for Evaluate's side-by-side chat
    compare_lock: threading.Lock = field(default_factory=threading.Lock)
    demo_site: object = None  # mcpft.demo's local shop + docs site (its tasks are offered in the Agent tab)
    browser_install: object = None  # mcpft.agent.node_install.BrowserInstall when the app installs the browser itself

    def close(self) -> None:
        """Stop what the app started: the embedded endpoints, the demo site, the store."""
        for server in (self.embedded, self.compare_endpoint):
            if server is not None:
                server.stop()
        if self.demo_site is not None:
            self.demo_site.stop()
        self.store.close()

    @property
    def scratch_dir(self) -> Path:
        """Files handed to the browser (exports) must live where Gradio may serve them from: the temp dir."""
        path = Path(tempfile.gettempdir()) / "mcpft-app"
        path.mkdir(parents=True, exist_ok=True)
        return path


def make_context(data_dir: Path | None = None, model: str | None = None, settings: dict | None = None,
                 extra_backends: dict | None = None, mcp_config: dict | None = None) -> AppContext:
    """The app's context from `space.yaml` (or `settings`), with explicit arguments taking precedence.
    `extra_backends` (model name -> mcpft.serve Backend) are served beside the model; default: the demo teacher."""
    settings = load_settings() if settings is None else settings
    if data_dir is None:
        data_dir = Path(settings["storage_dir"]).expanduser() if settings.get("storage_dir") else default_data_dir()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    config_error = ""
    if extra_backends is None:
        from mcpft.demo.world import TEACHER, TeacherBackend

        extra_backends = {TEACHER: TeacherBackend()}  # the demo's scripted teacher, served as a model
    install = None
    if mcp_config is None:
        mcp_config, config_error, install = _default_mcp_config(settings, data_dir)
    return AppContext(
        store=Store(data_dir / "mcpft.db"), data_dir=data_dir, settings=settings,
        embedded=EmbeddedEndpoint(data_dir, extra_backends), default_model=model or default_base_model(settings),
        mcp_config=mcp_config, mcp_config_error=config_error, on_space=bool(os.environ.get("SPACE_ID")),
        browser_secret=_browser_secret(data_dir), browser_install=install)


def _default_mcp_config(settings: dict, data_dir: Path) -> tuple[dict, str, object]:
    """(the default MCP config, why the browser is unavailable, the browser install the app started or None).

    Where nobody ran `make` (a Space), `@playwright/mcp` is missing: the app installs it in the background and the
    config already names the cli.js that install will write, so the page shows it at once."""
    if settings.get("mcp_servers"):
        return settings["mcp_servers"], "", None
    from mcpft.agent.browser import REPO_ROOT, BrowserSetupError, PlaywrightNotInstalled, default_mcp_config
    from mcpft.agent.node_install import BrowserInstall

    try:
        return default_mcp_config(data_dir), "", None
    except PlaywrightNotInstalled:
        pass
    except BrowserSetupError as error:  # no Node or no Chromium: an npm install would not help
        return {"mcpServers": {}}, str(error), None
    install = BrowserInstall(REPO_ROOT, data_dir)
    try:
        config = default_mcp_config(data_dir, cli=install.cli)
    except BrowserSetupError as error:
        return {"mcpServers": {}}, str(error), None
    install.start()
    return config, "", install


def _browser_secret(data_dir: Path) -> str:
    """A secret made once per data dir, so a browser's session id survives restarts (and its traces stay its)."""
    path = data_dir / "browser-state.secret"
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


@dataclass
class Shared:
    """Components defined in one tab and used by another (filled in as the tabs are built)."""

    demo: object = None  # the gr.Blocks (for load events)
    owner: object = None  # gr.State: "hf:USER" or "browser:ID"
    preset: object = None
    base_url: object = None
    model: object = None
    api_key: object = None  # a password field: sent with requests that need it, never stored server-side
    mcp_json: object = None
    session: object = None  # gr.State: the visitor's AgentSession
    truncate: object = None


def mcp_config_text(config: dict) -> str:
    return json.dumps(config, indent=2)
