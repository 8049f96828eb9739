"""A tiny MCP server (official SDK, `MCPServer`) that the MCP tests run as a real subprocess.

Usage: python tiny_mcp_server.py INSTANCE [--page-size N] [--http PORT]

INSTANCE tags every answer, so a test can tell which of two same-named servers replied.
--page-size makes tools/list paginate (N tools a page); --http serves streamable HTTP on
127.0.0.1:PORT instead of stdio.
"""

import argparse
import struct
import zlib

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.types import Image
from pydantic import BaseModel

LONG_TOOL_NAME = "tiny." + "very_long_tool_name_" * 4 + "end"  # 89 chars, with a dot


class Measure(BaseModel):
    chars: int
    words: int


def tiny_png(width: int = 2, height: int = 2) -> bytes:
    """A valid red PNG built with the stdlib, so the image test needs no image library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def build_server(instance: str) -> MCPServer:
    server = MCPServer(f"tiny-{instance}", log_level="WARNING")

    @server.tool()
    def echo(text: str) -> str:
        """Echo the text back, tagged with this server's instance name."""
        return f"{instance}: {text}"

    @server.tool()
    async def hang() -> str:
        """Never answers (for timeout tests)."""
        await anyio.sleep_forever()
        return "unreachable"

    @server.tool()
    def big(n: int) -> str:
        """Return n characters."""
        return "x" * n

    @server.tool()
    def fail(message: str) -> str:
        """Always fails with the given message, coloured with ANSI codes."""
        raise ToolError(f"\x1b[31m{message}\x1b[0m")

    @server.tool()
    def picture() -> list:
        """A caption and a small PNG."""
        return ["a red square", Image(data=tiny_png(), format="png")]

    @server.tool()
    def measure(text: str) -> Measure:
        """Structured output: the text's length and word count."""
        return Measure(chars=len(text), words=len(text.split()))

    @server.tool()
    def header(name: str, ctx: Context) -> str:
        """The value of an HTTP request header (streamable HTTP only)."""
        return (ctx.headers or {}).get(name.lower(), "<absent>")

    server.add_tool(lambda: "ok", name=LONG_TOOL_NAME, description="A tool whose name needs sanitising")
    return server


def paginate_tools(page_size: int):
    """Middleware that serves tools/list in pages of page_size, cursor = the next offset."""

    async def middleware(ctx, call_next):
        if ctx.method != "tools/list":
            return await call_next(ctx)
        listing = await call_next(ctx)  # the serialized result: {"tools": [...]}
        tools = listing["tools"]
        start = int((ctx.params or {}).get("cursor") or 0)
        end = start + page_size
        page = {"tools": tools[start:end]}
        if end < len(tools):
            page["nextCursor"] = str(end)
        return page

    return middleware


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("instance")
    parser.add_argument("--page-size", type=int)
    parser.add_argument("--http", type=int, metavar="PORT")
    args = parser.parse_args()
    server = build_server(args.instance)
    if args.page_size:
        server.middleware.append(paginate_tools(args.page_size))
    if args.http:
        server.run("streamable-http", host="127.0.0.1", port=args.http)
    else:
        server.run()


if __name__ == "__main__":
    main()
