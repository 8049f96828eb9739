"""A server process a test starts, until it accepts connections on 127.0.0.1 (or is seen to die), then stopped."""

from __future__ import annotations

import socket
import subprocess
import time
from contextlib import contextmanager

START_TIMEOUT_S = 20


@contextmanager
def listening(command: list[str], port: int, what: str, **popen):
    """Run `command` until the block ends, once it listens on 127.0.0.1:`port`. Waiting on the process between
    connection attempts ends the wait at once if it dies."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                try:
                    process.wait(timeout=0.05)
                    raise AssertionError(f"{what} exited before it listened")
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{what} did not start") from None
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)
