"""A Hugging Face Space boot, simulated: what a Space has is a fresh copy of the repository (no node_modules, no
.venv), the packages requirements.txt and packages.txt name (here: the test venv, and Debian's chromium, nodejs,
npm), the environment a Space sets, and `python app.py`. Nobody runs `make` or `npm`.

The app must come up on 0.0.0.0 with the Space's OAuth, install the browser's npm package by itself, and a real
browser must then run one demo task to its answer in the Agent tab. The faults: a read-only app dir (the install goes
to the data dir), no npm (the page says so; the rest works).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from mcpft.demo.world import DEMO_TOOLS
from mcpft.store import Store

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
BOOT_TIMEOUT_S = 120
WAIT_MS = 120_000
# The embedded model's first load in a fresh copy: ~50 s alone, once over 120 s with a whole suite on the same cores.
MODEL_LOAD_MS = 300_000
# The packaged SmolLM2 converted once (tests/test_serve.py and others share it): a Space with persistent storage has
# it in /data after its first start, so the boot needs no 45-second conversion here.
MODEL_CACHE = Path(os.environ.get("MCPFT_TEST_CACHE", "/tmp/mcpft-test-cache")) / "models"
# npm's cache as `make` left it on this machine: `npm ci --prefer-offline` then needs no registry (empty: it uses it).
NPM_CACHE = Path.home() / ".npm"
TASK = "heldout: product_spec-ember-camp-stove-material"

pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() and shutil.which("node")),
                                reason=f"needs Chromium at {CHROMIUM} and Node (make test installs them)")
expect.set_options(timeout=WAIT_MS)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def space_copy(dest: Path) -> Path:
    """The files a push to the Space would carry: tracked and untracked-but-not-ignored (no node_modules, .venv)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is not pushed either
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    assert not (dest / "node_modules").exists() and not (dest / ".venv").exists()
    return dest


def space_env(tmp: Path, port: int, path: str = "/usr/bin:/bin", **extra: str) -> dict[str, str]:
    """The environment of a Gradio Space (the variables it sets, OAuth's included as `hf_oauth: true` makes it),
    a fresh HOME, and the persistent dir through MCPFT_HOME, the variable the app reads."""
    home, data = tmp / "home", tmp / "data"
    home.mkdir()
    (data / "mcpft").mkdir(parents=True)
    if (MODEL_CACHE / "SmolLM2-135M-Instruct" / "config.json").exists():
        (data / "mcpft" / "models").symlink_to(MODEL_CACHE, target_is_directory=True)
    env = {
        "PATH": path, "HOME": str(home), "LANG": "C.UTF-8",
        "SPACE_ID": "someone/mcpft", "SPACE_HOST": "someone-mcpft.hf.space", "SPACE_AUTHOR_NAME": "someone",
        "SPACE_REPO_NAME": "mcpft", "SYSTEM": "spaces",
        "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": str(port),
        "OAUTH_CLIENT_ID": "test-client", "OAUTH_CLIENT_SECRET": "test-secret",
        "OAUTH_SCOPES": "openid profile write-repos manage-repos", "OPENID_PROVIDER_URL": "https://huggingface.co",
        "MCPFT_HOME": str(data / "mcpft"),
        # Not the Space's: this machine reaches no Hub, and nothing may try (127.0.0.1 and npm's registry only).
        "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
    }
    if NPM_CACHE.is_dir():
        env["npm_config_cache"] = str(NPM_CACHE)
    return {**env, **extra}


@contextmanager
def booted(app_dir: Path, env: dict[str, str]):
    """`python app.py` in `app_dir`; yields (url, seconds until it said it is up, its output so far)."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "app.py"], cwd=app_dir, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    up = threading.Event()

    def read():
        for line in process.stdout:
            lines.append(line)
            if line.startswith("mcpft is up at"):
                up.set()
        up.set()  # the process ended: stop waiting

    threading.Thread(target=read, daemon=True).start()
    try:
        assert up.wait(BOOT_TIMEOUT_S) and process.poll() is None, "the app did not come up:\n" + "".join(lines)
        yield f"http://127.0.0.1:{env['GRADIO_SERVER_PORT']}/", time.monotonic() - started, lines
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def page_at(url: str):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(WAIT_MS)
        page.goto(url)
        try:
            yield page
        finally:
            browser.close()


def connect_browser_tools(page):
    page.get_by_role("tab", name="Endpoint").click()
    expect(page.locator("#embedded-status")).to_contain_text("ready", timeout=MODEL_LOAD_MS)
    page.get_by_role("button", name="Connect", exact=True).click()
    expect(page.locator("#tools-table")).to_contain_text("browser_navigate")


def run_demo_task(page) -> str:
    """Pick a held-out demo task (the scripted teacher takes it), auto-approve, send: the status once answered."""
    page.get_by_role("tab", name="Agent").click()
    picker = page.locator("#demo-task input")
    picker.click()
    picker.fill(TASK)
    page.get_by_role("option", name=TASK, exact=True).click()
    expect(page.locator("#agent-input textarea")).not_to_have_value("")
    page.locator("#auto-approve input").check()
    page.locator("#agent-send").click()
    status = page.locator("#agent-status")
    expect(status).to_contain_text(re.compile("Answered|error|Ended|Step limit"))
    return status.inner_text()


def test_a_fresh_copy_boots_as_a_space_and_answers_a_demo_task(tmp_path):
    app_dir = space_copy(tmp_path / "app")
    env = space_env(tmp_path, free_port())
    with booted(app_dir, env) as (url, boot_s, lines), page_at(url) as page:
        assert "listening on 0.0.0.0" in lines[0]  # reachable through the Space's proxy
        expect(page.locator("#visitor-note")).to_contain_text("You are not signed in")
        expect(page.get_by_role("button", name=re.compile("Sign in with Hugging Face"))).to_be_visible()
        expect(page.locator("#space-note")).to_contain_text("Data is kept in")
        install = page.locator("#browser-install")
        expect(install).to_contain_text("Browser: ready")
        npm_s = float(re.search(r"installed in (\d+) s", install.inner_text()).group(1))
        connect_browser_tools(page)
        status = run_demo_task(page)
        assert status.startswith("Trace") and "Answered" in status, status
        with Store(tmp_path / "data" / "mcpft" / "mcpft.db") as store:
            (trace,) = store.traces()
        # A demo task in the app runs as `demo collect` records it: the demo's tools only, pages compacted.
        assert sorted(t["function"]["name"] for t in trace.tools) == sorted(DEMO_TOOLS)
        assert {"demo", "heldout"} <= set(trace.tags)  # a held-out task's trace is for Evaluate, never for Train
        pages = [m["content"] for m in trace.messages if m["role"] == "tool"]
        assert pages and not any("[cursor=pointer]" in text for text in pages)
        print(f"\nboot (python app.py until up): {boot_s:.1f} s; npm install: {npm_s:.0f} s")
    assert (app_dir / "node_modules" / "@playwright" / "mcp" / "cli.js").is_file()  # beside the app: writable


@pytest.fixture
def read_only_copy(tmp_path):
    """A fresh copy whose top folder takes no new file, even from root (chattr +i), as a read-only app dir."""
    app_dir = space_copy(tmp_path / "app")
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(app_dir)]).returncode != 0:
        pytest.skip("chattr +i is unavailable here (needed to make the app dir read-only for root)")
    yield app_dir
    subprocess.run(["chattr", "-i", str(app_dir)], check=True)


def test_a_read_only_app_dir_installs_the_browser_in_the_data_dir(tmp_path, read_only_copy):
    env = space_env(tmp_path, free_port())
    with booted(read_only_copy, env) as (url, _, _), page_at(url) as page:
        page.get_by_role("tab", name="Endpoint").click()
        expect(page.locator("#browser-install")).to_contain_text("Browser: ready")
        expect(page.locator("#browser-install")).to_contain_text(str(tmp_path / "data" / "mcpft" / "node"))
        connect_browser_tools(page)
    assert not (read_only_copy / "node_modules").exists()


def test_without_npm_the_page_says_so_and_the_rest_works(tmp_path):
    bin_dir = tmp_path / "bin"  # node without npm: what a Space whose packages.txt lost `npm` has
    bin_dir.mkdir()
    (bin_dir / "node").symlink_to(shutil.which("node"))
    app_dir = space_copy(tmp_path / "app")
    env = space_env(tmp_path, free_port(), path=str(bin_dir))
    with booted(app_dir, env) as (url, _, _), page_at(url) as page:
        page.get_by_role("tab", name="Endpoint").click()
        install = page.locator("#browser-install")
        expect(install).to_contain_text("Browser: unavailable")
        expect(install).to_contain_text("npm is not installed")
        expect(page.locator("#embedded-status")).to_contain_text("ready", timeout=MODEL_LOAD_MS)
        page.get_by_role("button", name="Connect", exact=True).click()
        expect(page.get_by_text("npm is not installed").last).to_be_visible()  # the error toast
        page.get_by_role("tab", name="Curate").click()
        expect(page.locator("#traces-table")).to_be_visible()
