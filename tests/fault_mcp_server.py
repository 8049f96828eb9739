"""An MCP server over stdio, written by hand (newline-delimited JSON-RPC, no SDK), so that it can misbehave in the
ways the official SDK's own servers never would. The fault tests run it as a real subprocess behind the real client.

Usage: python fault_mcp_server.py INSTANCE [--calls-log FILE]

INSTANCE tags every answer, so a test can tell a restarted server from the first one. --calls-log appends the name
of every tool call to FILE as it starts (to prove a call was not sent twice).

Tools:
- `echo(text)`: "INSTANCE: text".
- `garble(text)`: writes a line of bytes that are not UTF-8 to stdout, then answers like echo.
- `hologram()`: a result with a valid text block, a block of a content type no MCP version has, and a valid image.
- `slow(steps, pause)`: a progress notification every `pause` seconds, `steps` times, then an answer naming the
  progress token it was given.
- `stall()`: one progress notification, then no answer ever (the server keeps serving other requests).
- `unlock()`: adds the tool `secret_door` and says so with notifications/tools/list_changed before it answers.
- `leak()`: echoes the secret in its environment variable FAULT_TOKEN everywhere it can: in its text, its
  structured content, a text file (a base64 blob resource), and on stderr.
- `crash()`: exits in the middle of the call, never answering it.
"""

import base64
import json
import os
import sys
import time

PROTOCOL_FALLBACK = "2025-11-25"
RED_PIXEL_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"  # base64
NOT_UTF8 = b"\xff\xfe\xfa garbage \x80\x81\n"

TOOLS = {
    "echo": {"text": {"type": "string"}},
    "garble": {"text": {"type": "string"}},
    "hologram": {},
    "slow": {"steps": {"type": "integer"}, "pause": {"type": "number"}},
    "stall": {},
    "unlock": {},
    "leak": {},
    "crash": {},
}
HIDDEN_TOOLS = {"secret_door": {}}


class FaultServer:
    def __init__(self, instance: str, calls_log: str | None):
        self.instance = instance
        self.calls_log = calls_log
        self.tools = dict(TOOLS)
        self.out = sys.stdout.buffer

    def send(self, message: dict) -> None:
        self.out.write(json.dumps(message).encode() + b"\n")
        self.out.flush()

    def answer(self, request_id, result: dict) -> None:
        self.send({"jsonrpc": "2.0", "id": request_id, "result": result})

    def notify(self, method: str, params: dict | None = None) -> None:
        self.send({"jsonrpc": "2.0", "method": method, **({"params": params} if params is not None else {})})

    def serve(self) -> None:
        for line in sys.stdin.buffer:
            message = json.loads(line)
            if "id" in message and "method" in message:  # notifications and responses need no answer
                self.request(message["id"], message["method"], message.get("params") or {})

    def request(self, request_id, method: str, params: dict) -> None:
        if method == "initialize":
            self.answer(request_id, {"protocolVersion": params.get("protocolVersion", PROTOCOL_FALLBACK),
                                     "capabilities": {"tools": {"listChanged": True}},
                                     "serverInfo": {"name": f"fault-{self.instance}", "version": "1"}})
        elif method == "tools/list":
            self.answer(request_id, {"tools": [
                {"name": name, "description": f"the {name} fault",
                 "inputSchema": {"type": "object", "properties": properties}}
                for name, properties in self.tools.items()]})
        elif method == "tools/call":
            self.call(request_id, params["name"], params.get("arguments") or {},
                      (params.get("_meta") or {}).get("progressToken"))
        elif method == "ping":
            self.answer(request_id, {})
        else:
            self.send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": f"no {method}"}})

    def call(self, request_id, name: str, args: dict, progress_token) -> None:
        if self.calls_log:
            with open(self.calls_log, "a", encoding="utf-8") as log:
                log.write(name + "\n")
        text = lambda value: {"content": [{"type": "text", "text": value}]}  # noqa: E731
        if name == "echo":
            self.answer(request_id, text(f"{self.instance}: {args['text']}"))
        elif name == "garble":
            self.out.write(NOT_UTF8)
            self.out.flush()
            self.answer(request_id, text(f"{self.instance}: garbled {args['text']}"))
        elif name == "hologram":
            self.answer(request_id, {"content": [
                {"type": "text", "text": "a valid part"},
                {"type": "hologram", "data": "AAAA", "depth": 3},
                {"type": "image", "data": RED_PIXEL_PNG, "mimeType": "image/png"}]})
        elif name == "slow":
            for step in range(1, args["steps"] + 1):
                time.sleep(args["pause"])  # the work this tool simulates
                if progress_token is not None:
                    self.notify("notifications/progress", {"progressToken": progress_token, "progress": step,
                                                           "total": args["steps"], "message": f"step {step}"})
            self.answer(request_id, text(f"done after {args['steps']} steps (progress token {progress_token!r})"))
        elif name == "stall":
            if progress_token is not None:
                self.notify("notifications/progress", {"progressToken": progress_token, "progress": 0})
        elif name == "unlock":
            self.tools.update(HIDDEN_TOOLS)
            self.notify("notifications/tools/list_changed")
            self.answer(request_id, text("a door opened"))
        elif name == "secret_door":
            self.answer(request_id, text("you found it"))
        elif name == "leak":
            secret = os.environ["FAULT_TOKEN"]
            sys.stderr.write(f"starting with token {secret}\n")
            sys.stderr.flush()
            note = f"config: token={secret}\n".encode()
            self.answer(request_id, {
                "content": [{"type": "text", "text": f"my token is {secret}"},
                            {"type": "resource", "resource": {"uri": "file:///config.txt", "mimeType": "text/plain",
                                                              "blob": base64.b64encode(note).decode()}}],
                "structuredContent": {"token": secret, "note": "kept"}})
        elif name == "crash":
            os._exit(3)
        else:
            self.send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32602, "message": f"no tool {name}"}})


def main() -> None:
    args = sys.argv[1:]
    calls_log = None
    if "--calls-log" in args:
        at = args.index("--calls-log")
        calls_log = args[at + 1]
        del args[at:at + 2]
    FaultServer(args[0] if args else "fault", calls_log).serve()


if __name__ == "__main__":
    main()
