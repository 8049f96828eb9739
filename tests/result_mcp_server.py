"""A small MCP server (official SDK, `MCPServer`) whose tools return the results that used to be lost or leak: the
tool-result and run-flag tests run it as a real subprocess.

Usage: python result_mcp_server.py

- `report(rows)`: structured output of `rows` rows of 500 characters (about 55 KB for 110 rows);
- `lookup(key)`: an error (isError) built of every kind of content block: annotated text, a resource link, an
  embedded text resource and an image;
- `read_log()`: a successful result whose text starts with "Error:" (a log line), so no prefix can tell;
- `fail(reason)`: always an error, for a model that loops on one failing tool;
- `echo(text)`: the text back.
"""

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import (
    Annotations, CallToolResult, EmbeddedResource, ImageContent, ResourceLink, TextContent, TextResourceContents)
from pydantic import BaseModel

ROW_CHARS = 500
LOG_LINE = "Error: disk /dev/sdb1 is 93% full (a warning from the log, not a failure of this call)"
MISSING_URI = "file:///records/{key}.json"
LOG_URI = "memo://lookup/log"
RED_PIXEL_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"  # base64


class Report(BaseModel):
    title: str
    rows: list[str]


def build_server() -> MCPServer:
    server = MCPServer("results", log_level="WARNING")

    @server.tool()
    def report(rows: int) -> Report:
        """A report of `rows` rows, as structured output."""
        return Report(title="inventory", rows=[f"row {i:04d} " + "x" * (ROW_CHARS - 9) for i in range(rows)])

    @server.tool()
    def lookup(key: str) -> CallToolResult:
        """Look a record up; every key is missing, and the error says so in every kind of content block."""
        return CallToolResult(is_error=True, content=[
            TextContent(text=f"no record {key!r}",
                        annotations=Annotations(audience=["assistant"], priority=0.9, last_modified="2025-01-02")),
            ResourceLink(name=f"{key}.json", uri=MISSING_URI.format(key=key), mime_type="application/json"),
            EmbeddedResource(resource=TextResourceContents(uri=LOG_URI, mime_type="text/plain",
                                                           text=f"lookup {key}: not found")),
            ImageContent(data=RED_PIXEL_PNG, mime_type="image/png"),
        ])

    @server.tool()
    def read_log() -> CallToolResult:
        """The last line of the system log."""
        return CallToolResult(content=[TextContent(text=LOG_LINE)])

    @server.tool()
    def fail(reason: str) -> str:
        """Always fails."""
        raise ToolError(f"cannot do it: {reason}")

    @server.tool()
    def echo(text: str) -> str:
        """The text back."""
        return text

    return server


if __name__ == "__main__":
    build_server().run()
