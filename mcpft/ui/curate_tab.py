"""Curate tab: the visitor's traces (include, rate, tag in the table), a message editor with undo, the unroll preview
through a model's chat template (trained spans highlighted, tokens against the max length), import, export, push."""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from pathlib import Path

import gradio as gr

from mcpft import curate
from mcpft.dataset import count_tokens, export_rows, push_rows, unroll
from mcpft.hub import hub_failure
from mcpft.ingest import import_paths
from mcpft.models import ModelError, load_tokenizer
from mcpft.render import RenderError, render, render_text
from mcpft.selection import HELDOUT_TAG, export_rows_of
from mcpft.store import summarize
from mcpft.trace import Trace, flag_words
from mcpft.train import CPU_MAX_LENGTH
from mcpft.ui.owner import owned_trace, owner_slug, require_owner
from mcpft.ui.state import AppContext, Shared

# The editable columns first, where they are seen without scrolling sideways; the id last (it is for reference).
TRACE_COLUMNS = ["included", "rating", "tags", "first user message", "flags", "model", "date", "turns", "tool calls",
                 "id"]
TRACE_TYPES = ["bool", "number", "str", "str", "str", "str", "str", "number", "number", "str"]
EDITABLE = ("included", "rating", "tags")
ID_COLUMN = TRACE_COLUMNS.index("id")
PURPOSE = ("**Curate** picks what the model learns from: tick *included* for the traces to train on, rate and tag "
           "them (tag `heldout` for the test set), fix messages, and see each training row.")
INCLUDE_FLAGGED = "Include flagged traces"  # the export checkbox, named in the messages that point to it
INCLUDE_HELDOUT = f"Include the held-out traces (tagged {HELDOUT_TAG})"
MESSAGE_COLUMNS = ["#", "role", "content", "reasoning", "tool calls"]
# Shares of the table's width, so long texts wrap in their column instead of pushing "tool calls" out of sight.
MESSAGE_WIDTHS = ["7%", "13%", "34%", "23%", "23%"]
FIELDS = ["content", "reasoning_content", "tool_calls"]
PREVIEW_CHARS = 400


def _short(text: str, limit: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def trace_rows(ctx: AppContext, owner: str, hide_flagged: bool = False) -> list[list]:
    """The table's rows (in TRACE_COLUMNS' order); flags in plain words; flagged traces left out if `hide_flagged`."""
    rows = []
    for s in ctx.store.summaries(owner):
        if hide_flagged and s.flags:
            continue
        flags = ", ".join(dict.fromkeys(flag_words(f["code"]) for f in s.flags))
        rows.append([s.included, s.rating, ", ".join(s.tags), _short(s.first_user, 90), flags, s.model,
                     s.created[:16].replace("T", " "), s.turns, s.tool_calls, s.id])
    return rows


def table_note(ctx: AppContext, owner: str, hide_flagged: bool) -> str:
    """What the table leaves out, so a hidden trace is never a mystery."""
    if not hide_flagged or not owner:
        return ""
    hidden = sum(1 for s in ctx.store.summaries(owner) if s.flags)
    return f"{hidden} flagged trace(s) hidden." if hidden else ""


def _cell_rating(value) -> int | None:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        rating = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"rating {value!r} is not a number: use 1-5 or leave it empty") from None
    if rating != int(rating):
        raise gr.Error(f"rating {value!r} must be a whole number from 1 to 5")
    return int(rating)


def _cell_tags(value) -> list[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return [tag.strip() for tag in str(value).split(",") if tag.strip()]


def _cell_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1", "yes")


def apply_table_edits(ctx: AppContext, owner: str, table) -> list[str]:
    """Persist what the visitor changed in the editable columns; returns one line per edit made."""
    done = []
    for record in table.to_dict("records"):
        trace_id = str(record.get("id") or "")
        if not trace_id:
            continue
        trace = owned_trace(ctx.store, trace_id, owner)
        summary = summarize(trace)
        included = _cell_bool(record["included"])
        if included != summary.included:
            curate.set_included(ctx.store, trace_id, included)
            done.append(f"{trace_id}: {'included' if included else 'excluded'}")
        rating = _cell_rating(record["rating"])
        if rating != summary.rating:
            try:
                curate.rate(ctx.store, trace_id, rating)
            except ValueError as error:
                raise gr.Error(f"trace {trace_id}: {error}") from None
            done.append(f"{trace_id}: rated {rating}")
        tags = _cell_tags(record["tags"])
        if tags != summary.tags:
            curate.set_tags(ctx.store, trace_id, tags)
            done.append(f"{trace_id}: tags {', '.join(tags) or '(none)'}")
    return done


# -- one trace ------------------------------------------------------------------------------------------------


def message_rows(trace: Trace) -> list[list]:
    rows = []
    for i, m in enumerate(trace.messages):
        if m["role"] == "tool":
            calls = f"↩ {m.get('name') or ''} ({m['tool_call_id']})"
        else:
            calls = "; ".join(f"{c['function']['name']}({_short(c['function']['arguments'], 120)})"
                              for c in m.get("tool_calls", []))
        rows.append([i, m["role"], _short(m["content"], PREVIEW_CHARS), _short(m.get("reasoning_content", ""), 200),
                     calls])
    return rows


def trace_header(ctx: AppContext, trace: Trace) -> str:
    lines = [f"**Trace `{trace.id}`** · {trace.model or 'unknown model'} · {trace.created} · source "
             f"`{trace.source or '-'}` · {'included' if trace.included else '**excluded**'}"]
    if trace.flags:
        lines.append(f"**Flags** (left out of training and exports unless you tick “{INCLUDE_FLAGGED}”):")
        lines += [f"- message {f['index']}: **{flag_words(f['code'])}** ({f['message']})" for f in trace.flags]
    history = ctx.store.history(trace.id)
    if history:
        lines.append("**Edits:** " + "; ".join(f"{h['op']}{' (undone)' if h['undone'] else ''}" for h in history))
    return "\n".join(lines)


def field_value(trace: Trace, index, field: str) -> str:
    if index is None or not 0 <= int(index) < len(trace.messages):
        return ""
    value = trace.messages[int(index)].get(field)
    if field == "tool_calls":
        return json.dumps(value, indent=2, ensure_ascii=False) if value else ""
    return value or ""


def parse_field(field: str, text: str):
    """The value to store for a field edited as text (None removes an optional field)."""
    if field == "tool_calls":
        if not text.strip():
            return None
        try:
            calls = json.loads(text)
        except json.JSONDecodeError as error:
            raise gr.Error(f"tool_calls is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})")
        if not isinstance(calls, list):
            raise gr.Error("tool_calls must be a JSON list of calls")
        return calls
    if field == "reasoning_content" and not text.strip():
        return None
    return text


# -- unroll preview -------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _tokenizer(spec: str, data_dir: str):
    return load_tokenizer(spec, Path(data_dir))


def tokenizer_for(ctx: AppContext, spec: str | None):
    try:
        return _tokenizer(spec or "smollm2", str(ctx.data_dir))
    except (ModelError, OSError, ValueError) as error:
        raise gr.Error(f"cannot load the tokenizer of {spec!r}: {error}") from None


def preview(ctx: AppContext, trace: Trace, spec: str, max_length, by_turn: bool, row_choice):
    """(row choices update, highlighted text, token summary) for one unrolled row of the trace."""
    rows = unroll(trace, by_turn=by_turn)
    if not rows:
        return gr.update(choices=[], value=None), None, "This trace has no assistant answer: it gives no training row."
    ids = [row["id"] for row in rows]
    chosen = row_choice if row_choice in ids else ids[0]
    row = rows[ids.index(chosen)]
    max_length = int(max_length or CPU_MAX_LENGTH)
    tokenizer = tokenizer_for(ctx, spec)
    try:
        text, spans = render_text(tokenizer, row, where=f"row {chosen}")
        rendered = render(tokenizer, row, max_length)
        lengths = count_tokens(tokenizer, [dict(r) for r in rows], max_length)
    except RenderError as error:
        raise gr.Error(str(error)) from None
    highlighted = {"text": text, "entities": [{"entity": "trained", "start": a, "end": b} for a, b in spans]}
    verdict = (f"**over the max length by {rendered.n_tokens - max_length} tokens: left out of training**"
               if rendered.over_length else "fits")
    summary = (f"Row `{chosen}`: **{rendered.n_tokens} tokens** of max {max_length} ({verdict}), "
               f"{sum(rendered.train_mask)} trained. This trace unrolls into {len(rows)} row(s); longest "
               f"{lengths.longest} tokens; {len(lengths.over)} over the max length."
               + (f" The trace is flagged, so training and exports leave it out unless “{INCLUDE_FLAGGED}” is ticked."
                  if trace.flags else ""))
    return gr.update(choices=ids, value=chosen), highlighted, summary


def nothing_to_export(traces: list[Trace], flagged: bool, heldout: bool) -> str:
    """Why an export has no rows, in the app's words: what was left out and which checkbox brings it back."""
    if not traces:
        return "Nothing to export: you have no traces yet. Collect some in the Agent tab, or import them."
    left = [f"{sum(not t.included for t in traces)} excluded (ticked off in the table's “included” column)"]
    if not heldout:
        left.append(f"{sum(HELDOUT_TAG in t.tags for t in traces)} held out (tick “{INCLUDE_HELDOUT}”)")
    if not flagged:
        left.append(f"{sum(bool(t.flags) and t.included for t in traces)} flagged (tick “{INCLUDE_FLAGGED}”)")
    return f"Nothing to export: of your {len(traces)} trace(s), " + ", ".join(left) + "."


# -- the tab --------------------------------------------------------------------------------------------------


def build(ctx: AppContext, shared: Shared) -> gr.Tab:
    with gr.Tab("Curate", id="curate") as tab:
        gr.Markdown(PURPOSE, elem_id="curate-purpose")
        gr.Markdown("Tick **included**, type a **rating** (1-5) or **tags** (comma-separated) in the table; click "
                    "any other cell of a row to open that trace below.")
        with gr.Row():
            refresh_button = gr.Button("Refresh", size="sm", scale=0)
            hide_flagged = gr.Checkbox(False, label="Hide flagged traces", scale=0, elem_id="hide-flagged")
            note = gr.Markdown(elem_id="curate-note")
        # Fixed rows and columns: the cell menu then offers no "Add row/column" or "Delete row" (a trace is
        # left out by unticking included, never deleted from here).
        table = gr.Dataframe(headers=TRACE_COLUMNS, datatype=TRACE_TYPES, value=[], interactive=True,
                             static_columns=list(range(len(EDITABLE), len(TRACE_COLUMNS))), wrap=True,
                             max_height=420, elem_id="traces-table", row_count=(0, "fixed"),
                             column_count=(len(TRACE_COLUMNS), "fixed"))
        selected = gr.State("")
        header = gr.Markdown(elem_id="trace-header")
        with gr.Row():
            with gr.Column(scale=3):
                messages = gr.Dataframe(headers=MESSAGE_COLUMNS, value=[], interactive=False, wrap=True,
                                        max_height=420, label="Messages (select one to edit it)",
                                        column_widths=MESSAGE_WIDTHS, elem_id="messages-table")
            with gr.Column(scale=2):
                with gr.Row():
                    index = gr.Number(None, label="Message #", precision=0, minimum=0, elem_id="message-index")
                    field = gr.Radio(FIELDS, value="content", label="Field")
                value = gr.Textbox(label="Value", lines=8, max_lines=20, elem_id="message-value")
                with gr.Row():
                    save_button = gr.Button("Save edit", variant="primary", size="sm", elem_id="save-edit")
                    delete_button = gr.Button("Delete message", variant="stop", size="sm")
                    merge_button = gr.Button("Merge with next user turn", size="sm")
                with gr.Row():
                    train_system = gr.Checkbox(True, label="Train on the system prompt", elem_id="train-system")
                    undo_button = gr.Button("Undo last edit", size="sm", elem_id="undo-edit")
        with gr.Accordion("Unroll preview: the training rows through a model's chat template", open=True):
            with gr.Row():
                preview_model = gr.Dropdown([ctx.default_model or "smollm2"], value=ctx.default_model or "smollm2",
                                            allow_custom_value=True, label="Tokenizer of (model folder or Hub id)")
                max_length = gr.Number(CPU_MAX_LENGTH, label="Max length (tokens)", precision=0, minimum=16)
                by_turn = gr.Checkbox(True, label="One row per user turn (unroll)")
                row_choice = gr.Dropdown([], label="Row", elem_id="row-choice")
            tokens = gr.Markdown(elem_id="token-summary")
            highlighted = gr.HighlightedText(label="Rendered row (trained spans highlighted)", combine_adjacent=False,
                                             show_legend=True, color_map={"trained": "#22c55e"},
                                             elem_id="unroll-preview")
        with gr.Accordion("Import, export, push", open=False):
            with gr.Row():
                with gr.Column():
                    uploads = gr.File(label="Import JSON / JSONL traces", file_count="multiple",
                                      file_types=[".json", ".jsonl"], type="filepath", elem_id="import-files")
                    import_tags = gr.Textbox(label="Tag the imported traces with (comma-separated)")
                    import_button = gr.Button("Import", elem_id="import-button")
                    import_report = gr.Markdown(elem_id="import-report")
                with gr.Column():
                    export_format = gr.Radio(["jsonl", "parquet"], value="jsonl", label="Format")
                    export_unroll = gr.Checkbox(True, label="Unroll (one row per user turn)")
                    export_flagged = gr.Checkbox(False, label=INCLUDE_FLAGGED, elem_id="export-flagged")
                    export_heldout = gr.Checkbox(False, label=INCLUDE_HELDOUT, elem_id="export-heldout",
                                                 info="left out by default: they are the Evaluate tab's test set, "
                                                      "and a model must not train on its test")
                    export_button = gr.Button("Export", elem_id="export-button")
                    export_file = gr.File(label="Download", interactive=False, elem_id="export-file")
                with gr.Column():
                    if ctx.on_space:
                        gr.LoginButton()
                    repo_id = gr.Textbox(label="Hub dataset repo (OWNER/NAME)")
                    private = gr.Checkbox(True, label="Private")
                    token = gr.Textbox(label="Hugging Face token (or sign in on a Space; HF_TOKEN otherwise)",
                                       type="password", visible=not ctx.on_space)
                    push_button = gr.Button("Push to the Hub")
                    push_report = gr.Markdown()

    trace_outputs = [header, messages, train_system, index, value]
    preview_outputs = [row_choice, highlighted, tokens]

    def refresh(owner, hide):
        if not owner:  # before the page has an owner, nothing is theirs
            return [], ""
        return trace_rows(ctx, owner, bool(hide)), table_note(ctx, owner, bool(hide))

    def redraw(owner, hide):
        return trace_rows(ctx, owner, bool(hide)) if owner else []

    def table_edited(owner, edited, hide, trace_id):
        """Save the edits; the open trace's header follows (it says included / excluded)."""
        done = apply_table_edits(ctx, require_owner(owner), edited)
        if not done:  # the table fires `input` more than once per edit: a no-op must not erase the last note
            return gr.update(), gr.update(), gr.update()
        header_now = trace_header(ctx, owned_trace(ctx.store, trace_id, owner)) if trace_id else gr.update()
        return trace_rows(ctx, owner, bool(hide)), "Saved: " + "; ".join(done), header_now

    def show_trace(owner, trace_id, field_name, message_index=None):
        """The trace's header, messages and system-prompt switch; the message editor on `message_index`."""
        trace = owned_trace(ctx.store, trace_id, owner)
        if message_index is not None and not 0 <= int(message_index) < len(trace.messages):
            message_index = None
        return (trace_header(ctx, trace), message_rows(trace), trace.train_system, message_index,
                field_value(trace, message_index, field_name))

    def select_trace(owner, field_name, evt: gr.SelectData):
        """Open the clicked row's trace, unless the click was on an editable cell: that click edits, nothing more."""
        if not evt.row_value or (evt.index and evt.index[1] < len(EDITABLE)):
            return (gr.update(),) * (1 + len(trace_outputs))
        trace_id = str(evt.row_value[ID_COLUMN])
        return (trace_id, *show_trace(owner, trace_id, field_name))

    def select_message(owner, trace_id, field_name, evt: gr.SelectData):
        trace = owned_trace(ctx.store, trace_id, owner)
        message_index = int(evt.row_value[0])
        return message_index, field_value(trace, message_index, field_name)

    def show_field(owner, trace_id, message_index, field_name):
        if not trace_id:
            return ""
        return field_value(owned_trace(ctx.store, trace_id, owner), message_index, field_name)

    def edited(owner, trace_id, field_name, action, message_index=None):
        """Run one curation edit (`action` returns the note to show) on the selected trace, then show it again.
        The table is refreshed by the event's `.then` (it knows whether flagged traces are hidden)."""
        owned_trace(ctx.store, trace_id, owner)
        try:
            said = action()
        except (ValueError, IndexError) as error:
            raise gr.Error(str(error)) from None
        return (*show_trace(owner, trace_id, field_name, message_index), said)

    def message_index_of(message_index):
        if message_index is None:
            raise gr.Error("Select a message (or type its number) first.")
        return int(message_index)

    def save(owner, trace_id, message_index, field_name, text):
        def action():
            at = message_index_of(message_index)
            curate.edit_message(ctx.store, trace_id, at, field_name, parse_field(field_name, text or ""))
            return f"Saved message {at}'s {field_name}."

        return edited(owner, trace_id, field_name, action, message_index)

    def delete(owner, trace_id, message_index, field_name):
        def action():
            at = message_index_of(message_index)
            curate.delete_messages(ctx.store, trace_id, [at])
            return f"Deleted message {at}."

        return edited(owner, trace_id, field_name, action)

    def merge(owner, trace_id, message_index, field_name):
        def action():
            curate.merge_user_turns(ctx.store, trace_id, message_index_of(message_index))
            return "Merged the user turns."

        return edited(owner, trace_id, field_name, action, message_index)

    def system_training(owner, trace_id, train, field_name):
        def action():
            curate.set_system_in_training(ctx.store, trace_id, bool(train))
            return "The system prompt is trained." if train else "The system prompt is left out of training."

        return edited(owner, trace_id, field_name, action)

    def undo(owner, trace_id, field_name):
        def action():
            op = curate.undo(ctx.store, trace_id)
            return f"Undid: {op}" if op else "Nothing left to undo."

        return edited(owner, trace_id, field_name, action)

    def update_preview(owner, trace_id, spec, length, turn_rows, row):
        if not trace_id:
            return gr.update(choices=[], value=None), None, ""
        return preview(ctx, owned_trace(ctx.store, trace_id, owner), spec, length, bool(turn_rows), row)

    def do_import(owner, files, tags):
        require_owner(owner)
        if not files:
            raise gr.Error("Choose one or more .json / .jsonl files first.")
        report = import_paths(ctx.store, files, owner=owner, tags=tuple(_cell_tags(tags)))
        lines = [f"Imported {len(report.imported)} trace(s); {report.duplicates} duplicate(s) skipped; "
                 f"{len(report.flagged)} flagged; {len(report.rejected)} rejected."]
        lines += [f"- flagged {Path(f['file']).name}: {'; '.join(f['reasons'])}" for f in report.flagged]
        lines += [f"- rejected {Path(r['file']).name}: {r['error']}" for r in report.rejected]
        return "\n".join(lines)

    def rows_of(owner, unrolled, flagged, heldout):
        traces = ctx.store.traces(owner=require_owner(owner))
        rows = export_rows_of(traces, by_turn=bool(unrolled), include_flagged=bool(flagged),
                              include_heldout=bool(heldout))
        if not rows:
            raise gr.Error(nothing_to_export(traces, bool(flagged), bool(heldout)))
        return rows

    def do_export(owner, fmt, unrolled, flagged, heldout):
        rows = rows_of(owner, unrolled, flagged, heldout)
        out = ctx.scratch_dir / owner_slug(owner) / f"mcpft-rows-{time.strftime('%Y%m%d-%H%M%S')}.{fmt}"
        try:
            return str(export_rows(rows, out, fmt))
        except (ValueError, OSError) as error:  # a bad target, a full disk: said, never a half file
            raise gr.Error(f"The export failed: {error}") from None

    def do_push(owner, repo, is_private, hf_token, oauth_token: gr.OAuthToken | None = None):
        rows = rows_of(owner, True, False, False)
        if not repo or "/" not in repo:
            raise gr.Error("Give the dataset repo as OWNER/NAME.")
        credential = oauth_token.token if oauth_token is not None else (hf_token or None)
        try:
            url = push_rows(rows, repo.strip(), private=bool(is_private), token=credential)
        except Exception as error:  # the Hub's refusals come in many types; the message is what matters
            raise gr.Error(f"The push failed: {hub_failure(error, repo.strip()) or error}") from None
        return f"Pushed {len(rows)} rows to [{url}]({url})."

    owner = shared.owner
    note_outputs = [*trace_outputs, note]
    refresh_args = dict(fn=refresh, inputs=[owner, hide_flagged], outputs=[table, note], show_progress="hidden")
    gr.on([refresh_button.click, tab.select, owner.change, hide_flagged.change], **refresh_args)
    redraw_args = dict(fn=redraw, inputs=[owner, hide_flagged], outputs=[table], show_progress="hidden")
    table.input(table_edited, [owner, table, hide_flagged, selected], [table, note, header])
    table.select(select_trace, [owner, field], [selected, *trace_outputs])
    messages.select(select_message, [owner, selected, field], [index, value])
    field.change(show_field, [owner, selected, index, field], [value])
    # An edit can change the trace's flags: the table is shown again after it (only when the edit succeeded).
    save_button.click(save, [owner, selected, index, field, value], note_outputs).success(**redraw_args)
    delete_button.click(delete, [owner, selected, index, field], note_outputs).success(**redraw_args)
    merge_button.click(merge, [owner, selected, index, field], note_outputs).success(**redraw_args)
    train_system.input(system_training, [owner, selected, train_system, field], note_outputs).success(**redraw_args)
    undo_button.click(undo, [owner, selected, field], note_outputs).success(**redraw_args)
    preview_inputs = [owner, selected, preview_model, max_length, by_turn, row_choice]
    gr.on([header.change, preview_model.change, max_length.submit, by_turn.change, row_choice.input],
          update_preview, preview_inputs, preview_outputs)
    import_button.click(do_import, [owner, uploads, import_tags], [import_report]).success(**redraw_args)
    export_button.click(do_export, [owner, export_format, export_unroll, export_flagged, export_heldout],
                        [export_file])
    push_button.click(do_push, [owner, repo_id, private, token], [push_report])
    return tab
