"""The real Playwright MCP server and Chromium, driven through ToolHub against pages served on 127.0.0.1."""

import functools
import http.server
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import anyio
import jsonschema
import pytest

from mcpft.agent import browser
from mcpft.agent.browser import BrowserSetupError, default_mcp_config, find_chromium, playwright_server
from mcpft.agent.mcp import ToolHub, load_mcp_config

pytestmark = pytest.mark.anyio

PAGES = Path(__file__).with_name("pages")
NOTICE = "\n[Content truncated to 16000 characters]"


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def site():
    """tests/pages served by the stdlib on a free port of 127.0.0.1."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=PAGES))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return playwright_server(tmp_path_factory.mktemp("browser"), offline=True)


@pytest.fixture(scope="module")
async def hub(spec, tmp_path_factory):
    """One Playwright MCP server (and browser) for the whole module."""
    async with ToolHub([spec], tmp_path_factory.mktemp("results")) as live:
        yield live


def ref_of(snapshot: str, role: str, name: str) -> str:
    match = re.search(rf'{role} "{re.escape(name)}" \[ref=(\w+)\]', snapshot)
    assert match, f"no {role} {name!r} in the snapshot:\n{snapshot[:2000]}"
    return match[1]


def descendants(pid: int) -> set[int]:
    """The pids of every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def server_pid(marker: str) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes() and (entry / "comm").read_text().strip() == "node":
                    return int(entry.name)
            except OSError:
                continue
    raise AssertionError(f"no node process running {marker}")


# ----------------------------------------------------------------------------------------------- the server


async def test_initialize_and_tool_list(hub):
    names = {tool.name for tool in hub.tools}
    assert len(names) >= 20
    assert {"browser_navigate", "browser_snapshot", "browser_click", "browser_take_screenshot"} <= names
    assert "browser_run_code_unsafe" not in names  # unsafe tools stay off by default
    assert hub.renamed == {}
    for function in hub.openai_tools():
        parameters = function["function"]["parameters"]
        assert parameters["type"] == "object" and "$schema" not in parameters
        assert "propertyNames" not in json.dumps(parameters)
        jsonschema.Draft202012Validator.check_schema(parameters)
    refused = await hub.call("browser_run_code_unsafe", {"code": "async (page) => 1"})
    assert refused.is_error and "unknown tool 'browser_run_code_unsafe'" in refused.text


async def test_navigate_shows_the_snapshot_inline(hub, site):
    result = await hub.call("browser_navigate", {"url": f"{site}/index.html"})
    assert not result.is_error, result.text
    assert "- Page Title: Tide Tables Home" in result.text
    assert "```yaml" in result.text and 'heading "Tide tables"' in result.text
    assert "[Snapshot](" not in result.text  # the model sees the page, not a file link
    assert "[Snapshot](" in json.dumps(result.raw)  # the server's own reply stays in the trace


async def test_click_a_link_by_ref_from_the_snapshot(hub, site):
    page = await hub.call("browser_navigate", {"url": f"{site}/index.html"})
    ref = ref_of(page.text, "link", "Saltmarsh Harbour")
    clicked = await hub.call("browser_click", json.dumps({"element": "Saltmarsh Harbour link", "target": ref}))
    assert not clicked.is_error, clicked.text
    assert "- Page Title: Saltmarsh Harbour Tides" in clicked.text
    assert "High water 06:42" in clicked.text


async def test_explicit_snapshot(hub, site):
    await hub.call("browser_navigate", {"url": f"{site}/harbour.html"})
    snapshot = await hub.call("browser_snapshot", {})
    assert not snapshot.is_error
    assert "```yaml" in snapshot.text and 'heading "Saltmarsh Harbour"' in snapshot.text


async def test_long_page_is_truncated(hub, site):
    result = await hub.call("browser_navigate", {"url": f"{site}/long.html"})
    assert not result.is_error
    assert result.text.endswith(NOTICE) and len(result.text) == 16000 + len(NOTICE)
    assert "Entry 1: seventeen crates" in result.text


async def test_screenshot_is_saved_as_an_image_file(hub, site):
    await hub.call("browser_navigate", {"url": f"{site}/index.html"})
    result = await hub.call("browser_take_screenshot", {"scale": "css"})
    assert not result.is_error and len(result.images) == 1
    image = result.images[0]
    assert image.read_bytes().startswith(b"\x89PNG") and image.stat().st_size > 1000
    assert f"[image: {image.name}]" in result.text


async def test_per_call_timeout_then_the_browser_still_answers(hub, site):
    started = time.monotonic()
    waited = await hub.call("browser_wait_for", {"time": 30}, timeout=1)
    assert waited.is_error and "browser_wait_for did not answer within 1 s" in waited.text
    assert time.monotonic() - started < 10
    result = await hub.call("browser_navigate", {"url": f"{site}/harbour.html"})
    assert not result.is_error and "Saltmarsh Harbour Tides" in result.text


async def test_bad_url_is_an_error_without_ansi(hub, site):
    result = await hub.call("browser_navigate", {"url": "http://no-such-host.invalid/"})
    assert result.is_error
    assert result.text.startswith("### Error") and "ERR_NAME_NOT_RESOLVED" in result.text
    assert "\x1b" not in result.text and "\x1b" in result.raw["content"][0]["text"]  # the server did send some
    # Chromium's error page may still be committing and interrupt the next navigations; the browser recovers.
    with anyio.fail_after(20):
        while (recovered := await hub.call("browser_navigate", {"url": f"{site}/index.html"})).is_error:
            assert "interrupted by another navigation" in recovered.text
    assert "Tide Tables Home" in recovered.text


async def test_browser_server_killed_while_idle_is_restarted_by_the_next_call(hub, spec, site):
    config_file = spec.args[-1]
    await hub.call("browser_navigate", {"url": f"{site}/index.html"})  # make sure a browser is running
    node = server_pid(config_file)
    old_processes = descendants(node)
    assert old_processes, "the browser should run below the server"
    os.kill(node, signal.SIGKILL)
    result = await hub.call("browser_navigate", {"url": f"{site}/harbour.html"})  # restarts it, then navigates
    assert not result.is_error and "Saltmarsh Harbour Tides" in result.text
    assert result.text.startswith("(the MCP server 'playwright' had stopped and was restarted: its process had exited)")
    with anyio.fail_after(20):  # the old browser does not outlive its server
        while any(alive(pid) for pid in old_processes):
            await anyio.sleep(0.2)


# ------------------------------------------------------------------------------------------- launch config


def launch_options(folder: Path) -> dict:
    return json.loads((folder / browser.CONFIG_FILE).read_text())["browser"]["launchOptions"]


def test_visible_browser_only_when_asked_and_a_display_exists(tmp_path, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not playwright_server(tmp_path / "a", headless=False).env
    assert launch_options(tmp_path / "a")["headless"] is True
    monkeypatch.setenv("DISPLAY", ":42")
    assert playwright_server(tmp_path / "b").env == {}
    assert launch_options(tmp_path / "b")["headless"] is True
    assert playwright_server(tmp_path / "c", headless=False).env["DISPLAY"] == ":42"  # the SDK would drop it
    assert launch_options(tmp_path / "c")["headless"] is False


def test_config_file_and_spec(tmp_path):
    spec = playwright_server(tmp_path / "b", offline=True, extra_args=("--lang=en-GB",))
    config = json.loads((tmp_path / "b" / browser.CONFIG_FILE).read_text())
    launch = config["browser"]["launchOptions"]
    assert config["browser"]["browserName"] == "chromium" and config["browser"]["isolated"] is True
    assert launch["executablePath"] == find_chromium() and launch["headless"] is True
    assert launch.get("chromiumSandbox", True) is (os.geteuid() != 0)
    assert launch["args"] == ["--lang=en-GB", *browser.OFFLINE_ARGS]
    assert config["outputDir"] == str((tmp_path / "b").resolve()) == spec.cwd
    assert spec.args[0].endswith("node_modules/@playwright/mcp/cli.js") and spec.args[1] == "--config"
    assert spec.inline_snapshots and spec.disabled_tools == {"browser_run_code_unsafe"}
    assert not playwright_server(tmp_path / "c", allow_unsafe_tools=True).disabled_tools


def test_default_config_is_an_ordinary_mcp_config(tmp_path):
    config = default_mcp_config(tmp_path)
    specs = load_mcp_config(json.loads(json.dumps(config)))
    spec = specs["playwright"]
    assert spec.inline_snapshots and spec.disabled_tools == {"browser_run_code_unsafe"}
    written = json.loads((tmp_path / "browser" / browser.CONFIG_FILE).read_text())
    assert written["browser"]["launchOptions"]["headless"] is True
    assert not any("host-resolver-rules" in arg for arg in written["browser"]["launchOptions"]["args"])


def test_default_config_visible_only_with_a_display(tmp_path, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(BrowserSetupError, match="no display .*DISPLAY"):  # asked for: an error, not a fallback
        default_mcp_config(tmp_path, headless=False)
    monkeypatch.setenv("DISPLAY", ":42")
    spec = load_mcp_config(default_mcp_config(tmp_path, headless=False))["playwright"]
    assert launch_options(tmp_path / "browser")["headless"] is False and spec.env["DISPLAY"] == ":42"


def test_missing_parts_say_how_to_install_them(tmp_path, monkeypatch):
    monkeypatch.setenv("CHROME_PATH", str(tmp_path / "chrome"))
    with pytest.raises(BrowserSetupError, match="CHROME_PATH"):
        find_chromium()
    monkeypatch.delenv("CHROME_PATH")
    monkeypatch.setattr(browser, "_CHROMIUM_PATHS", ())
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("PLAYWRIGHT_BROWSERS_PATH", str(tmp_path / "cache"))
    with pytest.raises(BrowserSetupError, match="apt-get install chromium"):
        find_chromium()
    with pytest.raises(BrowserSetupError, match="apt-get install nodejs"):
        browser.find_node()
    cached = tmp_path / "cache" / "chromium-1200" / "chrome-linux" / "chrome"
    cached.parent.mkdir(parents=True)
    cached.write_text("#!/bin/sh\n")
    cached.chmod(0o755)
    assert find_chromium() == str(cached)
    monkeypatch.setenv("MCPFT_NODE_MODULES", str(tmp_path / "node_modules"))
    with pytest.raises(BrowserSetupError, match=r"(?s)@playwright.*`make`.*npm ci"):
        browser.find_playwright_cli()
