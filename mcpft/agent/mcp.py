"""MCP tool servers through the official SDK: config, a hub of live connections, schema and result conversion.

The config is the widely used JSON that Claude Desktop, Cursor and the Trelis workshop share::

    {"mcpServers": {"NAME": {"command": "...", "args": [...], "env": {...}, "cwd": "..."}
                    "OTHER": {"url": "https://.../mcp", "headers": {...}}}}

Optional keys per server are ours: ``inlineSnapshots`` (bool), ``disabledTools`` (list of names), ``initTimeout``
(seconds for initialize + tools/list; default: the hub's ``connect_timeout``, 60) and ``callTimeout`` (seconds a
tool call may go without an answer or a progress notification; default: the timeout the caller passes, else the
hub's ``default_timeout``, 60). Other clients' extra keys (``type``, ``autoApprove``, ``description``, ...) are
accepted and ignored, and a server with ``"disabled": true`` is skipped.

`ToolHub` connects several servers at once (stdio or streamable HTTP), lists their tools, exposes them as
OpenAI functions and turns every tool call into a `ToolResult`: the exact text the model sees plus what the
trace keeps. Failures of any kind (unknown tool, bad arguments, timeout, a crashed server) come back as
error results, never as exceptions, so an agent loop keeps going. Faults of servers in the wild are survived:

- A server that does not start is left out and named in `ToolHub.failed` (server -> reason); the others serve.
  Only when none starts does entering the hub raise MCPServerError.
- Before each call a stdio server is pinged (4-5 ms measured on a busy 2-core machine): one that died while idle
  is restarted and the call made, the model told so in the result. A call during which a server dies is never sent
  twice (it may have done its work, or caused the crash); the next call restarts the server. An HTTP server that
  restarted and forgot this client's session ("Session not found", or an HTTP error that a ping on the session
  repeats) gets a new session and the call once more, since a rejected session proves the call never ran. A server
  that does not answer the ping within PING_TIMEOUT (or the call's timeout, if shorter) is restarted too.
- Bytes that are not UTF-8 on a server's stdout are decoded as U+FFFD, so the line fails to parse and is skipped
  instead of killing the SDK's reader (every later call used to wait out its timeout); the model is told.
- A content block the SDK cannot read (a type newer than it, a malformed block) becomes a text placeholder
  (``[unsupported content type 'x']``), so the valid blocks of that result survive.
- ``notifications/tools/list_changed`` lists the server's tools again; a call waits for that, so the next model
  step is offered the new tools. Calls carry a ``progressToken``; each progress notification restarts the call's
  timeout and reaches ``on_progress`` (the hub's, or the call's own).
- Secrets of a server's own config (its ``env`` and ``headers`` values; see `Redactor`) are replaced by
  ``[redacted:env NAME]`` in everything it sends, in text files saved from its results, and in its stderr log.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import mimetypes
import os
import re
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import anyio.to_thread
import mcp.types as mcp_types
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client  # the SDK's own helper (its session group uses it)
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from pydantic import TypeAdapter, ValidationError

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
RESTARTED_NOTE = "(the MCP server {server!r} had stopped and was restarted: {reason})"
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
    init_timeout: float | None = None  # seconds for initialize + tools/list; None: the hub's default
    call_timeout: float | None = None  # seconds a call may go without an answer or progress; None: the caller's

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
        if self.init_timeout is not None:
            entry["initTimeout"] = self.init_timeout
        if self.call_timeout is not None:
            entry["callTimeout"] = self.call_timeout
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
        "init_timeout": _seconds(entry, "initTimeout", where),
        "call_timeout": _seconds(entry, "callTimeout", where),
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


def _with_defaults(spec: ServerSpec, inline_snapshots: bool | None, disabled_tools: list[str] | None,
                   **timeouts: float | None) -> ServerSpec:
    """Fill what the config left out; a Playwright MCP server gets inlined snapshots and no unsafe tools."""
    playwright = is_playwright_server(spec)
    if disabled_tools is None:
        disabled_tools = PLAYWRIGHT_UNSAFE_TOOLS if playwright else ()
    return dataclasses.replace(
        spec,
        inline_snapshots=playwright if inline_snapshots is None else inline_snapshots,
        disabled_tools=frozenset(disabled_tools),
        **timeouts,
    )


def is_playwright_server(spec: ServerSpec) -> bool:
    return any(PLAYWRIGHT_PACKAGE in part for part in (spec.command or "", *spec.args))


def _field(entry: Mapping[str, Any], key: str, kind: type, where: str, default: Any) -> Any:
    value = entry.get(key, default)
    if value is not default and not isinstance(value, kind):
        raise MCPConfigError(f'{where}: field "{key}" must be a {kind.__name__}, got {type(value).__name__}')
    return value


def _seconds(entry: Mapping[str, Any], key: str, where: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise MCPConfigError(f'{where}: field "{key}" must be a number of seconds above 0, got {value!r}')
    return float(value)


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
    cleaned = without_keywords(schema, DROPPED_SCHEMA_KEYWORDS)
    root_type = cleaned.get("type")
    if root_type == "object" or (isinstance(root_type, list) and "object" in root_type):
        cleaned["type"] = "object"
    elif root_type is None and ("properties" in cleaned or _all_branches_objects(cleaned)):
        cleaned["type"] = "object"
    else:  # a scalar or array root: endpoints want an object, so the value becomes its one property
        return {"type": "object", "properties": {"input": cleaned}, "required": ["input"]}
    cleaned.setdefault("properties", {})
    return cleaned


def without_keywords(node: Any, keywords: frozenset[str] | set[str]) -> Any:
    """The JSON schema `node` without `keywords` wherever they occur as schema keywords (a *property* so named is
    kept)."""
    if not isinstance(node, Mapping):
        return node
    cleaned: dict[str, Any] = {}
    for key, value in node.items():
        if key in keywords:
            continue
        if key in _SUBSCHEMA_ONE:
            value = without_keywords(value, keywords)
        elif key in _SUBSCHEMA_LIST and isinstance(value, list):
            value = [without_keywords(item, keywords) for item in value]
        elif key in _SUBSCHEMA_MAP and isinstance(value, Mapping):
            value = {name: without_keywords(sub, keywords) for name, sub in value.items()}
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

    def save(self, kind: str, data_b64: str, mime_type: str, redactor: Redactor | None = None) -> Path:
        data = base64.b64decode(data_b64, validate=True)
        if redactor and is_textual(mime_type):  # a text file holding a secret is redacted like the result's text
            data = redactor.bytes(data)
        ext = mimetypes.guess_extension(mime_type or "") or ".bin"
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            self.count += 1
            path = self.folder / f"{kind}-{self.count}{ext}"
            if not path.exists():
                path.write_bytes(data)
                return path


def convert_result(result: mcp_types.CallToolResult, *, saver: _FileSaver, max_chars: int,
                   snapshot_dir: Path | None = None, redactor: Redactor | None = None) -> ToolResult:
    """Turn an MCP tool result into what the model sees; binary parts become files with a placeholder. The server's
    secrets (`redactor`) are replaced in the text, also in what was inlined from a snapshot file, and in text files."""
    parts: list[str] = []
    images: list[Path] = []
    raw = result.model_dump(mode="json", by_alias=True, exclude_none=True)
    for block, raw_block in zip(result.content, raw.get("content", [])):
        parts.append(_block_text(block, raw_block, saver, images, redactor))
    text = strip_ansi("\n".join(part for part in parts if part))
    if snapshot_dir is not None:
        text = inline_snapshot_links(text, snapshot_dir)
    if redactor:
        text = redactor.text(text)
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
    unsupported = (raw_block.get("_meta") or {}).get(UNSUPPORTED_BLOCK_KEY)
    if isinstance(unsupported, dict):  # a placeholder for a block the SDK could not read: record what it was
        return {"type": unsupported.get("type"), "unsupported": True}
    resource = raw_block.get("resource") if isinstance(raw_block.get("resource"), dict) else {}
    fields = {"type": raw_block.get("type"), "mime_type": raw_block.get("mimeType", resource.get("mimeType")),
              "uri": raw_block.get("uri", resource.get("uri")), "name": raw_block.get("name"),
              "annotations": raw_block.get("annotations")}
    return {key: value for key, value in fields.items() if value is not None}


def _block_text(block: Any, raw_block: dict[str, Any], saver: _FileSaver, images: list[Path],
                redactor: Redactor | None = None) -> str:
    if isinstance(block, mcp_types.TextContent):
        return block.text
    if isinstance(block, (mcp_types.ImageContent, mcp_types.AudioContent)):
        kind = "image" if isinstance(block, mcp_types.ImageContent) else "audio"
        placeholder, path = _save_binary(saver, kind, block.data, block.mime_type, raw_block, "data", redactor)
        if path is not None and kind == "image":
            images.append(path)
        return placeholder
    if isinstance(block, mcp_types.EmbeddedResource):
        resource = block.resource
        if isinstance(resource, mcp_types.TextResourceContents):
            return resource.text
        return _save_binary(saver, "resource", resource.blob, resource.mime_type or "", raw_block["resource"], "blob",
                            redactor)[0]
    if isinstance(block, mcp_types.ResourceLink):
        return f"[resource link: {block.name} {block.uri}]"
    return json.dumps(raw_block, ensure_ascii=False)  # a content type newer than this code: show it as JSON


def _save_binary(saver: _FileSaver, kind: str, data_b64: str, mime_type: str, raw_holder: dict[str, Any],
                 key: str, redactor: Redactor | None = None) -> tuple[str, Path | None]:
    """Save base64 content to a file; return the placeholder the model sees and the file's path."""
    try:
        path = saver.save(kind, data_b64, mime_type, redactor)
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


# ------------------------------------------------------------------------------------------ secrets, odd content

SECRET_MIN_CHARS = 6  # shorter values would replace ordinary words in results
# An env var so named always holds a secret; others do unless their value is plainly a setting.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASS|AUTH|CRED|PRIVATE|COOKIE|SESSION|SIGNATURE", re.IGNORECASE)
# Values that are settings, not secrets (redacting "production" or a folder's path would garble every result).
_PLAIN_SETTING = re.compile(r"-?\d+(\.\d+)?|true|false|yes|no|on|off|[a-z]+|[~/].*|[A-Za-z]:\\.*|https?://[^@\s]*",
                            re.IGNORECASE)
_AUTH_SCHEME = re.compile(r"(?:Bearer|Basic|Token|Bot|ApiKey)\s+(?P<credential>\S+)", re.IGNORECASE)
_TEXTUAL_TYPES = ("application/json", "application/xml", "application/yaml", "application/x-yaml",
                  "application/javascript", "application/x-ndjson", "application/csv")


@dataclass(frozen=True)
class Redactor:
    """Replaces the secrets a server's config hands it (`env` and `headers` values) by `[redacted:env NAME]` or
    `[redacted:header NAME]`, so that a server echoing its credentials never puts them in a trace, a tool file or a
    log. An env value counts as a secret when its name says so (KEY, TOKEN, SECRET, PASS, AUTH, ...) or when it is
    not plainly a setting (a number, a boolean, one lowercase word, a path, a URL without credentials); a header
    value always does, and so does the credential after its scheme (`Bearer abc...`). Values shorter than
    SECRET_MIN_CHARS are left alone."""

    secrets: tuple[tuple[str, str], ...] = ()  # (value, replacement), longest value first

    @classmethod
    def for_spec(cls, spec: ServerSpec) -> Redactor:
        found: dict[str, str] = {}
        for name, value in spec.env.items():
            if len(value) >= SECRET_MIN_CHARS and (_SECRET_NAME.search(name) or not _PLAIN_SETTING.fullmatch(value)):
                found.setdefault(value, f"[redacted:env {name}]")
        for name, value in spec.headers.items():
            scheme = _AUTH_SCHEME.fullmatch(value.strip())
            for secret in (value, scheme["credential"] if scheme else ""):
                if len(secret) >= SECRET_MIN_CHARS:
                    found.setdefault(secret, f"[redacted:header {name}]")
        return cls(tuple(sorted(found.items(), key=lambda item: -len(item[0]))))  # a longer secret may hold a shorter

    def __bool__(self) -> bool:
        return bool(self.secrets)

    def text(self, text: str) -> str:
        for secret, replacement in self.secrets:
            if secret in text:
                text = text.replace(secret, replacement)
        return text

    def value(self, value: Any) -> Any:
        """Every string inside a JSON value redacted (dict keys too)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(key): self.value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value

    def bytes(self, data: bytes) -> bytes:
        """Bytes that are mostly text (a log line, a text file): redacted, with any undecodable bytes kept as they
        were."""
        text = data.decode("utf-8", errors="surrogateescape")
        return self.text(text).encode("utf-8", errors="surrogateescape")


def is_textual(mime_type: str) -> bool:
    mime_type = (mime_type or "").split(";")[0].strip().lower()
    return mime_type.startswith("text/") or mime_type in _TEXTUAL_TYPES or mime_type.endswith(("+json", "+xml"))


KNOWN_BLOCK_TYPES = frozenset({"text", "image", "audio", "resource", "resource_link"})
UNSUPPORTED_BLOCK_KEY = "mcpft/unsupported"  # in a placeholder block's `_meta`: what the replaced block was
_CONTENT_BLOCK: TypeAdapter[Any] = TypeAdapter(mcp_types.ContentBlock)


def tolerate_content(result: dict[str, Any]) -> dict[str, Any]:
    """A tools/call result with each content block the SDK cannot read (a type newer than it, a malformed block)
    replaced by a text placeholder naming it. The SDK would otherwise reject the whole result, valid text included,
    and the model would be shown a validation dump."""
    content = result.get("content")
    if not isinstance(content, list):
        return result
    kept = [block if _readable_block(block) else _placeholder_block(block) for block in content]
    return result if all(a is b for a, b in zip(kept, content)) else {**result, "content": kept}


def _readable_block(block: Any) -> bool:
    try:
        _CONTENT_BLOCK.validate_python(block, by_name=False)
    except ValidationError:
        return False
    return True


def _placeholder_block(block: Any) -> dict[str, Any]:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind in KNOWN_BLOCK_TYPES:
        text = f"[invalid {kind!r} content: it lacks a field or has one of the wrong type]"
    else:
        text = f"[unsupported content type {kind!r}]"
    return {"type": "text", "text": text, "_meta": {UNSUPPORTED_BLOCK_KEY: {"type": kind}}}


def _clean_message(item: SessionMessage, redactor: Redactor) -> SessionMessage:
    """What a server sent, before the SDK reads it: tool results it would reject made readable, secrets redacted."""
    message = item.message
    if isinstance(message, mcp_types.JSONRPCResponse):
        result = redactor.value(message.result) if redactor else message.result
        message = message.model_copy(update={"result": tolerate_content(result)})
    elif not redactor:
        return item
    elif isinstance(message, mcp_types.JSONRPCNotification) and message.params is not None:
        message = message.model_copy(update={"params": redactor.value(message.params)})
    elif isinstance(message, mcp_types.JSONRPCError):
        error = message.error
        message = message.model_copy(update={"error": error.model_copy(
            update={"message": redactor.text(error.message), "data": redactor.value(error.data)})})
    else:
        return item
    return SessionMessage(message, metadata=item.metadata)


def describe_stream_fault(exc: BaseException) -> str:
    """What a server wrote that is no JSON-RPC message, in one line (the SDK's error quotes the line)."""
    if "\ufffd" in str(exc):  # the transport decodes with errors="replace", so bytes that are not UTF-8 show so
        return "it wrote bytes to stdout that are not UTF-8, which is no JSON-RPC message; that line was skipped"
    if isinstance(exc, ValidationError) and exc.errors():
        detail = exc.errors()[0]["msg"]
    else:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"it wrote a line that is no JSON-RPC message ({detail[:200]}); that line was skipped"


def _copy_stderr(read_fd: int, log_path: Path, redactor: Redactor) -> None:
    """A server's stderr, line by line, into its log with its secrets redacted (runs on a thread of its own)."""
    with os.fdopen(read_fd, "rb") as source, open(log_path, "ab") as log_file:
        for line in source:
            log_file.write(redactor.bytes(line) if redactor else line)
            log_file.flush()


# -------------------------------------------------------------------------------------------------------- hub

PING_TIMEOUT = 5.0  # seconds a live stdio server gets to answer the ping before a call
PROCESS_EXITED = "its process had exited"
# How servers say they no longer know a session id (the Python SDK: 404 "Session not found"; the TypeScript SDK's
# examples: 400 "Bad Request: No valid session ID provided"; the SDK client's own stand-in: "Session terminated").
_SESSION_LOST = re.compile(r"session (?:id )?(?:not found|terminated|expired|unknown)|no valid session|"
                           r"(?:unknown|invalid) session", re.IGNORECASE)
# What the SDK says for an HTTP error whose body it cannot read, such as the TypeScript examples' 400 (its JSON-RPC
# error has no id): the reason is lost, so a ping on the same session tells whether the session is the problem.
_SDK_HTTP_FALLBACK = "Server returned an error response"


@dataclass(frozen=True)
class ToolProgress:
    """A progress notification from a running tool call."""

    tool: str  # the exposed name the model called
    server: str
    progress: float
    total: float | None
    message: str | None

    def text(self) -> str:
        """As a person reads it: `slow: 3/4 step 3`."""
        done = f"{self.progress:g}/{self.total:g}" if self.total else f"{self.progress:g}"
        return f"{self.tool}: {done}" + (f" {self.message}" if self.message else "")


# on_progress(ToolProgress) -> None, or an awaitable; called on the hub's event loop.
ProgressCallback = Callable[[ToolProgress], Any]


class ServerStartError(MCPServerError):
    """One server did not start; `reason` says why, without the server's name."""

    def __init__(self, server: str, reason: str):
        super().__init__(f"MCP server {server!r} did not start: {reason}")
        self.server, self.reason = server, reason


class _SessionLost(Exception):
    """An HTTP server rejected a request because it no longer knows the session: the request never ran."""


@dataclass(eq=False)
class _Link:
    """One server's live connection, owned by its own task (the SDK's transports are task-bound)."""

    spec: ServerSpec
    redactor: Redactor
    session: ClientSession | None = None
    tools: list[mcp_types.Tool] = field(default_factory=list)
    snapshot_dir: Path | None = None
    dead: str | None = None  # why calls can no longer reach the server
    faults: list[str] = field(default_factory=list)  # what the server garbled since the last call, told with its result
    reloading: anyio.Event | None = None  # set while its tools are listed again after tools/list_changed
    stderr_copier: threading.Thread | None = None
    stop: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)


class ToolHub:
    """Live connections to several MCP servers, their tools as one OpenAI function list, and calls to them.

    Use as `async with ToolHub(specs, output_dir) as hub:`. Binary results (screenshots) and each stdio
    server's stderr log go under `output_dir`. A server that does not start is left out and named in `failed`
    (server -> reason); only when none starts does entering the hub raise MCPServerError.

    `connect_timeout` bounds initialize + tools/list and `default_timeout` a call's silence (no answer, no
    progress), unless the server's config sets `initTimeout` / `callTimeout`. `on_progress` hears every progress
    notification of every call (`call` also takes one of its own).
    """

    def __init__(self, servers: Mapping[str, ServerSpec] | Iterable[ServerSpec], output_dir: str | os.PathLike[str],
                 *, max_chars: int = DEFAULT_MAX_CHARS, default_timeout: float = 60.0,
                 connect_timeout: float = 60.0, on_progress: ProgressCallback | None = None):
        specs = list(servers.values()) if isinstance(servers, Mapping) else list(servers)
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise MCPConfigError(f"two MCP servers share a name: {sorted(n for n in names if names.count(n) > 1)}")
        self._specs = {spec.name: spec for spec in specs}
        self.output_dir = Path(output_dir)
        self.max_chars = max_chars
        self.default_timeout = default_timeout
        self.connect_timeout = connect_timeout
        self.on_progress = on_progress
        self.failed: dict[str, str] = {}  # server -> why it is not running (did not start, or could not restart)
        self.tools_version = 0  # grows whenever the exposed tool list changes
        self._saver = _FileSaver(self.output_dir)
        self._links: dict[str, _Link] = {}
        self._listed: dict[str, list[mcp_types.Tool]] = {}  # each server's last tool list, kept while it is down
        self._tools: dict[str, HubTool] = {}
        self._tools_changed: anyio.Event | None = None
        self._tasks: anyio.abc.TaskGroup | None = None

    # -- lifecycle

    async def __aenter__(self) -> ToolHub:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._tools_changed = anyio.Event()
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
        """Start every server at once; the ones that fail are named in `failed` and the others serve."""

        async def connect(spec: ServerSpec) -> None:
            try:
                self._adopt(await self._start(spec))
            except ServerStartError as exc:
                self.failed[spec.name] = exc.reason
            except Exception as exc:
                self.failed[spec.name] = describe_error(exc)

        async with anyio.create_task_group() as group:
            for spec in self._specs.values():
                group.start_soon(connect, spec)
        if self.failed and not self._links:  # nothing to work with: say why, all of it
            raise MCPServerError("; ".join(f"MCP server {name!r} did not start: {reason}"
                                           for name, reason in self.failed.items()))
        for name, reason in self.failed.items():
            log.info("MCP server %r did not start and is left out: %s", name, reason)
        self._refresh_tools()

    async def _start(self, spec: ServerSpec) -> _Link:
        assert self._tasks is not None, "use the hub inside `async with`"
        return await self._tasks.start(self._serve, spec)

    def _adopt(self, link: _Link) -> None:
        self._links[link.spec.name] = link
        self._listed[link.spec.name] = link.tools
        self.failed.pop(link.spec.name, None)

    async def _serve(self, spec: ServerSpec, *, task_status: anyio.abc.TaskStatus[_Link]) -> None:
        link = _Link(spec, Redactor.for_spec(spec))
        stderr_log = self.output_dir / "logs" / f"{openai_name(spec.name)}.stderr.log"
        log_start = stderr_log.stat().st_size if stderr_log.exists() else 0  # the log is kept across restarts
        started = False
        try:
            async with self._session(link, stderr_log) as session:
                with anyio.fail_after(spec.init_timeout or self.connect_timeout):
                    await session.initialize()
                    link.tools = await self._list_tools(link, session)
                link.session = session
                if spec.inline_snapshots and spec.transport == "stdio":  # only a local server's files are ours to read
                    link.snapshot_dir = Path(spec.cwd or os.getcwd())
                started = True
                task_status.started(link)
                await link.stop.wait()
        except Exception as exc:
            if not started:
                await _finish_log(link)
                raise ServerStartError(spec.name, f"{describe_error(exc)}{_stderr_tail(stderr_log, log_start)}") \
                    from exc
            log.warning("MCP server %r closed with an error: %s", spec.name, describe_error(exc))
        finally:
            link.dead = link.dead or "the connection is closed"
            await _finish_log(link)
            link.done.set()

    @asynccontextmanager
    async def _session(self, link: _Link, stderr_log: Path) -> AsyncIterator[ClientSession]:
        spec = link.spec
        async with AsyncExitStack() as stack:
            if spec.transport == "stdio":
                errlog = stack.enter_context(self._stderr_pipe(link, stderr_log))
                # "replace": bytes that are not UTF-8 would otherwise kill the SDK's reader silently, and every later
                # call would wait out its timeout; replaced, the line fails to parse and is reported (faults).
                params = StdioServerParameters(command=spec.command, args=list(spec.args), env=dict(spec.env) or None,
                                               cwd=spec.cwd, encoding_error_handler="replace")
                read, write = await stack.enter_async_context(stdio_client(params, errlog=errlog))
            else:
                http = await stack.enter_async_context(create_mcp_http_client(headers=dict(spec.headers) or None))
                read, write = await stack.enter_async_context(streamable_http_client(spec.url, http_client=http))
            relayed = await stack.enter_async_context(self._relayed(link, read))
            yield await stack.enter_async_context(
                ClientSession(relayed, write, message_handler=functools.partial(self._on_message, link)))

    @contextmanager
    def _stderr_pipe(self, link: _Link, stderr_log: Path) -> Iterator[IO[str]]:
        """The server's stderr: a pipe whose lines a thread copies into the log, redacted."""
        stderr_log.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        link.stderr_copier = threading.Thread(target=_copy_stderr, args=(read_fd, stderr_log, link.redactor),
                                              name=f"mcpft-stderr-{link.spec.name}", daemon=True)
        link.stderr_copier.start()
        with os.fdopen(write_fd, "w", encoding="utf-8") as write_end:  # closed here once the server is stopped
            yield write_end

    @asynccontextmanager
    async def _relayed(self, link: _Link, source: Any) -> AsyncIterator[Any]:
        """The transport's messages as the session should read them (see `_relay`)."""
        send, receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        async with anyio.create_task_group() as group:
            group.start_soon(self._relay, link, source, send)
            try:
                yield receive
            finally:
                group.cancel_scope.cancel()

    async def _relay(self, link: _Link, source: Any, sink: Any) -> None:
        """Pass the server's messages on, cleaned (`_clean_message`); note what it garbled, and when its output ends
        (a stdio server that exited while idle is known dead before the next call)."""
        async with sink:
            try:
                async for item in source:
                    if isinstance(item, SessionMessage):
                        item = _clean_message(item, link.redactor)
                    else:  # the transport could not read a line: noted before the answer it came with goes on
                        fault = describe_stream_fault(item)
                        log.warning("MCP server %r: %s", link.spec.name, fault)
                        if len(link.faults) < 10:
                            link.faults.append(fault)
                    await sink.send(item)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return  # the session is closing
        if link.spec.transport == "stdio":
            link.dead = link.dead or PROCESS_EXITED

    async def _on_message(self, link: _Link, message: Any) -> None:
        # While the server starts (no session yet), the first tools/list is still to come and sees the change.
        if isinstance(message, mcp_types.ToolListChangedNotification) and link.session is not None:
            await self._reload_tools(link)

    async def _reload_tools(self, link: _Link) -> None:
        """tools/list again after the server said its tools changed; the next model step sees the new list."""
        done = link.reloading = anyio.Event()
        try:
            link.tools = await self._list_tools(link, link.session)
        except Exception as exc:
            log.warning("MCP server %r said its tools changed, but listing them failed: %s", link.spec.name,
                        describe_error(exc))
        else:
            if self._links.get(link.spec.name) is link:
                self._listed[link.spec.name] = link.tools
                self._refresh_tools()
        finally:
            done.set()

    @staticmethod
    async def _list_tools(link: _Link, session: ClientSession) -> list[mcp_types.Tool]:
        return [tool for tool in await list_all_tools(session) if tool.name not in link.spec.disabled_tools]

    async def _stop(self, link: _Link) -> None:
        link.stop.set()
        await link.done.wait()

    async def restart(self, server: str) -> None:
        """Close the server's connection (killing a stdio server) and start it again; raises MCPServerError (and
        names the server in `failed`) when it does not come back. Its tools stay offered meanwhile, so that a call
        tries again."""
        if server not in self._specs:
            raise ValueError(f"no MCP server named {server!r}; servers: {sorted(self._specs)}")
        old = self._links.pop(server, None)
        if old is not None:
            with anyio.CancelScope(shield=True):
                await self._stop(old)
        try:
            link = await self._start(self._specs[server])
        except ServerStartError as exc:
            self.failed[server] = exc.reason
            raise
        self._adopt(link)
        self._refresh_tools()

    def _refresh_tools(self) -> None:
        listings = {name: self._listed[name] for name in self._specs if name in self._listed}
        tools = {tool.name: tool for tool in expose_tools(listings)}
        if tools == self._tools:
            return
        self._tools = tools
        self.tools_version += 1
        if self._tools_changed is not None:
            self._tools_changed.set()
            self._tools_changed = anyio.Event()
        if self.renamed:
            log.warning("MCP tools renamed for the model (clashing or invalid names): %s",
                        ", ".join(f"{server}/{tool} -> {name}" for name, (server, tool) in self.renamed.items()))

    async def wait_tools_changed(self, after_version: int) -> int:
        """Wait until the tool list is newer than `after_version` (e.g. after tools/list_changed); the new version."""
        while self.tools_version <= after_version:
            assert self._tools_changed is not None, "use the hub inside `async with`"
            await self._tools_changed.wait()
        return self.tools_version

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
                   timeout: float | None = None, on_progress: ProgressCallback | None = None) -> ToolResult:
        """Call a tool by its exposed name. Never raises for a tool's failure: that is an error result.

        `timeout`: seconds the call may go without an answer or a progress notification (the server's
        `callTimeout` wins, then this, then `default_timeout`). A server found dead before the call (a stdio
        process that exited, a ping unanswered, an HTTP session the server forgot) is restarted and the call made,
        with a note to the model that state may be gone; a call that was sent and lost is never sent twice, except
        when an HTTP server rejected it for its session, which proves it never ran."""
        tool = self._tools.get(name)
        if tool is None:
            return error_result(f"unknown tool {name!r}. Available tools: {', '.join(self._tools)}")
        try:
            args = parse_arguments(arguments)
        except ValueError as exc:
            return error_result(f"cannot call {name}: {exc}")
        spec = self._specs[tool.server]
        timeout = spec.call_timeout or (self.default_timeout if timeout is None else timeout)
        notes = []
        try:
            notes.append(await self._ready(tool.server, timeout))
            try:
                result = await self._call_live(self._links[tool.server], tool, args, timeout, on_progress)
            except _SessionLost as lost:  # it never ran: open a new session and send it once more
                await self.restart(tool.server)
                notes.append(f"(the MCP server {tool.server!r} no longer knew this client's session ({lost}); "
                             "a new session was opened)")
                result = await self._call_live(self._links[tool.server], tool, args, timeout, on_progress, retry=False)
        except MCPServerError as exc:
            return error_result(f"the MCP server {tool.server!r} behind {name} had stopped and could not be "
                                f"restarted: {exc.reason if isinstance(exc, ServerStartError) else exc}")
        link = self._links[tool.server]
        notes += [f"(note: the MCP server {tool.server!r} misbehaved: {fault})" for fault in link.faults]
        link.faults.clear()
        if link.reloading is not None:  # tools this call unlocked are offered at the very next step
            with anyio.move_on_after(min(timeout, PING_TIMEOUT)):
                await link.reloading.wait()
        notes = [note for note in notes if note]
        if notes:  # the model should know its earlier state (a page, a login) may be gone
            result.text = "\n".join([*notes, result.text])
        return result

    async def _ready(self, server: str, timeout: float) -> str | None:
        """Make sure the server can take a call, restarting it when it has stopped; the note for the model when it
        was restarted, else None. Raises MCPServerError when it does not come back."""
        link = self._links.get(server)
        reason = "an earlier restart had failed" if link is None else link.dead
        if reason is None and link.spec.transport == "stdio":
            reason = await _probe(link, min(timeout, PING_TIMEOUT))
        if reason is None:
            return None
        await self.restart(server)
        return RESTARTED_NOTE.format(server=server, reason=reason)

    async def _call_live(self, link: _Link, tool: HubTool, args: dict[str, Any], timeout: float,
                         on_progress: ProgressCallback | None, retry: bool = True) -> ToolResult:
        """One tools/call with a progress token; the timeout counts from the last sign of life (the request, or a
        progress notification), so a long call that reports progress is never cut off."""
        report = on_progress or self.on_progress
        progressed = False

        async def heard(progress: float, total: float | None, message: str | None) -> None:
            nonlocal progressed
            progressed = True
            idle.deadline = anyio.current_time() + timeout
            if report is not None:
                outcome = report(ToolProgress(tool.name, link.spec.name, progress, total, message))
                if inspect.isawaitable(outcome):
                    await outcome

        with anyio.CancelScope(deadline=anyio.current_time() + timeout) as idle:
            try:
                result = await link.session.call_tool(tool.tool, args, progress_callback=heard)
            except MCPError as exc:
                if link.spec.transport == "http" and (lost := await _lost_session(link, exc)):
                    link.dead = f"it no longer knew this client's session ({lost})"
                    if retry:
                        raise _SessionLost(lost) from exc
                return self._call_failure(link, tool.name, exc)
            except Exception as exc:  # e.g. structured content that breaks the tool's own output schema
                return error_result(f"{tool.name} failed: {describe_error(exc)}")
            return convert_result(result, saver=self._saver, max_chars=self.max_chars, snapshot_dir=link.snapshot_dir,
                                  redactor=link.redactor)
        silence = "since its last progress report" if progressed else ""
        return error_result(f"{tool.name} did not answer within {timeout:g} s{' ' + silence if silence else ''}; "
                            "the call was cancelled")

    def _call_failure(self, link: _Link, name: str, exc: MCPError) -> ToolResult:
        server = link.spec.name
        if exc.code == mcp_types.CONNECTION_CLOSED:
            link.dead = f"its connection closed during a call to {name}; it may have crashed"
            return error_result(f"the MCP server {server!r} stopped responding ({link.dead}). "
                                "It will be restarted at the next call to one of its tools")
        return error_result(f"{name} failed: {describe_error(exc)}")

    def is_running(self, server: str) -> bool:
        link = self._links.get(server)
        return link is not None and link.dead is None


async def _lost_session(link: _Link, exc: MCPError) -> str | None:
    """Why an HTTP server rejected a request for its session (so the request never ran), or None when the error is
    something else: the server says so, or the SDK could not read its error and a ping on the session fails too."""
    message = strip_ansi(exc.message or "")
    if _SESSION_LOST.search(message):
        return message
    if message != _SDK_HTTP_FALLBACK:
        return None
    try:
        with anyio.fail_after(PING_TIMEOUT):
            await link.session.send_ping()
    except MCPError as ping_error:
        if ping_error.message == _SDK_HTTP_FALLBACK or _SESSION_LOST.search(ping_error.message or ""):
            return "it answered requests on this session with HTTP errors, a ping too; did the server restart?"
    except TimeoutError:
        pass
    return None


async def _finish_log(link: _Link, seconds: float = 2.0) -> None:
    """Wait (bounded) until a stopped server's stderr is all in its log, so the log is complete once the server is
    closed (a process that left children holding its stderr is not waited for longer)."""
    if link.stderr_copier is not None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(link.stderr_copier.join, seconds, abandon_on_cancel=True)


async def _probe(link: _Link, seconds: float) -> str | None:
    """Why a stdio server cannot take a call (its process exited, a ping went unanswered), or None: a ping costs a
    few milliseconds, and tells a server that died while idle (restart it, then call) from one that dies during the
    call (never sent twice)."""
    try:
        with anyio.fail_after(seconds):
            await link.session.send_ping()
    except TimeoutError:
        return f"it did not answer a ping within {seconds:g} s"
    except MCPError as exc:
        if exc.code == mcp_types.CONNECTION_CLOSED:
            return link.dead or PROCESS_EXITED
        # any other answer (e.g. a server without ping) is still an answer
    return link.dead


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
