"""The browser's npm package installed by the app itself, where nobody ran `make` (a Hugging Face Space runs only
`pip install -r requirements.txt`, `apt-get install < packages.txt` and `python app.py`).

`BrowserInstall(app_dir, data_dir).start()` runs `npm ci --omit=dev` from the committed package.json + lock, once, on
a thread: beside the app when that folder is writable, else in `data_dir/node` (kept across restarts when the data
dir is on persistent storage). `status` says where it stands, in words a visitor can act on.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mcpft.agent.browser import INSTALLED_STAMP, PLAYWRIGHT_CLI
from mcpft.config import is_writable_dir

log = logging.getLogger(__name__)

PACKAGE_FILES = ("package.json", "package-lock.json")
# --omit=dev: the test-only MCP servers stay out; --prefer-offline: npm's cache first (a restart, a warmed cache).
NPM_ARGS = ("ci", "--omit=dev", "--no-audit", "--no-fund", "--prefer-offline")
NPM_TIMEOUT_S = 600
# npm's error codes for "the registry could not be reached" (no network, no DNS, offline mode with an empty cache).
NETWORK_CODES = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH", "ENOTCACHED",
                 "ERR_SOCKET_TIMEOUT")
LOG_LINES = 8  # the tail of npm's output kept for the page


@dataclass(frozen=True)
class InstallStatus:
    state: str  # "waiting" (not started), "installing", "ready", "failed"
    where: Path  # the folder holding node_modules
    message: str  # one paragraph for the page
    seconds: float = 0.0  # how long the install ran (so far)


def install_root(app_dir: Path, data_dir: Path) -> Path:
    """Beside the app when its folder is writable (a Space's working copy), else `data_dir/node`."""
    return Path(app_dir) if is_writable_dir(Path(app_dir)) else Path(data_dir) / "node"


class BrowserInstall:
    """One `npm ci` of the committed lock into `install_root(...)`, run at most once per process."""

    def __init__(self, app_dir: Path, data_dir: Path):
        self.app_dir = Path(app_dir)
        self.root = install_root(self.app_dir, Path(data_dir))
        self._changed = threading.Condition()
        self._status = InstallStatus("waiting", self.root, "The browser's npm package will be installed.")
        self._thread: threading.Thread | None = None

    @property
    def cli(self) -> Path:
        """Where `@playwright/mcp`'s cli.js is once the install finished."""
        return self.root / "node_modules" / PLAYWRIGHT_CLI

    @property
    def status(self) -> InstallStatus:
        with self._changed:
            status = self._status
        if status.state == "installing":  # the clock keeps running between npm's (rare) lines
            return InstallStatus(status.state, status.where, status.message, time.monotonic() - self._started)
        return status

    def start(self) -> None:
        """Begin the install on a thread (a second call does nothing)."""
        with self._changed:
            if self._thread is not None:
                return
            self._started = time.monotonic()
            self._set("installing", f"Installing the browser's npm package (@playwright/mcp, from package-lock.json) "
                                    f"into `{self.root / 'node_modules'}`…")
            self._thread = threading.Thread(target=self._run, name="mcpft-npm-install", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> InstallStatus:
        """The status once the install is no longer under way (or at `timeout`)."""
        with self._changed:
            self._changed.wait_for(lambda: self._status.state != "installing", timeout=timeout)
        return self.status

    def _set(self, state: str, message: str) -> None:
        with self._changed:
            seconds = time.monotonic() - self._started if state != "waiting" else 0.0
            self._status = InstallStatus(state, self.root, message, seconds)
            self._changed.notify_all()

    def _run(self) -> None:
        try:
            state, message = self._install()
        except Exception as error:  # anything unforeseen still ends the wait with words
            log.exception("the browser install failed")
            state, message = "failed", f"The browser's npm package could not be installed: {type(error).__name__}: " \
                                       f"{error}"
        self._set(state, message)
        log.info("browser install: %s (%s)", state, message)

    def _install(self) -> tuple[str, str]:
        npm = shutil.which("npm")
        if npm is None:
            return "failed", ("**npm is not installed**, so the browser's npm package (@playwright/mcp) cannot be "
                              "installed and the Playwright browser is unavailable. On a Space, `packages.txt` lists "
                              "`nodejs` and `npm`: rebuild the Space (Settings → Factory rebuild). Elsewhere install "
                              "Node.js 18+ with npm, or run `make`. Everything else works, MCP servers reached by URL "
                              "included.")
        self.root.mkdir(parents=True, exist_ok=True)
        if self.root != self.app_dir:  # npm ci installs what the lock next to it says
            for name in PACKAGE_FILES:
                shutil.copyfile(self.app_dir / name, self.root / name)
        (self.root / "node_modules" / INSTALLED_STAMP).unlink(missing_ok=True)
        try:
            done = subprocess.run([npm, *NPM_ARGS], cwd=self.root, capture_output=True, text=True,
                                  timeout=NPM_TIMEOUT_S, env={**os.environ, "npm_config_update_notifier": "false"})
        except subprocess.TimeoutExpired:
            return "failed", (f"Installing the browser's npm package took over {NPM_TIMEOUT_S} s and was stopped "
                              "(a slow or blocked network?). Restart the app to try again.")
        output = "\n".join((done.stdout + done.stderr).strip().splitlines()[-LOG_LINES:])
        if done.returncode != 0:
            return "failed", failure_message(output)
        if not self.cli.is_file():
            return "failed", f"npm finished, but {self.cli} is not there. npm said:\n\n```\n{output}\n```"
        (self.root / "node_modules" / INSTALLED_STAMP).touch()
        return "ready", f"The browser's npm package is installed in `{self.root / 'node_modules'}`."


def failure_message(npm_output: str) -> str:
    """What a failed `npm ci` means, for the page: the network, or npm's own words."""
    if any(code in npm_output for code in NETWORK_CODES):
        head = ("**npm could not reach its registry** (no network, or registry.npmjs.org is blocked), so the "
                "browser's npm package (@playwright/mcp) is not installed and the Playwright browser is unavailable. "
                "The app needs the network once, at its first start (with persistent storage the install is kept). "
                "Restart the app when the network is back; everything else works meanwhile.")
    else:
        head = ("**Installing the browser's npm package failed**, so the Playwright browser is unavailable; "
                "everything else works.")
    return f"{head} npm said:\n\n```\n{npm_output}\n```"
