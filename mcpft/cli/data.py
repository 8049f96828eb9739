"""Data verbs: import, traces (list / show / validate / curate), export, push."""

from __future__ import annotations

import argparse
import json

from mcpft import curate
from mcpft.cli.common import CliError, emit, open_store, progress
from mcpft.dataset import EXPORT_FORMATS, ExportError, export_rows, push_rows, rows_from_traces
from mcpft.hub import hub_failure
from mcpft.ingest import ImportReport, collect_files, import_file
from mcpft.store import NotFound


def register(verbs, parent):
    p = verbs.add_parser("import", parents=[parent], help="import trace files or folders (JSON, JSONL, our exports)")
    p.add_argument("paths", nargs="+")
    p.add_argument("--tag", action="append", default=[], help="tag every imported trace (repeatable)")
    p.set_defaults(handler=cmd_import)

    traces = verbs.add_parser("traces", help="list, show, validate and curate stored traces")
    sub = traces.add_subparsers(dest="action", required=True, metavar="ACTION")
    _traces_actions(sub, parent)

    for verb, helptext, handler in (("export", "write training rows to a file or folder", cmd_export),
                                    ("push", "upload training rows to the Hugging Face Hub", cmd_push)):
        p = verbs.add_parser(verb, parents=[parent], help=helptext)
        if verb == "export":
            p.add_argument("--out", required=True)
            p.add_argument("--format", choices=EXPORT_FORMATS, default="jsonl")
        else:
            p.add_argument("--repo-id", required=True, help="OWNER/NAME")
            p.add_argument("--private", action="store_true")
        _selection_options(p)
        p.set_defaults(handler=handler)


def _selection_options(p):
    p.add_argument("--unroll", action=argparse.BooleanOptionalAction, default=True,
                   help="one row per user turn (default) or one row per trace")
    p.add_argument("--include-flagged", action="store_true", help="keep traces the validator flagged")
    p.add_argument("--tag", action="append", default=[], help="only traces with this tag (repeatable)")


def _traces_actions(sub, parent):
    def action(name, handler, helptext, *arguments):
        p = sub.add_parser(name, parents=[parent], help=helptext)
        for flags, kwargs in arguments:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(handler=handler)

    trace_id = (["id"], {"help": "trace id (a unique prefix will do)"})
    action("list", cmd_list, "one line per trace", (["--tag"], {"action": "append", "default": []}))
    action("show", cmd_show, "print a trace", trace_id,
           (["--original"], {"action": "store_true", "help": "the JSON as imported"}))
    action("validate", cmd_validate, "re-run validation", (["ids"], {"nargs": "*"}))
    action("include", cmd_edit, "use the trace for training", trace_id)
    action("exclude", cmd_edit, "leave the trace out of training", trace_id)
    action("rate", cmd_edit, "rate 1-5 (0 clears)", trace_id, (["rating"], {"type": int}))
    action("tag", cmd_edit, "set the trace's tags", trace_id, (["tags"], {"nargs": "*"}))
    action("drop-system", cmd_edit, "keep the system prompt out of training (it stays in the record)", trace_id)
    action("keep-system", cmd_edit, "train on the system prompt again", trace_id)
    action("delete-messages", cmd_edit, "delete messages by index", trace_id, (["indices"], {"type": int, "nargs": "+"}))
    action("edit", cmd_edit, "set one field of one message", trace_id, (["index"], {"type": int}),
           (["field"], {"choices": curate.EDITABLE_MESSAGE_FIELDS}),
           (["value"], {"help": "the new value (JSON for tool_calls)"}))
    action("merge-users", cmd_edit, "merge consecutive user turns starting at INDEX", trace_id,
           (["index"], {"type": int}))
    action("undo", cmd_edit, "undo the latest edit", trace_id)
    action("delete", cmd_delete, "delete a trace", trace_id)


def cmd_import(args):
    store = open_store(args)
    report = ImportReport()
    for path in progress(collect_files(args.paths), desc="import", unit="file"):
        report.merge(import_file(store, path, tags=tuple(args.tag)))
    lines = [f"imported {len(report.imported)}, duplicates {report.duplicates}, flagged {len(report.flagged)}, "
             f"rejected {len(report.rejected)}"]
    lines += [f"  flagged {f['file']} ({f['id']}): {'; '.join(f['reasons'])}" for f in report.flagged]
    lines += [f"  rejected {r['file']}: {r['error']}" for r in report.rejected]
    emit(args, report.to_dict(), "\n".join(lines))
    return 1 if report.rejected and not report.imported and not report.duplicates else 0


def cmd_list(args):
    store = open_store(args)
    rows = [s for s in store.summaries() if set(args.tag) <= set(s.tags)]
    text = "\n".join(
        f"{s.id[:8]}  {s.created[:16]}  {s.model[:24]:24}  turns={s.turns} calls={s.tool_calls:<3} "
        f"{'flagged ' if s.flags else ''}{'' if s.included else 'excluded '}{s.first_user[:60]!r}"
        for s in rows) or "no traces"
    emit(args, {"traces": [vars(s) for s in rows]}, text)


def _trace_id(store, given: str) -> str:
    """The full id of the trace `given` names (a unique prefix will do), or a CliError saying why there is none."""
    if not given.strip():
        raise CliError("empty trace id (see `mcpft traces list` for the ids)")
    try:
        return store.resolve_id(given)
    except (NotFound, ValueError) as e:  # no such trace, or an ambiguous prefix
        raise CliError(str(e)) from None


def cmd_show(args):
    store = open_store(args)
    trace_id = _trace_id(store, args.id)
    summary = store.original(trace_id) if args.original else store.get(trace_id).to_dict()
    if summary is None:
        raise CliError(f"trace {trace_id} was written by the agent, not imported: it has no original file")
    emit(args, summary, json.dumps(summary, indent=2, ensure_ascii=False))


def cmd_validate(args):
    store = open_store(args)
    ids = [_trace_id(store, i) for i in args.ids] or store.ids()
    store.revalidate(ids)
    flagged = {t: store.get(t).flags for t in ids}
    flagged = {t: f for t, f in flagged.items() if f}
    text = "\n".join(f"{t[:8]}: {f['code']} at message {f['index']}: {f['message']}"
                     for t, flags in flagged.items() for f in flags)
    emit(args, {"checked": len(ids), "flagged": flagged},
         f"checked {len(ids)}, flagged {len(flagged)}" + (f"\n{text}" if text else ""))


def _curate_call(args, trace_id):
    """The curate operation a `traces ACTION` stands for."""
    value = args.__dict__.get("value")
    if args.action == "edit" and args.field == "tool_calls":
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise CliError(f"the new messages[{args.index}].tool_calls is not valid JSON: {e.msg} at line {e.lineno} "
                           f"column {e.colno} (character {e.pos})") from None
    return {
        "include": lambda store: curate.set_included(store, trace_id, True),
        "exclude": lambda store: curate.set_included(store, trace_id, False),
        "rate": lambda store: curate.rate(store, trace_id, args.rating or None),
        "tag": lambda store: curate.set_tags(store, trace_id, args.tags),
        "drop-system": lambda store: curate.set_system_in_training(store, trace_id, False),
        "keep-system": lambda store: curate.set_system_in_training(store, trace_id, True),
        "delete-messages": lambda store: curate.delete_messages(store, trace_id, args.indices),
        "edit": lambda store: curate.edit_message(store, trace_id, args.index, args.field, value),
        "merge-users": lambda store: curate.merge_user_turns(store, trace_id, args.index),
        "undo": lambda store: curate.undo(store, trace_id),
    }[args.action]


def cmd_edit(args):
    store = open_store(args)
    trace_id = _trace_id(store, args.id)
    try:
        result = _curate_call(args, trace_id)(store)
    except (ValueError, IndexError) as e:  # a refused edit (TraceError is a ValueError): say which and why
        raise CliError(str(e)) from None
    if args.action == "undo":
        emit(args, {"id": trace_id, "undone": result}, f"undid: {result}" if result else "nothing to undo")
        return
    emit(args, {"id": trace_id, "action": args.action, "flags": result.flags},
         f"{trace_id[:8]}: {args.action} done" + (f" ({len(result.flags)} flags)" if result.flags else ""))


def cmd_delete(args):
    store = open_store(args)
    trace_id = _trace_id(store, args.id)
    store.delete_trace(trace_id)
    emit(args, {"deleted": trace_id}, f"deleted {trace_id}")


def selected_rows(args) -> list[dict]:
    store = open_store(args)
    traces = store.traces(tags=args.tag or None)
    rows = rows_from_traces(traces, by_turn=args.unroll, include_flagged=args.include_flagged)
    if not rows:
        raise CliError(f"no rows: {len(traces)} trace(s) selected, none included and unflagged "
                       "(see `mcpft traces list`; --include-flagged keeps flagged ones)")
    return rows


def cmd_export(args):
    rows = selected_rows(args)
    try:
        out = export_rows(rows, args.out, args.format)
    except (ExportError, OSError) as e:  # a target that is other data, a parent that is a file, no permission
        raise CliError(str(e)) from None
    emit(args, {"out": str(out), "rows": len(rows), "traces": len({r["trace_id"] for r in rows}),
                "format": args.format}, f"wrote {len(rows)} rows to {out}")


def cmd_push(args):
    rows = selected_rows(args)
    try:
        url = push_rows(rows, args.repo_id, private=args.private)
    except Exception as e:
        reason = hub_failure(e, args.repo_id)
        if reason is None:
            raise
        raise CliError(reason) from None
    emit(args, {"url": url, "rows": len(rows)}, f"pushed {len(rows)} rows to {url}")
