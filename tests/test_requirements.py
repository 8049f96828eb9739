"""requirements.txt is what a Hugging Face Space installs: self-contained (its build mounts that file alone), the one
place versions are pinned, in step with README's front matter, and resolvable by pip's own resolver.

What the resolver checks prove (PyPI is reachable here, but not NVIDIA's CUDA libraries, and this machine serves
torch 2.13.0 as a local CPU wheel):
- `test_requirements_resolve_with_the_pinned_torch`: pip resolves the whole file for this Python (the Space's, per
  README's python_version) with torch fixed at the pinned 2.13.0: every other package (Unsloth, xformers,
  torchvision, bitsandbytes, gradio and its OAuth libraries, spaces, ...) accepts that torch and each other's pins.
  The local wheel stands in for PyPI's torch 2.13.0: same version, so the same constraints on it.
- `test_the_pinned_torch_has_a_cuda_build_for_the_space`: PyPI has torch 2.13.0 for CPython 3.11 on manylinux
  x86_64, and that wheel is the CUDA build (it requires NVIDIA's CUDA packages).
Not proven here: that NVIDIA's CUDA packages torch pins resolve (this machine's PyPI access lacks them), nor that the
GPU path runs (no GPU here).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "requirements.txt"
NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")
RESOLVE_TIMEOUT_S = 540


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split(" #")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """name -> exact version of the `name==version` lines."""
    return {canonical(name): version for name, version in
            (line.split("==", 1) for line in requirement_lines(path) if "==" in line)}


def front_matter() -> dict:
    import yaml

    return yaml.safe_load((REPO / "README.md").read_text().split("---")[1])


def pip_report(*args: str) -> dict:
    """`pip install --dry-run --report` of `args`: the report, or a skip when PyPI cannot be reached."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", "-", *args], capture_output=True, text=True, timeout=RESOLVE_TIMEOUT_S)
    if done.returncode != 0 and re.search(r"NewConnectionError|Max retries exceeded|Temporary failure in name "
                                          r"resolution|ConnectTimeout", done.stderr):
        pytest.skip(f"PyPI is unreachable from here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, f"pip could not resolve {args}:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout)


def installed(report: dict) -> dict[str, str]:
    return {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}


def test_requirements_txt_is_self_contained_and_the_one_place_for_pins():
    lines = requirement_lines(REQUIREMENTS)
    assert not [line for line in lines if line.startswith("-")], "the Space mounts requirements.txt alone"
    assert not [line for line in lines if "[" in line], "no extras: pip reads this file as constraints too"
    names = {canonical(NAME.match(line).group(1)) for line in lines}
    core = [canonical(NAME.match(line).group(1)) for line in requirement_lines(REPO / "requirements-core.txt")]
    assert set(core) <= names, f"requirements.txt lacks {set(core) - names}"
    for other in ("requirements-core.txt", "requirements-dev.txt", "requirements-model.txt"):
        pinned_twice = set(pins(REPO / other)) & names
        assert not pinned_twice, f"{other} pins {pinned_twice} again: versions live in requirements.txt"
    assert requirement_lines(REPO / "constraints.txt") == ["-c requirements.txt"]


def test_front_matter_agrees_with_requirements_and_this_python():
    matter = front_matter()
    assert pins(REQUIREMENTS)["gradio"] == str(matter["sdk_version"])  # the Space installs gradio[oauth]==sdk_version
    assert matter["hf_oauth"] is True and {"itsdangerous", "authlib"} <= set(pins(REQUIREMENTS))
    assert str(matter["python_version"]) == f"{sys.version_info.major}.{sys.version_info.minor}", \
        "the resolver checks below run on this Python: it must be the Space's"


def test_requirements_resolve_with_the_pinned_torch():
    report = pip_report("-r", str(REQUIREMENTS))
    chosen = installed(report)
    for name, version in pins(REQUIREMENTS).items():
        assert chosen.get(name, "").split("+")[0] == version, f"{name}: pinned {version}, resolved {chosen.get(name)}"
    assert {"xformers", "torchvision", "bitsandbytes", "unsloth-zoo"} <= set(chosen)  # Unsloth's GPU stack


def test_the_pinned_torch_has_a_cuda_build_for_the_space(tmp_path):
    torch_pin = pins(REQUIREMENTS)["torch"]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    # --isolated: PyPI alone (not this machine's local CPU wheel); --target: pip's rule for another platform.
    report = pip_report("--isolated", "--no-deps", "--only-binary=:all:", "--python-version", python,
                        "--platform", "manylinux_2_28_x86_64", "--implementation", "cp", "--target",
                        str(tmp_path / "target"), f"torch=={torch_pin}")
    (item,) = report["install"]
    assert item["metadata"]["version"] == torch_pin
    assert "+cpu" not in item["download_info"]["url"]
    needs = " ".join(item["metadata"].get("requires_dist", []))
    assert re.search(r"nvidia-|cuda-", needs), f"torch {torch_pin} from PyPI is not the CUDA build: {needs}"
