"""The Endpoint tab's MCP servers as someone who does not write JSON sees them: a list (name, what it is, its tools,
connected or not), "Add server" for the common kinds (a command, a URL, a few well-known servers), and the models
a connection test found, each said in words. The JSON stays the one source of truth; these only read and write it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from mcpft.agent.session import AgentSession
from mcpft.demo.world import TEACHER

SERVER_COLUMNS = ["server", "what it is", "tools", "status"]
KINDS = [("A command on this machine", "command"), ("A URL (a running MCP server)", "url"),
         ("A well-known server", "preset")]
# Well-known servers by what they do; `npx`/`uvx` fetch them on first use, so they need the internet once.
PRESETS = {
    "fetch": ("Fetch web pages as text (mcp-server-fetch)", {"command": "uvx", "args": ["mcp-server-fetch"]}),
    "memory": ("A memory the agent can write and read (server-memory)",
               {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-memory"]}),
    "time": ("The current time in any time zone (mcp-server-time)", {"command": "uvx", "args": ["mcp-server-time"]}),
}
PRESET_FILES = ("filesystem", "Files in a folder of this app's data dir (server-filesystem)")
# What a server is, read from the packages its command runs (the first that matches wins).
KNOWN_PACKAGES = {"@playwright/mcp": "a web browser (Playwright)", "server-filesystem": "files in a folder",
                  "mcp-server-fetch": "fetches web pages as text", "server-memory": "a memory for the agent",
                  "mcp-server-time": "the current time"}


def preset_choices() -> list[tuple[str, str]]:
    return [(label, key) for key, (label, _) in PRESETS.items()] + [(PRESET_FILES[1], PRESET_FILES[0])]


def preset_entry(key: str, data_dir: Path) -> dict:
    if key == PRESET_FILES[0]:
        folder = Path(data_dir) / "files"
        folder.mkdir(parents=True, exist_ok=True)
        return {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", str(folder)]}
    return json.loads(json.dumps(PRESETS[key][1]))  # a copy: the caller's config must not share it


def describe_server(entry: dict) -> str:
    """What a config entry is, in words, without the machine paths its command line holds."""
    if "url" in entry:
        return f"a server at {entry['url']}"
    words = " ".join([str(entry.get("command", "")), *map(str, entry.get("args", []))])
    known = next((what for package, what in KNOWN_PACKAGES.items() if package in words), None)
    return known or f"runs `{Path(str(entry.get('command', '?'))).name}` on this machine"


def server_rows(config: dict, session: AgentSession | None, error: str = "") -> list[list[str]]:
    """One row per configured server: name, what it is, its tools, and whether it is connected (or why not)."""
    servers = config.get("mcpServers", {}) if isinstance(config, dict) else {}
    connected = session is not None and session.connected and session.config == config
    failed = getattr(session, "failed_servers", {}) if connected else {}
    tools: dict[str, list[str]] = {}
    for tool in session.tools if connected else []:
        tools.setdefault(tool.server, []).append(tool.name)
    rows = []
    for name, entry in servers.items():
        entry = entry if isinstance(entry, dict) else {}
        if entry.get("disabled"):
            status = "off (disabled)"
        elif name in failed:
            status = "not connected: " + " ".join(str(failed[name]).split())[:200]
        elif connected:
            status = "connected"
        else:
            status = f"not connected: {error}" if error else "not connected yet (Connect, or send a message)"
        names = tools.get(name, [])
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        rows.append([name, describe_server(entry), shown, status])
    return rows


def add_server(config: dict, kind: str, name: str, command: str, url: str, preset: str,
               data_dir: Path) -> dict:
    """The config with one more server; raises ValueError saying what is missing or wrong."""
    if kind == "preset":
        if not preset:
            raise ValueError("Pick one of the well-known servers first.")
        entry, default_name = preset_entry(preset, data_dir), preset
    elif kind == "url":
        if not (url or "").strip().startswith(("http://", "https://")):
            raise ValueError("Give the server's URL, starting with http:// or https://.")
        entry, default_name = {"type": "http", "url": url.strip()}, "remote"
    else:
        try:
            words = shlex.split(command or "")
        except ValueError as error:
            raise ValueError(f"The command line cannot be read: {error}.") from None
        if not words:
            raise ValueError("Give the command that starts the server, e.g. `npx -y @modelcontextprotocol/"
                             "server-memory`.")
        entry, default_name = {"command": words[0], "args": words[1:]}, Path(words[-1]).name or "server"
    name = (name or "").strip() or default_name
    servers = dict(config.get("mcpServers", {}))
    if name in servers:
        raise ValueError(f"A server named {name!r} is already in the list: give the new one another name.")
    servers[name] = entry
    return {**config, "mcpServers": servers}


def remove_server(config: dict, name: str) -> dict:
    servers = dict(config.get("mcpServers", {}))
    if name not in servers:
        raise ValueError(f"No server named {name!r} in the list.")
    del servers[name]
    return {**config, "mcpServers": servers}


# -- what a connection test found -------------------------------------------------------------------------------


def model_notes(models: list[str], main_model: str | None, scripted: set[str]) -> list[str]:
    """Each model an endpoint serves, said in words: the embedded language model, the scripted teacher (fine: it
    answers demo tasks only), other scripted stand-ins; a remote server's models are listed as they are."""
    lines = []
    for model in models:
        if model == TEACHER:
            lines.append(f"- `{model}`: fine. It answers the demo site's tasks only (a script that plays a good "
                         "teacher, to collect demo traces); it is not asked a test question")
        elif model in scripted:
            lines.append(f"- `{model}`: fine. A scripted stand-in served beside the model; not asked a test question")
        elif model == main_model:
            lines.append(f"- `{model}`: the language model this app loaded; it answers anything (it is the base "
                         "you fine-tune)")
        else:
            lines.append(f"- `{model}`")
    return lines
