"""Import traces from files: the Trelis recorder's JSON (one conversation per file), JSONL of such objects, and our
own exports. One bad file (or line) never stops the others, and nothing of it is stored."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mcpft.store import Store
from mcpft.trace import TraceError, normalize_trace

# One conversation larger than this is not a trace but a mistake (a log, a dump): refuse it before parsing.
MAX_TRACE_BYTES = 32 * 1024 * 1024
TRACE_SUFFIXES = (".json", ".jsonl")


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
    report = ImportReport()
    try:
        documents = list(_read_documents(path))
    except (OSError, TraceError) as e:
        report.rejected.append({"file": str(path), "error": _problem(e, str(path))})
        return report
    for where, document in documents:
        _import_document(store, where, document, owner, tags, report)
    return report


def import_paths(store: Store, paths: list[str | Path], owner: str = "", tags: tuple[str, ...] = ()) -> ImportReport:
    report = ImportReport()
    for path in collect_files(paths):
        report.merge(import_file(store, path, owner, tags))
    return report


def _import_document(store: Store, where: str, document, owner: str, tags: tuple[str, ...], report: ImportReport):
    if isinstance(document, TraceError):
        report.rejected.append({"file": where, "error": _problem(document, where)})
        return
    text, raw = document
    try:
        trace = normalize_trace(raw, source=where)
    except TraceError as e:
        report.rejected.append({"file": where, "error": str(e)})
        return
    trace.owner = owner or trace.owner
    trace.tags = list(dict.fromkeys([*trace.tags, *tags]))
    result = store.add_trace(trace, original=text)
    if not result.added:
        report.duplicates += 1
        return
    report.imported.append(result.id)
    if result.flags:
        report.flagged.append({"file": where, "id": result.id, "reasons": [f["message"] for f in result.flags]})


def _problem(error: Exception, where: str) -> str:
    """The error without the file name it may already start with (the report names the file beside it)."""
    if isinstance(error, TraceError) and error.where == where:
        return error.problem
    return str(error)


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
