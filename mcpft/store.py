"""The durable log: one SQLite file (WAL) holding traces, their messages one row each, originals and edit history.

Every write is its own committed transaction: the agent appends a message the moment it exists, so a kill -9 loses no
completed step, and an imported trace lands whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import orjson

from mcpft.trace import Trace, TraceError, normalize_message, now_iso, validate

# Each entry migrates the schema from version i to i + 1; the file's `PRAGMA user_version` says where it stands.
MIGRATIONS = [
    """
    CREATE TABLE traces (
        id TEXT PRIMARY KEY,
        created TEXT NOT NULL,
        updated TEXT NOT NULL,
        model TEXT NOT NULL DEFAULT '',
        base_url TEXT NOT NULL DEFAULT '',
        settings TEXT NOT NULL DEFAULT '{}',
        tools TEXT NOT NULL DEFAULT '[]',
        tags TEXT NOT NULL DEFAULT '[]',
        rating INTEGER,
        notes TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL DEFAULT '',
        owner TEXT NOT NULL DEFAULT '',
        included INTEGER NOT NULL DEFAULT 1,
        train_system INTEGER NOT NULL DEFAULT 1,
        flags TEXT NOT NULL DEFAULT '[]',
        content_hash TEXT NOT NULL DEFAULT '',
        original TEXT
    );
    CREATE INDEX traces_owner_hash ON traces(owner, content_hash);
    CREATE TABLE messages (
        trace_id TEXT NOT NULL REFERENCES traces(id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (trace_id, idx)
    ) WITHOUT ROWID;
    CREATE TABLE edits (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        trace_id TEXT NOT NULL REFERENCES traces(id) ON DELETE CASCADE,
        at TEXT NOT NULL,
        op TEXT NOT NULL,
        before TEXT NOT NULL,
        undone INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX edits_trace ON edits(trace_id, id);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
# Trace fields an edit may change besides the messages (snapshotted for undo).
META_FIELDS = ("tools", "tags", "rating", "notes", "included", "train_system", "model")
JSON_COLUMNS = ("settings", "tools", "tags", "flags")


class NotFound(KeyError):
    def __str__(self):
        return f"no trace {self.args[0]!r} in the store"


@dataclass
class TraceSummary:
    """One line of the trace list: what the Curate table and `mcpft traces list` show."""

    id: str
    created: str
    model: str
    first_user: str
    turns: int
    tool_calls: int
    flags: list[dict]
    included: bool
    rating: int | None
    tags: list[str]
    source: str


class Added(NamedTuple):
    id: str
    added: bool  # False: the owner already had this content; `id` is that trace
    flags: list[dict]


def message_bodies(messages: list[dict]) -> list[str]:
    """Each message's stored JSON. Normalised messages have a fixed key order, so equal content gives equal text."""
    return [_json_text(m) for m in messages]


def _json_text(value) -> str:
    """`json.dumps(value, ensure_ascii=False)`, the same text, about 3x faster on messages: orjson escapes the
    strings (identically: ensure_ascii=False escapes only quotes, backslashes and control characters)."""
    if isinstance(value, str):
        try:
            return orjson.dumps(value).decode()
        except TypeError:  # a lone surrogate, which orjson refuses and json writes as it is
            return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return "{" + ", ".join(f"{_json_text(key)}: {_json_text(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_json_text, value)) + "]"
    return json.dumps(value, ensure_ascii=False)  # numbers, booleans, null: json's own spelling


def content_hash(bodies: list[str], tools_json: str) -> str:
    """Identity of a conversation's content (messages and tools), for skipping duplicates on import."""
    digest = hashlib.sha256(tools_json.encode())
    for body in bodies:
        digest.update(b"\x00" + body.encode())
    return digest.hexdigest()


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the app's worker threads, serialised by a lock.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable against process kills in WAL mode
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def close(self):
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def _transaction(self):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _migrate(self):
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: schema version {version} is newer than this mcpft ({SCHEMA_VERSION})")
        for target in range(version, SCHEMA_VERSION):
            with self._transaction() as db:
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={target + 1}")

    # -- writing ---------------------------------------------------------------------------------------------------

    def add_trace(self, trace: Trace, original: str | None = None) -> Added:
        """Store a whole trace in one transaction; a duplicate of one the owner has is not added again."""
        bodies = message_bodies(trace.messages)
        tools_json = json.dumps(trace.tools, ensure_ascii=False)
        digest = content_hash(bodies, tools_json)
        flags = validate(trace.messages, trace.tools)
        with self._transaction() as db:
            row = db.execute("SELECT id FROM traces WHERE owner=? AND content_hash=?", (trace.owner, digest)).fetchone()
            if row:
                return Added(row[0], False, [])
            trace_id = trace.id or new_id()
            db.execute(*_insert_trace_sql(trace, trace_id, flags, digest, original, tools_json))
            db.executemany("INSERT INTO messages(trace_id, idx, body) VALUES (?,?,?)",
                           [(trace_id, i, body) for i, body in enumerate(bodies)])
        return Added(trace_id, True, flags)

    def start_trace(self, trace: Trace) -> str:
        """Open a trace to be appended to message by message (the agent's way); `trace.messages` may be empty."""
        trace_id = trace.id or new_id()
        with self._transaction() as db:
            db.execute(*_insert_trace_sql(trace, trace_id, [], "", None))
            db.executemany("INSERT INTO messages(trace_id, idx, body) VALUES (?,?,?)",
                           [(trace_id, i, body) for i, body in enumerate(message_bodies(trace.messages))])
            self._refresh(db, trace_id)
        return trace_id

    def append_message(self, trace_id: str, message: dict) -> int:
        """Append one message, committed at once. Returns its index."""
        message = normalize_message(message, "message")
        with self._transaction() as db:
            self._require(db, trace_id)
            idx = db.execute("SELECT COALESCE(MAX(idx) + 1, 0) FROM messages WHERE trace_id=?", (trace_id,)).fetchone()[0]
            db.execute("INSERT INTO messages(trace_id, idx, body) VALUES (?,?,?)",
                       (trace_id, idx, message_bodies([message])[0]))
            self._refresh(db, trace_id)
        return idx

    def update(self, trace_id: str, op: str, messages: list[dict] | None = None, **fields) -> Trace:
        """An edit: new messages and/or meta fields, with the state before it kept for undo."""
        unknown = set(fields) - set(META_FIELDS)
        if unknown:
            raise ValueError(f"cannot edit field(s) {sorted(unknown)}; editable: {', '.join(META_FIELDS)}")
        if messages is not None:
            messages = [normalize_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
        with self._transaction() as db:
            before = self._read(db, trace_id)
            snapshot = {"messages": before.messages, **{k: getattr(before, k) for k in META_FIELDS}}
            db.execute("INSERT INTO edits(trace_id, at, op, before) VALUES (?,?,?,?)",
                       (trace_id, now_iso(), op, json.dumps(snapshot, ensure_ascii=False)))
            self._write(db, trace_id, messages, fields)
        return self.get(trace_id)

    def undo(self, trace_id: str) -> str | None:
        """Restore the state before the latest edit not yet undone. Returns that edit's op, or None if none is left."""
        with self._transaction() as db:
            self._require(db, trace_id)
            row = db.execute("SELECT id, op, before FROM edits WHERE trace_id=? AND undone=0 ORDER BY id DESC LIMIT 1",
                             (trace_id,)).fetchone()
            if row is None:
                return None
            edit_id, op, before = row
            snapshot = json.loads(before)
            self._write(db, trace_id, snapshot.pop("messages"), snapshot)
            db.execute("UPDATE edits SET undone=1 WHERE id=?", (edit_id,))
        return op

    def delete_trace(self, trace_id: str):
        with self._transaction() as db:
            self._require(db, trace_id)
            db.execute("DELETE FROM traces WHERE id=?", (trace_id,))

    def revalidate(self, trace_ids: list[str] | None = None) -> int:
        """Re-run validation on the given traces (all by default). Returns how many are flagged."""
        ids = trace_ids if trace_ids is not None else self.ids()
        for trace_id in ids:
            with self._transaction() as db:
                self._refresh(db, trace_id)
        return sum(1 for t in ids if self.get(t).flags)

    def _write(self, db, trace_id: str, messages: list[dict] | None, fields: dict):
        if messages is not None:
            db.execute("DELETE FROM messages WHERE trace_id=?", (trace_id,))
            db.executemany("INSERT INTO messages(trace_id, idx, body) VALUES (?,?,?)",
                           [(trace_id, i, body) for i, body in enumerate(message_bodies(messages))])
        for key, value in fields.items():
            value = json.dumps(value, ensure_ascii=False) if key in JSON_COLUMNS else value
            db.execute(f"UPDATE traces SET {key}=? WHERE id=?", (value, trace_id))  # key checked against META_FIELDS
        self._refresh(db, trace_id)

    def _refresh(self, db, trace_id: str):
        """Recompute what derives from the content: flags and the content hash."""
        tools_json = db.execute("SELECT tools FROM traces WHERE id=?", (trace_id,)).fetchone()[0]
        bodies = [b for (b,) in db.execute("SELECT body FROM messages WHERE trace_id=? ORDER BY idx", (trace_id,))]
        flags = validate([json.loads(b) for b in bodies], json.loads(tools_json))
        db.execute("UPDATE traces SET flags=?, content_hash=?, updated=? WHERE id=?",
                   (json.dumps(flags), content_hash(bodies, tools_json), now_iso(), trace_id))

    # -- reading ---------------------------------------------------------------------------------------------------

    def _require(self, db, trace_id: str):
        if db.execute("SELECT 1 FROM traces WHERE id=?", (trace_id,)).fetchone() is None:
            raise NotFound(trace_id)

    def _read(self, db, trace_id: str) -> Trace:
        cur = db.execute(f"SELECT {', '.join(TRACE_COLUMNS)} FROM traces WHERE id=?", (trace_id,))
        row = cur.fetchone()
        if row is None:
            raise NotFound(trace_id)
        bodies = db.execute("SELECT body FROM messages WHERE trace_id=? ORDER BY idx", (trace_id,)).fetchall()
        return _trace_from_row(row, [json.loads(b) for (b,) in bodies])

    def get(self, trace_id: str) -> Trace:
        with self._lock:
            return self._read(self._db, self.resolve_id(trace_id))

    def resolve_id(self, id_or_prefix: str) -> str:
        """A full id from a unique prefix (the CLI prints short ids)."""
        if not id_or_prefix:
            raise NotFound(id_or_prefix)
        with self._lock:
            # substr, not LIKE: '%' or '_' in what the user typed must not act as wildcards
            rows = self._db.execute("SELECT id FROM traces WHERE substr(id, 1, ?) = ? LIMIT 2",
                                    (len(id_or_prefix), id_or_prefix)).fetchall()
        if len(rows) != 1:
            raise NotFound(id_or_prefix) if not rows else ValueError(f"trace id prefix {id_or_prefix!r} is ambiguous")
        return rows[0][0]

    def original(self, trace_id: str) -> dict | None:
        """The JSON as it was imported, before normalisation (None for traces the agent wrote)."""
        with self._lock:
            row = self._db.execute("SELECT original FROM traces WHERE id=?", (self.resolve_id(trace_id),)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def history(self, trace_id: str) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT id, at, op, undone FROM edits WHERE trace_id=? ORDER BY id",
                                    (self.resolve_id(trace_id),)).fetchall()
        return [{"id": i, "at": at, "op": op, "undone": bool(u)} for i, at, op, u in rows]

    def ids(self, owner: str | None = None) -> list[str]:
        query, args = "SELECT id FROM traces", ()
        if owner is not None:
            query, args = query + " WHERE owner=?", (owner,)
        with self._lock:
            return [r[0] for r in self._db.execute(query + " ORDER BY created, id", args)]

    def traces(self, owner: str | None = None, tags: list[str] | None = None, included_only: bool = False,
               include_flagged: bool = True) -> list[Trace]:
        """Whole traces, oldest first, selected by owner, tags (all must be present), inclusion and flags."""
        selected = []
        for trace_id in self.ids(owner):
            with self._lock:
                trace = self._read(self._db, trace_id)
            if tags and not set(tags) <= set(trace.tags):
                continue
            if (included_only and not trace.included) or (not include_flagged and trace.flags):
                continue
            selected.append(trace)
        return selected

    def summaries(self, owner: str | None = None) -> list[TraceSummary]:
        return [summarize(t) for t in self.traces(owner)]


TRACE_COLUMNS = ("id", "created", "model", "base_url", "settings", "tools", "tags", "rating", "notes", "source",
                 "owner", "included", "train_system", "flags")


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def _insert_trace_sql(trace: Trace, trace_id: str, flags: list[dict], digest: str, original: str | None,
                      tools_json: str | None = None):
    values = {
        "id": trace_id, "created": trace.created or now_iso(), "updated": now_iso(), "model": trace.model,
        "base_url": trace.base_url, "settings": json.dumps(trace.settings),
        "tools": tools_json if tools_json is not None else json.dumps(trace.tools, ensure_ascii=False),
        "tags": json.dumps(trace.tags), "rating": trace.rating, "notes": trace.notes, "source": trace.source,
        "owner": trace.owner, "included": int(trace.included), "train_system": int(trace.train_system),
        "flags": json.dumps(flags), "content_hash": digest, "original": original,
    }
    columns = ", ".join(values)
    return f"INSERT INTO traces({columns}) VALUES ({', '.join('?' * len(values))})", tuple(values.values())


def _trace_from_row(row, messages: list[dict]) -> Trace:
    fields = dict(zip(TRACE_COLUMNS, row))
    for key in JSON_COLUMNS:
        fields[key] = json.loads(fields[key])
    fields["included"], fields["train_system"] = bool(fields["included"]), bool(fields["train_system"])
    return Trace(messages=messages, **fields)


def summarize(trace: Trace) -> TraceSummary:
    users = [m["content"] for m in trace.messages if m["role"] == "user"]
    return TraceSummary(
        id=trace.id, created=trace.created, model=trace.model, first_user=users[0] if users else "",
        turns=len(users), tool_calls=sum(len(m.get("tool_calls", [])) for m in trace.messages),
        flags=trace.flags, included=trace.included, rating=trace.rating, tags=trace.tags, source=trace.source,
    )


__all__ = ["Store", "Added", "NotFound", "TraceSummary", "TraceError", "summarize", "SCHEMA_VERSION"]
