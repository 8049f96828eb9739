"""Import traces from files: the Trelis recorder's JSON (one conversation per file), JSONL of such objects, and our
own exports. One bad file (or line) never stops the others, and nothing of it is stored."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from mcpft.store import Store
from mcpft.trace import TraceError, is_secret_key, normalize_trace, scrub_secrets

# One conversation larger than this is not a trace but a mistake (a log, a dump): refuse it before parsing.
MAX_TRACE_BYTES = 32 * 1024 * 1024
TRACE_SUFFIXES = (".json", ".jsonl")
# The fields of an imported document kept exactly as given in the stored original: the conversation itself.
VERBATIM_FIELDS = ("messages", "tools")


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)
    duplicates: int = 0
    flagged: list[dict] = field(default_factory=list)  # {"file", "id", "reasons"}
    rejected: list[dict] = field(default_factory=list)  # {"file", "error"}

    def to_dict(self) -> dict:
        return {"imported": len(self.imported), "duplicates": self.duplicates, "flagged": self.flagged,
                "rejected": self.rejected, "ids": self.imported}

    def merge(self, other: "ImportReport"):
        self.imported += other.imported
        self.duplicates += other.duplicates
        self.flagged += other.flagged
        self.rejected += other.rejected


def collect_files(paths: list[str | Path]) -> list[Path]:
    """The files to import: given files as they are, folders searched recursively for .json / .jsonl."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in TRACE_SUFFIXES and p.is_file())
        else:
            files.append(path)
    return files


def import_file(store: Store, path: Path, owner: str = "", tags: tuple[str, ...] = ()) -> ImportReport:
    """Import one file; whatever is wrong with it (or with one of its lines) is a rejection with the reason, never a
    crash, and nothing of a rejected conversation is stored."""
    report = ImportReport()
    try:
        documents = list(_read_documents(path))
    except Exception as e:  # last resort too: an error nobody foresaw is still this file's rejection
        report.rejected.append({"file": str(path), "error": _problem(e, str(path))})
        return report
    for where, document in documents:
        try:
            _import_document(store, where, document, owner, tags, report)
        except sqlite3.Error:
            raise  # the store failing is no fault of this file: stop rather than reject every file after it
        except Exception as e:
            report.rejected.append({"file": where, "error": _problem(e, where)})
    return report


def import_paths(store: Store, paths: list[str | Path], owner: str = "", tags: tuple[str, ...] = ()) -> ImportReport:
    report = ImportReport()
    for path in collect_files(paths):
        report.merge(import_file(store, path, owner, tags))
    return report


def _import_document(store: Store, where: str, document, owner: str, tags: tuple[str, ...], report: ImportReport):
    """Store one conversation, or raise what is wrong with it."""
    if isinstance(document, TraceError):
        raise document
    text, raw = document
    trace = normalize_trace(raw, source=where)
    trace.owner = owner or trace.owner
    trace.tags = list(dict.fromkeys([*trace.tags, *tags]))
    result = store.add_trace(trace, original=_original_text(text, raw))
    if not result.added:
        report.duplicates += 1
        return
    report.imported.append(result.id)
    if result.flags:
        report.flagged.append({"file": where, "id": result.id, "reasons": [f["message"] for f in result.flags]})


def _original_text(text: str, raw: dict) -> str:
    """The imported JSON to keep beside the trace, minus credentials. Not verbatim: the original outlives the import
    (`traces show --original`, copies of the store), so a key or token in it would be kept for good. All but the
    conversation is scrubbed as the trace's settings are; the text is re-written only when that removed something."""
    kept = {key: value if key in VERBATIM_FIELDS else scrub_secrets(value) for key, value in raw.items()
            if key in VERBATIM_FIELDS or not is_secret_key(key)}
    return text if kept == raw else json.dumps(kept, ensure_ascii=False)


def _problem(error: Exception, where: str) -> str:
    """The error without the file name it may already start with (the report names the file beside it)."""
    if isinstance(error, TraceError):
        return error.problem if error.where == where else str(error)
    if isinstance(error, OSError):
        return str(error)
    return f"unexpected {type(error).__name__}: {error}"


def _read_documents(path: Path):
    """Yields (where, (text, parsed)) per conversation, or (where, TraceError) for one that cannot be read."""
    if not path.is_file():
        raise TraceError(str(path), "no such file")
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path)
        return
    size = path.stat().st_size
    if size > MAX_TRACE_BYTES:
        raise TraceError(str(path), f"file is {size / 2**20:.0f} MB, over the {MAX_TRACE_BYTES // 2**20} MB limit "
                                    "for one conversation (use JSONL for many)")
    text = _decode(path.read_bytes(), str(path))
    parsed = _parse_json(text, str(path))
    if isinstance(parsed, list):  # a JSON array of conversations
        for i, item in enumerate(parsed):
            yield f"{path}[{i}]", (json.dumps(item, ensure_ascii=False), item)
    else:
        yield str(path), (text, parsed)


def _read_jsonl(path: Path):
    with path.open("rb") as f:
        for line_no, line in enumerate(f, 1):
            where = f"{path}:{line_no}"
            if not line.strip():
                continue
            if len(line) > MAX_TRACE_BYTES:
                yield where, TraceError(where, f"line is {len(line) / 2**20:.0f} MB, over the "
                                               f"{MAX_TRACE_BYTES // 2**20} MB limit for one conversation")
                continue
            try:
                text = _decode(line, where)
                yield where, (text, _parse_json(text, where))
            except TraceError as e:
                yield where, e


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TraceError(where, f"not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TraceError(where, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise TraceError(where, "JSON nested too deeply to read (~1000 levels of arrays or objects)") from None
