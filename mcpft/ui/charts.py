"""Before/after views a person reads at a glance: a grouped bar per measure (base beside fine-tuned), and a
side-by-side table with each item once and both models' answers and verdicts, which wraps instead of scrolling
sideways. Plain HTML: Gradio's bar plot draws one bar per x value, so it cannot group two bars under one measure."""

from __future__ import annotations

import html
from dataclasses import dataclass

CSS = """
.mcpft-bars {display: flex; flex-wrap: wrap; gap: 1.5em;}
.mcpft-bar-group {flex: 1 1 16em;}
.mcpft-bar-name {font-weight: 600; margin-bottom: .3em;}
.mcpft-bar-row {display: flex; align-items: center; gap: .5em; margin: .2em 0;}
.mcpft-bar-label {width: 6.5em; font-size: .9em;}
.mcpft-bar-track {flex: 0 1 60%; background: #f3f4f6; border-radius: 3px;}
.mcpft-bar {display: block; height: 1.1em; min-width: 2px; border-radius: 3px;}
.mcpft-bar.base {background: #9ca3af;}
.mcpft-bar.tuned {background: #f97316;}
.mcpft-side {width: 100%; table-layout: fixed; border-collapse: collapse;}
.mcpft-side td, .mcpft-side th {border-top: 1px solid #e5e7eb; padding: .4em; vertical-align: top;
                                overflow-wrap: anywhere; white-space: pre-wrap; text-align: left;}
.mcpft-pass {color: #15803d; font-weight: 600;}
.mcpft-fail {color: #b91c1c; font-weight: 600;}
"""
BASE_LABEL, TUNED_LABEL = "base", "fine-tuned"


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def bars_html(measures: list[tuple[str, float | None, float | None]]) -> str:
    """`measures`: (what it measures, in words; base; fine-tuned) as fractions, None where there is nothing to
    measure."""
    groups = []
    for name, base, tuned in measures:
        bars = "".join(
            f'<div class="mcpft-bar-row"><span class="mcpft-bar-label">{label}</span><span class="mcpft-bar-track">'
            f'<span class="mcpft-bar {kind}" style="width:{0 if value is None else 100 * value:.0f}%"></span></span>'
            f'<span class="mcpft-bar-value">{percent(value)}</span></div>'
            for label, kind, value in ((BASE_LABEL, "base", base), (TUNED_LABEL, "tuned", tuned)))
        groups.append(f'<div class="mcpft-bar-group"><div class="mcpft-bar-name">{html.escape(name)}</div>{bars}'
                      "</div>")
    return f'<div class="mcpft-bars">{"".join(groups)}</div>'


@dataclass
class Attempt:
    """One model's try at an item: did it pass, what it said, and a note (why it failed, how many steps)."""

    passed: bool | None  # None: not run
    answer: str
    note: str = ""

    def html(self) -> str:
        if self.passed is None:
            return '<span class="mcpft-fail">not run</span>'
        mark = '<span class="mcpft-pass">✓ passed</span>' if self.passed else '<span class="mcpft-fail">✗ failed</span>'
        note = f" <small>({html.escape(self.note)})</small>" if self.note else ""
        return f"{mark}{note}<br>{html.escape(self.answer.strip() or '(no answer)')}"  # blank text shows as nothing


def side_by_side_html(what: str, items: list[tuple[str, str, Attempt, Attempt]]) -> str:
    """`items`: (the prompt, what a right answer does, the base's attempt, the fine-tuned's attempt)."""
    rows = "".join(f"<tr><td><b>{html.escape(prompt)}</b><br><small>Expected: {html.escape(expected)}</small></td>"
                   f"<td>{base.html()}</td><td>{tuned.html()}</td></tr>" for prompt, expected, base, tuned in items)
    return ('<table class="mcpft-side"><colgroup><col style="width:40%"><col style="width:30%">'
            f'<col style="width:30%"></colgroup><thead><tr><th>{html.escape(what)}</th><th>Base model</th>'
            f"<th>Fine-tuned model</th></tr></thead><tbody>{rows}</tbody></table>")
