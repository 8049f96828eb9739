"""mcpft.agent.mcp against real MCP servers: tests/tiny_mcp_server.py (official SDK) over stdio and HTTP."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import anyio
import jsonschema
import pytest

from mcpft.agent.mcp import (
    DROPPED_SCHEMA_KEYWORDS,
    MCPConfigError,
    MCPServerError,
    ServerSpec,
    ToolHub,
    load_mcp_config,
    openai_name,
    openai_parameters,
)

pytestmark = pytest.mark.anyio

TINY_SERVER = str(Path(__file__).with_name("tiny_mcp_server.py"))
TINY_TOOLS = {"echo", "hang", "big", "fail", "picture", "measure", "header"}
OPENAI_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


def tiny(name: str, instance: str, *extra: str, **fields) -> ServerSpec:
    return ServerSpec(name, command=sys.executable, args=(TINY_SERVER, instance, *extra), **fields)


@pytest.fixture(scope="module")
async def hub(tmp_path_factory):
    """Two instances of the same server: `a` pages its tool list two tools at a time, `b` sends it whole."""
    specs = [tiny("a", "A", "--page-size", "2"), tiny("b", "B")]
    async with ToolHub(specs, tmp_path_factory.mktemp("hub"), max_chars=1000) as live:
        yield live


def child_pid(marker: str) -> int:
    """The pid of this test process's child whose command line holds `marker` (a server we started)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == os.getpid() and marker.encode() in cmdline:
            return int(entry.name)
    raise AssertionError(f"no child process with {marker!r} in its command line")


def schema_keywords(node, found=None):
    """Every key used as a schema keyword (property names themselves are not keywords)."""
    found = set() if found is None else found
    if isinstance(node, dict):
        for key, value in node.items():
            found.add(key)
            if key == "properties":
                for sub in value.values():
                    schema_keywords(sub, found)
            else:
                schema_keywords(value, found)
    elif isinstance(node, list):
        for item in node:
            schema_keywords(item, found)
    return found


# ------------------------------------------------------------------------------------------------ config


def test_config_in_the_common_shape_loads_unchanged(tmp_path):
    config = {
        "mcpServers": {
            "playwright": {"command": "npx", "args": ["@playwright/mcp@latest"]},
            "files": {"type": "stdio", "command": "python", "args": ["-m", "files"], "env": {"TOKEN": "s3cret"},
                      "cwd": "/srv", "autoApprove": [], "description": "a key other clients add"},
            "remote": {"type": "http", "url": "https://example.org/mcp", "headers": {"Authorization": "Bearer s3cret"}},
            "off": {"command": "nothing", "disabled": True},
        }
    }
    path = tmp_path / "claude_desktop_config.json"
    path.write_text(json.dumps(config))
    specs = load_mcp_config(path)
    assert list(specs) == ["playwright", "files", "remote"]
    browser, files, remote = specs.values()
    assert browser.transport == "stdio" and browser.inline_snapshots
    assert browser.disabled_tools == {"browser_run_code_unsafe"}
    assert files.args == ("-m", "files") and files.env == {"TOKEN": "s3cret"} and files.cwd == "/srv"
    assert not files.inline_snapshots and not files.disabled_tools
    assert remote.transport == "http" and remote.headers["Authorization"] == "Bearer s3cret"
    assert "s3cret" not in repr(files) + repr(remote)  # secrets stay out of logs
    assert load_mcp_config({"mcpServers": {n: s.to_config() for n, s in specs.items()}}) == specs


@pytest.mark.parametrize(
    ("servers", "expected"),
    [
        ({"x": {"args": []}}, r"server 'x'.*exactly one of \"command\".*\"url\""),
        ({"x": {"command": "a", "url": "http://b"}}, r"server 'x'.*exactly one of"),
        ({"x": {"command": ["node"]}}, r"server 'x'.*field \"command\" must be a str"),
        ({"x": {"command": "node", "args": "cli.js"}}, r"server 'x'.*field \"args\" must be a list"),
        ({"x": {"command": "node", "args": ["a", 1]}}, r"server 'x'.*field \"args\" must be a list of strings"),
        ({"x": {"command": "node", "env": {"PORT": 8080}}}, r"server 'x'.*field \"env\".*'PORT' is not a string"),
        ({"x": {"url": "example.org/mcp"}}, r"server 'x'.*field \"url\" must start with http"),
        ({"x": {"url": "http://h/mcp", "type": "sse"}}, r"server 'x'.*sse.*not supported"),
        ({"x": "node cli.js"}, r"server 'x'.*expected an object"),
        ({"x": {"command": "node", "disabledTools": "browser_close"}}, r"server 'x'.*\"disabledTools\""),
    ],
)
def test_config_errors_name_the_server_and_field(servers, expected):
    with pytest.raises(MCPConfigError, match=expected):
        load_mcp_config({"mcpServers": servers})


def test_config_file_errors_name_the_file(tmp_path):
    broken = tmp_path / "mcp.json"
    broken.write_text('{"mcpServers": {"x": ')
    with pytest.raises(MCPConfigError, match=r"mcp\.json: not valid JSON"):
        load_mcp_config(broken)
    with pytest.raises(MCPConfigError, match=r"missing\.json: cannot read it"):
        load_mcp_config(tmp_path / "missing.json")
    with pytest.raises(MCPConfigError, match=r'"mcpServers"'):
        load_mcp_config({"servers": {}})


# -------------------------------------------------------------------------------------- schemas and names


def test_schema_keywords_endpoints_reject_are_dropped_but_properties_of_that_name_kept():
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "data": {"type": "object", "propertyNames": {"type": "string"}, "additionalProperties": {"type": "string"}},
            "$schema": {"type": "string", "description": "a property that happens to have this name"},
            "mode": {"anyOf": [{"type": "string", "enum": ["a"], "$comment": "x"}, {"type": "null"}], "default": "a"},
        },
        "required": ["data"],
        "additionalProperties": False,
    }
    converted = openai_parameters(schema)
    assert "$schema" not in converted and "$schema" in converted["properties"]
    assert not DROPPED_SCHEMA_KEYWORDS & schema_keywords(converted)
    assert converted["properties"]["data"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert converted["properties"]["mode"]["default"] == "a" and converted["required"] == ["data"]
    assert "$schema" in schema  # the server's schema is left as it was
    jsonschema.Draft202012Validator.check_schema(converted)


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        (None, {"type": "object", "properties": {}}),
        ({}, {"type": "object", "properties": {}}),
        ({"properties": {"q": {"type": "string"}}}, {"type": "object", "properties": {"q": {"type": "string"}}}),
        ({"type": ["object", "null"]}, {"type": "object", "properties": {}}),
        ({"anyOf": [{"type": "object", "properties": {"a": {}}}, {"type": "object", "properties": {"b": {}}}]},
         {"type": "object", "properties": {},
          "anyOf": [{"type": "object", "properties": {"a": {}}}, {"type": "object", "properties": {"b": {}}}]}),
        ({"type": "string", "$schema": "x"},
         {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}),
    ],
)
def test_schema_roots_become_objects(schema, expected):
    assert openai_parameters(schema) == expected


def test_tool_names_are_made_valid_for_endpoints():
    assert openai_name("browser_navigate") == "browser_navigate"
    assert openai_name("files.read file") == "files_read_file"
    long_a, long_b = "x" * 70 + "a", "x" * 70 + "b"
    assert len(openai_name(long_a)) == 64 and OPENAI_NAME.match(openai_name(long_a))
    assert openai_name(long_a) != openai_name(long_b)  # a hash of the full name keeps them apart
    assert openai_name(long_a) == openai_name(long_a)


# --------------------------------------------------------------------------------------------- tool listing


async def test_pagination_and_name_clash_are_resolved_visibly(hub):
    by_server = {server: {t.tool for t in hub.tools if t.server == server} for server in ("a", "b")}
    assert by_server["a"] == by_server["b"]  # `a` sent its list in pages of two, `b` in one go
    assert TINY_TOOLS <= by_server["a"]
    assert hub.renamed["a__echo"] == ("a", "echo") and hub.renamed["b__echo"] == ("b", "echo")
    assert "echo" not in {t.name for t in hub.tools}
    a_echo, b_echo = await hub.call("a__echo", {"text": "hi"}), await hub.call("b__echo", {"text": "hi"})
    assert (a_echo.text, b_echo.text) == ("A: hi", "B: hi")


async def test_openai_tools_are_valid_functions(hub):
    functions = hub.openai_tools()
    assert len(functions) == len(hub.tools) >= 2 * len(TINY_TOOLS)
    for entry in functions:
        function = entry["function"]
        assert entry["type"] == "function" and OPENAI_NAME.match(function["name"]), function["name"]
        assert function["parameters"]["type"] == "object"
        assert "$schema" not in schema_keywords(function["parameters"])
        jsonschema.Draft202012Validator.check_schema(function["parameters"])
    long_names = [t for t in hub.tools if t.tool.startswith("tiny.")]
    assert len(long_names) == 2 and all(len(t.name) <= 64 for t in long_names)
    assert (await hub.call(long_names[0].name, {})).text == "ok"


async def test_disabled_tools_are_hidden(tmp_path):
    async with ToolHub([tiny("solo", "S", disabled_tools=frozenset({"hang", "fail"}))], tmp_path) as solo:
        names = {t.name for t in solo.tools}
        assert "echo" in names and not names & {"hang", "fail"}
        refused = await solo.call("hang", {})
        assert refused.is_error and "unknown tool 'hang'" in refused.text


# ------------------------------------------------------------------------------------------------ results


async def test_bad_calls_give_error_results_naming_the_problem(hub):
    unknown = await hub.call("no_such_tool", {})
    assert unknown.is_error and "unknown tool 'no_such_tool'" in unknown.text and "a__echo" in unknown.text
    not_json = await hub.call("a__echo", '{"text": "hi"')
    assert not_json.is_error and "not valid JSON" in not_json.text and "a__echo" in not_json.text
    not_object = await hub.call("a__echo", '["hi"]')
    assert not_object.is_error and "must be a JSON object, got list" in not_object.text
    wrong_args = await hub.call("a__echo", {"txt": "hi"})
    assert wrong_args.is_error and "text" in wrong_args.text


async def test_tool_error_reaches_the_model_marked_and_without_ansi(hub):
    result = await hub.call("b__fail", {"message": "disk on fire"})
    assert result.is_error
    assert result.text.startswith("Error") and "disk on fire" in result.text
    assert "\x1b" not in result.text and "[31m" not in result.text
    assert result.raw["isError"] is True


async def test_image_is_saved_to_a_file_with_a_placeholder(hub):
    result = await hub.call("a__picture", "{}")
    assert not result.is_error and len(result.images) == 1
    image = result.images[0]
    assert image.parent == hub.output_dir and image.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert result.text == f"a red square\n[image: {image.name}]"
    assert f"<saved as {image.name}>" in json.dumps(result.raw)  # no base64 in the trace


async def test_structured_content_is_kept(hub):
    result = await hub.call("b__measure", {"text": "three small words"})
    assert result.structured == {"chars": 17, "words": 3}
    assert json.loads(result.text) == {"chars": 17, "words": 3}


async def test_ten_megabyte_result_is_truncated_with_the_workshop_notice(hub):
    started = time.monotonic()
    result = await hub.call("a__big", {"n": 10_000_000}, timeout=60)
    assert not result.is_error
    assert result.text == "x" * 1000 + "\n[Content truncated to 1000 characters]"
    assert len(json.dumps(result.raw)) < 10_000  # the trace stays small too
    assert result.structured["mcpft_truncated"].startswith("[structured content truncated to the first 1000 of its")
    assert result.structured["json_start"] == '{"result": "' + "x" * 988
    assert result.raw["structuredContent"] == result.structured
    assert time.monotonic() - started < 30


async def test_timeout_gives_an_error_result_and_the_server_stays_usable(hub):
    started = time.monotonic()
    result = await hub.call("a__hang", {}, timeout=0.5)
    assert result.is_error and "a__hang did not answer within 0.5 s" in result.text
    assert time.monotonic() - started < 5
    assert (await hub.call("a__echo", {"text": "still here"})).text == "A: still here"


# --------------------------------------------------------------------------------------- crashes and starts


async def test_server_killed_while_idle_is_restarted_by_the_next_call(tmp_path):
    marker = f"crash-{uuid.uuid4().hex[:8]}"
    async with ToolHub([tiny("fragile", marker), tiny("steady", "S")], tmp_path) as live:
        assert (await live.call("fragile__echo", {"text": "1"})).text == f"{marker}: 1"
        first_pid = child_pid(marker)
        os.kill(first_pid, signal.SIGKILL)
        assert (await live.call("steady__echo", {"text": "ok"})).text == "S: ok"  # the hub stays usable
        again = await live.call("fragile__echo", {"text": "3"})  # the first call brings the server back
        assert not again.is_error
        assert again.text == ("(the MCP server 'fragile' had stopped and was restarted: its process had exited)\n"
                              f"{marker}: 3")
        assert live.is_running("fragile") and child_pid(marker) != first_pid
        assert (await live.call("fragile__echo", {"text": "4"})).text == f"{marker}: 4"  # noted once only
        await live.restart("fragile")
        assert (await live.call("fragile__echo", {"text": "5"})).text == f"{marker}: 5"
        with pytest.raises(ValueError, match="no MCP server named 'nope'"):
            await live.restart("nope")


async def test_server_that_cannot_come_back_gives_an_error_result_at_each_call(tmp_path):
    marker, gate = f"gone-{uuid.uuid4().hex[:8]}", tmp_path / "may-start"
    gate.touch()
    # A server that starts only while the gate file exists (exec keeps the pid: the child is the server itself).
    script = (f'[ -e "{gate}" ] || {{ echo "gate closed" >&2; exit 3; }}; '
              f'exec "{sys.executable}" "{TINY_SERVER}" {marker}')
    async with ToolHub([ServerSpec("gated", command="sh", args=("-c", script))], tmp_path) as live:
        assert (await live.call("echo", {"text": "1"})).text == f"{marker}: 1"
        gate.unlink()
        os.kill(child_pid(marker), signal.SIGKILL)
        for attempt in ("2", "3", "4"):  # each call tries once more, and says why it could not
            failed = await live.call("echo", {"text": attempt})
            assert failed.is_error and "'gated' behind echo had stopped and could not be restarted" in failed.text
            assert "gate closed" in failed.text
            assert "gate closed" in live.failed["gated"]
        gate.touch()
        back = await live.call("echo", {"text": "5"})
        assert back.text == ("(the MCP server 'gated' had stopped and was restarted: an earlier restart had failed)\n"
                             f"{marker}: 5")
        assert live.failed == {}


async def test_wedged_server_is_restarted_when_it_does_not_answer_the_ping(tmp_path):
    marker = f"wedge-{uuid.uuid4().hex[:8]}"
    async with ToolHub([tiny("stuck", marker)], tmp_path) as live:
        pid = child_pid(marker)
        os.kill(pid, signal.SIGSTOP)  # the process still exists but answers nothing
        try:
            with anyio.fail_after(20):  # the SDK escalates to SIGKILL, which a stopped process obeys
                back = await live.call("echo", {"text": "anyone?"}, timeout=0.5)
        finally:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGCONT)
        assert back.text == ("(the MCP server 'stuck' had stopped and was restarted: it did not answer a ping within "
                             f"0.5 s)\n{marker}: anyone?")
        assert (await live.call("echo", {"text": "back"})).text == f"{marker}: back"


async def test_server_that_never_answers_initialize_fails_to_start_in_time(tmp_path):
    silent = ServerSpec("silent", command=sys.executable, args=("-c", "import sys; sys.stdin.read()"))
    started = time.monotonic()
    with pytest.raises(MCPServerError, match="'silent' did not start: no answer in time"):
        async with ToolHub([silent], tmp_path, connect_timeout=1):
            pass
    assert time.monotonic() - started < 10


async def test_server_that_cannot_start_is_named_with_its_stderr(tmp_path):
    missing = ServerSpec("ghost", command="/nonexistent/mcp-server-binary")
    with pytest.raises(MCPServerError, match="'ghost' did not start.*nonexistent"):
        async with ToolHub([missing], tmp_path):
            pass
    dies = ServerSpec("quitter", command=sys.executable,
                      args=("-c", "import sys; sys.stderr.write('config file unreadable\\n'); sys.exit(3)"))
    with pytest.raises(MCPServerError, match=r"(?s)'quitter' did not start.*config file unreadable"):
        async with ToolHub([dies], tmp_path):
            pass


# ---------------------------------------------------------------------------------------- streamable HTTP


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def http_server():
    port = free_port()
    process = subprocess.Popen([sys.executable, TINY_SERVER, "H", "--http", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:  # wait (bounded) until it accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                try:  # between tries, wait on the server process itself: a crashed server ends the wait at once
                    process.wait(timeout=0.05)
                    raise AssertionError("the HTTP MCP server exited before it listened")
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise AssertionError("the HTTP MCP server did not start") from None
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_streamable_http_server_with_headers(http_server, tmp_path):
    config = {"mcpServers": {"web": {"url": http_server, "headers": {"X-Team-Token": "tok-123"}}}}
    async with ToolHub(load_mcp_config(config), tmp_path) as live:
        assert TINY_TOOLS <= {t.name for t in live.tools}
        assert (await live.call("echo", {"text": "over http"})).text == "H: over http"
        # the header reached the server; its value, a secret of this server's config, never reaches the model
        assert (await live.call("header", {"name": "X-Team-Token"})).text == "[redacted:header X-Team-Token]"
        slow = await live.call("hang", {}, timeout=0.5)
        assert slow.is_error and "did not answer" in slow.text
        await live.restart("web")
        assert (await live.call("echo", {"text": "again"})).text == "H: again"
