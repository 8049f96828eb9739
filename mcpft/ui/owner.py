"""Who a visitor is, so that nobody sees another's traces: the Hugging Face user signed in through OAuth on a Space,
else a random id kept in the browser (encrypted local storage), so it survives reloads."""

from __future__ import annotations

import hashlib
import uuid

import gradio as gr

from mcpft.store import NotFound, Store
from mcpft.trace import Trace


def resolve_owner(browser_id: str | None, profile: gr.OAuthProfile | None) -> tuple[str, str]:
    """(the browser id to keep, the owner): `hf:USERNAME` when signed in, else `browser:ID`."""
    browser_id = browser_id or uuid.uuid4().hex
    owner = f"hf:{profile.username}" if profile is not None else f"browser:{browser_id}"
    return browser_id, owner


def require_owner(owner: str | None) -> str:
    if not owner:
        raise gr.Error("The page has not finished loading (no visitor id yet): wait a moment and try again.")
    return owner


def owned_trace(store: Store, trace_id: str, owner: str) -> Trace:
    """The trace if `owner` owns it; another visitor's trace reads exactly like a missing one."""
    require_owner(owner)
    if not trace_id:
        raise gr.Error("No trace is selected: pick one in the table first.")
    try:
        trace = store.get(trace_id)
    except (NotFound, ValueError):
        raise gr.Error(f"No trace {trace_id!r}.") from None
    if trace.owner != owner:
        raise gr.Error(f"No trace {trace_id!r}.")
    return trace


def owner_slug(owner: str) -> str:
    """A folder name for the owner's files (runs, exports) that reveals nothing about them."""
    return hashlib.sha256(owner.encode()).hexdigest()[:16]
