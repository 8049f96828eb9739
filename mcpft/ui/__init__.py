"""The Gradio app: five tabs (Endpoint, Agent, Curate, Train, Evaluate), each a thin wiring of the library.

    ctx = make_context()                 # store, data dir, space.yaml settings, the embedded endpoint
    demo, url = launch(ctx, port=7860)   # serves the page first, then loads the model in the background
"""

from __future__ import annotations

import gradio as gr

from mcpft.ui import agent_tab, curate_tab, endpoint_tab, evaluate_tab, train_tab
from mcpft.ui.guide import build_guide, wire_guide
from mcpft.ui.owner import resolve_owner
from mcpft.ui.space_info import space_banner, visitor_text, wrap_gpu_work
from mcpft.ui.state import AppContext, Shared, make_context


# Gradio's cell menu offers sorting and filtering on a header, and adding or deleting rows or columns only where the
# table can grow; the traces table has a fixed size, so on its body cells the menu (the ⋮ button, a right-click) would
# open as an empty box.
APP_CSS = """
.cell-menu:not(:has([role="menuitem"])) {display: none !important;}
#traces-table .body-cell .cell-menu-button {display: none !important;}
"""


def build_app(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title="mcpft") as demo:
        gr.Markdown("## mcpft · agent traces → curated data → LoRA fine-tune → before/after")
        if ctx.on_space:  # who the visitor is (OAuth), the hardware, where data is kept
            with gr.Row(equal_height=True):
                visitor_note = gr.Markdown(elem_id="visitor-note", scale=4)
                gr.LoginButton(scale=1)
            gr.Markdown(space_banner(ctx), elem_id="space-note")
            demo.load(visitor_text, None, [visitor_note], show_progress="hidden")
        shared = Shared(demo=demo, owner=gr.State(""))
        browser_id = gr.BrowserState(None, storage_key="mcpft-visitor", secret=ctx.browser_secret)
        guide_buttons = build_guide()
        with gr.Tabs() as tabs:
            endpoint_tab.build(ctx, shared)
            agent_tab.build(ctx, shared)
            curate_tab.build(ctx, shared)
            train_tab.build(ctx, shared)
            evaluate_tab.build(ctx, shared)
        wire_guide(guide_buttons, tabs)
        demo.load(resolve_owner, [browser_id], [browser_id, shared.owner])
    wrap_gpu_work(demo, ctx)  # ZeroGPU only
    # Visitors' agent turns and edits run side by side; training and evaluation set their own limit of one.
    demo.queue(default_concurrency_limit=None)
    return demo


def launch(ctx: AppContext, port: int | None = None, host: str | None = None,
           start_model: bool = True) -> tuple[gr.Blocks, str]:
    """Serve the app (returns once the page is up), then start the embedded endpoint in the background."""
    from mcpft.demo import serve_site

    ctx.demo_site = ctx.demo_site or serve_site()
    demo = build_app(ctx)
    demo.launch(server_port=port, server_name=host, prevent_thread_lock=True, footer_links=["gradio"],
                show_error=True, css=APP_CSS)
    if start_model:
        ctx.embedded.start_in_background(ctx.default_model)
    return demo, demo.local_url


__all__ = ["build_app", "launch", "make_context", "AppContext"]
