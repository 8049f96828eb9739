"""The first-run guide above the tabs: what to do, in four short steps, each a button that opens its tab."""

from __future__ import annotations

import gradio as gr

# (step, tab id, button label): the loop the app exists for, in the order a visitor walks it.
STEPS = [
    ("**1. Collect** a few traces: in the Agent tab, pick a demo task (the scripted teacher solves it) or ask your "
     "own model, and approve its tool calls.", "agent", "Open Agent"),
    ("**2. Curate** them: keep the good ones, tag a few `heldout` to test on later.", "curate", "Open Curate"),
    ("**3. Train** a small model on the kept traces (LoRA; minutes on a CPU for a few steps).", "train", "Open Train"),
    ("**4. Compare** the base and the fine-tuned model on the held-out traces. Or see the whole loop first: *Run the "
     "demo* on the Evaluate tab collects, trains and compares in one click.", "evaluate", "Open Evaluate"),
]


def build_guide() -> list[tuple[gr.Button, str]]:
    """The guide's rows; returns each button with the tab id it opens (wired by `wire_guide` once the tabs exist)."""
    buttons = []
    with gr.Accordion("Start here: what to do, in four steps", open=True, elem_id="guide"):
        for text, tab_id, label in STEPS:
            with gr.Row(equal_height=True):
                gr.Markdown(text)
                buttons.append((gr.Button(label, size="sm", scale=0, min_width=140, elem_id=f"guide-{tab_id}"),
                                tab_id))
    return buttons


def wire_guide(buttons: list[tuple[gr.Button, str]], tabs: gr.Tabs) -> None:
    for button, tab_id in buttons:
        button.click(lambda chosen=tab_id: gr.Tabs(selected=chosen), None, [tabs], show_progress="hidden")
