"""MCP tool servers through the official SDK: config, a hub of live connections, schema and result conversion.

The config is the widely used JSON that Claude Desktop, Cursor and the Trelis workshop share::

    {"mcpServers": {"NAME": {"command": "...", "args": [...], "env": {...}, "cwd": "..."}
                    "OTHER": {"url": "https://.../mcp", "headers": {...}}}}

Two optional keys per server are ours: ``inlineSnapshots`` (bool) and ``disabledTools`` (list of names);
other clients' extra keys (``type``, ``autoApprove``, ``description``, ...) are accepted and ignored, and a
server with ``"disabled": true`` is skipped.

`ToolHub` connects several servers at once (stdio or streamable HTTP), lists their tools, exposes them as
OpenAI functions and turns every tool call into a `ToolResult`: the exact text the model sees plus what the
trace keeps. Failures of any kind (unknown tool, bad arguments, timeout, a crashed server) come back as
error results, never as exceptions, so an agent loop keeps going; a server that has stopped is restarted at the
next call to one of its tools (`ToolHub.restart` does it on demand).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import mimetypes
import os
import re
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import mcp.types as mcp_types
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client  # the SDK's own helper (its session group uses it)
from mcp.shared.exceptions import MCPError

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # anyio's dependency on 3.10

log = logging.getLogger(__name__)

# Keywords removed from tool schemas before an endpoint sees them, wherever they occur as schema keywords
# (a *property* with one of these names is kept):
#   $schema, $id, $comment - meta-data; OpenAI-compatible validators and Gemini reject `$schema`, and MCP
#                            SDKs add it to every tool (Playwright MCP sends draft 2020-12).
#   propertyNames          - vLLM's xgrammar backend fails with "Unimplemented keys: ['propertyNames']"
#                            (a 500 for tool_choice="required"); JSON object keys are strings anyway.
DROPPED_SCHEMA_KEYWORDS = frozenset({"$schema", "$id", "$comment", "propertyNames"})

# Where a JSON schema holds sub-schemas: keyword -> how (one schema, a list, or a name -> schema map).
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "additionalItems")
_SUBSCHEMA_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")

OPENAI_NAME_MAX = 64
_NAME_INVALID = re.compile(r"[^A-Za-z0-9_-]")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
# Playwright MCP (recent versions) answers action tools with a link to the snapshot file instead of its text.
_SNAPSHOT_LINK = re.compile(r"^- \[Snapshot\]\((?P<path>[^)\n]+\.yml)\)$", re.MULTILINE)

DEFAULT_MAX_CHARS = 16_000  # the Trelis workshop's limit, with its notice below
TRUNCATION_NOTICE = "\n[Content truncated to {n} characters]"
ERROR_PREFIX = "Error: "
RESTARTED_NOTE = "(the MCP server {server!r} had stopped and was restarted)"
# Structured content whose JSON is longer than the result's character limit is kept cut, as this marker object.
STRUCTURED_CUT_KEY = "mcpft_truncated"
STRUCTURED_CUT_NOTICE = "[structured content truncated to the first {n} of its {total} characters of JSON]"
# Structured content that is no JSON object (allowed from MCP 2026-07-28) is kept wrapped in one, under this key.
STRUCTURED_VALUE_KEY = "mcpft_value"
MAX_BLOCK_RECORDS = 100  # content blocks described in a tool message's `mcp_result`; the rest are counted

# Playwright MCP is the browser mcpft ships; a config that runs it gets these defaults unless it says otherwise.
PLAYWRIGHT_PACKAGE = "@playwright/mcp"
PLAYWRIGHT_UNSAFE_TOOLS = frozenset({"browser_run_code_unsafe"})  # runs arbitrary code in the server process


class MCPConfigError(ValueError):
    """The MCP server config is malformed; the message names the server and the field."""


class MCPServerError(RuntimeError):
    """An MCP server could not be started or reached."""


@dataclass(frozen=True)
class ServerSpec:
    """How to reach one MCP server: a local command (stdio) or a URL (streamable HTTP)."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # may hold secrets: never printed
    cwd: str | None = None
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # may hold tokens: never printed
    inline_snapshots: bool = False
    disabled_tools: frozenset[str] = frozenset()

    @property
    def transport(self) -> str:
        return "stdio" if self.command else "http"

    def to_config(self) -> dict[str, Any]:
        """This server as an `mcpServers` entry (the inverse of `load_mcp_config`)."""
        entry: dict[str, Any] = {"command": self.command, "args": list(self.args)} if self.command else {"url": self.url}
        if self.env:
            entry["env"] = dict(self.env)
        if self.cwd:
            entry["cwd"] = self.cwd
        if self.headers:
            entry["headers"] = dict(self.headers)
        entry["inlineSnapshots"] = self.inline_snapshots
        entry["disabledTools"] = sorted(self.disabled_tools)
        return entry


# ---------------------------------------------------------------------------------------------------- config


def load_mcp_config(obj_or_path: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, ServerSpec]:
    """Parse an `{"mcpServers": {...}}` config (a dict or a JSON file) into specs, keyed by server name."""
    source = "MCP config"
    if isinstance(obj_or_path, (str, os.PathLike)):
        source = f"MCP config {os.fspath(obj_or_path)}"
        try:
            obj = json.loads(Path(obj_or_path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise MCPConfigError(f"{source}: cannot read it ({exc.strerror})") from exc
        except json.JSONDecodeError as exc:
            raise MCPConfigError(f"{source}: not valid JSON: {exc}") from exc
    else:
        obj = obj_or_path
    servers = obj.get("mcpServers") if isinstance(obj, Mapping) else None
    if not isinstance(servers, Mapping):
        raise MCPConfigError(f'{source}: expected an object with an "mcpServers" object of servers')
    specs = {}
    for name, entry in servers.items():
        spec = _parse_server(source, name, entry)
        if spec is not None:
            specs[name] = spec
    return specs


def _parse_server(source: str, name: Any, entry: Any) -> ServerSpec | None:
    where = f"{source}: server {name!r}"
    if not isinstance(name, str) or not name.strip():
        raise MCPConfigError(f"{where}: the server name must be a non-empty string")
    if not isinstance(entry, Mapping):
        raise MCPConfigError(f"{where}: expected an object with \"command\" or \"url\", got {type(entry).__name__}")
    if _field(entry, "disabled", bool, where, False):
        return None
    kind = entry.get("type")
    if kind == "sse":
        raise MCPConfigError(f'{where}: "type": "sse" (the deprecated HTTP+SSE transport) is not supported; '
                             "give the server's streamable HTTP URL instead")
    if kind not in (None, "stdio", "http", "streamable-http", "streamableHttp"):
        raise MCPConfigError(f'{where}: field "type" is {kind!r}; expected "stdio" or "http"')
    has_command, has_url = "command" in entry, "url" in entry
    if has_command == has_url:
        raise MCPConfigError(f'{where}: give exactly one of "command" (a local server) or "url" (a remote one)')
    common = {
        "inline_snapshots": _field(entry, "inlineSnapshots", bool, where, None),
        "disabled_tools": _string_list(entry, "disabledTools", where),
    }
    if has_url:
        url = _field(entry, "url", str, where, "")
        if not url.startswith(("http://", "https://")):
            raise MCPConfigError(f'{where}: field "url" must start with http:// or https://, got {url!r}')
        return _with_defaults(ServerSpec(name, url=url, headers=_string_map(entry, "headers", where)), **common)
    command = _field(entry, "command", str, where, "")
    if not command.strip():
        raise MCPConfigError(f'{where}: field "command" is empty')
    spec = ServerSpec(
        name,
        command=command,
        args=tuple(_string_list(entry, "args", where) or ()),
        env=_string_map(entry, "env", where),
        cwd=_field(entry, "cwd", str, where, None),
    )
    return _with_defaults(spec, **common)


def _with_defaults(spec: ServerSpec, inline_snapshots: bool | None, disabled_tools: list[str] | None) -> ServerSpec:
    """Fill what the config left out; a Playwright MCP server gets inlined snapshots and no unsafe tools."""
    playwright = is_playwright_server(spec)
    if disabled_tools is None:
        disabled_tools = PLAYWRIGHT_UNSAFE_TOOLS if playwright else ()
    return dataclasses.replace(
        spec,
        inline_snapshots=playwright if inline_snapshots is None else inline_snapshots,
        disabled_tools=frozenset(disabled_tools),
    )


def is_playwright_server(spec: ServerSpec) -> bool:
    return any(PLAYWRIGHT_PACKAGE in part for part in (spec.command or "", *spec.args))


def _field(entry: Mapping[str, Any], key: str, kind: type, where: str, default: Any) -> Any:
    value = entry.get(key, default)
    if value is not default and not isinstance(value, kind):
        raise MCPConfigError(f'{where}: field "{key}" must be a {kind.__name__}, got {type(value).__name__}')
    return value


def _string_list(entry: Mapping[str, Any], key: str, where: str) -> list[str] | None:
    value = _field(entry, key, list, where, None)
    if value is not None and not all(isinstance(item, str) for item in value):
        raise MCPConfigError(f'{where}: field "{key}" must be a list of strings')
    return value


def _string_map(entry: Mapping[str, Any], key: str, where: str) -> dict[str, str]:
    value = _field(entry, key, dict, where, {})
    bad = [k for k, v in value.items() if not isinstance(v, str)]
    if bad:
        raise MCPConfigError(f'{where}: field "{key}" must map names to strings; {bad[0]!r} is not a string')
    return dict(value)


# ---------------------------------------------------------------------------------------------- schemas, names


def openai_parameters(schema: Any) -> dict[str, Any]:
    """An MCP input schema as OpenAI function `parameters`: an object root, rejected keywords dropped."""
    if not isinstance(schema, Mapping) or not schema:
        return {"type": "object", "properties": {}}
    cleaned = _clean_schema(schema)
    root_type = cleaned.get("type")
    if root_type == "object" or (isinstance(root_type, list) and "object" in root_type):
        cleaned["type"] = "object"
    elif root_type is None and ("properties" in cleaned or _all_branches_objects(cleaned)):
        cleaned["type"] = "object"
    else:  # a scalar or array root: endpoints want an object, so the value becomes its one property
        return {"type": "object", "properties": {"input": cleaned}, "required": ["input"]}
    cleaned.setdefault("properties", {})
    return cleaned


def _clean_schema(node: Any) -> Any:
    if not isinstance(node, Mapping):
        return node
    cleaned: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROPPED_SCHEMA_KEYWORDS:
            continue
        if key in _SUBSCHEMA_ONE:
            value = _clean_schema(value)
        elif key in _SUBSCHEMA_LIST and isinstance(value, list):
            value = [_clean_schema(item) for item in value]
        elif key in _SUBSCHEMA_MAP and isinstance(value, Mapping):
            value = {name: _clean_schema(sub) for name, sub in value.items()}
        cleaned[key] = value
    return cleaned


def _all_branches_objects(schema: Mapping[str, Any]) -> bool:
    branches = [b for key in ("anyOf", "oneOf", "allOf") for b in schema.get(key) or ()]
    return bool(branches) and all(isinstance(b, Mapping) and b.get("type") == "object" for b in branches)


def openai_name(name: str) -> str:
    """A tool name endpoints accept: at most 64 of [A-Za-z0-9_-]; a long name keeps a hash of the original."""
    safe = _NAME_INVALID.sub("_", name) or "tool"
    if len(safe) <= OPENAI_NAME_MAX:
        return safe
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{safe[:OPENAI_NAME_MAX - 9]}_{digest}"


@dataclass(frozen=True)
class HubTool:
    """A tool as the model sees it (`name`, `parameters`) and where it really lives (`server`, `tool`)."""

    name: str
    server: str
    tool: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


def expose_tools(listings: Mapping[str, list[mcp_types.Tool]]) -> list[HubTool]:
    """Give every tool of every server one valid, unique name; a name two servers share gets `server__tool`."""
    owners: dict[str, set[str]] = {}
    for server, tools in listings.items():
        for tool in tools:
            owners.setdefault(openai_name(tool.name), set()).add(server)
    exposed, taken = [], set()
    for server, tools in listings.items():
        for tool in tools:
            name = openai_name(tool.name)
            if len(owners[name]) > 1:
                name = openai_name(f"{server}__{tool.name}")
            name = _unique(name, taken)
            taken.add(name)
            description = tool.description or tool.title or ""
            exposed.append(HubTool(name, server, tool.name, description, openai_parameters(tool.input_schema)))
    return exposed


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        suffix = f"_{n}"
        candidate, n = name[: OPENAI_NAME_MAX - len(suffix)] + suffix, n + 1
    return candidate


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class ToolResult:
    """One tool call's outcome: `text` is exactly what the model sees (truncated); what the trace keeps beside it is
    `structured` (bounded like the text) and `mcp_result()`; `raw` is the server's reply, bounded too."""

    text: str
    is_error: bool = False
    images: list[Path] = field(default_factory=list)
    structured: dict[str, Any] | None = None
    raw: dict[str, Any] | None = None
    blocks: list[dict[str, Any]] = field(default_factory=list)  # each content block's type, MIME type, URI, ...
    source: str = "server"  # "mcpft": no server answered (unknown tool, bad arguments, timeout, a stopped server)

    def mcp_result(self) -> dict[str, Any]:
        """What the result was, for the tool message's `mcp_result` (metadata for the record, never trained on)."""
        return {"is_error": self.is_error, "source": self.source, "content": self.blocks}


def error_result(message: str) -> ToolResult:
    """A call mcpft could not make or finish, told to the model as an error."""
    return ToolResult(text=ERROR_PREFIX + message, is_error=True, source="mcpft")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + TRUNCATION_NOTICE.format(n=max_chars)


def inline_snapshot_links(text: str, base_dir: Path) -> str:
    """Replace Playwright's `- [Snapshot](file.yml)` link by the file's YAML, as `browser_snapshot` shows it."""

    def inline(match: re.Match[str]) -> str:
        path = base_dir / match["path"]  # an absolute link stays absolute
        try:
            snapshot = path.read_text(encoding="utf-8")
        except OSError:
            return match[0]  # the model saw the link, so the trace keeps it
        return f"```yaml\n{snapshot.rstrip()}\n```"

    return _SNAPSHOT_LINK.sub(inline, text)


class _FileSaver:
    """Writes binary tool output under one folder with names that never overwrite an earlier file."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.count = 0

    def save(self, kind: str, data_b64: str, mime_type: str) -> Path:
        data = base64.b64decode(data_b64, validate=True)
        ext = mimetypes.guess_extension(mime_type or "") or ".bin"
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            self.count += 1
            path = self.folder / f"{kind}-{self.count}{ext}"
            if not path.exists():
                path.write_bytes(data)
                return path


def convert_result(result: mcp_types.CallToolResult, *, saver: _FileSaver, max_chars: int,
                   snapshot_dir: Path | None = None) -> ToolResult:
    """Turn an MCP tool result into what the model sees; binary parts become files with a placeholder."""
    parts: list[str] = []
    images: list[Path] = []
    raw = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    for block, raw_block in zip(result.content, raw.get("content", [])):
        parts.append(_block_text(block, raw_block, saver, images))
    text = strip_ansi("\n".join(part for part in parts if part))
    if snapshot_dir is not None:
        text = inline_snapshot_links(text, snapshot_dir)
    structured = result.structured_content
    if not text and structured is not None:
        text = json.dumps(structured, ensure_ascii=False)
    if result.is_error:
        text = _as_error_text(text)
    for raw_block in raw.get("content", []):  # keep the trace bounded too
        if isinstance(raw_block.get("text"), str):
            raw_block["text"] = truncate(raw_block["text"], max_chars)
    structured = bounded_structured(structured, max_chars)
    if structured is not None:
        raw["structuredContent"] = structured
    return ToolResult(truncate(text, max_chars), bool(result.is_error), images, structured, raw,
                      blocks=block_records(raw.get("content", [])))


def bounded_structured(structured: Any, max_chars: int) -> dict[str, Any] | None:
    """Structured content as the trace keeps it: a JSON object of at most `max_chars` characters of JSON, else a
    marker object holding the notice and the JSON's start (a value that is no object is wrapped first)."""
    if structured is None:
        return None
    if not isinstance(structured, dict):
        structured = {STRUCTURED_VALUE_KEY: structured}
    text = json.dumps(structured, ensure_ascii=False)
    if len(text) <= max_chars:
        return structured
    notice = STRUCTURED_CUT_NOTICE.format(n=max_chars, total=len(text))
    return {STRUCTURED_CUT_KEY: notice, "json_start": text[:max_chars]}


def block_records(raw_blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What each content block was (type, MIME type, resource URI and name, annotations), its text or bytes left
    out (they are in the content, or in a file); past MAX_BLOCK_RECORDS blocks, only how many more there were."""
    records = [_block_record(block) for block in raw_blocks[:MAX_BLOCK_RECORDS]]
    if len(raw_blocks) > MAX_BLOCK_RECORDS:
        records.append({"omitted_blocks": len(raw_blocks) - MAX_BLOCK_RECORDS})
    return records


def _block_record(raw_block: dict[str, Any]) -> dict[str, Any]:
    resource = raw_block.get("resource") if isinstance(raw_block.get("resource"), dict) else {}
    fields = {"type": raw_block.get("type"), "mime_type": raw_block.get("mimeType", resource.get("mimeType")),
              "uri": raw_block.get("uri", resource.get("uri")), "name": raw_block.get("name"),
              "annotations": raw_block.get("annotations")}
    return {key: value for key, value in fields.items() if value is not None}


def _block_text(block: Any, raw_block: dict[str, Any], saver: _FileSaver, images: list[Path]) -> str:
    if isinstance(block, mcp_types.TextContent):
        return block.text
    if isinstance(block, (mcp_types.ImageContent, mcp_types.AudioContent)):
        kind = "image" if isinstance(block, mcp_types.ImageContent) else "audio"
        placeholder, path = _save_binary(saver, kind, block.data, block.mime_type, raw_block, "data")
        if path is not None and kind == "image":
            images.append(path)
        return placeholder
    if isinstance(block, mcp_types.EmbeddedResource):
        resource = block.resource
        if isinstance(resource, mcp_types.TextResourceContents):
            return resource.text
        return _save_binary(saver, "resource", resource.blob, resource.mime_type or "", raw_block["resource"], "blob")[0]
    if isinstance(block, mcp_types.ResourceLink):
        return f"[resource link: {block.name} {block.uri}]"
    return json.dumps(raw_block, ensure_ascii=False)  # a content type newer than this code: show it as JSON


def _save_binary(saver: _FileSaver, kind: str, data_b64: str, mime_type: str, raw_holder: dict[str, Any],
                 key: str) -> tuple[str, Path | None]:
    """Save base64 content to a file; return the placeholder the model sees and the file's path."""
    try:
        path = saver.save(kind, data_b64, mime_type)
    except (binascii.Error, ValueError):
        return f"[{kind}: undecodable {mime_type} data]", None
    raw_holder[key] = f"<saved as {path.name}>"  # the bytes live in the file, not the trace
    return f"[{kind}: {path.name}]", path


def _as_error_text(text: str) -> str:
    if not text.strip():
        return ERROR_PREFIX + "the tool reported an error without a message"
    if text.lstrip().startswith(("### Error", "Error")):  # e.g. Playwright's own header: already clear
        return text
    return ERROR_PREFIX + text


def parse_arguments(arguments: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """Tool-call arguments as a dict; a JSON string is parsed (empty means none). Raises ValueError."""
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        if not arguments.strip():
            return {}
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the arguments are not valid JSON ({exc.msg} at character {exc.pos})") from exc
    if not isinstance(arguments, Mapping):
        raise ValueError(f"the arguments must be a JSON object, got {type(arguments).__name__}")
    return dict(arguments)


# -------------------------------------------------------------------------------------------------------- hub


@dataclass(eq=False)
class _Link:
    """One server's live connection, owned by its own task (the SDK's transports are task-bound)."""

    spec: ServerSpec
    session: ClientSession | None = None
    tools: list[mcp_types.Tool] = field(default_factory=list)
    snapshot_dir: Path | None = None
    dead: str | None = None  # why calls can no longer reach the server
    stop: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)


class ToolHub:
    """Live connections to several MCP servers, their tools as one OpenAI function list, and calls to them.

    Use as `async with ToolHub(specs, output_dir) as hub:`. Binary results (screenshots) and each stdio
    server's stderr log go under `output_dir`.
    """

    def __init__(self, servers: Mapping[str, ServerSpec] | Iterable[ServerSpec], output_dir: str | os.PathLike[str],
                 *, max_chars: int = DEFAULT_MAX_CHARS, default_timeout: float = 60.0,
                 connect_timeout: float = 60.0):
        specs = list(servers.values()) if isinstance(servers, Mapping) else list(servers)
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise MCPConfigError(f"two MCP servers share a name: {sorted(n for n in names if names.count(n) > 1)}")
        self._specs = {spec.name: spec for spec in specs}
        self.output_dir = Path(output_dir)
        self.max_chars = max_chars
        self.default_timeout = default_timeout
        self.connect_timeout = connect_timeout
        self._saver = _FileSaver(self.output_dir)
        self._links: dict[str, _Link] = {}
        self._tools: dict[str, HubTool] = {}
        self._tasks: anyio.abc.TaskGroup | None = None

    # -- lifecycle

    async def __aenter__(self) -> ToolHub:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._tasks = anyio.create_task_group()
        await self._tasks.__aenter__()
        try:
            await self._connect_all()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        with anyio.CancelScope(shield=True):  # closing must finish, or server processes would leak
            async with anyio.create_task_group() as group:
                for link in self._links.values():
                    group.start_soon(self._stop, link)
        self._links.clear()
        tasks, self._tasks = self._tasks, None
        if tasks is not None:
            await tasks.__aexit__(None, None, None)  # every server task has returned by now

    async def _connect_all(self) -> None:
        failures: dict[str, BaseException] = {}

        async def connect(spec: ServerSpec) -> None:
            try:
                self._links[spec.name] = await self._start(spec)
            except Exception as exc:
                failures[spec.name] = exc

        async with anyio.create_task_group() as group:
            for spec in self._specs.values():
                group.start_soon(connect, spec)
        if failures:
            raise MCPServerError("; ".join(str(exc) for exc in failures.values())) from next(iter(failures.values()))
        self._refresh_tools()

    async def _start(self, spec: ServerSpec) -> _Link:
        assert self._tasks is not None, "use the hub inside `async with`"
        return await self._tasks.start(self._serve, spec)

    async def _serve(self, spec: ServerSpec, *, task_status: anyio.abc.TaskStatus[_Link]) -> None:
        link = _Link(spec)
        stderr_log = self.output_dir / "logs" / f"{openai_name(spec.name)}.stderr.log"
        log_start = stderr_log.stat().st_size if stderr_log.exists() else 0  # the log is kept across restarts
        started = False
        try:
            async with self._session(spec, stderr_log) as session:
                with anyio.fail_after(self.connect_timeout):
                    await session.initialize()
                    link.tools = [t for t in await list_all_tools(session) if t.name not in spec.disabled_tools]
                link.session = session
                if spec.inline_snapshots and spec.transport == "stdio":  # only a local server's files are ours to read
                    link.snapshot_dir = Path(spec.cwd or os.getcwd())
                started = True
                task_status.started(link)
                await link.stop.wait()
        except Exception as exc:
            if not started:
                raise MCPServerError(f"MCP server {spec.name!r} did not start: {describe_error(exc)}"
                                     f"{_stderr_tail(stderr_log, log_start)}") from exc
            log.warning("MCP server %r closed with an error: %s", spec.name, describe_error(exc))
        finally:
            link.dead = link.dead or "the connection is closed"
            link.done.set()

    @asynccontextmanager
    async def _session(self, spec: ServerSpec, stderr_log: Path) -> AsyncIterator[ClientSession]:
        async with AsyncExitStack() as stack:
            if spec.transport == "stdio":
                stderr_log.parent.mkdir(parents=True, exist_ok=True)
                errlog: IO[str] = stack.enter_context(open(stderr_log, "a", encoding="utf-8"))
                params = StdioServerParameters(command=spec.command, args=list(spec.args), env=dict(spec.env) or None,
                                               cwd=spec.cwd)
                read, write = await stack.enter_async_context(stdio_client(params, errlog=errlog))
            else:
                http = await stack.enter_async_context(create_mcp_http_client(headers=dict(spec.headers) or None))
                read, write = await stack.enter_async_context(streamable_http_client(spec.url, http_client=http))
            yield await stack.enter_async_context(ClientSession(read, write))

    async def _stop(self, link: _Link) -> None:
        link.stop.set()
        await link.done.wait()

    async def restart(self, server: str) -> None:
        """Close the server's connection (killing a stdio server) and start it again; raises MCPServerError."""
        if server not in self._specs:
            raise ValueError(f"no MCP server named {server!r}; servers: {sorted(self._specs)}")
        old = self._links.pop(server, None)
        if old is not None:
            with anyio.CancelScope(shield=True):
                await self._stop(old)
        self._links[server] = await self._start(self._specs[server])
        self._refresh_tools()

    def _refresh_tools(self) -> None:
        listings = {name: self._links[name].tools for name in self._specs if name in self._links}
        self._tools = {tool.name: tool for tool in expose_tools(listings)}
        if self.renamed:
            log.warning("MCP tools renamed for the model (clashing or invalid names): %s",
                        ", ".join(f"{server}/{tool} -> {name}" for name, (server, tool) in self.renamed.items()))

    # -- what the model sees

    @property
    def servers(self) -> list[str]:
        return list(self._specs)

    @property
    def tools(self) -> list[HubTool]:
        return list(self._tools.values())

    @property
    def renamed(self) -> dict[str, tuple[str, str]]:
        """Exposed name -> (server, original name), for every tool whose name had to change."""
        return {t.name: (t.server, t.tool) for t in self._tools.values() if t.name != t.tool}

    def openai_tools(self) -> list[dict[str, Any]]:
        return [tool.openai() for tool in self._tools.values()]

    # -- calls

    async def call(self, name: str, arguments: Mapping[str, Any] | str | None = None,
                   timeout: float | None = None) -> ToolResult:
        """Call a tool by its exposed name. Never raises for a tool's failure: that is an error result."""
        tool = self._tools.get(name)
        if tool is None:
            return error_result(f"unknown tool {name!r}. Available tools: {', '.join(self._tools)}")
        try:
            args = parse_arguments(arguments)
        except ValueError as exc:
            return error_result(f"cannot call {name}: {exc}")
        try:
            restarted = await self._ensure_running(tool.server)
        except MCPServerError as exc:
            return error_result(f"the MCP server {tool.server!r} behind {name} had stopped and could not be "
                                f"restarted: {describe_error(exc)}")
        result = await self._call_live(self._links[tool.server], tool, args,
                                       self.default_timeout if timeout is None else timeout)
        if restarted:  # the model should know its earlier state (a page, a login) may be gone
            result.text = f"{RESTARTED_NOTE.format(server=tool.server)}\n{result.text}"
        return result

    async def _ensure_running(self, server: str) -> bool:
        """Restart the server if it has stopped (crashed, connection closed); True when it was restarted."""
        link = self._links.get(server)
        if link is not None and link.dead is None:
            return False
        await self.restart(server)
        return True

    async def _call_live(self, link: _Link, tool: HubTool, args: dict[str, Any], timeout: float) -> ToolResult:
        try:
            result = await link.session.call_tool(tool.tool, args, read_timeout_seconds=timeout)
        except MCPError as exc:
            return self._call_failure(link, tool.name, timeout, exc)
        except Exception as exc:  # e.g. structured content that breaks the tool's own output schema
            return error_result(f"{tool.name} failed: {describe_error(exc)}")
        return convert_result(result, saver=self._saver, max_chars=self.max_chars, snapshot_dir=link.snapshot_dir)

    def _call_failure(self, link: _Link, name: str, timeout: float, exc: MCPError) -> ToolResult:
        server = link.spec.name
        if exc.code == mcp_types.REQUEST_TIMEOUT:
            return error_result(f"{name} did not answer within {timeout:g} s; the call was cancelled")
        if exc.code == mcp_types.CONNECTION_CLOSED:
            link.dead = f"its connection closed during a call to {name}; it may have crashed"
            return error_result(f"the MCP server {server!r} stopped responding ({link.dead}). "
                                "It will be restarted at the next call to one of its tools")
        return error_result(f"{name} failed: {describe_error(exc)}")

    def is_running(self, server: str) -> bool:
        link = self._links.get(server)
        return link is not None and link.dead is None


async def list_all_tools(session: ClientSession, max_pages: int = 1000) -> list[mcp_types.Tool]:
    """tools/list, following `next_cursor` until the server says there is no more."""
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    for _ in range(max_pages):
        params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools
    raise MCPServerError(f"tools/list returned more than {max_pages} pages; the server's cursor never ends")


def describe_error(exc: BaseException) -> str:
    """One line for an exception, looking inside exception groups (the SDK's task groups raise them)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe_error(inner) for inner in exc.exceptions)
    if isinstance(exc, TimeoutError):
        return "no answer in time (initialize or tools/list timed out)"
    if isinstance(exc, MCPError):
        return strip_ansi(exc.message)
    message = str(exc) or type(exc).__name__
    return message if isinstance(exc, MCPServerError) else f"{type(exc).__name__}: {message}"


def _stderr_tail(stderr_log: Path, offset: int, lines: int = 15) -> str:
    """The last lines a server wrote to stderr since `offset` (this start), to explain a failed start."""
    try:
        with open(stderr_log, "rb") as file:
            file.seek(offset)
            tail = file.read().decode("utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return ("\nLast lines of its stderr (" + str(stderr_log) + "):\n" + "\n".join(tail)) if tail else ""
