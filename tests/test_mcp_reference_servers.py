"""mcpft's MCP client against servers nobody here wrote: the reference servers from npm (pinned devDependencies in
package.json, installed by `make`), run by each test and stopped after it, over stdio and (server-everything) over
streamable HTTP on 127.0.0.1. Real calls, asserting what the model is told and what is kept beside it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from mcpft.agent.mcp import ServerSpec, ToolHub, ToolProgress, load_mcp_config
from tests.listening import listening
from tests.test_mcp import child_pid

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent
PACKAGES = REPO / "node_modules" / "@modelcontextprotocol"
EVERYTHING = PACKAGES / "server-everything" / "dist" / "index.js"
FILESYSTEM = PACKAGES / "server-filesystem" / "dist" / "index.js"
MEMORY = PACKAGES / "server-memory" / "dist" / "index.js"
LOCALHOST_ONLY = Path(__file__).with_name("localhost_only.cjs")


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module", autouse=True)
def reference_servers_installed():
    missing = [str(path.relative_to(REPO)) for path in (EVERYTHING, FILESYSTEM, MEMORY) if not path.exists()]
    assert not missing, f"the reference MCP servers are not installed ({', '.join(missing)}): run `make` (npm ci)"


def node(name: str, script: Path, *args: str, **fields) -> ServerSpec:
    return ServerSpec(name, command="node", args=(str(script), *args), **fields)


# ---------------------------------------------------------------------------------------- server-everything


async def test_everything_over_stdio_every_content_type(tmp_path):
    async with ToolHub([node("everything", EVERYTHING, "stdio")], tmp_path, max_chars=2000) as hub:
        assert (await hub.call("echo", {"message": "hi"})).text == "Echo: hi"
        assert (await hub.call("get-sum", {"a": 2, "b": 3})).text == "The sum of 2 and 3 is 5."

        image = await hub.call("get-tiny-image", {})
        assert not image.is_error and len(image.images) == 1
        assert image.images[0].read_bytes().startswith(b"\x89PNG")
        assert image.text == (f"Here's the image you requested:\n[image: {image.images[0].name}]\n"
                              "The image above is the MCP logo.")
        assert image.mcp_result()["content"] == [{"type": "text"}, {"type": "image", "mime_type": "image/png"},
                                                 {"type": "text"}]

        resource = await hub.call("get-resource-reference", {"resourceType": "Text", "resourceId": 1})
        assert "Resource 1: This is a plaintext resource" in resource.text
        assert {"type": "resource", "mime_type": "text/plain", "uri": "demo://resource/dynamic/text/1"} in \
            resource.mcp_result()["content"]

        links = await hub.call("get-resource-links", {"count": 2})
        assert "[resource link: Blob Resource 1 demo://resource/dynamic/blob/1]" in links.text

        weather = await hub.call("get-structured-content", {"location": "Chicago"})
        assert weather.structured is not None and set(weather.structured) >= {"temperature", "conditions"}
        assert json.loads(weather.text) == weather.structured

        annotated = await hub.call("get-annotated-message", {"messageType": "error", "includeImage": True})
        assert annotated.mcp_result()["content"][0]["annotations"]["audience"] == ["user", "assistant"]


async def test_everything_config_secrets_are_redacted_from_what_it_echoes(tmp_path):
    secret = "sk-reference-0123456789"
    config = {"mcpServers": {"everything": {"command": "node", "args": [str(EVERYTHING), "stdio"],
                                            "env": {"OPENAI_API_KEY": secret, "LOG_LEVEL": "debug"}}}}
    async with ToolHub(load_mcp_config(config), tmp_path, max_chars=100_000) as hub:
        env = json.loads((await hub.call("get-env", {})).text)
    assert env["OPENAI_API_KEY"] == "[redacted:env OPENAI_API_KEY]"
    assert env["LOG_LEVEL"] == "debug"  # a plain setting, not a secret
    assert all(secret.encode() not in path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())


async def test_everything_long_operation_stays_alive_on_its_progress(tmp_path):
    config = {"mcpServers": {"everything": {"command": "node", "args": [str(EVERYTHING), "stdio"], "callTimeout": 0.6}}}
    heard: list[ToolProgress] = []
    async with ToolHub(load_mcp_config(config), tmp_path, on_progress=heard.append) as hub:
        started = time.monotonic()
        done = await hub.call("trigger-long-running-operation", {"duration": 1.5, "steps": 5})
        assert time.monotonic() - started > 1.2  # twice its call timeout, kept alive by progress
    assert done.text == "Long running operation completed. Duration: 1.5 seconds, Steps: 5."
    assert [(p.progress, p.total) for p in heard] == [(step, 5) for step in (1, 2, 3, 4, 5)]


async def test_everything_killed_while_idle_is_restarted_by_the_next_call(tmp_path):
    async with ToolHub([node("everything", EVERYTHING, "stdio")], tmp_path) as hub:
        assert (await hub.call("echo", {"message": "one"})).text == "Echo: one"
        os.kill(child_pid(str(EVERYTHING)), signal.SIGKILL)
        again = await hub.call("echo", {"message": "two"})
        assert again.text == ("(the MCP server 'everything' had stopped and was restarted: its process had exited)\n"
                              "Echo: two")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def everything_over_http(port: int):
    """server-everything's streamable HTTP transport on 127.0.0.1:port (it would listen on every interface: the
    preloaded localhost_only.cjs keeps it on 127.0.0.1) until the block ends."""
    return listening(["node", "--require", str(LOCALHOST_ONLY), str(EVERYTHING), "streamableHttp"], port,
                     "server-everything (streamableHttp)", env={**os.environ, "PORT": str(port)})


async def test_everything_over_streamable_http_and_restarted_while_idle(tmp_path):
    port = free_port()
    config = {"mcpServers": {"everything": {"url": f"http://127.0.0.1:{port}/mcp"}}}
    with ExitStack() as servers:
        first = servers.enter_context(ExitStack())
        first.enter_context(everything_over_http(port))
        async with ToolHub(load_mcp_config(config), tmp_path) as hub:
            assert (await hub.call("echo", {"message": "over http"})).text == "Echo: over http"
            image = await hub.call("get-tiny-image", {})
            assert len(image.images) == 1 and f"[image: {image.images[0].name}]" in image.text
            first.close()  # restarted while the client is idle: the new server knows no session
            servers.enter_context(everything_over_http(port))
            again = await hub.call("echo", {"message": "again"})
            # Its 400 carries a JSON-RPC error without an id, which the SDK cannot read: a ping tells what it was.
            assert again.text == ("(the MCP server 'everything' no longer knew this client's session (it answered "
                                  "requests on this session with HTTP errors, a ping too; did the server restart?); "
                                  "a new session was opened)\nEcho: again")
            assert (await hub.call("echo", {"message": "then"})).text == "Echo: then"


# ------------------------------------------------------------------------------------- filesystem and memory


async def test_filesystem_reads_and_writes_only_in_its_folder(tmp_path):
    allowed = (tmp_path / "allowed").resolve()
    allowed.mkdir()
    (allowed / "notes.txt").write_text("first line\nsecond line\n")
    (tmp_path / "outside.txt").write_text("not yours")
    async with ToolHub([node("files", FILESYSTEM, str(allowed))], tmp_path / "tool-files") as hub:
        read = await hub.call("read_text_file", {"path": str(allowed / "notes.txt")})
        assert (read.is_error, read.text) == (False, "first line\nsecond line\n")
        wrote = await hub.call("write_file", {"path": str(allowed / "new.txt"), "content": "written by a tool"})
        assert not wrote.is_error and (allowed / "new.txt").read_text() == "written by a tool"
        listing = await hub.call("list_directory", {"path": str(allowed)})
        assert "[FILE] new.txt" in listing.text and "[FILE] notes.txt" in listing.text
        refused = await hub.call("read_text_file", {"path": str(tmp_path / "outside.txt")})
        assert refused.is_error and refused.text.startswith("Error") and "outside" in refused.text
        assert "not yours" not in refused.text


async def test_memory_keeps_the_entities_it_is_given(tmp_path):
    memory_file = tmp_path / "memory.jsonl"
    spec = node("memory", MEMORY, env={"MEMORY_FILE_PATH": str(memory_file)})
    entities = [{"name": "Saltmarsh", "entityType": "harbour", "observations": ["high tide at 06:12"]}]
    async with ToolHub([spec], tmp_path / "tool-files") as hub:
        created = await hub.call("create_entities", {"entities": entities})
        assert not created.is_error and "Saltmarsh" in created.text
        found = await hub.call("search_nodes", {"query": "tide"})
        assert not found.is_error
        assert re.search(r'"name":\s*"Saltmarsh"', found.text) and "06:12" in found.text
    assert "Saltmarsh" in memory_file.read_text()
