"""Recording an agent run into the store: the trace is opened with the run's setup, then every message the agent
emits is appended (and committed) the moment it exists."""

from __future__ import annotations

from mcpft.store import Store
from mcpft.trace import Trace, now_iso, scrub_secrets, scrub_url


def open_trace(store: Store, *, model: str, base_url: str, tools: list[dict], settings: dict | None = None,
               train_system: bool = True, tags: list[str] | None = None, owner: str = "",
               source: str = "agent") -> str:
    """A new, empty trace for an agent run. The endpoint's key is never passed here; the URL (which may carry one
    as `user:key@` or `?api_key=`) and the settings are scrubbed anyway."""
    trace = Trace(messages=[], tools=tools, model=model, created=now_iso(), base_url=scrub_url(base_url),
                  settings=scrub_secrets(settings or {}), tags=list(tags or []), source=source, owner=owner,
                  train_system=train_system)
    return store.start_trace(trace)


def sink_for(store: Store, trace_id: str):
    """The agent's `sink`: appends each message to the trace, one committed transaction each."""
    return lambda message: store.append_message(trace_id, message)
