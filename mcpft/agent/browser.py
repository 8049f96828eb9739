"""The Playwright MCP browser server: find Chromium and the installed `@playwright/mcp`, write its config.

`playwright_server(output_dir)` returns a stdio `ServerSpec` for `ToolHub`; the server runs with `output_dir`
as its working folder, so its snapshot files, screenshots and any file the model names land there.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mcpft.agent.mcp import PLAYWRIGHT_UNSAFE_TOOLS, ServerSpec

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
PLAYWRIGHT_CLI = Path("@playwright") / "mcp" / "cli.js"
CONFIG_FILE = "playwright-mcp.json"

# Tests only: Chromium resolves no host but this machine (it otherwise looks up Google hosts at start).
OFFLINE_ARGS = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",)

_CHROMIUM_PATHS = (
    "/usr/bin/chromium",
    "/usr/bin/chromium-browser",
    "/usr/bin/google-chrome",
    "/usr/bin/google-chrome-stable",
    "/opt/google/chrome/chrome",
)
_CHROMIUM_COMMANDS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_PLAYWRIGHT_CACHE_GLOBS = ("chromium-*/chrome-linux*/chrome",)
_DISPLAY_VARIABLES = ("DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY", "XDG_RUNTIME_DIR")


class BrowserSetupError(RuntimeError):
    """Something the browser needs is missing; the message says how to install it."""


def find_chromium() -> str:
    """The Chromium/Chrome executable to use: $CHROME_PATH, system installs, then Playwright's download cache."""
    chosen = os.environ.get("CHROME_PATH")
    if chosen:
        if not _is_executable(chosen):
            raise BrowserSetupError(f"CHROME_PATH is {chosen!r}, which is not an executable file")
        return chosen
    candidates = [*_CHROMIUM_PATHS, *filter(None, map(shutil.which, _CHROMIUM_COMMANDS)), *_playwright_cache()]
    for candidate in candidates:
        if _is_executable(candidate):
            return candidate
    raise BrowserSetupError(
        "No Chromium or Chrome found. Install one with `apt-get install chromium` (Debian/Ubuntu), "
        "or set CHROME_PATH to a Chrome/Chromium executable. Looked at: " + ", ".join(_CHROMIUM_PATHS)
        + ", the PATH, and Playwright's cache (~/.cache/ms-playwright)."
    )


def _playwright_cache() -> list[str]:
    cache = Path(os.environ.get("PLAYWRIGHT_BROWSERS_PATH") or Path.home() / ".cache" / "ms-playwright")
    found = [path for pattern in _PLAYWRIGHT_CACHE_GLOBS for path in glob.glob(str(cache / pattern))]
    return sorted(found, reverse=True)  # the newest revision first


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


class PlaywrightNotInstalled(BrowserSetupError):
    """`@playwright/mcp` is not in any node_modules we look in (the app can install it: mcpft.agent.node_install)."""


INSTALLED_STAMP = ".installed"  # written once `npm ci` finished (by `make` and by the app's own install)


def find_playwright_cli(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """`@playwright/mcp`'s cli.js: in $MCPFT_NODE_MODULES, else the node_modules beside the package (repo root),
    else the one the app installed in `data_dir/node` (where the app dir is read-only)."""
    override = os.environ.get("MCPFT_NODE_MODULES")
    if override:
        cli = Path(override) / PLAYWRIGHT_CLI
        if cli.is_file():
            return cli
        raise PlaywrightNotInstalled(
            f"Playwright MCP is not installed: {cli} is missing (node_modules from MCPFT_NODE_MODULES). Run `make` "
            f"(or `npm ci` in {REPO_ROOT}) and unset MCPFT_NODE_MODULES, or set it to a node_modules folder that "
            "has @playwright/mcp.")
    candidates = [REPO_ROOT / "node_modules"]
    if data_dir is not None:
        candidates.append(Path(data_dir) / "node" / "node_modules")
    for node_modules in candidates:
        cli = node_modules / PLAYWRIGHT_CLI
        # Our own installs count once finished: a killed `npm ci` may leave cli.js without its dependencies.
        finished = node_modules == REPO_ROOT / "node_modules" or (node_modules / INSTALLED_STAMP).exists()
        if cli.is_file() and finished:
            return cli
    raise PlaywrightNotInstalled(
        f"Playwright MCP is not installed: {candidates[0] / PLAYWRIGHT_CLI} is missing. Run `make` (or `npm ci` in "
        f"{REPO_ROOT}) to install it, or set MCPFT_NODE_MODULES to a node_modules folder that has @playwright/mcp; "
        "the app installs it by itself at start when npm is there."
    )


def find_node() -> str:
    node = shutil.which("node")
    if node is None:
        raise BrowserSetupError("Node.js is not installed (no `node` on the PATH); Playwright MCP needs it. "
                                "Install it with `apt-get install nodejs` (Debian/Ubuntu), then run `make`.")
    return node


def playwright_config(output_dir: Path, *, headless: bool, offline: bool, extra_args: Sequence[str]) -> dict[str, Any]:
    """Playwright MCP's config: an isolated Chromium we found ourselves (it would look for Chrome in /opt)."""
    launch: dict[str, Any] = {"executablePath": find_chromium(), "headless": headless}
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        launch["chromiumSandbox"] = False  # Chromium refuses to start sandboxed as root
    launch["args"] = [*extra_args, *(OFFLINE_ARGS if offline else ())]
    return {
        "browser": {"browserName": "chromium", "isolated": True, "launchOptions": launch},
        "outputDir": str(output_dir),
    }


def playwright_server(output_dir: str | os.PathLike[str], headless: bool = True, offline: bool = False,
                      extra_args: Sequence[str] = (), *, allow_unsafe_tools: bool = False,
                      name: str = "playwright", cli: str | os.PathLike[str] | None = None) -> ServerSpec:
    """Write the Playwright MCP config under `output_dir` and return the stdio spec that runs it.

    Headless unless `headless=False` and a display exists. `offline=True` keeps Chromium off the network
    (tests only). Unsafe tools (`browser_run_code_unsafe`) stay hidden unless `allow_unsafe_tools`. `cli`: where
    `@playwright/mcp`'s cli.js is or will be (an install under way); default: found where it was installed.
    """
    node = find_node()  # fail before writing anything
    cli = Path(cli) if cli is not None else find_playwright_cli()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    if not headless and not has_display():
        log.warning("a visible browser was asked for, but there is no DISPLAY: running headless")
        headless = True
    config = playwright_config(output_dir, headless=headless, offline=offline, extra_args=extra_args)
    config_path = output_dir / CONFIG_FILE
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    # The SDK passes a server only a few variables (PATH, HOME, ...): a visible browser needs the display's too.
    display_env = {} if headless else {k: os.environ[k] for k in _DISPLAY_VARIABLES if k in os.environ}
    return ServerSpec(
        name,
        command=node,
        args=(str(cli), "--config", str(config_path)),
        env=display_env,
        cwd=str(output_dir),
        inline_snapshots=True,
        disabled_tools=frozenset() if allow_unsafe_tools else PLAYWRIGHT_UNSAFE_TOOLS,
    )


def has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def default_mcp_config(data_dir: str | os.PathLike[str], headless: bool = True,
                       cli: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The `{"mcpServers": {...}}` config with the browser, its files under `data_dir/browser`. A visible browser
    (`headless=False`) is something the user asked for, so no display is an error here, not a quiet fallback.
    `cli`: as for `playwright_server` (the app passes the path an install under way will fill)."""
    if not headless and not has_display():
        raise BrowserSetupError("a visible browser was asked for, but there is no display (neither DISPLAY nor "
                                "WAYLAND_DISPLAY is set): run headless, or inside a desktop session or `xvfb-run`")
    find_node()  # the first thing missing is the one to report
    cli = cli if cli is not None else find_playwright_cli(data_dir)
    spec = playwright_server(Path(data_dir) / "browser", headless=headless, cli=cli)
    return {"mcpServers": {spec.name: spec.to_config()}}
